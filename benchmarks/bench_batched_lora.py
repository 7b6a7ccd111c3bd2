"""Heterogeneous batching, forward only: 32 rows, each with its own r=16 adapter, in one forward of the base.

On the embedded default model (kjv-llama-tiny, a hidden-256 Llama), compared in one process, interleaved
round by round (ratios are medians of per-round ratios):
  routed    rankdial: route(model, 32 distinct adapters) + one forward (the route() call is timed too)
  base      the base model alone, same batch
  peft      Hugging Face PEFT's mixed-batch forward, model(..., adapter_names=[...]), same 32 adapters' shapes
  swap      one request at a time: set_active(that adapter), forward its row alone (adapters all resident)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py            # ~1 minute on one core
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py --rounds 2 # a smoke run

Ends with one JSON line of figures and ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

ADAPTERS, ROWS, TOKENS, RANK = 32, 32, 32, 16


def rankdial_model(base: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    import rankdial as rd

    model = copy.deepcopy(base)
    for name in names:  # non-zero B, so every adapter changes the output
        rd.inject(model, rd.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear",
                                       init_lora_weights=False), adapter=name)
    return model.eval()


def peft_model(base: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    import peft

    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    return model.eval()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import rankdial as rd
    from rankdial.models import default_model_path, load_model
    from rankdial.serve import clear_route, route

    torch.manual_seed(0)
    base, _ = load_model(default_model_path())
    names = [f"a{i}" for i in range(ADAPTERS)]
    ours, theirs = rankdial_model(base, names), peft_model(base, names)
    ids = torch.randint(3, base.config.vocab_size, (ROWS, TOKENS), generator=torch.Generator().manual_seed(1))
    print(f"config: default model (hidden {base.config.hidden_size}, {base.config.num_hidden_layers} layers), "
          f"{ADAPTERS} adapters r={RANK} all-linear, batch {ROWS} rows x {TOKENS} tokens, forward only, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds")

    def routed():
        route(ours, names)
        return ours(input_ids=ids).logits

    def swap():
        outs = []
        for i, name in enumerate(names):
            rd.set_active(ours, name)
            outs.append(ours(input_ids=ids[i:i + 1]).logits)
        return torch.cat(outs)

    methods = {
        "base": lambda: base(input_ids=ids).logits,
        "routed": routed,
        "peft": lambda: theirs(input_ids=ids, adapter_names=names).logits,
        "swap": lambda: (clear_route(ours), swap())[1],
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    outs = {}
    with torch.inference_mode():
        for m, fn in methods.items():  # warm-up
            outs[m] = fn()
        for _ in range(args.rounds):
            for m, fn in methods.items():
                t, _ = timed(fn)
                times[m].append(t)
    diff = (outs["routed"] - outs["swap"]).abs().max().item()
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    for m in methods:
        print(f"{m:>7}: median {1e3 * statistics.median(times[m]):8.1f} ms per batch")
    print(f"routed vs swap logits: max |diff| {diff:.2e}")
    print(json.dumps({
        "ms_base": round(1e3 * statistics.median(times["base"]), 2),
        "ms_routed_32": round(1e3 * statistics.median(times["routed"]), 2),
        "ms_peft_mixed_32": round(1e3 * statistics.median(times["peft"]), 2),
        "ms_swap_32": round(1e3 * statistics.median(times["swap"]), 2),
        "ratio_routed_vs_base": round(ratio("routed", "base"), 3),
        "ratio_peft_mixed_vs_base": round(ratio("peft", "base"), 3),
        "ratio_swap_vs_base": round(ratio("swap", "base"), 3),
        "speedup_vs_peft_mixed": round(ratio("peft", "routed"), 3),
        "speedup_vs_swap": round(ratio("swap", "routed"), 3),
        "max_abs_diff_routed_vs_swap": diff,
    }))


if __name__ == "__main__":
    main()
