"""Which code turns NF4 rows back into floats on this machine: one function, `dequantize_rows()`, decides.

Three implementations give the same values (tests hold them equal):
- bitsandbytes' compiled CPU dequantizer, called through ctypes so that it writes into a per-thread scratch
  buffer (bitsandbytes' registered op allocates every output; see `_scratch` for why that matters);
- bitsandbytes' registered op `torch.ops.bitsandbytes.dequantize_4bit` (any device bitsandbytes supports);
- the pure-PyTorch path of nf4.py (everywhere; the reference).
`RANKDIAL_NF4_KERNEL` / `set_kernel()` choose: 'auto' (bitsandbytes when installed), 'torch' or 'bitsandbytes'.
bitsandbytes' kernels apply only where NF4 blocks do not straddle rows (in_features % blocksize == 0) and the
blocksize is below 2048: its CPU kernel is wrong otherwise, so those weights always take the pure path.

A ctypes call is a C call on raw pointers: nothing stops a wrong dtype or a short buffer from reading past
the end. So before each call the symbol, dtypes, device, contiguity and sizes are checked; a failed check is
reported once (a RuntimeWarning naming the reason) and that weight takes the pure path, with the same result.

Also here: bitsandbytes' fused 4-bit CPU matmul (AVX512-BF16, computes in bf16), which NF4Linear uses only
when asked (see NF4Linear.fused_inference), and `kernel_info()`, which says what this machine runs.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings

import torch
from torch import nn

from ..errors import ConfigError
from .nf4 import NF4Tensor, dequantize_range

KERNELS = ("auto", "torch", "bitsandbytes")
_KERNEL = os.environ.get("RANKDIAL_NF4_KERNEL", "auto")
_C_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SCRATCH = threading.local()
_REPORTED: set[str] = set()


def set_kernel(name: str) -> None:
    """Choose NF4 dequantization: 'auto' (bitsandbytes if installed), 'torch' (pure), or 'bitsandbytes'."""
    global _KERNEL
    if name not in KERNELS:
        raise ConfigError(f"NF4 kernel must be one of {KERNELS}, got {name!r}; "
                          "'auto' uses bitsandbytes when installed and pure PyTorch otherwise")
    _KERNEL = name


def _kernel() -> str:
    if _KERNEL not in KERNELS:  # set through the environment, checked when first used
        raise ConfigError(f"RANKDIAL_NF4_KERNEL must be one of {KERNELS}, got {_KERNEL!r}; unset it for 'auto'")
    return _KERNEL


def _bitsandbytes():
    """The bitsandbytes package when the kernel choice allows it and it is installed, else None."""
    if _kernel() == "torch":
        return None
    if "bitsandbytes" not in sys.modules:
        # (its CPU backend's import-time warning about a hub kernel is dropped by rankdial._quiet, which says why)
        try:
            import bitsandbytes  # noqa: F401  (registers the ops)
        except ImportError:
            if _kernel() == "bitsandbytes":
                raise ConfigError("RANKDIAL_NF4_KERNEL=bitsandbytes but bitsandbytes is not installed; "
                                  "pip install 'rankdial[bnb]', or use 'auto'") from None
            return None
    return sys.modules["bitsandbytes"]


def _report_once(reason: str) -> None:
    """Warn about a kernel that could not be used, once per reason per process; the caller then goes pure."""
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        warnings.warn(f"rankdial NF4: {reason}; using the pure-PyTorch dequantizer instead (same values, slower). "
                      "Set RANKDIAL_NF4_KERNEL=torch to choose it and silence this", RuntimeWarning, stacklevel=3)


def _c_symbol(name: str):
    """The C function `name` of bitsandbytes' native library, or None when the library or symbol is missing.

    Not `getattr(lib, name)`: bitsandbytes answers any name with a stub that raises only when called.
    """
    from bitsandbytes.cextension import lib

    cdll = getattr(lib, "_lib", None)
    return None if cdll is None else getattr(cdll, name, None)


def _c_call_problem(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, blocksize: int) -> str | None:
    """Why bitsandbytes' C dequantizer must not be called on these tensors, or None when it is safe."""
    m, n = out.shape
    checks = [
        (out.dtype in _C_SUFFIX, f"no C dequantizer for {out.dtype}"),
        (packed.dtype == torch.uint8 and scales.dtype == torch.float32,
         f"C dequantizer needs uint8 codes and float32 scales, got {packed.dtype} and {scales.dtype}"),
        (packed.device.type == scales.device.type == out.device.type == "cpu",
         f"C dequantizer runs on the CPU, got tensors on {packed.device}, {scales.device}, {out.device}"),
        (packed.is_contiguous() and scales.is_contiguous() and out.is_contiguous(),
         "C dequantizer needs contiguous tensors"),
        (n % blocksize == 0 and blocksize % 2 == 0, f"rows of {n} are not whole blocks of {blocksize}"),
        (packed.numel() * 2 == m * n and scales.numel() * blocksize == m * n,
         f"sizes disagree: {packed.numel()} packed bytes and {scales.numel()} scales for a ({m}, {n}) output "
         f"in blocks of {blocksize}"),
    ]
    return next((why for ok, why in checks if not ok), None)


