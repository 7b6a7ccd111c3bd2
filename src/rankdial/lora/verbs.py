"""Model-level verbs over the LoRA layers of a model: activate, merge, unmerge, unload, disable, count.

A model's adapters are whatever its layers hold (see LoraLayer): every verb reads them from the wrappers,
so it works on the model they were injected into, on any model that contains it, and through DDP or
torch.compile wrappers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError, MergeError
from ..layers import bnb_quant_kind, quantized_kind
from ..quant.linear import NF4Linear
from ..quant.nf4 import quantize_nf4
from .inject import adapter_configs, named_wrappers, unwrap_model
from .layer import LoraLayer
from .modules_to_save import ModulesToSave
from .param import ExpertLora


def lora_layers(model: nn.Module):
    """Yield (path, LoraLayer) for every LoRA layer in the model."""
    for path, module in named_wrappers(model):
        if isinstance(module, LoraLayer):
            yield path, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into `model`, in injection order."""
    return list(adapter_configs(model))


def _known(model: nn.Module, names: str | list[str], verb: str = "set_active") -> list[str]:
    if isinstance(names, str):
        names = [names]
    elif isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        names = list(dict.fromkeys(names))  # each adapter once: merging a name twice would add its ΔW twice
    else:
        raise AdapterError(f"{verb}() takes an adapter name or a list of names, got {names!r} "
                           f"({type(names).__name__}); e.g. {verb}(model, 'default') or {verb}(model, ['a', 'b'])")
    unknown = [n for n in names if n not in adapter_configs(model)]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; this model has {adapter_names(model) or 'no adapters'} "
                           "(inject() or load_adapter() one first)")
    return names


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters whose terms are added in the forward, in order."""
    active: list[str] = []
    for _, layer in named_wrappers(model):
        if isinstance(layer, (LoraLayer, ExpertLora)):
            active += [a for a in layer.active if a not in active]
    return active


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly `names` active (their terms are summed); [] leaves only the base.

    Raises:
        AdapterError: a name is unknown.
        MergeError: an adapter is merged into the base: unmerge(model) first.
    """
    names = _known(model, names)
    merged = {a for _, layer in lora_layers(model) for a in layer.merged}
    if merged - set(names):
        raise MergeError(f"adapter(s) {sorted(merged)} are merged into the base weights; call unmerge(model) "
                         "before changing the active adapters")
    for _, wrapper in named_wrappers(model):
        wrapper.set_active(names)


def _is_quantized(layer: LoraLayer) -> bool:
    return quantized_kind(layer.base_layer) is not None


def _something_to_merge(model: nn.Module, verb: str) -> None:
    """Raise unless `model` has an active adapter: merging nothing is a mistake worth a word, not a no-op."""
    if not adapter_configs(model):
        raise AdapterError(f"{verb}(): this model has no LoRA adapters; inject() or load_adapter() one first")
    if not active_adapters(model):
        raise MergeError(f"{verb}(): no adapter is active (adapters: {adapter_names(model)}); call "
                         "set_active(model, name) first, or unload(model) to remove the adapters without merging")


def merge(model: nn.Module, adapters: str | list[str] | None = None) -> None:
    """Add s·BA of the active (or named) adapters into the base weights in place; idempotent.

    Safe by construction (PEFT's safe_merge=True is always on): every merged weight is checked for NaN/Inf
    before it is written, and the merge is all-or-nothing across layers: if any layer would get a non-finite
    weight, every layer merged by this call is unmerged again and MergeError names the adapter and the layer.
    A quantized base (NF4, bitsandbytes 4/8-bit) refuses: see merge_and_unload.
    """
    if adapters is None:
        _something_to_merge(model, "merge")
    elif not _known(model, adapters, "merge"):
        raise MergeError("merge(model, []): no adapter named; give a name, or call merge(model) for the active ones")
    _merge_layers(list(lora_layers(model)), None if adapters is None else _known(model, adapters, "merge"))
    _merge_experts(model, None if adapters is None else _known(model, adapters, "merge"))


def _merge_experts(model: nn.Module, names: list[str] | None) -> None:
    """Merge into each expert-parameter wrapper (lora/param.py); each checks its own merged weights first."""
    for path, wrapper in named_wrappers(model):
        if isinstance(wrapper, ExpertLora):
            wrapper.merge(None if names is None else [n for n in names if n in wrapper.lora_A], module_path=path)


