"""The words of the claims report: each claim's measured figures as a short Markdown section.

Each verdict is computed from the figures (never written in advance), so the report says what this run saw.
"""

from __future__ import annotations

import math

from ..memory import MIB


class Diverged(float):
    """A figure that came out NaN or ±Inf (a run that diverged). It prints as "diverged" whatever the format, any
    arithmetic on it stays Diverged, and every comparison is False (it is a NaN), so no verdict counts it."""

    def __new__(cls, value=math.nan):
        return super().__new__(cls, math.nan)

    def __format__(self, spec: str) -> str:
        return "diverged"

    __str__ = __repr__ = lambda self: "diverged"


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "radd", "rsub", "rmul", "rtruediv",
            "rfloordiv", "rmod", "rpow", "neg", "pos", "abs"):
    setattr(Diverged, f"__{_op}__", lambda self, *other: Diverged())


def shown(x):
    """`x` (figures: dicts, lists, numbers) with every NaN/Inf float as Diverged."""
    if isinstance(x, dict):
        return {k: shown(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shown(v) for v in x]
    return Diverged() if isinstance(x, float) and not math.isfinite(x) else x


def finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def _parameters(f: dict) -> list[str]:
    p = f["llama_70b"]
    rows = [f"| {m} | {v['weights_gb']:.1f} | {v['total_gb']:.1f} | {v['trainable_params']:,} | "
            f"{', '.join(map(str, v['fits_gb'])) or 'none'} |" for m, v in p.items()]
    return [f"A {f['d']}×{f['d']} layer at r = {f['r']} trains r·(d_in + d_out) = **{f['trainable']:,}** of "
            f"{f['layer_params']:,} weights: **{f['share_percent']:.2f}%**.",
            "", "The planner (`rankdial.estimate_memory`) on Llama-70B, batch 1 × 512 tokens, bf16:", "",
            "| method | weights (GB) | planned peak (GB) | trainable | fits on (GB) |", "|---|---|---|---|---|", *rows]


def _merge(f: dict) -> list[str]:
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


def _memory(f: dict) -> list[str]:
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


def _rank(f: dict) -> list[str]:
    t = f["task"]
    rows = [f"| {r['rank']} | {r['final_train']:.4f} | {r['final_eval']:.4f} | "
            f"{r['final_eval'] - r['final_train']:+.4f} |" for r in f["runs"]]
    k = t["true_rank"]
    below = [r for r in f["runs"] if r["rank"] < k]
    at = [r for r in f["runs"] if r["rank"] == k]
    top = max(f["runs"], key=lambda r: r["rank"])
    lines = [f"y = (W₀ + ΔW*)x + noise, rank(ΔW*) = {k}, d = {t['d']}, {t['n_train']} train and {t['n_eval']} eval "
             f"pairs, noise² = {t['noise_floor']:.3f} (the best possible eval loss). MSE per output:", "",
             "| LoRA rank | train loss | eval loss | eval − train |", "|---|---|---|---|", *rows, ""]
    if below and at:
        lines.append(_rank_verdict(below[-1], at[0], top, t["noise_floor"]))
    return lines


def _rank_verdict(below: dict, at: dict, top: dict, floor: float) -> str:
    """What the runs show about rank as capacity, each clause chosen by the figures it states."""
    gone = [r["rank"] for r in (below, at, top) if not finite(r["final_train"], r["final_eval"])]
    if gone:
        return (f"r = {', '.join(map(str, dict.fromkeys(gone)))} diverged, so these runs give no verdict on rank "
                "as capacity.")
    stays = "stays up" if below["final_eval"] > at["final_eval"] else "does not stay up"
    fits = "reaches" if at["final_eval"] < 1.5 * floor else "only gets to"
    parts = [f"Below k the eval loss {stays} (r = {below['rank']}: {below['final_eval']:.3f}, r = k: "
             f"{at['final_eval']:.3f}); at r = k it {fits} {at['final_eval']:.3f} against the floor {floor:.3f}"]
    if top["rank"] > at["rank"]:
        noise = ("falls to {:.3f}, below the floor: it fits the noise" if top["final_train"] < floor
                 else "stays at {:.3f}, not below the floor: it does not fit the noise").format(top["final_train"])
        held = ("rises to" if top["final_eval"] > at["final_eval"] else "does not rise above r = k's, at")
        parts.append(f"at r = {top['rank']} train {noise}, while eval {held} {top['final_eval']:.3f}")
    return "; ".join(parts) + "."


def _steering_verdict(lora: list[dict], full: dict) -> str:
    """Which LoRA ranks reach full fine-tuning's eval loss, said as exactly as the figures allow (a diverged rank
    never reaches it, and is named)."""
    better = [r["rank"] for r in lora if finite(r["eval_loss"]) and r["eval_loss"] <= full["eval_loss"]]
    gone = [str(r["rank"]) for r in lora if not finite(r["eval_loss"])]
    tail = f"; r = {', '.join(gone)} diverged" if gone else ""
    if not better:
        return "no LoRA rank reaches full fine-tuning" + tail
    if better == [r["rank"] for r in lora if r["rank"] >= min(better)]:
        return f"LoRA matches or beats full fine-tuning from r = {min(better)} up" + tail
    return f"LoRA matches or beats full fine-tuning only at r = {', '.join(map(str, better))}" + tail


def _adapters(f: dict) -> list[str]:
    rows = [f"| {r['n']} | {r['base_plus_adapters'] / MIB:.1f} | {r['full_copies'] / MIB:.1f} | "
            f"{r['full_copies'] / r['base_plus_adapters']:.1f}× |" for r in f["rows"]]
    return [f"Default model: base file {f['base_bytes']:,} bytes; one adapter (r = {f['rank']}, every linear layer, "
            f"as saved) {f['adapter_bytes']:,} bytes ({f['adapter_share_percent']:.1f}% of the base).", "",
            "| N | 1 base + N adapters (MiB) | N full copies (MiB) | saved |", "|---|---|---|---|", *rows]


def _lrs(lrs: list[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in lrs)


def _steering(f: dict) -> list[str]:
    g, sizes = f["lr_grids"], f["split_sizes"]
    lines = [f"LoRA (α = 2r, every linear layer) against full fine-tuning, AdamW, {f['steps']} steps of batch "
             f"{f['batch']}, on the default model. *format*: three random words then the same words as a comma "
             "list; validation and eval rows use two disjoint pools of words never seen in training. *facts*: "
             f"{f['n_facts']} random \"subject is object\" pairs, all trained on; recall is measured on "
             f"{sizes['facts']['eval']} of them (eval) and the other {sizes['facts']['val']} pick the learning rate "
             "(validation). Loss on target tokens only.", "",
             f"**Learning rates were tuned, not picked by hand**: each method (full, and LoRA at each rank) was "
             f"trained at every rate of its family's grid (full: {_lrs(g['full'])}; LoRA: {_lrs(g['lora'])}) "
             "and kept the rate with the lowest *validation* loss; the eval figures below are that run's, and "
             "the eval split took no part in the choice.", "",
             "| task | method | trainable | lr (validation loss per rate) | val loss | eval loss before | "
             "eval loss | accuracy | loss / full's |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in f["tasks"].items():
        for r in runs:
            who = "full" if r["method"] == "full" else f"LoRA r={r['rank']}"
            search = ", ".join(f"{x['lr']:g}: {x['val_loss']:.3f}" for x in r["lr_search"])
            edge = " (grid edge)" if r["lr_at_edge"] else ""
            lr = "diverged at every rate" if r.get("diverged") else f"**{r['lr']:g}**{edge}"
            lines.append(f"| {name} | {who} | {r['trainable_params']:,} | {lr} ({search}) | "
                         f"{r['val_loss']:.3f} | {r['eval_loss_before']:.3f} | {r['eval_loss']:.3f} | "
                         f"{r['eval_accuracy']:.2f} | {r['loss_over_full']:.2f} |")
    lines.append("")
    for name, runs in f["tasks"].items():
        lora, full = runs[:-1], runs[-1]
        low, high = lora[0], lora[-1]
        if not finite(full["eval_loss"]):
            lines.append(f"- {name}: full fine-tuning diverged at every rate: LoRA has nothing to be compared with.")
            continue
        ratio = [f"{r['loss_over_full']:.2f}×" if finite(r["loss_over_full"]) else "LoRA diverged" for r in (low, high)]
        if ratio[0] != "LoRA diverged":
            ratio[0] = f"LoRA's eval loss is {ratio[0]} full fine-tuning's"
        lines.append(f"- {name}: at the lowest rank (r = {low['rank']}) {ratio[0]}; at the highest "
                     f"(r = {high['rank']}) {ratio[1]}; {_steering_verdict(lora, full)} (each at its "
                     "validation-chosen rate).")
    edges = [f"{name} {'full' if r['rank'] is None else 'r=' + str(r['rank'])}"
             for name, runs in f["tasks"].items() for r in runs if r["lr_at_edge"]]
    if edges:
        lines.append(f"- Chosen at the edge of its grid (a rate beyond it might do better): {', '.join(edges)}.")
    return lines


SECTIONS = [("parameters", "1. The parameter arithmetic", _parameters),
            ("merge", "2. A merged adapter costs nothing at inference", _merge),
            ("memory", "3. QLoRA's memory against LoRA and full fine-tuning", _memory),
            ("rank", "4. Rank is capacity (a synthetic task of known rank)", _rank),
            ("adapters", "5. One base + N adapters against N full copies", _adapters),
            ("steering", "6. LoRA steers, it does not re-educate?", _steering)]


def markdown(figures: dict, command: str, python: str) -> str:
    """The report: a header naming the command, then one section and one PNG per claim. A NaN/Inf figure is
    written "diverged" and takes no part in a verdict."""
    figures = shown(figures)
    seconds = figures["seconds"]
    lines = ["# LoRA's case, measured", "",
             f"Written by `{command}` (Python {python}, CPU, {sum(seconds.values()):.0f} s). Every figure below was "
             "measured or computed on that run; all of them are in `claims.json`.", ""]
    for key, title, section in SECTIONS:
        lines += [f"## {title}", "", *section(figures[key]), "", f"![{key}]({key}.png)", ""]
    return "\n".join(lines)
