"""The `rankdial claims` report: every claim measured now (run_claims), then its figures as Markdown, one PNG per
claim, and claims.json (write_report). Each claim's module brings its measurement, its plot and its words.

The folder is written beside its target and swapped in whole (atomic_dir, kind "claims-report"), so a report
that fails half way leaves the previous one as it was, and a folder rankdial did not write is never replaced.

A figure that came out NaN or ±Inf (a run that diverged) never loses the report: report.md writes it
"diverged" (diverged.Diverged), claims.json holds null there and lists it under "not_finite" with its value,
and a plot leaves it out (a plot with nothing finite left says so instead).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ..atomic import atomic_dir, write_json, write_text
from ..plotting import figure, save
from . import adapter_storage, capacity, merge_cost, parameters, steering, training_memory
from .diverged import shown

KIND = "claims-report"
# The claims in the report's order; each module has KEY (its name in the figures), TITLE, plot(f, png), section(f).
CLAIMS = (parameters, merge_cost, training_memory, capacity, adapter_storage, steering)
# What each mode runs: quick is the CI test (a couple of minutes on one core), full is the README's report.
# steer_lrs: each steering method's learning-rate grid, chosen per method on a validation split.
SETTINGS = {
    True: dict(latency_repeats=10, measure=["default"], synthetic_steps=300, ranks=[1, 2, 4, 8, 64],
               steer_ranks=[2, 16], steer_steps=30, n_facts=128, adapters_n=[1, 2, 4, 8, 16, 32],
               steer_lrs={"full": [3e-4, 1e-3], "lora": [2e-3, 6e-3]}),
    False: dict(latency_repeats=40, measure=["default", "big"], synthetic_steps=600, ranks=[1, 2, 3, 4, 6, 8, 16, 64],
                steer_ranks=[1, 8, 64], steer_steps=100, n_facts=512, adapters_n=[1, 2, 4, 8, 16, 32, 64, 128],
                steer_lrs=steering.LR_GRIDS),
}


def run_claims(quick: bool = True, log=print) -> dict:
    """Every claim measured now; {claim: figures}. log(line) reports progress (None: silent)."""
    s = SETTINGS[bool(quick)]
    say = log or (lambda line: None)
    steps = [("parameters", lambda: parameters.parameter_arithmetic()),
             ("merge", lambda: merge_cost.merge_latency(repeats=s["latency_repeats"])),
             ("memory", lambda: training_memory.memory_bill(s["measure"])),
             ("rank", lambda: capacity.rank_as_capacity(s["ranks"], s["synthetic_steps"])),
             ("adapters", lambda: adapter_storage.adapters_vs_copies(s["adapters_n"])),
             ("steering", lambda: steering.steers_not_reeducates(s["steer_ranks"], s["steer_steps"], s["n_facts"],
                                                                 log, s["steer_lrs"]))]
    figures = {"quick": bool(quick), "settings": s, "seconds": {}}
    for name, measure in steps:
        t0 = time.perf_counter()
        say(f"claim {name} ...")
        figures[name] = measure()
        figures["seconds"][name] = round(time.perf_counter() - t0, 1)
    return figures


def markdown(figures: dict, command: str, python: str) -> str:
    """The report: a header naming the command, then one section and one PNG per claim. A NaN/Inf figure is
    written "diverged" and takes no part in a verdict."""
    figures = shown(figures)
    seconds = figures["seconds"]
    lines = ["# LoRA's case, measured", "",
             f"Written by `{command}` (Python {python}, CPU, {sum(seconds.values()):.0f} s). Every figure below was "
             "measured or computed on that run; all of them are in `claims.json`.", ""]
    for claim in CLAIMS:
        key = claim.KEY
        lines += [f"## {claim.TITLE}", "", *claim.section(figures[key]), "", f"![{key}]({key}.png)", ""]
    return "\n".join(lines)


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


PLOTS = {claim.KEY: claim.plot for claim in CLAIMS}


def write_report(out: str | Path, quick: bool = True, log=print, figures: dict | None = None) -> dict:
    """Measure every claim (unless `figures` are given) and write OUT/report.md, OUT/<claim>.png, OUT/claims.json.

    Raises OutputError (before anything is measured) when OUT is a folder rankdial did not write as a report.
    Returns the figures.
    """
    from ..atomic import check_target

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
