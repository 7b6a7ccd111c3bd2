"""Claim 1, the parameter arithmetic: LoRA trains r·(d_in + d_out) weights of a d_in × d_out layer, and what
that does to the planned memory of Llama-70B under full fine-tuning, LoRA and QLoRA (rankdial.estimate_memory).
"""

from __future__ import annotations

from pathlib import Path

from ..memory import estimate_memory, lora_params
from ..plotting import figure, save

KEY, TITLE = "parameters", "1. The parameter arithmetic"
GB = 1e9


def parameter_arithmetic(d: int = 4096, r: int = 16) -> dict:
    """LoRA's count on one d×d layer at rank r, and the planner's 70B weights and totals (full, LoRA, QLoRA)."""
    trainable = lora_params(d, d, r)
    plans = {m: estimate_memory("llama-70b", method=m, rank=r, batch_size=1, seq_len=512)
             for m in ("full", "lora", "qlora")}
    return {"d": d, "r": r, "layer_params": d * d, "trainable": trainable, "share_percent": 100 * trainable / (d * d),
            "llama_70b": {m: {"weights_gb": p.weights_bytes / GB, "total_gb": p.total_bytes / GB,
                              "trainable_params": p.trainable_params, "fits_gb": p.fits} for m, p in plans.items()}}


def plot(f: dict, png: Path) -> None:
    fig, ax = figure()
    methods = list(f["llama_70b"])
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [f["llama_70b"][m]["weights_gb"] for m in methods], 0.4, label="weights")
    ax.bar([x + 0.2 for x in xs], [f["llama_70b"][m]["total_gb"] for m in methods], 0.4, label="planned peak")
    for gb in (48, 80):
        ax.axhline(gb, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(list(xs), methods)
    ax.set_yscale("log")
    ax.set_ylabel("GB (planned)")
    ax.set_title(f"Llama-70B, r={f['r']}; one {f['d']}² layer trains {f['share_percent']:.2f}%")
    ax.legend()
    save(fig, png)


def section(f: dict) -> list[str]:
    p = f["llama_70b"]
    rows = [f"| {m} | {v['weights_gb']:.1f} | {v['total_gb']:.1f} | {v['trainable_params']:,} | "
            f"{', '.join(map(str, v['fits_gb'])) or 'none'} |" for m, v in p.items()]
    return [f"A {f['d']}×{f['d']} layer at r = {f['r']} trains r·(d_in + d_out) = **{f['trainable']:,}** of "
            f"{f['layer_params']:,} weights: **{f['share_percent']:.2f}%**.",
            "", "The planner (`rankdial.estimate_memory`) on Llama-70B, batch 1 × 512 tokens, bf16:", "",
            "| method | weights (GB) | planned peak (GB) | trainable | fits on (GB) |", "|---|---|---|---|---|", *rows]
