"""The rank verbs on the command line: inspect --spectrum / --suggest-rank, truncate, combine."""

import json

import pytest
import torch

import rankdial as rd
from rankdial.cli import main
from conftest import tiny_model


@pytest.fixture
def adapters(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        model = tiny_model("llama")
        torch.manual_seed(seed)
        rd.inject(model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        rd.save_adapter(model, tmp_path / name)
    return tmp_path


def test_spectrum_and_suggested_rank_as_json(adapters, capsys):
    assert main(["inspect", str(adapters / "a"), "--spectrum", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(len(r["singular_values"]) == 4 and r["rank_90"] <= r["rank_99"] <= 4 for r in rows)
    assert main(["inspect", str(adapters / "a"), "--suggest-rank", "0.5", "--json"]) == 0
    pattern = json.loads(capsys.readouterr().out)["rank_pattern"]
    assert set(pattern) == {r["module"] for r in rows} and all(1 <= k <= 4 for k in pattern.values())


def test_truncate_and_combine_write_loadable_folders(adapters, capsys):
    assert main(["truncate", str(adapters / "a"), "--rank", "2", "--out", str(adapters / "t")]) == 0
    assert "energy kept" in capsys.readouterr().out
    assert main(["combine", str(adapters / "a"), str(adapters / "b"), "--weights", "0.5,0.5", "--how", "cat",
                 "--out", str(adapters / "c")]) == 0
    for folder in ("t", "c"):
        rd.load_adapter(tiny_model("llama"), adapters / folder)
    assert json.loads((adapters / "c" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("argv, message", [
    (["truncate", "{a}", "--rank", "0", "--out", "{t}"], "rank must be a positive integer"),
    (["truncate", "{a}", "--energy", "2", "--out", "{t}"], "energy share"),
    (["truncate", "{a}", "--rank", "2", "--out", "{a}"], "an input of this command"),
    (["truncate", "{missing}", "--rank", "2", "--out", "{t}"], "does not exist"),
    (["combine", "{a}", "{b}", "--weights", "1", "--out", "{t}"], "one weight per adapter"),
    (["inspect", "{a}", "--suggest-rank", "0"], "energy share"),
])
def test_bad_input_is_one_line_and_exit_2(adapters, capsys, argv, message):
    paths = {"a": adapters / "a", "b": adapters / "b", "t": adapters / "t", "missing": adapters / "nope"}
    assert main([part.format(**paths) for part in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
