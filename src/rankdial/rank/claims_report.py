"""The `rankdial claims` report: claims.run_claims' figures as Markdown, one PNG per claim, and claims.json.

The folder is written beside its target and swapped in whole (atomic_dir, kind "claims-report"), so a report
that fails half way leaves the previous one as it was, and a folder rankdial did not write is never replaced.

A figure that came out NaN or ±Inf (a run that diverged) never loses the report: report.md writes it
"diverged" (claims_text.Diverged), claims.json holds null there and lists it under "not_finite" with its value,
and a plot leaves it out (a plot with nothing finite left says so instead).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..atomic import atomic_dir, write_json, write_text
from ..memory import MIB
from ..plotting import figure, save
from .claims import run_claims

KIND = "claims-report"


def plot_parameters(f: dict, png: Path) -> None:
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


def plot_merge(f: dict, png: Path) -> None:
    fig, ax = figure()
    ax.bar(["base", "LoRA unmerged", "LoRA merged"], [f["base_ms"], f["unmerged_ms"], f["merged_ms"]],
           color=["grey", "tab:orange", "tab:green"])
    ax.set_ylabel(f"median forward latency (ms), 1×{f['seq_len']} tokens")
    ax.set_title(f"merged = unmerged to {f['max_abs_diff_merged_vs_unmerged']:.1e} (max |Δlogit|)")
    save(fig, png)


def plot_memory(f: dict, png: Path) -> None:
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


def plot_rank(f: dict, png: Path) -> None:
    fig, (curves, finals) = figure(2)
    for run in f["runs"]:
        line, = curves.plot(run["steps"], run["eval_loss"], label=f"r={run['rank']} eval")
        curves.plot(run["steps"], run["train_loss"], linestyle=":", color=line.get_color())
    floor = f["task"]["noise_floor"]
    for ax in (curves, finals):
        ax.axhline(floor, color="black", linewidth=0.8, linestyle="--", label="noise floor")
        ax.set_yscale("log")
        ax.set_ylabel("MSE per output")
    curves.set_xlabel("step (dotted: train)")
    curves.legend(fontsize=7)
    ranks = [run["rank"] for run in f["runs"]]
    finals.plot(ranks, [run["final_train"] for run in f["runs"]], "o:", label="train")
    finals.plot(ranks, [run["final_eval"] for run in f["runs"]], "o-", label="eval")
    finals.axvline(f["task"]["true_rank"], color="red", linewidth=0.8, label="true rank k")
    finals.set_xscale("log", base=2)
    finals.set_xlabel("LoRA rank")
    finals.legend()
    t = f["task"]
    fig.suptitle(f"true update of rank {t['true_rank']}, d={t['d']}, {t['n_train']} train pairs")
    save(fig, png)


def plot_adapters(f: dict, png: Path) -> None:
    fig, ax = figure()
    ns = [row["n"] for row in f["rows"]]
    ax.plot(ns, [row["full_copies"] / MIB for row in f["rows"]], "o-", label="N full copies")
    ax.plot(ns, [row["base_plus_adapters"] / MIB for row in f["rows"]], "o-", label="1 base + N adapters")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N fine-tuned variants")
    ax.set_ylabel("MiB on disk")
    ax.set_title(f"default model; adapter r={f['rank']} is {f['adapter_share_percent']:.1f}% of the base")
    ax.legend()
    save(fig, png)


def plot_steering(f: dict, png: Path) -> None:
    fig, axes = figure(2)
    for ax, (name, runs) in zip(axes, f["tasks"].items()):
        lora = [run for run in runs if run["method"] == "lora"]
        full = runs[-1]
        ax.plot([run["rank"] for run in lora], [run["eval_loss"] for run in lora], "o-", label="LoRA")
        for run in lora:
            if math.isnan(run["eval_loss"]):  # diverged (NaN/Inf, made NaN for plotting): said at the top
                ax.annotate(f"r={run['rank']} diverged", (run["rank"], 0.86), xycoords=("data", "axes fraction"),
                            fontsize=7, color="tab:blue")
                continue
            ax.annotate(f"lr {run['lr']:g}", (run["rank"], run["eval_loss"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        gone = math.isnan(full["eval_loss"])
        ax.axhline(full["eval_loss"], color="tab:red",
                   label="full fine-tuning: diverged" if gone else f"full fine-tuning (lr {full['lr']:g})")
        ax.axhline(full["eval_loss_before"], color="grey", linestyle=":", label="before training")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel("eval loss on targets (nats/token)")
        ax.set_title(f"{name} task, {f['steps']} steps, lr chosen on validation", fontsize=9)
        ax.legend()
    save(fig, png)


def _strict_json(x, path: str = "", found: dict | None = None):
    """(x with every NaN/Inf float as None, {dotted path: "nan" | "inf" | "-inf"} of those)."""
    found = {} if found is None else found
    if isinstance(x, dict):
        return {k: _strict_json(v, f"{path}.{k}" if path else str(k), found)[0] for k, v in x.items()}, found
    if isinstance(x, list):
        return [_strict_json(v, f"{path}.{i}", found)[0] for i, v in enumerate(x)], found
    if isinstance(x, float) and not math.isfinite(x):
        found[path] = str(x)
        return None, found
    return x, found


def _plottable(x):
    """x with ±Inf as NaN (matplotlib leaves NaN points out; an infinite one would stretch the axes)."""
    if isinstance(x, dict):
        return {k: _plottable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plottable(v) for v in x]
    return math.nan if isinstance(x, float) and not math.isfinite(x) else x


def _no_plot(name: str, png: Path) -> None:
    """The PNG of a claim whose figures left nothing to draw: it says why."""
    fig, ax = figure()
    ax.axis("off")
    ax.text(0.5, 0.5, f"{name}: the figures diverged (NaN/Inf); nothing to plot", ha="center", va="center")
    save(fig, png)


def _plot(name: str, figures: dict, png: Path) -> None:
    """PLOTS[name] on the claim's figures, NaN/Inf left out; when they leave matplotlib nothing to draw (every
    value of a log axis gone), the PNG says so. A failure on finite figures is a bug and is raised."""
    import matplotlib.pyplot as plt

    if not _strict_json(figures)[1]:  # every figure finite: plot as always
        return PLOTS[name](figures, png)
    clean = _plottable(figures)
    before = set(plt.get_fignums())
    try:
        PLOTS[name](clean, png)
    except (ValueError, OverflowError):  # e.g. "Data cannot be log-scaled because all values are <= 0"
        for number in set(plt.get_fignums()) - before:
            plt.close(number)  # the failed plot's figure, if it did not get as far as save()
        _no_plot(name, png)


PLOTS = {"parameters": plot_parameters, "merge": plot_merge, "memory": plot_memory, "rank": plot_rank,
         "adapters": plot_adapters, "steering": plot_steering}


def write_report(out: str | Path, quick: bool = True, log=print, figures: dict | None = None) -> dict:
    """Measure every claim (unless `figures` are given) and write OUT/report.md, OUT/<claim>.png, OUT/claims.json.

    Raises OutputError (before anything is measured) when OUT is a folder rankdial did not write as a report.
    Returns the figures.
    """
    from ..atomic import check_target
    from .claims_text import markdown

    check_target(out, KIND, what="--out folder")  # fail before minutes of measuring, not after
    figures = run_claims(quick, log) if figures is None else figures
    with atomic_dir(out, KIND, what="--out folder") as tmp:
        for name in PLOTS:
            _plot(name, figures[name], tmp / f"{name}.png")
        strict, not_finite = _strict_json(figures)
        write_json(tmp / "claims.json", {**strict, "not_finite": not_finite} if not_finite else strict)
        command = f"rankdial claims{' --quick' if quick else ''} --out {out}"
        write_text(tmp / "report.md", markdown(figures, command, sys.version.split()[0]))
    return figures
