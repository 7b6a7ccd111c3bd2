"""The OpenAI-compatible HTTP server over one Engine: one base model, many LoRA adapters, chosen per request.

`model` in a request names an adapter (a folder under the adapters directory, or one loaded at run time) or
the base itself. Routes, with OpenAI's shapes so the official `openai` client works unchanged:

    GET  /v1/models              the base and every adapter
    POST /v1/completions         prompt -> text           (stream: true -> server-sent events, then [DONE])
    POST /v1/chat/completions    messages -> reply        (the tokenizer's chat template)
    POST /v1/adapters            load an adapter by name, or by path (admin key when one is configured)
    DELETE /v1/adapters/{name}   unload it (admin key when one is configured): {"deleted": true} if it was loaded,
                                 {"deleted": false} if it was known but not loaded; 409 while requests use it
    POST /v1/load_lora_adapter   vLLM's names for the two above ({"lora_name", "lora_path"}, {"lora_name"}), same rules
    POST /v1/unload_lora_adapter
    GET  /health, GET /metrics   liveness and Prometheus metrics (a registry per app)

Every error reaches the client as {"error": {"message", "type", "param", "code"}} with one line naming the
field or the model and the fix (the status from the error's class: Unavailable 503, AdapterInUse 409, another
AdapterError 404, any other RankdialError 400); an unexpected failure is logged here and answered with a generic 500, never
a stack trace. A streaming client that disconnects cancels its request, which frees its slot in the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import AdapterError, AdapterFileError, AdapterInUse, ConfigError, NameTaken, RankdialError, Unavailable, \
    one_line, shorten
from ..sampling import SamplingParams
from .access import AccessMiddleware, bearer_matches
from .metrics import Metrics
from .openai_errors import ApiError, error_body
from .registry import check_adapter_folder_name
from .schemas import FIELD_HELP, AdapterLoad, ChatRequest, CompletionRequest, LoraLoad, LoraUnload
from ..config import is_positive_int

log = logging.getLogger("rankdial.serve")


@dataclass(frozen=True)
class ApiLimits:
    """What the HTTP layer limits. The token limits (max_tokens, prompt tokens) are the engine's own
    (Engine.max_new_tokens / max_prompt_tokens), enforced once, in Engine.submit."""
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        problems = [f"{k} must be a positive integer, got {v!r}" for k, v in vars(self).items()
                    if v is not None and not is_positive_int(v)]
        if problems:
            raise ConfigError("; ".join(problems))


def create_app(engine, *, api_keys=None, admin_key: str | None = None, limits: ApiLimits | None = None,
               shutdown_engine: bool = True, drain_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving `engine`. Starts the engine on startup; on shutdown drains it (when
    shutdown_engine), so requests in flight finish before the process exits; those still running after
    drain_timeout seconds are cancelled, and app.state.cancelled_at_shutdown says how many."""
    limits = limits or ApiLimits()
    admin_key = admin_key or None  # an empty key is no key: "" must not switch on loading by any path
    keys = [k for k in (api_keys or []) if k]
    metrics = Metrics(engine)

    drain: dict = {"thread": None, "cancelled": None}
    drain_lock = threading.Lock()

    def begin_drain() -> None:
        """Start the engine's drain now (idempotent; a server calls it on the first SIGTERM / Ctrl-C): requests in
        flight finish, and those still running after drain_timeout get a final 'cancelled' event, so their
        streams end (and their connections close) while the HTTP server waits for them."""
        if not shutdown_engine:
            return
        with drain_lock:
            if drain["thread"] is None:
                def run():
                    drain["cancelled"] = engine.shutdown(True, drain_timeout)
                drain["thread"] = threading.Thread(target=run, name="rankdial-drain", daemon=True)
                drain["thread"].start()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        if shutdown_engine:
            begin_drain()
            await asyncio.to_thread(drain["thread"].join)
            app.state.cancelled_at_shutdown = drain["cancelled"]

    app = FastAPI(title="rankdial", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)  # /v1/adapters/ is no route (a JSON 404), not a bodiless 307
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    app.state.cancelled_at_shutdown = None  # set once the lifespan has shut the engine down
    app.state.begin_drain = begin_drain
    app.add_middleware(AccessMiddleware, keys=keys + ([admin_key] if admin_key and keys else []),
                       max_body=limits.max_body_bytes, metrics=metrics)
    _add_error_handlers(app)
    _add_model_routes(app, engine, admin_key)
    _add_generation_routes(app, engine, metrics)
    return app


