"""A rank sweep: the same fine-tuning task (one config, one seed, the same data) trained at several ranks, with the
eval loss plotted against the rank and against the number of trainable parameters.

Only r changes between runs; lora_alpha stays as the config sets it (so the scale α/r falls as r grows, as in
plain LoRA; set use_rslora for α/√r). Every run is a complete `rankdial train` output folder under OUT/r<k>/; the
sweep writes OUT/sweep.json and OUT/sweep.png.

The runs are built in OUT.partial beside OUT, which is swapped in whole when every rank has finished, so an old
sweep at OUT is never lost and never half-replaced. An interrupted or failed sweep keeps OUT.partial: each
finished rank stays there, and the same command with resume=True (`--resume`) continues it, skipping the finished
ranks and resuming the unfinished one from its last checkpoint. A row's figures come from its run's summary.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import MARKER, check_target, swap_in, write_json
from ..config import is_positive_int
from ..errors import ConfigError, TrainingError, TrainingInterrupted
from ..plotting import figure, save

KIND = "rank-sweep"
PARTIAL_KIND = "rank-sweep-partial"  # OUT.partial: a sweep being built (or interrupted)
PLAN = "sweep_plan.json"  # in OUT.partial: the config and ranks it was started with


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # one per rank: r, trainable_params, eval_loss_first, eval_loss, train_loss_last, seconds, run

    def __str__(self) -> str:
        lines = [f"rank sweep in {self.out} (eval loss after training; trainable parameters)",
                 f"  {'r':>5}  {'trainable':>12}  {'eval loss':>10}  {'train loss':>10}"]
        lines += [f"  {row['r']:>5}  {row['trainable_params']:>12,}  {row['eval_loss']:>10.4f}  "
                  f"{row['train_loss_last']:>10.4f}" for row in self.rows]
        return "\n".join(lines + [f"  plot: {self.out / 'sweep.png'}"])


def check_ranks(ranks: Any) -> list[int]:
    """Distinct positive integer ranks, ascending; ConfigError otherwise."""
    if isinstance(ranks, str):
        try:
            ranks = [int(r) for r in ranks.split(",") if r.strip()]
        except ValueError:
            raise ConfigError(f"--ranks {ranks!r}: give comma-separated positive integers, e.g. 1,2,4,8") from None
    if not isinstance(ranks, (list, tuple)) or not ranks or not all(is_positive_int(r) for r in ranks):
        raise ConfigError(f"ranks must be a non-empty list of positive integers, got {ranks!r} (e.g. [1, 2, 4, 8])")
    return sorted(set(ranks))


def partial_folder(out: str | Path) -> Path:
    """Where the sweep for `out` is built, and where an interrupted one keeps its finished ranks."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _row(run: Path, r: int) -> dict:
    """A sweep row from a finished run's summary.json (the figures of the whole run, resumed or not)."""
    summary = json.loads((run / "summary.json").read_text())
    evals = summary["eval_losses"]
    return {"r": r, "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "eval_loss_first": evals[0][1], "eval_loss": evals[-1][1], "train_loss_last": summary["loss_last"],
            "seconds": summary["seconds"], "peak_memory_mb": summary["peak_memory_mb"], "run": run.name}


def _start(work: Path, plan: dict, resume: bool, inputs: list) -> None:
    """Make `work` ready: new, or (resume) an interrupted sweep of the same plan; refuse anything else."""
    check_target(work, PARTIAL_KIND, inputs, what="sweep work folder")
    held = work.is_dir() and any(p.name != MARKER for p in work.iterdir())
    if held and not resume:
        done = sorted(p.name for p in work.iterdir() if (p / "summary.json").is_file())
        raise TrainingError(f"{work} holds an interrupted sweep (finished: {', '.join(done) or 'none'}); pass "
                            f"--resume to continue it, or remove {work} to start over")
    if held:
        try:
            before = json.loads((work / PLAN).read_text())
        except (OSError, ValueError):
            before = None
        if before != plan:
            raise ConfigError(f"--resume: the interrupted sweep in {work} was started with another config or other "
                              f"ranks ({PLAN} differs); resume with the same command, or remove {work}")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / MARKER, {"kind": PARTIAL_KIND, "written_by": "rankdial"})  # filled in place: no files list
    write_json(work / PLAN, plan)


def sweep(config: Any, ranks: Any, out: str | Path, log=None, resume: bool = False, **overrides: Any) -> SweepResult:
    """Train `config` (as rankdial.train.train takes it, with keyword overrides) once per rank; see the module.
    resume=True continues an interrupted sweep of the same config and ranks (its finished ranks are kept)."""
    from ..models import resolve_model
    from ..train import make_config, train

    ranks = check_ranks(ranks)
    cfg = make_config(config, **overrides)
    if cfg.method == "full":
        raise ConfigError("a rank sweep needs method lora or qlora, got method 'full' (full fine-tuning has no "
                          "rank); pass --method lora or --method qlora")
    if not cfg.eval_data and not cfg.eval_fraction:
        raise ConfigError("a rank sweep compares eval losses: give eval_data (--eval-data FILE) or eval_fraction "
                          "(e.g. --eval-fraction 0.1)")
    inputs = [cfg.data, cfg.eval_data or None, resolve_model(cfg.model)]  # a model given by name is protected too
    out, work = Path(out), partial_folder(out)
    check_target(out, KIND, inputs, what="--out folder")  # before any training: the swap at the end must succeed
    plan = {"config": {**cfg.to_dict(), "r": "swept"}, "ranks": ranks}
    _start(work, plan, resume, inputs)
    rows = []
    for r in ranks:
        run = work / f"r{r}"
        if not (run / "summary.json").is_file():
            try:
                train(cfg, r=r, output_dir=str(run), log=log, resume=run.exists())
            except TrainingInterrupted:
                done = [f"r{row['r']}" for row in rows]
                raise TrainingInterrupted(
                    f"the sweep was interrupted (Ctrl-C) in rank {r}; finished ranks ({', '.join(done) or 'none'}) "
                    f"and r{r}'s checkpoints are kept in {work}: run the same command with --resume to continue"
                ) from None
        rows.append(_row(run, r))
    write_json(work / "sweep.json", {**plan, "rows": rows})
    plot_sweep(rows, work / "sweep.png")
    (work / PLAN).unlink()
    swap_in(work, out, KIND, inputs, what="--out folder")
    return SweepResult(out, rows)


def plot_sweep(rows: list[dict], png: Path) -> None:
    """Eval loss against rank (log2 axis) and against trainable parameters, with the loss before training."""
    fig, (by_rank, by_params) = figure(2, width=4.8, height=3.8)
    ranks = [row["r"] for row in rows]
    losses = [row["eval_loss"] for row in rows]
    for ax, xs, label in ((by_rank, ranks, "rank r"), (by_params, [row["trainable_params"] for row in rows],
                                                        "trainable parameters")):
        ax.plot(xs, losses, "o-", label="eval loss after training")
        ax.axhline(rows[0]["eval_loss_first"], color="grey", linestyle=":", label="before training")
        ax.set_xscale("log", base=2 if ax is by_rank else 10)
        ax.set_xlabel(label)
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
    by_rank.legend()
    fig.suptitle("the rank dial: eval loss against capacity")
    save(fig, png)
