"""Spectrum, truncation and combination of adapter folders, held to the plain SVD and to PEFT."""

import json

import pytest
import torch

import rankdial as rd
from rankdial.rank import (ModuleFactors, combine_adapters, effective_rank, spectrum, suggest_rank_pattern,
                           truncate_adapter)
from conftest import model_output, tiny_model, token_batch

TARGETS = ["q_proj", "v_proj", "down_proj"]


def saved(tmp_path, name, seed, r=4, targets=TARGETS, **kwargs):
    model = tiny_model("llama")
    torch.manual_seed(seed)
    rd.inject(model, rd.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kwargs))
    rd.save_adapter(model, tmp_path / name)
    return tmp_path / name


def outputs_with(folder):
    model = tiny_model("llama")
    rd.load_adapter(model, folder)
    return model_output(model, token_batch())


@pytest.mark.parametrize("shape", [(5, 13, 11), (3, 7, 29), (8, 8, 8), (1, 16, 4)])
def test_factored_svd_equals_the_plain_svd(shape):
    r, d_in, d_out = shape
    g = torch.Generator().manual_seed(sum(shape))
    f = ModuleFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.7)
    u, s, vh = f.svd()
    _, s_ref, _ = f.svd_reference()
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, f.delta(), rtol=1e-5, atol=1e-5)


def test_effective_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [effective_rank(s, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert effective_rank(torch.zeros(3), 0.9) == 0
    for bad in (0, -0.1, 1.5, "0.9", True):
        with pytest.raises(rd.ConfigError, match=r"energy share must be a number in \(0, 1\]"):
            effective_rank(s, bad)


def test_spectrum_finds_a_planted_rank(tmp_path):
    folder = saved(tmp_path, "a", seed=1, r=8)
    tensors = rd.adapters.read_adapter_weights(folder)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    B = tensors[key]
    B[:, 2:] = 0  # only two directions left in this module
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"))
    rows = {row.module: row for row in spectrum(folder)}
    planted = rows["model.layers.0.self_attn.q_proj"]
    assert planted.rank_99 == 2 and planted.singular_values[2] < 1e-5
    assert rows["model.layers.1.self_attn.q_proj"].rank_99 > 2
    pattern = suggest_rank_pattern(folder, 0.99)
    assert pattern["model.layers.0.self_attn.q_proj"] == 2 and set(pattern) == set(rows)


def test_truncate_to_full_rank_is_lossless_and_loads_in_peft(tmp_path):
    import peft

    folder = saved(tmp_path, "a", seed=2, use_rslora=True)
    report = truncate_adapter(folder, tmp_path / "t", rank=4)
    assert report.energy_kept == pytest.approx(1.0)
    torch.testing.assert_close(outputs_with(tmp_path / "t"), outputs_with(folder), rtol=1e-5, atol=1e-5)
    in_peft = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "t")
    torch.testing.assert_close(model_output(in_peft, token_batch()), outputs_with(folder), rtol=1e-5, atol=1e-5)


def test_truncate_by_rank_and_energy(tmp_path):
    folder = saved(tmp_path, "a", seed=3, r=8)
    low = truncate_adapter(folder, tmp_path / "r2", rank=2)
    assert {row[2] for row in low.rows} == {2} and 0 < low.energy_kept < 1
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2
    by_energy = truncate_adapter(folder, tmp_path / "e", energy=0.9)
    assert all(share >= 0.9 - 1e-6 for *_, share in by_energy.rows)
    outputs_with(tmp_path / "e")  # per-module ranks written as a rank_pattern that loads


def test_a_peft_written_adapter_truncates_and_combines(tmp_path):
    import peft

    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                     init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    expected = model_output(model, token_batch())
    truncate_adapter(tmp_path / "peft", tmp_path / "t", rank=4)
    torch.testing.assert_close(outputs_with(tmp_path / "t"), expected, rtol=1e-5, atol=1e-5)
    combine_adapters([tmp_path / "peft"], [1.0], tmp_path / "c", how="cat")
    torch.testing.assert_close(outputs_with(tmp_path / "c"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_one_adapter_at_weight_one_is_reproduced(tmp_path, how):
    folder = saved(tmp_path, "a", seed=4)
    combine_adapters([folder], [1.0], tmp_path / "c", how=how)
    torch.testing.assert_close(outputs_with(tmp_path / "c"), outputs_with(folder), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_combine_matches_peft_add_weighted_adapter(tmp_path, how):
    import peft

    a, b = saved(tmp_path, "a", seed=5), saved(tmp_path, "b", seed=6)
    combine_adapters([a, b], [0.7, -0.4], tmp_path / "c", how=how)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), a, adapter_name="one")
    theirs.load_adapter(b, adapter_name="two")
    theirs.add_weighted_adapter(["one", "two"], [0.7, -0.4], "mix", combination_type=how)
    theirs.set_adapter("mix")
    torch.testing.assert_close(outputs_with(tmp_path / "c"), model_output(theirs, token_batch()), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused_with_the_reason(tmp_path):
    a = saved(tmp_path, "a", seed=7)
    other_targets = saved(tmp_path, "b", seed=8, targets=["k_proj"])
    with pytest.raises(rd.ConfigError, match="rank must be a positive integer"):
        truncate_adapter(a, tmp_path / "t", rank=0)
    with pytest.raises(rd.ConfigError, match="exactly one of rank"):
        truncate_adapter(a, tmp_path / "t")
    with pytest.raises(rd.ConfigError, match="energy share"):
        truncate_adapter(a, tmp_path / "t", energy=1.5)
    with pytest.raises(rd.AdapterFileError, match="same target modules.*cat"):
        combine_adapters([a, other_targets], [1, 1], tmp_path / "c", how="linear")
    with pytest.raises(rd.ConfigError, match="one weight per adapter"):
        combine_adapters([a, other_targets], [1], tmp_path / "c")
    config = json.loads((other_targets / "adapter_config.json").read_text())
    (other_targets / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/elsewhere"}))
    config_a = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**config_a, "base_model_name_or_path": "/here"}))
    with pytest.raises(rd.AdapterFileError, match="different base models"):
        combine_adapters([a, other_targets], [1, 1], tmp_path / "c", how="cat")
    before = (a / "adapter_model.safetensors").read_bytes()
    with pytest.raises(rd.OutputError, match="an input of this command"):
        truncate_adapter(a, a, rank=2)
    assert (a / "adapter_model.safetensors").read_bytes() == before
    (a / "adapter_config.json").write_text(json.dumps({**config_a, "r": 8}))
    with pytest.raises(rd.AdapterFileError, match="another rank in their weights than adapter_config.json says .*rank 4, config r=8"):
        spectrum(a)


def test_combining_adapters_with_different_selectors_loads_back(tmp_path):
    a = saved(tmp_path, "a", seed=9, layers_to_transform=[0])
    b = saved(tmp_path, "b", seed=10, targets=r".*\.o_proj")
    combine_adapters([a, b], [1.0, 1.0], tmp_path / "c", how="cat")
    combined = outputs_with(tmp_path / "c")
    model = tiny_model("llama")
    rd.load_adapter(model, a, adapter="a")
    rd.load_adapter(model, b, adapter="b")
    rd.set_active(model, ["a", "b"])
    torch.testing.assert_close(combined, model_output(model, token_batch()), rtol=1e-5, atol=1e-5)
