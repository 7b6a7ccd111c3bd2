"""A rank sweep: the same fine-tuning task (one config, one seed, the same data) trained at several ranks, with the
eval loss plotted against the rank and against the number of trainable parameters.

Only r changes between runs; lora_alpha stays as the config sets it (so the scale α/r falls as r grows, as in
plain LoRA; set use_rslora for α/√r). Every run is a complete `rankdial train` output folder under OUT/r<k>/; the
sweep writes OUT/sweep.json and OUT/sweep.png. OUT is built beside its final path and swapped in when every run
has finished, so an interrupted sweep leaves nothing half-written (and no old sweep is lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, atomic_file, write_json
from ..errors import ConfigError

KIND = "rank-sweep"


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
    if not isinstance(ranks, (list, tuple)) or not ranks or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ConfigError(f"ranks must be a non-empty list of positive integers, got {ranks!r} (e.g. [1, 2, 4, 8])")
    return sorted(set(ranks))


def sweep(config: Any, ranks: Any, out: str | Path, log=None, **overrides: Any) -> SweepResult:
    """Train `config` (as rankdial.train.train takes it, with keyword overrides) once per rank; see the module."""
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
    rows = []
    with atomic_dir(out, kind=KIND, inputs=inputs, what="--out folder") as tmp:
        for r in ranks:
            result = train(cfg, r=r, output_dir=str(tmp / f"r{r}"), log=log)
            rows.append({"r": r, "trainable_params": result.trainable, "total_params": result.total,
                         "eval_loss_first": result.eval_losses[0][1], "eval_loss": result.eval_losses[-1][1],
                         "train_loss_last": result.losses[-1], "seconds": round(result.seconds, 2), "run": f"r{r}"})
        write_json(tmp / "sweep.json", {"config": {**cfg.to_dict(), "r": "swept"}, "ranks": ranks, "rows": rows})
        plot_sweep(rows, tmp / "sweep.png")
    return SweepResult(Path(out), rows)


def plot_sweep(rows: list[dict], png: Path) -> None:
    """Eval loss against rank (log2 axis) and against trainable parameters, with the loss before training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_rank, by_params) = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=100)
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
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
