"""Using trained adapters locally: sample from a base and its adapters side by side, and merge to a plain model.

One copy of the base holds every adapter under its own name; each is switched on in turn (the base alone
runs with adapters disabled), so comparing N adapters costs one base in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import load_adapter, read_adapter_config
from .errors import AdapterFileError
from .atomic import atomic_dir
from .lora import disabled, merge_and_unload, set_active
from .models import ModelError, load_model, load_model_nf4, pick_device, resolve_model


def check_finished(adapter: str | Path) -> None:
    """Refuse a `rankdial train` output folder whose run has not finished (no summary.json yet)."""
    folder = Path(adapter)
    if (folder / "rankdial_train.json").exists() and not (folder / "summary.json").exists():
        from .train.checkpoint import list_checkpoints

        ckpts = list_checkpoints(folder)
        hint = f", or use its last checkpoint's adapter {ckpts[-1] / 'adapter'}" if ckpts else ""
        raise AdapterFileError(f"{folder} is a training run that has not finished (no summary.json); finish it "
                               f"with `rankdial train ... --output-dir {folder} --resume`{hint}")


def base_for_adapter(adapter: str | Path, model: str | None = None) -> Path:
    """The base model folder for `adapter`: `model` when given, else the one its config names."""
    check_finished(adapter)
    if model:
        return resolve_model(model)
    named = read_adapter_config(adapter).base_model_name_or_path
    if not named:
        raise ModelError(f"adapter {adapter} does not name its base model; pass --model FOLDER (or 'default')")
    if not Path(named).exists():
        raise ModelError(f"adapter {adapter} names base model {named!r}, which is not a folder on this machine; "
                         "pass --model FOLDER (rankdial never downloads from a hub)")
    return resolve_model(named)


@dataclass
class Variant:
    label: str
    adapter: str | None  # adapter name inside the shared model, None for the base


def load_variants(model: str | None, adapters: list[str], device: str = "auto", include_base: bool = True):
    """(model, tokenizer, variants): one base with each adapter loaded under its own name."""
    if model is None and not adapters:
        model = "default"
    base_path = resolve_model(model) if model else base_for_adapter(adapters[0])
    net, tok = load_model(base_path, pick_device(device))
    variants = [Variant(f"base ({base_path.name})", None)] if include_base or not adapters else []
    for i, path in enumerate(adapters):
        check_finished(path)
        name = f"a{i}"
        load_adapter(net, path, adapter=name)
        variants.append(Variant(str(path), name))
    return net, tok, variants


@torch.no_grad()
def sample(net, tok, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0, chat: bool = False) -> str:
    """The model's continuation of `prompt` (greedy when temperature is 0), without the prompt."""
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ModelError("--chat needs a tokenizer with a chat template; this one has none")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    device = next(net.parameters()).device
    ids = ids.to(device)
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def compare(net, tok, variants: list[Variant], prompts: list[str], **kwargs) -> list[dict]:
    """[{prompt, outputs: {label: text}}] for every prompt under every variant."""
    rows = []
    for prompt in prompts:
        outputs = {}
        for v in variants:
            if v.adapter is None:
                with disabled(net):
                    outputs[v.label] = sample(net, tok, prompt, **kwargs)
            else:
                set_active(net, v.adapter)
                outputs[v.label] = sample(net, tok, prompt, **kwargs)
        rows.append({"prompt": prompt, "outputs": outputs})
    return rows


def trained_on_nf4(adapter: str | Path) -> bool:
    """Whether `adapter` is a rankdial QLoRA run (its folder's rankdial_train.json says method "qlora")."""
    record = Path(adapter) / "rankdial_train.json"
    try:
        return json.loads(record.read_text()).get("method") == "qlora"
    except (OSError, ValueError):
        return False


def merge_to_folder(adapter: str | Path, out: str | Path, model: str | None = None,
                    dense_base: bool | None = None) -> Path:
    """Base + adapter -> a plain transformers model folder (config, safetensors weights, tokenizer).

    A QLoRA adapter learned its update against the NF4-rounded base, so by default it is merged into the
    dequantized base (the function that was trained and evaluated); dense_base=True merges it into the
    original full-precision weights instead (what PEFT users usually do; it differs by the rounding error).
    """
    base_path = base_for_adapter(adapter, model)
    nf4 = trained_on_nf4(adapter) if dense_base is None else not dense_base
    net, tok = (load_model_nf4 if nf4 else load_model)(base_path, "cpu")
    load_adapter(net, adapter)
    merged = merge_and_unload(net)
    bad = [n for n, p in merged.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise AdapterFileError(f"merging {adapter} gives non-finite weights in {bad[:3]}; the adapter is broken")
    out = Path(out)
    with atomic_dir(out, kind="merged-model", inputs=[adapter, base_path],
                    legacy=lambda f: (f / "rankdial_merge.json").is_file(), what="--out folder") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "rankdial_merge.json").write_text(json.dumps({"base_model": str(base_path), "merged_into_nf4_base": nf4,
                                                              "adapter": str(Path(adapter).resolve())}, indent=2) + "\n")
    return out
