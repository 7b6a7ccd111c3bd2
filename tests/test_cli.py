"""The command line: the demo round trip, inspect, and errors without stack traces (more in test_compare.py,
test_export.py and test_inspect.py)."""

import json
import subprocess
import sys

import pytest

import rankdial as rd
from rankdial.cli import main
from conftest import tiny_model


@pytest.mark.slow
def test_demo_round_trip_succeeds(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path), "--steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "round trip OK" in out and "trainable%" in out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_inspect_reports_ranks_and_delta_norms(tmp_path, capsys):
    model = tiny_model("llama")
    rd.inject(model, rd.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    rd.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 2 * (3 * 32 + 32 * 3)
    assert [m["r"] for m in info["modules"]] == [3, 3]
    assert all(m["delta_norm"] > 0 for m in info["modules"])


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (several seconds)
def test_bad_input_prints_one_line_error_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rankdial.cli", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
