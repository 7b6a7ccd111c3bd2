"""NF4Linear: a frozen linear layer whose weight lives in 4-bit NF4, and quantize_model() to swap them in.

The forward dequantizes the weight a bounded chunk of rows at a time (never a full fp32 copy of a large
weight), multiplies in the compute dtype and casts back; the backward does the same for dL/dx. The weight
gets no gradient: QLoRA trains adapters beside it. Dequantization uses bitsandbytes' compiled kernel when
that package is installed (the format is bit-identical, and so are the results) and pure PyTorch otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import RankdialError
from ..layers import Wrapper
from .nf4 import NF4Tensor, dequantize_range, quantize_nf4

CHUNK_ELEMENTS = 1 << 22  # 4M weights (16 MB in fp32) dequantized at a time
_SCRATCH = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable buffer for one dequantized chunk (per thread, grown to the largest chunk seen).

    Training dequantizes every layer's weight twice per step. With a fresh tensor each time, glibc's heap
    fragments (each freed multi-MB chunk gets split by the small activations allocated after it), and a
    QLoRA process grew by hundreds of MB of free-but-held memory per step on a 150M-parameter model. One
    buffer, consumed before the next chunk is dequantized, keeps the footprint at one chunk.
    """
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        if buf is not None and buf.dtype == dtype and buf.device == device:
            numel = max(numel, buf.numel())
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH.buf = buf
    return buf[:numel]
_KERNEL = os.environ.get("RANKDIAL_NF4_KERNEL", "auto")  # auto | torch | bitsandbytes


def set_kernel(name: str) -> None:
    """Choose NF4 dequantization: 'auto' (bitsandbytes if installed), 'torch' (pure), or 'bitsandbytes'."""
    global _KERNEL
    if name not in ("auto", "torch", "bitsandbytes"):
        raise RankdialError(f"NF4 kernel must be 'auto', 'torch' or 'bitsandbytes', got {name!r}")
    _KERNEL = name


def _conv1d_class() -> type | None:
    """GPT-2's Conv1D, if transformers is loaded (a model cannot hold one otherwise)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_in, d_out, fan_in_fan_out) for nn.Linear, Conv1D (weight stored (d_in, d_out)) or NF4Linear; else None."""
    if isinstance(module, (nn.Linear, NF4Linear)):
        return module.in_features, module.out_features, False
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    return None


def _bnb_dequantize():
    """bitsandbytes' dequantize_4bit op, or None when the pure path is chosen or the package is missing."""
    if _KERNEL == "torch":
        return None
    if "bitsandbytes" not in sys.modules:
        # Its CPU backend warns at import that an optional hub-downloaded kernel package is missing; rankdial
        # never downloads and does not use that kernel, so the warning is noise here.
        quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            import bitsandbytes  # noqa: F401  (registers the ops)
        except ImportError:
            if _KERNEL == "bitsandbytes":
                raise RankdialError("RANKDIAL_NF4_KERNEL=bitsandbytes but bitsandbytes is not installed; "
                                    "pip install bitsandbytes, or use 'auto'") from None
            return None
        finally:
            quiet.setLevel(level)
    return torch.ops.bitsandbytes.dequantize_4bit.default


_INTO: dict = {}


def _bnb_cpu_dequantize_into(dtype: torch.dtype):
    """bitsandbytes' compiled CPU NF4 dequantizer writing into a given buffer, or None where unavailable.

    Its registered op (dequantize_4bit) always allocates its output and has no CPU `out=` variant; this calls
    the same C function the op calls (cdequantize_blockwise_cpu_nf4_*), so the values are identical (tested).
    """
    if dtype not in _INTO:
        fn = None
        try:
            import ctypes

            from bitsandbytes.cextension import lib
            from bitsandbytes.functional import get_ptr

            suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
            c_fn = getattr(lib, f"cdequantize_blockwise_cpu_nf4_{suffix}")

            def fn(packed, scales, out, blocksize):
                m, n = out.shape
                c_fn(get_ptr(packed), get_ptr(scales), get_ptr(out), ctypes.c_longlong(blocksize),
                     ctypes.c_longlong(m), ctypes.c_longlong(n))
        except (ImportError, AttributeError, KeyError, RuntimeError):
            fn = None
        _INTO[dtype] = fn
    return _INTO[dtype]


def _bnb_fused_cpu():
    """bitsandbytes.functional when its fused 4-bit CPU matmul (AVX512-BF16) is usable, else None."""
    if _KERNEL == "torch" or _bnb_dequantize() is None:
        return None
    import bitsandbytes.functional as bnb_functional

    return bnb_functional if bnb_functional.has_avx512bf16() else None


