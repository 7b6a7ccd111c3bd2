"""Adapters for the serving tests: built with rankdial on the embedded default model, B randomized so each one
changes the output, saved as PEFT folders."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

import rankdial as rd
from rankdial.lora import lora_layers
from rankdial.models import load_model, resolve_model

PROMPTS = ["In the beginning God", "And the LORD said unto Moses, Speak unto the children", "Jesus wept",
           "Blessed are the meek: for", "The LORD is my shepherd", "And it came to pass, when the men"]


def make_adapter(folder: Path, seed: int, r: int = 4, targets="all-linear", scale: float = 0.6, base="default"):
    """A non-zero adapter folder for `base` (the default model unless a model folder is given)."""
    model = copy.deepcopy(_base(str(base)))
    torch.manual_seed(seed)
    rd.inject(model, rd.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), adapter="default")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, scale / r ** 0.5)
    rd.save_adapter(model, folder, "default")
    return folder


@functools.lru_cache(maxsize=2)
def _base(base: str):
    return load_model(resolve_model(base))[0]


def tensor_storages(obj, depth: int = 6) -> dict[int, int]:
    """{storage address: bytes} of every tensor reachable from obj through attributes, lists, tuples and dicts
    (modules excluded): what an object holds, whatever its own bookkeeping says."""
    seen: dict[int, int] = {}

    def walk(o, d):
        if isinstance(o, torch.Tensor):
            seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif d and isinstance(o, (list, tuple)):
            for item in o:
                walk(item, d - 1)
        elif d and isinstance(o, dict):
            for item in o.values():
                walk(item, d - 1)
        elif d and hasattr(o, "__dict__") and not isinstance(o, (torch.nn.Module, type)):
            walk(vars(o), d - 1)

    walk(obj, depth)
    return seen
