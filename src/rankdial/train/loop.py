"""The training loop, written out: load, adapt, then for each step accumulate, clip, step, log, evaluate, save.

Exactness rules that the resume and DDP tests rely on:
- The data order is a pure function of (seed, epoch): epoch e visits the examples in
  random.Random(seed + e)'s shuffle. Step s takes the global samples [s*G, (s+1)*G), G = batch_size *
  grad_accum * world_size, so the data position is just the step number.
- The loss of a step is (sum of token losses over the global batch) / (number of target tokens in the global
  batch), whatever the split into processes and micro-batches; so a 2-process run follows a 1-process run with
  the same global batch.
- A checkpoint holds everything else that changes: trainable tensors, optimizer, scheduler, RNG states.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import LoraConfig
from ..errors import RankdialError, TrainingError
from ..models import default_model_path, load_model, load_model_nf4, pick_device, resolve_model
from . import checkpoint as ckpt_io
from .config import TrainConfig, make_config
from .data import DataError, Dataset, collate, count_targets, load_dataset, pack, split_eval

DONE_MARKER = "summary.json"
CONFIG_NAME = "rankdial_train.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"




@dataclass
class TrainResult:
    output_dir: Path
    method: str
    steps: int
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    trainable: int
    total: int
    seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    resumed_from: int | None = None
    data_report: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)


# ----------------------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def _all_sum(value: float, dist_info: Dist, device) -> float:
    if dist_info.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# ---------------------------------------------------------------------------------------------- the pieces

def prepare_model(model, cfg: TrainConfig, base_path: Path):
    """Apply the method: LoRA adapters, an NF4 base plus adapters, or every weight trainable."""
    from ..lora import inject
    from ..quant import quantize_model

    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    if cfg.method == "qlora":
        quantize_model(model)  # a no-op for layers load_model_nf4 already quantized
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM",
                      base_model_name_or_path=str(base_path))
    inject(model, lcfg)
    return lcfg


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warmup to lr over warmup_ratio of the steps, then cosine down to min_lr_ratio * lr."""
    warm = int(round(cfg.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class Sampler:
    """Global sample g -> example index, epoch by epoch (cached)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def __call__(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_order(self.n, self.seed, epoch)}
        return self._cache[epoch][pos]


def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    """Sum over target tokens of the next-token cross-entropy (fp32)."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    # Shift the labels, not the logits: position t predicts token t+1 and the last position predicts nothing.
    # (Slicing the logits would copy a batch x length x vocab tensor.)
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=-100,
                           reduction="sum")


@torch.no_grad()
def evaluate(model, data: Dataset, batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean token loss over the whole evaluation set (same on every process)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(data.examples[i:i + batch_size], pad_id).items()}
        total += token_loss_sum(model, batch, autocast).item()
        count += count_targets(batch["labels"])
    model.train(was_training)
    return total / max(1, count)


def estimate_memory(model, cfg: TrainConfig, trainable: int) -> dict[str, float]:
    """A rough breakdown in MiB: stored weights, trainable state (grad + 2 AdamW moments), activations."""
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    state = trainable * 4 * 3
    c = model.config
    h, layers = getattr(c, "hidden_size", 0), getattr(c, "num_hidden_layers", 0)
    heads = getattr(c, "num_attention_heads", 1)
    s, b = cfg.max_length, cfg.batch_size
    per_layer = 34 * s * b * h + 5 * heads * s * s * b  # 16-bit bytes per layer (Korthikanti et al. 2022)
    act = (2 * s * b * h * 4 * layers + per_layer * 2) if cfg.gradient_checkpointing else per_layer * 2 * layers
    act += s * b * getattr(c, "vocab_size", 0) * 4 * 2  # logits and their fp32 gradient
    mib = 1 << 20
    return {"weights_mib": weights / mib, "train_state_mib": state / mib, "activations_mib": act / mib,
            "total_mib": (weights + state + act) / mib}


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # VmHWM: this process's own peak (ru_maxrss can carry a parent's peak across fork+exec)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file; choose a folder path")
    if (out / DONE_MARKER).exists() and not overwrite:
        raise TrainingError(f"output_dir {out} already holds a finished run; choose another output_dir, "
                            "or pass --overwrite to replace it")
    if overwrite:
        if any(out.iterdir()) and not (out / CONFIG_NAME).exists():
            raise TrainingError(f"output_dir {out} is a non-empty folder that is not a rankdial run; "
                                "rankdial will not delete it. Choose another output_dir")
        import shutil

        shutil.rmtree(out)
        return
    if ckpt_io.list_checkpoints(out) and not resume:
        raise TrainingError(f"output_dir {out} holds checkpoints of an unfinished run; pass --resume to continue "
                            "it, or choose another output_dir")
    if not resume and any(p.name != "checkpoints" for p in out.iterdir()) and not (out / CONFIG_NAME).exists():
        raise TrainingError(f"output_dir {out} is a non-empty folder that is not a rankdial run; choose "
                            "another output_dir")


# ------------------------------------------------------------------------------------------------ the loop

def train(config: Any = None, *, resume: bool = False, overwrite: bool = False, log=None,
          **overrides: Any) -> TrainResult:
    """Fine-tune a model as `config` says (a TrainConfig, a dict, or a .toml/.yaml path; keyword overrides win).

    Writes output_dir: the PEFT adapter (LoRA/QLoRA) or the full model folder (full), rankdial_train.json,
    metrics.jsonl, loss.png and summary.json (written last: a folder without it is not a finished run).
    """
    cfg = make_config(config, **overrides)
    dist_info = init_distributed(cfg.device)
    if dist_info.world > 1 and torch.cuda.is_available() and cfg.device != "cpu":
        device = torch.device("cuda", dist_info.local_rank)
    else:
        device = pick_device(cfg.device)
    say = (log or print) if dist_info.main else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    if dist_info.main:
        _check_output_dir(out, resume, overwrite)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    for name in ("data", "eval_data"):  # fail fast, before the model loads
        value = getattr(cfg, name)
        if value and not Path(value).is_file():
            raise DataError(f"{name} file {value} does not exist; give a JSONL file with one example per line")
    base_path = resolve_model(cfg.model)
    # QLoRA quantizes while loading, so the full-precision model is never in memory at once.
    model, tokenizer = (load_model_nf4 if cfg.method == "qlora" else load_model)(base_path, device)
    pad_id = tokenizer.pad_token_id
    train_data = load_dataset(cfg.data, tokenizer, cfg.max_length, cfg.skip_bad_lines)
    eval_data = None
    if cfg.eval_data:
        eval_data = load_dataset(cfg.eval_data, tokenizer, cfg.max_length, cfg.skip_bad_lines)
    elif cfg.eval_fraction:
        train_data, eval_data = split_eval(train_data, cfg.eval_fraction, cfg.seed)
    if cfg.packing:
        train_data = pack(train_data, cfg.max_length)
    data_report = [train_data.describe()] + ([eval_data.describe()] if eval_data else [])
    data_report += train_data.skipped_lines[:10]
    for line in data_report:
        say(f"data  {line}")

    lora_cfg = prepare_model(model, cfg, base_path)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    from ..lora import trainable_parameters

    report = trainable_parameters(model)
    say(report.summary())
    mem = estimate_memory(model, cfg, report.trainable)
    say(f"memory estimate (MiB): weights {mem['weights_mib']:.1f} + trainable state {mem['train_state_mib']:.1f} "
        f"+ activations ~{mem['activations_mib']:.1f} = ~{mem['total_mib']:.1f}")

    world = dist_info.world
    global_batch = cfg.batch_size * cfg.grad_accum * world
    n = len(train_data.examples)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * n / global_batch))
    decay = [p for p in named.values() if p.ndim >= 2]
    no_decay = [p for p in named.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    try:  # one fused kernel for all parameters (CPU and CUDA, torch >= 2.4): ~3x faster than the loop
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    start_step, resumed_from = 0, None
    if resume:
        found = ckpt_io.latest_good(out, log=say)
        if found is None:
            say(f"--resume: no usable checkpoint in {out}; starting from step 0")
        else:
            saved = found.state
            if saved.get("global_batch") != global_batch or saved.get("total_steps") != total_steps:
                raise TrainingError(f"checkpoint {found.path} was written with global batch {saved.get('global_batch')} "
                                    f"and {saved.get('total_steps')} steps; this run has {global_batch} and "
                                    f"{total_steps}. Resume with the same config and number of processes")
            try:
                ckpt_io.load_into(found, named, optimizer, scheduler)
            except ValueError as err:
                raise TrainingError(str(err)) from None
            start_step = resumed_from = found.step
            say(f"resumed from {found.path} (step {found.step})")

    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext
    sampler = Sampler(n, cfg.seed)
    target_counts = [e.n_targets for e in train_data.examples]

    metrics_path = out / METRICS_NAME
    losses: list[float] = []
    eval_losses: list[tuple[int, float]] = []
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / CONFIG_NAME, json.dumps({**cfg.to_dict(), "base_model": str(base_path),
                                                      "world_size": world}, indent=2) + "\n")
        kept = []
        if metrics_path.exists() and start_step > 0:  # keep the history up to the step we resume from
            for line in metrics_path.read_text().splitlines():
                rec = json.loads(line)
                if rec["step"] <= start_step:
                    kept.append(line)
                    if "loss" in rec:
                        losses.append(rec["loss"])
                    if "eval_loss" in rec:
                        eval_losses.append((rec["step"], rec["eval_loss"]))
        _write_atomic(metrics_path, "".join(k + "\n" for k in kept))
    if eval_data is not None and start_step == 0:
        e = evaluate(model, eval_data, cfg.batch_size, pad_id, device, autocast)
        eval_losses.append((0, e))
        if dist_info.main:
            _append_metrics(metrics_path, {"step": 0, "eval_loss": e})

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and dist_info.main),
               desc=f"{cfg.method} r={cfg.r}" if cfg.method != "full" else "full", unit="step", file=sys.stderr,
               dynamic_ncols=True, leave=True)
    ddp_model.train()
    tokens_done, t_loop = 0, time.perf_counter()
    for step in range(start_step, total_steps):
        # This process's micro-batches of the global batch, and the global count of target tokens.
        first = step * global_batch
        rows = [sampler(first + i) for i in range(global_batch)]
        micro = []
        for m in range(cfg.grad_accum):
            lo = (m * world + dist_info.rank) * cfg.batch_size
            micro.append(collate([train_data.examples[i] for i in rows[lo:lo + cfg.batch_size]], pad_id))
        targets = sum(target_counts[i] for i in rows)
        step_loss = 0.0
        for m, batch in enumerate(micro):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = m == len(micro) - 1
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                loss_sum = token_loss_sum(ddp_model, batch, autocast)
                # DDP averages gradients over processes; scale so the result is d(sum / targets).
                (loss_sum * (world / targets)).backward()
            step_loss += loss_sum.item()
            tokens_done += int(batch["attention_mask"].sum())
        step_loss = _all_sum(step_loss, dist_info, device) / targets
        if not math.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            good = ckpt_io.latest_good(out, log=say) if dist_info.main else None
            where = (f"the last good checkpoint is {good.path} (step {good.step}); resume from it with --resume "
                     "after lowering lr") if good else "no checkpoint was written before it (set save_every)"
            raise TrainingError(f"the loss became {step_loss} at step {step + 1}; training stopped and no adapter "
                                f"was written for it; {where}")
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        done = step + 1
        elapsed = time.perf_counter() - t_loop
        tps = tokens_done * world / max(elapsed, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)
        record = None
        if dist_info.main and (done % cfg.log_every == 0 or done == total_steps):
            record = {"step": done, "loss": step_loss, "lr": lr_now, "tokens_per_s": round(tps, 1),
                      "elapsed_s": round(elapsed, 3)}
        if eval_data is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            e = evaluate(model, eval_data, cfg.batch_size, pad_id, device, autocast)
            eval_losses.append((done, e))
            record = {**(record or {"step": done}), "eval_loss": e}
            if dist_info.main and cfg.progress:
                bar.write(f"step {done}: eval loss {e:.4f}")
        if record is not None and dist_info.main:
            _append_metrics(metrics_path, record)
        if cfg.save_every and done % cfg.save_every == 0 and done < total_steps and dist_info.main:
            state = {"global_batch": global_batch, "total_steps": total_steps, "samples_seen": done * global_batch,
                     "world_size": world, "seed": cfg.seed}
            adapter_fn = None
            if lora_cfg is not None:
                from ..adapters import save_adapter

                adapter_fn = lambda p: save_adapter(model, p)  # noqa: E731
            ckpt_io.write_checkpoint(out, done, named, optimizer, scheduler, state, adapter_fn)
            ckpt_io.prune(out, cfg.keep_checkpoints)
    bar.close()
    if eval_data is not None and not cfg.eval_every:
        e = evaluate(model, eval_data, cfg.batch_size, pad_id, device, autocast)
        eval_losses.append((total_steps, e))
        if dist_info.main:
            _append_metrics(metrics_path, {"step": total_steps, "eval_loss": e})
    seconds = time.perf_counter() - start_time
    tps = tokens_done * world / max(time.perf_counter() - t_loop, 1e-9)
    result = TrainResult(out, cfg.method, total_steps, losses, eval_losses, report.trainable, report.total, seconds,
                         tps, peak_memory_mb(device), resumed_from, data_report)
    if dist_info.main:
        finish(model, tokenizer, cfg, out, result, base_path, lora_cfg is not None)
        say(summary_text(result))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def finish(model, tokenizer, cfg: TrainConfig, out: Path, result: TrainResult, base_path: Path, is_lora: bool):
    """Write the final artefacts; summary.json goes last and marks the run finished."""
    if is_lora:
        import shutil
        import tempfile

        from ..adapters import save_adapter
        from ..adapters.peft_format import CONFIG_NAME as ADAPTER_CONFIG, WEIGHTS_NAME

        tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
        try:
            save_adapter(model, tmp / "adapter")
            # weights first, then the config: a folder with a config always has its matching weights
            os.replace(tmp / "adapter" / WEIGHTS_NAME, out / WEIGHTS_NAME)
            os.replace(tmp / "adapter" / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        model.config.use_cache = True
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    model_name = "kjv-llama-tiny (default)" if base_path == default_model_path() else base_path.name
    plot_losses(out / METRICS_NAME, out / PLOT_NAME, title=f"{cfg.method} r={cfg.r} on {model_name}"
                if cfg.method != "full" else f"full fine-tuning of {model_name}")
    summary = {"method": result.method, "base_model": str(base_path), "steps": result.steps,
               "loss_first": result.losses[0] if result.losses else None,
               "loss_last": result.losses[-1] if result.losses else None,
               "eval_losses": result.eval_losses, "trainable_params": result.trainable, "total_params": result.total,
               "trainable_percent": round(result.trainable_percent, 4), "seconds": round(result.seconds, 2),
               "tokens_per_second": round(result.tokens_per_second, 1),
               "peak_memory_mb": round(result.peak_memory_mb, 1), "resumed_from_step": result.resumed_from,
               "default_model": base_path == default_model_path()}
    _write_atomic(out / DONE_MARKER, json.dumps(summary, indent=2) + "\n")


def summary_text(r: TrainResult) -> str:
    lines = [f"done: {r.method}, {r.steps} steps in {r.seconds:.1f} s ({r.tokens_per_second:,.0f} tokens/s), "
             f"peak memory {r.peak_memory_mb:.0f} MB"]
    if r.losses:
        lines.append(f"  train loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}")
    if r.eval_losses:
        lines.append(f"  eval loss {r.eval_losses[0][1]:.4f} -> {r.eval_losses[-1][1]:.4f}")
    lines.append(f"  output: {r.output_dir}")
    return "\n".join(lines)


def plot_losses(metrics: Path, png: Path, title: str = "") -> None:
    """Train (and eval) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_pts, eval_pts = [], []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_pts.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            eval_pts.append((rec["step"], rec["eval_loss"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train_pts:
        ax.plot(*zip(*train_pts), label="train", linewidth=1.2)
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o-", label="eval", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
