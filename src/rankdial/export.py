"""Export: merge a trained adapter into its base and write a plain model folder that transformers loads.

Also the two questions every command that starts from an adapter folder asks first: has its training run
finished (`check_finished`), and which base model does it belong to (`base_for_adapter`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapters import load_adapter, read_adapter_config
from .atomic import OwnFiles, atomic_dir, check_target
from .errors import AdapterFileError, ModelError
from .lora import merge_and_unload
from .models import load_model, load_model_nf4, pick_device, resolve_model

MERGE_RECORD = "rankdial_merge.json"


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


def trained_on_nf4(adapter: str | Path) -> bool:
    """Whether `adapter` is a rankdial QLoRA run (its folder's rankdial_train.json says method "qlora")."""
    record = Path(adapter) / "rankdial_train.json"
    try:
        return json.loads(record.read_text()).get("method") == "qlora"
    except (OSError, ValueError):
        return False


# A folder rankdial merged into before it wrote markers: rankdial_merge.json and nothing but what
# save_pretrained writes for a model and its tokenizer (any tokenizer's files; weights whole or in shards).
MERGED_BEFORE_MARKERS = OwnFiles(
    required=MERGE_RECORD,
    names={"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
           "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
           "chat_template.jinja", "chat_template.json", "additional_chat_templates", "vocab.json", "vocab.txt",
           "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"},
    patterns=(r"model-\d{5}-of-\d{5}\.safetensors",))


def merge_to_folder(adapter: str | Path, out: str | Path, model: str | None = None,
                    dense_base: bool | None = None, device: str = "auto") -> Path:
    """Base + adapter -> a plain transformers model folder (config, safetensors weights, tokenizer).

    `out` must be new, empty, or a folder rankdial merged into before holding nothing else; it may not be, hold or lie inside the
    adapter or the base (checked before the model loads; OutputError otherwise). The folder is built beside
    `out` and swapped in whole. The merge runs on `device` (pick_device: CUDA when present).

    A QLoRA adapter learned its update against the NF4-rounded base, so by default it is merged into the
    dequantized base (the function that was trained and evaluated); dense_base=True merges it into the
    original full-precision weights instead (what PEFT users usually do; it differs by the rounding error).
    """
    base_path = base_for_adapter(adapter, model)
    target = dict(kind="merged-model", inputs=[adapter, base_path], legacy=MERGED_BEFORE_MARKERS, what="--out folder")
    out = check_target(out, **target)
    where = pick_device(device)
    nf4 = trained_on_nf4(adapter) if dense_base is None else not dense_base
    if read_adapter_config(adapter).init_lora_weights == "loftq":
        nf4 = False  # load_adapter rebuilds LoftQ's own NF4 base from the dense weights
    net, tok = (load_model_nf4 if nf4 else load_model)(base_path, where)
    load_adapter(net, adapter)
    merged = merge_and_unload(net)  # refuses NaN/Inf adapters (on load) and non-finite merged weights (MergeError)
    with atomic_dir(out, **target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MERGE_RECORD).write_text(json.dumps({"base_model": str(base_path), "merged_into_nf4_base": nf4,
                                                    "adapter": str(Path(adapter).resolve())}, indent=2) + "\n")
    return out
