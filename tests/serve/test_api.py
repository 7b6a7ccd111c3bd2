"""The HTTP layer alone (routes, OpenAI shapes, errors, keys, limits, metrics) over a double of the engine.

Generation itself, the openai client, load and shutdown are tested against the real engine in
test_openai_client.py and test_serve_load.py.
"""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
from fastapi.testclient import TestClient

import rankdial as rd
from conftest import tiny_model

from rankdial.errors import AdapterError, ConfigError, RequestError
from rankdial.serve.api import ApiLimits, create_app
from fake_engine import FakeEngine, FakeRegistry


def client(engine=None, **kw) -> TestClient:
    return TestClient(create_app(engine or FakeEngine(), **kw), raise_server_exceptions=False)


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status and "Traceback" not in body["message"]
    return body["message"]


def test_models_lists_base_then_every_adapter():
    with client() as c:
        data = c.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["tiny-base", "alpha", "beta"]
    assert data["data"][1]["parent"] == "tiny-base" and data["data"][1]["rank"] == 4


def test_completion_shape_usage_and_adapter_routing():
    engine = FakeEngine()
    with client(engine) as c:
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "one two three", "max_tokens": 10})
        base = c.post("/v1/completions", json={"model": "tiny-base", "prompt": "one two", "max_tokens": 2})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == " three two one [alpha]" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert base.json()["choices"][0] | {} == {"index": 0, "text": " two one", "logprobs": None,
                                               "finish_reason": "length"}
    assert engine.started and engine.stopped  # the lifespan starts and drains the engine


