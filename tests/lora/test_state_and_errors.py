"""Adapter state lives on the layers; the base stays reachable through a wrapper; every bad input is a
RankdialError with a message that says what to do."""

import pytest
import torch
from torch import nn

import rankdial as rd
from rankdial.lora import LoraLayer
from conftest import MHABlock, model_output, tiny_model, token_batch


def injected(seed=0, **kwargs):
    model = tiny_model("llama", seed)
    rd.inject(model, rd.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                      "init_lora_weights": False, **kwargs}))
    return model


# -- state on the layers ----------------------------------------------------------------------------

def test_adapter_configs_has_no_side_effects():
    model = tiny_model("llama")
    before = dict(model.__dict__)
    assert rd.adapter_names(model) == []
    assert model.__dict__.keys() == before.keys()


def test_injecting_into_a_submodule_and_saving_from_the_whole_model(tmp_path):
    model = tiny_model("llama")
    rd.inject(model.model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    assert rd.adapter_names(model) == ["default"]  # found from the outer model too
    rd.save_adapter(model, tmp_path / "a")
    fresh = tiny_model("llama")
    rd.load_adapter(fresh, tmp_path / "a")
    ids = token_batch()
    torch.testing.assert_close(model_output(fresh, ids), model_output(model, ids), rtol=0, atol=0)


def test_a_compiled_model_keeps_its_adapters_and_key_names(tmp_path):
    model = injected()
    compiled = torch.compile(model)  # only wrapped here; nothing is compiled until it runs
    assert rd.adapter_names(compiled) == ["default"]
    assert rd.adapter_state_dict(compiled).keys() == rd.adapter_state_dict(model).keys()
    rd.set_active(compiled, [])
    assert rd.active_adapters(model) == []


def test_injection_order_is_kept_across_layers():
    model = injected()
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["o_proj"]), adapter="second")
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["q_proj"]), adapter="third")
    assert rd.adapter_names(model) == ["default", "second", "third"]
    rd.delete_adapter(model, "second")
    assert rd.adapter_names(model) == ["default", "third"]


# -- the base seen through the wrapper ----------------------------------------------------------------

def test_weight_and_bias_are_the_bases():
    base = nn.Linear(6, 5)
    layer = LoraLayer(base)
    assert layer.weight is base.weight and layer.bias is base.bias
    new = nn.Parameter(torch.ones(5, 6))
    layer.weight = new  # what transformers' tie_weights does to an output head
    assert base.weight is new and "weight" not in layer._parameters


def test_tied_head_with_an_adapter_still_ties():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32  # transformers' dtype probe reads parameters and .weight
    model_output(model, token_batch())


def test_multihead_attention_out_proj_is_refused_or_skipped():
    with pytest.raises(rd.TargetError, match="MultiheadAttention.*never run"):
        rd.inject(MHABlock(8, 2), rd.LoraConfig(target_modules=["out_proj"]))
    model = MHABlock(8, 2)
    rd.inject(model, rd.LoraConfig(r=2, target_modules="all-linear"))
    assert [p for p, m in model.named_modules() if isinstance(m, LoraLayer)] == ["fc"]
    model(torch.randn(1, 3, 8))


# -- errors -------------------------------------------------------------------------------------------

def test_layer_level_bad_input():
    with pytest.raises(rd.TargetError, match="Conv2d"):
        LoraLayer(nn.Conv2d(3, 3, 1))
    layer = LoraLayer(nn.Linear(4, 4))
    for bad in (dict(r=0), dict(r=2.5), dict(alpha=0), dict(alpha=float("nan")), dict(dropout=1.0)):
        args = {"r": 2, "alpha": 2.0, "dropout": 0.0, **bad}
        with pytest.raises(rd.ConfigError):
            layer.add_adapter("a", args["r"], args["alpha"], args["dropout"])
    with pytest.raises(rd.AdapterError, match="non-empty string without '.'"):
        layer.add_adapter("a.b", 2, 2.0)
    assert not layer.lora_A


@pytest.mark.parametrize("bad", [5, None, ["default", 3], {"default"}])
def test_set_active_with_a_non_name(bad):
    model = injected()
    with pytest.raises(rd.AdapterError, match="takes an adapter name or a list of names"):
        rd.set_active(model, bad)
    assert rd.active_adapters(model) == ["default"]