def _merge_layers(layers: list[tuple[str, LoraLayer]], names: list[str] | None) -> None:
    """Merge into every layer or none: each layer is checked (merge_check) before the first weight is written."""
    plans = []
    for path, layer in layers:
        wanted = [n for n in (layer.active if names is None else names) if n in layer.lora_A]
        plans.append((path, layer, layer.merge_check(wanted, module_path=path)))
    for path, layer, todo in plans:
        layer.merge(todo, module_path=path)


def _merge_dense(model: nn.Module) -> None:
    """Merge the active adapters of every layer whose base is dense (4-bit bases are rebuilt, not merged)."""
    _merge_layers([(p, layer) for p, layer in lora_layers(model) if not _is_quantized(layer)], None)
    _merge_experts(model, None)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights, restoring W₀ up to rounding."""
    for _, layer in named_wrappers(model):
        if isinstance(layer, (LoraLayer, ExpertLora)):
            layer.unmerge()


def _dense_linear(layer: LoraLayer, weight: torch.Tensor, path: str) -> nn.Linear:
    """A plain nn.Linear holding `weight` (d_out, d_in) and the base's bias, in the dtype W₀ was stored in
    (MergeError if that dtype cannot hold it: an fp16 base overflows past 65504)."""
    base = layer.base_layer
    dtype = _stored_dtype(base)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(_stored(layer, weight, dtype, path))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


def _stored(layer: LoraLayer, weight: torch.Tensor, dtype: torch.dtype, path: str) -> torch.Tensor:
    """`weight` (a merged fp32 weight) in `dtype`; MergeError if that dtype cannot hold it (fp16 past 65504)."""
    stored = weight.to(dtype)
    if not torch.isfinite(stored).all():
        raise MergeError(f"merging adapters {layer.active} into {path} gives NaN/Inf weights in "
                         f"{str(dtype).removeprefix('torch.')}; the adapter weights are corrupt or diverged "
                         "(the model is unchanged)")
    return stored


def _stored_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a base weight had before it was quantized (or has, for a dense base)."""
    if isinstance(base, NF4Linear):
        return base.weight_dtype
    kind = bnb_quant_kind(base)
    if kind == "4bit":
        return base.weight.quant_state.dtype
    if kind == "8bit":
        return base.bias.dtype if base.bias is not None else torch.float32
    return base.weight.dtype


