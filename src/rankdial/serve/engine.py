"""The serving engine: one base model, many LoRA adapters, requests batched continuously on a background thread.

The step, as in nano-vllm, reads top to bottom:

    admit        arrivals -> registry.admit (adapter held: to the scheduler; not loaded: parked while the registry
                 loads it off this thread); cancels leave
    schedule     scheduler.schedule(): who runs this step, under the batch and tokens-in-flight limits
    run          runner.step(batch): one routed forward, each row with its own adapter -> one token per request
    postprocess  detokenize, check EOS / stop sequences / max_tokens -> finished requests leave

Every part reads and writes the same record per request (serve.request.Request).

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

from ..config import is_positive_int
from ..errors import AdapterError, AdapterFileError, ConfigError, RankdialError, RequestError, Unavailable
from ..sampling import SamplingParams, end_ids, make_generator
from .detokenizer import Detokenizer, TextStream  # noqa: F401 - Detokenizer: exported
from .handle import Completion, Handle, TokenEvent
from .registry import AdapterRegistry
from .request import WAITING, Request, RequestChecks
from .runner import Runner
from .scheduler import Scheduler, SchedulerLimits

log = logging.getLogger("rankdial.serve")


class Engine:
    """Continuous batching over one base model and an AdapterRegistry (see the module docstring)."""

    def __init__(self, model, tokenizer, registry: AdapterRegistry, *, base_name: str = "base",
                 limits: SchedulerLimits | None = None, max_prompt_tokens: int | None = None,
                 max_new_tokens: int = 512, budget_wait_s: float = 30.0, compile: bool = False, log=None):
        self.tokenizer, self.registry, self.base_name, self.model = tokenizer, registry, base_name, model
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        bad = [f"{k} must be a positive integer, got {v!r}" for k, v in (("max_new_tokens", max_new_tokens),
               ("max_prompt_tokens", max_prompt_tokens)) if v is not None and not is_positive_int(v)]
        if bad:
            raise ConfigError("; ".join(bad))
        self.max_new_tokens = max_new_tokens
        registry.budget_wait_s = budget_wait_s  # how long a request waits for room in a full adapter budget
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.scheduler = Scheduler(limits)
        in_flight = self.scheduler.limits.max_tokens_in_flight  # the KV cache holds max_batch_size rows of at most
        # this many tokens: a prompt leaves room for one new token within the context and the tokens in flight
        self.max_prompt_tokens = max(1, min(max_prompt_tokens or self.context - 1, in_flight - 1))
        self.checks = RequestChecks(tokenizer, model.config.vocab_size, base_name, max_new_tokens=max_new_tokens,
                                    max_prompt_tokens=self.max_prompt_tokens, max_total=min(self.context, in_flight))
        row_tokens = min(self.context, in_flight, self.max_prompt_tokens + max_new_tokens)
        # every request holds at least 2 tokens (a prompt token and one to generate), so no more than
        # tokens_in_flight // 2 rows ever run at once: slots past that would be cache that is never used
        slots = min(self.scheduler.limits.max_batch_size, max(1, in_flight // 2))
        self.runner = Runner(model, pad if pad is not None else 0, slots=slots, row_tokens=row_tokens)
        # compile: the runner's decode step through torch.compile, compiled and warmed up here, before any request
        # (a failure: one line through log, then eager); compile_seconds is what the warm-up took
        self.compile_seconds = self.runner.enable_compile(log) if compile else None
        self.eos_ids = end_ids(model, tokenizer)
        self._ids = itertools.count()
        self._inbox: deque[Request] = deque()  # taken by submitters' threads, emptied by the engine's
        self._cancels: deque[str] = deque()
        self._live: dict[str, Request] = {}  # every request the engine's thread holds, by id, until it ends
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

        limits: max_batch_size, max_tokens_in_flight, max_prefill_tokens (SchedulerLimits), max_prompt_tokens,
        max_new_tokens,
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
        sched = {k: limits.pop(k) for k in ("max_batch_size", "max_tokens_in_flight", "max_prefill_tokens")
                 if k in limits}
        limits = {k: v for k, v in limits.items() if v is not None}  # None: the default
        unknown = sorted(set(limits) - {"max_prompt_tokens", "max_new_tokens", "budget_wait_s"})
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; use max_batch_size, max_tokens_in_flight, "
                              "max_prefill_tokens, "
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
              params: SamplingParams = SamplingParams()) -> Request:
        """Everything submit() checks (RequestError / AdapterError / Unavailable), without queueing: a server checks a
        request before it loads the request's adapter (prepare_async), then enqueue()s it."""
        if self._stopping:
            raise Unavailable("the engine is shutting down and takes no new requests; retry on another replica")
        if adapter == self.base_name:
            adapter = None
        return self.checks.check(prompt, adapter, params, lookup=self.registry.check_known)

    def enqueue(self, request: Request) -> Handle:
        """Queue a request check() accepted; its Handle. Unavailable once shutdown() has begun."""
        if request.id:
            raise RequestError(f"request {request.id} was queued already; check() each request anew")
        request.id = f"req-{next(self._ids)}"
        request.handle = Handle(request, self)
        request.generator = make_generator(request.params.seed, self.runner.device)
        request.text = TextStream(request.params.stop)
        with self._submit_lock:  # shutdown() sets _stopping under this lock: no request slips in after its count
            if self._stopping:
                raise Unavailable("the engine is shutting down and takes no new requests; retry on another replica")
            self._inbox.append(request)
        self.start()
        self._wake.set()
        return request.handle

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
        return self.checks.chat_prompt(messages)

    def _cancel(self, request: Request) -> None:
        """Any thread: end `request` at the next step (flagged on its record first, so a cancel that comes while
        the request is still in the inbox is seen when it arrives)."""
        request.cancelled = True
        self._cancels.append(request.id)
        self._wake.set()

    # -- the step -------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """admit -> schedule -> run -> postprocess: one batched forward, one token per running request; False if
        nothing ran."""
        self._admit()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return False
        with self.registry.lock:  # no adapter of the batch can leave the model while it runs
            running = self._with_adapters(batch.requests)
            tokens = self.runner.step(running) if running else []
        for request, token in zip(running, tokens):
            self._postprocess(request, token)
        self.steps, self.last_batch_size = self.steps + 1, len(running)
        self.largest_batch = max(self.largest_batch, len(running))
        return True

    def _admit(self) -> None:
        """Arrivals whose adapter is held go to the scheduler (the registry loads the others, off this thread);
        cancels leave."""
        arrivals, ready, failed = [], [], []
        while self._inbox:
            request = self._inbox.popleft()
            self._live[request.id] = request
            arrivals.append(request)
        try:
            self.registry.admit(arrivals, running=self.scheduler.has_work(), ready=ready, failed=failed)
        except Exception as err:  # noqa: BLE001 - the arrivals it had not placed end; the rest goes on
            log.error("admitting requests failed", exc_info=err)
            failed += [(r, AdapterError("internal error while loading this request's adapter; retry the request"))
                       for r in arrivals if r.state == WAITING and not any(r is x for x in ready)]
        for request in ready:
            self.scheduler.submit(request)
        for request, err in failed:
            self._finish(request, "error", str(err), unavailable=isinstance(err, Unavailable),
                         refused=isinstance(err, AdapterFileError))
        for request in arrivals:  # cancelled while it waited in the inbox (its id may have been read already)
            if request.cancelled:
                self._finish(request, "cancelled")
        while self._cancels:
            request = self._live.get(self._cancels.popleft())
            if request is not None:
                self._finish(request, "cancelled")

    def _with_adapters(self, requests: list[Request]) -> list[Request]:
        """The requests whose adapter is in the model (the registry's lock is held: it cannot go meanwhile); the
        others end, each with an error naming only its own adapter, so that no row fails the whole batch."""
        gone = [r for r in requests if r.adapter is not None and not self.registry.is_loaded(r.adapter)]
        for r in gone:
            log.error("request %s: adapter %r left the model while the request ran", r.id, r.adapter)
            self._finish(r, "error", f"adapter {r.adapter!r} was unloaded while this request ran; retry it")
        return [r for r in requests if r not in gone] if gone else requests

    def _postprocess(self, request: Request, token: int) -> None:
        """Hand out one row's token as text; it ends at EOS, a stop sequence or max_tokens. A row that failed (its
        sampling, its detokenizing) ends alone, with its reason."""
        if request.failure is not None:
            log.error("request %s (adapter %r): %s", request.id, request.adapter, request.failure)
            self._finish(request, "error", request.failure + "; retry the request, or report it if it fails again")
            return
        try:
            eos = token in self.eos_ids
            last = eos or request.generated + 1 >= request.max_tokens
            text, stopped = request.text.push(self.tokenizer, None if eos else token, final=last)
            self.scheduler.record(request.id, token, finished=eos or stopped)
            self.tokens_generated += 1
            request.handle._push(TokenEvent(text, None, request.prompt_tokens, request.generated, token_id=token))
        except Exception as err:  # noqa: BLE001 - one request's failure never reaches the batch
            log.error("request %s: handing out token %d failed", request.id, token, exc_info=err)
            self._finish(request, "error", f"internal error while handing out this request's text "
                                           f"({type(err).__name__}); retry the request")
            return
        if last or stopped:
            self._finish(request, "stop" if eos or stopped else "length")

    def _finish(self, request: Request, reason: str, error: str | None = None, unavailable: bool = False,
                refused: bool = False) -> None:
        """End a request: out of the scheduler, its adapter released, its final event sent (once)."""
        if request.ended:
            return
        request.ended = True
        self._live.pop(request.id, None)
        self.scheduler.cancel(request.id)  # False when it already left (finished by record())
        if request.holds_adapter:
            self.registry.release(request.adapter)
            request.holds_adapter = False
        request.handle._push(TokenEvent("", reason, request.prompt_tokens, request.generated, error,
                                        unavailable=unavailable, refused=refused))

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
                self._wake.wait(0.05 if (self._inbox or self.registry.admission_busy()) else 1.0)
                self._wake.clear()

    def _fail_running(self, err: Exception) -> None:
        # one message for every row, naming nothing of the batch (other clients' adapters); the log has the rest
        message = f"internal error in the engine's step ({type(err).__name__}); retry the request"
        for r in list(self.scheduler.running):
            self._finish(r, "error", message)
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
        left = {r.id: r for r in inbox + list(self._live.values()) if not r.ended}
        for request in left.values():
            self._cancel(request)
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
        # never an iteration over them (the parked requests are counted by the engine thread)
        waiting = len(self.scheduler.waiting) + self.registry.parked_count + len(self._inbox)
        return {"running": len(self.scheduler.running), "waiting": waiting,
                "last_batch_size": self.last_batch_size, "largest_batch": self.largest_batch, "steps": self.steps, "tokens_generated": self.tokens_generated,
                "adapters_loaded": len(self.registry.loaded()), "adapters_loading": self.registry.loading,
                "loaded_bytes": self.registry.loaded_bytes, "budget_bytes": self.registry.budget_bytes,
                "hits": self.registry.hits, "misses": self.registry.misses, "evictions": self.registry.evictions}

    def lora_requests(self) -> dict:
        """What vLLM's lora_requests_info gauge says, for routers: max_lora (the most adapters one batch can run:
        one per row), and the adapters of running and of waiting requests (distinct, sorted). Read from other
        threads: each container is copied by one C-level call (list of a dict's values, a dict's keys), as stats()."""
        running = {r.adapter for r in self.scheduler.running}
        waiting = {r.adapter for r in self.scheduler.waiting} | self.registry.parked_adapters() | {
            r.adapter for r in list(self._inbox)}
        return {"max_lora": self.scheduler.limits.max_batch_size, "running": sorted(running - {None}),
                "waiting": sorted(waiting - {None})}



__all__ = ["Engine", "Handle", "TokenEvent", "Completion", "Detokenizer", "SamplingParams", "SchedulerLimits", "AdapterError"]