def _require_admin(request: Request, admin_key: str | None, what: str) -> None:
    if admin_key and not bearer_matches(request.headers.get("authorization", "").encode("latin-1"), [admin_key]):
        raise ApiError(403, f"{what} needs the admin key; send 'Authorization: Bearer <admin key>'",
                       kind="permission_error")


# ---- errors: every one as OpenAI's error object, one line, never a stack trace ----

def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            where = errors[0].get("ctx", {}).get("error", "")
            return error_body(400, f"request body is not valid JSON ({where}); send one JSON object")
        if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "string_unicode" for e in errors):
            bad = next(e.get("input") for e in errors if e.get("type") == "string_unicode")
            return error_body(422, f"the body holds a field name that is not valid Unicode ({shorten(bad)}, a lone "
                                   "surrogate): unknown field; remove it", param="body")
        if any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # no body, or not a JSON object
            return error_body(422, "the body must be one JSON object (Content-Type: application/json) with the "
                                   "request's fields, e.g. {\"model\": ..., \"prompt\": ...}", param="body")
        return validation_error(errors)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 400 and not isinstance(exc, ApiError) and exc.__cause__ is not None:
            return error_body(400, _unparsable(exc.__cause__))  # FastAPI's "There was an error parsing the body"
        if not isinstance(exc, ApiError) and exc.status_code in (404, 405):
            what = "no route" if exc.status_code == 404 else "method not allowed:"
            return error_body(exc.status_code, f"{what} {request.method} {request.url.path}; the routes are "
                                               "/v1/models, /v1/completions, /v1/chat/completions, /v1/adapters, "
                                               "/v1/load_lora_adapter, /v1/unload_lora_adapter, /health and /metrics")
        return error_body(exc.status_code, str(exc.detail), getattr(exc, "kind", None), getattr(exc, "param", None))

    @app.exception_handler(RankdialError)
    async def rankdial_error(request, exc: RankdialError):
        status, kind = status_of(exc)
        param = getattr(exc, "param", None)  # the engine's RequestErrors name their field
        if param == "prompt" and request.url.path.endswith("/chat/completions"):
            param = "messages"
        return error_body(status, one_line(exc), kind, param)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("request %s %s failed (ref %s)", request.method, request.url.path, ref, exc_info=exc)
        response = error_body(500, f"internal server error (ref {ref}); the server log has the details")
        # Starlette re-raises after this answer and uvicorn then closes the connection: say so, or a keep-alive
        # client sends its next request down the closed socket and gets 'connection reset'
        response.headers["connection"] = "close"
        return response


_TAGS_OK = {"role", "content", "name", "type", "text", "include_usage", "include_obfuscation"}


def validation_error(errors: list[dict]):
    """One 422 in plain words for pydantic's errors: one phrase per top-level field (its FIELD_HELP, or the
    validator's own message), never pydantic's internals (union tags such as 'stop.str'); param is the first field."""
    parts, fields = [], []
    for e in errors:
        loc = [x for x in e.get("loc", ())[1:]]
        if not loc or str(loc[0]) in fields:
            continue
        field = str(loc[0])
        fields.append(field)
        path = field + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:]
                               if isinstance(x, int) or x in _TAGS_OK)
        kind = e.get("type")
        if kind in ("extra_forbidden", "string_unicode") and len(loc) > 1 or kind == "extra_forbidden":
            # an unknown key (a lone surrogate in a nested key reads as string_unicode): its name, shortened
            shown = path if len(path) <= 60 and path.isprintable() else shorten(path)
            parts.append(f"{shown}: unknown field; remove it")
        elif kind == "missing":
            parts.append(f"{path} is required; {FIELD_HELP.get(field, '')}".rstrip("; "))
        elif kind == "value_error":
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(msg if msg.startswith(field) else f"{path}: {msg}")
        else:
            help_ = FIELD_HELP.get(field, f"{field} is invalid")
            where = f" at {path}" if path != field else ""
            parts.append(f"{help_}; got {_short(e.get('input'))}{where}")
        if len(parts) == 5:
            break
    param = (fields[0] if len(fields[0]) <= 60 else fields[0][:57] + "...") if fields else None
    return error_body(422, "; ".join(parts) or "invalid request body", param=param)


