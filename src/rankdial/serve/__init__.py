"""Serving one base model with many LoRA adapters per request (issue 9).

    batched_lora.py  heterogeneous batching: one forward of the base, row i adds s_i·B_i·A_i·x_i (or nothing);
                     route(model, rows) / clear_route(model), with the per-request reference loop beside it.
    stacks.py        the routed adapters' storage: per layer one stack per rank (AdapterStacks, RankStack).
    request.py       Request: one request as every part below sees it (the one record); RequestChecks.
    scheduler.py     continuous-batching bookkeeping in plain Python (no torch): admission under batch-size
                     and tokens-in-flight limits, round-robin across adapters, FIFO within one, cancellation.
    registry.py      AdapterRegistry: adapter folders loaded on first use (read off the engine thread) straight
                     into the layers' routed stacks (their one copy), an LRU bounded by a budget on every byte the
                     stacks hold, with pinning, safe paths, refusal of adapters that do not fit;
                     admission.py: requests parked while their adapter loads (registry.admit, one call a step).
    runner.py        the tensors: one KV cache preallocated as slots x row tokens, written in place (rows join and
                     leave without copying anyone's cache);
                     sampling is rankdial.sampling's (SamplingParams, sample()), shared with `rankdial generate`.
    engine.py        Engine: the step (admit -> schedule -> run -> postprocess) on a
                     background thread; submit() -> Handle (events() / aevents() / cancel()); generate().
    handle.py        Handle, TokenEvent, Completion (what a client holds).
    detokenizer.py   a request's text: the incremental Detokenizer, and TextStream (stop sequences held back).

    api.py           create_app(engine): the OpenAI-compatible HTTP API (models, completions, chat, SSE
                     streaming, adapter load/unload, health, Prometheus metrics) that `rankdial serve` runs;
                     access.py (bearer keys, body limit, per-request metrics), openai_errors.py (OpenAI's
                     error object), schemas.py (request models), metrics.py beside it.
    launch.py        `rankdial serve`'s flags -> the app; rankdial.local_server binds and runs it (as the
                     playground's).
"""

from .batched_lora import Routing, batched_lora, clear_route, reference_rows, route
from .stacks import AdapterStacks
from .engine import Engine
from .handle import Completion, Handle, TokenEvent
from .registry import AdapterInfo, AdapterRegistry
from ..sampling import SamplingParams
from .runner import Runner
from .scheduler import Scheduler, SchedulerLimits

__all__ = ["Engine", "Handle", "TokenEvent", "Completion", "SamplingParams", "AdapterRegistry", "AdapterInfo",
           "Scheduler", "SchedulerLimits", "Runner", "route", "clear_route", "batched_lora", "reference_rows",
           "AdapterStacks", "Routing"]