def _dequantize_c(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, blocksize: int) -> bool:
    """Fill `out` (m, n) with bitsandbytes' C dequantizer (the function its CPU op calls); False if it cannot."""
    name = f"cdequantize_blockwise_cpu_nf4_{_C_SUFFIX.get(out.dtype, '?')}"
    problem = _c_call_problem(packed, scales, out, blocksize)
    c_fn = None if problem else _c_symbol(name)
    if problem is None and c_fn is None:
        problem = f"bitsandbytes' native library has no {name}"
    if problem is not None:
        _report_once(problem)
        return False
    m, n = out.shape
    ptr = ctypes.c_void_p
    c_fn(ptr(packed.data_ptr()), ptr(scales.data_ptr()), ptr(out.data_ptr()), ctypes.c_longlong(blocksize),
         ctypes.c_longlong(m), ctypes.c_longlong(n))
    return True


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


def bitsandbytes_applies(weight: NF4Tensor) -> bool:
    """Whether bitsandbytes' dequantizers are right for this weight's layout (blocks within rows, < 2048)."""
    return weight.shape[-1] % weight.blocksize == 0 and weight.blocksize < 2048


def dequantize_rows(weight: NF4Tensor, start: int, stop: int, absmax: torch.Tensor, dtype: torch.dtype,
                    scratch: bool = False) -> torch.Tensor:
    """Rows start..stop of a 2-D NF4 weight as a (stop - start, d_in) tensor in `dtype`.

    absmax: the float32 per-block scales (weight.absmax_fp32(), computed once per pass by the caller).
    scratch=True lets the CPU C path write into the thread's reusable buffer: the result is then valid only
    until the next scratch call, so use it at once.
    """
    d_in = weight.shape[1]
    first, last = start * d_in, stop * d_in
    shape = (stop - start, d_in)
    if dtype in _C_SUFFIX and bitsandbytes_applies(weight) and _bitsandbytes() is not None:
        packed = weight.packed[first // 2:(last + 1) // 2]
        scales = absmax[first // weight.blocksize:-(-last // weight.blocksize)]
        if scratch and packed.device.type == "cpu":
            out = _scratch(last - first, dtype, packed.device).view(shape)
            if _dequantize_c(packed, scales.float().contiguous(), out, weight.blocksize):
                return out
        else:
            return torch.ops.bitsandbytes.dequantize_4bit.default(packed, scales, weight.blocksize, "nf4",
                                                                  list(shape), dtype)
    return dequantize_range(weight, first, last, absmax, dtype).view(shape)


def has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (what bitsandbytes' fused 4-bit CPU matmul needs)."""
    if _bitsandbytes_installed():
        import bitsandbytes.functional as bnb_functional

        return bool(bnb_functional.has_avx512bf16())
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


def _bitsandbytes_installed() -> bool:
    try:
        return _bitsandbytes() is not None
    except ConfigError:
        return False


def fused_cpu():
    """bitsandbytes.functional when its fused 4-bit CPU matmul (AVX512-BF16, bf16 arithmetic) is usable."""
    if _bitsandbytes() is None:
        return None
    import bitsandbytes.functional as bnb_functional

    return bnb_functional if bnb_functional.has_avx512bf16() else None


def fused_applies(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether the fused kernel handles a weight of this shape (its packing needs these multiples)."""
    return out_features % 32 == 0 and in_features % 2 == 0 and in_features % blocksize == 0


def pack_for_fused(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, blocksize: int):
    """(bitsandbytes.matmul_4bit, weight in its CPU layout, its QuantState) for the fused kernel."""
    import bitsandbytes as bnb

    bnb_functional = fused_cpu()
    state = bnb_functional.QuantState(absmax=absmax.clone(), shape=shape, dtype=torch.float32, blocksize=blocksize,
                                      quant_type="nf4", code=bnb_functional.get_4bit_type("nf4", device=packed.device))
    qweight, state = bnb_functional._convert_weight_packed_for_cpu(packed.view(-1, 1).clone(), state)
    return bnb.matmul_4bit, qweight, state


def kernel_info(model: nn.Module | None = None) -> dict:
    """What runs NF4 on this machine: the dequantizer, the matmul path, and whether the CPU has AVX512-BF16.

    With a model, `matmul` says what its NF4 layers do in CPU inference: 'bitsandbytes-fused-bf16' when any
    layer may take the fused path (opted in, or computing in bf16) on a CPU that has it, else
    'dequantize+torch.mm' (the compute dtype's own matmul; fp32 stays fp32).
    """
    bnb = None
    try:
        bnb = _bitsandbytes()
    except ConfigError as err:
        return {"kernel": _KERNEL, "error": str(err)}
    c_ok = bnb is not None and _c_symbol("cdequantize_blockwise_cpu_nf4_fp32") is not None
    dequantizer = "torch" if bnb is None else ("bitsandbytes-c" if c_ok else "bitsandbytes-op")
    avx = has_avx512_bf16()
    fused_layers = [m for m in (model.modules() if model is not None else [])
                    if getattr(m, "may_fuse", None) is not None and m.may_fuse()]
    fused = bool(fused_layers) and fused_cpu() is not None
    return {"kernel": _kernel(), "dequantizer": dequantizer,
            "bitsandbytes": getattr(bnb, "__version__", None),
            "matmul": "bitsandbytes-fused-bf16" if fused else "dequantize+torch.mm",
            "avx512_bf16": avx, "fused_available": fused_cpu() is not None}
