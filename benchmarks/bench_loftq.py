"""LoftQ's starting point against plain QLoRA's, on the real weights of the default model (kjv-llama-tiny).

For every linear layer that "all-linear" targets, with W its full-precision weight:
    plain QLoRA starts at   deq(NF4(W))                (B = 0)
    LoftQ starts at         deq(Q) + s·BA,  Q = NF4(W − s·BA), alternated loftq_iter times (lora/init.py)
and the figure is the relative Frobenius error ‖W − start‖ / ‖W‖, per layer and over all layers together.
NF4 here is quantize_model's (blocks of 64, double quantization).

    .venv/bin/python benchmarks/bench_loftq.py            # r = 16, loftq_iter 1 and 5 (about a minute)
    .venv/bin/python benchmarks/bench_loftq.py --quick    # r = 16, loftq_iter 1

Ends with one JSON line of figures.

Last run (2 shared CPU cores, r=16, 28 layers): relative error plain QLoRA 0.0923; LoftQ 0.0844 with loftq_iter 1
(0.914x, worst layer 0.927x), 0.0754 with loftq_iter 5 (0.817x, worst layer 0.835x).
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    from rankdial import LoraConfig
    from rankdial.lora.inject import plan_targets
    from rankdial.lora.init import loftq_errors
    from rankdial.models import load_model
    from rankdial.train import default_model_path

    model = load_model(default_model_path(), "cpu")[0]
    targets = plan_targets(model, LoraConfig(r=args.rank, target_modules="all-linear")).targets
    iters = [1] if args.quick else [1, 5]
    out: dict = {"rank": args.rank, "layers": len(targets)}
    print(f"default model, {len(targets)} linear layers, r={args.rank}: relative error ‖W − start‖/‖W‖")
    for it in iters:
        sq = {"qlora": 0.0, "loftq": 0.0, "weight": 0.0}
        worst = 0.0
        for t in targets:
            e = loftq_errors(model.get_submodule(t.path).weight, t.r, it)
            for k in sq:
                sq[k] += e[k] ** 2
            worst = max(worst, e["loftq"] / e["qlora"])
        qlora, loftq = math.sqrt(sq["qlora"] / sq["weight"]), math.sqrt(sq["loftq"] / sq["weight"])
        print(f"  loftq_iter {it}: plain QLoRA {qlora:.5f}, LoftQ {loftq:.5f} ({loftq / qlora:.3f}x; worst layer "
              f"{worst:.3f}x)")
        out[f"qlora_rel_error"] = round(qlora, 6)
        out[f"loftq_rel_error_iter{it}"] = round(loftq, 6)
        out[f"loftq_vs_qlora_iter{it}"] = round(loftq / qlora, 4)
        out[f"loftq_vs_qlora_worst_layer_iter{it}"] = round(worst, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
