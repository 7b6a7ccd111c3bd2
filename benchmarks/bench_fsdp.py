"""FSDP (sharding="fsdp") against one process: per-step loss, per-process peak memory, the planner, tokens/s.

A Llama-shaped model with random weights is built from a config and saved (safetensors, the embedded model's
tokenizer); each method (full, lora, qlora) trains a few steps on the bundled pydoc_qa sample (packed: every row
MAX_LENGTH tokens, the planner's seq_len) through the real
loop (rankdial.train.train), once in one process (batch B) and once under torchrun with 2 processes,
sharding="fsdp", gloo (batch B/2 each: the same global batch). Every run is a fresh process; each process
reports its own resident peak (VmHWM) and its baseline (VmRSS after the imports, the process group and
a one-step warm-up run of the same method on a tiny model, the peak counter then reset), so `peak_over_baseline` is what training adds: the figure the planner predicts
(estimate_memory(..., processes=N, sharding=...), printed beside it) and the one `peak_ratio_2_vs_1` divides.
glibc is told to return freed big blocks (rankdial.memory_measure._return_freed_memory), so the resident peak
tracks live tensors.

    .venv/bin/python benchmarks/bench_fsdp.py            # "medium": 16 layers, 214M parameters (0.86 GB fp32)
    .venv/bin/python benchmarks/bench_fsdp.py --size small   # 6 layers, 49M parameters (0.2 GB fp32)
    .venv/bin/python benchmarks/bench_fsdp.py --size large   # 466M parameters (1.86 GB fp32): ~10 GB, 8 min
    .venv/bin/python benchmarks/bench_fsdp.py --quick    # a smoke run (tiny model, 2 steps)

Ends with one JSON line: loss_max_abs_diff and peak_ratio_2_vs_1 (objects keyed by lora, qlora, full), and
per method the peaks (MiB) of 1 and 2 processes, the planner's figures, tokens/s and the losses.

Last --size large run (2 shared CPU cores): loss_max_abs_diff lora 1.1e-6, qlora 1.2e-6, full 2.2e-6;
peak_ratio_2_vs_1 lora 0.669, qlora 0.640, full 0.629; planner within 8% of every measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lora", "qlora", "full")
SIZES = {  # hidden, layers, heads, ffn, vocab (the tokenizer's 4096)
    "quick": dict(hidden=128, layers=2, heads=4, ffn=344, steps=2),
    "small": dict(hidden=768, layers=6, heads=12, ffn=2048, steps=3),
    "medium": dict(hidden=1024, layers=16, heads=16, ffn=2816, steps=3),
    "large": dict(hidden=1536, layers=16, heads=16, ffn=4096, steps=3),
}
GLOBAL_BATCH, MAX_LENGTH, R = 4, 64, 16
MIB = 1 << 20


def make_model(folder: Path, hidden: int, layers: int, heads: int, ffn: int, **_) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankdial.models import default_model_path

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_path() / name).exists():
            shutil.copy(default_model_path() / name, folder / name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(folder, safe_serialization=True)
    return folder


def worker(args) -> None:
    """One process of a run (under torchrun or alone): train, then write this process's figures."""
    from rankdial.memory import process_status_bytes
    from rankdial.memory_measure import _return_freed_memory, _trim

    _return_freed_memory()
    import torch

    torch.set_num_threads(1)
    from rankdial.train import train
    from rankdial.train.distributed import init_distributed

    dist = init_distributed("cpu")

    def run(model, out, steps):
        return train(model=model, method=args.method, data=args.data, output_dir=out, steps=steps,
                     batch_size=args.batch, max_length=MAX_LENGTH, packing=True, lr=1e-3, r=R, lora_alpha=2 * R,
                     sharding="fsdp",
                     device="cpu", progress=False, log=lambda *a: None)

    # Warm-up: the same run on a tiny model (lazy imports, FSDP, autograd, the loss plot's matplotlib), then
    # the baseline and a reset of the peak counter, as rankdial.memory_measure does.
    run(args.warm, f"{args.out}-warm", 1)
    _trim()
    baseline = process_status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux 4.0+)
    except OSError:
        pass
    t0 = time.perf_counter()
    r = run(args.model, args.out, args.steps)
    peak = process_status_bytes("VmHWM")
    Path(args.report).with_suffix(f".rank{dist.rank}.json").write_text(json.dumps({
        "rank": dist.rank, "peak_mib": peak / MIB, "baseline_mib": baseline / MIB,
        "peak_over_baseline_mib": (peak - baseline) / MIB, "losses": r.losses,
        "tokens_per_s": r.tokens_per_second, "seconds": time.perf_counter() - t0}))


