"""DoRA and residual-base adapters through the tools: inspect shows them, truncate/combine refuse them in one line,
the serving registry refuses them at load (the API turns that into a 422 naming the adapter)."""

import copy

import pytest
import torch

import rankdial as rd
from rankdial.errors import AdapterFileError, ConfigError
from rankdial.inspect import inspect_adapter
from rankdial.rank.combine import combine_adapters
from rankdial.rank.truncate import truncate_adapter
from rankdial.serve.registry import AdapterRegistry
from conftest import tiny_model

T = ["q_proj", "v_proj"]


@pytest.fixture
def folders(tmp_path):
    out = {}
    for name, extra in {"dora": dict(use_dora=True), "pissa": dict(init_lora_weights="pissa"),
                        "plain": {}}.items():
        model = tiny_model("llama")
        rd.inject(model, rd.LoraConfig(r=2, lora_alpha=4, target_modules=T, **extra))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.01)
        rd.save_adapter(model, tmp_path / name, residual_base=name == "pissa")
        out[name] = tmp_path / name
    return out


def test_inspect_shows_a_dora_adapter_and_counts_its_magnitudes(folders):
    info = inspect_adapter(folders["dora"])
    plain = inspect_adapter(folders["plain"])
    assert info["use_dora"] and not plain["use_dora"]
    d_out = sum(m["d_out"] for m in info["modules"])
    assert info["parameters"] == plain["parameters"] + d_out
    assert all(m["magnitude_norm"] > 0 for m in info["modules"])


@pytest.mark.parametrize("which, message", [("dora", "DoRA adapter"), ("pissa", "init_lora_weights='pissa'")])
def test_truncate_and_combine_refuse_in_one_line(folders, tmp_path, which, message):
    with pytest.raises(ConfigError, match=message) as err:
        truncate_adapter(folders[which], tmp_path / "t", rank=1)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=message):
        combine_adapters([folders["plain"], folders[which]], [1.0, 1.0], tmp_path / "c", how="cat")


@pytest.mark.parametrize("which, message", [("dora", "adapter 'dora' is a DoRA adapter"),
                                            ("pissa", "adapter 'pissa' has init_lora_weights='pissa'")])
def test_the_serving_registry_refuses_them_at_load(folders, which, message):
    registry = AdapterRegistry(tiny_model("llama"), folders[which].parent)
    with pytest.raises(AdapterFileError, match=message):
        registry.load(which)
    assert registry.load("plain")
