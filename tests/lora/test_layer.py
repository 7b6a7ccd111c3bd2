"""LoraLayer: the formula, the fused fast path against the reference, merge/unmerge invariants."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rankdial import AdapterError, MergeError
from rankdial.lora.layer import LoraLayer


def make_layer(d_in=13, d_out=11, r=4, alpha=8.0, bias=True, conv1d=False, rslora=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(base.weight)
    if base.bias is not None:
        nn.init.normal_(base.bias)
    base = base.to(dtype).requires_grad_(False)
    layer = LoraLayer(base)
    layer.add_adapter("a", r, alpha, use_rslora=rslora, init_lora_weights=False)
    layer.set_active(["a"])
    return layer


def by_hand(layer, x, name="a"):
    W = (layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight).to(x.dtype)
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.to(x.dtype)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    h = x @ W.T + (b if b is not None else 0)
    return h + layer.scaling[name] * (x @ A.T @ B.T)


def test_zero_B_gives_exactly_the_base_output():
    torch.manual_seed(0)
    base = nn.Linear(9, 5)
    layer = LoraLayer(base)
    layer.add_adapter("a", 3, 6.0)  # default init: B = 0
    layer.set_active(["a"])
    x = torch.randn(4, 9)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_A["a"].weight) > 0


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_output_is_the_formula(conv1d, bias):
    layer = make_layer(bias=bias, conv1d=conv1d)
    x = torch.randn(3, 5, 13)
    torch.testing.assert_close(layer(x), by_hand(layer, x), rtol=1e-5, atol=1e-5)


def test_scaling_alpha_over_r_and_rslora():
    assert make_layer(r=4, alpha=8).scaling["a"] == 2.0
    assert make_layer(r=4, alpha=8, rslora=True).scaling["a"] == pytest.approx(8 / math.sqrt(4))


def run_with_grads(layer, x, grad_out, fn):
    """Output and the gradients of x, A and B after fn(x).backward(grad_out), for adapter "a"."""
    for p in (x, layer.lora_A["a"].weight, layer.lora_B["a"].weight):
        p.grad = None
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), x.grad.clone(), layer.lora_A["a"].weight.grad.clone(), layer.lora_B["a"].weight.grad.clone()


@pytest.mark.parametrize("seed,shape,conv1d,bias", [(1, (7, 13), False, True), (2, (2, 3, 13), True, True),
                                                    (3, (5, 1, 13), False, False), (4, (1, 13), True, True)])
def test_fused_path_equals_reference_forward_and_grads(seed, shape, conv1d, bias):
    layer = make_layer(seed=seed, conv1d=conv1d, bias=bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 10), requires_grad=True)
    assert layer._fusable(x)
    grad_out = torch.randn(*shape[:-1], 11)

    fused = run_with_grads(layer, x, grad_out, layer)
    reference = run_with_grads(layer, x, grad_out, lambda t: layer.reference_forward(t, ("a",)))
    for f, r in zip(fused, reference):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_fast_path_is_skipped_where_it_does_not_apply():
    layer = make_layer()
    x = torch.randn(2, 13)
    layer.base_layer.weight.requires_grad_(True)
    assert not layer._fusable(x)  # an unfrozen base trains through autograd
    layer.base_layer.weight.requires_grad_(False)
    layer.lora_dropout["a"] = nn.Dropout(0.5)  # seen at once: nothing to refresh by hand
    layer.train()
    assert not layer._fusable(x)  # dropout on the adapter input: the reference path
    layer.eval()
    assert layer._fusable(x)
    assert not layer._fusable(x.double())
    layer.add_adapter("b", 2, 2.0)
    layer.set_active(["a", "b"])
    assert not layer._fusable(x)  # two adapters: the reference path


@pytest.mark.parametrize("training", [False, True])
def test_changing_scaling_or_dropout_after_creation_takes_effect_at_once(training):
    """The fast path reads the adapter's state at each call: no cache to go stale, nothing to refresh."""
    layer = make_layer().train(training)
    x = torch.randn(3, 13)
    layer(x)  # a first call, which an old cache would have captured
    layer.scaling["a"] = 0.25
    torch.testing.assert_close(layer(x), by_hand(layer, x), rtol=1e-5, atol=1e-5)
    layer.lora_dropout["a"] = nn.Dropout(0.999999)
    torch.manual_seed(0)
    out = layer(x)
    if training:  # dropout now drops (almost) every adapter input: only the base is left
        torch.testing.assert_close(out, layer.base_layer(x), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, by_hand(layer, x), rtol=1e-5, atol=1e-5)


