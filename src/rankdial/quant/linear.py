"""NF4Linear: a frozen linear layer whose weight lives in 4-bit NF4, and quantize_model() to swap them in.

The forward dequantizes the weight a bounded chunk of rows at a time (never a full fp32 copy of a large
weight), multiplies in the compute dtype and casts back; the backward does the same for dL/dx. The weight
gets no gradient: QLoRA trains adapters beside it. Which code dequantizes is kernels.py's choice (bitsandbytes'
compiled kernel when installed, bit-identical results; pure PyTorch otherwise). An fp32 model computes in
fp32 on every CPU: bitsandbytes' fused bf16 CPU kernel runs only when asked for or when computing in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from ..memory import MIB
from ..layers import Wrapper, bnb_quant_kind, linear_dims, output_heads, path_matches
from . import kernels
from .nf4 import NF4Tensor, quantize_nf4

CHUNK_ELEMENTS = 1 << 22  # 4M weights (16 MB in fp32) dequantized at a time


class NF4Linear(nn.Module):
    """x ↦ x·deq(W)ᵀ + b with W stored in NF4 (bitsandbytes' layout) and frozen.

    Args:
        weight: the quantized (d_out, d_in) weight.
        bias: optional bias (kept in its own dtype, frozen).
        compute_dtype: dtype of the matmul (e.g. torch.bfloat16); None uses the input's dtype.

    `weight` answers like a frozen (out_features, in_features) tensor's metadata (dtype, shape, device) for
    code that probes it, and `weight.dequantize()` gives the values; see NF4Weight.

    fused_inference: None (default) lets CPU inference without autograd use bitsandbytes' fused 4-bit kernel
    only when the layer computes in bf16 anyway; True opts in for every dtype (bf16 arithmetic, ~1e-2 relative
    difference for an fp32 model, on CPUs with AVX512-BF16); False never uses it.
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise TargetError(f"NF4Linear needs a 2-D (out_features, in_features) weight, got shape "
                                f"{tuple(weight.shape)}; quantize the linear layer's weight, not another tensor")
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.weight_dtype, self.compute_dtype = weight.blocksize, weight.dtype, compute_dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        for name in ("nested_absmax", "nested_offset", "nested_code"):
            self.register_buffer(name, getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.fused_inference: bool | None = None
        self._fused = None  # bitsandbytes' CPU layout of the weight, built on first use, dropped by train()/to()

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize an nn.Linear (or GPT-2's Conv1D, whose (d_in, d_out) weight is transposed first)."""
        dims = linear_dims(linear)
        if dims is None or isinstance(linear, NF4Linear):
            raise TargetError(f"cannot quantize a {type(linear).__name__}: NF4Linear replaces nn.Linear and Conv1D only")
        weight = linear.weight.detach()
        weight = weight.t() if dims[2] else weight
        return cls(quantize_nf4(weight.contiguous(), blocksize, double_quant), linear.bias, compute_dtype)

    @property
    def weight(self) -> "NF4Weight":
        """The frozen 4-bit weight, read-only: dtype, shape, device, dequantize() (no .data to write)."""
        return NF4Weight(self)

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                         self.blocksize, self.nested_absmax, self.nested_offset, self.nested_code)

    def row_chunks(self) -> list[tuple[int, int]]:
        """Row ranges to dequantize at a time: whole NF4 blocks, at most CHUNK_ELEMENTS weights each."""
        d_in = self.in_features
        step = 1
        while (step * d_in) % self.blocksize or (step * d_in) % 2:
            step += 1
        rows = max(step, (CHUNK_ELEMENTS // d_in) // step * step)
        return [(r, min(r + rows, self.out_features)) for r in range(0, self.out_features, rows)]

    def dequantize_rows(self, start: int, stop: int, absmax: torch.Tensor, dtype: torch.dtype,
                        scratch: bool = False) -> torch.Tensor:
        """Rows start..stop of W in `dtype` (kernels.dequantize_rows: absmax in float32, scratch reuse)."""
        return kernels.dequantize_rows(self.quantized, start, stop, absmax, dtype, scratch)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight in `dtype` (default: the dtype it was quantized from)."""
        absmax = self.quantized.absmax_fp32()
        dtype = dtype or self.weight_dtype
        return torch.cat([self.dequantize_rows(a, b, absmax, dtype) for a, b in self.row_chunks()])

    @property
    def weight_bytes(self) -> int:
        return self.quantized.nbytes

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2·Wᵀ + b for a 2-D x2 (N, d_in) in the compute dtype, dequantizing W a chunk of rows at a time."""
        absmax = self.quantized.absmax_fp32()
        out = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)  # (N, d_out)
        chunks = self.row_chunks()
        for start, stop in chunks:
            w = self.dequantize_rows(start, stop, absmax, x2.dtype, scratch=True)
            if len(chunks) == 1:
                torch.mm(x2, w.t(), out=out)
            else:
                out[:, start:stop] = x2 @ w.t()
        if self.bias is not None:
            out += self.bias.to(x2.dtype)
        return out

    def matmul_grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """g·W for a 2-D g (N, d_out): the gradient of matmul() with respect to its input."""
        absmax = self.quantized.absmax_fp32()
        grad_x = torch.zeros(g.shape[0], self.in_features, dtype=g.dtype, device=g.device)  # (N, d_in)
        for start, stop in self.row_chunks():
            grad_x.addmm_(g[:, start:stop], self.dequantize_rows(start, stop, absmax, g.dtype, scratch=True))
        return grad_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_fused_path(x):
            return self._fused_matmul(x)
        return _NF4Matmul.apply(x, self)

    def may_fuse(self, dtype: torch.dtype | None = None) -> bool:
        """Whether CPU inference may use the fused bf16 kernel: opted in, or computing in bf16 anyway."""
        if self.fused_inference is not None:
            return self.fused_inference
        return (self.compute_dtype or dtype or self.weight_dtype) == torch.bfloat16

    def _takes_fused_path(self, x: torch.Tensor) -> bool:
        return (not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and self.may_fuse(x.dtype) and kernels.fused_applies(self.out_features, self.in_features, self.blocksize)
                and kernels.fused_cpu() is not None)

    def _fused_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ + b by bitsandbytes' fused CPU kernel (bf16 arithmetic)."""
        if self._fused is None:
            self._fused = kernels.pack_for_fused(self.packed, self.quantized.absmax_fp32(),
                                                 torch.Size((self.out_features, self.in_features)), self.blocksize)
        matmul, qweight, state = self._fused
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return matmul(x.to(dtype), qweight, quant_state=state, bias=bias).to(x.dtype)

    def train(self, mode: bool = True) -> "NF4Linear":
        if mode:
            self._fused = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._fused = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        q = self.quantized
        return (f"in={self.in_features}, out={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={q.double_quant}, bits/param={q.bits_per_param:.3f}, bias={self.bias is not None}")


class _NF4Matmul(torch.autograd.Function):
    """y = x·Wᵀ + b, dL/dx = g·W, with W dequantized chunk by chunk in both passes and never stored."""

    @staticmethod
    def forward(ctx, x, layer: NF4Linear):
        dtype = layer.compute_dtype or x.dtype
        out = layer.matmul(x.reshape(-1, layer.in_features).to(dtype))
        ctx.layer, ctx.x_shape, ctx.x_dtype = layer, x.shape, x.dtype
        return out.view(*x.shape[:-1], layer.out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        dtype = layer.compute_dtype or grad.dtype
        grad_x = layer.matmul_grad_input(grad.reshape(-1, layer.out_features).to(dtype))
        return grad_x.view(ctx.x_shape).to(ctx.x_dtype), None


@dataclass
class QuantizeReport:
    """What quantize_model() replaced, what it kept in full precision and why, and the bytes before and after."""

    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # skipped path -> why it was kept
    params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / self.params if self.params else 0.0

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(path)
        self.reasons[path] = reason

    def __str__(self) -> str:
        kept = "; ".join(f"{p} ({self.reasons.get(p, 'skipped')})" for p in self.skipped) or "none"
        return (f"quantized {len(self.layers)} linear layers to NF4: {self.bytes_before / MIB:.1f} MiB -> "
                f"{self.bytes_after / MIB:.1f} MiB ({self.bits_per_param:.3f} bits/param); "
                f"kept in full precision: {kept}")


def _why_kept(path: str, target: nn.Module, heads: list[nn.Module], skip: list[str] | None,
              mha_out: set[int]) -> str | None:
    """Why the linear `target` at `path` stays in full precision, or None to quantize it."""
    if any(target is h for h in heads):
        return "output head"
    if skip and path_matches(skip, path):
        return "in skip"
    if id(target) in mha_out:
        return "out_proj of nn.MultiheadAttention, which reads out_proj.weight directly"
    if bnb_quant_kind(target) is not None:
        return f"already quantized by bitsandbytes ({bnb_quant_kind(target)})"
    return None


def quantize_model(model: nn.Module, skip: list[str] | None = None, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None) -> QuantizeReport:
    """Replace every linear layer of `model` by an NF4Linear, in place; returns what it did.

    Kept in full precision, each listed in the report with its reason: the output head (get_output_embeddings),
    modules whose path matches an entry of `skip` (exactly or after a dot), the out_proj of an
    nn.MultiheadAttention (its forward reads out_proj.weight as a tensor) and layers bitsandbytes already
    quantized. Embeddings are not linear layers and are never touched. Inside a LoRA layer only the frozen
    base is quantized (through its replace_base()); adapters and modules_to_save copies are left alone.
    """
    report = QuantizeReport()
    for path, module, target, reason in quantize_candidates(model, skip):
        if reason is not None:
            report.skip(path, reason)
            continue
        quantized = NF4Linear.from_linear(target, blocksize, double_quant, compute_dtype).train(target.training)
        report.layers.append(path)
        report.params += target.weight.numel()
        report.bytes_before += target.weight.numel() * target.weight.element_size()
        report.bytes_after += quantized.weight_bytes
        if target is not module:
            module.replace_base(quantized)
        else:
            model.set_submodule(path, quantized)
    return report


def quantize_candidates(model: nn.Module, skip: list[str] | None = None) -> list[tuple[str, nn.Module, nn.Module, str | None]]:
    """(path, module, linear, reason) for every linear layer not yet in NF4: reason None means "quantize it",
    else why it stays in full precision. `linear` is the module itself, or the base inside a Wrapper
    (replace it through module.replace_base). The one policy quantize_model and quantize-on-load follow."""
    heads = output_heads(model)
    mha_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found, wrappers = [], []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, Wrapper):
            wrappers.append(path)
        target = module.wrapped() if isinstance(module, Wrapper) and module.base_replaceable else module
        if isinstance(target, NF4Linear) or linear_dims(target) is None:
            continue
        found.append((path, module, target, _why_kept(path, target, heads, skip, mha_out)))
    return found


def quantized_bits_per_param(model: nn.Module) -> float:
    """Bits per weight held by the model's NF4 layers (packed codes + scales, measured from their tensors)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    params = sum(m.in_features * m.out_features for m in layers)
    if not params:
        raise TargetError("the model has no NF4 layers; run quantize_model(model) first")
    return 8 * sum(m.weight_bytes for m in layers) / params


def set_fused_inference(model: nn.Module, enabled: bool | None) -> None:
    """Set every NF4Linear's fused_inference: True opts in to bitsandbytes' bf16 fused CPU kernel for all dtypes,
    False forbids it, None (the default) allows it only where the layer computes in bf16 anyway."""
    if enabled not in (True, False, None):
        raise ConfigError(f"set_fused_inference takes True, False or None, got {enabled!r}")
    for module in model.modules():
        if isinstance(module, NF4Linear):
            module.fused_inference = enabled


class NF4Weight:
    """What NF4Linear.weight answers: the frozen 4-bit weight seen as an (out_features, in_features) tensor.

    As torchtune's NF4Tensor and bitsandbytes' Params4bit, it stands where model code expects `.weight`:
    `dtype` is the dtype the weight was quantized from, not the compute dtype, because code that probes
    `layer.weight.dtype` (transformers' casts of hidden states, a user's `next(...).weight.dtype`) asks which
    dtype the model's activations are in, and NF4Linear returns its output in its input's dtype. It holds no
    values of its own: `dequantize()` makes them, and it cannot be assigned to (the weight is frozen).
    """

    __slots__ = ("_layer",)
    requires_grad = False
    is_quantized = True

    def __init__(self, layer: NF4Linear):
        self._layer = layer

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.weight_dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._layer.out_features, self._layer.in_features))

    @property
    def device(self) -> torch.device:
        return self._layer.packed.device

    @property
    def ndim(self) -> int:
        return 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def quantized(self) -> NF4Tensor:
        return self._layer.quantized

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in `dtype` (default: the dtype it was quantized from)."""
        return self._layer.dequantized_weight(dtype)

    def __repr__(self) -> str:
        return f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"
