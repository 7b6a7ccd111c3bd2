"""The memory planner against measured peaks: CPU, fp32, AdamW, one fresh process per case.

Prints the configuration, one row per case (planned and measured MiB, the error, seconds), the planner's
70B figures, and a final JSON line. Usage: OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--allocator default]
"""

import argparse
import json
import time

from rankdial.memory import estimate_memory
from rankdial.memory_measure import measure_in_fresh_processes

BIG = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "ffn": 2816, "vocab": 4096}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allocator", choices=("live", "default"), default="live")
    args = parser.parse_args()
    cases = [dict(model="default", method=m, batch_size=8, seq_len=128) for m in ("lora", "full", "qlora")]
    cases += [dict(model=BIG, method=m, batch_size=2, seq_len=64) for m in ("lora", "full", "qlora")]
    cases += [dict(model=m, method="full", batch_size=b, seq_len=s, optimizer="adamw-8bit")
              for m, b, s in (("default", 8, 128), (BIG, 2, 64))]
    print(f"config: allocator={args.allocator}, big={BIG}, CPU fp32 AdamW, 2 steps, r=16 all-linear")
    start = time.perf_counter()
    measured = measure_in_fresh_processes([{**c, "allocator": args.allocator} for c in cases])
    rows = []
    for case, got in zip(cases, measured):
        plan = estimate_memory(**case, dtype="fp32", gradient_checkpointing=False)
        row = dict(model=case["model"] if isinstance(case["model"], str) else "big", method=case["method"],
                   optimizer=case.get("optimizer", "adamw"),
                   batch=case["batch_size"], seq=case["seq_len"], planned_mib=round(plan.total_bytes / 2**20, 1),
                   measured_mib=round(got["peak"] / 2**20, 1),
                   error=round((plan.total_bytes - got["peak"]) / got["peak"], 4), seconds=got["seconds"])
        rows.append(row)
        print(f"{row['model']:8} {row['method']:6} {row['optimizer']:10} {row['batch']}x{row['seq']:<4} planned {row['planned_mib']:8.1f} "
              f"MiB  measured {row['measured_mib']:8.1f} MiB  {100 * row['error']:+6.1f}%  {got['seconds']}")
    seventy = {m: estimate_memory("llama-70b", method=m) for m in ("full", "lora", "qlora")}
    for m, plan in seventy.items():
        print(f"llama-70b {m:6} weights {plan.weights_bytes / 1e9:7.1f} GB  peak {plan.total_bytes / 1e9:7.1f} GB  "
              f"fits {plan.fits}  ({plan.settings})")
    print(json.dumps({"cases": rows, "seconds": round(time.perf_counter() - start, 1),
                      "llama_70b_gb": {m: {"weights": round(p.weights_bytes / 1e9, 2), "peak": round(p.total_bytes / 1e9, 2)}
                                       for m, p in seventy.items()}}))


if __name__ == "__main__":
    main()