def test_two_active_adapters_add_their_terms():
    layer = make_layer()
    layer.add_adapter("b", 2, 3.0, init_lora_weights=False)
    layer.set_active(["a", "b"])
    x = torch.randn(4, 13)
    expected = by_hand(layer, x, "a") + layer.scaling["b"] * (x @ layer.lora_A["b"].weight.T @ layer.lora_B["b"].weight.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_equals_unmerged_is_idempotent_and_unmerge_restores(conv1d):
    layer = make_layer(conv1d=conv1d)
    x = torch.randn(6, 13)
    w0 = layer.base_layer.weight.clone()
    before = layer(x)
    layer.merge()
    merged_w = layer.base_layer.weight.clone()
    after = layer(x)
    assert not torch.equal(merged_w, w0)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    layer.merge()  # idempotent
    assert torch.equal(layer.base_layer.weight, merged_w)
    assert layer.merged == ["a"]
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_result_and_names_the_adapter():
    layer = make_layer()
    w0 = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B["a"].weight[0, 0] = float("nan")
    with pytest.raises(MergeError, match="'a'.*blk.3.q"):
        layer.merge(module_path="blk.3.q")
    assert torch.equal(layer.base_layer.weight, w0)
    assert layer.merged == []


def test_bf16_base_keeps_fp32_adapter_and_casts_back():
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.lora_A["a"].weight.dtype == torch.float32
    x = torch.randn(3, 13, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), by_hand(layer, x.float()), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_in", [128, 96])  # 96: blocks straddle rows, so the pure-PyTorch dequantizer runs
def test_fused_path_on_an_nf4_base_equals_reference_forward_and_grads(bias, d_in):
    from rankdial.quant.linear import NF4Linear

    torch.manual_seed(5)
    base = nn.Linear(d_in, 40, bias=bias)
    layer = LoraLayer(NF4Linear.from_linear(base))
    layer.add_adapter("a", 4, 8.0, init_lora_weights=False)
    layer.set_active(["a"])
    x = torch.randn(3, 7, d_in, requires_grad=True)
    assert layer._fusable(x)
    with torch.no_grad():
        assert not layer._fusable(x)  # inference keeps NF4Linear's own (possibly fused bitsandbytes) forward
    grad_out = torch.randn(3, 7, 40)

    fused = run_with_grads(layer, x, grad_out, layer)
    reference = run_with_grads(layer, x, grad_out, lambda t: layer.reference_forward(t, ("a",)))
    for f, r in zip(fused, reference):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_an_adapter_name_that_shadows_a_module_dict_attribute_gets_module_dicts_own_error():
    layer = LoraLayer(nn.Linear(4, 4))
    with pytest.raises(KeyError, match="already exists"):
        layer.add_adapter("keys", 2, 2.0, init=False)


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("conv1d,bias", [(False, True), (True, True), (False, False)])
def test_fused_path_both_forms_equal_reference(rows, conv1d, bias):
    """_FusedLora forms x·(W₀ + s·BA)ᵀ for many rows and adds s·(x·Aᵀ)·Bᵀ into x·W₀ᵀ for few: both equal the
    reference, outputs and gradients."""
    from rankdial.lora.layer import merge_first

    assert merge_first(rows, 13, 11) == (rows == 40)  # 13·11 / 24 ≈ 6 rows: 3 stay unmerged, 40 merge
    layer = make_layer(seed=rows, conv1d=conv1d, bias=bias)
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(rows, 13, generator=torch.Generator().manual_seed(rows), requires_grad=True)
    grad_out = torch.randn(rows, 11)
    fused = run_with_grads(layer, x, grad_out, layer)
    reference = run_with_grads(layer, x, grad_out, lambda t: layer.reference_forward(t, ("a",)))
    for f, r in zip(fused, reference):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_merge_first_threshold():
    from rankdial.lora.layer import merge_first

    assert merge_first(1024, 256, 768) and merge_first(200, 256, 768) and not merge_first(150, 256, 768)
    assert not merge_first(128, 1024, 4096)  # the 0.5B shape at batch 2 x 64: the low-rank products are cheaper
