"""Chunked cross-entropy against the plain loss: the training peak's logits share at a 32k vocabulary.

A random-weight Llama built from a config (vocab 32000, hidden 256, 2 layers, MLP 688, untied head), LoRA r=16
all-linear, batch 8 x sequence 512, fp32 on CPU, AdamW, 2 steps, each case in a fresh process
(rankdial.memory_measure). Cases: no output head at all (the floor), the plain loss over the whole logits
(transformers' own), and rankdial.train.loss's chunked loss. The logits share of a peak is that peak minus the
floor's; issue 16's target: chunked <= 0.6x plain. The planner's "logits + loss" term is printed beside each.

    OMP_NUM_THREADS=1 python benchmarks/bench_chunked_loss.py            # ~1-2 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/bench_chunked_loss.py --quick    # seq 128

Ends with one JSON line of figures. Last full run (2 shared CPU cores): peak 2238 MiB plain, 504 MiB chunked,
250 MiB floor; logits share 1988 -> 254 MiB (0.128x; planner's term 2000 and 262 MiB); steps 9.3 s -> 6.5 s.
"""

from __future__ import annotations

import argparse
import json
import time

from rankdial.memory import estimate_memory
from rankdial.memory_measure import measure_in_fresh_processes

SHAPE = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 4, "ffn": 688, "vocab": 32000}
MIB = 2 ** 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--chunk", type=int, default=1024)
    args = p.parse_args()
    batch, seq = 8, 128 if args.quick else 512
    print(f"config: {SHAPE}, LoRA r=16 all-linear, batch {batch} x seq {seq}, fp32 CPU AdamW, 2 steps, "
          f"chunk {args.chunk} rows")
    names = {"floor": None, "plain": 0, "chunked": args.chunk}
    cases = [dict(model=SHAPE, method="lora", batch_size=batch, seq_len=seq, loss_chunk=c) for c in names.values()]
    start = time.perf_counter()
    got = dict(zip(names, measure_in_fresh_processes(cases)))
    for name, res in got.items():
        if "error" in res:
            raise SystemExit(f"{name}: {res['error']}")
    floor = got["floor"]["peak"]
    rows = {}
    for name in ("plain", "chunked"):
        plan = estimate_memory(SHAPE, method="lora", batch_size=batch, seq_len=seq, dtype="fp32",
                               gradient_checkpointing=False, loss_chunk=names[name])
        share = got[name]["peak"] - floor
        rows[name] = {"peak_mib": round(got[name]["peak"] / MIB, 1), "logits_share_mib": round(share / MIB, 1),
                      "planned_logits_mib": round(plan.logits / MIB, 1), "planned_peak_mib": round(plan.total_bytes / MIB, 1),
                      "seconds": got[name]["seconds"]}
        print(f"{name:8} peak {rows[name]['peak_mib']:8.1f} MiB  logits share {rows[name]['logits_share_mib']:7.1f} MiB  "
              f"(planned term {rows[name]['planned_logits_mib']:7.1f}, planned peak {rows[name]['planned_peak_mib']:7.1f})  "
              f"{got[name]['seconds']}")
    print(f"floor    peak {floor / MIB:8.1f} MiB (no output head)")
    figures = {"shape": SHAPE, "batch": batch, "seq": seq, "chunk": args.chunk, "floor_peak_mib": round(floor / MIB, 1),
               "cases": rows, "logits_share_ratio": round(rows["chunked"]["logits_share_mib"]
                                                          / rows["plain"]["logits_share_mib"], 4),
               "peak_ratio": round(got["chunked"]["peak"] / got["plain"]["peak"], 4),
               "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
