"""Compare: one base model and its adapters answering the same prompts side by side.

One copy of the base holds every adapter under its own name; each is switched on in turn (the base alone
runs with adapters disabled), so comparing N adapters costs one base in memory. Every tensor built here is
put on the model's own device.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from .adapters import load_adapter
from .config import is_positive_int
from .errors import ConfigError, ModelError
from .export import base_for_adapter, check_finished
from .lora import disabled, set_active
from .models import load_model, pick_device, resolve_model
from .sampling import Row, SamplingParams, end_ids, make_generator
from .sampling import sample as sample_next


@dataclass
class Variant:
    label: str
    adapter: str | None  # adapter name inside the shared model, None for the base


def check_sampling(prompts: list[str] | tuple[str, ...] = (), max_new_tokens: int = 40, temperature: float = 0.0,
                   top_p: float = 1.0) -> None:
    """Raise one ConfigError naming every invalid prompt or sampling setting (each with its flag and range)."""
    problems = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            problems.append(f"prompt {i + 1} is {prompt!r}: give some text to continue")
    if not is_positive_int(max_new_tokens):
        problems.append(f"--max-new-tokens (max_new_tokens) is {max_new_tokens!r}: must be a whole number >= 1")
    if not _real(temperature) or temperature < 0:
        problems.append(f"--temperature is {temperature!r}: must be >= 0 (0 = greedy, typical 0.7-1.0)")
    if not _real(top_p) or not 0 < top_p <= 1:
        problems.append(f"--top-p (top_p) is {top_p!r}: must be in (0, 1] (1 = off, typical 0.9)")
    if problems:
        raise ConfigError("; ".join(problems))


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_device(net: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (where its inputs must be)."""
    return next(net.parameters()).device


def encode(tok, prompt: str, device: torch.device | str, chat: bool = False) -> torch.Tensor:
    """The prompt's token ids, (1, T), on `device`; ConfigError when the text gives no tokens."""
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ModelError("--chat needs a tokenizer with a chat template; this one has none")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise ConfigError(f"prompt {prompt!r} encodes to no tokens: give some text to continue")
    return ids.to(device)


def load_variants(model: str | None, adapters: list[str], device: str = "auto", include_base: bool = True):
    """(model, tokenizer, variants): one base on `device` with each adapter loaded under its own name."""
    if model is None and not adapters:
        model = "default"
    for path in adapters:  # every adapter is checked before the base model loads
        check_finished(path)
    base_path = resolve_model(model) if model else base_for_adapter(adapters[0])
    net, tok = load_model(base_path, pick_device(device))
    variants = [Variant(f"base ({base_path.name})", None)] if include_base or not adapters else []
    for i, path in enumerate(adapters):
        name = f"a{i}"
        load_adapter(net, path, adapter=name)
        variants.append(Variant(str(path), name))
    return net, tok, variants


@torch.no_grad()
def sample(net, tok, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0, chat: bool = False) -> str:
    """The model's continuation of `prompt` (greedy when temperature is 0), without the prompt: rankdial.sampling's
    sampler with a generator seeded with `seed`, so `rankdial serve` gives the same text for the same settings."""
    check_sampling([prompt], max_new_tokens, temperature, top_p)
    ids = encode(tok, prompt, model_device(net), chat)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return tok.decode(generate_ids(net, ids, params, end_ids(net, tok)), skip_special_tokens=True)


def generate_ids(net, ids: torch.Tensor, params: SamplingParams, stop_ids: set[int]) -> list[int]:
    """The tokens after `ids` (1, T), one forward per token with a KV cache, called as the serving runner calls the
    model for a lone request (explicit positions, the last position's logits), so both see the same scores."""
    from transformers import DynamicCache

    row = Row(params, make_generator(params.seed, ids.device))
    names = inspect.signature(type(net).forward).parameters
    kwargs = {"cache" if "cache" in names else "past_key_values": DynamicCache(config=net.config), "use_cache": True}
    if "logits_to_keep" in names:
        kwargs["logits_to_keep"] = 1
    mask = torch.ones_like(ids)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (1, T)
    out: list[int] = []
    while len(out) < params.max_tokens:
        logits = net(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits[:, -1].float()
        token = sample_next(logits, [row])[0]
        if row.failure is not None:
            raise ModelError(f"generation stopped after {len(out)} tokens: {row.failure}")
        if token in stop_ids:
            break
        out.append(token)
        ids = torch.tensor([[token]], device=ids.device)
        mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
        positions = positions[:, -1:] + 1
    return out


def compare(net, tok, variants: list[Variant], prompts: list[str], **kwargs) -> list[dict]:
    """[{prompt, outputs: {label: text}}] for every prompt under every variant."""
    check_sampling(prompts, **{k: v for k, v in kwargs.items() if k in ("max_new_tokens", "temperature", "top_p")})
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


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, tok, prompt: str) -> float:
    """max |logits_a - logits_b| on `prompt`; both models must sit on one device, where the ids are built."""
    device = model_device(a)
    if model_device(b) != device:
        raise ModelError(f"the two models sit on different devices ({device} and {model_device(b)}); "
                         "load both with the same device")
    ids = encode(tok, prompt, device)
    return (a(input_ids=ids).logits.float() - b(input_ids=ids).logits.float()).abs().max().item()
