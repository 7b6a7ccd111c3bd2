"""`rankdial inspect` (rankdial.inspect): a truthful description of an adapter folder, or one clear error."""

import json

import pytest
from safetensors.torch import load_file, save_file

import rankdial as rd
from conftest import tiny_model
from rankdial.cli import main
from rankdial.errors import AdapterFileError
from rankdial.inspect import inspect_adapter
from rankdial.lora import lora_layers


@pytest.fixture
def adapter(tmp_path):
    model = tiny_model("llama")
    rd.inject(model, rd.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"], init_lora_weights=False))
    rd.save_adapter(model, tmp_path / "a")
    return model, tmp_path / "a"


def edit_config(folder, **changes):
    file = folder / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_delta_norms_are_the_layers_own_delta_weights(adapter):
    model, folder = adapter
    info = inspect_adapter(folder)
    want = {path: layer.delta_weight("default").norm().item() for path, layer in lora_layers(model)}
    got = {m["module"]: m["delta_norm"] for m in info["modules"]}
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 * want[k] for k in want)


def test_a_config_rank_that_disagrees_with_the_weights_is_an_error(adapter, capsys):
    _, folder = adapter
    edit_config(folder, r=8)
    with pytest.raises(AdapterFileError, match="another rank in their weights than adapter_config.json says .*rank 3, config r=8"):
        inspect_adapter(folder)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "r=8" in err and str(folder) in err


def test_a_rank_pattern_that_explains_the_weights_is_fine(adapter):
    _, folder = adapter
    edit_config(folder, r=8, rank_pattern={"q_proj": 3})
    assert [m["r"] for m in inspect_adapter(folder)["modules"]] == [3, 3]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error(adapter, capsys, bad):
    _, folder = adapter
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = bad
    save_file(tensors, file)
    with pytest.raises(AdapterFileError, match="NaN/Inf"):
        inspect_adapter(folder)
    assert main(["inspect", str(folder), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and key in captured.err


