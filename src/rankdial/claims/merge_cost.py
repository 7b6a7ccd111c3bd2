"""Claim 2, a merged adapter costs nothing at inference: the default model's forward latency as the base, with
an unmerged LoRA adapter and merged, and the merged model's logits against the unmerged one's.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from ..config import LoraConfig
from ..lora import inject, lora_layers, merge_and_unload
from ..models.loading import load_model, resolve_model
from ..plotting import figure, save

KEY, TITLE = "merge", "2. A merged adapter costs nothing at inference"


def _interleaved_ms(models: dict, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward latency (ms) of each model, timed in turn within each round (so load drifts hit all alike)."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(input_ids=ids)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(input_ids=ids)
                times[name].append(1000 * (time.perf_counter() - t0))
    return {name: statistics.median(ts) for name, ts in times.items()}


def merge_latency(repeats: int = 20, seq_len: int = 128, rank: int = 16, seed: int = 0) -> dict:
    """Forward latency of the default model: base, with an unmerged LoRA adapter, and merged; outputs compared.

    The adapter's B is drawn at random (not zero) so that it changes the output: merged must equal unmerged,
    and both must differ from the base.
    """
    base, _ = load_model(resolve_model("default"))
    torch.manual_seed(seed)
    ids = torch.randint(0, base.config.vocab_size, (1, seq_len))
    unmerged = copy.deepcopy(base)
    inject(unmerged, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in lora_layers(unmerged):
            for b in layer.lora_B.values():
                b.weight.normal_(std=0.02)
    merged = merge_and_unload(copy.deepcopy(unmerged))
    ms = _interleaved_ms({"base": base, "unmerged": unmerged, "merged": merged}, ids, repeats)
    with torch.no_grad():
        logits = {name: m(input_ids=ids).logits for name, m in (("base", base), ("unmerged", unmerged),
                                                                 ("merged", merged))}
    return {"rank": rank, "seq_len": seq_len, "repeats": repeats, "base_ms": ms["base"],
            "unmerged_ms": ms["unmerged"], "merged_ms": ms["merged"], "merged_over_base": ms["merged"] / ms["base"],
            "unmerged_over_base": ms["unmerged"] / ms["base"],
            "max_abs_diff_merged_vs_unmerged": float((logits["merged"] - logits["unmerged"]).abs().max()),
            "max_abs_diff_adapter_vs_base": float((logits["unmerged"] - logits["base"]).abs().max()),
            "merged_has_lora_layers": any("lora_" in n for n, _ in merged.named_parameters())}


def plot(f: dict, png: Path) -> None:
    fig, ax = figure()
    ax.bar(["base", "LoRA unmerged", "LoRA merged"], [f["base_ms"], f["unmerged_ms"], f["merged_ms"]],
           color=["grey", "tab:orange", "tab:green"])
    ax.set_ylabel(f"median forward latency (ms), 1×{f['seq_len']} tokens")
    ax.set_title(f"merged = unmerged to {f['max_abs_diff_merged_vs_unmerged']:.1e} (max |Δlogit|)")
    save(fig, png)


def section(f: dict) -> list[str]:
    equal = f["max_abs_diff_merged_vs_unmerged"] < 1e-3
    return [f"Default model, one forward of 1 × {f['seq_len']} tokens, median of {f['repeats']} rounds (the three "
            f"timed in turn), LoRA r = {f['rank']} on every linear layer (B drawn at random so the adapter changes "
            "the output):", "",
            "| | latency (ms) | vs base |", "|---|---|---|",
            f"| base | {f['base_ms']:.2f} | 1.00 |",
            f"| LoRA unmerged | {f['unmerged_ms']:.2f} | {f['unmerged_over_base']:.2f} |",
            f"| LoRA merged | {f['merged_ms']:.2f} | {f['merged_over_base']:.2f} |", "",
            f"Merged against unmerged logits: max |Δ| = {f['max_abs_diff_merged_vs_unmerged']:.2e} "
            f"({'equal to fp32 rounding' if equal else 'NOT equal'}); the adapter moved the logits by up to "
            f"{f['max_abs_diff_adapter_vs_base']:.2f}. The merged model holds no LoRA layers: "
            f"{not f['merged_has_lora_layers']}."]
