"""The playground's HTTP side: the page (static files shipped in the package) and thin JSON routes onto the library.

Every number the page shows comes from a route here, and every route is a call into rankdial (lora_params and
estimate_memory from rankdial.memory, quantize_nf4 on a real weight of the default model, the training loop's
stages, rankdial.rank's spectrum, rankdial.claims' measurements, the serving engine); the routes own no math.
Bad values get a 4xx whose body is {"error": message, "field": name}; nothing reaches a client as a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import secrets
import shutil
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ..errors import RankdialError
from ..local_server import listen_socket, run, url_host
from .claims_and_serving import AdapterShelf, add_routes
from .jobs import TASKS, BusyError, JobManager, Limits

STATIC = Path(__file__).parent / "static"
COOKIE = "rankdial_client"
PLAN_MODELS = ("default", "llama-7b", "llama-13b", "llama-70b")
METHODS = ("full", "lora", "qlora")
GRACE_S = 3  # seconds Ctrl-C leaves open requests (event streams) before it closes them
MAX_BODY = 16 * 1024  # bytes of a request body: every form on the page fits in well under 1 kB


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class TrainRequest(BaseModel):
    task: Literal[TASKS] = "text"  # type: ignore[valid-type]
    ranks: list[int] = Field(default=[4], min_length=1, max_length=16)
    alpha: float | None = Field(default=None, gt=0, le=1024, allow_inf_nan=False)  # None: the task's default
    steps: int = Field(default=40, ge=1)
    examples: int = Field(default=128, ge=8)
    lr: float = Field(default=1e-3, gt=0, le=0.1, allow_inf_nan=False)


def create_app(limits: Limits | None = None, jobs: JobManager | None = None, device: str = "auto") -> FastAPI:
    """The playground app; `jobs` replaces the job manager (tests give it their own runners); models train and
    serve on `device` (rankdial.models.loading.pick_device: auto is CUDA when there is one)."""
    limits = limits or Limits()
    shelf = AdapterShelf(Path(tempfile.mkdtemp(prefix="rankdial-playground-adapters-")), device)
    manager = jobs or JobManager(limits, keep_adapter=shelf.keep, device=device)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        manager.shutdown()  # cancel running jobs when the server stops
        shelf.close()
        shutil.rmtree(shelf.root, ignore_errors=True)

    app = FastAPI(title="rankdial playground", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.jobs = manager
    app.state.visitor_key = secrets.token_bytes(32)  # signs the visitor ids this server issues (see client_of)
    app.state.stopping = threading.Event()  # set by begin_shutdown: event streams end, jobs are cancelled
    _error_handlers(app)
    app.middleware("http")(_limit_body)
    _page_routes(app, limits)
    _job_routes(app, manager, limits)
    add_routes(app, shelf, ApiError)
    return app


async def _limit_body(request: Request, call_next):
    """Refuse a body over MAX_BODY bytes, or one whose length is not given, before anything reads it."""
    size = request.headers.get("content-length", "chunked" if "transfer-encoding" in request.headers else "0")
    if not size.isdigit() or int(size) > MAX_BODY:
        return JSONResponse({"error": f"the request body is over {MAX_BODY} bytes (or its length is not "
                                      "given); send less", "field": "body"}, status_code=413)
    return await call_next(request)


def _page_routes(app: FastAPI, limits: Limits) -> None:
    """The page, its static files, and the panels that are one library call each."""
    @app.get("/", include_in_schema=False)
    def index(request: Request):
        """The page; it gives each visitor an id (a cookie: a random id this server signed) so that fair use counts
        visitors, not addresses. Callers without one it issued (scripts) are counted by their address."""
        response = FileResponse(STATIC / "index.html")
        if _visitor(request) is None:
            response.set_cookie(COOKIE, _issue_visitor(request.app), httponly=True, samesite="strict")
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/limits")
    def get_limits():
        return {**limits.__dict__, "tasks": list(TASKS), "plan_models": list(PLAN_MODELS)}

    @app.get("/api/lora")
    def lora_arithmetic(d_in: int = 4096, d_out: int = 4096, r: int = 16, alpha: float = 32.0):
        return lora_numbers(d_in, d_out, r, alpha)

    @app.get("/api/plan")
    def plan(model: str = "default", rank: int = 16, batch_size: int = 1, seq_len: int = 512):
        return memory_plans(model, rank, batch_size, seq_len)

    @app.get("/api/nf4")
    def nf4(layer: str = "model.layers.0.mlp.up_proj.weight"):
        return nf4_report(layer)


def _job_routes(app: FastAPI, manager: JobManager, limits: Limits) -> None:
    """Start a training job, stream its events, read its state, cancel it (each visitor sees only its own)."""
    @app.post("/api/jobs", status_code=202)
    def start_job(body: TrainRequest, request: Request):
        spec = check_train(body, limits)
        try:
            job = manager.start(client_of(request), spec)
        except BusyError as err:
            raise ApiError(err.status, str(err)) from None
        return {"id": job.id, "spec": spec}

    @app.get("/api/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        job = _job(manager, job_id, request)
        return StreamingResponse(_stream(job, request, app.state.stopping), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.delete("/api/jobs/{job_id}")
    def cancel_job(job_id: str, request: Request):
        job = _job(manager, job_id, request)
        job.cancel()
        return {"id": job.id, "state": job.state, "cancelling": not job.finished}

    @app.get("/api/jobs/{job_id}")
    def job_state(job_id: str, request: Request):
        job = _job(manager, job_id, request)
        return {"id": job.id, "state": job.state, "spec": job.spec, "events": len(job.events)}


# ------------------------------------------------------------------------------------------------ panels

def lora_numbers(d_in: int, d_out: int, r: int, alpha: float) -> dict:
    from ..config import lora_scaling
    from ..memory import lora_params

    _between("d_in", d_in, 1, 65536)
    _between("d_out", d_out, 1, 65536)
    _between("r", r, 1, min(d_in, d_out, 4096))
    _between("alpha", alpha, 1e-6, 1e6)
    trainable = lora_params(d_in, d_out, r)
    return {"d_in": d_in, "d_out": d_out, "r": r, "alpha": alpha, "scale": lora_scaling(r, alpha),
            "delta_w": d_in * d_out, "a": r * d_in, "b": d_out * r, "trainable": trainable,
            "share": trainable / (d_in * d_out), "shapes": {"delta_w": [d_out, d_in], "a": [r, d_in], "b": [d_out, r]}}


def memory_plans(model: str, rank: int, batch_size: int, seq_len: int) -> dict:
    from ..memory import ACCELERATOR_GB, estimate_memory

    if model not in PLAN_MODELS:
        raise ApiError(422, f"model {model!r} is not one of {', '.join(PLAN_MODELS)}", "model")
    _between("rank", rank, 1, 1024)
    _between("batch_size", batch_size, 1, 512)
    _between("seq_len", seq_len, 1, 32768)
    plans = {}
    for method in METHODS:
        p = estimate_memory(model, method=method, rank=rank, batch_size=batch_size, seq_len=seq_len)
        plans[method] = {"terms": p.terms(), "total_bytes": p.total_bytes, "weights_bytes": p.weights_bytes,
                         "fits": p.fits, "trainable_params": p.trainable_params, "total_params": p.total_params,
                         "settings": p.settings}
    return {"model": model, "rank": rank, "batch_size": batch_size, "seq_len": seq_len,
            "accelerators_gb": list(ACCELERATOR_GB), "plans": plans}


@lru_cache(maxsize=1)
def default_weight_names() -> tuple[str, ...]:
    from safetensors import safe_open

    from ..models.loading import default_model_path

    with safe_open(str(default_model_path() / "model.safetensors"), "pt") as f:
        return tuple(k for k in f.keys() if k.endswith("proj.weight"))


@lru_cache(maxsize=8)
def nf4_report(layer: str) -> dict:
    import torch
    from safetensors import safe_open

    from ..models.loading import default_model_path
    from ..quant.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4

    names = default_weight_names()
    if layer not in names:
        raise ApiError(422, f"layer {shown(layer)} is not a linear weight of the default model; give one of "
                            f"{', '.join(names[:3])}, ...", "layer")
    with safe_open(str(default_model_path() / "model.safetensors"), "pt") as f:
        w = f.get_tensor(layer).float()
    q, plain = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    err = dequantize_nf4(q, torch.float32) - w
    # What NF4 rounds: each weight over its block's absmax (the library's fp32 absmax, exact without double quant).
    scaled = w.flatten() / plain.absmax_fp32().repeat_interleave(plain.blocksize)[: w.numel()]
    counts = torch.histc(scaled, bins=64, min=-1.0, max=1.0)
    return {"layer": layer, "layers": list(names), "shape": list(w.shape), "numel": w.numel(),
            "histogram": {"lo": -1.0, "hi": 1.0, "counts": counts.tolist()}, "levels": NF4_CODE.tolist(),
            "weight_std": float(w.std()), "rmse": float(err.pow(2).mean().sqrt()),
            "max_abs_error": float(err.abs().max()), "relative_error": float(err.norm() / w.norm()),
            "bits_double_quant": q.bits_per_param, "bits_plain": plain.bits_per_param, "blocksize": q.blocksize}


# ------------------------------------------------------------------------------------------------ checks

def _between(field: str, value, lo, hi) -> None:
    if not lo <= value <= hi:
        got = f"{value:,}" if isinstance(value, int) and abs(value) < 10**30 else f"{value:.6g}"
        raise ApiError(422, f"{field} must be between {lo:g} and {hi:g}, got {got}", field)


def check_train(body: TrainRequest, limits: Limits) -> dict:
    """The job's spec: exactly what it will run, each value within the caps (ApiError naming the field)."""
    if body.task == "steering":
        return _check_steering(body, limits)
    ranks = _check_ranks(body.ranks, limits)
    _between("steps", body.steps, 1, limits.max_synthetic_steps if body.task == "synthetic" else limits.max_steps)
    _between("examples", body.examples, 8, limits.max_examples)
    return {"task": body.task, "ranks": ranks, "alpha": body.alpha, "steps": body.steps, "examples": body.examples,
            "lr": body.lr}


