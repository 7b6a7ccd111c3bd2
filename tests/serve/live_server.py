"""A real server for tests: create_app over a real Engine, uvicorn in a thread on 127.0.0.1 (a free port).

Adapters for the tests are built once per call of make_adapters: the default model loaded once, each adapter
injected into a copy with its own seed and rank and B randomized so it changes the output.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

import rankdial as rd
from rankdial.lora import lora_layers
from rankdial.models import load_model, resolve_model
from rankdial.serve.api import create_app
from rankdial.serve.engine import Engine


def make_adapters(root: Path, names: list[str], ranks=(4, 8, 2)) -> Path:
    """One PEFT folder per name under root, each with its own weights (and one of `ranks`)."""
    base, _ = load_model(resolve_model("default"))
    for i, name in enumerate(names):
        model, r = copy.deepcopy(base), ranks[i % len(ranks)]
        torch.manual_seed(1000 + i)
        rd.inject(model, rd.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"), adapter="default")
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].weight.normal_(0, 0.6 / r ** 0.5)
        rd.save_adapter(model, root / name, "default")
    return root


@contextmanager
def live_server(adapters_dir, **app_kw):
    """Yields (base_url, engine) for a server that stops (and drains its engine) when the block ends."""
    torch.set_num_threads(1)
    engine = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    app = create_app(engine, **app_kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start within 30 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