def run_case(model: Path, warm: Path, data: Path, method: str, nproc: int, steps: int, work: Path) -> dict:
    report = work / f"{method}-{nproc}"
    out = work / f"out-{method}-{nproc}"
    args = ["--worker", "--model", str(model), "--warm", str(warm), "--data", str(data), "--method", method, "--steps", str(steps),
            "--batch", str(GLOBAL_BATCH // nproc), "--out", str(out), "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
              if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launch, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{method} on {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(report.with_suffix(f".rank{i}.json").read_text()) for i in range(nproc)]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-warm", ignore_errors=True)
    return {"peak_mib": max(r["peak_mib"] for r in ranks),
            "peak_over_baseline_mib": max(r["peak_over_baseline_mib"] for r in ranks),
            "baseline_mib": ranks[0]["baseline_mib"], "losses": ranks[0]["losses"],
            "tokens_per_s": ranks[0]["tokens_per_s"], "seconds": ranks[0]["seconds"]}


def planned_mib(model: Path, method: str, nproc: int) -> float:
    from rankdial.memory import estimate_memory

    plan = estimate_memory(model, method=method, rank=R, batch_size=GLOBAL_BATCH // nproc, seq_len=MAX_LENGTH,
                           dtype="fp32", gradient_checkpointing=False, processes=nproc,
                           sharding="fsdp" if nproc > 1 else "ddp")
    return plan.total_bytes / MIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["small", "medium", "large"], default="medium")
    ap.add_argument("--quick", action="store_true", help="a smoke run: a tiny model, 2 steps")
    ap.add_argument("--methods", default=",".join(METHODS))
    for name in ("--model", "--warm", "--data", "--method", "--out", "--report"):
        ap.add_argument(name)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from rankdial.models import default_samples_path

    size = SIZES["quick" if args.quick else args.size]
    results, diffs, ratios = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_fsdp-") as tmp:
        work = Path(tmp)
        model = make_model(work / "model", **size)
        warm = make_model(work / "warm", hidden=64, layers=2, heads=2, ffn=128)
        data = default_samples_path() / "pydoc_qa.jsonl"
        for method in args.methods.split(","):
            one = run_case(model, warm, data, method, 1, size["steps"], work)
            two = run_case(model, warm, data, method, 2, size["steps"], work)
            diffs[method] = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
            ratios[method] = round(two["peak_over_baseline_mib"] / one["peak_over_baseline_mib"], 3)
            results[method] = {
                "peak_over_baseline_mib": {"1": round(one["peak_over_baseline_mib"], 1),
                                           "2": round(two["peak_over_baseline_mib"], 1)},
                "planned_mib": {"1": round(planned_mib(model, method, 1), 1), "2": round(planned_mib(model, method, 2), 1)},
                "peak_rss_mib": {"1": round(one["peak_mib"], 1), "2": round(two["peak_mib"], 1)},
                "baseline_mib": {"1": round(one["baseline_mib"], 1), "2": round(two["baseline_mib"], 1)},
                "raw_peak_ratio_2_vs_1": round(two["peak_mib"] / one["peak_mib"], 3),
                "tokens_per_s": {"1": round(one["tokens_per_s"], 1), "2": round(two["tokens_per_s"], 1)},
                "losses": {"1": one["losses"], "2": two["losses"]},
            }
            print(f"{method}: loss diff {diffs[method]:.2e}; peak over baseline {one['peak_over_baseline_mib']:.0f} -> "
                  f"{two['peak_over_baseline_mib']:.0f} MiB per process (ratio {ratios[method]}); planned "
                  f"{results[method]['planned_mib']['1']:.0f} / {results[method]['planned_mib']['2']:.0f} MiB",
                  file=sys.stderr, flush=True)
    from rankdial.memory import model_shape

    shape = model_shape({"hidden": size["hidden"], "layers": size["layers"], "heads": size["heads"],
                         "kv_heads": size["heads"], "ffn": size["ffn"], "vocab": 4096})
    print(json.dumps({"bench": "fsdp", "size": "quick" if args.quick else args.size, "params": shape.total_params,
                      "global_batch": GLOBAL_BATCH, "max_length": MAX_LENGTH, "steps": size["steps"], "r": R,
                      "backend": "gloo (CPU)", "loss_max_abs_diff": diffs, "peak_ratio_2_vs_1": ratios,
                      "methods": results}))


if __name__ == "__main__":
    main()
