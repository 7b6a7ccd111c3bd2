"""Injection: target matching as PEFT does it, freezing, the parameter report, model-level verbs and errors."""

import pytest
import torch
from torch import nn

import rankdial as rd
from rankdial.lora import lora_layers
from conftest import model_output, tiny_model, token_batch


def wrapped(model, adapter="default"):
    return sorted(p for p, layer in lora_layers(model) if adapter in layer.lora_A)


def test_list_targets_match_exact_path_or_suffix_after_a_dot(llama):
    rd.inject(llama, rd.LoraConfig(r=2, target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert wrapped(llama) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                              "model.layers.1.self_attn.q_proj"]


def test_regex_target_must_match_the_whole_path(llama):
    rd.inject(llama, rd.LoraConfig(r=2, target_modules=r".*\.1\.self_attn\.(k|v)_proj"))
    assert wrapped(llama) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(rd.TargetError):
        rd.inject(tiny_model("llama"), rd.LoraConfig(r=2, target_modules="q_proj"))  # no full match


def test_all_linear_skips_the_output_head(llama):
    rd.inject(llama, rd.LoraConfig(r=2, target_modules="all-linear"))
    paths = wrapped(llama)
    assert len(paths) == 2 * 7 and "lm_head" not in paths


def test_all_linear_handles_gpt2_conv1d():
    model = tiny_model("gpt2")
    rd.inject(model, rd.LoraConfig(r=2))
    assert wrapped(model)[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                  "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert rd.lora.adapter_configs(model)["default"].fan_in_fan_out


def test_exclude_layers_and_patterns(llama):
    cfg = rd.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["down_proj"],
                        layers_to_transform=[1], rank_pattern={"v_proj": 5}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 7})
    rd.inject(llama, cfg)
    layers = dict(lora_layers(llama))
    assert sorted(layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert layers["model.layers.1.self_attn.v_proj"].rank("default") == 5
    assert layers["model.layers.1.self_attn.v_proj"].scaling["default"] == pytest.approx(4 / 5)
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == pytest.approx(7 / 2)


def test_only_adapter_parameters_and_modules_to_save_require_grad():
    model = tiny_model("bert")
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n
                             or n.startswith("classifier.modules_to_save.default.") for n in trainable)
    assert any(n.startswith("classifier.modules_to_save") for n in trainable)
    assert not model.classifier.original_module.weight.requires_grad


def test_parameter_report_for_a_4096_square_linear():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4096, 4096, bias=False))
    rd.inject(model, rd.LoraConfig(r=16, target_modules=["proj"]))
    report = rd.trainable_parameters(model)
    assert report.trainable == 131_072
    assert "131,072" in str(report) and "0.78%" in report.summary()
    assert report.rows == [("proj", "default: r=16 (4096->4096)", 131_072)]


def test_merge_and_unload_gives_plain_model_with_base_key_names(llama):
    ids = token_batch()
    base_keys = set(llama.state_dict())
    rd.inject(llama, rd.LoraConfig(r=4, init_lora_weights=False))
    before = model_output(llama, ids)
    plain = rd.merge_and_unload(llama)
    assert set(plain.state_dict()) == base_keys
    assert not any(isinstance(m, rd.LoraLayer) for m in plain.modules())
    torch.testing.assert_close(model_output(plain, ids), before, rtol=1e-5, atol=1e-5)


def test_model_merge_unmerge_disable_and_switch(llama):
    ids = token_batch()
    base = model_output(llama, ids)
    rd.inject(llama, rd.LoraConfig(r=4, init_lora_weights=False))
    rd.inject(llama, rd.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), adapter="b")
    assert rd.active_adapters(llama) == ["default"]
    with_a = model_output(llama, ids)
    with rd.disabled(llama):
        assert torch.equal(model_output(llama, ids), base)
    rd.merge(llama)
    torch.testing.assert_close(model_output(llama, ids), with_a, rtol=1e-5, atol=1e-5)
    with rd.disabled(llama):
        torch.testing.assert_close(model_output(llama, ids), base, rtol=1e-5, atol=1e-5)
    with pytest.raises(rd.MergeError, match="unmerge"):
        rd.set_active(llama, "b")
    rd.unmerge(llama)
    rd.set_active(llama, ["default", "b"])
    both = model_output(llama, ids)
    assert not torch.allclose(both, with_a)
    rd.delete_adapter(llama, "b")
    torch.testing.assert_close(model_output(llama, ids), with_a, rtol=1e-6, atol=1e-6)
    assert rd.adapter_names(llama) == ["default"]


def test_merge_is_all_or_nothing(llama):
    rd.inject(llama, rd.LoraConfig(r=2, init_lora_weights=False))
    layers = [layer for _, layer in lora_layers(llama)]
    with torch.no_grad():
        layers[-1].lora_A["default"].weight[0, 0] = float("inf")
    before = [layer.base_layer.weight.clone() for layer in layers]
    with pytest.raises(rd.MergeError, match="'default'"):
        rd.merge(llama)
    for layer, w in zip(layers, before):
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=1e-6)
        assert layer.merged == []


# -- bad input ---------------------------------------------------------------------------------------

def test_targets_that_match_nothing_list_the_closest_names(llama):
    with pytest.raises(rd.TargetError) as err:
        rd.inject(llama, rd.LoraConfig(target_modules=["q_prj", "vproj"]))
    message = str(err.value)
    assert "q_prj" in message and "'q_proj'" in message and "'v_proj'" in message


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(r=0), "r must be a positive integer, got 0"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha must be a positive"),
    (dict(lora_alpha=-1), "lora_alpha must be a positive"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"),
    (dict(target_modules=[]), "empty list"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']"),
    (dict(bias="all"), "bias='all' is not supported"),
])
def test_invalid_config_values_are_named(kwargs, fragment):
    with pytest.raises(rd.ConfigError) as err:
        rd.LoraConfig(**kwargs)
    assert fragment in str(err.value)


def test_config_lists_every_problem_at_once():
    with pytest.raises(rd.ConfigError) as err:
        rd.LoraConfig(r=0, lora_alpha=0)
    assert "r must" in str(err.value) and "lora_alpha must" in str(err.value)


def test_rank_larger_than_the_layer_names_module_and_limit(llama):
    with pytest.raises(rd.ConfigError) as err:
        rd.inject(llama, rd.LoraConfig(r=20, target_modules=["k_proj"]))  # k_proj: 32 -> 16
    assert "model.layers.0.self_attn.k_proj" in str(err.value) and "r <= 16" in str(err.value)
    assert not list(lora_layers(llama))  # model untouched


def test_non_linear_target_is_refused_with_its_type(llama):
    with pytest.raises(rd.TargetError, match="LlamaMLP"):
        rd.inject(llama, rd.LoraConfig(target_modules=["mlp"]))


def test_adapter_names_unknown_duplicate_or_invalid(llama):
    rd.inject(llama, rd.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(rd.AdapterError, match="already"):
        rd.inject(llama, rd.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(rd.AdapterError, match="unknown adapter.*'nope'"):
        rd.set_active(llama, "nope")
    with pytest.raises(rd.AdapterError, match="without '.'"):
        rd.inject(llama, rd.LoraConfig(r=2, target_modules=["q_proj"]), adapter="a.b")


def test_modules_to_save_that_matches_nothing(llama):
    with pytest.raises(rd.TargetError, match="modules_to_save.*lm_haed.*lm_head"):
        rd.inject(llama, rd.LoraConfig(r=2, modules_to_save=["lm_haed"]))
