"""Exact resume: a run killed with SIGKILL mid-run and resumed ends bit-identical to one never stopped."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from rankdial.train import TrainingInterrupted, train
from rankdial.train.checkpoint import list_checkpoints


def _cmd(model_dir, data, out, *extra):
    return [sys.executable, "-m", "rankdial.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--output-dir", str(out), "--steps", "14", "--batch-size", "4", "--lr", "5e-3", "--max-length", "48",
            "--save-every", "2", "--lora-dropout", "0.1", "--eval-fraction", "0.2", "--eval-every", "5",
            "--no-progress", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _losses(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


KILL_AT = 7  # between the checkpoints of steps 6 and 8, after the evaluation at step 5: metrics must be cut back
# The child kills itself with SIGKILL the moment step KILL_AT + 1 begins: the same step on every run, no race.
_DIE_AT = ("import os, signal, sys\n"
           "import rankdial.train.loop as loop\n"
           "from rankdial.cli import main\n"
           "real = loop.step\n"
           "def step(run, model, s):\n"
           "    if s == {k}:\n"
           "        os.kill(os.getpid(), signal.SIGKILL)\n"
           "    return real(run, model, s)\n"
           "loop.step = step\n"
           "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.slow
def test_sigkill_at_a_fixed_step_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(30))
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(tiny_model_dir, data, ref), check=True, env=_env(), capture_output=True)
    killed = subprocess.run([sys.executable, "-c", _DIE_AT.format(k=KILL_AT), *_cmd(tiny_model_dir, data, run)[3:]],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(r["step"] for r in _losses(run)) == KILL_AT  # it died in step KILL_AT + 1, as planned
    assert not (run / "summary.json").exists() and not (run / "adapter_config.json").exists()
    again = subprocess.run(_cmd(tiny_model_dir, data, run), env=_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # will not silently start over
    resumed = subprocess.run(_cmd(tiny_model_dir, data, run, "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 6)" in resumed.stdout
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]  # noqa: E731
    assert strip(_losses(run)) == strip(_losses(ref))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path, monkeypatch):
    import rankdial.train.loop as loop

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(24))
    common = dict(model=str(tiny_model_dir), data=str(data), steps=10, batch_size=4, lr=5e-3, max_length=48,
                  save_every=2, keep_checkpoints=3, progress=False, log=lambda *a: None)
    ref = train(output_dir=str(tmp_path / "ref"), **common)

    real, calls = loop.token_loss_sum, {"n": 0}

    def crash_at_step_8(*a):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # the process dies during step 8
        return real(*a)

    monkeypatch.setattr(loop, "token_loss_sum", crash_at_step_8)
    with pytest.raises(TrainingInterrupted, match="step-000006"):
        train(output_dir=str(tmp_path / "run"), **common)
    monkeypatch.setattr(loop, "token_loss_sum", real)
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-000002", "step-000004", "step-000006"]
    with open(ckpts[-1] / "trainable.safetensors", "r+b") as f:  # flip a byte in the newest one
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    messages = []
    out = train(output_dir=str(tmp_path / "run"), resume=True, **{**common, "log": messages.append})
    assert out.resumed_from == 4
    assert any("step-000006 is incomplete or corrupt" in m and "SHA-256" in m for m in messages)
    a, b = load_file(ref.output_dir / "adapter_model.safetensors"), load_file(out.output_dir / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first, then, name", [
    (dict(init_lora_weights="pissa"), dict(), "init_lora_weights"),      # the base holds W - AB, then W again
    (dict(), dict(init_lora_weights="olora"), "init_lora_weights"),
    (dict(), dict(method="qlora"), "method"),                           # same adapter keys on an NF4 base
])
def test_resuming_with_another_base_changing_setting_is_refused_in_one_line(tiny_model_dir, tmp_path, monkeypatch,
                                                                           first, then, name):
    """The checkpoint's A and B only mean something on the base they trained against: PiSSA/OLoRA leave the
    residual in the base and qlora quantizes it, with the same adapter keys and shapes, so a resume that
    changes either would load silently and train a different model."""
    import rankdial.train.loop as loop
    from conftest import fail_on_call
    from rankdial.train import TrainingError

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    common = dict(model=str(tiny_model_dir), data=str(data), steps=4, batch_size=4, max_length=32, save_every=2,
                  output_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    fail_on_call(monkeypatch, loop, "token_loss_sum", 3, KeyboardInterrupt())
    with pytest.raises(TrainingInterrupted):
        train(**common, **first)
    monkeypatch.undo()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(TrainingError, match=rf"was written with {name}=.*this run has {name}=") as err:
        train(resume=True, **common, **then)
    assert "\n" not in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
