"""What a training step is made of: the method's model preparation, the data and its order, the loss (its
computation lives in loss.py), the optimizer and its schedule, and the evaluation loss."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import TrainConfig
from .data import Dataset, collate, count_targets, load_dataset, pack, split_eval
from .loss import token_loss_sum


def prepare_model(model, cfg: TrainConfig, base_path: Path):
    """Apply the method: LoRA adapters (cfg.lora), an NF4 base plus adapters, or every weight trainable.
    Returns the LoraConfig injected, or None for full fine-tuning."""
    from ..lora import inject
    from ..quant import quantize_model

    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    loftq = cfg.lora.init_lora_weights == "loftq"  # LoftQ quantizes its targets itself, from the dense weight
    if cfg.method == "qlora" and not loftq:
        quantize_model(model)  # a no-op for layers load_model_nf4 already quantized
    lora = dataclasses.replace(cfg.lora, task_type="CAUSAL_LM", base_model_name_or_path=str(base_path))
    inject(model, lora)
    if cfg.method == "qlora" and loftq:
        quantize_model(model)  # the layers LoftQ did not target
    return lora


def load_data(cfg: TrainConfig, tokenizer) -> tuple[Dataset, Dataset | None, list[str]]:
    """The training set (packed if asked), the evaluation set (a file, a held-out share, or none), a report."""
    train_data = load_dataset(cfg.data, tokenizer, cfg.max_length, cfg.skip_bad_lines)
    eval_data = None
    if cfg.eval_data:
        eval_data = load_dataset(cfg.eval_data, tokenizer, cfg.max_length, cfg.skip_bad_lines)
    elif cfg.eval_fraction:
        train_data, eval_data = split_eval(train_data, cfg.eval_fraction, cfg.seed)
    if cfg.packing:
        train_data = pack(train_data, cfg.max_length)
    report = [train_data.describe()] + ([eval_data.describe()] if eval_data else [])
    return train_data, eval_data, report + train_data.skipped_lines[:10]


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warmup to lr over warmup_ratio of the steps, then cosine down to min_lr_ratio * lr."""
    warm = int(round(cfg.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(named: dict[str, torch.nn.Parameter], cfg: TrainConfig, total_steps: int):
    """AdamW (no weight decay on 1-D tensors; 8-bit states for optimizer="adamw-8bit") and its warmup + cosine
    schedule."""
    decay = [p for p in named.values() if p.ndim >= 2]
    no_decay = [p for p in named.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "adamw-8bit":
        device = next(iter(named.values())).device if named else torch.device("cpu")
        optimizer = adamw_8bit(groups, cfg.lr, device)
    else:
        try:  # one fused kernel for all parameters (CPU and CUDA, torch >= 2.4): ~3x faster than the loop
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def _bitsandbytes_adamw8bit():
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit


def _torchao_adamw8bit():
    from torchao.optim import AdamW8bit

    return AdamW8bit


# Blockwise 8-bit AdamW (Dettmers et al. 2022, arXiv:2110.02861): each moment stored as one byte per value with
# an fp32 absmax per block of 256 (~2.03 bytes per parameter for both moments, against 8 in fp32). In order of
# preference; the first whose optimizer steps on the run's device is used.
ADAMW_8BIT_BACKENDS = (("bitsandbytes", _bitsandbytes_adamw8bit), ("torchao", _torchao_adamw8bit))


def adamw_8bit(groups: list[dict], lr: float, device: torch.device):
    """The first 8-bit AdamW of ADAMW_8BIT_BACKENDS that takes a step on `device`; ConfigError if none does."""
    import warnings

    failures = []
    for name, load in ADAMW_8BIT_BACKENDS:
        try:
            cls = load()
            probe = torch.nn.Parameter(torch.ones(4096, device=device))  # 8-bit from 4096 values on (bnb's rule)
            probe.grad = torch.ones_like(probe)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls([probe], lr=1e-3).step()
            return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        except Exception as err:  # noqa: BLE001 - an import or a kernel that does not run here: try the next one
            failures.append(f"{name}: {(str(err).splitlines() or [type(err).__name__])[0][:120]}")
    raise ConfigError(f"optimizer='adamw-8bit' has no backend that runs on {device} ({'; '.join(failures)}); "
                      "install bitsandbytes (pip install bitsandbytes) or torchao (pip install torchao), or use "
                      "optimizer='adamw'")


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors an optimizer keeps (moments, 8-bit codes, block scales; not the step count), each
    storage counted once (bitsandbytes shares one 256-entry quantization map among all parameters)."""
    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for name, value in state.items():
            if not torch.is_tensor(value) or name == "step":
                continue
            flatten = getattr(value, "__tensor_flatten__", None)  # torchao keeps codes and scales in a subclass
            for t in [getattr(value, a) for a in flatten()[0]] if flatten else [value]:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


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


@torch.no_grad()
def evaluate(model, data: Dataset, batch_size: int, pad_id: int, device, autocast, loss_chunk: int = 0) -> float:
    """Mean token loss over the whole evaluation set (same on every process)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(data.examples[i:i + batch_size], pad_id).items()}
        total += token_loss_sum(model, batch, autocast, loss_chunk).item()
        count += count_targets(batch["labels"])
    model.train(was_training)
    return total / max(1, count)
