"""Under load and at shutdown, against the real engine on the default model (issue 9, item 7).

- 64 concurrent clients over many adapters (and the base), 10% of the requests malformed, a bounded number of
  requests: no 5xx for a valid request, a 4xx for every bad one, and every greedy answer equal to what the same
  request gets alone.
- `rankdial serve` in a subprocess: SIGTERM lets the requests in flight finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from rankdial.serve.engine import SamplingParams
from live_server import live_server, make_adapters

pytestmark = pytest.mark.slow

ADAPTERS = [f"ad{i}" for i in range(8)]
PROMPTS = ["In the beginning God", "Jesus wept", "The LORD is my shepherd", "And it came to pass, when"]
CLIENTS, PER_CLIENT, MAX_TOKENS = 64, 3, 6

BAD = [  # (body, why) — each must get a 4xx, never a 5xx and never a 200
    (b'{"model": "ad1", "prompt": "x", ', "truncated JSON"),
    (b"\xff\xfe not utf-8", "not JSON at all"),
    ({"model": "ad1", "prompt": "x", "max_tokens": 0}, "max_tokens 0"),
    ({"model": "nobody", "prompt": "x"}, "unknown model"),
    ({"model": "ad1", "prompt": "x", "temperature": -1}, "negative temperature"),
    ({"model": "ad1", "prompt": "x", "top_p": 7}, "top_p out of range"),
    ({"model": "ad1"}, "no prompt"),
    ({"model": "ad1", "prompt": "x", "max_tokens": 10**7}, "max_tokens over the limit"),
    ({"model": "../ad1", "prompt": "x"}, "path as model"),
    ({"model": "ad1", "prompt": "", "max_tokens": 2}, "empty prompt"),
    ({"model": "ad1", "prompt": [[1, 2]]}, "nested prompt"),
    ({"model": "ad1", "prompt": "x", "stream": "yes please"}, "stream not a bool"),
]


def plan(seed: int = 0) -> list[dict]:
    """CLIENTS * PER_CLIENT requests, 10% malformed, the rest greedy over adapters + base, some streamed."""
    rng = random.Random(seed)
    total = CLIENTS * PER_CLIENT
    bad_slots = set(rng.sample(range(total), total // 10))
    reqs = []
    for i in range(total):
        if i in bad_slots:
            body, why = BAD[i % len(BAD)]
            reqs.append({"bad": why, "body": body})
        else:
            model = rng.choice(ADAPTERS + ["kjv-llama-tiny"])
            reqs.append({"body": {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": MAX_TOKENS,
                                  "temperature": 0, "stream": rng.random() < 0.2}})
    return reqs


async def send(client: httpx.AsyncClient, req: dict) -> tuple[int, str]:
    body = req["body"]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    if isinstance(body, dict) and body.get("stream") is True:
        async with client.stream("POST", "/v1/completions", **kw) as r:
            if r.status_code != 200:
                return r.status_code, (await r.aread()).decode()
            text, done = [], False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    payload = json.loads(line[6:])
                    if "error" in payload:
                        return 500, line
                    text.append(payload["choices"][0]["text"])
            return (200 if done else 599), "".join(text)
    r = await client.post("/v1/completions", **kw)
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text


async def drive(url: str, reqs: list[dict]) -> list[tuple[int, str]]:
    results: list = [None] * len(reqs)
    queue = list(range(len(reqs)))

    async def worker(client):
        while queue:
            i = queue.pop()
            results[i] = await send(client, reqs[i])

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(CLIENTS))), timeout=150)
    return results


def test_64_concurrent_clients_many_adapters_some_malformed(tmp_path):
    reqs = plan()
    with live_server(make_adapters(tmp_path, ADAPTERS)) as (url, engine):
        results = asyncio.run(drive(url, reqs))
        alone = {}  # the same request with nothing else running
        for req, (status, text) in zip(reqs, results):
            if "bad" in req:
                assert 400 <= status < 500, (req["bad"], status, text)
                continue
            assert status == 200, (req["body"], status, text)
            b = req["body"]
            key = (b["model"], b["prompt"])
            if key not in alone:
                adapter = None if b["model"] == engine.base_name else b["model"]
                alone[key] = engine.generate(b["prompt"], adapter, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)).text
            assert text == alone[key], (key, text, alone[key])
        assert engine.stats()["running"] == 0
    assert len({v for v in alone.values()}) > len(ADAPTERS) // 2  # the adapters really answer differently
    assert sum("bad" in r for r in reqs) == len(reqs) // 10


def start_cli_server(adapters) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "rankdial.cli", "serve", "--adapters", str(adapters), "--port", "0",
                             "--device", "cpu", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 90
    line = ""
    while "http://" not in line:
        line = proc.stdout.readline()
        if (not line and proc.poll() is not None) or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"rankdial serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.split("http://", 1)[1].split("/v1")[0]


def test_sigterm_finishes_requests_in_flight_then_exits(tmp_path):
    proc, address = start_cli_server(make_adapters(tmp_path, ["ad0", "ad1"]))
    url = f"http://{address}"
    results = {}

    def ask(i):
        body = {"model": f"ad{i % 2}", "prompt": PROMPTS[i % 4], "max_tokens": 48, "temperature": 0,
                "stream": i % 2 == 0}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                results[i] = (r.status_code, r.read().decode())
        except httpx.HTTPError as err:
            results[i] = (None, repr(err))

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=10).json()["running"] < 4:  # all four are generating
            assert time.monotonic() < deadline, "the requests never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code == 0, proc.stderr.read()[-2000:]
    for i, (status, body) in sorted(results.items()):
        assert status == 200, (i, status, body)
        if i % 2 == 0:
            assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body, body[-300:]
        else:
            assert json.loads(body)["usage"]["completion_tokens"] == 48
    assert len(results) == 4
    with pytest.raises(httpx.ConnectError):  # and it no longer listens
        httpx.get(url + "/health", timeout=5)


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_with_130_and_no_abort(tmp_path):
    proc, address = start_cli_server(make_adapters(tmp_path, ["ad0"]))
    url = f"http://{address}"

    def ask(i):
        body = {"model": "ad0", "prompt": PROMPTS[i % 4], "max_tokens": 400, "temperature": 0,
                "stream": i % 2 == 0}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                r.read()
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=10).json()["running"] < 2:
            assert time.monotonic() < deadline, "the requests never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert code == 130, (code, err[-2000:])
    assert "terminate called" not in err and "Traceback" not in err and "second Ctrl-C" in err, err[-2000:]
