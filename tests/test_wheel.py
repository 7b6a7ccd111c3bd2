"""The wheel: built from this checkout, installed with only its core dependencies (and the local torch wheel) into
a fresh virtual environment outside the repository, it runs `rankdial --help`, `rankdial estimate llama-7b` and a
2-step `rankdial train` on the embedded default model and samples it ships; a verb whose extra is missing says
which extra to install."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rankdial

ROOT = Path(rankdial.__file__).resolve().parents[2]


def _sh(cmd: list, cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env(**extra) -> dict:
    """No PYTHONPATH or virtual environment of this test run leaks into the fresh one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def _build_wheel(tmp_path: Path, env: dict) -> Path:
    """`pip wheel` on a copy of the sources (the build leaves build/ and *.egg-info behind; not in the checkout)."""
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, sources / name)
    shutil.copytree(ROOT / "src", sources / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    try:  # offline when this environment has the build backend pyproject asks for; else pip fetches it
        import setuptools
        isolation = [] if int(setuptools.__version__.split(".")[0]) < 77 else ["--no-build-isolation"]
    except ImportError:
        isolation = []
    _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", dist, sources], tmp_path, env)
    wheels = list(dist.glob("rankdial-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow  # builds a wheel, creates a virtual environment and installs torch and transformers (minutes)
def test_wheel_installs_and_runs_from_a_fresh_venv(tmp_path):
    torch = pytest.importorskip("torch")
    env = _clean_env()
    wheel = _build_wheel(tmp_path, env)

    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("rankdial/models/default/model.safetensors", "rankdial/models/default/tokenizer.json",
                    "rankdial/models/default/config.json", "rankdial/models/default/samples/pydoc_qa.jsonl",
                    "rankdial/playground/static/index.html", "rankdial/cli.py"):
        assert shipped in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any(dep in r for r in core for dep in ("fastapi", "uvicorn", "prometheus", "bitsandbytes", "peft"))
    assert {"serve", "playground", "bnb", "all", "test"} <= {
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}

    venv = tmp_path / "venv"  # outside the repository: tmp_path
    _sh([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, rankdial_bin = venv / "bin" / "python", venv / "bin" / "rankdial"
    # the torch of this environment (a local wheel here; pip's configuration says where it lies), then the wheel
    _sh([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", wheel], tmp_path, env,
        timeout=1800)

    work = tmp_path / "work"
    work.mkdir()
    imported = _sh([python, "-c", "import rankdial, sys; print(rankdial.__file__); "
                    "print(sorted(m for m in ('fastapi', 'uvicorn', 'bitsandbytes') if __import__('importlib.util')"
                    ".util.find_spec(m)))"], work, env)
    assert imported.stderr == ""
    where = imported.stdout.splitlines()
    assert Path(where[0]).is_relative_to(venv), where  # the installed wheel, not this checkout
    assert where[1] == "[]"  # the core alone: no extra came with it

    helped = _sh([rankdial_bin, "--help"], work, env)
    assert "usage: rankdial" in helped.stdout and helped.stderr == ""

    estimate = _sh([rankdial_bin, "estimate", "llama-7b"], work, env)
    assert "llama-7b" in estimate.stdout and estimate.stderr == ""

    samples = Path(where[0]).parent / "models" / "default" / "samples" / "pydoc_qa.jsonl"
    trained = _sh([rankdial_bin, "train", "--data", samples, "--steps", "2", "--output-dir", work / "run"], work, env)
    assert "done: lora, 2 steps" in trained.stdout
    assert (work / "run" / "adapter_model.safetensors").is_file() and (work / "run" / "loss.png").is_file()

    serve = subprocess.run([rankdial_bin, "serve", "--port", "0"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=120)
    assert serve.returncode == 2
    assert serve.stderr == "rankdial serve: error: needs fastapi, which is not installed; pip install 'rankdial[serve]'\n"