def test_chat_goes_through_the_chat_template():
    engine = FakeEngine()
    with client(engine) as c:
        r = c.post("/v1/chat/completions", json={"model": "beta", "max_tokens": 50, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    body = r.json()
    assert engine.prompts == ["<system> be brief <user> hi <assistant>"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"].endswith("[beta]")


def sse_payloads(text: str) -> list:
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_is_openai_chunks_then_done(chat):
    req = {"model": "alpha", "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    with client() as c:
        if chat:
            r = c.post("/v1/chat/completions", json=req | {"messages": [{"role": "user", "content": "a b"}]})
        else:
            r = c.post("/v1/completions", json=req | {"prompt": "a b"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(r.text)
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.endswith("[alpha]") and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({c["id"] for c in chunks}) == 1


def test_malformed_json_is_400_and_a_bad_field_is_422_naming_it():
    with client() as c:
        bad_json = c.post("/v1/completions", content=b'{"model": "alpha", "prompt": ', 
                          headers={"content-type": "application/json"})
        zero = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 0})
        typo = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_token": 5})
        missing = c.post("/v1/chat/completions", json={"model": "alpha"})
        top_p = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "top_p": "high"})
    assert "not valid JSON" in error_of(bad_json, 400)
    assert error_of(zero, 422).startswith("max_tokens must be an integer") and zero.json()["error"]["param"] == "max_tokens"
    assert "max_token: unknown field" in error_of(typo, 422)
    assert "messages" in error_of(missing, 422)
    assert 'top_p' in error_of(top_p, 422) and '"high"' in top_p.json()["error"]["message"]
    with client() as c:
        plain = c.post("/v1/completions", content=b'{"model": "alpha", "prompt": "x"}',
                       headers={"content-type": "text/plain"})
        empty = c.post("/v1/completions")
        array = c.post("/v1/completions", json=[1, 2])
        nowhere = c.get("/v1/nowhere")
    for r in (plain, empty, array):
        assert "one JSON object (Content-Type: application/json)" in error_of(r, 422)
    assert "no route GET /v1/nowhere; the routes are /v1/models" in error_of(nowhere, 404)


def test_unknown_model_is_404_listing_those_that_exist():
    with client() as c:
        r = c.post("/v1/completions", json={"model": "gamma", "prompt": "x"})
    msg = error_of(r, 404)
    assert "'gamma'" in msg and "tiny-base, alpha, beta" in msg


def test_engine_request_errors_are_400_and_surprises_a_generic_500():
    with client(FakeEngine(fail_with=RequestError("prompt has 9000 tokens, limit 512"))) as c:
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
    assert "9000 tokens" in error_of(r, 400)
    secret = "ZeroDivisionError at /srv/secret/path.py line 3"
    with client(FakeEngine(fail_with=RuntimeError(secret))) as c:
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
    msg = error_of(r, 500)
    assert "internal server error" in msg and "secret" not in r.text and "RuntimeError" not in r.text


def test_bearer_keys_guard_every_route():
    with client(api_keys=["k1", "k2"]) as c:
        for path in ("/v1/models", "/health", "/metrics"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer k2"}).status_code == 200
        r = c.post("/v1/completions", content=b"{not json", headers={"Authorization": "Basic k1"})
    assert "API key" in error_of(r, 401)  # refused before the body is even read


def test_admin_key_for_load_by_path_and_unload():
    engine = FakeEngine()
    admin = {"Authorization": "Bearer boss"}
    with client(engine, admin_key="boss") as c:
        by_name = c.post("/v1/adapters", json={"name": "alpha"})
        by_path = c.post("/v1/adapters", json={"name": "new", "path": "/elsewhere/new"})
        unload = c.delete("/v1/adapters/beta")
        assert by_name.status_code == 200 and by_name.json()["loaded"] is True  # pinning: the admin's (below)
        assert "admin key" in error_of(by_path, 403) and "admin key" in error_of(unload, 403)
        assert c.post("/v1/adapters", json={"name": "new", "path": "/elsewhere/new"}, headers=admin).json()["loaded"]
        assert c.delete("/v1/adapters/new", headers=admin).json() | {} == {"id": "new", "object": "model",
                                                                             "deleted": True, "loaded": False}
        # known but not loaded: nothing was freed, and the answer says so
        assert c.delete("/v1/adapters/beta", headers=admin).json() | {} == {"id": "beta", "object": "model",
                                                                              "deleted": False, "loaded": False}
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-base", "alpha"]
    assert engine.registry.calls == [("load", "alpha", None, False), ("load", "new", "/elsewhere/new", True),
                                     ("unload", "new"), ("unload", "beta")]


def test_adapter_names_must_be_plain_folder_names():
    with client() as c:
        for name in ("../etc", "/abs", "a/b", ".hidden", "", "_x", "a.b"):
            r = c.post("/v1/adapters", json={"name": name})
            msg = error_of(r, 422)
            assert msg.startswith("name must be a plain folder name") and "[A-Za-z" not in msg, name
            assert r.json()["error"]["param"] == "name"
        assert "'nothere'" in error_of(c.post("/v1/adapters", json={"name": "nothere"}), 404)
        assert "base model" in error_of(c.post("/v1/adapters", json={"name": "tiny-base", "path": "/x"}), 400)
        for name in ("_x", "a.b", ".hidden"):
            assert "plain folder name" in error_of(c.delete(f"/v1/adapters/{name}"), 400), name
        # a '/' (even %2F) never reaches the route: the path has one more segment, so no route matches it
        assert "no route DELETE /v1/adapters/../etc" in error_of(c.delete("/v1/adapters/..%2Fetc"), 404)
        # a trailing slash is no route either: the JSON 404, not a bodiless 307 redirect (found by a hostile pass)
        assert "no route DELETE /v1/adapters/" in error_of(c.delete("/v1/adapters/", follow_redirects=False), 404)


def test_the_schema_and_the_registry_share_one_adapter_name_rule():
    from pydantic import ValidationError

    from rankdial.serve.registry import check_adapter_folder_name
    from rankdial.serve.schemas import AdapterLoad

    for name in ("_x", "a.b", "-x", ".x", "a/b", "a" * 129):
        with pytest.raises(AdapterError, match="plain folder name"):
            check_adapter_folder_name(name)
        with pytest.raises(ValidationError, match="plain folder name"):
            AdapterLoad(name=name)
    for name in ("x", "sql-v2", "a_b", "A1", "a" * 128):
        assert check_adapter_folder_name(name) == name == AdapterLoad(name=name).name


def test_an_empty_admin_key_is_no_admin_key():
    engine = FakeEngine()
    with client(engine, admin_key="") as c:
        r = c.post("/v1/adapters", json={"name": "new", "path": "/elsewhere/new"})
    assert r.status_code == 200  # no admin key configured: loading by path is allowed, but only inside the folder
    assert engine.registry.calls == [("load", "new", "/elsewhere/new", False)]


def test_a_non_ascii_bearer_key_is_a_401_not_a_500():
    with client(api_keys=["k1"], admin_key="boss") as c:
        for value in ("Bearer été".encode(), "Bearer été".encode("latin-1"), b"Bearer \xff\xfe"):
            assert "API key" in error_of(c.get("/v1/models", headers={"Authorization": value}), 401), value
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    with client(admin_key="boss") as c:  # the admin check compares bytes too
        r = c.delete("/v1/adapters/beta", headers={"Authorization": "Bearer été".encode()})
        assert "admin key" in error_of(r, 403)
    with client(api_keys=["clé"]) as c:  # a non-ASCII key itself matches its UTF-8 bytes
        assert c.get("/v1/models", headers={"Authorization": "Bearer clé".encode()}).status_code == 200


def test_error_classes_choose_the_status():
    from rankdial.errors import AdapterInUse, Unavailable

    class InUseRegistry(FakeRegistry):
        def unload(self, name):
            raise AdapterInUse(f"adapter {name!r} is in use by 2 running request(s); unload it when they finish")

    with client(FakeEngine(registry=InUseRegistry())) as c:
        assert "in use" in error_of(c.delete("/v1/adapters/alpha"), 409)
    with client(FakeEngine(fail_with=Unavailable("the engine is shutting down and takes no new requests"))) as c:
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
        assert "shutting down" in error_of(r, 503) and r.json()["error"]["type"] == "server_error"
    with client(FakeEngine(fail_with=RequestError("prompt is too long"))) as c:
        assert "too long" in error_of(c.post("/v1/completions", json={"model": "alpha", "prompt": "x"}), 400)


def test_a_generation_error_is_503_when_temporary_and_500_otherwise():
    from fake_engine import Event

    class FailingHandle:
        def __init__(self, unavailable):
            self.unavailable = unavailable

        async def aevents(self):
            yield Event("", "error", 1, 0, "adapter 'alpha' found no room in the adapter budget", self.unavailable)

        def cancel(self):
            pass

    for unavailable, status in ((True, 503), (False, 500)):
        engine = FakeEngine()
        engine.enqueue = lambda *a, u=unavailable: FailingHandle(u)
        with client(engine) as c:
            r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
            assert "no room in the adapter budget" in error_of(r, status)
            chunks = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "stream": True}).text
            assert f'"code":{status}' in chunks


def test_body_size_limit():
    with client(limits=ApiLimits(max_body_bytes=300)) as c:
        big = c.post("/v1/completions", json={"model": "alpha", "prompt": "x " * 400})
        chunked = c.post("/v1/completions", content=iter([b'{"model": "alpha", "prompt": "', b"y" * 400, b'"}']),
                         headers={"content-type": "application/json"})
        ok = c.post("/v1/completions", json={"model": "alpha", "prompt": "a b c d e", "max_tokens": 8})
    assert "limit of 300 bytes" in error_of(big, 413) and "limit of 300 bytes" in error_of(chunked, 413)
    assert ok.status_code == 200
    with pytest.raises(ConfigError, match="max_body_bytes must be a positive integer, got 0"):
        ApiLimits(max_body_bytes=0)


def test_default_max_tokens_is_16_or_the_engines_limit_if_lower():
    engine = FakeEngine(max_new_tokens=3)
    with client(engine) as c:
        c.post("/v1/completions", json={"model": "alpha", "prompt": "a b c d e"})
    assert engine.handles[0].max_tokens == 3


def test_metrics_in_prometheus_format_per_app():
    apps = [client(), client()]
    with apps[0] as a, apps[1] as b:
        a.post("/v1/completions", json={"model": "alpha", "prompt": "one two", "max_tokens": 5})
        a.post("/v1/completions", json={"model": "zzz", "prompt": "x"})
        text = a.get("/metrics").text
        other = b.get("/metrics").text
    assert 'rankdial_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'rankdial_requests_total{route="/v1/completions",status="404"} 1.0' in text
    assert 'rankdial_completion_tokens_total{model="alpha"} 3.0' in text
    # the histogram's _count: how many requests it observed (two), not a time
    assert 'rankdial_request_latency_seconds_count{route="/v1/completions"} 2.0' in text
    for name in ("rankdial_adapter_cache_hits_total", "rankdial_adapter_cache_misses_total",
                 "rankdial_adapter_cache_evictions_total", "rankdial_adapters_loaded", "rankdial_batch_size 3.0",
                 "rankdial_time_to_first_token_seconds_bucket"):
        assert name in text
    assert 'route="/v1/completions"' not in other  # a second app counts only its own requests


def test_stream_cancelled_when_consumer_stops_early():
    engine = FakeEngine(delay=0.01)
    with client(engine) as c:
        with c.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": "w " * 200,
                                                        "max_tokens": 150, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
    assert engine.handles[0].cancelled


# ---- security with the real AdapterRegistry (a tiny Llama, adapters written by rankdial) ----

class Boom:
    """Unpickling this would create the file `path`: the proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture
def real_registry(tmp_path):
    from rankdial.serve.registry import AdapterRegistry

    root, outside = tmp_path / "adapters", tmp_path / "outside"
    root.mkdir()
    for folder in (root / "good", outside / "secret"):
        model = tiny_model("llama")
        rd.inject(model, rd.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter="default")
        rd.save_adapter(model, folder, "default")
    (root / "link").symlink_to(outside / "secret")  # a symlink out of the adapters folder
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((root / "good" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Boom(tmp_path / "PWNED")))
    return AdapterRegistry(tiny_model("llama"), root), tmp_path


def test_names_and_paths_cannot_leave_the_adapters_folder(real_registry):
    registry, tmp = real_registry
    with client(FakeEngine(registry=registry)) as c:
        assert c.post("/v1/adapters", json={"name": "good"}).json()["loaded"] is True
        for path in ("../outside/secret", str(tmp / "outside" / "secret"), "link", "good/../../outside/secret"):
            r = c.post("/v1/adapters", json={"name": "x1", "path": path})
            assert "outside the adapters folder" in error_of(r, 400), path
        assert "outside the adapters folder" in error_of(c.post("/v1/adapters", json={"name": "link"}), 400)
        for model in ("../good", "good/", "/good"):
            assert error_of(c.post("/v1/completions", json={"model": model, "prompt": "x"}), 404)
        r = c.post("/v1/adapters", json={"name": "pickled"})
        assert "pickle" in error_of(r, 400) and not (tmp / "PWNED").exists()
        assert [m["id"] for m in c.get("/v1/models").json()["data"] if m.get("loaded")] == ["good"]


def test_admin_key_allows_a_path_outside_and_nothing_else_does(real_registry):
    registry, tmp = real_registry
    secret = str(tmp / "outside" / "secret")
    with client(FakeEngine(registry=registry), api_keys=["user"], admin_key="boss") as c:
        user, boss = {"Authorization": "Bearer user"}, {"Authorization": "Bearer boss"}
        assert error_of(c.post("/v1/adapters", json={"name": "sec", "path": secret}, headers=user), 403)
        assert c.post("/v1/adapters", json={"name": "sec", "path": secret}, headers=boss).json()["loaded"] is True
        assert "sec" in [m["id"] for m in c.get("/v1/models", headers=user).json()["data"]]
        assert error_of(c.delete("/v1/adapters/sec", headers=user), 403)
        assert c.delete("/v1/adapters/sec", headers=boss).status_code == 200
        assert error_of(c.post("/v1/adapters", json={"name": "pk2", "path": "pickled"}, headers=boss), 400)
    assert not (tmp / "PWNED").exists()


def test_serve_flags_are_checked_before_anything_loads(capsys):
    from rankdial.cli import main

    assert main(["serve", "--max-tokens", "0", "--budget-mb", "-1", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-tokens must be positive, got 0" in err
    assert "--budget-mb must be positive, got -1.0" in err and "--port must be in 0-65535" in err


@pytest.mark.parametrize("chat", [False, True])
def test_a_request_cut_off_at_shutdown_ends_with_an_openai_finish_reason(chat):
    """Issue 18: finish_reason "cancelled" (the drain timeout) is not one of OpenAI's values; it is "length"."""
    from types import SimpleNamespace

    from rankdial.serve.api import _Reply
    from rankdial.serve.metrics import Metrics

    reply = _Reply("alpha", chat, Metrics(FakeEngine()), "/v1/completions")
    event = SimpleNamespace(finish_reason="cancelled", prompt_tokens=3, completion_tokens=2)
    full, chunk = reply.full("cut", event), reply.chunk({} if chat else "", "cancelled")
    assert full["choices"][0]["finish_reason"] == chunk["choices"][0]["finish_reason"] == "length"
    openai_values = {"stop", "length", "content_filter", "tool_calls", "function_call"}
    for reason in ("stop", "length", "cancelled"):
        assert reply.full("x", SimpleNamespace(**vars(event) | {"finish_reason": reason}))["choices"][0][
            "finish_reason"] in openai_values


def test_pinning_and_unpinning_need_the_admin_key():
    """Issue 19: any API-key holder could pin adapters until the budget was full; pin true/false needs the admin
    key when one is configured (loading by name does not)."""
    with client(api_keys=["user"], admin_key="boss") as c:
        user, boss = {"Authorization": "Bearer user"}, {"Authorization": "Bearer boss"}
        for pin in (True, False):
            e = error_of(c.post("/v1/adapters", json={"name": "alpha", "pin": pin}, headers=user), 403)
            assert "admin key" in e
            assert c.post("/v1/adapters", json={"name": "alpha", "pin": pin}, headers=boss).status_code == 200
        assert c.post("/v1/adapters", json={"name": "alpha"}, headers=user).status_code == 200
    with client() as c:  # no admin key configured: pinning is open, as every route is
        assert c.post("/v1/adapters", json={"name": "alpha", "pin": True}).status_code == 200


def test_vllm_adapter_routes_are_aliases_under_the_same_admin_rules(real_registry):
    """Issue 18 (router-ready): vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter load and unload as
    rankdial's own routes do, answer as vLLM does, and need the admin key where rankdial's need it."""
    registry, tmp = real_registry
    root, secret = tmp / "adapters", str(tmp / "outside" / "secret")
    with client(FakeEngine(registry=registry), api_keys=["user"], admin_key="boss") as c:
        user, boss = {"Authorization": "Bearer user"}, {"Authorization": "Bearer boss"}
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": str(root / "good")}, headers=user)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'good' added successfully."  # by name
        assert registry.is_loaded("good")
        body = {"lora_name": "sec", "lora_path": secret}
        assert "admin key" in error_of(c.post("/v1/load_lora_adapter", json=body, headers=user), 403)
        assert c.post("/v1/load_lora_adapter", json=body, headers=boss).status_code == 200
        cards = {m["id"]: m for m in c.get("/v1/models", headers=user).json()["data"]}
        assert cards["sec"]["parent"] == cards["good"]["parent"] == "tiny-base" and cards["sec"]["root"] == "sec"
        assert cards["tiny-base"]["parent"] is None and secret not in json.dumps(cards)
        assert error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "../outside/secret"},
                               headers=user), 403)
        assert error_of(c.post("/v1/unload_lora_adapter", json={"lora_name": "sec"}, headers=user), 403)
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "sec"}, headers=boss)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sec' removed successfully."
        assert error_of(c.post("/v1/unload_lora_adapter", json={"lora_name": "sec"}, headers=boss), 404)
        e = c.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": "p", "extra": 1}, headers=boss)
        assert e.status_code == 422 and e.json()["error"]["param"] == "lora_name"


