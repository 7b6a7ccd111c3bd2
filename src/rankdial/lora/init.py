"""How a new adapter's A (r, d_in) and B (d_out, r) start; PiSSA, OLoRA and LoftQ also rewrite the base.

With s the adapter's scale and W₀ (d_out, d_in) the base weight:
- True:      A Kaiming-uniform (as nn.Linear and PEFT), B = 0: the adapter starts as a no-op.
- False:     A Kaiming-uniform, B ~ N(0, 1/r): not a no-op (for tests).
- gaussian:  A ~ N(0, 1/r²), B = 0 (PEFT's "gaussian").
- pissa:     W₀ = U·S·Vᵀ; B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ; the base becomes W₀ − s·BA (Meng et al. 2024,
             arXiv:2404.02948). "pissa_niter_K" takes U_r, S_r, V_r from torch.svd_lowrank with K iterations.
- olora:     W₀ = Q·R; B = Q_r, A = R_r (first r columns / rows); the base becomes W₀ − s·BA (arXiv:2406.01775).
- loftq:     alternate T times: Q = NF4(W₀ − L·R), L·R = the best rank-r fit of W₀ − deq(Q); then s·BA = L·R and
             the base becomes the NF4 layer Q, so deq(Q) + s·BA approximates W₀ better than deq(NF4(W₀))
             (Li et al. 2023, arXiv:2310.08659).
In each residual case deq/base + s·BA = W₀ (exactly for PiSSA and OLoRA): the model starts where it was.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import init_mutates_base, pissa_niter
from ..errors import ConfigError
from ..layers import conv1d_class, quantized_kind
from ..quant.linear import NF4Linear
from ..quant.nf4 import dequantize_nf4, quantize_nf4


@torch.no_grad()
def initialise(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, scheme: bool | str,
               loftq_config: dict | None = None) -> None:
    """Fill A and B of a new adapter of `layer` (a LoraLayer) in place by `scheme`; residual schemes rewrite
    layer's base. Raises ConfigError for a residual scheme on a base it cannot rewrite."""
    r = A.shape[0]
    if not init_mutates_base(scheme):
        if scheme == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # the same init as nn.Linear and PEFT
        if scheme:
            nn.init.zeros_(B)
        else:
            nn.init.normal_(B, std=1.0 / math.sqrt(r))
        return
    base = layer.base_layer
    weight = _full_precision_weight(layer, base, scheme)  # (d_out, d_in) fp32
    if scheme == "loftq":
        a, b, quantized = loftq(weight, r, scale, (loftq_config or {}).get("loftq_iter", 1))
        A.copy_(a)
        B.copy_(b)
        layer.replace_base(NF4Linear(quantized, base.bias, None).train(base.training))
        return
    a, b = pissa(weight, r, scale, pissa_niter(scheme)) if scheme.startswith("pissa") else olora(weight, r)
    A.copy_(a)
    B.copy_(b)
    residual = weight - scale * (b @ a)
    fan_in_fan_out = layer.fan_in_fan_out
    base.weight.copy_((residual.t() if fan_in_fan_out else residual).to(base.weight.dtype))


def check_bases(bases, scheme: bool | str) -> None:
    """Raise the ConfigError initialise() would, before anything is touched: a residual scheme (PiSSA, OLoRA,
    LoftQ) on a quantized base. `bases` are the frozen linears an adapter will wrap."""
    if init_mutates_base(scheme):
        for base in bases:
            _quantized_refusal(base, scheme)


def _quantized_refusal(base: nn.Module, scheme: str) -> None:
    kind = quantized_kind(base)
    if kind:
        what = ("LoftQ quantizes the base itself from the full-precision weight: inject the adapter before "
                "quantize_model (or use method 'qlora' with this init)") if scheme == "loftq" else (
            f"{scheme} needs the full-precision weight to move its principal part into A and B (PEFT requires "
            "it too): inject into the 16/32-bit model, then quantize_model() quantizes the residual")
        raise ConfigError(f"init_lora_weights={scheme!r} on a {kind} base: {what}")


def _full_precision_weight(layer: nn.Module, base: nn.Module, scheme: str) -> torch.Tensor:
    """W₀ as (d_out, d_in) fp32 for a residual init, or the one-line reason it cannot be rewritten."""
    _quantized_refusal(base, scheme)
    conv1d = conv1d_class()
    if not (isinstance(base, nn.Linear) or (conv1d is not None and isinstance(base, conv1d))) \
            or base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ConfigError(f"init_lora_weights={scheme!r} needs a floating-point linear base, got "
                          f"{type(base).__name__} ({getattr(base.weight, 'dtype', None)})")
    if layer.lora_A:
        raise ConfigError(f"init_lora_weights={scheme!r} rewrites the base weight, and this layer already holds "
                          f"adapters {sorted(layer.lora_A)} that were trained against it; inject it first or alone")
    weight = base.weight.detach().float()
    return weight.t() if layer.fan_in_fan_out else weight


def pissa(weight: torch.Tensor, r: int, scale: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·BA the top-r singular part of `weight` (d_out, d_in): exact SVD, or svd_lowrank(niter)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / scale)  # (r,)
    return root[:, None] * Vh, U * root[None, :]  # A (r, d_in), B (d_out, r)


def olora(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R_r, Q_r) of weight = Q·R (PEFT's OLoRA: the scale is left on the product)."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def loftq(weight: torch.Tensor, r: int, scale: float, iters: int = 1, blocksize: int = 64,
          double_quant: bool = True):
    """(A, B, Q): Q = NF4(W − s·BA) and s·BA the best rank-r fit of W − deq(Q), alternated `iters` times.

    Q uses quantize_model's NF4 settings (blocks of 64, double quantization), so it is the base QLoRA would hold.
    """
    target = weight.float()
    residual = target
    for i in range(iters):
        quantized = quantize_nf4(residual.to(weight.dtype).contiguous(), blocksize, double_quant)
        error = target - dequantize_nf4(quantized, torch.float32)
        U, S, Vh = torch.linalg.svd(error, full_matrices=False)
        root = torch.sqrt(S[:r])
        L, R = U[:, :r] * root, root[:, None] * Vh[:r]  # (d_out, r), (r, d_in)
        if i + 1 < iters:
            residual = target - L @ R
    return R / math.sqrt(scale), L / math.sqrt(scale), quantized


def loftq_errors(weight: torch.Tensor, r: int, iters: int = 1) -> dict[str, float]:
    """‖W − deq(NF4(W))‖_F (plain QLoRA's start) and ‖W − (deq(Q) + s·BA)‖_F (LoftQ's), for one weight."""
    w = weight.detach().float()
    plain = (w - dequantize_nf4(quantize_nf4(w.contiguous()), torch.float32)).norm().item()
    A, B, quantized = loftq(w, r, 1.0, iters)
    ours = (w - dequantize_nf4(quantized, torch.float32) - B @ A).norm().item()
    return {"qlora": plain, "loftq": ours, "weight": w.norm().item()}
