"""torchrun: two CPU processes (gloo) follow one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from rankdial.train import train


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--steps", "6", "--lr", "5e-3",
              "--max-length", "48", "--grad-accum", "2", "--no-progress"]
    single = train(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "one"), steps=6, lr=5e-3,
                   max_length=48, grad_accum=2, batch_size=8, progress=False, log=lambda *a: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "rankdial.cli", "train", *common, "--batch-size", "4",
                           "--output-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses == pytest.approx(single.losses, abs=1e-4)
    cfg = json.loads((tmp_path / "two" / "rankdial_train.json").read_text())
    assert cfg["world_size"] == 2
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
