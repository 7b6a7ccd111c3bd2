"""The serving engine: one base model, many LoRA adapters, requests batched continuously on a background thread.

The step, as in nano-vllm:

    arrivals (adapter loaded? queue it : load it off-thread, park the request) -> scheduler.schedule()
    -> runner.step(batch): one routed forward, each row with its own adapter -> one token per request
    -> detokenize, check EOS / stop sequences / max_tokens -> finished and cancelled requests leave

Submitting is synchronous for everything a client can get wrong (RequestError, AdapterError for an unknown
adapter), so a server answers 4xx before anything is queued. Results come back through a Handle: blocking
events() for threads, aevents() for asyncio. A client that goes away cancels, and its slot frees at the next step.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
from collections import deque

from ..errors import NOT_UTF8, AdapterError, AdapterFileError, ConfigError, RankdialError, RequestError, \
    Unavailable, not_utf8
from .detokenizer import Detokenizer, TextStream  # noqa: F401 - Detokenizer: exported
from .handle import Completion, Handle, TokenEvent
from .registry import AdapterRegistry, BudgetFull
from ..sampling import SamplingParams, end_ids, make_generator
from .runner import Runner, Sequence
from .scheduler import Scheduler, SchedulerLimits
from ..config import is_positive_int

log = logging.getLogger("rankdial.serve")


class _Live:
    """A request the engine holds: its sequence, its handle, and its text (what of it has been sent)."""

    def __init__(self, seq: Sequence, handle: Handle):
        self.seq, self.handle = seq, handle
        self.text = TextStream(seq.params.stop)  # its completion as text, stop sequences held back
        self.queued = False  # in the scheduler, holding its adapter (registry.acquire)
        self.done = False


class Checked:
    """A request Engine.check() accepted, ready for Engine.enqueue() (nothing of it is queued yet)."""

    def __init__(self, ids: list[int], adapter: str | None, params: SamplingParams):
        self.ids, self.adapter, self.params = ids, adapter, params


_BUDGET_RETRY_S = 0.1  # a load that found the budget full is retried when a release frees room, or this often


class Engine:
    """Continuous batching over one base model and an AdapterRegistry (see the module docstring)."""

    def __init__(self, model, tokenizer, registry: AdapterRegistry, *, base_name: str = "base",
                 limits: SchedulerLimits | None = None, max_prompt_tokens: int | None = None,
                 max_new_tokens: int = 512, budget_wait_s: float = 30.0, compile: bool = False, log=None):
        self.tokenizer, self.registry, self.base_name = tokenizer, registry, base_name
        self.model = model
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        bad = [f"{k} must be a positive integer, got {v!r}" for k, v in (("max_new_tokens", max_new_tokens),
               ("max_prompt_tokens", max_prompt_tokens)) if v is not None and not is_positive_int(v)]
        if bad:
            raise ConfigError("; ".join(bad))
        self.max_new_tokens = max_new_tokens
        self.budget_wait_s = budget_wait_s  # how long a request waits for room in a full adapter budget
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.scheduler = Scheduler(limits)
        sched = self.scheduler.limits  # the KV cache holds max_batch_size rows of at most this many tokens:
        # a prompt leaves room for one new token within the context and the tokens in flight
        self.max_prompt_tokens = max(1, min(max_prompt_tokens or self.context - 1, sched.max_tokens_in_flight - 1))
        row_tokens = min(self.context, sched.max_tokens_in_flight, self.max_prompt_tokens + max_new_tokens)
        # every request holds at least 2 tokens (a prompt token and one to generate), so no more than
        # tokens_in_flight // 2 rows ever run at once: slots past that would be cache that is never used
        slots = min(sched.max_batch_size, max(1, sched.max_tokens_in_flight // 2))
        self.runner = Runner(model, pad if pad is not None else 0, slots=slots, row_tokens=row_tokens)
        # compile: the runner's decode step through torch.compile, compiled and warmed up here, before any request
        # (a failure: one line through log, then eager); compile_seconds is what the warm-up took
        self.compile_seconds = self.runner.enable_compile(log) if compile else None
        self.eos_ids = end_ids(model, tokenizer)
        self._ids = itertools.count()
        self._inbox: deque[_Live] = deque()
        self._cancels: deque[str] = deque()
        self._live: dict[str, _Live] = {}
        self._parked: dict[str, list[_Live]] = {}  # adapter being loaded -> its requests (engine thread only)
        self._n_parked = 0  # len of all of _parked, for stats() from other threads
        self._loads: dict = {}  # adapter -> Future of its load
        self._budget_wait: dict[str, list] = {}  # adapter -> [when its wait for budget room ends, tried when idle]
        self._budget_retry: dict[str, tuple] = {}  # adapter -> (registry.freed when it failed, when to retry anyway)
        self._submit_lock = threading.Lock()  # the _stopping check and the enqueue are one step (shutdown's race)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopping = self._closed = False
        self.steps = self.last_batch_size = self.largest_batch = self.tokens_generated = 0

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base: str = "default", adapters_dir: str | None = None, *, qlora: bool = False,
                        device: str | None = None, budget_bytes: int | None = None, freeze_gc: bool = False,
                        compile: bool = False, log=None, **limits) -> "Engine":
        """Load the base once (NF4 with qlora) and serve the adapter folders under adapters_dir.

        limits: max_batch_size, max_tokens_in_flight (SchedulerLimits), max_prompt_tokens, max_new_tokens,
        budget_wait_s (how long a request waits for room in a full adapter budget before a 503-style error).
        freeze_gc: for a server process: once the base is loaded, collect and gc.freeze() every object alive
        (the model's hundreds of thousands of Python objects), so the cyclic collector's full passes, which
        adapter loads and decode steps trigger, no longer walk them (a full pass over ~430k objects took ~0.5 s;
        amortised, ~4.6 -> ~0.4 ms per adapter load). Process-wide: cycles among the frozen objects are never
        collected, so leave it off in a process that builds and drops many engines (tests).
        compile: the decode step through torch.compile (Runner.enable_compile), warmed up before this returns;
        a failure is one line through log (default: stderr) and the engine decodes eagerly.
        """
        from ..models import load_model, load_model_nf4, pick_device, resolve_model
        from ..models.loading import DEFAULT_MODEL_NAME

        path = resolve_model(base)
        model, tokenizer = (load_model_nf4 if qlora else load_model)(path, pick_device(device or "auto"))
        sched = {k: limits.pop(k) for k in ("max_batch_size", "max_tokens_in_flight") if k in limits}
        limits = {k: v for k, v in limits.items() if v is not None}  # None: the default
        unknown = sorted(set(limits) - {"max_prompt_tokens", "max_new_tokens", "budget_wait_s"})
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; use max_batch_size, max_tokens_in_flight, "
                              "max_prompt_tokens, max_new_tokens or budget_wait_s")
        registry = AdapterRegistry(model, adapters_dir, budget_bytes=budget_bytes)
        if freeze_gc:
            gc.collect()
            gc.freeze()
        name = DEFAULT_MODEL_NAME if str(base) == "default" else path.name
        return cls(model, tokenizer, registry, base_name=name, limits=SchedulerLimits(**sched), compile=compile,
                   log=log, **limits)

    # -- requests in --------------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], adapter: str | None = None,
               params: SamplingParams = SamplingParams()) -> Handle:
        """Check the request (RequestError / AdapterError, nothing queued) and queue it; its Handle."""
        return self.enqueue(self.check(prompt, adapter, params))

    def check(self, prompt: str | list[int], adapter: str | None = None,
              params: SamplingParams = SamplingParams()) -> Checked:
        """Everything submit() checks (RequestError / AdapterError / Unavailable), without queueing: a server checks a
        request before it loads the request's adapter (prepare_async), then enqueue()s it."""
        if self._stopping:
            raise Unavailable("the engine is shutting down and takes no new requests; retry on another replica")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.max_tokens > self.max_new_tokens:
            raise _bad("max_tokens", f"max_tokens is {params.max_tokens}, more than this server's limit of "
                               f"{self.max_new_tokens}; ask for fewer tokens")
        adapter = None if adapter in (None, self.base_name) else self.registry.check_known(adapter)
        ids = self._tokens(prompt)
        total = len(ids) + params.max_tokens
        if total > min(self.context, self.scheduler.limits.max_tokens_in_flight):
            raise _bad("max_tokens", f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) is {total} "
                               f"tokens, more than this model serves ({min(self.context, self.scheduler.limits.max_tokens_in_flight)}); "
                               "shorten the prompt or lower max_tokens")
        return Checked(ids, adapter, params)

    def enqueue(self, checked: Checked) -> Handle:
        """Queue a request check() accepted; its Handle. Unavailable once shutdown() has begun."""
        request_id = f"req-{next(self._ids)}"
        handle = Handle(request_id, self)
        seq = Sequence(request_id, checked.adapter, checked.ids, checked.params,
                       make_generator(checked.params.seed, self.runner.device))
        with self._submit_lock:  # shutdown() sets _stopping under this lock: no request slips in after its count
            if self._stopping:
                raise Unavailable("the engine is shutting down and takes no new requests; retry on another replica")
            self._inbox.append(_Live(seq, handle))
        self.start()
        self._wake.set()
        return handle

    async def prepare_async(self, adapter: str | None, timeout: float = 10.0) -> None:
        """Load a request's adapter (if it is not loaded) before the request is answered, waiting up to `timeout` s
        on the event loop, so that an adapter that cannot load is refused before a stream has started:
        AdapterFileError with the folder's one-line reason. For a request check() accepted (its adapter is known:
        not looked up again). Returns quietly when it loaded, when the load takes longer than `timeout` (the
        request then waits in the engine) or when the budget is full (the engine waits for room, budget_wait_s)."""
        if adapter is None or adapter == self.base_name or self.registry.is_loaded(adapter):
            return
        future = await asyncio.to_thread(self.registry.load_async, adapter)  # brief: it may wait for the step's lock
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except asyncio.TimeoutError:
            return
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001
            self._prepare_failed(adapter, err)

    def _prepare_failed(self, adapter: str, err: BaseException) -> None:
        if isinstance(err, Unavailable):  # the budget is full: the request waits in the engine (budget_wait_s)
            self.registry.drop_held_read(adapter)  # nobody may come back for the files read; the engine reads again
            return
        if isinstance(err, RankdialError):
            raise err
        log.error("loading adapter %r failed", adapter, exc_info=err)
        raise AdapterFileError(f"adapter {adapter!r} failed to load ({type(err).__name__}); the server log "
                               "has the details") from None

    def generate(self, prompt: str | list[int], adapter: str | None = None,
                 params: SamplingParams = SamplingParams(), timeout: float | None = None) -> Completion:
        """submit() and wait for the whole completion."""
        return self.submit(prompt, adapter, params).result(timeout)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt for a chat, from the tokenizer's chat template (with the assistant's turn opened)."""
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise _bad("messages", "messages must be a non-empty list of {'role': 'system'|'user'|'assistant', "
                               f"'content': str}}, got {str(messages)[:200]}")
        for m in messages:
            _check_unicode(m["content"], "messages' content")
        if not getattr(self.tokenizer, "chat_template", None):
            raise _bad("messages", f"the base model {self.base_name} has no chat template; use /v1/completions")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                      tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # the template refused these messages (raise_exception): the client's to fix
            raise _bad("messages", f"the chat template of {self.base_name} refused these messages: "
                               f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None

    def _tokens(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            _check_unicode(prompt, "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise _bad("prompt", f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        else:
            raise _bad("prompt", f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise _bad("prompt", "the prompt is empty; send at least one token of text")
        if len(ids) > self.max_prompt_tokens:
            raise _bad("prompt", f"the prompt has {len(ids)} tokens, more than this server's limit of "
                               f"{self.max_prompt_tokens}; shorten it")
        return ids

    def _cancel(self, request_id: str) -> None:
        self._cancels.append(request_id)
        self._wake.set()

    # -- the step -------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what arrived, run one batched forward, hand out one token per running request; False if idle."""
        self._take_arrivals()
        self._take_cancels()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return False
        live = [self._live[r.id] for r in batch.requests]
        with self.registry.lock:
            live = self._drop_rows_without_adapter(live)
            tokens = self.runner.step([x.seq for x in live]) if live else []
        for x, token in zip(live, tokens):
            self._record_row(x, token)
        self.steps, self.last_batch_size = self.steps + 1, len(live)
        self.largest_batch = max(self.largest_batch, len(live))
        return True

    def _record_row(self, x: _Live, token: int) -> None:
        """Hand out one row's token; a row that failed (its sampling, its detokenizing) ends alone, with its reason."""
        if x.seq.failure is not None:
            log.error("request %s (adapter %r): %s", x.seq.id, x.seq.adapter, x.seq.failure)
            self._finish(x, "error", x.seq.failure + "; retry the request, or report it if it fails again")
            return
        try:
            self._record(x, token)
        except Exception as err:  # noqa: BLE001 - one request's failure never reaches the batch
            log.error("request %s: handing out token %d failed", x.seq.id, token, exc_info=err)
            self._finish(x, "error", f"internal error while handing out this request's text ({type(err).__name__}); "
                                     "retry the request")

    def _drop_rows_without_adapter(self, live: list[_Live]) -> list[_Live]:
        """Fail the rows whose adapter is not in the model (held by the registry lock, so it cannot go meanwhile),
        each with an error naming only its own adapter, so that route() never fails the whole batch."""
        missing = [x for x in live if x.seq.adapter is not None and not self.registry.is_loaded(x.seq.adapter)]
        for x in missing:
            log.error("request %s: adapter %r left the model while the request ran", x.seq.id, x.seq.adapter)
            self._finish(x, "error", f"adapter {x.seq.adapter!r} was unloaded while this request ran; retry it")
        return [x for x in live if x not in missing] if missing else live

    def _take_arrivals(self) -> None:
        while self._inbox:
            x = self._inbox.popleft()
            self._live[x.seq.id] = x
            name = x.seq.adapter
            if name is None or self.registry.try_acquire(name, hit=True):
                self._queue(x)
            else:
                self._park(x)
        for name, future in list(self._loads.items()):
            if future.done():
                del self._loads[name]
                self._loaded(name, future.exception())
        now = time.monotonic()
        for name, (freed, at) in list(self._budget_retry.items()):  # retry a full budget only when it may have room
            if self.registry.freed != freed or now >= at or not self.scheduler.has_work():
                del self._budget_retry[name]
                self._loads[name] = self.registry.load_async(name)

    def _loaded(self, name: str, error: BaseException | None) -> None:
        """An adapter load ended: queue its parked requests, retry later if the budget was busy (for up to
        budget_wait_s, while running requests may release room; the retry reuses the files already read), else
        fail them."""
        if isinstance(error, BudgetFull):
            wait = self._budget_wait.setdefault(name, [time.monotonic() + self.budget_wait_s, False])
            idle = not self.scheduler.has_work()  # nothing runs: one more try (those that held it just left)
            if time.monotonic() < wait[0] and not (idle and wait[1]):
                wait[1] = idle
                # a request that ends will release room: retry then (registry.freed moves), or in _BUDGET_RETRY_S
                self._budget_retry[name] = (self.registry.freed, time.monotonic() + _BUDGET_RETRY_S)
                return
            self.registry.drop_held_read(name)
            error = BudgetFull(f"adapter {name!r} found no room in the adapter budget ({self.registry.budget_bytes} "
                               f"bytes) within {self.budget_wait_s:g} s: it is held by pinned adapters or adapters "
                               "in use; retry later, or raise the budget (--budget-mb)")
        self._budget_wait.pop(name, None)
        parked = self._parked.pop(name, [])
        self._n_parked -= len(parked)
        for x in parked:
            if x.done:
                continue
            if error is None:
                if self.registry.try_acquire(name):
                    self._queue(x)
                else:  # evicted by another load before this request could hold it: load it again
                    self._park(x)
            else:
                message = str(error) if isinstance(error, RankdialError) else f"adapter {name!r} failed to load"
                if not isinstance(error, RankdialError):
                    log.error("loading adapter %r failed", name, exc_info=error)
                self._finish(x, "error", message, unavailable=isinstance(error, Unavailable),
                             refused=isinstance(error, AdapterFileError))

    def _park(self, x: _Live) -> None:
        """Hold x until its adapter has loaded (one load per adapter, however many requests wait for it)."""
        name = x.seq.adapter
        self._parked.setdefault(name, []).append(x)
        self._n_parked += 1
        if name not in self._loads:
            self._loads[name] = self.registry.load_async(name)

    def _queue(self, x: _Live) -> None:
        """Into the scheduler; x's adapter (if any) was acquired by the caller and is released by _finish."""
        x.queued = True
        self.scheduler.submit(x.seq.id, x.seq.adapter, len(x.seq.prompt), x.seq.params.max_tokens)

    def _take_cancels(self) -> None:
        while self._cancels:
            x = self._live.get(self._cancels.popleft())
            if x is None or x.done:
                continue
            self.scheduler.cancel(x.seq.id)
            self._finish(x, "cancelled")

    def _record(self, x: _Live, token: int) -> None:
        seq = x.seq
        seq.tokens.append(token)
        self.tokens_generated += 1
        eos = token in self.eos_ids
        text, stopped = x.text.push(self.tokenizer, None if eos else token,
                                    final=eos or len(seq.tokens) >= seq.params.max_tokens)
        reason = "stop" if eos or stopped else ("length" if len(seq.tokens) >= seq.params.max_tokens else None)
        self.scheduler.record(seq.id, finished=reason is not None)
        x.handle._push(TokenEvent(text, None, len(seq.prompt), len(seq.tokens), token_id=token))
        if reason is not None:
            self._finish(x, reason)

    def _finish(self, x: _Live, reason: str, error: str | None = None, unavailable: bool = False,
                refused: bool = False) -> None:
        if x.done:
            return
        x.done = True
        self._live.pop(x.seq.id, None)
        self.scheduler.cancel(x.seq.id)  # False when it already left (finished by record())
        if x.queued:
            self.registry.release(x.seq.adapter)
        x.handle._push(TokenEvent("", reason, len(x.seq.prompt), len(x.seq.tokens), error, unavailable=unavailable,
                                  refused=refused))

    # -- the thread --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps on a background thread (idempotent and thread-safe: one thread however many callers race)."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                if self._closed:
                    raise Unavailable("this engine was shut down; build a new one")
                self._thread = threading.Thread(target=self._run, name="rankdial-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                busy = self.step()
            except Exception as err:  # noqa: BLE001 - one bad step must not kill the server
                log.error("engine step failed", exc_info=err)
                self._fail_running(err)
                busy = False
            if not busy:
                self._wake.wait(0.05 if (self._loads or self._inbox or self._budget_retry) else 1.0)
                self._wake.clear()

    def _fail_running(self, err: Exception) -> None:
        # one message for every row, naming nothing of the batch (other clients' adapters); the log has the rest
        message = f"internal error in the engine's step ({type(err).__name__}); retry the request"
        for r in list(self.scheduler.running):
            self._finish(self._live[r.id], "error", message)
        self.runner.release_all()

    def has_work(self) -> bool:
        return bool(self._inbox or self._live)

    def shutdown(self, drain: bool = True, timeout: float = 30.0) -> int:
        """Stop taking requests; with drain, finish those in flight first (up to `timeout` s), else cancel them.
        Returns how many requests it cancelled (0: every request in flight was answered in full)."""
        with self._submit_lock:  # after this, no enqueue() can add a request
            self._stopping = True
        deadline = time.monotonic() + timeout
        while drain and self.has_work() and self._thread is not None and self._thread.is_alive() \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        # the inbox first: a request the engine thread moves from the inbox to _live meanwhile is then in one of them
        inbox = list(self._inbox)
        left = {x.seq.id: x for x in inbox + list(self._live.values()) if not x.done}
        for request_id in left:
            self._cancel(request_id)
        self._end_all_if_no_thread()
        end = time.monotonic() + 5
        while self._live and self._thread is not None and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._thread is None or not self._thread.is_alive():
            self._end_all_if_no_thread()  # anything left (none expected): a final event, never a handle that hangs
        self.registry.close()
        return len(left)

    def _end_all_if_no_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():  # no thread will take them: end them here
            for x in list(self._inbox) + list(self._live.values()):
                self._finish(x, "cancelled")
            self._inbox.clear()

    def stats(self) -> dict:
        # read from HTTP threads while the engine thread changes things: only counters and len() of containers,
        # never an iteration over them (_parked is counted by the engine thread in _n_parked)
        waiting = len(self.scheduler.waiting) + self._n_parked + len(self._inbox)
        return {"running": len(self.scheduler.running), "waiting": waiting,
                "last_batch_size": self.last_batch_size, "largest_batch": self.largest_batch, "steps": self.steps, "tokens_generated": self.tokens_generated,
                "adapters_loaded": len(self.registry.loaded()), "adapters_loading": len(self._loads),
                "loaded_bytes": self.registry.loaded_bytes, "budget_bytes": self.registry.budget_bytes,
                "hits": self.registry.hits, "misses": self.registry.misses, "evictions": self.registry.evictions}

    def lora_requests(self) -> dict:
        """What vLLM's lora_requests_info gauge says, for routers: max_lora (the most adapters one batch can run:
        one per row), and the adapters of running and of waiting requests (distinct, sorted). Read from other
        threads: each container is copied by one C-level call (list of a dict's values, a dict's keys), as stats()."""
        running = {r.adapter for r in self.scheduler.running}
        waiting = {r.adapter for r in self.scheduler.waiting} | set(self._parked) | {
            x.seq.adapter for x in list(self._inbox)}
        return {"max_lora": self.scheduler.limits.max_batch_size, "running": sorted(running - {None}),
                "waiting": sorted(waiting - {None})}


def _bad(param: str, message: str) -> RequestError:
    """A RequestError naming the request field at fault (the API answers it as the error's param)."""
    err = RequestError(message)
    err.param = param
    return err


def _check_unicode(text: str, field: str) -> None:
    if not_utf8(text):
        raise _bad("prompt" if field == "prompt" else "messages", f"{field} {NOT_UTF8}")


__all__ = ["Engine", "Handle", "TokenEvent", "Completion", "Detokenizer", "SamplingParams", "SchedulerLimits", "AdapterError"]