def _check_steering(body: TrainRequest, limits: Limits) -> dict:
    """Steering runs at the job's ranks and steps (the quick report's when not given); its own alpha (2r),
    learning-rate grids and data, so a request that sets those is refused rather than ignored."""
    from ..claims.report import SETTINGS

    given = body.model_fields_set
    unused = [f for f in ("alpha", "lr", "examples") if f in given]
    if unused:
        raise ApiError(422, f"{unused[0]}: the steering task sets its own (alpha = 2r, learning rates tuned on a "
                            "grid, its own data); send only task, ranks and steps", unused[0])
    quick = SETTINGS[True]
    ranks = _check_ranks(body.ranks if "ranks" in given else quick["steer_ranks"], limits)
    steps = body.steps if "steps" in given else quick["steer_steps"]
    _between("steps", steps, 1, limits.max_steering_steps)
    return {"task": "steering", "ranks": ranks, "steps": steps}


def _check_ranks(ranks: list[int], limits: Limits) -> list[int]:
    ranks = sorted(set(ranks))
    if len(ranks) > limits.max_ranks:
        raise ApiError(422, f"ranks: at most {limits.max_ranks} ranks in one sweep, got {len(ranks)}", "ranks")
    bad = [r for r in ranks if not 1 <= r <= limits.max_rank]
    if bad:
        raise ApiError(422, f"ranks must be between 1 and {limits.max_rank} here, got {bad[0]}", "ranks")
    return ranks