def test_merging_nothing_is_an_error():
    model = tiny_model("llama")
    for verb in (rd.merge, rd.merge_and_unload, rd.unload):
        with pytest.raises(rd.AdapterError, match="no LoRA adapters"):
            verb(model)
    model = injected()
    rd.set_active(model, [])
    with pytest.raises(rd.MergeError, match="no adapter is active.*unload"):
        rd.merge_and_unload(model)


def test_save_pretrained_after_inject_is_guarded(tmp_path):
    model = injected()
    with pytest.raises(rd.AdapterError, match="save_adapter.*merge_and_unload"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    plain = rd.merge_and_unload(model)
    plain.save_pretrained(tmp_path / "m")  # the guard goes with the adapters
    assert "base_layer" not in str(sorted(plain.state_dict()))


# -- PEFT's unload -----------------------------------------------------------------------------------

def test_unload_gives_back_the_base_without_merging():
    base_out = model_output(tiny_model("llama"), token_batch())
    model = injected()
    rd.merge(model)  # even a merged adapter is taken out again
    plain = rd.unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_model("llama").state_dict())
    torch.testing.assert_close(model_output(plain, token_batch()), base_out, rtol=1e-5, atol=1e-6)


def test_unload_matches_peft():
    import peft

    model = injected()
    with_peft = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                         target_modules=["q_proj", "v_proj"]))
    ours, theirs = rd.unload(model), with_peft.unload()
    assert set(ours.state_dict()) == set(theirs.state_dict())


# -- review findings, each reproduced -----------------------------------------------------------------

def test_merge_is_all_or_nothing_inside_a_layer_too():
    model = injected()
    rd.inject(model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
              adapter="bad")
    rd.set_active(model, ["default", "bad"])
    first = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        first.lora_B["bad"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rd.MergeError, match="'bad'.*NaN/Inf"):
        rd.merge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if ".lora_" not in k)
    assert all(layer.merged == [] for _, layer in rd.lora.lora_layers(model))


def test_a_name_given_twice_merges_once():
    model = injected()
    expected = model.model.layers[0].self_attn.q_proj.merged_weight()
    rd.merge(model, ["default", "default"])
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.merged == ["default"]
    torch.testing.assert_close(layer.weight, expected)
    with pytest.raises(rd.MergeError, match="no adapter named"):
        rd.merge(model, [])


def test_a_module_both_targeted_and_saved_in_full_is_refused():
    with pytest.raises(rd.TargetError, match="both in target_modules and modules_to_save"):
        rd.inject(tiny_model("llama"), rd.LoraConfig(target_modules=["q_proj"], modules_to_save=["proj"]))


def test_an_adapter_added_by_hand_is_seen_saved_and_reloaded(tmp_path):
    model = tiny_model("llama")
    for i, r in enumerate((2, 3)):
        layer = LoraLayer(model.model.layers[i].self_attn.q_proj)
        model.model.layers[i].self_attn.q_proj = layer
        layer.add_adapter("x", r, 4.0, init_lora_weights=False)
    assert rd.adapter_names(model) == ["x"]
    rd.set_active(model, "x")
    rd.save_adapter(model, tmp_path / "x")
    fresh = tiny_model("llama")
    rd.load_adapter(fresh, tmp_path / "x")
    torch.testing.assert_close(model_output(fresh, token_batch()), model_output(model, token_batch()),
                               rtol=1e-5, atol=1e-6)


def test_saving_from_a_compiled_model_writes_the_inner_models_config(tmp_path):
    import json

    model = injected()
    rd.save_adapter(torch.compile(model), tmp_path / "c")
    rd.save_adapter(model, tmp_path / "m")
    config_c = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    config_m = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config_c == config_m


def test_wrong_types_at_the_api_are_named():
    with pytest.raises(rd.ConfigError, match="no field 'rr' \\(did you mean 'r'\\?\\)"):
        rd.LoraConfig(rr=4)
    for call in (lambda: rd.inject("model", rd.LoraConfig()), lambda: rd.trainable_parameters(5),
                 lambda: rd.disabled(None).__enter__(), lambda: rd.merge(None)):
        with pytest.raises(rd.TargetError, match="expected a PyTorch model"):
            call()
