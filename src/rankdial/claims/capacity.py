"""Claim 4, rank is capacity, on a task whose answer is known: y = (W₀ + ΔW*)x + noise with rank(ΔW*) = k.

A frozen random map W₀ (d × d) plus a true update ΔW* = U·diag(σ)·Vᵀ of exact rank k (all k singular values
equal, so each direction carries the same share 1/k of the signal). A LoRA layer over W₀ learns ΔW = s·B·A
from n_train noisy pairs. Its capacity is its rank r (Hu et al. 2021, arXiv:2106.09685, §7):

- r < k: the best rank-r update misses k − r of the k directions, so the loss floor is ≈ (k − r)/k + noise²;
- r = k: it can fit ΔW* exactly, so both losses fall to ≈ noise²;
- r ≫ k with little data (n_train a little above d): it can also fit the noise, so train loss falls below noise² while
  eval loss stays above it (over-fitting).

Losses are mean squared errors per output element; ‖ΔW*‖²_F = d, so the signal to learn has variance 1 per
output element and the untrained loss is ≈ 1 + noise². `train_synthetic` calls `on_step(step, train, eval)`
as it goes and stops early when `should_stop()` says so (the playground streams its curve this way).
`rank_as_capacity` is the claim: LoRA at each rank on CLAIMS_TASK; `plot` and `section` draw and word it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..lora.layer import LoraLayer
from ..plotting import figure, save
from .diverged import finite

KEY, TITLE = "rank", "4. Rank is capacity (a synthetic task of known rank)"
# The task of LoRA's case (rank_as_capacity) and of the playground: true rank 4 in d = 64, 96 train pairs
# (a little above d, so a rank far above 4 can fit the noise), noise 0.3 (floor 0.09). Its one home.
CLAIMS_TASK = dict(true_rank=4, d=64, n_train=96, n_eval=512, noise=0.3, seed=0)


@dataclass
class SyntheticTask:
    """One draw of the task: the frozen W₀, the true ΔW*, and train/eval pairs (x: (n, d), y: (n, d))."""
    true_rank: int
    d: int
    noise: float
    seed: int
    W0: torch.Tensor  # (d, d)
    delta: torch.Tensor  # (d, d), rank true_rank
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor

    @property
    def noise_floor(self) -> float:
        """The loss of the true map itself: noise² (what a perfect fit reaches on fresh data)."""
        return self.noise ** 2

    def describe(self) -> dict:
        return {"true_rank": self.true_rank, "d": self.d, "n_train": len(self.x_train), "n_eval": len(self.x_eval),
                "noise": self.noise, "noise_floor": self.noise_floor, "seed": self.seed}


@dataclass
class SyntheticResult:
    """One LoRA run on the task: loss curves, final losses, the learned ΔW and its singular values."""
    rank: int
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    delta: torch.Tensor | None = None  # (d, d), the learned s·B·A
    singular_values: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def final_train(self) -> float:
        return self.train_loss[-1]

    @property
    def final_eval(self) -> float:
        return self.eval_loss[-1]

    def to_dict(self) -> dict:
        """Plain figures (no tensors), ready for JSON."""
        return {"rank": self.rank, "steps": self.steps, "train_loss": self.train_loss, "eval_loss": self.eval_loss,
                "final_train": self.final_train, "final_eval": self.final_eval,
                "singular_values": self.singular_values, "stopped_early": self.stopped_early}


def _check_int(name: str, value, low: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r} ({hint})")
    return value


def synthetic_task(true_rank: int = 4, d: int = 64, n_train: int = 96, n_eval: int = 512, noise: float = 0.3,
                   seed: int = 0) -> SyntheticTask:
    """Draw the task (deterministic for a seed). Raises ConfigError naming any bad argument."""
    d = _check_int("d", d, 2, "the layer width, e.g. 64")
    true_rank = _check_int("true_rank", true_rank, 1, "e.g. 4")
    if true_rank > d:
        raise ConfigError(f"true_rank must be at most d={d}, got {true_rank}; lower it or raise d")
    n_train = _check_int("n_train", n_train, 1, "e.g. 96 (not many more than d, so a high rank can fit the noise)")
    n_eval = _check_int("n_eval", n_eval, 1, "e.g. 512")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise < math.inf:
        raise ConfigError(f"noise must be a finite number >= 0, got {noise!r} (e.g. 0.3)")
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, d, generator=g) / math.sqrt(d)
    U, _ = torch.linalg.qr(torch.randn(d, true_rank, generator=g))  # (d, k) orthonormal columns
    V, _ = torch.linalg.qr(torch.randn(d, true_rank, generator=g))
    delta = U @ V.T * math.sqrt(d / true_rank)  # σ_i = √(d/k): ‖ΔW*‖²_F = d, unit signal variance per output

    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d, generator=g)
        return x, x @ (W0 + delta).T + noise * torch.randn(n, d, generator=g)

    x_train, y_train = pairs(n_train)
    x_eval, y_eval = pairs(n_eval)
    return SyntheticTask(true_rank, d, float(noise), seed, W0, delta, x_train, y_train, x_eval, y_eval)


def lora_over(W0: torch.Tensor, rank: int, alpha: float | None, seed: int) -> LoraLayer:
    """A LoRA layer (adapter "task", active, trainable) over a frozen nn.Linear holding W₀."""
    d_out, d_in = W0.shape
    base = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(W0)
    base.weight.requires_grad_(False)
    layer = LoraLayer(base)
    torch.manual_seed(seed)  # A's Kaiming init: the same seed gives the same start at every call
    layer.add_adapter("task", r=rank, alpha=float(rank if alpha is None else alpha))
    layer.set_active(["task"])
    return layer


def train_synthetic(task: SyntheticTask, rank: int, alpha: float | None = None, steps: int = 400, lr: float = 0.02,
                    seed: int = 0, eval_every: int = 10,
                    on_step: Callable[[int, float, float], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> SyntheticResult:
    """Train LoRA at `rank` on the task's train pairs (full batch, Adam); losses recorded every `eval_every` steps.

    alpha defaults to the rank (scale s = 1 at every rank, so ranks differ in capacity alone). `on_step(step,
    train_loss, eval_loss)` is called at each recorded step; `should_stop()` is asked before each step and ends
    the run early (result.stopped_early). Raises ConfigError for a rank outside 1..d or bad steps/lr.
    """
    _check_training(task, rank, steps, eval_every, lr)
    layer = lora_over(task.W0, rank, alpha, seed)
    result = SyntheticResult(rank=rank)
    record = _recorder(layer, task, result, on_step)
    record(0)
    optimizer = torch.optim.Adam([layer.lora_A["task"].weight, layer.lora_B["task"].weight], lr=lr)
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            result.stopped_early = True
            break
        loss = nn.functional.mse_loss(layer(task.x_train), task.y_train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            record(step)
    with torch.no_grad():
        result.delta = layer.delta_weight("task").detach().clone()
    result.singular_values = [float(s) for s in torch.linalg.svdvals(result.delta)]
    return result


def _check_training(task: SyntheticTask, rank, steps, eval_every, lr) -> None:
    """Raise ConfigError naming the first bad training argument."""
    _check_int("rank", rank, 1, f"1..{task.d}")
    if rank > task.d:
        raise ConfigError(f"rank must be at most min(d_in, d_out) = {task.d}, got {rank}; pick 1..{task.d}")
    _check_int("steps", steps, 1, "e.g. 400")
    _check_int("eval_every", eval_every, 1, "e.g. 10")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr < math.inf:
        raise ConfigError(f"lr must be a positive number, got {lr!r} (e.g. 0.02)")


def _recorder(layer: LoraLayer, task: SyntheticTask, result: SyntheticResult,
              on_step: Callable[[int, float, float], None] | None) -> Callable[[int], None]:
    """record(step): the train and eval losses now, appended to result and handed to on_step."""
    def record(step: int) -> None:
        with torch.no_grad():
            train = float(nn.functional.mse_loss(layer(task.x_train), task.y_train))
            held = float(nn.functional.mse_loss(layer(task.x_eval), task.y_eval))
        result.steps.append(step)
        result.train_loss.append(train)
        result.eval_loss.append(held)
        if on_step is not None:
            on_step(step, train, held)
    return record


def rank_capacity(task: SyntheticTask, ranks: list[int], **train_kwargs) -> dict:
    """train_synthetic at each rank; figures per rank plus the task and the noise floor (for the report)."""
    runs = [train_synthetic(task, r, **train_kwargs) for r in ranks]
    return {"task": task.describe(), "runs": [run.to_dict() for run in runs]}


def rank_as_capacity(ranks: list[int], steps: int) -> dict:
    """The synthetic task (CLAIMS_TASK: true rank 4, d 64, 96 train pairs) learned by LoRA at each rank."""
    return rank_capacity(synthetic_task(**CLAIMS_TASK), ranks, steps=steps)


def plot(f: dict, png: Path) -> None:
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


def section(f: dict) -> list[str]:
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
