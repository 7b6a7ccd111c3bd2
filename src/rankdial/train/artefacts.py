"""The files of a run folder: their names, the metrics log, the loss plot and the final adapter or model.

Every write goes through rankdial.atomic: a file is replaced whole or not at all. metrics.jsonl is the one
append-only file (a line per record, each strict JSON: NaN and Infinity are refused).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..adapters.io import ADAPTER_FILES
from ..atomic import MARKER, OwnFiles, atomic_dir, write_text
from ..errors import TrainingError

RUN_KIND = "train-run"  # the marker kind of a run folder
DONE_MARKER = "summary.json"
CONFIG_NAME = "rankdial_train.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


# What a run wrote before markers existed: its config, metrics, plot, summary, checkpoints and adapter files.
LEGACY_RUN_NAMES = {CONFIG_NAME, METRICS_NAME, PLOT_NAME, DONE_MARKER, "checkpoints"} | ADAPTER_FILES


# A run folder written before rankdial's marker: it holds rankdial_train.json and nothing but a run's own
# files (rankdial.atomic.OwnFiles, the rule every kind uses).
is_legacy_run = OwnFiles(CONFIG_NAME, LEGACY_RUN_NAMES)


def append_metrics(path: Path, record: dict) -> None:
    try:
        line = json.dumps(record, allow_nan=False)
    except ValueError:
        raise TrainingError(f"a metric is not a finite number ({record}); metrics.jsonl stays valid JSON, so "
                            "training stops here: lower the learning rate") from None
    with open(path, "a") as f:
        f.write(line + "\n")


def read_history(path: Path, upto: int) -> tuple[list[float], list[tuple[int, float]]]:
    """Keep metrics.jsonl's records up to step `upto` (the step resumed from; 0 empties it); their losses."""
    kept, losses, evals = [], [], []
    if path.exists() and upto > 0:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] <= upto:
                kept.append(line)
                if "loss" in rec:
                    losses.append(rec["loss"])
                if "eval_loss" in rec:
                    evals.append((rec["step"], rec["eval_loss"]))
    write_text(path, "".join(k + "\n" for k in kept))
    return losses, evals


def save_final_model(model, tokenizer, work: Path, is_lora: bool, state_dict: dict | None = None) -> None:
    """The PEFT adapter files (LoRA, QLoRA) or the full model and tokenizer, at the top of the run folder.

    They are written into a new subfolder (atomically), then each file is renamed up into place: weights
    first, then configs, so a folder with a config always holds its matching weights. `state_dict` (a full
    model only) gives the tensors to write instead of the model's own (an FSDP run gathers them).
    """
    staging = work / ".final"
    if is_lora:
        from ..adapters import save_adapter

        save_adapter(model, staging)
    else:
        with atomic_dir(staging, kind="train-final-model") as tmp:
            model.config.use_cache = True
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    files = sorted((p for p in staging.iterdir() if p.name != MARKER), key=lambda p: not p.name.endswith(".safetensors"))
    for p in files:
        os.replace(p, work / p.name)
    shutil.rmtree(staging)


def plot_losses(metrics: Path, png: Path, title: str = "") -> None:
    """Train (and eval) loss against step, as a PNG."""
    from ..plotting import figure, save

    train_pts, eval_pts = [], []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_pts.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            eval_pts.append((rec["step"], rec["eval_loss"]))
    fig, ax = figure(width=6.4, height=4.0)
    if train_pts:
        ax.plot(*zip(*train_pts), label="train", linewidth=1.2)
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o-", label="eval", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, png)
