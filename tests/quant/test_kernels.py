"""The NF4 dequantizer choice: bitsandbytes' C kernel (through ctypes, into a scratch buffer), its registered op
and the pure path give identical rows; a C call that cannot be made safely is reported once, not swallowed."""

import warnings

import pytest
import torch
from torch import nn

from rankdial import ConfigError
from rankdial.quant import kernel_info, kernels, set_fused_inference
from rankdial.quant.linear import NF4Linear

SHAPES = [(256, 64), (192, 128), (40, 320), (7, 1024)]  # (d_out, d_in); d_in a multiple of 64: bitsandbytes applies


def layer(d_out, d_in, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return NF4Linear.from_linear(nn.Linear(d_in, d_out, bias=False, dtype=dtype))


def pure_rows(q, start, stop, dtype, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(kernels, "_KERNEL", "torch")
        return q.dequantize_rows(start, stop, q.quantized.absmax_fp32(), dtype)


@pytest.fixture
def fresh_reports(monkeypatch):
    """Forget which kernel problems were already reported, so that this test sees its own warning."""
    monkeypatch.setattr(kernels, "_REPORTED", set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scratch", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bitsandbytes_kernels_and_pure_path_agree_exactly(shape, scratch, dtype, monkeypatch):
    pytest.importorskip("bitsandbytes")
    q = layer(*shape, seed=shape[0] * 7 + shape[1])
    start, stop = 1, shape[0]  # not from row 0: the slice offsets into packed bytes and scales matter
    expected = pure_rows(q, start, stop, dtype, monkeypatch)
    monkeypatch.setattr(kernels, "_KERNEL", "bitsandbytes")
    got = q.dequantize_rows(start, stop, q.quantized.absmax_fp32(), dtype, scratch=scratch)
    assert got.shape == (stop - start, shape[1]) and got.dtype == dtype
    assert torch.equal(got, expected)
    assert expected.abs().sum() > 0


def test_scratch_dequantization_reuses_one_buffer():
    pytest.importorskip("bitsandbytes")
    q = layer(192, 256, seed=3)
    absmax = q.quantized.absmax_fp32()
    fresh = q.dequantize_rows(0, 192, absmax, torch.float32)
    first = q.dequantize_rows(0, 96, absmax, torch.float32, scratch=True)
    assert torch.equal(first, fresh[:96])
    second = q.dequantize_rows(96, 192, absmax, torch.float32, scratch=True)
    assert torch.equal(second, fresh[96:])
    assert first.data_ptr() == second.data_ptr()  # the C path wrote both into the thread's one buffer


def test_a_missing_c_symbol_is_reported_once_and_the_pure_path_gives_the_same_result(monkeypatch, fresh_reports):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(kernels, "_c_symbol", lambda name: None)
    monkeypatch.setattr("rankdial.quant.linear.CHUNK_ELEMENTS", 2048)  # several chunks: several C calls tried
    q = layer(96, 128, seed=11)
    torch.manual_seed(12)
    x = torch.randn(5, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [q(x) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "no cdequantize_blockwise_cpu_nf4_fp32" in messages[0] and "pure-PyTorch" in messages[0]
    expected = torch.nn.functional.linear(x, q.dequantized_weight(torch.float32))
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad,reason", [
    (lambda p, s, o: (p, s.double(), o), "float32 scales"),
    (lambda p, s, o: (p[:-2], s, o), "sizes disagree"),
    (lambda p, s, o: (p, s, torch.empty(128, 64).t()), "contiguous"),
    (lambda p, s, o: (p.view(torch.int8), s, o), "uint8 codes"),
])
def test_the_c_call_is_refused_before_it_reads_past_a_buffer(bad, reason, fresh_reports):
    pytest.importorskip("bitsandbytes")
    q = layer(64, 128, seed=5)
    packed, scales = q.packed, q.quantized.absmax_fp32().contiguous()
    out = torch.empty(64, 128)
    args = bad(packed, scales, out)
    with pytest.warns(RuntimeWarning, match=reason):
        assert kernels._dequantize_c(*args, 64) is False


def test_unknown_kernel_names_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="'auto', 'torch', 'bitsandbytes'.*got 'cuda'"):
        kernels.set_kernel("cuda")
    monkeypatch.setattr(kernels, "_KERNEL", "bnb")  # as RANKDIAL_NF4_KERNEL=bnb would set it
    with pytest.raises(ConfigError, match="RANKDIAL_NF4_KERNEL must be one of"):
        layer(32, 64, seed=1)(torch.randn(2, 64))


def test_kernel_info_says_what_runs_here(monkeypatch):
    info = kernel_info()
    assert set(info) >= {"kernel", "dequantizer", "matmul", "avx512_bf16", "fused_available"}
    assert info["matmul"] == "dequantize+torch.mm"  # no model: nothing opted in
    assert info["fused_available"] == (kernels.fused_cpu() is not None)
    model = nn.Sequential(layer(64, 128, seed=2))
    assert kernel_info(model)["matmul"] == "dequantize+torch.mm"  # an fp32 model never fuses by default
    set_fused_inference(model, True)
    assert kernel_info(model)["matmul"] == ("bitsandbytes-fused-bf16" if info["fused_available"] else "dequantize+torch.mm")
    monkeypatch.setattr(kernels, "_KERNEL", "torch")
    assert kernel_info()["dequantizer"] == "torch"
