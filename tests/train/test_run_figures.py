"""summary.json's seconds and peak memory are the run's own: not the process's peak so far (a sweep trains many
runs in one process), and after --resume they cover the whole run, as `steps` does."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import fail_on_call, qa_rows, write_jsonl
from rankdial.memory import process_status_bytes
from rankdial.train import TrainingInterrupted, train


def test_a_runs_peak_memory_is_its_own_not_the_processes_peak_so_far(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    # 1 GiB touched, then freed: the process's peak, not the run's. The run's peak counts what is resident when
    # it starts (late in a full suite that is gigabytes), so the spike stands well above anything a tiny run adds.
    big = torch.ones(256 * 2**20)
    del big
    process_peak = process_status_bytes("VmHWM") / 2**20
    resident = process_status_bytes("VmRSS") / 2**20
    assert process_peak > resident + 768  # the spike is the process's peak (the test's premise)
    train(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), steps=2, batch_size=2,
          max_length=48, progress=False, log=lambda *a: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["peak_memory_mb"] < process_peak - 512


def test_seconds_after_resume_cover_the_whole_run(tiny_model_dir, tmp_path, monkeypatch):
    """A stand-in clock moves 100 s per training step and stands still otherwise (model loading included)."""
    import rankdial.train.loop as loop

    clock, real_step = [0.0], loop.step

    def step(*a, **k):
        clock[0] += 100.0
        return real_step(*a, **k)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(loop, "step", step)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    common = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), steps=6, batch_size=2,
                  max_length=48, progress=False, save_every=2, log=lambda *a: None)
    fail_on_call(monkeypatch, loop, "token_loss_sum", 5, KeyboardInterrupt())  # Ctrl-C in step 5
    with pytest.raises(TrainingInterrupted):
        train(**common)
    monkeypatch.undo()  # the real token_loss_sum again
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(loop, "step", step)
    train(resume=True, **common)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # steps 1-4 before the checkpoint of step 4 (step 5's work was lost with the Ctrl-C), 5-6 after: 6 x 100 s
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6 and summary["seconds"] == pytest.approx(600)
