"""The playground's panels that stand on LoRA's case (rankdial.claims) and on the serving engine.

Merge: claims.merge_cost.merge_latency on the default model. Steer vs re-educate:
claims.steering.steers_not_reeducates at the job's ranks and steps (the page asks for the claims report's quick
settings), run as a job (its log lines stream). One base, many adapters: the adapters this playground has trained,
by any visitor (each finished text run is kept on one shared shelf, the newest MAX_ADAPTERS), answered side by side
by rankdial.serve.Engine, and claims.adapter_storage.adapters_vs_copies for the bytes.
"""

from __future__ import annotations

import shutil
import threading
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from ..errors import AdapterError

MAX_ADAPTERS = 6  # adapters kept for the serving panel (the newest; each is a few hundred kB)
ANSWER_TOKENS = 24
CLAIMS_REPORT = Path(__file__).resolve().parents[3] / "docs" / "claims" / "claims.json"  # src/rankdial/playground/


class AnswerRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=400)


class AdapterShelf:
    """The folder of adapters the playground's text runs have produced (its own temporary folder, nothing else)."""

    def __init__(self, root: Path, device: str = "auto"):
        self.root, self.device = root, device
        self._lock = threading.Lock()
        self.order: list[str] = []
        self.engine = None

    def keep(self, name: str, folder: Path) -> None:
        from ..adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME

        with self._lock:
            target = self.root / name
            target.mkdir()
            for f in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copy2(folder / f, target / f)
            self.order.append(name)
            while len(self.order) > MAX_ADAPTERS:
                old = self.order.pop(0)
                try:
                    if self.engine is not None and old in self.engine.registry.loaded():
                        self.engine.registry.unload(old)
                except AdapterError:  # answering a request now: its folder goes when the playground stops
                    continue
                shutil.rmtree(self.root / old, ignore_errors=True)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.order)

    def get_engine(self):
        from ..serve.engine import Engine

        with self._lock:
            if self.engine is None:
                engine = Engine.from_pretrained("default", str(self.root), device=self.device, max_new_tokens=64)
                # Its step thread starts here, once, under the shelf's lock: requests that arrive together would
                # otherwise each start one from Engine.submit (two threads stepping one engine fail its steps).
                engine.start()
                self.engine = engine
            return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(drain=False, timeout=5)


def add_routes(app: FastAPI, shelf: AdapterShelf, errors) -> None:
    """Routes for the merge, steering and serving panels; `errors` is app.ApiError."""
    measuring = threading.Lock()

    @app.post("/api/merge")
    def merge():
        from ..claims.merge_cost import merge_latency

        if not measuring.acquire(blocking=False):
            raise errors(429, "a latency measurement is already running; try again in a few seconds")
        try:
            return merge_latency(repeats=10, seq_len=64)
        finally:
            measuring.release()

    @app.get("/api/steering/report")
    def steering_report():
        return {"figures": committed_steering(), "source": "docs/claims/claims.json"}

    @app.get("/api/adapters")
    def adapters():
        return {"adapters": shelf.names(), "bytes": adapter_bytes()}

    @app.post("/api/answers")
    def answers(body: AnswerRequest):
        from ..serve.engine import SamplingParams

        engine = shelf.get_engine()
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
        names = [None, *shelf.names()]
        handles = [(name, engine.submit(body.prompt, name, params)) for name in names]  # batched together
        rows = []
        for name, handle in handles:
            done = handle.result(timeout=60)
            rows.append({"model": name or engine.base_name, "adapter": name, "text": done.text,
                         "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason})
        return {"prompt": body.prompt, "answers": rows}


def committed_steering() -> dict | None:
    """The steering figures of the report `rankdial claims --out docs/claims` wrote into this checkout, if any
    (a source checkout has it; an installed package does not, and the page offers the quick run instead)."""
    import json

    try:
        return json.loads(CLAIMS_REPORT.read_text(encoding="utf-8"))["steering"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@lru_cache(maxsize=1)
def adapter_bytes() -> dict:
    """One base + N adapters against N copies, in bytes of files written now (claims.adapters_vs_copies)."""
    from ..claims.adapter_storage import adapters_vs_copies

    return adapters_vs_copies([1, 2, 4, 8, 16, 32], rank=16)


def run_steering_job(job, check) -> None:
    """LoRA's case (claims.steers_not_reeducates): LoRA at the job's ranks vs full fine-tuning, style task and facts
    task, `steps` steps each, at the quick report's fact count and learning-rate grids."""
    from ..claims.report import SETTINGS
    from ..claims.steering import steers_not_reeducates

    quick = SETTINGS[True]

    def log(line: str) -> None:
        job.emit({"type": "log", "line": line.strip()})
        check()

    figures = steers_not_reeducates(job.spec["ranks"], job.spec["steps"], quick["n_facts"], log=log,
                                    lr_grids=quick["steer_lrs"], device=job.device)
    job.emit({"type": "steering", "figures": figures})
