"""The local HTTP server under `rankdial serve` and `rankdial playground`: a bound socket, then uvicorn on it.

Both verbs stop the same way. The socket is bound before anything slow loads, so "address already in use" is a
one-line ConfigError naming the flag, not a uvicorn trace after the model has loaded. The first SIGTERM or
Ctrl-C stops taking connections and calls the verb's on_first_signal (the engine's drain, the playground's
ending of event streams and jobs) while uvicorn waits at most graceful_s for the open connections. A second
Ctrl-C exits at once with 130. Once the server has stopped, SIGTERM ends the verb normally (exit 0) and Ctrl-C
raises KeyboardInterrupt (every verb's exit 130), instead of uvicorn's re-raising of the signal inside its event
loop, which logs the lifespan's cancellation as a trace.

uvicorn is imported only when a server is made, so importing this module (as the command line's parser does
not, but a caller may) costs nothing for `rankdial --help`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import threading
from typing import Callable

from .errors import ConfigError


def url_host(host: str) -> str:
    """`host` as it stands in a URL: an IPv6 address in brackets (http://[::1]:8000/)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def listen_socket(host: str, port: int, *, port_flag: str = "--port", host_flag: str | None = "--host",
                  listen: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port) and, with listen, listening (port 0: a free one; read it back with
    getsockname()). listen=False: bound only (connections are refused until the server listens, e.g. uvicorn's
    create_server(sock=...)), for a server that loads for long before it can answer.

    Raises ConfigError naming the flags (port_flag / host_flag) when the port is out of range, the address is
    in use or the host cannot be bound."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{port_flag} must be in 0-65535 (0 picks a free one), got {port!r}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        if listen:
            sock.listen(128)  # from here a client that comes after the address is printed waits, it is not refused
    except OSError as err:
        sock.close()
        reason = err.strerror or type(err).__name__
        check = f" or check {host_flag}" if host_flag else ""  # a verb without a host flag names none
        raise ConfigError(f"cannot listen on {host}:{port} ({reason}); choose another {port_flag} (0 picks a free "
                          f"one){check}") from None
    return sock


def make_server(app, *, name: str, graceful_s: float, on_first_signal: Callable[[], None] | None = None,
                log_level: str = "warning", access_log: bool = False):
    """The uvicorn server for `app` (lifespan on), stopping as the module docstring says; `name` ("rankdial
    serve") begins the line a second Ctrl-C prints. Its stopped_by is the first signal that stopped it, if any."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=graceful_s)
    return _server_class()(config, name=name, on_first_signal=on_first_signal)


def run(app, sock: socket.socket, *, name: str, graceful_s: float, on_first_signal: Callable[[], None] | None = None,
        log_level: str = "warning", access_log: bool = False) -> None:
    """Serve `app` on the bound socket until a signal stops it (the options are make_server's); closes the socket.

    Returns after SIGTERM (or a stop from within); raises KeyboardInterrupt after Ctrl-C, once the server has
    stopped, so the verb ends as every verb does on Ctrl-C."""
    server = make_server(app, name=name, graceful_s=graceful_s, on_first_signal=on_first_signal, log_level=log_level,
                         access_log=access_log)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if server.stop_thread is not None:
            server.stop_thread.join(30)  # the callback started what the shutdown waited for: it has ended by now
    if server.stopped_by == signal.SIGINT:
        raise KeyboardInterrupt


@functools.cache
def _server_class():
    """The uvicorn.Server subclass, made on first use so that uvicorn (an extra) is imported only then."""
    import uvicorn

    class LocalServer(uvicorn.Server):
        """uvicorn's server with one stopping behaviour for every local verb (see the module docstring)."""

        def __init__(self, config, *, name: str, on_first_signal: Callable[[], None] | None = None):
            super().__init__(config)
            self.name, self.on_first_signal, self.stopped_by = name, on_first_signal, None
            self.stop_thread: threading.Thread | None = None  # runs on_first_signal (run() waits for it)

        def handle_exit(self, sig, frame) -> None:
            # a signal handler runs on the main thread between two bytecodes, possibly inside the previous
            # signal's handler (`timeout` sends SIGTERM to the process and its group: two at once) or inside code
            # that holds a lock the callback needs: so the first signal is marked before anything else, and the
            # callback runs on a thread of its own, never in the handler (it hung forever, found by a hostile pass)
            first = self.stopped_by is None and not self.should_exit
            if not first and sig == signal.SIGINT:
                # uvicorn's own force-exit lets the interpreter tear down while a worker thread is inside torch,
                # which aborts the process ('terminate called without an active exception', exit 134) and hands
                # clients a bare 500: leave at once instead
                print(f"{self.name}: second Ctrl-C: stopping now without draining; requests in flight are dropped",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(130)
            if first:
                self.stopped_by = sig
                if self.on_first_signal is not None:
                    self.stop_thread = threading.Thread(target=self.on_first_signal, name=f"{self.name}: stopping",
                                                        daemon=True)
                    self.stop_thread.start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's, without re-raising the caught signal afterwards (run() ends the verb instead)."""
            if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return LocalServer


__all__ = ["listen_socket", "make_server", "run", "url_host"]