class NF4Linear(nn.Module):
    """x ↦ x·deq(W)ᵀ + b with W stored in NF4 (bitsandbytes' layout) and frozen.

    Args:
        weight: the quantized (d_out, d_in) weight.
        bias: optional bias (kept in its own dtype, frozen).
        compute_dtype: dtype of the matmul (e.g. torch.bfloat16); None uses the input's dtype.
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise RankdialError(f"NF4Linear needs a 2-D (out_features, in_features) weight, got shape "
                                f"{tuple(weight.shape)}; quantize the linear layer's weight, not another tensor")
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.weight_dtype, self.compute_dtype = weight.blocksize, weight.dtype, compute_dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        for name in ("nested_absmax", "nested_offset", "nested_code"):
            self.register_buffer(name, getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Inference without autograd on a CPU with AVX512-BF16 may use bitsandbytes' fused kernel, which reads
        # 4-bit weights directly but computes in bf16; set False for the exact fp32 path everywhere.
        self.fused_inference = True
        self._fused = None  # bitsandbytes' CPU layout of the weight, built on first use, dropped by train()/to()

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize an nn.Linear (or GPT-2's Conv1D, whose (d_in, d_out) weight is transposed first)."""
        dims = linear_dims(linear)
        if dims is None or isinstance(linear, NF4Linear):
            raise RankdialError(f"cannot quantize a {type(linear).__name__}: NF4Linear replaces nn.Linear and Conv1D only")
        weight = linear.weight.detach()
        weight = weight.t() if dims[2] else weight
        return cls(quantize_nf4(weight.contiguous(), blocksize, double_quant), linear.bias, compute_dtype)

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
        """Rows start..stop of W in `dtype`; `absmax` is the float32 per-block scale (see NF4Tensor.absmax_fp32).

        scratch=True writes into the thread's reusable buffer (bitsandbytes path): the result is only valid
        until the next scratch call, so use it at once.
        """
        first, last = start * self.in_features, stop * self.in_features
        # bitsandbytes' compiled CPU kernel is only right when blocks do not straddle rows (and it falls back
        # itself for blocksize >= 2048); elsewhere the pure path is both correct and the reference.
        aligned = self.in_features % self.blocksize == 0 and self.blocksize < 2048
        kernel = _bnb_dequantize() if aligned else None
        if kernel is not None and dtype in (torch.float32, torch.float16, torch.bfloat16):
            packed = self.packed[first // 2:(last + 1) // 2]
            scales = absmax[first // self.blocksize:-(-last // self.blocksize)]
            shape = [stop - start, self.in_features]
            into = _bnb_cpu_dequantize_into(dtype) if scratch and packed.device.type == "cpu" else None
            if into is not None:
                out = _scratch(last - first, dtype, packed.device).view(shape)
                into(packed, scales.float().contiguous(), out, self.blocksize)
                return out
            return kernel(packed, scales, self.blocksize, "nf4", shape, dtype)
        return dequantize_range(self.quantized, first, last, absmax, dtype).view(stop - start, self.in_features)

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
        if self.fused_inference and not self.training and not torch.is_grad_enabled() and x.device.type == "cpu":
            fused = self._fused_matmul(x)
            if fused is not None:
                return fused
        return _NF4Matmul.apply(x, self)

    def _fused_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x·Wᵀ + b by bitsandbytes' fused CPU kernel (bf16 arithmetic), or None where it does not apply."""
        bnb_functional = _bnb_fused_cpu()
        if bnb_functional is None or self.out_features % 32 or self.in_features % 2 or \
                self.in_features % self.blocksize:
            return None
        if self._fused is None:
            import bitsandbytes as bnb

            state = bnb_functional.QuantState(
                absmax=self.quantized.absmax_fp32().clone(), shape=torch.Size((self.out_features, self.in_features)),
                dtype=torch.float32, blocksize=self.blocksize, quant_type="nf4",
                code=bnb_functional.get_4bit_type("nf4", device=self.packed.device))
            qweight, state = bnb_functional._convert_weight_packed_for_cpu(self.packed.view(-1, 1).clone(), state)
            self._fused = (bnb.matmul_4bit, qweight, state)
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
    """What quantize_model() replaced, and the bytes of those weights before and after."""

    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / self.params if self.params else 0.0

    def __str__(self) -> str:
        return (f"quantized {len(self.layers)} linear layers to NF4: {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB ({self.bits_per_param:.3f} bits/param); "
                f"kept in full precision: {self.skipped or 'none'}")


def _matches(names: list[str], path: str) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def quantize_model(model: nn.Module, skip: list[str] | None = None, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None) -> QuantizeReport:
    """Replace every linear layer of `model` by an NF4Linear, in place; returns what it did.

    The output head (get_output_embeddings) and modules whose path matches an entry of `skip` (exactly or
    after a dot) stay in full precision; embeddings are not linear layers and are never touched. Inside a
    LoRA layer only the frozen base is quantized (through its replace_base()); adapters and modules_to_save
    copies are left alone.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    report, wrappers = QuantizeReport(), []
    for path, module in list(model.named_modules()):
        if any(path.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, Wrapper):
            wrappers.append(path)
        target = module.wrapped() if isinstance(module, Wrapper) and module.base_replaceable else module
        if isinstance(target, NF4Linear) or linear_dims(target) is None:
            continue
        if target is head or getattr(head, "base_layer", None) is target or (skip and _matches(skip, path)):
            report.skipped.append(path)
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


def quantized_bits_per_param(model: nn.Module) -> float:
    """Bits per weight held by the model's NF4 layers (packed codes + scales, measured from their tensors)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    params = sum(m.in_features * m.out_features for m in layers)
    if not params:
        raise RankdialError("the model has no NF4 layers; run quantize_model(model) first")
    return 8 * sum(m.weight_bytes for m in layers) / params


def set_fused_inference(model: nn.Module, enabled: bool) -> None:
    """Allow (True, the default) or forbid bitsandbytes' bf16 fused CPU inference in every NF4Linear of `model`."""
    for module in model.modules():
        if isinstance(module, NF4Linear):
            module.fused_inference = enabled
