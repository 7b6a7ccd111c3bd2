""""LoRA steers, it does not re-educate": LoRA at several ranks against full fine-tuning on two small tasks.

Both tasks are built from the default model's own vocabulary (single-token words, fixed seed), so every
sequence has a fixed length and needs no padding; the loss counts the target tokens only.

- format (a style): three random words, ":", then the same words as "w1 , w2 , w3 ." A skill that
  applies to any words; evaluated on fresh words never seen in training.
- facts (new knowledge): n random pairs "subject is object"; the model must store each arbitrary object.
  Evaluated on the facts themselves: recall is the measure.

The claim (Hu et al. 2021; Biderman et al. 2024, "LoRA Learns Less and Forgets Less", arXiv:2405.09673):
LoRA at low rank matches full fine-tuning on the style task and falls behind on the facts task unless its rank
grows. The report states what this run measured, whichever way it came out.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch

from ..config import LoraConfig
from ..lora import inject

IGNORE = -100


@dataclass
class TokenTask:
    """Fixed-length token sequences with labels (IGNORE outside the target); eval rows may be the train rows."""
    name: str
    train_ids: torch.Tensor  # (n, T)
    train_labels: torch.Tensor
    eval_ids: torch.Tensor
    eval_labels: torch.Tensor


def word_ids(tokenizer, min_len: int = 4) -> list[int]:
    """Ids of the vocabulary's single-token words (a leading-space marker then letters), in id order."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return [i for t, i in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > min_len]


def _labels(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :prompt_len] = IGNORE
    return labels


def format_task(tokenizer, n_train: int = 256, n_eval: int = 64, n_words: int = 3, seed: int = 0) -> TokenTask:
    """w1..wn ":" w1 "," w2 ... "." with fresh words at eval (train and eval draw from disjoint halves)."""
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

    half = len(words) // 2
    train, held = rows(words[:half], n_train), rows(words[half:], n_eval)
    return TokenTask("format", train, _labels(train, n_words + 1), held, _labels(held, n_words + 1))


def facts_task(tokenizer, n_facts: int = 256, seed: int = 0) -> TokenTask:
    """n_facts "subject is object" pairs, distinct subjects, objects drawn at random; eval = the facts."""
    words = word_ids(tokenizer)
    rng = random.Random(seed + 1)
    subjects = rng.sample(words, n_facts)
    objects = [rng.choice(words) for _ in subjects]
    is_id = tokenizer.convert_tokens_to_ids("Ġis")
    ids = torch.tensor([[s, is_id, o] for s, o in zip(subjects, objects)])
    labels = _labels(ids, 2)
    return TokenTask("facts", ids, labels, ids, labels)


def evaluate(model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 128) -> tuple[float, float]:
    """(mean target-token loss in nats, share of target tokens predicted exactly by argmax)."""
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            logits = model(input_ids=ids[i:i + batch]).logits[:, :-1]  # (b, T-1, V) predicts the next token
            target = labels[i:i + batch, 1:]
            mask = target != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
            correct += int((logits[mask].argmax(-1) == target[mask]).sum())
            count += int(mask.sum())
    return total / count, correct / count


def fine_tune(base_model, task: TokenTask, rank: int | None, steps: int, batch: int = 32, lr: float | None = None,
              seed: int = 0) -> dict:
    """Train a copy of base_model on the task: LoRA at `rank` on all linear layers (α = 2r), or full when None.

    AdamW; lr 2e-3 for LoRA and 1e-3 for full fine-tuning unless given (each method's usual range).
    Returns the figures: trainable parameters, eval loss and accuracy before and after, seconds.
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
    before = evaluate(model, task.eval_ids, task.eval_labels)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(task.train_ids), (batch,), generator=g)
        loss = model(input_ids=task.train_ids[rows], labels=task.train_labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = evaluate(model, task.eval_ids, task.eval_labels)
    return {"method": "full" if rank is None else "lora", "rank": rank, "lr": lr, "steps": steps,
            "trainable_params": sum(p.numel() for p in params), "eval_loss_before": before[0],
            "eval_loss": after[0], "eval_accuracy": after[1], "seconds": round(time.perf_counter() - t0, 2)}


def steering(base_model, tokenizer, ranks: list[int], steps: int, n_facts: int = 256, batch: int = 16,
             seed: int = 0, log=None) -> dict:
    """Each task trained at each LoRA rank and fully; figures per run and LoRA's loss gap to full per task."""
    tasks = [format_task(tokenizer, seed=seed), facts_task(tokenizer, n_facts=n_facts, seed=seed)]
    figures = {"ranks": ranks, "steps": steps, "batch": batch, "n_facts": n_facts, "tasks": {}}
    for task in tasks:
        runs = []
        for rank in [*ranks, None]:
            runs.append(fine_tune(base_model, task, rank, steps, batch=batch, seed=seed))
            if log:
                row = runs[-1]
                log(f"  {task.name}: {'full' if rank is None else f'LoRA r={rank}'} eval loss "
                    f"{row['eval_loss']:.3f} accuracy {row['eval_accuracy']:.2f} ({row['seconds']} s)")
        full = runs[-1]
        for row in runs:
            row["loss_over_full"] = row["eval_loss"] / full["eval_loss"] if full["eval_loss"] > 0 else float("inf")
        figures["tasks"][task.name] = runs
    return figures
