"""LoRA's case, measured: each claim of the LoRA and QLoRA papers as a function that measures it on this run.

Every function returns its figures as a plain dict (JSON-ready); `run_claims` runs them all, and
claims_report.write_report turns them into `rankdial claims`' Markdown report with one PNG per claim.
Nothing here is typed in: counts come from the planner or the models, times and bytes from this machine.
(Hu et al. 2021, arXiv:2106.09685; Dettmers et al. 2023, arXiv:2305.14314.)
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import LoraConfig
from ..lora import inject, lora_layers, merge_and_unload
from ..memory import MIB, estimate_memory, lora_params
from ..models.loading import default_model_path, load_model, pick_device, resolve_model
from .steering import LR_GRIDS, steering
from .synthetic import CLAIMS_TASK, rank_capacity, synthetic_task

GB = 1e9
# What each mode runs: quick is the CI test (a couple of minutes on one core), full is the README's report.
# steer_lrs: each steering method's learning-rate grid, chosen per method on a validation split.
SETTINGS = {
    True: dict(latency_repeats=10, measure=["default"], synthetic_steps=300, ranks=[1, 2, 4, 8, 64],
               steer_ranks=[2, 16], steer_steps=30, n_facts=128, adapters_n=[1, 2, 4, 8, 16, 32],
               steer_lrs={"full": [3e-4, 1e-3], "lora": [2e-3, 6e-3]}),
    False: dict(latency_repeats=40, measure=["default", "big"], synthetic_steps=600, ranks=[1, 2, 3, 4, 6, 8, 16, 64],
                steer_ranks=[1, 8, 64], steer_steps=100, n_facts=512, adapters_n=[1, 2, 4, 8, 16, 32, 64, 128],
                steer_lrs=LR_GRIDS),
}
BIG = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "ffn": 2816, "vocab": 4096}  # as tests/test_memory.py


def parameter_arithmetic(d: int = 4096, r: int = 16) -> dict:
    """LoRA's count on one d×d layer at rank r, and the planner's 70B weights and totals (full, LoRA, QLoRA)."""
    trainable = lora_params(d, d, r)
    plans = {m: estimate_memory("llama-70b", method=m, rank=r, batch_size=1, seq_len=512)
             for m in ("full", "lora", "qlora")}
    return {"d": d, "r": r, "layer_params": d * d, "trainable": trainable, "share_percent": 100 * trainable / (d * d),
            "llama_70b": {m: {"weights_gb": p.weights_bytes / GB, "total_gb": p.total_bytes / GB,
                              "trainable_params": p.trainable_params, "fits_gb": p.fits} for m, p in plans.items()}}


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


def adapters_vs_copies(ns: list[int], rank: int = 16) -> dict:
    """Bytes on disk: one base plus N adapters against N fine-tuned full copies, from files written now."""
    from ..adapters import save_adapter

    base_file = default_model_path() / "model.safetensors"
    model, _ = load_model(resolve_model("default"))
    inject(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "a")
        adapter_bytes = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
    base_bytes = base_file.stat().st_size
    return {"rank": rank, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
            "adapter_share_percent": 100 * adapter_bytes / base_bytes,
            "rows": [{"n": n, "base_plus_adapters": base_bytes + n * adapter_bytes, "full_copies": n * base_bytes}
                     for n in ns]}


def rank_as_capacity(ranks: list[int], steps: int) -> dict:
    """The synthetic task (synthetic.CLAIMS_TASK: true rank 4, d 64, 96 train pairs) learned by LoRA at each rank."""
    return rank_capacity(synthetic_task(**CLAIMS_TASK), ranks, steps=steps)


def steers_not_reeducates(ranks: list[int], steps: int, n_facts: int, log=None, lr_grids: dict | None = None,
                          device: str = "cpu") -> dict:
    """steering.steering on the default model (on `device`); each method's learning rate picked from lr_grids on
    validation."""
    model, tokenizer = load_model(resolve_model("default"), pick_device(device))
    return steering(model, tokenizer, ranks, steps, n_facts=n_facts, log=log, lr_grids=lr_grids)


def run_claims(quick: bool = True, log=print) -> dict:
    """Every claim measured now; {claim: figures}. log(line) reports progress (None: silent)."""
    s = SETTINGS[bool(quick)]
    say = log or (lambda line: None)
    steps = [("parameters", lambda: parameter_arithmetic()),
             ("merge", lambda: merge_latency(repeats=s["latency_repeats"])),
             ("memory", lambda: memory_bill(s["measure"])),
             ("rank", lambda: rank_as_capacity(s["ranks"], s["synthetic_steps"])),
             ("adapters", lambda: adapters_vs_copies(s["adapters_n"])),
             ("steering", lambda: steers_not_reeducates(s["steer_ranks"], s["steer_steps"], s["n_facts"], log,
                                                             s["steer_lrs"]))]
    figures = {"quick": bool(quick), "settings": s, "seconds": {}}
    for name, measure in steps:
        t0 = time.perf_counter()
        say(f"claim {name} ...")
        figures[name] = measure()
        figures["seconds"][name] = round(time.perf_counter() - t0, 1)
    return figures
