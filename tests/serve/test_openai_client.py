"""The official `openai` client, unchanged, against a live rankdial server on 127.0.0.1 with the real engine."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from rankdial.serve.engine import SamplingParams
from live_server import live_server, make_adapters

pytestmark = pytest.mark.slow  # a real server on the default model with three adapters (~10 s on a shared CPU)

PROMPT = "And the LORD said unto Moses,"
NAMES = ["psalms", "gospels", "prophets"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = make_adapters(tmp_path_factory.mktemp("adapters"), NAMES)
    with live_server(root, api_keys=["test-key"], admin_key="admin-key") as (url, engine):
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="test-key", max_retries=0, timeout=60)


def test_models_lists_base_and_adapters(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server[1].base_name] + sorted(NAMES)


def test_completions_differ_per_adapter_and_match_the_engine(client, server):
    engine = server[1]
    texts = {}
    for model in [engine.base_name] + NAMES:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        texts[model] = r.choices[0].text
        alone = engine.generate(PROMPT, None if model == engine.base_name else model,
                                SamplingParams(max_tokens=12, temperature=0))
        assert texts[model] == alone.text
        assert r.usage.completion_tokens == alone.completion_tokens and r.usage.prompt_tokens == alone.prompt_tokens
        assert r.choices[0].finish_reason in ("stop", "length")
    assert len(set(texts.values())) == len(texts), texts  # every adapter answers differently


def test_streaming_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="gospels", prompt=PROMPT, max_tokens=10, temperature=0)
    stream = client.completions.create(model="gospels", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) >= 3 and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_chat_and_streaming_chat(client):
    messages = [{"role": "system", "content": "Answer from scripture."}, {"role": "user", "content": "Who is my shepherd?"}]
    whole = client.chat.completions.create(model="psalms", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage.total_tokens > 10
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="psalms", messages=messages, max_tokens=10, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    other = client.chat.completions.create(model="prophets", messages=messages, max_tokens=10, temperature=0)
    assert other.choices[0].message.content != whole.choices[0].message.content


def test_seeded_sampling_repeats(client):
    a, b = (client.completions.create(model="psalms", prompt=PROMPT, max_tokens=8, temperature=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_client_errors_are_the_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert "psalms" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="psalms", prompt=PROMPT, max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.completions.create(model="psalms", prompt=PROMPT, max_tokens=10**6)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot(server, stream):
    url, engine = server
    before = engine.stats()["tokens_generated"]
    body = {"model": "psalms", "prompt": PROMPT, "max_tokens": 400, "stream": stream}
    if stream:
        with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": "Bearer test-key"},
                          timeout=30, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # leave after the first token
    else:
        with pytest.raises(httpx.ReadTimeout):  # give up waiting, which closes the connection
            httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer test-key"}, json=body,
                       timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 20
    while engine.stats()["running"] + engine.stats()["waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    assert engine.stats()["tokens_generated"] - before < 400  # cancelled well before max_tokens


def test_metrics_count_what_the_engine_did(client, server):
    client.completions.create(model="prophets", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics", headers={"Authorization": "Bearer test-key"}, timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['rankdial_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert values['rankdial_completion_tokens_total{model="prophets"}'] >= 3
    assert values["rankdial_adapter_cache_misses_total"] >= 1 and values["rankdial_adapters_loaded"] >= 1
    assert values["rankdial_engine_steps_total"] > 0 and "rankdial_batch_size" in values
    # the latency histogram's _count: requests observed, not a time
    assert values['rankdial_request_latency_seconds_count{route="/v1/completions"}'] >= 1


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_a_tiny_temperature_leaves_the_streams_beside_it_whole(client, server, temperature):
    """Issue 18, over HTTP with the openai client: temperature 1e-45 / 1e-300 on /v1/completions is answered
    (greedily) while streams on other adapters run, and those streams end with their normal text."""
    wanted = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
              for m in NAMES[:2]}
    streams = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
               for m in NAMES[:2]}
    firsts = {m: next(iter(s)) for m, s in streams.items()}  # both streams are running
    tiny = client.completions.create(model=NAMES[2], prompt=PROMPT, max_tokens=4, temperature=temperature)
    greedy = client.completions.create(model=NAMES[2], prompt=PROMPT, max_tokens=4, temperature=0)
    assert tiny.choices[0].text == greedy.choices[0].text
    for m, s in streams.items():
        chunks = [firsts[m], *s]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == wanted[m]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
