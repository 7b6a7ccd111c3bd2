"""Sampling: how the next token is drawn from a row of logits, the one sampler of `rankdial generate` and the server.

    temperature < GREEDY_BELOW (1e-5, vLLM's threshold too): greedy, argmax
    otherwise: softmax((logits - max) / temperature), cut to the smallest set of tokens whose probability
               reaches top_p, drawn with the request's own torch.Generator seeded with `seed`

One meaning of a seed: a generator on the model's device, seeded with it (make_generator), draws one
torch.multinomial per token; the same seed, settings and logits give the same tokens in both commands.

A row whose logits hold NaN or +inf (a diverged adapter), or whose draw fails, is marked failed on its own
(`row.failure`, a one-line reason) and gets a placeholder token: a caller serving a batch ends that request
alone and the others go on.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

import torch

from .config import is_positive_int
from .errors import RequestError

log = logging.getLogger("rankdial.sampling")

# Below this a temperature samples greedily. Why: logits / temperature overflows float32 for tiny temperatures
# (1e-45 is a denormal, 1e-300 rounds to 0 and gives 0/0 = NaN), and a distribution that sharp is argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled; every field is checked at construction (RequestError names the field)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not is_positive_int(self.max_tokens):
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            problems.append(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            problems.append(f"top_p must be in (0, 1], got {p!r}")
        stop = self.stop
        if isinstance(stop, str):
            object.__setattr__(self, "stop", (stop,))
        elif isinstance(stop, list):
            object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 8:
            problems.append(f"stop must be at most 8 non-empty strings, got {stop!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63):
            problems.append(f"seed must be an integer in [0, 2**63) or None, got {s!r}")
        if problems:
            raise RequestError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Row:
    """What sample() needs of one row: its params and generator; it sets `failure` when the row cannot be sampled."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None):
        self.params, self.generator, self.failure = params, generator, None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A request's own generator: seeded as asked, or from the OS when no seed is given."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


def end_ids(model, tokenizer) -> set[int]:
    """The token ids that end a completion: the model's generation_config eos ids and the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}


def sample(logits: torch.Tensor, rows: list) -> list[int]:
    """The next token of each row of `logits` (n, vocab); rows[i] has .params, .generator and a settable .failure.

    A row that cannot be sampled gets .failure (its reason) and token 0; the other rows are unaffected."""
    logits = logits.float()
    # one pass: a row's max is NaN if it holds a NaN, +inf if it holds one, -inf if every score is -inf (broken in
    # each case), and its index is the argmax (the first of equal maxima, as argmax's)
    top, greedy = logits.max(-1)  # (n,), (n,)
    broken, greedy = (~torch.isfinite(top)).tolist(), greedy.tolist()
    out = []
    for i, (row, bad) in enumerate(zip(rows, broken)):
        row.failure = None
        if bad:
            row.failure = "the model gave non-finite scores (NaN or inf) for this request's next token; its adapter's " \
                          "weights may have diverged"
            out.append(0)
        elif row.params.greedy:
            out.append(greedy[i])
        else:
            try:
                out.append(_draw(logits[i], row.params, row.generator))
            except Exception as err:  # noqa: BLE001 - one row's failure ends that row alone
                log.error("sampling a row failed", exc_info=err)
                row.failure = f"sampling this request's next token failed ({type(err).__name__})"
                out.append(0)
    return out


def _draw(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    # the max is subtracted first: every scaled score is <= 0 and the top one is exactly 0, so exp() cannot overflow
    # and the sum is at least 1, for any temperature >= GREEDY_BELOW
    probs = torch.softmax((scores - scores.max()) / params.temperature, -1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True  # the top token always: a top_p under float32's smallest number compares as 0 (< nothing)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


__all__ = ["SamplingParams", "Row", "GREEDY_BELOW", "make_generator", "end_ids", "sample"]
