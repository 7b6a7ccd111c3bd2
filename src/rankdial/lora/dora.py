"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), composed on the LoRA layer.

    W' = m ⊙ (W₀ + s·BA) / n,   n = ‖W₀ + s·BA‖ per output row,   m: (d_out,) learned

The norm n is a constant to autograd (the paper's §4.3, as PEFT does), so with x_d = dropout(x):

    h = W₀x + b + (m/n − 1)⊙W₀x_d + (m/n)⊙s·BAx_d          (PEFT's form, any dropout)
      = (m/n)⊙(W₀x + s·BAx) + b                             (no dropout: the LoRA output, rescaled per row)

`row_norm` computes n without forming W₀ + s·BA: ‖W₀‖²_row + 2s·⟨W₀Aᵀ, B⟩_row + s²·⟨B·(AAᵀ), B⟩_row, one
(d_out × d_in × r) product instead of a (d_out × d_in) temporary; `row_norm_reference` forms it, and tests hold
the two equal. The magnitude is stored as PEFT stores it: `lora_magnitude_vector.<adapter>.weight` in the
module, `<path>.lora_magnitude_vector` in the file.

With several active adapters, a DoRA adapter's W₀x is the base's output alone (PEFT passes the running sum,
which includes the adapters before it); one active adapter, the usual case, is identical in both. A DoRA
adapter merges alone (LoraLayer.merge_check), since n is taken against the unmerged W₀.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TargetError
from ..layers import conv1d_class, dense_weight
from ..quant.linear import NF4Linear


class Magnitude(nn.Module):
    """DoRA's learned magnitude m, one value per output row (d_out,), as PEFT's DoraLinearLayer holds it."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"d_out={self.weight.shape[0]}"


def check_base(base: nn.Module, path: str = "") -> None:
    """Raise TargetError unless DoRA covers this base: nn.Linear, GPT-2's Conv1D, NF4Linear, bitsandbytes 4/8-bit."""
    conv1d = conv1d_class()
    if isinstance(base, (NF4Linear, nn.Linear)) or (conv1d is not None and isinstance(base, conv1d)):
        return
    raise TargetError(f"use_dora does not cover {type(base).__name__}{f' at {path}' if path else ''}: DoRA is "
                      "implemented for nn.Linear, Conv1D, NF4Linear and bitsandbytes' Linear4bit/Linear8bitLt; "
                      "leave this module out of target_modules or set use_dora=False")


def _dense_fp32(base: nn.Module) -> torch.Tensor:
    return dense_weight(base, torch.float32)  # (d_out, d_in), dequantized / transposed as needed


@torch.no_grad()
def row_norm_reference(base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """n = ‖W₀ + s·BA‖ per row, (d_out,) fp32, with W₀ + s·BA formed in full (what PEFT computes)."""
    weight = _dense_fp32(base).to(A.device)
    return torch.linalg.norm(weight + scale * (B.float() @ A.float()), dim=1)


@torch.no_grad()
def row_norm(base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """n = ‖W₀ + s·BA‖ per row, (d_out,) fp32, by the expanded square: W₀+s·BA is never formed.

    An NF4 base is dequantized a chunk of rows at a time (NF4Linear.row_chunks), so no full W₀ exists either.
    """
    A, B = A.float(), B.float()  # (r, d_in), (d_out, r)
    # ‖W₀‖² per row is computed from the same read of W₀ as W₀Aᵀ (no cache: a cache keyed on the weight's storage
    # and version missed writes through `weight.data`, which bump neither, and served a stale norm)
    if isinstance(base, NF4Linear):
        absmax = base.quantized.absmax_fp32()
        chunks = [base.dequantize_rows(start, stop, absmax, torch.float32) for start, stop in base.row_chunks()]
        w_at = torch.cat([w @ A.t() for w in chunks])  # (d_out, r)
        w_sq = torch.cat([w.square().sum(1) for w in chunks])
    else:
        w = _dense_fp32(base).to(A.device)
        w_at = w @ A.t()  # (d_out, r)
        w_sq = w.square().sum(1)
    ba_sq = ((B @ (A @ A.t())) * B).sum(1)  # ‖(BA)_row‖², (d_out,)
    total = w_sq + 2 * scale * (w_at * B).sum(1) + scale * scale * ba_sq
    return total.clamp_min(0).sqrt()


def base_out_without_bias(base: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """W₀x from the base's output h = W₀x + b."""
    bias = getattr(base, "bias", None)
    return h if bias is None else h - bias.to(h.dtype)


def dora_term(base: nn.Module, x_d: torch.Tensor, base_h: torch.Tensor | None, lora_z: torch.Tensor,
              magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(m/n − 1)⊙W₀x_d + (m/n)⊙z, added to the base output (z = s·BAx_d; base_h = W₀x + b when x_d is x,
    else None and W₀x_d is computed here). The reference form, for any dropout."""
    factor = (magnitude / norm.to(magnitude.dtype)).to(lora_z.dtype)  # (d_out,)
    if base_h is not None:
        w0x = base_out_without_bias(base, base_h)
    else:
        w0x = x_d.to(lora_z.dtype) @ _dense_fp32(base).to(device=x_d.device, dtype=lora_z.dtype).t()
    return (factor - 1) * w0x.to(lora_z.dtype) + factor * lora_z


def rescale(base: nn.Module, h: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(m/n)⊙(h − b) + b for h = W₀x + s·BAx + b, the LoRA layer's output (no dropout): DoRA composed on it.

    Plain autograd would keep h for m's gradient, one more (tokens × d_out) tensor per layer; _Rescale keeps
    the output instead (which the next op keeps anyway) and gets h − b back as (out − b)/(m/n), so
    dL/dm = Σ_tokens g⊙(out − b)/m. A magnitude holding an exact zero takes the plain path.
    """
    bias = getattr(base, "bias", None)
    bias = None if bias is None else bias.to(h.dtype)
    if torch.is_grad_enabled() and magnitude.requires_grad and bool((magnitude != 0).all()):
        return _Rescale.apply(h, magnitude, norm, bias)
    return rescale_reference(h, magnitude, norm, bias)


def rescale_reference(h: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """(m/n)⊙(h − b) + b written plainly (autograd keeps h)."""
    factor = (magnitude / norm.to(magnitude.dtype)).to(h.dtype)  # (d_out,)
    return h * factor if bias is None else torch.addcmul(bias, h - bias, factor)


class _Rescale(torch.autograd.Function):
    """out = (m/n)⊙(h − b) + b with n constant; saves out (not h): h − b = (out − b)/(m/n) in the backward."""

    @staticmethod
    def forward(ctx, h, magnitude, norm, bias):
        factor = (magnitude / norm.to(magnitude.dtype)).to(h.dtype)  # (d_out,)
        out = h * factor if bias is None else torch.addcmul(bias, h - bias, factor)
        ctx.save_for_backward(out, magnitude, factor, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, magnitude, factor, bias = ctx.saved_tensors
        grad_h = grad * factor if ctx.needs_input_grad[0] else None
        grad_m = None
        if ctx.needs_input_grad[1]:
            shifted = out if bias is None else out - bias  # = (m/n)⊙(h − b)
            g2, s2 = grad.reshape(-1, grad.shape[-1]), shifted.reshape(-1, shifted.shape[-1])
            grad_m = ((g2 * s2).sum(0) / magnitude.to(g2.dtype)).to(magnitude.dtype)  # Σ g⊙(h − b)/n
        return grad_h, grad_m, None, None


def merged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(m/n)⊙(W₀ + ΔW) in fp32, (d_out, d_in), the weight a merged DoRA adapter leaves."""
    return (magnitude.float() / norm.float()).unsqueeze(1) * (weight.float() + delta.float())


def unmerged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """W₀ back from a merged weight: W/(m/n) − ΔW (n is the norm recorded at merge time)."""
    return weight.float() / (magnitude.float() / norm.float()).unsqueeze(1) - delta.float()


__all__ = ["Magnitude", "check_base", "row_norm", "row_norm_reference", "dora_term", "rescale", "rescale_reference",
           "merged", "unmerged"]
