"""`rankdial serve --compile`: the compiled decode step gives the eager tokens; a compile that fails (at the warm-up or
mid-serving) falls back to eager with one warning line and the same tokens; batches pad to buckets, and a batch
size outside the buckets still runs. The fast tests stand a recording or failing callable in for torch.compile
(serve.runner.compile_model); the slow one compiles with inductor."""

from __future__ import annotations

import pytest

from rankdial.serve import Engine, SamplingParams, runner as runner_mod
from rankdial.serve.runner import BUCKETS, bucket
from engine_helpers import PROMPTS, make_adapter

GREEDY = SamplingParams(max_tokens=8, temperature=0)
MIX = [None, "ad0", "ad1", None, "ad0", "ad1"]


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "ad0", seed=0, r=4)
    make_adapter(root / "ad1", seed=1, r=8)
    return root


def texts(adapters_dir, n=len(PROMPTS), together=False, **kw):
    """Each request's text, and the engine. together: the adapters are loaded and every request is queued before the
    engine's thread starts, so they decode as one batch (otherwise the first may run alone while the others are
    still being submitted or their adapters read)."""
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", **kw)
    try:
        if together:  # adapters loaded first (a request whose adapter is loading waits, the others go on)
            for name in sorted({a for a in MIX[:n] if a}):
                eng.registry.load(name)
            eng.start = lambda: None  # enqueue() starts the thread; hold it until all are queued
        handles = [eng.submit(p, a, GREEDY) for p, a in zip(PROMPTS[:n], MIX[:n])]
        if together:
            del eng.start
            eng.start()
        return [h.result(timeout=600).text for h in handles], eng
    finally:
        eng.shutdown(drain=False)


@pytest.fixture(scope="module")
def eager(adapters_dir):
    return texts(adapters_dir)[0]


def test_bucket_pads_to_the_next_and_caps_at_the_slots():
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 17, 64)] == [1, 2, 4, 8, 32, 64]
    assert bucket(3, 3) == 3  # capped: no bucket between
    assert bucket(BUCKETS[-1] + 1, 10_000) == BUCKETS[-1] + 1  # past the largest bucket: its own size


def recorder(sizes):
    """A stand-in for torch.compile that runs the model eagerly and records each decode batch size."""
    def fake(model):
        def run(**kw):
            sizes.append(kw["input_ids"].shape[0])
            return model(**kw)
        return run
    return fake


@pytest.mark.parametrize("slots, expect", [(64, {1, 2, 4, 8}), (6, {1, 2, 4, 6})])
def test_decode_pads_to_buckets_and_sizes_outside_them_run(adapters_dir, eager, monkeypatch, slots, expect):
    sizes = []
    monkeypatch.setattr(runner_mod, "compile_model", recorder(sizes))
    out, eng = texts(adapters_dir, together=True, compile=True, max_batch_size=slots)
    assert out == eager
    assert eng.runner.compile_status == "on"
    assert set(sizes) <= expect and max(sizes) == max(expect)  # 6 rows: 8 with 64 slots, 6 (no bucket) with 6


def test_a_compile_failure_at_warm_up_falls_back_with_one_line(adapters_dir, eager, monkeypatch):
    def broken(model):
        def run(**kw):
            raise RuntimeError("forced compile failure\nsecond line of a long trace")
        return run

    monkeypatch.setattr(runner_mod, "compile_model", broken)
    lines = []
    out, eng = texts(adapters_dir, compile=True, log=lines.append)
    assert out == eager
    assert len(lines) == 1 and "torch.compile failed (RuntimeError: forced compile failure)" in lines[0]
    assert "\n" not in lines[0] and "decoding eagerly" in lines[0]
    assert eng.runner.compile_status.startswith("failed: RuntimeError") and eng.compile_seconds is not None


def test_a_compile_failure_mid_serving_reruns_the_step_eagerly(adapters_dir, eager, monkeypatch, capsys):
    calls = []

    def flaky(model):
        def run(**kw):
            calls.append(1)
            if len(calls) > 4:  # the warm-up and a few steps pass, then the compiled step breaks
                raise RuntimeError("forced failure mid-serving")
            return model(**kw)
        return run

    monkeypatch.setattr(runner_mod, "compile_model", flaky)
    out, eng = texts(adapters_dir, compile=True)
    assert out == eager
    err = [line for line in capsys.readouterr().err.splitlines() if "torch.compile" in line]
    assert len(err) == 1 and "forced failure mid-serving" in err[0] and len(calls) == 5
    assert eng.runner.compile_status.startswith("failed")


@pytest.mark.slow
def test_inductor_compiled_greedy_equals_eager(adapters_dir, eager):
    """torch.compile for real (inductor): minutes of compiling on a small CPU."""
    out, eng = texts(adapters_dir, compile=True, max_batch_size=8)
    assert eng.runner.compile_status == "on", eng.runner.compile_status
    assert out == eager


def test_the_start_up_line_reports_compile_off_its_time_or_its_failure():
    from types import SimpleNamespace

    import torch

    from rankdial.serve.launch import _compile_words

    def engine(seconds, status, device="cpu"):
        runner = SimpleNamespace(compile_status=status, device=torch.device(device))
        return SimpleNamespace(compile_seconds=seconds, runner=runner)

    assert _compile_words(engine(None, "off")) == "compile off: measured ~2x slower than eager on a CPU"
    assert _compile_words(engine(None, "off", "meta")) == "compile off"
    assert _compile_words(engine(41.23, "on")) == "compiled decode step warmed up in 41.2 s"
    assert _compile_words(engine(2.0, "failed: RuntimeError: x")) == "compile failed after 2.0 s, decoding eagerly"