def _unparsable(cause: BaseException) -> str:
    """Why FastAPI could not parse a body that is not a JSON syntax error."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start}); "
                "send the JSON encoded as UTF-8")
    if isinstance(cause, RecursionError):
        return "request body nests JSON arrays or objects too deeply to parse; send a flatter body"
    return f"request body could not be parsed as JSON ({type(cause).__name__}); send one JSON object encoded as UTF-8"


def status_of(err: RankdialError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type for a rankdial error, from its class."""
    if isinstance(err, Unavailable):  # shutting down, or the adapter budget stays full: retry later
        return 503, "server_error"
    if isinstance(err, (AdapterInUse, NameTaken)):
        return 409, "conflict_error"
    if isinstance(err, AdapterError):
        return 404, "not_found_error"
    return 400, "invalid_request_error"


def _short(value) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- models and adapters ----

def model_names(engine) -> list[str]:
    return [engine.base_name] + sorted(engine.registry.names())


def adapter_for(engine, model: str) -> str | None:
    """The adapter a request's `model` names (None for the base); ApiError 404 listing what exists."""
    if model == engine.base_name:
        return None
    if engine.registry.exists(model):
        return model
    raise _no_such_model(engine, model)


def _no_such_model(engine, model: str) -> ApiError:
    return ApiError(404, f"model {shorten(model)} does not exist; available: {', '.join(model_names(engine))}",
                    kind="not_found_error", param="model")


def _model_card(engine, name: str) -> dict:
    if name == engine.base_name:
        return _card(engine, name)
    try:
        info = engine.registry.info(name)
    except AdapterError:  # unloaded meanwhile
        return _card(engine, name)
    return _card(engine, name, info, engine.registry.failure(name))


def _card(engine, name: str, info=None, failure: str | None = None) -> dict:
    """One /v1/models entry: OpenAI's fields; for an adapter also `parent` (the base), `root`, and what it holds.
    A folder that failed to load is listed with why (`error`) until its files change."""
    card = {"id": name, "object": "model", "created": 0, "owned_by": "rankdial"}
    if name == engine.base_name:
        return card | {"root": name, "parent": None}
    card |= {"root": name, "parent": engine.base_name}
    if info is not None:
        card |= {"rank": info.rank, "bytes": info.bytes, "loaded": info.loaded, "pinned": info.pinned}
    return card | ({"error": failure} if failure else {})


