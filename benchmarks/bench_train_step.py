"""One LoRA training step (forward, backward, AdamW step) at r=16 on all linear layers of Llama-shaped models.

Compared in the same process, interleaved round by round: rankdial, Hugging Face PEFT, full fine-tuning, and
the floor (the frozen model's forward + backward to its input activations, with no adapter at all). Ratios
are medians of per-round ratios. Peak memory (max RSS) of each method is measured in its own fresh process.

    .venv/bin/python benchmarks/bench_train_step.py            # ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_train_step.py --quick    # a smoke run

Ends with one JSON line of figures; unsuffixed figures are for the larger model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("rankdial", "peft", "full", "floor")
SIZES = {
    # hidden 256: per-layer overheads dominate; hidden 1024: the matmuls do.
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2048, batch=4, seq=128),
    "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=4096, batch=2, seq=128),
}
RANK = 16


def build_model(size: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SIZES[size].items() if k not in ("batch", "seq")}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=512, tie_word_embeddings=False)).train()


def make_batch(size: str) -> torch.Tensor:
    spec = SIZES[size]
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=g)


def prepare(method: str, base: torch.nn.Module):
    """Return a step() closure that runs one training step of `method` on a copy of `base`."""
    model = copy.deepcopy(base)
    if method == "rankdial":
        import rankdial as rd

        rd.inject(model, rd.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    elif method == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    elif method == "floor":
        model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()

    def step(ids: torch.Tensor) -> float:
        if method == "floor":  # backward to the input activations only
            x = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=x, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def lora_flop_share(base: torch.nn.Module, ids: torch.Tensor) -> float:
    """The adapters' own FLOPs as a share of the floor step's FLOPs (the floor counted by torch).

    Per adapted linear and token: forward 2·r·(d_in + d_out), backward twice that (dL/dA, dL/dB and the
    adapter's share of dL/dx), so 6·N·r·(d_in + d_out) for N tokens.
    """
    from torch.utils.flop_counter import FlopCounterMode

    import rankdial as rd

    step = prepare("floor", base)
    with FlopCounterMode(display=False) as counter:
        step(ids)
    plan = rd.lora.plan_targets(base, rd.LoraConfig(r=RANK, target_modules="all-linear"))
    lora = sum(6 * ids.numel() * t.r * (t.d_in + t.d_out) for t in plan.targets)
    return lora / counter.get_total_flops()


def time_size(size: str, rounds: int, steps: int) -> dict:
    base = build_model(size)
    ids = make_batch(size)
    runners = {m: prepare(m, base) for m in METHODS}
    for m in METHODS:  # warm-up
        runners[m](ids)
    per_round = {m: [] for m in METHODS}
    for _ in range(rounds):
        for m in METHODS:
            start = time.perf_counter()
            for _ in range(steps):
                runners[m](ids)
            per_round[m].append((time.perf_counter() - start) / steps)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))  # noqa: E731
    return {
        "ms": {m: 1000 * statistics.median(per_round[m]) for m in METHODS},
        "speedup_vs_peft": ratio("peft", "rankdial"),
        "speedup_vs_full": ratio("full", "rankdial"),
        "ratio_vs_floor": ratio("rankdial", "floor"),
        "peft_ratio_vs_floor": ratio("peft", "floor"),
        "lora_flop_share": lora_flop_share(base, ids),
    }


def peak_rss_child(method: str, size: str) -> None:
    """Run in a fresh process: build, take 3 steps, print the peak resident set size in MB."""
    base = build_model(size)
    ids = make_batch(size)
    step = prepare(method, base)
    del base  # the copy inside step() is the model; keep one set of weights, as a user's script would
    for _ in range(3):
        step(ids)
    from rankdial.memory import peak_memory_mb

    print(json.dumps({"peak_rss_mb": peak_memory_mb(torch.device("cpu"))}))


def peak_rss(method: str, size: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--peak", method, "--size", size], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--peak", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=SIZES, default="large", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", min(2, os.cpu_count() or 1))))
    if args.peak:
        peak_rss_child(args.peak, args.size)
        return
    import peft
    import transformers

    rounds = {"small": 3 if args.quick else 15, "large": 2 if args.quick else 7}
    steps = {"small": 2, "large": 1}
    print(f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, device cpu, fp32, r={RANK}, alpha={2 * RANK}, all-linear")
    for size, spec in SIZES.items():
        print(f"  {size}: {spec}, rounds={rounds[size]} x {steps[size]} steps")
    from rankdial.quant import kernel_info

    result = {"kernel_info": kernel_info()}  # which NF4 code this machine would run (this benchmark is fp32 LoRA)
    for size in SIZES:
        timing = time_size(size, rounds[size], steps[size])
        print(f"{size}: step ms (median) " + ", ".join(f"{m} {v:.1f}" for m, v in timing["ms"].items()))
        print(f"{size}: speedup vs PEFT {timing['speedup_vs_peft']:.3f}, vs full {timing['speedup_vs_full']:.3f}, "
              f"rankdial/floor {timing['ratio_vs_floor']:.3f}, PEFT/floor {timing['peft_ratio_vs_floor']:.3f}, "
              f"LoRA FLOP share {timing['lora_flop_share']:.4f}")
        suffix = "_small" if size == "small" else ""
        for key in ("speedup_vs_peft", "speedup_vs_full", "ratio_vs_floor", "peft_ratio_vs_floor", "lora_flop_share"):
            result[key + suffix] = round(timing[key], 4)
        for m in METHODS:
            name = "peak_rss_mb" if m == "rankdial" else f"{m}_peak_rss_mb"
            result[name + suffix] = round(peak_rss(m, size), 1)
        print(f"{size}: peak RSS MB " + ", ".join(f"{m} {result[('peak_rss_mb' if m == 'rankdial' else m + '_peak_rss_mb') + suffix]}"
                                                   for m in METHODS))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
