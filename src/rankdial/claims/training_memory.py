"""Claim 3, QLoRA's memory against LoRA and full fine-tuning: the training peak planned by estimate_memory and
measured on this machine, one fresh process per case (rankdial.memory_measure).
"""

from __future__ import annotations

from pathlib import Path

from ..memory import MIB, estimate_memory
from ..plotting import figure, save
from .diverged import finite

KEY, TITLE = "memory", "3. QLoRA's memory against LoRA and full fine-tuning"
BIG = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "ffn": 2816, "vocab": 4096}  # as tests/test_memory.py


def memory_bill(models: list[str], rank: int = 16) -> dict:
    """Full fine-tuning, LoRA and QLoRA: peak training memory planned (estimate_memory) and measured.

    Measured on CPU in fp32 with AdamW, one fresh process per case (memory_measure); the default model at
    batch 8 × 128 tokens, and a Llama-shaped model with random weights (hidden 1024, 8 layers) at 2 × 64.
    """
    from ..memory_measure import measure_in_fresh_processes

    shapes = {"default": ("default", 8, 128), "big": (BIG, 2, 64)}
    cases = [dict(model=shapes[name][0], method=m, rank=rank, batch_size=shapes[name][1], seq_len=shapes[name][2])
             for name in models for m in ("full", "lora", "qlora")]
    measured = measure_in_fresh_processes(cases)
    rows = []
    for case, got in zip(cases, measured):
        plan = estimate_memory(**case, dtype="fp32", gradient_checkpointing=False)
        name = case["model"] if isinstance(case["model"], str) else "big"
        rows.append({"model": name, "method": case["method"], "batch_size": case["batch_size"],
                     "seq_len": case["seq_len"], "planned_mb": plan.total_bytes / MIB,
                     "planned_weights_mb": plan.weights_bytes / MIB, "trainable_params": plan.trainable_params,
                     "measured_mb": got["peak"] / MIB if "peak" in got else None,
                     "measured_model_mb": got["model"] / MIB if "model" in got else None,
                     "error": got.get("error")})
    return {"rank": rank, "rows": rows}


def plot(f: dict, png: Path) -> None:
    models = sorted({row["model"] for row in f["rows"]}, key=["default", "big"].index)
    fig, axes = figure(len(models))
    for ax, name in zip(axes if len(models) > 1 else [axes], models):
        rows = [row for row in f["rows"] if row["model"] == name]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [row["planned_mb"] for row in rows], 0.4, label="planned")
        ax.bar([x + 0.2 for x in xs], [row["measured_mb"] or 0 for row in rows], 0.4, label="measured")
        ax.set_xticks(list(xs), [row["method"] for row in rows])
        ax.set_ylabel("training peak (MiB)")
        ax.set_title(f"{name}: batch {rows[0]['batch_size']}×{rows[0]['seq_len']}, fp32, AdamW")
        ax.legend()
    save(fig, png)


def section(f: dict) -> list[str]:
    rows = []
    for r in f["rows"]:
        measured = f"{r['measured_mb']:.0f}" if r["measured_mb"] is not None else f"failed: {r['error']}"
        err = ("-" if not r["measured_mb"] else "diverged" if not finite(r["planned_mb"], r["measured_mb"]) else
               f"{100 * (r['planned_mb'] - r['measured_mb']) / r['measured_mb']:+.0f}%")
        rows.append(f"| {r['model']} | {r['method']} | {r['batch_size']}×{r['seq_len']} | {r['trainable_params']:,} | "
                    f"{r['planned_weights_mb']:.0f} | {r['planned_mb']:.0f} | {measured} | {err} |")
    return ["Training peak on this CPU (fp32, AdamW, LoRA r = 16 on every linear layer, QLoRA's base in NF4), "
            "planned by `estimate_memory` and measured in a fresh process per case (VmHWM over a warm baseline); "
            "\"big\" is a Llama-shaped model with random weights (hidden 1024, 8 layers, GQA 16/4).", "",
            "| model | method | batch | trainable | weights planned (MiB) | peak planned (MiB) | peak measured (MiB) "
            "| planned vs measured |", "|---|---|---|---|---|---|---|---|", *rows]
