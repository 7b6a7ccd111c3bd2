"""4-bit NormalFloat (NF4) blockwise quantization, byte-for-byte bitsandbytes' format (Dettmers et al. 2023,
QLoRA, arXiv:2305.14314).

A weight is flattened and cut into blocks of `blocksize` values (64 by default; a trailing partial block gets
its own absmax). Each value is divided by its block's absmax and rounded to the nearest of the 16 NF4 codes;
two codes share a byte, the first of each pair in the high nibble. With double quantization the fp32 absmax
values lose their mean and are themselves quantized to 8 bits with the signed dynamic code (Dettmers 2015,
arXiv:1511.04561) in blocks of 256, keeping one fp32 scale per 256 blocks: 4 + 8/64 + 32/(64·256) ≈ 4.127
bits per weight instead of 4 + 32/64 = 4.5.

The fast paths (`quantize_nf4`, `dequantize_nf4`) are pure PyTorch and run on CPU and GPU; the
`*_reference` functions beside them are slow and obviously right, and tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, RankdialError

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# The 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Appendix E).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
# Rounding to the nearest code is bucketing by the midpoints; a value on a midpoint goes to the lower code.
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
# Every byte decoded at once: entry b holds (code[b >> 4], code[b & 15]), viewed as one int64 so that one
# index_select fetches both values of a byte.
_BYTE_TABLE = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)
_BYTE_PAIRS = _BYTE_TABLE.contiguous().view(torch.int64).view(-1)  # (256,)
CHUNK = 1 << 19  # values handled per step by the fast paths: temporaries stay in cache


def dynamic_code() -> torch.Tensor:
    """The signed dynamic 8-bit code (Dettmers 2015): for each decade 10^-6..10^0, evenly spaced fractions
    of [0.1, 1] (2^i + 1 edges, midpoints kept) and their negatives, then 0 and 1; 256 sorted values."""
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()  # float32 products, as bitsandbytes
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes, per-block scales, and what is needed to undo it.

    packed: uint8 (ceil(n/2),); absmax: float32 (blocks,), or uint8 (blocks,) when double-quantized, in which
    case nested_absmax (float32, one per 256 blocks), nested_offset (float32 scalar) and nested_code
    (the 256-value dynamic code) complete it.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized weight and its scales (code books excluded: shared constants)."""
        parts = [self.packed, self.absmax] + ([self.nested_absmax, self.nested_offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax as float32, undoing double quantization (code2[q]·scale + offset)."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code,
                                     self.nested_blocksize) + self.nested_offset


def _check_input(w: torch.Tensor, blocksize: int) -> None:
    if blocksize not in BLOCK_SIZES:
        raise ConfigError(f"NF4 blocksize must be one of {BLOCK_SIZES}, got {blocksize!r} (default: 64)")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        kind = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise RankdialError(f"NF4 quantizes floating-point tensors, got {kind}; convert with .float() first")
    if w.numel() == 0:
        raise RankdialError("NF4 cannot quantize an empty tensor")
    if not torch.isfinite(w).all():
        raise RankdialError(f"the tensor to quantize holds {int((~torch.isfinite(w)).sum())} NaN/Inf values; "
                            "NF4 scales would be meaningless. Find where they came from (a diverged run?) first")


def _quantize_blockwise(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization (the absmax of double quantization): scale as for NF4, then the nearest
    code by its midpoints, ties to the lower code, as bitsandbytes' reference (and CUDA) kernel does."""
    scaled, scale = _scaled_blocks(values, blocksize)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), scale


def _dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = q.numel()
    values = code[q.long()]
    blocks = scale.numel()
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (padded * scale.unsqueeze(1)).reshape(-1)[:n]


def _double_quantize(absmax: torch.Tensor) -> dict:
    offset = absmax.mean()
    q, scale = _quantize_blockwise(absmax - offset, DYNAMIC_CODE.to(absmax.device), NESTED_BLOCKSIZE)
    return dict(absmax=q, nested_absmax=scale, nested_offset=offset, nested_code=DYNAMIC_CODE.to(absmax.device))


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values divided by their block's absmax, absmax per block), exactly as bitsandbytes computes them."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    # bitsandbytes multiplies by the reciprocal in full blocks and divides in the tail; so do we, bit for bit.
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    return scaled, absmax


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble; an odd count is padded with the code of 0."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    pairs = codes.view(-1, 2).to(torch.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize `w` to NF4 (fast path): codes and scales identical to bitsandbytes' quantize_4bit('nf4').

    Raises:
        ConfigError: blocksize not in BLOCK_SIZES.
        RankdialError: w is not a floating-point tensor, is empty, or holds NaN/Inf.
    """
    _check_input(w, blocksize)
    flat = w.detach().reshape(-1)
    n, bounds = flat.numel(), NF4_BOUNDS.to(w.device)
    full = n - n % blocksize
    absmax = torch.empty(full // blocksize, dtype=torch.float32, device=w.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    step = max(blocksize, CHUNK // blocksize * blocksize)
    for s in range(0, full, step):  # whole blocks, a cache-sized chunk at a time, in one pass
        e = min(s + step, full)
        block = flat[s:e].view(-1, blocksize).float()
        low, high = torch.aminmax(block, dim=1)
        scale = absmax[s // blocksize:e // blocksize]
        torch.maximum(-low, high, out=scale)
        scaled = block * (1.0 / scale.clamp(min=1e-38)).unsqueeze(1)
        # Values past ±1 from rounding land in the outer buckets either way, so no clamp is needed.
        codes = torch.bucketize(scaled.view(-1), bounds, out_int32=True).view(-1, 2)
        packed[s // 2:e // 2] = (codes[:, 0] << 4) | codes[:, 1]
    if full < n:  # the trailing partial block: its own absmax, divided as bitsandbytes does
        tail_max = flat[full:].float().abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        packed[full // 2:] = _pack(torch.bucketize(flat[full:].float() / tail_max, bounds, out_int32=True))
    nested = _double_quantize(absmax) if double_quant else {"absmax": absmax}
    return NF4Tensor(packed, shape=w.shape, dtype=w.dtype, blocksize=blocksize, **nested)


def quantize_nf4_reference(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """The slow, plain version: a value's code is the number of code midpoints strictly below it.

    The midpoints are the float32 values (code[i] + code[i+1]) / 2, as bitsandbytes uses them; so a value
    that rounds onto a midpoint goes to the lower code even where exact arithmetic would call it nearer the
    upper one.
    """
    _check_input(w, blocksize)
    scaled, absmax = _scaled_blocks(w.detach().reshape(-1).float(), blocksize)
    codes = (scaled.unsqueeze(1) > NF4_BOUNDS.to(w.device)).sum(dim=1)  # (n,)
    nested = _double_quantize(absmax) if double_quant else {"absmax": absmax}
    return NF4Tensor(_pack(codes), shape=w.shape, dtype=w.dtype, blocksize=blocksize, **nested)


def dequantize_range(t: NF4Tensor, start: int, stop: int, absmax: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat values start..stop of the weight (start a multiple of the blocksize), fast path: per chunk of whole
    blocks, one table lookup per byte gives both codes, then one multiply by the blocks' absmax."""
    absmax = t.absmax_fp32() if absmax is None else absmax
    table = _BYTE_PAIRS.to(t.packed.device)
    bs, n, first = t.blocksize, stop - start, start // t.blocksize
    packed = t.packed[start // 2:(stop + 1) // 2].int()
    out = torch.empty(2 * packed.numel(), dtype=torch.float32, device=packed.device)
    full = n - n % bs
    step = max(bs, CHUNK // bs * bs)
    for s in range(0, full, step):
        e = min(s + step, full)
        values = torch.index_select(table, 0, packed[s // 2:e // 2]).view(torch.float32).view(-1, bs)
        torch.mul(values, absmax[first + s // bs:first + e // bs].unsqueeze(1), out=out[s:e].view(-1, bs))
    if full < n:
        values = torch.index_select(table, 0, packed[full // 2:]).view(torch.float32)[:n - full]
        torch.mul(values, absmax[first + full // bs], out=out[full:n])
    return out[:n].to(dtype)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back in `dtype` (default: the dtype it was quantized from), fast path."""
    return dequantize_range(t, 0, t.numel, dtype=dtype or t.dtype).view(t.shape)


def dequantize_nf4_reference(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The slow, plain version: unpack each nibble, look up its code, multiply by its block's absmax."""
    high, low = (t.packed >> 4).long(), (t.packed & 15).long()
    codes = torch.stack([high, low], dim=1).view(-1)[:t.numel]
    block = torch.arange(t.numel, device=codes.device) // t.blocksize
    values = NF4_CODE.to(codes.device)[codes] * t.absmax_fp32()[block]
    return values.to(dtype or t.dtype).view(t.shape)
