"""NF4 against the real bitsandbytes: identical bytes and scales, identical dequantization; fast == reference."""

import pytest
import torch

from rankdial import RankdialError
from rankdial.errors import ConfigError
from rankdial.quant import nf4
from rankdial.quant.nf4 import (dequantize_nf4, dequantize_nf4_reference, quantize_nf4, quantize_nf4_reference)
from conftest import minilm

F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (33, 7), (5, 13), (1, 1), (256, 300), (3, 1000), (128, 96), (1, 4097)]


def bnb_default_blockwise(values, blocksize=256):
    """bitsandbytes' reference (non-C++) blockwise 8-bit quantizer, the rule its CUDA kernel follows too."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, values, nf4.DYNAMIC_CODE, blocksize)


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantization. Its compiled CPU kernel is only right when blocks do not straddle rows
    (in_features % blocksize == 0): bitsandbytes' own quantize -> dequantize round trip is wrong otherwise
    (seen with bitsandbytes 0.50.2). There we hold ourselves to its reference backend, the rule of its CUDA kernel."""
    shape = state.shape
    if shape[-1] % state.blocksize == 0 and state.blocksize < 2048:
        return F.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    if _BNB_REFERENCE is not None:
        return _BNB_REFERENCE(packed.view(torch.uint8).reshape(-1), absmax, F.get_4bit_type("nf4", device="cpu"),
                              state.blocksize, list(shape), state.dtype)
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, packed, absmax, state.blocksize, "nf4", list(shape), state.dtype)


def _bnb_reference_dequantizer():
    """bitsandbytes' reference 4-bit dequantizer, uncompiled. Its backend wraps it in torch.compile(dynamic=False),
    which recompiles for every new shape (seconds each); the plain function is the same code, run eagerly."""
    try:
        from bitsandbytes.backends.default import ops
    except ImportError:
        return None
    return getattr(getattr(ops, "_dequantize_4bit_compute", None), "__wrapped__", None)


_BNB_REFERENCE = _bnb_reference_dequantizer()


def bnb_state(ours):
    """bitsandbytes' QuantState for one of our NF4Tensors (to let bitsandbytes dequantize what we wrote)."""
    nested = None
    if ours.double_quant:
        nested = F.QuantState(absmax=ours.nested_absmax, code=ours.nested_code, blocksize=256, dtype=torch.float32)
    return F.QuantState(absmax=ours.absmax, shape=ours.shape, dtype=ours.dtype, blocksize=ours.blocksize,
                        code=F.get_4bit_type("nf4", device="cpu"), quant_type="nf4",
                        offset=ours.nested_offset, state2=nested)


def assert_matches_bnb(w, blocksize, double_quant):
    ours = quantize_nf4(w, blocksize, double_quant)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.packed, packed.view(-1)), "packed bytes differ from bitsandbytes"
    if double_quant:
        offset = state.absmax.mean()
        q, scale = bnb_default_blockwise(state.absmax - offset)
        assert torch.equal(ours.absmax, q) and torch.equal(ours.nested_absmax, scale)
        assert torch.equal(ours.nested_offset, offset)
        assert torch.equal(ours.nested_code, F.create_dynamic_map(signed=True))
    else:
        assert torch.equal(ours.absmax, state.absmax)
    # bitsandbytes dequantizes our state exactly as we do
    assert torch.equal(dequantize_nf4(ours), bnb_dequantize(packed, bnb_state(ours)))
    return ours


def test_code_books_are_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_CODE, F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_scales_and_dequantization_match_bitsandbytes(shape, blocksize, double_quant):
    torch.manual_seed(hash((shape, blocksize)) % 1000)
    w = torch.randn(shape) * torch.rand(shape) ** 2  # heavy-tailed, like trained weights
    assert_matches_bnb(w, blocksize, double_quant)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_bitsandbytes(dtype):
    torch.manual_seed(7)
    w = torch.randn(96, 130).to(dtype)
    ours = assert_matches_bnb(w, 64, True)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert dequantize_nf4(ours).dtype == dtype
    torch.testing.assert_close(dequantize_nf4(ours), bnb_dequantize(packed, bnb_state(ours)), rtol=0, atol=0)


def test_bitsandbytes_states_dequantize_identically_in_rankdial():
    """A state made by bitsandbytes' own CPU kernel (double-quantized) reads back the same in rankdial."""
    torch.manual_seed(3)
    w = torch.randn(300, 200)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = nf4.NF4Tensor(packed.view(-1), state.absmax, w.shape, w.dtype, 64, state.state2.absmax, state.offset,
                           state.state2.code)
    assert torch.equal(dequantize_nf4(theirs), bnb_dequantize(packed, state))


@pytest.mark.slow
def test_real_minilm_weights_match_bitsandbytes():
    model = minilm()
    linears = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 * 6 + 1
    for w in linears[:8] + linears[-2:]:
        for double_quant in (False, True):
            assert_matches_bnb(w, 64, double_quant)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fast_paths_equal_the_references(seed):
    g = torch.Generator().manual_seed(seed)
    shape = (int(torch.randint(1, 90, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g)))
    w = torch.randn(shape, generator=g) * 3
    for blocksize in (32, 64, 128):
        fast, ref = quantize_nf4(w, blocksize), quantize_nf4_reference(w, blocksize)
        assert torch.equal(fast.packed, ref.packed) and torch.equal(fast.absmax, ref.absmax)
        assert torch.equal(dequantize_nf4(fast), dequantize_nf4_reference(fast))


def test_quantization_error_is_what_nf4_promises():
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    error = (dequantize_nf4(quantize_nf4(w)) - w).norm() / w.norm()
    assert 0.05 < error < 0.12  # NF4 on Gaussian weights: about 9% relative error


@pytest.mark.parametrize("double_quant,limit", [(True, 4.13), (False, 4.5)])
def test_bits_per_parameter(double_quant, limit):
    t = quantize_nf4(torch.randn(1024, 1024), 64, double_quant)
    assert t.bits_per_param <= limit
    assert t.bits_per_param > 4.0


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="blocksize must be one of .* got 100"):
        quantize_nf4(torch.randn(4, 4), blocksize=100)
    with pytest.raises(RankdialError, match="floating-point tensors, got torch.int64"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.long))
    bad = torch.randn(8, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(RankdialError, match="1 NaN/Inf"):
        quantize_nf4(bad)
    with pytest.raises(RankdialError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
