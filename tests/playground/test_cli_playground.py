"""`rankdial playground`: prints its address on 127.0.0.1 and serves the page; a port in use is a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pg_server import free_port


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankdial.cli", "playground", *args]


def test_a_port_in_use_is_an_error_naming_the_flag(capsys):
    from rankdial.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["playground", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_verb_prints_its_address_and_serves_the_page():
    port = free_port()
    proc = subprocess.Popen(cli("--port", str(port)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.strip().startswith(f"rankdial playground on http://127.0.0.1:{port}/"), line
        deadline, page = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert page is not None and page.status_code == 200 and "rankdial playground" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no CDN, no fonts, nothing fetched
        for asset in ("/static/app.js", "/static/charts.js", "/static/style.css"):
            body = httpx.get(f"http://127.0.0.1:{port}{asset}").text
            assert "http://" not in body and "https://" not in body  # nothing fetched from elsewhere
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
