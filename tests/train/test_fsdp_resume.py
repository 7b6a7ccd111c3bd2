"""sharding="fsdp" checkpoints (torch.distributed.checkpoint): a 2-process run with one process SIGKILLed
stops, its last checkpoint stays good, and resuming it is bit-identical on 2 processes, resharded on 1, and
refused under DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from rankdial.train.checkpoint import list_checkpoints, verify

_DIE_AT = ("import os, signal, sys\n"
           "import rankdial.train.loop as loop\n"
           "from rankdial.cli import main\n"
           "real = loop.step\n"
           "def step(run, model, s):\n"
           "    if s == {k} and os.environ.get('RANK', '1') == '1':\n"
           "        os.kill(os.getpid(), signal.SIGKILL)\n"
           "    return real(run, model, s)\n"
           "loop.step = step\n"
           "sys.exit(main(sys.argv[1:]))\n")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _args(data, out, batch, *extra):
    return ["train", "--model", "default", "--data", str(data), "--output-dir", str(out), "--steps", "6",
            "--batch-size", str(batch), "--lr", "5e-3", "--max-length", "48", "--save-every", "2",
            "--sharding", "fsdp", "--no-progress", *extra]


def _run(args, nproc, script=None):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
              if nproc > 1 else [sys.executable])
    target = [script] if script else ["-m", "rankdial.cli"]
    return subprocess.run([*launch, *target, *args], env=_env(), capture_output=True, text=True, timeout=300)


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.slow
def test_fsdp_kill_resume_reshard_and_ddp_mismatch(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = _run(_args(data, ref, 2), 2)
    assert done.returncode == 0, done.stderr[-3000:]

    script = tmp_path / "die.py"
    script.write_text(_DIE_AT.format(k=4))  # rank 1 dies as step 5 begins, after the checkpoint of step 4
    t0 = time.monotonic()
    killed = _run(_args(data, run, 2), 2, script=str(script))
    assert killed.returncode != 0 and time.monotonic() - t0 < 120
    assert "Signal 9" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step-000002", "step-000004"] and verify(ckpts[-1]) is None
    assert (ckpts[-1] / "dcp" / ".metadata").is_file() and (ckpts[-1] / "adapter" / "adapter_config.json").is_file()
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    shutil.copytree(run, one)
    shutil.copytree(run, ddp)

    resumed = _run(_args(data, run, 2, "--resume"), 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(run) == _losses(ref)  # bit-identical, same number of processes
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)

    resharded = _run(_args(data, one, 4, "--resume"), 1)  # 2 -> 1 process, same global batch
    assert resharded.returncode == 0, resharded.stderr[-3000:]
    assert "written by 2 process(es); resharding it to 1" in resharded.stdout
    assert _losses(one) == pytest.approx(_losses(ref), abs=1e-5)

    refused = _run([*_args(data, ddp, 4, "--resume")[:-4], "--sharding", "ddp", "--no-progress", "--resume"], 1)
    assert refused.returncode == 2
    lines = [l for l in refused.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "sharding=fsdp on 2 process(es)" in lines[0] and "sharding=ddp on 1" in lines[0]


@pytest.mark.slow
def test_one_process_fsdp_checkpoint_resumes_on_two(tmp_path):
    """sharding="fsdp" on one process still writes DCP checkpoints; two processes reshard and continue."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = _run(_args(data, ref, 4), 1)
    assert done.returncode == 0, done.stderr[-3000:]
    script = tmp_path / "die.py"
    script.write_text(_DIE_AT.format(k=4))  # the single process (no RANK) dies as step 5 begins
    killed = _run(_args(data, run, 4), 1, script=str(script))
    assert killed.returncode == -signal.SIGKILL
    assert verify(list_checkpoints(run)[-1]) is None and (list_checkpoints(run)[-1] / "dcp" / ".metadata").is_file()
    resumed = _run(_args(data, run, 2, "--resume"), 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written by 1 process(es); resharding it to 2" in resumed.stdout
    assert _losses(run) == pytest.approx(_losses(ref), abs=1e-5)
