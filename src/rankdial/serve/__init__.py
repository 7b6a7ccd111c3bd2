"""Serving one base model with many LoRA adapters per request (issue 9): the foundation so far.

What exists:
    batched_lora.py  heterogeneous batching: one forward of the base, row i adds s_i·B_i·A_i·x_i (or nothing);
                     route(model, rows) / clear_route(model), with the per-request reference loop beside it.
    scheduler.py     continuous-batching bookkeeping in plain Python (no torch): admission under batch-size
                     and tokens-in-flight limits, round-robin across adapters, FIFO within one, cancellation.

Still to build (see /work/shared/DESIGN.md): registry.py (adapters loaded on first use, memory-budget LRU with
pinning), runner.py (the tensors and the KV cache, sampling), engine.py (the step: schedule, route, forward,
sample, finish), api.py (the OpenAI-compatible HTTP server, admin routes, metrics) and `rankdial serve`.
"""

from .batched_lora import AdapterStack, Routing, batched_lora, clear_route, reference_rows, route

__all__ = ["route", "clear_route", "batched_lora", "reference_rows", "AdapterStack", "Routing"]
