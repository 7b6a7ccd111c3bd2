"""What a hostile client sent, over the engine double: plain-word 422s naming the top-level field, strict types,
the newer OpenAI fields, bodies that cannot be parsed, long echoed names, pin: false, name rebinding, paths."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

import rankdial as rd
from conftest import tiny_model
from fake_engine import FakeEngine
from rankdial.serve.api import create_app


def client(engine=None, **kw) -> TestClient:
    return TestClient(create_app(engine or FakeEngine(), **kw), raise_server_exceptions=False)


def err(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["code"] == status and "\n" not in e["message"]
    return e


def post(c, body, route="/v1/completions"):
    return c.post(route, json={"model": "alpha", "prompt": "x"} | body)


INTERNALS = ("stop.str", "list[int]", "list[str]", "list[TextPart]", "[A-Za-z", "Input should", "function-after")


@pytest.mark.parametrize("body, param, says", [
    ({"stop": 5}, "stop", "stop must be a string or a list of up to 4 non-empty strings"),
    ({"stop": ["a"] * 5}, "stop", "stop must be a string or a list of up to 4 non-empty strings, got 5 stop sequences"),
    ({"stop": ""}, "stop", "non-empty strings, got an empty string"),
    ({"stop": ["a", ""]}, "stop", "got an empty string at stop[1]"),
    ({"prompt": None}, "prompt", "prompt must be a non-empty string, a list of token ids"),
    ({"prompt": [1, "a", 2.5]}, "prompt", "prompt must be"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number from 0 to 2"),
    ({"max_tokens": True}, "max_tokens", "max_tokens must be an integer"),
    ({"max_tokens": 2.0}, "max_tokens", "max_tokens must be an integer"),
    ({"stream": "yes"}, "stream", "stream must be true or false"),
    ({"stream": 1}, "stream", "stream must be true or false"),
    ({"seed": "7"}, "seed", "seed must be an integer"),
    ({"top_p": True}, "top_p", "top_p must be a number"),
    ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty 0.5 is not supported here"),
    ({"frequency_penalty": -1}, "frequency_penalty", "frequency_penalty -1 is not supported here"),
    ({"logit_bias": {"50": 10}}, "logit_bias", "logit_bias is not supported here"),
    ({"response_format": {"type": "json_object"}}, "response_format", "response_format must be {\"type\": \"text\"}"),
])
def test_bad_fields_get_plain_words_and_the_top_level_param(body, param, says):
    with client() as c:
        e = err(post(c, body), 422)
    assert e["param"] == param and says in e["message"], e
    assert not any(x in e["message"] for x in INTERNALS), e["message"]


def test_chat_content_and_role_errors_are_plain_words():
    with client() as c:
        e = err(c.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": 5}]}), 422)
        assert e["param"] == "messages" and e["message"].startswith("messages must be a non-empty list")
        assert not any(x in e["message"] for x in INTERNALS) and "messages[0].content" in e["message"]


def test_newer_openai_fields_are_accepted():
    engine = FakeEngine()
    with client(engine) as c:
        ok = c.post("/v1/chat/completions", json={
            "model": "alpha", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "a b c"}],
            "max_completion_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "response_format": {"type": "text"}, "stream": False,
            "stream_options": {"include_usage": True, "include_obfuscation": False}})
        both = c.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                                    "max_tokens": 3, "max_completion_tokens": 4})
        null_bias = post(c, {"logit_bias": None, "temperature": 1, "top_p": 1})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 2 and engine.prompts[0].startswith("<system> be brief")
    e = err(both, 422)
    assert e["param"] == "max_completion_tokens" and "differ" in e["message"]
    assert null_bias.status_code == 200


def test_what_the_openai_client_sends_by_default_is_accepted():
    import httpx
    import openai

    app = create_app(FakeEngine())
    with TestClient(app) as tc:
        oc = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=tc, max_retries=0)
        chat = oc.chat.completions.create(model="alpha", messages=[{"role": "developer", "content": "a"},
                                                                   {"role": "user", "content": "b c"}])
        text = oc.completions.create(model="alpha", prompt="x y")
        chunks = list(oc.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "b"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chat.choices[0].message.content and text.choices[0].text and chunks[-1].usage is not None
    assert isinstance(httpx.Client, type)


def test_bodies_that_cannot_be_parsed_say_why():
    deep = b'{"model": "alpha", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with client(limits=__import__("rankdial.serve.api", fromlist=["ApiLimits"]).ApiLimits(max_body_bytes=1 << 20)) as c:
        utf = c.post("/v1/completions", content=b'{"model": "alpha", "prompt": "\xff\xfe"}',
                     headers={"content-type": "application/json"})
        nested = c.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
    assert "not valid UTF-8" in err(utf, 400)["message"] and "encoded as UTF-8" in utf.json()["error"]["message"]
    assert "too deeply" in err(nested, 400)["message"] or "not valid JSON" in nested.json()["error"]["message"]
    assert "There was an error parsing the body" not in utf.text + nested.text


def test_an_echoed_model_name_is_truncated():
    with client() as c:
        r = c.post("/v1/completions", json={"model": "a" * 500_000, "prompt": "x"})
    e = err(r, 404)
    assert len(r.content) < 2000 and "aaa'... does not exist" in e["message"]


def test_pin_false_unpins():
    engine = FakeEngine()
    with client(engine) as c:
        assert c.post("/v1/adapters", json={"name": "alpha", "pin": True}).json()["pinned"] is True
        assert c.post("/v1/adapters", json={"name": "alpha", "pin": False}).json()["pinned"] is False
        assert err(c.post("/v1/adapters", json={"name": "alpha", "pin": "yes"}), 422)["param"] == "pin"
        assert err(c.post("/v1/adapters", json={"name": "alpha", "pin": 1}), 422)["param"] == "pin"


def test_pin_false_unpins_in_the_real_registry(tmp_path):
    from rankdial.serve.registry import AdapterRegistry

    model = tiny_model("llama")
    rd.inject(model, rd.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter="default")
    rd.save_adapter(model, tmp_path / "a1", "default")
    registry = AdapterRegistry(tiny_model("llama"), tmp_path)
    with client(FakeEngine(registry=registry)) as c:
        assert c.post("/v1/adapters", json={"name": "a1", "pin": True}).json()["pinned"] is True
        assert c.post("/v1/adapters", json={"name": "a1"}).json()["pinned"] is True  # absent: left as it was
        assert c.post("/v1/adapters", json={"name": "a1", "pin": False}).json()["pinned"] is False


def test_a_name_is_never_rebound_to_other_weights(tmp_path):
    from rankdial.serve.registry import AdapterRegistry

    root, other = tmp_path / "adapters", tmp_path / "other"
    for folder in (root / "a2", root / "sub", other):
        model = tiny_model("llama")
        rd.inject(model, rd.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter="default")
        rd.save_adapter(model, folder, "default")
    registry = AdapterRegistry(tiny_model("llama"), root)
    with client(FakeEngine(registry=registry), admin_key="boss") as c:
        boss = {"Authorization": "Bearer boss"}
        for name in ("a2", "sub"):  # on disk, not loaded; then loaded
            e = err(c.post("/v1/adapters", json={"name": name, "path": str(other)}, headers=boss), 409)
            assert e["message"] == f"{name} exists; unload it or choose another name" and e["param"] == "name"
            c.post("/v1/adapters", json={"name": name})
        assert c.post("/v1/adapters", json={"name": "new1", "path": str(other)}, headers=boss).status_code == 200
        assert err(c.post("/v1/adapters", json={"name": "new1", "path": str(root / "a2")}, headers=boss), 409)
    assert registry.info("a2").path == str(root / "a2")


def test_a_path_error_never_lists_the_folder_and_names_path(tmp_path):
    from rankdial.serve.registry import AdapterRegistry

    root = tmp_path / "adapters"
    root.mkdir()
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "passwords.txt").write_text("x")
    (secret / "id_rsa").write_text("x")
    registry = AdapterRegistry(tiny_model("llama"), root)
    with client(FakeEngine(registry=registry), admin_key="boss") as c:
        for path in (str(secret), "/etc", str(tmp_path / "nothere")):
            e = err(c.post("/v1/adapters", json={"name": "zz", "path": path},
                           headers={"Authorization": "Bearer boss"}), 400)
            assert e["param"] == "path" and "passwords" not in e["message"] and "id_rsa" not in e["message"]
            assert "passwd" not in e["message"] and "hosts" not in e["message"], e["message"]


def test_unknown_field_names_are_shortened_and_a_surrogate_key_is_an_unknown_field():
    with client() as c:
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "k" * 5000: 1})
        err = r.json()["error"]
        assert r.status_code == 422 and "unknown field" in err["message"]
        assert len(err["message"]) < 200 and len(err["param"]) <= 60
        for body in (b'{"model":"alpha","prompt":"x","\\ud800":1}',
                     b'{"model":"alpha","messages":[{"role":"user","content":"x","\\ud800":1}]}'):
            route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            r = c.post(route, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and "unknown field" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["\u0000", "a\u0000b"])
def test_a_path_with_a_nul_byte_is_a_422_naming_the_field(path):
    # a NUL reached os.path.realpath: a 500 on vLLM's route and a dropped connection on rankdial's own
    with client(admin_key="boss") as c:
        boss = {"Authorization": "Bearer boss"}
        own = c.post("/v1/adapters", json={"name": "p2", "path": path}, headers=boss)
        vllm = c.post("/v1/load_lora_adapter", json={"lora_name": "p1", "lora_path": path}, headers=boss)
    for r, param in ((own, "path"), (vllm, "lora_path")):
        e = err(r, 422)
        assert e["param"] == param and "NUL" in e["message"], e


@pytest.mark.slow
def test_after_an_unexpected_500_the_clients_connection_keeps_working(tmp_path, monkeypatch):
    # uvicorn closes the connection after an exception the app re-raises; without `Connection: close` on the 500,
    # a keep-alive client sent its next request down the closed connection and got 'connection reset'
    import httpx
    from live_server import live_server

    with live_server(tmp_path) as (url, engine), httpx.Client(base_url=url, timeout=30) as c:
        monkeypatch.setattr(engine, "stats", lambda: 1 / 0)
        first = c.get("/health")
        second = c.get("/v1/models")
    e = err(first, 500)
    assert "internal server error" in e["message"] and "ZeroDivision" not in first.text
    assert second.status_code == 200, second.text


@pytest.mark.slow
def test_an_adapter_whose_folder_was_deleted_while_loaded_is_a_404(tmp_path):
    # the first request after the deletion got a 422 "cannot be served: <adapters>/gone is not a folder", the next a
    # 404: a folder that is gone is a model that does not exist, from the first request on
    import shutil

    import httpx
    from engine_helpers import make_adapter
    from live_server import live_server

    make_adapter(tmp_path / "gone", seed=5, r=2, targets=["q_proj"])
    body = {"model": "gone", "prompt": "In the beginning", "max_tokens": 2}
    with live_server(tmp_path) as (url, engine), httpx.Client(base_url=url, timeout=60) as c:
        engine.registry.recheck_s = 0.0  # compare the folder's files on every request
        assert c.post("/v1/completions", json=body).status_code == 200
        shutil.rmtree(tmp_path / "gone")
        answers = [c.post("/v1/completions", json=body) for _ in range(2)]
    for r in answers:
        e = err(r, 404)
        assert e["param"] == "model" and "does not exist" in e["message"], e
