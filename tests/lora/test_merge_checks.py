"""merge: ΔW computed once per layer and adapter, and a merge that would overflow the base's own dtype refused."""

import pytest
import torch
from torch import nn

import rankdial as rd
from conftest import tiny_model
from rankdial.lora import lora_layers
from rankdial.lora.layer import LoraLayer


@pytest.fixture
def count_deltas(monkeypatch):
    """Counts every ΔW = s·B·A a LoraLayer computes, by (layer, adapter)."""
    calls = []
    real = LoraLayer.delta_weight

    def counting(self, name):
        calls.append((id(self), name))
        return real(self, name)
    monkeypatch.setattr(LoraLayer, "delta_weight", counting)
    return calls


def injected(adapters=("default",)):
    model = tiny_model("llama")
    for name in adapters:
        rd.inject(model, rd.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter=name)
    rd.set_active(model, list(adapters))
    return model


@pytest.mark.parametrize("verb", ["merge", "merge_and_unload"])
def test_merge_computes_each_delta_once(count_deltas, verb):
    model = injected(("default", "other"))
    pairs = [(id(layer), name) for _, layer in lora_layers(model) for name in ("default", "other")]
    getattr(rd, verb)(model)
    assert sorted(count_deltas) == sorted(pairs)  # before: three times each (check, merge's check, merge)


def test_a_layer_merge_computes_each_delta_once(count_deltas):
    layer = LoraLayer(nn.Linear(8, 6))
    layer.add_adapter("a", 2, 4.0, init_lora_weights=False)
    layer.set_active(["a"])
    layer.merge()
    assert count_deltas == [(id(layer), "a")]


def _fp16_model_one_layer_near_the_top():
    """An fp16 model whose last LoRA layer's merged weight leaves fp16's range (65504) while fp32 holds it."""
    model = injected().half()
    layers = [layer for _, layer in lora_layers(model)]
    last = layers[-1]
    with torch.no_grad():
        last.base_layer.weight[0, 0] = 60000.0
        last.lora_A["default"].weight.zero_()
        last.lora_B["default"].weight.zero_()
        last.lora_A["default"].weight[0, 0] = 100.0
        last.lora_B["default"].weight[0, 0] = 100.0 / last.scaling["default"]  # ΔW[0, 0] = 10000
    return model, layers


def test_a_merge_that_overflows_fp16_is_refused_and_changes_nothing():
    model, layers = _fp16_model_one_layer_near_the_top()
    before = [layer.base_layer.weight.clone() for layer in layers]
    with pytest.raises(rd.MergeError, match=r"'default'.*layers\.1\.self_attn\.v_proj.*NaN/Inf.*float16"):
        rd.merge(model)
    for layer, w in zip(layers, before):
        assert torch.equal(layer.base_layer.weight, w) and layer.merged == []


def test_merge_and_unload_refuses_an_fp16_overflow_too():
    model, layers = _fp16_model_one_layer_near_the_top()
    with pytest.raises(rd.MergeError, match="NaN/Inf"):
        rd.merge_and_unload(model)
    assert all(layer.merged == [] for layer in layers)


def test_weights_near_the_top_of_fp16_that_still_fit_merge():
    model, layers = _fp16_model_one_layer_near_the_top()
    last = layers[-1]
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = 5000.0 / 100.0 / last.scaling["default"]  # 65000: fits
    rd.merge(model)
    assert last.merged == ["default"] and torch.isfinite(last.base_layer.weight).all()
    assert last.base_layer.weight[0, 0].item() == pytest.approx(65000.0, rel=1e-3)


def test_merge_and_unload_of_an_nf4_fp16_base_refuses_an_fp16_overflow():
    """A 4-bit base is merged in fp32 and stored in the dtype it was quantized from: fp16 overflows there."""
    model = tiny_model("llama").half()
    rd.quantize_model(model)
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    last = [layer for _, layer in lora_layers(model)][-1]
    with torch.no_grad():
        last.lora_A["default"].weight.zero_()
        last.lora_B["default"].weight.zero_()
        last.lora_A["default"].weight[0, 0] = 1000.0
        last.lora_B["default"].weight[0, 0] = 100.0 / last.scaling["default"]  # ΔW[0, 0] = 100000 > 65504
    with pytest.raises(rd.MergeError, match=r"layers\.1\.self_attn\.q_proj.*NaN/Inf.*float16"):
        rd.merge_and_unload(model)
    assert any(isinstance(m, LoraLayer) for m in model.modules())  # nothing was unloaded


def test_merge_and_requantize_of_an_nf4_fp16_base_refuses_an_fp16_overflow():
    model = tiny_model("llama").half()
    rd.quantize_model(model)
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    last = [layer for _, layer in lora_layers(model)][-1]
    with torch.no_grad():
        last.lora_A["default"].weight[0, 0] = 1000.0
        last.lora_B["default"].weight[0, 0] = 1000.0 / last.scaling["default"]
    with pytest.raises(rd.MergeError, match=r"layers\.1\.self_attn\.q_proj.*NaN/Inf.*float16"):
        rd.merge_and_requantize(model)
