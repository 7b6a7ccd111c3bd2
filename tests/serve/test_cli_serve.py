"""`rankdial serve`'s flags: the token limits reach the engine (one source of truth), the listening socket is
bound before the model loads, and the last line tells the truth about requests cancelled at shutdown."""

from __future__ import annotations

import gc
import signal
import socket

import pytest
from fastapi.testclient import TestClient

from rankdial.cli import build_parser, cmd_serve
from rankdial.errors import ConfigError
from rankdial.local_server import listen_socket
from rankdial.serve.launch import app_from_args, check_serve_flags


def serve_args(*flags):
    return build_parser().parse_args(["serve", "--port", "0", *flags])


def test_token_limit_flags_reach_the_engine_and_are_enforced_once():
    app, line = app_from_args(serve_args("--max-tokens", "8", "--max-prompt-tokens", "5"), freeze_gc=False)
    engine = app.state.engine
    assert (engine.max_new_tokens, engine.max_prompt_tokens) == (8, 5)
    assert "max_tokens <= 8" in line and "prompt <= 5 tokens" in line
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda *a, **k: calls.append(a) or encode(*a, **k)
    with TestClient(app, raise_server_exceptions=False) as c:
        many = c.post("/v1/completions", json={"model": engine.base_name, "prompt": "Jesus wept", "max_tokens": 9})
        calls.clear()
        long = c.post("/v1/completions", json={"model": engine.base_name, "prompt": "In the beginning God created "
                                                                                   "the heaven and the earth"})
        long_calls = len(calls)
        ok = c.post("/v1/completions", json={"model": engine.base_name, "prompt": "Jesus wept", "max_tokens": 8})
    assert many.status_code == 400 and "limit of 8" in many.json()["error"]["message"]
    assert long.status_code == 400 and "limit of 5" in long.json()["error"]["message"]
    assert long_calls == 1  # the prompt is tokenized once, by the engine
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 8


def test_bad_flags_are_named_together():
    with pytest.raises(ConfigError, match="--drain-timeout must be positive.*--port must be in 0-65535"):
        check_serve_flags(serve_args("--drain-timeout", "0", "--port", "70000"))


@pytest.mark.parametrize("cancelled, says", [(0, "every request in flight was answered"),
                                              (2, "2 request(s) still running after --drain-timeout 1.5 s were "
                                                  "cancelled")])
def test_the_last_line_tells_how_many_requests_were_cancelled(monkeypatch, capsys, cancelled, says):
    import uvicorn

    seen = {}

    def run(server, sockets):  # instead of serving: what the lifespan's engine.shutdown() reported
        seen["drain"] = server.config.app.state  # the app cmd_serve built
        seen["grace"] = server.config.timeout_graceful_shutdown
        try:  # listening when the address is printed: a client that connects at once is not refused
            socket.create_connection(sockets[0].getsockname()[:2], timeout=2).close()
            seen["refused"] = False
        except ConnectionRefusedError:
            seen["refused"] = True
        server.config.app.state.cancelled_at_shutdown = cancelled
        [s.close() for s in sockets]

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    try:
        assert cmd_serve(serve_args("--drain-timeout", "1.5")) == 0
    finally:
        gc.unfreeze()
        seen["drain"].engine.shutdown(drain=False)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"rankdial serve: stopped; {says}"
    assert not seen["refused"] and 1.5 <= seen["grace"] <= 5  # uvicorn's wait for connections is bounded by the drain


def test_ctrl_c_says_too_how_many_requests_were_cancelled(monkeypatch, capsys):
    """Ctrl-C drains as SIGTERM does and then exits 130 (KeyboardInterrupt); the line saying what became of the
    requests in flight is printed before (it was printed after SIGTERM only)."""
    import uvicorn

    seen = {}

    def run(server, sockets):
        seen["app"] = server.config.app
        server.config.app.state.cancelled_at_shutdown = 3
        [s.close() for s in sockets]
        raise KeyboardInterrupt

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    try:
        with pytest.raises(KeyboardInterrupt):
            cmd_serve(serve_args("--drain-timeout", "2"))
    finally:
        gc.unfreeze()
        seen["app"].state.engine.shutdown(drain=False)
    assert capsys.readouterr().out.strip().splitlines()[-1] == ("rankdial serve: stopped; 3 request(s) still running "
                                                                "after --drain-timeout 2 s were cancelled")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "0.0000001"])
def test_a_budget_that_is_not_a_finite_positive_size_is_refused_naming_the_flag(value):
    with pytest.raises(ConfigError, match="--budget-mb"):
        check_serve_flags(serve_args("--budget-mb", value))
    with pytest.raises(ConfigError, match="--drain-timeout must be a finite"):
        check_serve_flags(serve_args("--drain-timeout", "inf"))