def test_metrics_carry_vllms_lora_requests_info_gauge():
    engine = FakeEngine()
    engine.lora_requests = lambda: {"max_lora": 8, "running": ["alpha", "beta"], "waiting": ["beta"]}
    with client(engine) as c:
        text = c.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("vllm:lora_requests_info{"))
    assert line.startswith('vllm:lora_requests_info{max_lora="8",running_lora_adapters="alpha,beta",'
                           'waiting_lora_adapters="beta"} ')
    assert float(line.split()[-1]) > 1.7e9  # when it was read, as vLLM's


def test_unloading_an_unknown_name_or_the_base_names_the_field_sent(real_registry):
    """An unload's 404 named `model` (a field no unload sends) and offered the base model among what exists."""
    registry, _ = real_registry
    with client(FakeEngine(registry=registry)) as c:
        for name in ("nope", "tiny-base"):
            vllm = c.post("/v1/unload_lora_adapter", json={"lora_name": name})
            own = c.delete(f"/v1/adapters/{name}")
            for r, param in ((vllm, "lora_name"), (own, "name")):
                assert r.status_code in (400, 404), r.text
                e = r.json()["error"]
                assert e["param"] == param and name in e["message"] and "tiny-base," not in e["message"], e


@pytest.mark.parametrize("path", ["x" * 5000, "/" + "y/" * 3000, "~no-such-user-h2/x"])
def test_a_path_the_file_system_refuses_is_a_4xx_naming_the_field(real_registry, path):
    """A path too long for the file system raised OSError out of the routes: a 500 on /v1/load_lora_adapter, a
    dropped connection on /v1/adapters."""
    registry, tmp = real_registry
    with client(FakeEngine(registry=registry), admin_key="boss") as c:
        boss = {"Authorization": "Bearer boss"}
        own = c.post("/v1/adapters", json={"name": "p2", "path": path}, headers=boss)
        vllm = c.post("/v1/load_lora_adapter", json={"lora_name": "p1", "lora_path": path}, headers=boss)
        assert c.post("/v1/adapters", json={"name": "good"}, headers=boss).status_code == 200
    for r, param in ((own, "path"), (vllm, "lora_path")):
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert e["param"] == param and len(e["message"]) < 400 and str(tmp) not in e["message"], e
