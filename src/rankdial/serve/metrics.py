"""Prometheus metrics for one server: each app has its own CollectorRegistry, so apps in one process never clash.

HTTP-side figures (requests, tokens, latency) are counted by the API as requests finish; engine-side figures
(adapter cache hits/misses/evictions, adapters loaded, batch size, queue lengths) are read from the engine and
its registry at scrape time, so they are never stale and never double-counted.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets in seconds: a tiny model on a CPU answers in tens of milliseconds, a large one in tens of seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector:
    """Reads the engine's counters at scrape time (prometheus_client's custom-collector protocol)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        reg, stats = self.engine.registry, self.engine.stats()
        for name, help_text in (("hits", "adapter lookups served from the loaded set"),
                                ("misses", "adapter lookups that had to load the adapter"),
                                ("evictions", "adapters evicted to stay within the memory budget")):
            yield CounterMetricFamily(f"rankdial_adapter_cache_{name}", help_text, value=getattr(reg, name))
        loaded = len(reg.loaded())
        yield GaugeMetricFamily("rankdial_adapters_loaded", "adapters resident in memory", value=loaded)
        yield GaugeMetricFamily("rankdial_adapters_known", "adapters the server can serve", value=len(reg.names()))
        yield GaugeMetricFamily("rankdial_adapter_loaded_bytes", "bytes of adapter weights resident",
                                value=reg.loaded_bytes)
        if reg.budget_bytes is not None:
            yield GaugeMetricFamily("rankdial_adapter_budget_bytes", "memory budget for adapters",
                                    value=reg.budget_bytes)
        yield GaugeMetricFamily("rankdial_batch_size", "rows in the engine's last decode step",
                                value=stats.get("last_batch_size", 0))
        yield GaugeMetricFamily("rankdial_requests_running", "requests in the running batch",
                                value=stats.get("running", 0))
        yield GaugeMetricFamily("rankdial_requests_waiting", "requests queued for a slot",
                                value=stats.get("waiting", 0))
        yield CounterMetricFamily("rankdial_engine_steps", "decode steps the engine has run",
                                  value=stats.get("steps", 0))
        # vLLM's gauge under vLLM's name, which LoRA-aware routers (the Gateway API inference extension's endpoint
        # picker, vLLM production-stack) read: labels max_lora and the comma-separated adapters of running and
        # waiting requests; the value is when it was read (vLLM: the time of its last update)
        lora = self.engine.lora_requests()
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests (vLLM's gauge).",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(lora["max_lora"]), ",".join(lora["running"]), ",".join(lora["waiting"])], time.time())
        yield info


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rankdial_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("rankdial_prompt_tokens", "prompt tokens of finished requests",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("rankdial_completion_tokens", "tokens generated", ["model"], registry=r)
        self.latency = Histogram("rankdial_request_latency_seconds", "time from request to last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("rankdial_time_to_first_token_seconds", "time from request to first token",
                                     ["route"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