def _add_model_routes(app: FastAPI, engine, admin_key: str | None) -> None:
    # plain `def` for the routes that read the adapters folder: FastAPI runs them in its thread pool, so listing
    # hundreds of folders never stalls the event loop that carries the streams
    @app.get("/v1/models")
    def list_models():  # one snapshot of the registry: the engine's step lock is taken once, not per adapter
        cards = [_card(engine, info.name, info, failure) for info, failure in engine.registry.listing()]
        return {"object": "list", "data": [_card(engine, engine.base_name)] + cards}

    @app.get("/v1/models/{name}")
    def get_model(name: str):
        adapter_for(engine, name)
        return _model_card(engine, name)

    async def load(body: AdapterLoad, request: Request):
        """POST /v1/adapters (and vLLM's /v1/load_lora_adapter): the AdapterInfo of the adapter loaded."""
        if body.path is not None:
            _require_admin(request, admin_key, "loading an adapter by path")
        if body.pin is not None:  # a pin holds budget room for good: the admin's call, like unloading
            _require_admin(request, admin_key, "pinning or unpinning an adapter")
        if body.name == engine.base_name:
            raise ApiError(400, f"name {body.name!r} is the base model's; choose another name", param="name")
        if body.path is None and not engine.registry.exists(body.name):
            raise ApiError(404, f"no adapter folder {body.name!r} in the adapters directory; available: "
                                f"{', '.join(sorted(engine.registry.names())) or 'none'}",
                           kind="not_found_error", param="name")
        if body.path is not None and engine.registry.exists(body.name):  # never rebind a name to other weights
            raise ApiError(409, f"{body.name} exists; unload it or choose another name", kind="conflict_error",
                           param="name")
        try:
            return await run_in_threadpool(_load, engine.registry, body, admin_key is not None)
        except (AdapterError, AdapterFileError) as err:  # the name was checked above: a refusal, a full budget, or
            # the name loaded from another folder meanwhile (a concurrent load); a broken folder is a 400 as vLLM's
            status, kind = (503, "server_error") if isinstance(err, Unavailable) else (409, "conflict_error") \
                if isinstance(err, NameTaken) else (400, "invalid_request_error")
            raise ApiError(status, one_line(err), kind=kind, param="path" if body.path else "name") from None

    async def unload(name: str, request: Request, param: str) -> bool:
        """DELETE /v1/adapters/{name} (and vLLM's /v1/unload_lora_adapter, whose field is `param`): whether it was
        loaded."""
        _require_admin(request, admin_key, "unloading an adapter")
        try:
            check_adapter_folder_name(name)
        except AdapterError as err:
            raise ApiError(400, one_line(err), param=param) from None
        if name == engine.base_name:
            raise ApiError(400, f"{name!r} is the base model, which is never unloaded; name an adapter", param=param)
        if not engine.registry.exists(name):
            raise ApiError(404, f"no adapter {shorten(name)}; the adapters are "
                                f"{', '.join(sorted(engine.registry.names())) or 'none'}",
                           kind="not_found_error", param=param)
        return await run_in_threadpool(engine.registry.unload, name)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad, request: Request):
        return _model_card(engine, (await load(body, request)).name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        was_loaded = await unload(name, request, "name")
        # deleted: whether it was loaded and is now unloaded; a known adapter that was not loaded stays servable
        return {"id": name, "object": "model", "deleted": bool(was_loaded), "loaded": False}

    # vLLM's runtime adapter routes, so a router written for vLLM can manage rankdial replicas: the same loads and
    # unloads under the same admin rules, answered as vLLM answers (plain text on success, the error object else)
    @app.post("/v1/load_lora_adapter")
    async def vllm_load(body: LoraLoad, request: Request):
        by_name = engine.registry.root is not None and _same_folder(engine.registry.root, body.lora_name,
                                                                     body.lora_path)
        try:
            await load(AdapterLoad(name=body.lora_name, path=None if by_name else body.lora_path), request)
        except ApiError as err:  # errors name this route's fields
            err.param = {"name": "lora_name", "path": "lora_path"}.get(err.param, err.param)
            raise
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(body: LoraUnload, request: Request):
        await unload(body.lora_name, request, "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    def health():
        stats = engine.stats()
        return {"status": "ok", "base": engine.base_name, "adapters": len(engine.registry.names()),
                "running": stats.get("running", 0), "waiting": stats.get("waiting", 0)}

    @app.get("/metrics")
    def prometheus():
        return Response(app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _same_folder(root, name: str, path: str) -> bool:
    """Whether `path` (absolute, or relative to the adapters folder) is the adapters folder's own folder `name`:
    vLLM's load names every adapter by path; one in the adapters folder under its own name is a load by name."""
    from pathlib import Path

    try:
        folder = Path(path).expanduser()
        return (folder if folder.is_absolute() else root / folder).resolve() == (root / name).resolve()
    except (OSError, ValueError, RuntimeError):  # a path the file system refuses, ~user of no user: the load says why
        return False


def _load(registry, body: AdapterLoad, admin_checked: bool):
    """Load by name (inside the adapters folder) or by path; a path outside the folder only behind the admin key.
    pin: true pins it, false unpins it, absent leaves its pin as it was."""
    if body.path is None:
        info = registry.load(body.name, pin=bool(body.pin))
    else:
        info = registry.load(body.name, body.path, pin=bool(body.pin), allow_any_path=admin_checked)
    if body.pin is False and info.pinned:
        registry.unpin(body.name)
        info = registry.info(body.name)
    return info


# ---- generation ----

def _params(engine, body) -> SamplingParams:
    """The request's sampling; max_tokens defaults to 16 (OpenAI's default), or the engine's limit if lower."""
    max_tokens = body.max_tokens if body.max_tokens is not None else min(16, engine.max_new_tokens)
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=tuple(body.stop or ()), seed=body.seed)


def _add_generation_routes(app: FastAPI, engine, metrics: Metrics) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(engine, metrics, request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        prompt = engine.chat_prompt([m.as_dict() for m in body.messages])
        return await _generate(engine, metrics, request, body, prompt, chat=True)


_PREPARE_WAIT_S = 10.0  # how long a request waits for its adapter's load before the answer (or the stream) starts


async def _generate(engine, metrics, request: Request, body, prompt, *, chat: bool):
    adapter = None if body.model == engine.base_name else body.model
    # the engine checks the request first (its adapter exists: the one look at the disk; token limits; tokenizing
    # once), off the event loop: RequestError -> 400, and nothing is loaded for a request that is refused
    try:
        checked = await run_in_threadpool(engine.check, prompt, adapter, _params(engine, body))
    except AdapterFileError:
        raise
    except AdapterError:  # unknown: 404 listing what exists
        raise _no_such_model(engine, body.model) from None
    try:  # then its adapter: a folder that cannot load is a 422 with its reason, even before a stream starts
        await engine.prepare_async(adapter, _PREPARE_WAIT_S)  # waits on the event loop, not on a pool thread
    except AdapterFileError as err:
        if adapter is not None and not engine.registry.exists(adapter):  # its folder went away (deleted while loaded)
            raise _no_such_model(engine, body.model) from None
        raise ApiError(422, f"model {body.model!r} cannot be served: {one_line(err)}", param="model") from None
    handle = engine.enqueue(checked)
    reply = _Reply(body.model, chat, metrics, request.url.path)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(handle, reply, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    text, last = [], None
    try:
        async for event in handle.aevents():
            reply.first_token()
            text.append(event.text)
            last = event
    finally:
        watcher.cancel()
        if last is None or last.finish_reason is None:  # this handler was cancelled: so is its request
            handle.cancel()
    if last is not None and last.finish_reason == "error" and last.refused:  # the adapter's load failed after all
        if adapter is not None and not engine.registry.exists(adapter):  # its folder went away (deleted while loaded)
            raise _no_such_model(engine, body.model)
        raise ApiError(422, f"model {body.model!r} cannot be served: {one_line(last.error)}", param="model")
    if last is None or last.finish_reason == "error":
        status = 503 if last is not None and last.unavailable else 500  # 503: busy now, a retry may succeed
        raise ApiError(status, f"generation failed: {one_line(last.error) if last else 'no result'}", kind="server_error")
    reply.finished(last)
    return reply.full("".join(text), last)


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """The body is read, so the next message is the disconnect (or the end of the response)."""
    message = await request.receive()
    if message["type"] == "http.disconnect":
        handle.cancel()


async def _stream(handle, reply: "_Reply", include_usage: bool):
    done = False
    try:
        if reply.chat:
            yield reply.sse(reply.chunk({"role": "assistant", "content": ""}, None))
        async for event in handle.aevents():
            reply.first_token()
            if event.finish_reason == "error":
                code = 422 if event.refused else 503 if event.unavailable else 500
                yield reply.sse({"error": {"message": f"generation failed: {one_line(event.error)}",
                                           "type": "invalid_request_error" if code == 422 else "server_error",
                                           "param": "model" if code == 422 else None, "code": code}})
                break
            if event.text or event.finish_reason is not None:
                content = {"content": event.text} if reply.chat else event.text
                yield reply.sse(reply.chunk(content if event.text or not reply.chat else {}, event.finish_reason))
            if event.finish_reason is not None:
                reply.finished(event)
                if include_usage:
                    yield reply.sse(reply.usage_chunk(event))
        done = True
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the response has started: say so in the stream, log the rest
        log.error("stream failed", exc_info=exc)
        yield reply.sse({"error": {"message": "internal server error; the server log has the details",
                                   "type": "server_error", "param": None, "code": 500}})
    finally:
        if not done:
            handle.cancel()  # the client went away (or the stream failed): free the slot


# The engine's finish reasons as OpenAI's: a request the drain timeout cut off ("cancelled" inside the engine) is
# "length", OpenAI's value for a completion cut short (clients that switch on finish_reason know it).
_OPENAI_FINISH = {"stop": "stop", "length": "length", "cancelled": "length"}


def openai_finish(reason: str | None) -> str | None:
    return None if reason is None else _OPENAI_FINISH.get(reason, "stop")


class _Reply:
    """OpenAI's response and chunk shapes for one request, and its metrics."""

    def __init__(self, model: str, chat: bool, metrics: Metrics, route: str):
        self.model, self.chat, self.metrics, self.route = model, chat, metrics, route
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created, self.start, self.got_first = int(time.time()), time.perf_counter(), False

    def first_token(self) -> None:
        if not self.got_first:
            self.got_first = True
            self.metrics.first_token.labels(self.route).observe(time.perf_counter() - self.start)

    def finished(self, event) -> None:
        self.metrics.prompt_tokens.labels(self.model).inc(event.prompt_tokens)
        self.metrics.completion_tokens.labels(self.model).inc(event.completion_tokens)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def _usage(event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def full(self, text: str, event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": openai_finish(event.finish_reason)}
            return self._head("chat.completion") | {"choices": [choice], "usage": self._usage(event)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": openai_finish(event.finish_reason)}
        return self._head("text_completion") | {"choices": [choice], "usage": self._usage(event)}

    def chunk(self, content, finish_reason) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": openai_finish(finish_reason)}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": openai_finish(finish_reason)}
        return self._head("text_completion") | {"choices": [choice]}

    def usage_chunk(self, event) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": self._usage(event)}

    @staticmethod
    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
