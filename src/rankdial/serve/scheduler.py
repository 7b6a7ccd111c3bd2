"""Continuous batching, the bookkeeping: which requests run at each decode step (plain Python, no torch).

As in nano-vllm's scheduler, this module holds no tensors: the runner owns them, and the engine's step
composes the two (schedule → route and forward the batch → record one token per request → repeat).

- Requests wait in one FIFO queue per adapter (None, the base, is a queue like the others).
- Between decode steps, `schedule()` admits waiting requests while the limits hold, taking the adapters with
  queued work in turn (round-robin; FIFO within one adapter). A request arriving for adapter B behind a flood
  for adapter A waits for at most one admission per other adapter ahead of it in the turn.
- Admission stops at the first request that does not fit, so a large request is never overtaken forever by
  smaller ones behind it.
- A step admits at most max_prefill_tokens of new prompts (but always one request, however long its prompt):
  a burst of requests is prefilled over several steps, so the first of them get their first token after a
  short prefill instead of all waiting for one forward over every prompt, and one prefill's activations stay
  bounded (vLLM's max_num_batched_tokens, without splitting a prompt).
- A request reserves prompt + max_tokens tokens when admitted, so the tokens in flight, Σ(prompt + generated)
  over running requests, can never pass `max_tokens_in_flight`, and no running request is ever preempted.
- Finished and cancelled requests (a client that disconnects is a cancel) leave at once and free their slot
  and their tokens for the next `schedule()`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import is_positive_int
from ..errors import ConfigError, RequestError
from .request import CANCELLED, FINISHED, RUNNING, WAITING, Request  # noqa: F401 - the states: exported here too

@dataclass(frozen=True)
class SchedulerLimits:
    """How much runs at once: rows in the batch, and tokens held in the KV cache (prompt + max_tokens each)."""

    max_batch_size: int = 32
    max_tokens_in_flight: int = 16384
    max_prefill_tokens: int = 2048  # prompt tokens admitted per step (one prompt longer than this runs alone)

    def __post_init__(self) -> None:
        problems = [f"{name} must be a positive integer, got {value!r}"
                    for name, value in (("max_batch_size", self.max_batch_size),
                                        ("max_tokens_in_flight", self.max_tokens_in_flight),
                                        ("max_prefill_tokens", self.max_prefill_tokens))
                    if not is_positive_int(value)]
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class Batch:
    """What one step runs: `requests` in admission order; `new` are those admitted now (they need a prefill)."""

    requests: list[Request] = field(default_factory=list)
    new: list[Request] = field(default_factory=list)


class Scheduler:
    """Admission and release of requests under SchedulerLimits, fair across adapters (see the module docstring)."""

    def __init__(self, limits: SchedulerLimits | None = None):
        self.limits = limits or SchedulerLimits()
        self._queues: dict[str | None, deque[Request]] = {}  # adapter -> its waiting requests, oldest first
        self._turn: deque[str | None] = deque()  # adapters with waiting requests, next to be served first
        self._running: dict[str, Request] = {}  # by id, in admission order
        self._waiting: dict[str, Request] = {}

    # -- what the engine reads --------------------------------------------------------------------
    @property
    def running(self) -> list[Request]:
        return list(self._running.values())

    @property
    def waiting(self) -> list[Request]:
        return list(self._waiting.values())

    @property
    def tokens_in_flight(self) -> int:
        """Σ(prompt + generated) over the running requests."""
        return sum(r.in_flight for r in self._running.values())

    @property
    def reserved_tokens(self) -> int:
        return sum(r.reserved for r in self._running.values())

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    # -- requests in --------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (the engine's record, serve.request.Request); RequestError (nothing queued) if it could
        never run or its id is in use."""
        request_id, adapter = request.id, request.adapter
        prompt_tokens, max_tokens = request.prompt_tokens, request.max_tokens
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"a request id is a non-empty string, got {request_id!r}")
        if request_id in self._waiting or request_id in self._running:
            raise RequestError(f"request id {request_id!r} is already waiting or running; give each request its own id")
        if adapter is not None and not isinstance(adapter, str):
            raise RequestError(f"request {request_id!r}: adapter is a name or None (the base), got {adapter!r}")
        for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens)):
            if not is_positive_int(value):
                raise RequestError(f"request {request_id!r}: {name} must be a positive integer, got {value!r}")
        if prompt_tokens + max_tokens > self.limits.max_tokens_in_flight:
            raise RequestError(
                f"request {request_id!r} needs prompt_tokens + max_tokens = {prompt_tokens} + {max_tokens} = "
                f"{prompt_tokens + max_tokens} tokens, more than this server holds at once "
                f"(max_tokens_in_flight={self.limits.max_tokens_in_flight}); shorten the prompt or lower max_tokens")
        request.state = WAITING
        queue = self._queues.setdefault(adapter, deque())
        if not queue:
            self._turn.append(adapter)
        queue.append(request)
        self._waiting[request_id] = request
        return request

    # -- the step -----------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        """Admit waiting requests while the limits hold (adapters in turn), then return what runs this step."""
        new, prefill = [], 0
        while self._turn and self._fits(self._queues[self._turn[0]][0]) and (
                not new or prefill + self._queues[self._turn[0]][0].prompt_tokens <= self.limits.max_prefill_tokens):
            adapter = self._turn.popleft()
            request = self._queues[adapter].popleft()
            if self._queues[adapter]:
                self._turn.append(adapter)  # served: to the back of the turn
            else:
                del self._queues[adapter]
            del self._waiting[request.id]
            request.state = RUNNING
            self._running[request.id] = request
            new.append(request)
            prefill += request.prompt_tokens
        return Batch(self.running, new)

    def _fits(self, request: Request) -> bool:
        return (len(self._running) < self.limits.max_batch_size
                and self.reserved_tokens + request.reserved <= self.limits.max_tokens_in_flight)

    def record(self, request_id: str, token: int, finished: bool = False) -> Request:
        """A running request's next token (appended to its tokens); it leaves when it reaches max_tokens or
        `finished` (an end-of-sequence token or a stop sequence)."""
        request = self._running.get(request_id)
        if request is None:
            raise RequestError(f"record({request_id!r}): no running request has this id "
                               f"(running: {list(self._running) or 'none'})")
        request.tokens.append(token)
        if finished or request.generated >= request.max_tokens:
            request.state = FINISHED
            del self._running[request_id]
        return request

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request at once (a client disconnect); False if it had already left."""
        if request_id in self._running:
            request = self._running.pop(request_id)
        elif request_id in self._waiting:
            request = self._waiting.pop(request_id)
            queue = self._queues[request.adapter]
            queue.remove(request)
            if not queue:
                self._turn.remove(request.adapter)
                del self._queues[request.adapter]
        else:
            return False
        request.state = CANCELLED
        return True
