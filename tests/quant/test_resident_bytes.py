"""Memory that is measured, not claimed: resident memory grows by what the NF4 layers report."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rankdial as rd
from rankdial.quant import quantized_bits_per_param

PROBE = textwrap.dedent("""
    import gc, json, torch
    from torch import nn
    import rankdial as rd
    from rankdial.quant.linear import NF4Linear
    torch.set_num_threads(1)

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    def make(seed):  # quantize one 2048x2048 layer, dropping its fp32 weight at once
        torch.manual_seed(seed)
        return NF4Linear.from_linear(nn.Linear(2048, 2048, bias=False))

    warm = make(0); del warm; gc.collect()
    before = rss()
    layers = [make(i) for i in range(16)]
    gc.collect()
    print(json.dumps({"grew": rss() - before, "reported": sum(l.weight_bytes for l in layers)}))
""")


@pytest.mark.slow
def test_resident_memory_matches_the_reported_bytes():
    # A fixed mmap threshold makes glibc hand freed temporaries (the fp32 weights) back to the system, so RSS
    # shows what is kept rather than what the allocator caches for reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert abs(figures["grew"] - figures["reported"]) <= 0.10 * figures["reported"], figures


def test_model_bits_per_param_with_and_without_double_quant():
    for double_quant, limit in ((True, 4.13), (False, 4.5)):
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 4096))
        rd.quantize_model(model, double_quant=double_quant)
        assert 4.0 < quantized_bits_per_param(model) <= limit
