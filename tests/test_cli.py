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


def _run_without(modules: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """`rankdial ARGV` in a fresh interpreter where `modules` cannot be imported (as if not installed)."""
    code = (f"import sys\nfor m in {modules!r}:\n    sys.modules[m] = None\n"
            f"from rankdial.cli import main\nsys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("missing, verb, extra", [
    ("fastapi", "serve", "serve"), ("uvicorn", "serve", "serve"), ("prometheus_client", "serve", "serve"),
    ("fastapi", "playground", "playground"), ("uvicorn", "playground", "playground"),
])
def test_a_verb_whose_extra_is_missing_names_it_in_one_line(missing, verb, extra):
    proc = _run_without([missing], [verb, "--port", "0"])
    assert proc.returncode == 2
    assert proc.stderr == (f"rankdial {verb}: error: needs {missing}, which is not installed; "
                           f"pip install 'rankdial[{extra}]'\n")
    assert proc.stdout == ""


def test_a_missing_extra_found_deeper_names_it_too(monkeypatch, capsys):
    import rankdial.cli as cli

    def needs_bitsandbytes(args):
        raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes.functional")

    monkeypatch.setattr(cli, "cmd_estimate", needs_bitsandbytes)
    assert main(["estimate", "llama-7b"]) == 2
    assert capsys.readouterr().err == ("rankdial estimate: error: needs bitsandbytes.functional, which is not "
                                       "installed; pip install 'rankdial[bnb]'\n")

    def needs_something_else(args):
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    monkeypatch.setattr(cli, "cmd_estimate", needs_something_else)
    with pytest.raises(ModuleNotFoundError):  # a core module missing is a broken install, not an extra to suggest
        main(["estimate", "llama-7b"])


def test_estimate_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom rankdial.cli import main\nassert main(['estimate', 'llama-7b', '--json']) == 0\n"
            "print('LOADED', [m for m in ('torch', 'transformers') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.rstrip().endswith("LOADED []")
    assert json.loads(proc.stdout[:proc.stdout.rindex("LOADED")])["total_bytes"] > 0
