"""Ctrl-C during training: one line that says where it stopped, the last checkpoint and --resume; no traceback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import fail_on_call, qa_rows, write_jsonl
from rankdial.train import TrainingInterrupted, train


def test_keyboard_interrupt_becomes_training_interrupted(tiny_model_dir, tmp_path, monkeypatch):
    import rankdial.train.loop as loop

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    fail_on_call(monkeypatch, loop, "token_loss_sum", 4, KeyboardInterrupt())  # Ctrl-C in step 4
    common = dict(model=str(tiny_model_dir), data=str(data), steps=6, batch_size=4, max_length=48, progress=False,
                  log=lambda *a: None)
    with pytest.raises(TrainingInterrupted) as err:
        train(output_dir=str(tmp_path / "a"), save_every=2, **common)
    message = str(err.value)
    assert "\n" not in message and "after step 3 of 6" in message
    assert str(tmp_path / "a" / "checkpoints" / "step-000002") in message and "--resume" in message
    monkeypatch.undo()  # count the calls afresh for the second run
    fail_on_call(monkeypatch, loop, "token_loss_sum", 4, KeyboardInterrupt())
    with pytest.raises(TrainingInterrupted, match="no checkpoint was written .*--save-every"):
        train(output_dir=str(tmp_path / "b"), **common)


@pytest.mark.slow
def test_sigint_to_the_cli_prints_one_line_and_no_traceback(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(24))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rankdial.cli", "train", "--model", str(tiny_model_dir), "--data", str(data),
           "--output-dir", str(out), "--steps", "100000", "--batch-size", "4", "--max-length", "48",
           "--save-every", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, metrics = time.time() + 120, out / "metrics.jsonl"
    try:
        while time.time() < deadline and proc.poll() is None:  # wait until step 3 is logged, then Ctrl-C
            if metrics.exists() and any(json.loads(l).get("step", 0) >= 3 for l in metrics.read_text().splitlines()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = [l for l in stderr.splitlines() if "interrupted" in l]
    assert len(lines) == 1, stderr
    assert "after step" in lines[0] and "checkpoints/step-" in lines[0] and "--resume" in lines[0]
    assert proc.returncode == 130  # the shell's code for Ctrl-C
    assert not (out / "summary.json").exists()


def test_under_torchrun_only_the_main_process_prints_the_interruption(monkeypatch, capsys):
    """Ctrl-C under torchrun reaches every process; each printed the same 'interrupted ... --resume' line."""
    import rankdial.train as train_pkg
    from rankdial.cli import main

    def interrupted(*a, **k):
        raise TrainingInterrupted("training was interrupted (Ctrl-C) after step 3")

    monkeypatch.setattr(train_pkg, "train", interrupted)
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--data", "x.jsonl"]) == 130
        assert ("interrupted (Ctrl-C) after step 3" in capsys.readouterr().err) is printed