@pytest.mark.slow
def test_startup_warnings_and_a_budget_too_small_for_an_adapter(tmp_path):
    from engine_helpers import make_adapter

    make_adapter(tmp_path / "ad0", seed=1, r=4)
    (tmp_path / "half").mkdir()  # a folder with no adapter in it: said at start-up, not at the first request
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    app, _ = app_from_args(serve_args("--adapters", str(tmp_path), "--budget-mb", "0.001", "--host", "0.0.0.0",
                                      "--max-tokens", "4096", "--max-prompt-tokens", "9000"), freeze_gc=False)
    warnings = app.state.startup_warnings
    assert len(warnings) == 4 and all("\n" not in w for w in warnings)
    assert "1 adapter folder(s) cannot be served: half;" in warnings[3] and str(tmp_path) not in warnings[3]
    assert "--host 0.0.0.0" in warnings[0] and "open to the network" in warnings[0] and "--api-key" in warnings[0]
    assert "--max-tokens 4096" in warnings[1] and "context of 512" in warnings[1] and "--max-prompt-tokens" in warnings[2]
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": "ad0", "prompt": "Jesus wept", "max_tokens": 2, "stream": True})
    assert r.status_code == 422 and "--budget-mb" in r.json()["error"]["message"], r.text
    assert "more than the whole adapter budget" in r.json()["error"]["message"]
    quiet, _ = app_from_args(serve_args("--host", "0.0.0.0", "--api-key", "k"), freeze_gc=False)
    assert quiet.state.startup_warnings == []


@pytest.mark.slow
def test_sigterm_cancels_a_stream_still_running_after_the_drain_timeout(tmp_path):
    """Over HTTP: the first signal starts the engine's drain; a stream still running after --drain-timeout ends
    with finish_reason 'length', OpenAI's value for a cut-short completion (and [DONE]), and the server stops soon after, reporting one cancelled."""
    import json
    import threading
    import time

    import httpx
    import torch

    from rankdial.serve.api import create_app
    from rankdial.serve.engine import Engine
    from rankdial.local_server import make_server
    from rankdial.serve.launch import graceful_seconds

    torch.set_num_threads(1)
    engine = Engine.from_pretrained("default", None, device="cpu", max_new_tokens=512)
    app = create_app(engine, drain_timeout=0.5)
    sock = listen_socket("127.0.0.1", 0, listen=False)
    server = make_server(app, name="rankdial serve", graceful_s=graceful_seconds(0.5),
                         on_first_signal=app.state.begin_drain)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    chunks = []
    body = {"model": engine.base_name, "prompt": "In the beginning", "max_tokens": 500, "stream": True,
            "temperature": 1.0, "seed": 5}  # seed 5: 500 tokens, no end token
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:  # the stream runs: then the signal
            if line.startswith("data: {"):
                break
        start = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        chunks = [line for line in lines if line.startswith("data: ")]
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - start < 10
    finals = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks if c.startswith("data: {")]
    assert finals[-1] == "length" and chunks[-1] == "data: [DONE]"
    assert app.state.cancelled_at_shutdown == 1


def test_batch_and_tokens_in_flight_flags_size_the_kv_cache_and_a_cache_too_large_refuses_the_start(monkeypatch, capsys):
    """Issue 19 defect 2: --max-batch and --max-tokens-in-flight reach the scheduler and size the preallocated KV
    cache; a cache that cannot fit is refused at start-up in one line naming the flags to lower."""
    import rankdial.serve.runner as runner_mod
    from rankdial.cli import main

    app, line = app_from_args(serve_args("--max-batch", "3", "--max-tokens-in-flight", "100", "--max-prefill-tokens",
                                         "40"), freeze_gc=False)
    engine = app.state.engine
    try:
        limits = engine.scheduler.limits
        assert (limits.max_batch_size, limits.max_tokens_in_flight, limits.max_prefill_tokens) == (3, 100, 40)
        assert engine.runner.cache.shape[0] == 3 and engine.runner.cache.shape[2] == 100  # slots x tokens per row
        assert "batch <= 3" in line and "KV cache" in line
    finally:
        engine.shutdown(drain=False)
    with pytest.raises(ConfigError, match="--max-batch must be positive.*--max-tokens-in-flight must be positive.*"
                                          "--max-prefill-tokens must be positive"):
        check_serve_flags(serve_args("--max-batch", "0", "--max-tokens-in-flight", "-5", "--max-prefill-tokens", "0"))
    monkeypatch.setattr(runner_mod, "available_bytes", lambda device: 2**20)
    assert main(["serve", "--port", "0", "--max-batch", "64"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (a progress bar beside)
    assert len(errors) == 1 and "KV cache for 64 rows" in errors[0] and "lower --max-batch" in errors[0], errors


def test_tokens_in_flight_too_few_for_any_request_is_refused_at_start():
    # --max-tokens-in-flight 1 started a server that refused every request (one prompt token and one new token
    # need 2): a start-up that can serve nothing is refused naming the flag
    with pytest.raises(ConfigError, match="--max-tokens-in-flight 1 leaves no room"):
        check_serve_flags(serve_args("--max-tokens-in-flight", "1"))
    check_serve_flags(serve_args("--max-tokens-in-flight", "2"))
