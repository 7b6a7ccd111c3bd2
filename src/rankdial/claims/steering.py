"""Claim 6, "LoRA steers, it does not re-educate": LoRA at several ranks against full fine-tuning on two small
tasks.

Both tasks are built from the default model's own vocabulary (single-token words, fixed seed), so every
sequence has a fixed length and needs no padding; the loss counts the target tokens only.

- format (a style): three random words, ":", then the same words as "w1 , w2 , w3 ." A skill that
  applies to any words. The vocabulary's words are split three ways: training rows use one half, validation
  rows a quarter and eval rows the last quarter, so both held-out splits use words never seen in training.
- facts (new knowledge): n random pairs "subject is object"; the model must store each arbitrary object.
  Recall is the measure, so every fact is trained on; the validation split is a disjoint quarter of the facts
  and the eval split the other three quarters (a held-out fact cannot be recalled by definition).

Learning rates are not picked by hand: each method (full fine-tuning, and LoRA at each rank) is trained at every
rate of its family's grid, and the rate with the lowest VALIDATION loss is kept; the eval figures quoted are that
run's. The eval split never takes part in the choice.

The claim (Hu et al. 2021; Biderman et al. 2024, "LoRA Learns Less and Forgets Less", arXiv:2405.09673):
LoRA at low rank matches full fine-tuning on the style task and falls behind on the facts task unless its rank
grows. The report states what this run measured, whichever way it came out.

`steers_not_reeducates` is the claim on the default model; `plot` and `section` draw and word it.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LoraConfig
from ..errors import ConfigError, DataError
from ..lora import inject
from ..models.loading import load_model, pick_device, resolve_model
from ..plotting import figure, save
from .diverged import finite as all_finite  # select_lr and steering name a local `finite`

KEY, TITLE = "steering", "6. LoRA steers, it does not re-educate?"
IGNORE = -100
# Learning-rate grids per method family, each spanning ~30x around that family's usual rate (AdamW); 4 values each,
# as 3-value grids left the choice on an edge (full 1e-3, LoRA 6e-3) in the committed report.
LR_GRIDS = {"full": [1e-4, 3e-4, 1e-3, 3e-3], "lora": [6e-4, 2e-3, 6e-3, 2e-2]}


@dataclass
class TokenTask:
    """Fixed-length token sequences with labels (IGNORE outside the target).

    val_* picks the learning rate, eval_* is what the report quotes; the two never share a row. For a recall
    task both are (disjoint) subsets of the training rows.
    """
    name: str
    train_ids: torch.Tensor  # (n, T)
    train_labels: torch.Tensor
    eval_ids: torch.Tensor
    eval_labels: torch.Tensor
    val_ids: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None


def word_ids(tokenizer, min_len: int = 4) -> list[int]:
    """Ids of the vocabulary's single-token words (a leading-space marker then letters), in id order."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return [i for t, i in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > min_len]


def _labels(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :prompt_len] = IGNORE
    return labels


