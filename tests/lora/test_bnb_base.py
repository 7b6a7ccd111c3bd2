"""A PEFT user's QLoRA habit: a base loaded by transformers with BitsAndBytesConfig (bitsandbytes' Linear4bit /
Linear8bitLt, integer weights) takes float adapters, computes what PEFT computes, and merges into floats."""

import logging

import pytest
import torch

import rankdial as rd
from rankdial.layers import dense_weight
from rankdial.lora import LoraLayer, lora_layers
from conftest import make_model_dir, token_batch

pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("bnb-base"), hidden=64)


def load_bnb(folder, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if bits == 4 else \
        BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu").eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_matches_peft_on_the_same_quantized_base(folder, bits):
    import peft

    ids = token_batch(vocab=4096)
    ours = load_bnb(folder, bits)
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    layer = next(layer for _, layer in lora_layers(ours))
    assert layer.lora_A["default"].weight.dtype == torch.float32  # float adapters on an integer base
    theirs = peft.get_peft_model(load_bnb(folder, bits), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    peft.set_peft_model_state_dict(theirs, rd.adapter_state_dict(ours))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_adds_into_the_dequantized_weight(folder, bits):
    model = load_bnb(folder, bits)
    rd.inject(model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with pytest.raises(rd.MergeError, match=f"bitsandbytes {bits}-bit.*merge_and_unload"):
        rd.merge(model)  # in place would add floats into packed integers
    expected = {p: dense_weight(layer.base_layer) + layer.delta_weight("default") for p, layer in lora_layers(model)}
    merged = rd.merge_and_unload(model)
    for path, weight in expected.items():
        linear = merged.get_submodule(path)
        assert type(linear) is torch.nn.Linear
        torch.testing.assert_close(linear.weight.float(), weight, rtol=0, atol=1e-6)


def test_training_step_updates_only_the_adapters(folder):
    model = load_bnb(folder, 4)
    rd.inject(model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.train()
    ids = token_batch(vocab=4096)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_B." in n)
    assert all(isinstance(m, LoraLayer) for n, m in model.named_modules() if n.endswith("q_proj"))