def _signature(app, visitor: str) -> str:
    return hmac.new(app.state.visitor_key, visitor.encode(), hashlib.sha256).hexdigest()[:32]


def _issue_visitor(app) -> str:
    """A new visitor id: random, with this server's signature ("<id>.<signature>")."""
    visitor = secrets.token_hex(16)
    return f"{visitor}.{_signature(app, visitor)}"


def _visitor(request: Request) -> str | None:
    """The visitor id of the request's cookie when this server issued it (its signature checks), else None."""
    visitor, _, signature = request.cookies.get(COOKIE, "").partition(".")
    if visitor and hmac.compare_digest(signature, _signature(request.app, visitor)):
        return visitor
    return None


def client_of(request: Request) -> str:
    """Who a request counts as: the visitor this server issued its cookie to, else its address (a cookie value
    that this server did not issue is no one, so it can neither pose as another client nor make a new one)."""
    visitor = _visitor(request)
    if visitor is not None:
        return "visitor " + visitor
    return "address " + (request.client.host if request.client else "unknown")


def shown(value: str, limit: int = 60) -> str:
    """A value the client sent, as it is echoed in a message: quoted, at most ~`limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _job(manager: JobManager, job_id: str, request: Request):
    job = manager.get(job_id)
    if job is None or job.client != client_of(request):
        raise ApiError(404, f"no job {shown(job_id)} of yours; start one with POST /api/jobs", "job_id")
    return job


async def _stream(job, request: Request, stopping: threading.Event):
    """Server-sent events: every event of the job from the first, then new ones as they come, until it ends."""
    import time

    job.listeners += 1
    sent = 0
    try:
        while True:
            for event in job.events_since(sent):
                sent += 1
                yield f"data: {event_json(event)}\n\n"
            if job.finished and sent >= len(job.events):
                return
            if stopping.is_set() or await request.is_disconnected():
                return
            await asyncio.sleep(0.1)
    finally:
        job.listeners -= 1
        job.last_seen = time.monotonic()


def event_json(event: dict) -> str:
    """The event as strict JSON: a diverged run's NaN or infinite loss becomes null (the browser's JSON.parse
    rejects NaN and Infinity, which json.dumps writes by default)."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(finite(event), allow_nan=False)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse({"error": err.message, "field": err.field}, status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):  # no such route, wrong method, an unreadable body
        message = {404: f"no such page or route: {request.url.path[:80]}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path[:80]}"}.get(err.status_code, str(err.detail))
        return JSONResponse({"error": message, "field": "body" if err.status_code == 400 else None},
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = [str(p) for p in first.get("loc", ())]
        loc = [p for p in where if p not in ("body", "query", "path")]
        field = loc[0] if loc else ("body" if "body" in where else None)
        msg = first.get("msg", "invalid value")
        if first.get("type") == "json_invalid":
            field, msg = "body", "the request body is not valid JSON"
        return JSONResponse({"error": f"{field or 'request'}: {msg}", "field": field}, status_code=422)

    @app.exception_handler(RankdialError)
    async def rankdial_error(request, err: RankdialError):
        from ..errors import Unavailable

        status = 503 if isinstance(err, Unavailable) else 400  # busy or shutting down: a retry may succeed
        return JSONResponse({"error": str(err).splitlines()[0], "field": None}, status_code=status)

    @app.exception_handler(Exception)
    async def crash(request, err: Exception):
        return JSONResponse({"error": "internal error in the playground; the server goes on serving", "field": None},
                            status_code=500)


def serve(port: int = 7860, host: str = "127.0.0.1", log=print) -> None:
    """Run the playground until SIGTERM or Ctrl-C (KeyboardInterrupt, as every verb); prints the address first.
    Local by default (127.0.0.1).

    The socket is bound here and handed to uvicorn, so no other process can take the port between the check and
    the serving (rankdial.local_server, as `rankdial serve`). The first signal ends the event streams and cancels
    the running jobs (begin_shutdown), so uvicorn's graceful wait (GRACE_S at most) has nothing left to wait for.
    """
    sock = listen_socket(host, port, host_flag=None)  # bound and listening before the models load (no --host flag)
    try:
        log(f"rankdial playground on http://{url_host(host)}:{sock.getsockname()[1]}/  (Ctrl-C stops it)")
        app = create_app()
    except BaseException:
        sock.close()
        raise
    run(app, sock, name="rankdial playground", graceful_s=GRACE_S, on_first_signal=lambda: begin_shutdown(app))


def begin_shutdown(app: FastAPI) -> None:
    """The server is stopping: end every event stream now and ask every running job to stop (neither waits)."""
    app.state.stopping.set()
    for job in app.state.jobs.running():
        job.cancel("the playground is shutting down")
