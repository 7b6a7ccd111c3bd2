"""What rankdial treats as a linear layer, and the contract between wrappers and the tools that reach inside.

This module is neutral ground: `lora/` and `quant/` both import it and neither imports the other's internals
(`quant/` knows nothing of `lora/`). It answers four questions in one place each:
- is this module a linear map, and of which shape? (`linear_dims`: nn.Linear and its subclasses, GPT-2's
  Conv1D, anything that follows the `QuantizedLinear` protocol such as NF4Linear);
- which module is the output head? (`output_heads`);
- does a PEFT-style name list select this path? (`path_matches`);
- how does a tool see through a wrapper? (`Wrapper`: LoraLayer and ModulesToSave stand in for a module).
"""

from __future__ import annotations

import sys
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .errors import TargetError


@runtime_checkable
class QuantizedLinear(Protocol):
    """A frozen linear layer whose weight is stored quantized (NF4Linear): x ↦ x·deq(W)ᵀ + b."""

    in_features: int
    out_features: int

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in `dtype`."""
        ...


@runtime_checkable
class Wrapper(Protocol):
    """A rankdial module that stands in for another (LoraLayer wraps a linear, ModulesToSave a whole module).

    Tools that walk a model (quantize_model, injection, the head search) look through it at `wrapped()` and do
    not descend into its own children (adapters, trained copies). When `base_replaceable` is True the wrapped
    module is a frozen base that may be swapped, e.g. for its 4-bit version, through `replace_base()`.
    """

    base_replaceable: bool

    def wrapped(self) -> nn.Module:
        ...

    def replace_base(self, module: nn.Module) -> None:
        ...


def unwrap(module: nn.Module) -> nn.Module:
    """The module a Wrapper stands for; any other module itself."""
    return module.wrapped() if isinstance(module, Wrapper) else module


def conv1d_class() -> type | None:
    """GPT-2's Conv1D, if transformers is loaded (a model cannot hold one otherwise)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_in, d_out, fan_in_fan_out) of a linear layer, or None for anything else.

    nn.Linear and its subclasses (bitsandbytes' Linear4bit / Linear8bitLt included) store W as (d_out, d_in);
    GPT-2's Conv1D stores it as (d_in, d_out), hence fan_in_fan_out=True; a QuantizedLinear says its own size.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    if isinstance(module, QuantizedLinear) and isinstance(module, nn.Module):
        return module.in_features, module.out_features, False
    return None


def bnb_quant_kind(module: nn.Module) -> str | None:
    """'4bit' or '8bit' for a bitsandbytes Linear4bit / Linear8bitLt (integer weights), else None.

    Checked by the weight's class name so that bitsandbytes is never imported just to ask.
    """
    name = type(getattr(module, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(name)


def quantized_kind(module: nn.Module) -> str | None:
    """A word for a quantized base ('4-bit NF4', 'bitsandbytes 4-bit', 'bitsandbytes 8-bit'), None for a dense one."""
    if isinstance(module, QuantizedLinear):
        return "4-bit NF4"
    kind = bnb_quant_kind(module)
    return f"bitsandbytes {kind[0]}-bit" if kind else None


def dense_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (d_out, d_in) weight of any linear layer in `dtype`: quantized ones dequantized, Conv1D transposed.

    bitsandbytes' layers are dequantized as PEFT does (dequantize_4bit with the weight's quant_state; int8
    weights times their per-row scale SCB/127), so a PEFT user's 4/8-bit base merges into the same floats.
    """
    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight(dtype)
    kind = bnb_quant_kind(module)
    if kind is not None:
        import bitsandbytes.functional as bnb_functional

        weight = module.weight
        if kind == "4bit":
            return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        scb = getattr(getattr(module, "state", None), "SCB", None)
        scb = weight.SCB if scb is None else scb
        return bnb_functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).to(dtype)
    dims = linear_dims(module)
    if dims is None:
        raise TargetError(f"{type(module).__name__} is not a linear layer; it has no weight matrix to merge into")
    return (module.weight.t() if dims[2] else module.weight).to(dtype)


def output_heads(model: nn.Module, task_type: str | None = None) -> list[nn.Module]:
    """The output head(s) that 'all-linear' and quantization leave alone, as PEFT and transformers do.

    The language-model head (get_output_embeddings), seen through a wrapper; for task_type SEQ_CLS without
    one, the classification head ('score' or 'classifier').
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        return [unwrap(head)]
    if task_type == "SEQ_CLS":
        return [unwrap(getattr(model, n)) for n in SEQ_CLS_HEADS if isinstance(getattr(model, n, None), nn.Module)]
    return []


SEQ_CLS_HEADS = ("score", "classifier")


def path_matches(names: list[str], path: str) -> bool:
    """PEFT's rule for a list of names: an entry matches a module path exactly or as the part after a dot."""
    return any(path == name or path.endswith("." + name) for name in names)


def named_unwrapped(model: nn.Module):
    """(path, module) for every module below the root, seeing a Wrapper as the module it wraps (once)."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, Wrapper):
            inside.append(path)
            module = module.wrapped()
        yield path, module
