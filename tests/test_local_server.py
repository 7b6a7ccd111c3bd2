"""rankdial.local_server, the server under `rankdial serve` and the playground: the socket is bound before anything
loads (errors name the flag), the first signal calls the verb's callback once, a second Ctrl-C exits at once
with 130, and a stopped server ends the verb as its signal says (SIGTERM returns, Ctrl-C KeyboardInterrupt)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

import rankdial
from rankdial.errors import ConfigError
from rankdial.local_server import listen_socket, make_server, run


def test_listen_socket_names_the_flag():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            listen_socket("127.0.0.1", port)
        with pytest.raises(ConfigError, match="--web-port must be in 0-65535"):
            listen_socket("127.0.0.1", 70000, port_flag="--web-port")
        sock = listen_socket("127.0.0.1", 0)
        assert sock.getsockname()[1] > 0
        sock.close()
    finally:
        taken.close()


def test_listen_socket_can_bind_without_listening():
    sock = listen_socket("127.0.0.1", 0, listen=False)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sock.getsockname()[:2], timeout=2).close()
        sock.listen()
        socket.create_connection(sock.getsockname()[:2], timeout=2).close()
    finally:
        sock.close()


def started_app(started: threading.Event):
    """A bare ASGI app whose lifespan startup sets `started` (and answers nothing else)."""
    async def app(scope, receive, send):
        if scope["type"] != "lifespan":
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                started.set()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    return app


def signal_when_started(started: threading.Event, sig: int) -> threading.Thread:
    def send():
        assert started.wait(30)
        os.kill(os.getpid(), sig)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_calls_the_callback_once_and_ends_the_verb_as_the_signal_says(sig, capfd):
    started, calls, reraised = threading.Event(), [], []
    record = lambda s, frame: reraised.append(s)  # noqa: E731 (the handlers the server must put back, untouched)
    before = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    sock = listen_socket("127.0.0.1", 0)
    sender = signal_when_started(started, sig)
    try:
        if sig == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):  # Ctrl-C: after the server has stopped, as every verb (exit 130)
                run(started_app(started), sock, name="rankdial test", graceful_s=1,
                    on_first_signal=lambda: calls.append(1))
        else:  # SIGTERM: run returns, the verb goes on to its last line (exit 0)
            run(started_app(started), sock, name="rankdial test", graceful_s=1, on_first_signal=lambda: calls.append(1))
        sender.join(5)
        assert calls == [1] and sock.fileno() == -1  # called once; the socket closed
        # the handlers it replaced are back and the signal is not raised again (uvicorn's own re-raise, inside its
        # event loop, logged the lifespan's cancellation as a trace, and SIGTERM's default handler killed the verb)
        assert all(signal.getsignal(s) is record for s in before) and reraised == []
        assert "Traceback" not in capfd.readouterr().err
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_second_ctrl_c_exits_at_once_with_130_naming_the_verb(monkeypatch, capsys):
    calls, exits = [], []

    def exit_now(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    server = make_server(started_app(threading.Event()), name="rankdial playground", graceful_s=3,
                         on_first_signal=lambda: calls.append(1))
    assert server.config.timeout_graceful_shutdown == 3
    server.handle_exit(signal.SIGINT, None)
    server.handle_exit(signal.SIGTERM, None)  # a second SIGTERM: still draining, nothing more
    server.stop_thread.join(5)  # the callback runs on its own thread, never inside the signal handler
    assert (calls, exits, server.should_exit, server.stopped_by) == ([1], [], True, signal.SIGINT)
    with pytest.raises(SystemExit):
        server.handle_exit(signal.SIGINT, None)
    assert exits == [130] and calls == [1]
    assert capsys.readouterr().err == ("rankdial playground: second Ctrl-C: stopping now without draining; requests "
                                       "in flight are dropped\n")


def test_importing_it_does_not_import_uvicorn():
    code = "import sys, rankdial.local_server; print('uvicorn' in sys.modules)"
    src = os.path.dirname(os.path.dirname(rankdial.__file__))  # this checkout's rankdial, first on the path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_arriving_inside_the_first_ones_handler_never_hangs(monkeypatch, second):
    """`timeout` sends SIGTERM to the process and to its group: the second arrived while the first handler was
    starting the drain (inside Thread.start's wait), called the drain again and blocked forever on its lock
    (found by a hostile pass; only SIGKILL ended the server). The first signal is marked before anything runs,
    and the callback, which takes locks, runs on its own thread."""
    exits, calls, lock = [], [], threading.Lock()
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))

    def drain():  # like serve's begin_drain: under a lock that is not re-entrant
        with lock:
            calls.append(1)

    server = make_server(started_app(threading.Event()), name="rankdial serve", graceful_s=1, on_first_signal=drain)
    real_start = threading.Thread.start

    def start_with_a_signal_inside(thread):  # the second signal lands while the first handler starts the thread
        threading.Thread.start = real_start
        server.handle_exit(second, None)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_with_a_signal_inside)
    done = threading.Event()
    with lock:  # the main thread holds the lock the callback needs, as code interrupted by a signal may
        worker = threading.Thread(target=lambda: (server.handle_exit(signal.SIGTERM, None), done.set()), daemon=True)
        real_start(worker)
        assert done.wait(10), "the signal handler hung"
    server.stop_thread.join(10)
    assert calls == [1] and server.should_exit and server.stopped_by == signal.SIGTERM
    assert exits == ([130] if second == signal.SIGINT else [])


def test_an_ipv6_host_is_bracketed_in_urls_and_a_verb_without_host_flag_names_none():
    from rankdial.local_server import url_host

    assert (url_host("::1"), url_host("::"), url_host("127.0.0.1"), url_host("[::1]")) == ("[::1]", "[::]",
                                                                                         "127.0.0.1", "[::1]")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(ConfigError) as err:  # the playground has --port but no --host
            listen_socket("127.0.0.1", taken.getsockname()[1], host_flag=None)
        assert "--port" in str(err.value) and "--host" not in str(err.value) and "check" not in str(err.value)
    finally:
        taken.close()
