"""The playground calls the library's one home for each thing: the scaling formula, the synthetic task, the
steering claim, the device choice, the model-loading lock, and a socket bound before uvicorn serves it."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from rankdial.errors import ConfigError
from rankdial.playground import JobManager, Limits, create_app
from rankdial.playground.jobs import Job


def idle(job, check) -> None:
    job.emit({"type": "run", "rank": job.spec["ranks"][0]})


@pytest.fixture
def client():
    limits = Limits()
    app = create_app(limits, JobManager(limits, runners={t: idle for t in ("text", "synthetic", "steering")},
                                        device="cpu"), device="cpu")
    with TestClient(app) as c:
        c.get("/")
        yield c


def test_the_scale_is_the_library_formula(client, monkeypatch):
    import rankdial.config

    monkeypatch.setattr(rankdial.config, "lora_scaling", lambda r, alpha, use_rslora=False: 7.5)
    assert client.get("/api/lora", params=dict(r=16, alpha=32)).json()["scale"] == 7.5


def test_the_synthetic_job_uses_the_claims_task(monkeypatch):
    import rankdial.claims.capacity as capacity  # the task's one home: the job and the claim both read it there
    from rankdial.playground.jobs import run_synthetic_job

    small = dict(true_rank=2, d=8, n_train=96, n_eval=16, noise=0.1, seed=3)
    monkeypatch.setattr(capacity, "CLAIMS_TASK", small)
    job = Job("j", "c", {"examples": 24, "ranks": [2], "steps": 2, "alpha": None, "lr": 0.01})
    run_synthetic_job(job, lambda: None)
    task = job.events[0]
    assert (task["true_rank"], task["d"], task["n_train"], task["n_eval"], task["seed"]) == (2, 8, 24, 16, 3)
    assert capacity.rank_as_capacity([2], steps=1)["task"]["d"] == 8


def test_the_steering_job_is_the_claim_at_the_jobs_ranks_and_steps(monkeypatch):
    import rankdial.claims.steering as steering
    from rankdial.playground.claims_and_serving import run_steering_job

    seen = {}

    def fake(ranks, steps, n_facts, log=None, lr_grids=None, device="cpu"):
        seen.update(ranks=ranks, steps=steps, device=device)
        return {"measured": True}

    monkeypatch.setattr(steering, "steers_not_reeducates", fake)
    job = Job("j", "c", {"task": "steering", "ranks": [1, 8], "steps": 7}, device="cpu")
    run_steering_job(job, lambda: None)
    assert seen == {"ranks": [1, 8], "steps": 7, "device": "cpu"}
    assert job.events[-1] == {"type": "steering", "figures": {"measured": True}}


def test_the_playground_modules_import_without_a_cycle():
    """claims_and_serving (panels.py then) imported jobs for its lock and jobs imported its steering runner: the
    lock is models.loading's now, so each module imports on its own, in either order, in a fresh interpreter."""
    import subprocess
    import sys

    for first, second in (("jobs", "claims_and_serving"), ("claims_and_serving", "jobs")):
        code = f"import rankdial.playground.{first}, rankdial.playground.{second}"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    import ast

    import rankdial.playground.claims_and_serving as module

    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "jobs" not in imported and "rankdial.playground.jobs" not in imported  # jobs imports it, never the reverse


def test_a_steering_request_runs_what_it_asks_and_refuses_what_it_would_ignore(client):
    from rankdial.claims.report import SETTINGS

    quick = SETTINGS[True]
    spec = client.post("/api/jobs", json={"task": "steering"}).json()["spec"]
    assert spec == {"task": "steering", "ranks": quick["steer_ranks"], "steps": quick["steer_steps"]}
    with TestClient(client.app) as other:
        other.get("/")
        assert other.post("/api/jobs", json={"task": "steering", "ranks": [8, 1], "steps": 5}).json()["spec"] == \
            {"task": "steering", "ranks": [1, 8], "steps": 5}
    for body, field in (({"lr": 0.01}, "lr"), ({"alpha": 4}, "alpha"), ({"examples": 16}, "examples"),
                        ({"steps": 1000}, "steps"), ({"ranks": [1000]}, "ranks")):
        r = client.post("/api/jobs", json={"task": "steering", **body})
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)


def test_jobs_and_the_serving_engine_take_the_library_device_choice(monkeypatch, tmp_path):
    import rankdial.models.loading as loading
    from rankdial.playground.jobs import _text_config
    from rankdial.playground.claims_and_serving import AdapterShelf
    from rankdial.serve.engine import Engine

    asked = []
    monkeypatch.setattr(loading, "pick_device", lambda name="auto": asked.append(name) or torch.device("cpu"))
    manager = JobManager(Limits(), runners={"text": idle})
    job = manager.start("me", {"task": "text", "ranks": [2], "steps": 4, "alpha": None, "lr": 1e-3, "examples": 8})
    assert asked == ["auto"] and job.device == "cpu"
    job.workdir = tmp_path
    assert _text_config(job, 2, tmp_path / "d.jsonl", tmp_path / "e.jsonl").device == "cpu"
    got = {"starts": 0}

    class FakeEngine:
        def start(self):
            time.sleep(0.01)
            got["starts"] += 1

    def build(cls, base, adapters, device=None, **kw):
        got.update(device=device)
        return FakeEngine()

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(build))
    shelf = AdapterShelf(tmp_path, device="auto")
    askers = [threading.Thread(target=shelf.get_engine) for _ in range(8)]  # requests that arrive together
    [t.start() for t in askers]
    [t.join(10) for t in askers]
    assert got == {"device": "auto", "starts": 1} and isinstance(shelf.engine, FakeEngine)


def test_serve_hands_uvicorn_the_socket_it_bound(monkeypatch):
    import uvicorn

    from rankdial.playground.app import serve

    said, held = [], []

    def run(self, sockets=None):
        (sock,) = sockets
        port = sock.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening already: a client waits
        with socket.socket() as rival, pytest.raises(OSError):
            rival.bind(("127.0.0.1", port))  # the port is ours from the check on: no window for another process
        held.append(port)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    serve(port=0, log=said.append)
    assert held and said == [f"rankdial playground on http://127.0.0.1:{held[0]}/  (Ctrl-C stops it)"]
    for bad in (-1, 99999, "7860", True):
        with pytest.raises(ConfigError, match="--port must be in 0-65535"):
            serve(port=bad, log=said.append)