def format_task(tokenizer, n_train: int = 256, n_eval: int = 64, n_words: int = 3, seed: int = 0,
                n_val: int | None = None) -> TokenTask:
    """w1..wn ":" w1 "," w2 ... "." with fresh words at validation and eval (disjoint word pools: train half,
    validation quarter, eval quarter). n_val defaults to n_eval."""
    words = word_ids(tokenizer)
    rng = random.Random(seed)
    rng.shuffle(words)
    comma, stop, colon = tokenizer.convert_tokens_to_ids([",", ".", ":"])

    def rows(pool: list[int], n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            w = rng.sample(pool, n_words)
            target = [t for x in w for t in (x, comma)][:-1] + [stop]
            out.append(w + [colon] + target)
        return torch.tensor(out)

    half, quarter = len(words) // 2, len(words) // 4
    train = rows(words[:half], n_train)
    val = rows(words[half:half + quarter], n_eval if n_val is None else n_val)
    held = rows(words[half + quarter:], n_eval)
    p = n_words + 1
    return TokenTask("format", train, _labels(train, p), held, _labels(held, p), val, _labels(val, p))


def facts_task(tokenizer, n_facts: int = 256, seed: int = 0) -> TokenTask:
    """n_facts "subject is object" pairs, distinct subjects, objects drawn at random; all are trained on.

    Recall is measured on the facts themselves: validation = the first quarter, eval = the other three quarters.
    """
    words = word_ids(tokenizer)
    rng = random.Random(seed + 1)
    subjects = rng.sample(words, n_facts)
    objects = [rng.choice(words) for _ in subjects]
    is_id = tokenizer.convert_tokens_to_ids("Ġis")
    ids = torch.tensor([[s, is_id, o] for s, o in zip(subjects, objects)])
    labels = _labels(ids, 2)
    n_val = max(1, n_facts // 4)
    return TokenTask("facts", ids, labels, ids[n_val:], labels[n_val:], ids[:n_val], labels[:n_val])


def evaluate(model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 128) -> tuple[float, float]:
    """(mean target-token loss in nats, share of target tokens predicted exactly by argmax)."""
    total, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            logits = model(input_ids=ids[i:i + batch].to(device)).logits[:, :-1]  # (b, T-1, V): the next token
            target = labels[i:i + batch, 1:].to(device)
            mask = target != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
            correct += int((logits[mask].argmax(-1) == target[mask]).sum())
            count += int(mask.sum())
    return total / count, correct / count


def fine_tune(base_model, task: TokenTask, rank: int | None, steps: int, batch: int = 32, lr: float | None = None,
              seed: int = 0) -> dict:
    """Train a copy of base_model on the task: LoRA at `rank` on all linear layers (α = 2r), or full when None.

    AdamW; lr 2e-3 for LoRA and 1e-3 for full fine-tuning unless given (the middle/top of LR_GRIDS).
    Returns the figures: trainable parameters, eval loss and accuracy before and after, validation loss and
    accuracy after (when the task has a validation split), seconds.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    if rank is None:
        params = [p for p in model.parameters() if p.requires_grad]
        lr = 1e-3 if lr is None else lr
    else:
        inject(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
        lr = 2e-3 if lr is None else lr
    model.eval()  # no dropout in either arm: the comparison is capacity alone
    device = next(model.parameters()).device  # the tasks' tensors live on the CPU
    before = evaluate(model, task.eval_ids, task.eval_labels)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(task.train_ids), (batch,), generator=g)
        loss = model(input_ids=task.train_ids[rows].to(device), labels=task.train_labels[rows].to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = round(time.perf_counter() - t0, 2)
    after = evaluate(model, task.eval_ids, task.eval_labels)
    val = (None, None) if task.val_ids is None else evaluate(model, task.val_ids, task.val_labels)
    return {"method": "full" if rank is None else "lora", "rank": rank, "lr": lr, "steps": steps,
            "trainable_params": sum(p.numel() for p in params), "eval_loss_before": before[0],
            "eval_loss": after[0], "eval_accuracy": after[1], "val_loss": val[0], "val_accuracy": val[1],
            "seconds": seconds}


def select_lr(base_model, task: TokenTask, rank: int | None, steps: int, lrs: list[float], batch: int = 32,
              seed: int = 0) -> dict:
    """Train at each learning rate in `lrs` and keep the run with the lowest validation loss (first on ties).

    A rate whose validation loss is NaN or Inf diverged: it never competes. The eval figures play no part in the
    choice. Returns the kept run's figures plus `lr_grid`, `lr_search` (each rate's validation loss and
    accuracy), `diverged_lrs`, `diverged` (every rate diverged: the figures are the first rate's, shown as
    diverged), `lr_at_edge` (the kept rate is the grid's smallest or largest, when the grid has more than one)
    and `search_seconds` (training time of the whole grid).
    """
    if task.val_ids is None:
        raise DataError(f"task {task.name!r} has no validation split; learning-rate selection needs one "
                         "(build it with format_task or facts_task)")
    if not lrs or not all(isinstance(lr, (int, float)) and 0 < lr < 1 for lr in lrs):
        raise ConfigError(f"the learning-rate grid must be a non-empty list of rates in (0, 1), got {lrs!r} "
                          "(e.g. [6e-4, 2e-3, 6e-3])")
    runs = [fine_tune(base_model, task, rank, steps, batch=batch, lr=lr, seed=seed) for lr in lrs]
    finite = [run for run in runs if math.isfinite(run["val_loss"])]
    best = min(finite, key=lambda run: run["val_loss"]) if finite else runs[0]  # min() over NaN picks at random
    lrs_sorted = sorted(lrs)
    return {**best, "lr_grid": list(lrs),
            "lr_search": [{"lr": run["lr"], "val_loss": run["val_loss"], "val_accuracy": run["val_accuracy"]}
                          for run in runs],
            "diverged_lrs": [run["lr"] for run in runs if run not in finite], "diverged": not finite,
            "lr_at_edge": bool(finite) and len(lrs) > 1 and best["lr"] in (lrs_sorted[0], lrs_sorted[-1]),
            "search_seconds": round(sum(run["seconds"] for run in runs), 2)}


def steering(base_model, tokenizer, ranks: list[int], steps: int, n_facts: int = 256, batch: int = 16,
             seed: int = 0, log=None, lr_grids: dict | None = None) -> dict:
    """Each task trained at each LoRA rank and fully, each method at the learning rate its grid's validation
    loss picks (lr_grids {"full": [...], "lora": [...]}, default LR_GRIDS); figures per method (the kept run)
    and LoRA's eval-loss gap to full per task."""
    grids = {**LR_GRIDS, **(lr_grids or {})}
    tasks = [format_task(tokenizer, seed=seed), facts_task(tokenizer, n_facts=n_facts, seed=seed)]
    figures = {"ranks": ranks, "steps": steps, "batch": batch, "n_facts": n_facts, "lr_grids": grids,
               "selected_on": "validation loss", "split_sizes": {}, "tasks": {}}
    for task in tasks:
        figures["split_sizes"][task.name] = {"train": len(task.train_ids), "val": len(task.val_ids),
                                             "eval": len(task.eval_ids)}
        runs = []
        for rank in [*ranks, None]:
            grid = grids["full" if rank is None else "lora"]
            runs.append(select_lr(base_model, task, rank, steps, grid, batch=batch, seed=seed))
            if log:
                row = runs[-1]
                who = "full" if rank is None else f"LoRA r={rank}"
                log(f"  {task.name}: {who} diverged at every rate ({row['search_seconds']} s for {len(grid)} rates)"
                    if row["diverged"] else
                    f"  {task.name}: {who} lr {row['lr']:g} (by val loss {row['val_loss']:.3f}) eval loss "
                    f"{row['eval_loss']:.3f} accuracy {row['eval_accuracy']:.2f} ({row['search_seconds']} s for "
                    f"{len(grid)} rates)")
        full = runs[-1]
        for row in runs:  # NaN when either run diverged: there is nothing to compare
            finite = math.isfinite(row["eval_loss"]) and math.isfinite(full["eval_loss"])
            row["loss_over_full"] = (float("nan") if not finite else row["eval_loss"] / full["eval_loss"]
                                     if full["eval_loss"] > 0 else float("inf"))
        figures["tasks"][task.name] = runs
    return figures


def steers_not_reeducates(ranks: list[int], steps: int, n_facts: int, log=None, lr_grids: dict | None = None,
                          device: str = "cpu") -> dict:
    """steering on the default model (on `device`); each method's learning rate picked from lr_grids on
    validation."""
    model, tokenizer = load_model(resolve_model("default"), pick_device(device))
    return steering(model, tokenizer, ranks, steps, n_facts=n_facts, log=log, lr_grids=lr_grids)


def plot(f: dict, png: Path) -> None:
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


def _steering_verdict(lora: list[dict], full: dict) -> str:
    """Which LoRA ranks reach full fine-tuning's eval loss, said as exactly as the figures allow (a diverged rank
    never reaches it, and is named)."""
    better = [r["rank"] for r in lora if all_finite(r["eval_loss"]) and r["eval_loss"] <= full["eval_loss"]]
    gone = [str(r["rank"]) for r in lora if not all_finite(r["eval_loss"])]
    tail = f"; r = {', '.join(gone)} diverged" if gone else ""
    if not better:
        return "no LoRA rank reaches full fine-tuning" + tail
    if better == [r["rank"] for r in lora if r["rank"] >= min(better)]:
        return f"LoRA matches or beats full fine-tuning from r = {min(better)} up" + tail
    return f"LoRA matches or beats full fine-tuning only at r = {', '.join(map(str, better))}" + tail


def _lrs(lrs: list[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in lrs)


def section(f: dict) -> list[str]:
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
        if not all_finite(full["eval_loss"]):
            lines.append(f"- {name}: full fine-tuning diverged at every rate: LoRA has nothing to be compared with.")
            continue
        ratio = [f"{r['loss_over_full']:.2f}×" if all_finite(r["loss_over_full"]) else "LoRA diverged"
                 for r in (low, high)]
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
