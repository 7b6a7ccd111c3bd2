"""Helpers and fixtures for the playground's tests: the app served on 127.0.0.1 (a free port) by uvicorn in a
thread, and Debian's chromium driven by Playwright. Test modules import the fixtures they use.

(Not a conftest.py: a second conftest module would shadow the root one that other tests import by name.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, timeout: float = 20.0):
    """Serve `app` on 127.0.0.1:<free port> in a thread; yields the base URL; stops the server at the end."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the playground did not start on 127.0.0.1:{port} within {timeout} s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server():
    from rankdial.playground import create_app

    with running(create_app()) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}: run `apt-get install -y chromium` "
                    "(Playwright drives that browser; it is never downloaded)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and page errors in page.errors (tests assert it stays empty)."""
    p = browser.new_page()
    p.errors = []
    p.on("console", lambda msg: p.errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    p.on("pageerror", lambda err: p.errors.append(f"page error: {err}"))
    p.set_default_timeout(15_000)
    yield p
    p.close()
