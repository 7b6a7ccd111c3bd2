"""listen_socket(host, port): the bound socket a local server (rankdial serve, the playground) listens on.

Binding here, before the server starts, turns "address already in use" and friends into one ConfigError that
names the flag to change, instead of a uvicorn stack trace after the model has loaded.
"""

from __future__ import annotations

import socket

from ..errors import ConfigError


def listen_socket(host: str, port: int, *, port_flag: str = "--port", host_flag: str = "--host",
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
        raise ConfigError(f"cannot listen on {host}:{port} ({reason}); choose another {port_flag} (0 picks a free "
                          f"one) or check {host_flag}") from None
    return sock


__all__ = ["listen_socket"]