def _unload(model: nn.Module, replacements: dict[str, nn.Module], merged: bool = True) -> nn.Module:
    """Put plain modules back: merged linears for LoRA layers, the active copy for modules_to_save (or, with
    merged=False, the original module)."""
    model = unwrap_model(model)
    for path, wrapper in list(named_wrappers(model)):
        if isinstance(wrapper, (LoraLayer, ExpertLora)):
            plain = replacements.get(path, wrapper.base_layer)
        else:
            plain = wrapper.modules_to_save[wrapper.active] if wrapper.active and merged else wrapper.original_module
        model.set_submodule(path, plain)
    model.__dict__.pop("save_pretrained", None)  # the guard inject() installed
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put plain modules back: returns the model with the base's own key names.

    A quantized base (NF4, or bitsandbytes' 4/8-bit layers of a PEFT-style base) is merged honestly: its
    dequantized weight plus the adapter becomes a plain nn.Linear in the dtype the weight was quantized from
    (16 or 32 bit); nothing is rounded back to 4 or 8 bits. NaN/Inf are checked first (see merge).
    """
    _something_to_merge(model, "merge_and_unload")
    dense = {p: _dense_linear(layer, layer.merged_weight(p), p) for p, layer in lora_layers(model) if _is_quantized(layer)}
    _merge_dense(model)
    return _unload(model, dense)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging it: the base model back, with its own modules and key names.

    Adapters merged into the base are subtracted first, so what is returned computes the base's function.
    """
    if not adapter_configs(model):
        raise AdapterError("unload(): this model has no LoRA adapters; there is nothing to remove")
    unmerge(model)
    for _, layer in lora_layers(model):
        layer.restore_base()  # PiSSA/OLoRA moved part of W₀ into their adapters: put it back
    return _unload(model, {}, merged=False)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (unmerging it first); wrappers left empty are unwrapped."""
    _known(model, name, "delete_adapter")
    model = unwrap_model(model)
    for path, wrapper in list(named_wrappers(model)):
        if isinstance(wrapper, (LoraLayer, ExpertLora)) and name in wrapper.lora_A:
            wrapper.delete_adapter(name)
            empty, plain = not wrapper.lora_A, wrapper.base_layer
        elif isinstance(wrapper, ModulesToSave) and name in wrapper.modules_to_save:
            wrapper.delete_adapter(name)
            empty, plain = not wrapper.modules_to_save, wrapper.original_module
        else:
            continue
        if empty:
            model.set_submodule(path, plain)
    if not adapter_configs(model):
        model.__dict__.pop("save_pretrained", None)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block the model computes its base output: adapters are skipped (merged ones taken out)."""
    wrappers = [w for _, w in named_wrappers(model)]
    merged = {id(w): list(w.merged) for w in wrappers if isinstance(w, (LoraLayer, ExpertLora)) and w.merged}
    for w in wrappers:
        if id(w) in merged:
            w.unmerge()
        w.disabled = True
    try:
        yield model
    finally:
        for w in wrappers:
            w.disabled = False
            if id(w) in merged:
                w.merge(merged[id(w)])


@dataclass
class ParameterReport:
    """How many parameters train: in total and per adapted module."""

    trainable: int
    total: int
    rows: list[tuple[str, str, int]]  # (module path, what it holds, trainable parameters)

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.share:.2f}%"

    def table(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [6])
        lines = [f"{'module':<{width}}  {'adapter':<28}  {'trainable':>12}"]
        lines += [f"{path:<{width}}  {what:<28}  {n:>12,}" for path, what, n in self.rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters, with one row per adapted module."""
    rows = []
    for path, wrapper in named_wrappers(model):
        if isinstance(wrapper, LoraLayer):
            for name in wrapper.lora_A:
                parts = (wrapper.lora_A[name], wrapper.lora_B[name]) + ((wrapper.lora_magnitude_vector[name],)
                                                                        if wrapper.is_dora(name) else ())
                n = sum(p.numel() for m in parts for p in m.parameters() if p.requires_grad)
                dora = ", DoRA" if wrapper.is_dora(name) else ""
                rows.append((path, f"{name}: r={wrapper.rank(name)}{dora} ({wrapper.in_features}->{wrapper.out_features})", n))
        elif isinstance(wrapper, ExpertLora):
            for name in wrapper.lora_A:
                n = sum(p.numel() for p in wrapper.lora_A[name].parameters() if p.requires_grad)
                n += sum(p.numel() for p in wrapper.lora_B[name].parameters() if p.requires_grad)
                rows.append((path, f"{name}: r={wrapper.rank(name)} per expert on {', '.join(wrapper.lora_A[name])}", n))
        else:
            for name, copy in wrapper.modules_to_save.items():
                rows.append((path, f"{name}: full copy", sum(p.numel() for p in copy.parameters() if p.requires_grad)))
    model = unwrap_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # NF4 weights are packed buffers, not Parameters: count each as the weights it stands for
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    total = sum(p.numel() for p in model.parameters()) + quantized
    return ParameterReport(trainable, total, rows)


@dataclass
class RequantizeReport:
    """The rounding error that re-quantizing merged weights to NF4 introduced, per layer and overall."""

    rows: list[tuple[str, float, float]]  # (module path, max |error|, ‖error‖ / ‖W‖)

    @property
    def max_abs_error(self) -> float:
        return max((r[1] for r in self.rows), default=0.0)

    @property
    def max_relative_error(self) -> float:
        return max((r[2] for r in self.rows), default=0.0)

    def __str__(self) -> str:
        return (f"re-quantized {len(self.rows)} merged layers to NF4: max |error| {self.max_abs_error:.3g}, "
                f"worst relative error {self.max_relative_error:.3g} (‖Q(W)-W‖/‖W‖)")


def merge_and_requantize(model: nn.Module) -> tuple[nn.Module, RequantizeReport]:
    """Like merge_and_unload, but 4-bit layers go back to NF4 (same block size and double quantization).

    Rounding W₀ + ΔW to 4 bits loses part of ΔW; the report says how much, layer by layer. A bitsandbytes
    base becomes a dense layer, as in merge_and_unload.
    """
    _something_to_merge(model, "merge_and_requantize")
    rows, quantized = [], {}
    for path, layer in lora_layers(model):
        if not isinstance(layer.base_layer, NF4Linear):
            if _is_quantized(layer):
                quantized[path] = _dense_linear(layer, layer.merged_weight(path), path)
            continue
        base, weight = layer.base_layer, layer.merged_weight(path)
        nf4 = quantize_nf4(_stored(layer, weight, base.weight_dtype, path), base.blocksize, base.nested_absmax is not None)
        new = NF4Linear(nf4, base.bias, base.compute_dtype)
        error = new.dequantized_weight(torch.float32) - weight
        rows.append((path, error.abs().max().item(), (error.norm() / weight.norm().clamp(min=1e-30)).item()))
        quantized[path] = new
    _merge_dense(model)
    return _unload(model, quantized), RequantizeReport(rows)
