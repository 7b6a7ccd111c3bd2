"""The playground's routes: numbers from the library, 4xx naming the field, fair use, cancel, crashes, go-away."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from rankdial.memory import estimate_memory
from rankdial.playground import JobManager, Limits, create_app
from rankdial.playground.jobs import Job


def stepper(job: Job, check) -> None:
    """A stand-in training job: steps of 20 ms each, checking for cancellation as the real one does."""
    job.emit({"type": "run", "rank": job.spec["ranks"][0], "steps": job.spec["steps"]})
    for s in range(1, job.spec["steps"] + 1):
        time.sleep(0.02)
        job.emit({"type": "step", "rank": job.spec["ranks"][0], "step": s, "loss": 1.0 / s})
        check()


def crasher(job: Job, check) -> None:
    job.emit({"type": "run", "rank": 1, "steps": 1})
    raise ZeroDivisionError("division by zero\n  File 'secret.py', line 3")


@pytest.fixture
def client():
    limits = Limits(grace_s=0.5, max_running=2)
    app = create_app(limits, JobManager(limits, runners={"text": stepper, "synthetic": crasher}))
    with TestClient(app) as c:
        c.get("/")  # the visitor's cookie
        yield c


def wait_state(client, job_id, states=("done", "cancelled", "error"), timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/jobs/{job_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {body['state']} after {timeout} s")


def events(client, job_id) -> list[dict]:
    with client.stream("GET", f"/api/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_lora_arithmetic_gives_the_seed_figures(client):
    d = client.get("/api/lora", params=dict(d_in=4096, d_out=4096, r=16, alpha=32)).json()
    assert (d["trainable"], d["a"], d["b"], d["delta_w"]) == (131_072, 65_536, 65_536, 16_777_216)
    assert round(100 * d["share"], 2) == 0.78 and d["scale"] == 2.0
    assert client.get("/api/lora", params=dict(d_in=4096, d_out=4096, r=17)).json()["trainable"] == 17 * 8192


@pytest.mark.parametrize("query, field", [("r=abc", "r"), ("r=0", "r"), ("d_in=-3", "d_in"), ("r=5000", "r"),
                                          ("alpha=nan", "alpha"), ("d_out=1e9", "d_out")])
def test_bad_lora_values_are_422_naming_the_field(client, query, field):
    r = client.get(f"/api/lora?{query}")
    assert r.status_code == 422 and r.json()["field"] == field
    assert field in r.json()["error"] and "Traceback" not in r.text


def test_planner_route_is_estimate_memory(client):
    d = client.get("/api/plan", params=dict(model="llama-70b", rank=16, batch_size=2, seq_len=256)).json()
    for method in ("full", "lora", "qlora"):
        plan = estimate_memory("llama-70b", method=method, rank=16, batch_size=2, seq_len=256)
        assert d["plans"][method]["total_bytes"] == plan.total_bytes
        assert d["plans"][method]["terms"] == plan.terms() and d["plans"][method]["fits"] == plan.fits
    r = client.get("/api/plan", params=dict(model="llama-71b"))
    assert r.status_code == 422 and r.json()["field"] == "model" and "llama-70b" in r.json()["error"]


def test_nf4_panel_quantizes_a_real_weight(client):
    d = client.get("/api/nf4").json()
    assert len(d["levels"]) == 16 and sum(d["histogram"]["counts"]) == d["numel"] > 0
    assert d["bits_plain"] == 4.5 and 4.12 < d["bits_double_quant"] < 4.13
    assert 0 < d["relative_error"] < 0.2
    r = client.get("/api/nf4", params=dict(layer="../../etc/passwd"))
    assert r.status_code == 422 and r.json()["field"] == "layer"


@pytest.mark.parametrize("body, field", [({"ranks": [100]}, "ranks"), ({"ranks": []}, "ranks"),
                                         ({"steps": 10_000}, "steps"), ({"steps": "many"}, "steps"),
                                         ({"examples": 100_000}, "examples"), ({"lr": -1}, "lr"),
                                         ({"task": "chess"}, "task"), ({"ranks": [1, 2, 4, 8, 16]}, "ranks")])
def test_training_caps_are_422_naming_the_field(client, body, field):
    r = client.post("/api/jobs", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_an_oversized_body_is_413(client):
    r = client.post("/api/jobs", content=b'{"ranks": [' + b"1, " * 20_000 + b'1]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_malformed_json_is_422(client):
    r = client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"


def test_a_job_streams_and_one_job_per_client(client):
    job = client.post("/api/jobs", json={"ranks": [4], "steps": 10}).json()["id"]
    second = client.post("/api/jobs", json={"ranks": [4]})
    assert second.status_code == 409 and "one job per visitor" in second.json()["error"]
    got = events(client, job)
    steps = [e["step"] for e in got if e["type"] == "step"]
    assert got[0]["type"] == "start" and got[-1]["type"] == "done" and steps == list(range(1, 11))
    assert client.post("/api/jobs", json={"ranks": [4]}).status_code == 202  # the first has finished


def test_another_client_cannot_see_or_cancel_a_job(client):
    job = client.post("/api/jobs", json={"ranks": [4], "steps": 200}).json()["id"]
    with TestClient(client.app) as other:
        assert other.delete(f"/api/jobs/{job}").status_code == 404
    client.delete(f"/api/jobs/{job}")


def test_the_machine_wide_cap(client):
    first = client.post("/api/jobs", json={"ranks": [4], "steps": 200}).json()["id"]
    others = [TestClient(client.app) for _ in range(2)]
    for other in others:
        other.get("/")  # each its own visitor
    assert others[0].post("/api/jobs", json={"ranks": [4], "steps": 200}).status_code == 202
    busy = others[1].post("/api/jobs", json={"ranks": [4]})
    assert busy.status_code == 429 and "limit" in busy.json()["error"]
    client.delete(f"/api/jobs/{first}")


def test_cancel_stops_the_job(client):
    job = client.post("/api/jobs", json={"ranks": [4], "steps": 200}).json()["id"]
    got = []
    reader = threading.Thread(target=lambda: got.extend(events(client, job)))
    reader.start()
    time.sleep(0.2)
    assert client.delete(f"/api/jobs/{job}").json()["cancelling"]
    reader.join(10)
    assert got[-1]["type"] == "cancelled" and len([e for e in got if e["type"] == "step"]) < 200


def test_a_client_that_goes_away_stops_its_job(client):
    job = client.post("/api/jobs", json={"ranks": [4], "steps": 200}).json()["id"]  # and never listens
    body = wait_state(client, job, timeout=5)
    assert body["state"] == "cancelled" and body["events"] < 60


def test_a_crash_is_an_error_event_and_the_server_goes_on(client):
    job = client.post("/api/jobs", json={"task": "synthetic", "ranks": [1]}).json()["id"]
    last = events(client, job)[-1]
    assert last["type"] == "error" and "ZeroDivisionError" in last["message"] and "secret.py" not in last["message"]
    assert client.get("/api/lora").status_code == 200
    assert client.post("/api/jobs", json={"ranks": [2], "steps": 1}).status_code == 202


def test_no_stack_trace_on_an_internal_error(monkeypatch, client):
    import rankdial.playground.app as app_module

    def boom(*a, **k):
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(app_module, "lora_numbers", boom)
    r = TestClient(client.app, raise_server_exceptions=False).get("/api/lora")
    assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text


@pytest.mark.slow
def test_a_real_text_run_streams_losses_and_its_spectrum():
    with TestClient(create_app()) as c:
        job = c.post("/api/jobs", json={"ranks": [2], "steps": 3, "examples": 16}).json()["id"]
        got = events(c, job)
    assert got[-1]["type"] == "done", got[-1]
    assert [e["step"] for e in got if e["type"] == "step"] == [1, 2, 3]
    assert any(e["type"] == "eval" and e["step"] == 0 for e in got)
    done = next(e for e in got if e["type"] == "run_done")
    assert done["spectrum"] and all(len(row["singular_values"]) == 2 for row in done["spectrum"])
    assert all(0 <= row["rank_90"] <= 2 for row in done["spectrum"])


def test_the_committed_steering_report_is_served_as_written(client):
    from rankdial.playground.claims_and_serving import CLAIMS_REPORT

    d = client.get("/api/steering/report").json()
    if CLAIMS_REPORT.is_file():
        assert d["figures"] == json.loads(CLAIMS_REPORT.read_text())["steering"]
    else:
        assert d["figures"] is None
