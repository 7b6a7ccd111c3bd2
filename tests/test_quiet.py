"""A quiet, light start: `import rankdial` and `rankdial --help` print nothing on stderr and import neither torch
nor transformers; dependency warnings a user cannot act on are dropped at their source, and only those."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rankdial
from rankdial import _quiet
from rankdial.cli import build_parser

SRC = Path(rankdial.__file__).resolve().parents[1]


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter with this checkout's rankdial first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


HEAVY = ("torch", "transformers", "bitsandbytes", "fastapi", "matplotlib")


def test_import_rankdial_is_silent_and_light():
    proc = run_python(f"import sys, rankdial; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == "[]"


def test_help_of_every_verb_is_silent_and_imports_no_heavy_module():
    verbs = list(build_parser().verb_parsers)
    code = ("import sys\nfrom rankdial.cli import main\n"
            "for argv in [['--help']] + [[verb, '--help'] for verb in sys.argv[1:]]:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = run_python(code, *verbs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "LOADED []" in proc.stdout
    assert "usage: rankdial" in proc.stdout and "--max-length" in proc.stdout  # the help itself is all there


def test_public_api_loads_on_first_use():
    namespace = {}
    exec("from rankdial import *", namespace)
    assert set(rankdial.__all__) <= set(namespace)
    assert rankdial.inject is namespace["inject"] and rankdial.lora.inject is not None
    assert set(rankdial.__all__) <= set(dir(rankdial))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        rankdial.no_such_name  # noqa: B018


@pytest.mark.parametrize("logger, message", [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: offline. "
                                      "Please make sure you already `pip install kernels`"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                  "because Hugging Face Hub is in offline mode."),
])
def test_unactionable_dependency_warnings_are_dropped_and_only_those(logger, message):
    _quiet.install()
    _quiet.install()  # idempotent: one filter per logger
    assert sum(isinstance(f, _quiet._Drop) for f in logging.getLogger(logger).filters) == 1
    # The loggers' own filters decide (not caplog on the root: once bitsandbytes and others are imported by earlier
    # tests, a logger may not propagate or may be disabled by a logging config, and the filter must hold either way).
    def passes(name: str, text: str) -> bool:
        record = logging.LogRecord(name, logging.WARNING, __file__, 0, text, None, None)
        return bool(logging.getLogger(name).filter(record))

    assert not passes(logger, message)
    assert passes(logger, "something else the package has to say")
    assert passes("kernels._internals.hf_hub",
                  "Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is in offline mode.")


@pytest.mark.slow  # importing bitsandbytes takes ~5 s
def test_bitsandbytes_imported_after_rankdial_is_silent():
    pytest.importorskip("bitsandbytes")  # (its warning appears only on CPUs with AVX512-BF16; silent elsewhere)
    proc = run_python("import rankdial, bitsandbytes")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.slow  # a fresh interpreter loads torch, transformers and bitsandbytes and trains (~8 s)
def test_qlora_train_prints_only_its_progress_on_stderr(tmp_path):
    pytest.importorskip("bitsandbytes")
    samples = SRC / "rankdial" / "models" / "default" / "samples" / "psalms.jsonl"
    proc = run_python("import sys; from rankdial.cli import main; sys.exit(main(sys.argv[1:]))", "train",
                      "--data", str(samples), "--method", "qlora", "--steps", "1", "--output-dir", str(tmp_path / "q"))
    assert proc.returncode == 0, proc.stderr
    assert "done: qlora, 1 steps" in proc.stdout
    other = [piece for piece in re.split(r"[\r\n]", proc.stderr) if piece and not piece.startswith("qlora r=")]
    assert other == []
