"""Training data: JSONL in three shapes, tokenized with a loss mask, truncated (and counted), optionally packed.

    {"prompt": "...", "completion": "..."}   loss on the completion (+ end-of-text) only
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                                             rendered with the tokenizer's chat template (a plain
                                             "role: content" layout where it has none); loss on the
                                             assistant turns only
    {"text": "..."}                          loss on every token
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")


def chat_roles(tokenizer) -> tuple[str, ...]:
    """The roles a conversation may use: system/user/assistant, and tool where the chat template names it."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return ROLES + ("tool",) if isinstance(template, str) and "tool" in template else ROLES

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss: position t is predicted from tokens before it, so position 0 never does."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Dataset:
    """Tokenized examples plus what happened on the way (for the start-of-run report)."""

    examples: list[Example]
    source: str
    kind: str
    truncated: int = 0
    dropped_no_target: int = 0
    skipped_lines: list[str] = field(default_factory=list)

    def target_tokens(self) -> int:
        return sum(e.n_targets for e in self.examples)

    def describe(self) -> str:
        n_tok = sum(len(e.input_ids) for e in self.examples)
        parts = [f"{self.source}: {len(self.examples)} examples ({self.kind}), {n_tok:,} tokens, "
                 f"{self.target_tokens():,} with loss"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped (no completion token left within max_length)")
        if self.skipped_lines:
            parts.append(f"{len(self.skipped_lines)} bad lines skipped")
        return "; ".join(parts)


def check_data_file(path: str | Path, what: str = "data file") -> Path:
    """`path` as a Path, or DataError naming it when it does not exist or is a directory."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} {path} is a directory, not a file; give a JSONL file with one example per line")
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; give a JSONL file with one example per line")
    return path


def read_jsonl(path: str | Path, skip_bad_lines: bool = False,
               roles: tuple[str, ...] = ROLES) -> tuple[list[tuple[int, dict]], list[str]]:
    """[(line number, record)] of a JSONL file, and the messages for lines skipped as bad."""
    path = check_data_file(path)
    records, skipped = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as err:
            raise DataError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = check_record(record, roles)
        except json.JSONDecodeError as err:
            problem = f"not valid JSON ({err.msg} at column {err.colno})"
        if problem:
            message = f"{path}:{number}: {problem}"
            if not skip_bad_lines:
                raise DataError(message + "; fix the line, or pass --skip-bad-lines to skip bad lines and go on")
            skipped.append(message)
            continue
        records.append((number, record))
    if not records:
        why = f" ({len(skipped)} bad lines skipped)" if skipped else ""
        raise DataError(f"data file {path} has no examples{why}; each line must be a JSON object with "
                        '"prompt"+"completion", "messages" or "text"')
    return records, skipped


def check_record(record, roles: tuple[str, ...] = ROLES) -> str | None:
    """Why a record is not a usable example, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list of {"role", "content"} objects'
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f'messages[{i}] must be an object with string "role" and "content"'
            if m["role"] not in roles:
                return (f'messages[{i}] has role {m["role"]!r}; allowed roles: {", ".join(roles)}'
                        + ("" if "tool" in roles else " (this tokenizer's chat template has no tool role)"))
        if not any(m["role"] == "assistant" for m in msgs):
            return 'no message has role "assistant": nothing to learn from this conversation'
        return None
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                return f'"{key}" is missing or not a string (a prompt/completion line needs both)'
        if not record["completion"]:
            return '"completion" is empty: nothing to learn from this line'
        return None
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            return '"text" must be a non-empty string'
        return None
    return f'no "prompt"/"completion", "messages" or "text" key (keys: {", ".join(map(str, record)) or "none"})'


def record_kind(record: dict) -> str:
    return "chat" if "messages" in record else "prompt/completion" if "prompt" in record else "text"


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    # Llama-style tokenizers put a BOS first; ours (and GPT-2's) does not add one by itself.
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


def _render_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels for a conversation: loss on each assistant message's tokens (and its end marker)."""
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        def render(msgs, gen):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        done = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = render(messages[:i], True) if i else ""
                full = render(messages[:i + 1], False)
                if not head.startswith(done) or not full.startswith(head):
                    raise DataError("the tokenizer's chat template does not render conversations as growing "
                                    "prefixes, so rankdial cannot tell assistant tokens apart; use "
                                    "prompt/completion lines instead")
                prompt_part, answer = head[len(done):], full[len(head):]
                p, a = _encode(tokenizer, prompt_part), _encode(tokenizer, answer)
                ids += p + a
                labels += [IGNORE] * len(p) + a
                done = full
        rest = render(messages, False)[len(done):]
        r = _encode(tokenizer, rest)
        ids += r
        labels += [IGNORE] * len(r)
        return ids, labels
    for m in messages:  # no template: "role: content" lines, loss on assistant content + eos
        head = _encode(tokenizer, f"{m['role']}: ")
        body = _encode(tokenizer, m["content"] + "\n")
        ids += head + body
        labels += [IGNORE] * len(head) + (body if m["role"] == "assistant" else [IGNORE] * len(body))
    eos = _eos(tokenizer)
    return ids + eos, labels + eos


def tokenize_record(tokenizer, record: dict, bos: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record; `bos` is _bos(tokenizer), passed in to probe the tokenizer once."""
    kind = record_kind(record)
    bos = _bos(tokenizer) if bos is None else bos
    if kind == "text":
        ids = bos + _encode(tokenizer, record["text"]) + _eos(tokenizer)
        return ids, [IGNORE] * len(bos) + ids[len(bos):]
    if kind == "prompt/completion":
        p = bos + _encode(tokenizer, record["prompt"])
        c = _encode(tokenizer, record["completion"]) + _eos(tokenizer)
        return p + c, [IGNORE] * len(p) + c
    ids, labels = _render_chat(tokenizer, record["messages"])
    if bos and (not ids or ids[0] != bos[0]):
        ids, labels = bos + ids, [IGNORE] + labels
    return ids, labels


def load_dataset(path: str | Path, tokenizer, max_length: int, skip_bad_lines: bool = False) -> Dataset:
    """Read and tokenize a JSONL file; examples over max_length are truncated from the right and counted."""
    records, skipped = read_jsonl(path, skip_bad_lines, chat_roles(tokenizer))
    kinds = sorted({record_kind(r) for _, r in records})
    data = Dataset([], str(path), "+".join(kinds), skipped_lines=skipped)
    bos = _bos(tokenizer)
    for _, record in records:
        ids, labels = tokenize_record(tokenizer, record, bos)
        if len(ids) > max_length:
            data.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        # The model predicts token t from tokens < t, so a label at position 0 is never used.
        if not any(t != IGNORE for t in labels[1:]):
            data.dropped_no_target += 1
            continue
        data.examples.append(Example(ids, labels))
    if not data.examples:
        raise DataError(f"max_length={max_length} is too small for {path}: no example keeps a single completion "
                        f"token ({data.truncated} of {len(records)} truncated); raise max_length "
                        "(e.g. --max-length 512) or shorten the prompts")
    return data


def split_eval(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out round(fraction * n) examples (at least 1) chosen by seed."""
    n = len(data.examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"eval_fraction={fraction} of {n} examples leaves nothing to train on; lower it")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = Dataset([e for i, e in enumerate(data.examples) if i not in held], data.source, data.kind,
                    data.truncated, data.dropped_no_target, data.skipped_lines)
    evals = Dataset([e for i, e in enumerate(data.examples) if i in held], f"{data.source} (held out)", data.kind)
    return train, evals


def pack(data: Dataset, max_length: int) -> Dataset:
    """Concatenate examples (in order) into rows of exactly max_length tokens; the last row may be shorter.

    Examples are not split across rows' attention boundaries in any special way (the common "naive" packing:
    tokens attend to earlier examples in the same row); labels keep each example's loss mask.
    """
    rows, ids, labels = [], [], []
    for e in data.examples:
        ids += e.input_ids
        labels += e.labels
        while len(ids) >= max_length:
            rows.append(Example(ids[:max_length], labels[:max_length]))
            ids, labels = ids[max_length:], labels[max_length:]
    rows.append(Example(ids, labels))
    rows = [row for row in rows if row.n_targets > 0]  # a row of prompt tokens only would carry no loss at all
    return Dataset(rows, data.source, data.kind + ", packed", data.truncated, data.dropped_no_target,
                   data.skipped_lines)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((labels[:, 1:] != IGNORE).sum())
