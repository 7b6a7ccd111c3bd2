"""The engine end to end on the embedded default model: every request in a mixed batch gets exactly the greedy
tokens it gets alone, and those equal a plain transformers greedy loop with the adapter applied by PEFT."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rankdial.errors import AdapterError, RequestError, Unavailable
from rankdial.models import load_model, resolve_model
from rankdial.serve import Engine, SamplingParams
from rankdial.serve.scheduler import SchedulerLimits
from engine_helpers import PROMPTS, make_adapter

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for k, r in enumerate([4, 4, 8, 2]):
        make_adapter(root / f"ad{k}", seed=k, r=r)
    make_adapter(root / "attn", seed=9, r=16, targets=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="module")
def engine(adapters_dir):
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    yield eng
    eng.shutdown(drain=False)


def peft_greedy(adapters_dir, adapter: str | None, prompt: str, n: int) -> list[int]:
    """The oracle: transformers' model with the adapter applied by PEFT, greedy, no cache, one token at a time."""
    model, tok = load_model(resolve_model("default"))
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapters_dir / adapter)).eval()
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            if token == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


MIXES = {
    "all_same": ["ad0"] * 5,
    "all_distinct": ["ad0", "ad1", "ad2", "ad3", "attn"],
    "skewed": ["ad1", "ad1", "ad1", "ad1", "ad2", "ad1"],
    "some_none": [None, "ad0", None, "attn", "ad0"],
    "mixed_ranks": ["ad3", "attn", "ad2", "ad0", "ad3", "attn"],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_mixed_batch_equals_each_request_alone(engine, mix):
    rows = MIXES[mix]
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(len(rows))]
    alone = [engine.generate(p, a, GREEDY).token_ids for p, a in zip(prompts, rows)]  # also loads the adapters
    engine.largest_batch = 0
    handles = [engine.submit(p, a, GREEDY) for p, a in zip(prompts, rows)]
    together = [h.result(timeout=60).token_ids for h in handles]
    assert together == alone
    assert all(len(t) == GREEDY.max_tokens for t in together)
    assert engine.largest_batch == len(rows)  # the mixed rows ran together, in one batch


def test_greedy_equals_peft_oracle(engine, adapters_dir):
    rows = [("ad2", PROMPTS[1]), ("attn", PROMPTS[0]), (None, PROMPTS[2])]
    handles = [engine.submit(p, a, GREEDY) for a, p in rows]
    for (a, p), h in zip(rows, handles):
        assert list(h.result(timeout=60).token_ids) == peft_greedy(adapters_dir, a, p, GREEDY.max_tokens)


def test_adapters_change_the_output(engine):
    texts = {a: engine.generate(PROMPTS[0], a, GREEDY).text for a in (None, "ad0", "ad1", "attn")}
    assert len(set(texts.values())) == 4


def test_base_name_is_the_base(engine):
    assert engine.generate(PROMPTS[2], engine.base_name, GREEDY) == engine.generate(PROMPTS[2], None, GREEDY)


def test_same_seed_same_text_and_other_seed_differs(engine):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    first = engine.generate(PROMPTS[3], "ad1", p)
    # the same request again, this time in a batch with others
    others = [engine.submit(q, "ad0", SamplingParams(max_tokens=16, temperature=0.7, seed=k)) for k, q in enumerate(PROMPTS)]
    again = engine.submit(PROMPTS[3], "ad1", p).result(timeout=60)
    [h.result(timeout=60) for h in others]
    assert again.text == first.text
    texts = {engine.generate(PROMPTS[3], "ad1", SamplingParams(max_tokens=16, temperature=1.0, seed=s)).text
             for s in range(4)}
    assert len(texts) > 1


def test_stop_sequence_ends_the_text_before_it(engine):
    full = engine.generate(PROMPTS[0], None, SamplingParams(max_tokens=20, temperature=0))
    stop = full.text[8:12]
    assert stop and stop in full.text
    cut = engine.generate(PROMPTS[0], None, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.completion_tokens < full.completion_tokens


def test_streamed_text_adds_up_and_max_tokens_is_length(engine):
    events = list(engine.submit(PROMPTS[4], "ad2", SamplingParams(max_tokens=7, temperature=0)).events(timeout=60))
    assert [e.finish_reason for e in events] == [None] * 7 + ["length"]
    assert events[-1].completion_tokens == 7 and events[-1].prompt_tokens > 0
    assert "".join(e.text for e in events) == engine.generate(PROMPTS[4], "ad2", SamplingParams(max_tokens=7, temperature=0)).text


def test_bad_requests_are_refused_before_queueing(engine):
    with pytest.raises(AdapterError, match="ad0"):
        engine.submit("hi", "nope", GREEDY)
    with pytest.raises(RequestError, match="empty"):
        engine.submit("", None, GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        engine.submit("hi", None, SamplingParams(max_tokens=100000))
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="messages"):
        engine.chat_prompt([{"role": "robot", "content": "x"}])


def test_chat_prompt_uses_the_template(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "Who wept?"}])
    assert "<|user|>" in prompt and prompt.endswith("<|assistant|>\n")
    assert engine.generate(prompt, "ad0", GREEDY).completion_tokens >= 1


def test_cancel_frees_the_slot(adapters_dir):
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", max_batch_size=1)
    try:
        long = eng.submit(PROMPTS[0], "ad0", SamplingParams(max_tokens=200, temperature=0))
        events = long.events(timeout=60)
        next(events)
        waiting = eng.submit(PROMPTS[1], None, GREEDY)
        long.cancel()
        rest = list(events)
        assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 200
        assert waiting.result(timeout=60).finish_reason == "length"
        assert eng.stats()["running"] == 0
    finally:
        eng.shutdown(drain=False)


def test_requests_joining_mid_flight_match_alone(engine):
    alone = [engine.generate(p, a, SamplingParams(max_tokens=20, temperature=0)).token_ids
             for p, a in zip(PROMPTS[:4], ["ad0", None, "attn", "ad3"])]
    handles = []
    for p, a in zip(PROMPTS[:4], ["ad0", None, "attn", "ad3"]):
        handles.append(engine.submit(p, a, SamplingParams(max_tokens=20, temperature=0)))
        time.sleep(0.02)  # the earlier ones are decoding when the next joins
    assert [h.result(timeout=60).token_ids for h in handles] == alone


def test_no_adapter_starves_behind_a_flood(adapters_dir):
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", max_batch_size=2)
    try:
        flood = [eng.submit(PROMPTS[k % 6], "ad0", SamplingParams(max_tokens=4, temperature=0)) for k in range(12)]
        late = eng.submit(PROMPTS[2], "ad1", SamplingParams(max_tokens=4, temperature=0))
        order, lock = [], threading.Lock()

        def wait(name, h):
            h.result(timeout=60)
            with lock:
                order.append(name)

        threads = [threading.Thread(target=wait, args=(f"f{k}", h)) for k, h in enumerate(flood)]
        threads.append(threading.Thread(target=wait, args=("late", late)))
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert len(order) == 13 and order.index("late") <= 4  # round-robin: admitted right after one flood request
    finally:
        eng.shutdown(drain=False)


def test_shutdown_drains_requests_in_flight(adapters_dir):
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    handles = [eng.submit(p, "ad1", SamplingParams(max_tokens=10, temperature=0)) for p in PROMPTS[:3]]
    eng.shutdown(drain=True, timeout=60)
    assert [h.result(timeout=5).finish_reason for h in handles] == ["length"] * 3
    with pytest.raises(Unavailable, match="shutting down"):  # a 503 from the server
        eng.submit("hi", None, GREEDY)


def test_incremental_detokenization_adds_up_to_the_whole_decode(engine):
    from rankdial.serve.engine import Detokenizer

    tok = engine.tokenizer
    g = torch.Generator().manual_seed(0)
    words = tok.encode("Thou shalt not — naïve café “quoted” 🙏 and… ünïcödé", add_special_tokens=False)
    special = [t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None]
    cases = [words, words[::-1]] + [torch.randint(0, len(tok), (40,), generator=g).tolist() for _ in range(30)]
    cases += [words[:5] + special + words[5:]]
    for ids in cases:
        detok, pieces = Detokenizer(), []
        for k, token in enumerate(ids):
            detok.ids.append(token)
            pieces.append(detok.step(tok, final=k == len(ids) - 1))
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), ids


def test_freeze_gc_freezes_the_objects_alive_and_is_off_by_default(adapters_dir):
    import gc

    gc.unfreeze()
    Engine.from_pretrained("default", str(adapters_dir), device="cpu").shutdown(drain=False)
    assert gc.get_freeze_count() == 0
    try:
        eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", freeze_gc=True)
        assert gc.get_freeze_count() > 10_000  # the model's objects, at least
        assert eng.generate("Jesus wept", "ad0", GREEDY).completion_tokens > 0
        eng.shutdown(drain=False)
    finally:
        gc.unfreeze()


def test_requests_for_a_loaded_adapter_count_as_cache_hits(adapters_dir):
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    try:
        for _ in range(3):
            eng.generate("in the beginning", "ad1", SamplingParams(max_tokens=2, temperature=0))
        stats = eng.stats()
        assert (stats["misses"], stats["hits"]) == (1, 2)
        assert eng.registry.info("ad1").loaded
        assert not eng.registry._in_use  # every request released what it held
    finally:
        eng.shutdown(drain=False)


SIZE_R4 = 4 * (4 * (256 + 256) + 3 * (256 + 768)) * 4 * 4  # one rank-4 all-linear adapter of the default model


def test_eviction_under_load_every_request_ends_right(adapters_dir, engine):
    """A budget of 1.5 adapters, requests for two adapters at once: the second waits for the first's requests to
    release it, is loaded in its place, and every answer equals the request alone."""
    rows = ["ad0", "ad1", None, "ad0", "ad1", "ad0", None, "ad1"]
    params = SamplingParams(max_tokens=8, temperature=0)
    alone = [engine.generate(PROMPTS[k % 6], a, params).token_ids for k, a in enumerate(rows)]
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", budget_bytes=int(1.5 * SIZE_R4))
    try:
        for _ in range(2):  # twice: the second round finds ad1 resident and must evict it for ad0
            handles = [eng.submit(PROMPTS[k % 6], a, params) for k, a in enumerate(rows)]
            results = [h.result(timeout=60) for h in handles]
            assert [r.finish_reason for r in results] == ["length"] * len(rows)
            assert [r.token_ids for r in results] == alone
        assert eng.registry.evictions >= 2 and eng.registry.loaded_bytes <= eng.registry.budget_bytes
        assert not eng.registry._in_use
    finally:
        eng.shutdown(drain=False)


def test_a_row_whose_adapter_left_the_model_fails_alone(adapters_dir, engine):
    """If an adapter leaves the model under a running request (it must not, but a bug could make it), that
    request ends with an error naming only its adapter; the other rows of the batch go on to the right answer."""
    params = SamplingParams(max_tokens=30, temperature=0)
    rows = [("ad0", PROMPTS[0]), (None, PROMPTS[1]), ("ad1", PROMPTS[2])]
    alone = [engine.generate(p, a, params).token_ids for a, p in rows]
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    try:
        for a, p in rows:
            eng.generate(p, a, SamplingParams(max_tokens=1, temperature=0))  # loaded
        handles = [eng.submit(p, a, params) for a, p in rows]
        events = handles[2].events(timeout=60)
        next(events)  # ad1's request is running
        with eng.registry.lock:
            eng.registry._evict("ad1")  # behind the engine's back
        final = list(events)[-1]
        assert final.finish_reason == "error" and "'ad1'" in final.error and "ad0" not in final.error
        assert [h.result(timeout=60).token_ids for h in handles[:2]] == alone[:2]
    finally:
        eng.shutdown(drain=False)


def test_a_full_budget_is_waited_for_with_a_deadline_and_one_read(adapters_dir):
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", budget_bytes=int(1.5 * SIZE_R4),
                                 budget_wait_s=0.3)
    reads, read = [], eng.registry.read
    eng.registry.read = lambda name, *a, **k: reads.append(name) or read(name, *a, **k)
    try:
        eng.registry.pin("ad0")  # the budget holds ad0 for good: ad1 can never fit
        reads.clear()
        busy = eng.submit(PROMPTS[0], None, SamplingParams(max_tokens=400, temperature=0))  # keeps the engine busy
        start = time.monotonic()
        final = list(eng.submit(PROMPTS[1], "ad1", GREEDY).events(timeout=60))[-1]
        assert final.finish_reason == "error" and final.unavailable  # a 503 from the server
        assert "budget" in final.error and "--budget-mb" in final.error and "0.3 s" in final.error
        assert time.monotonic() - start < 10 and not busy.finished  # it did not wait for the busy request
        assert reads == ["ad1"]  # the retries reused the files read once
        assert "ad1" not in eng.registry._held_reads  # given up: the read is dropped
        busy.cancel()
    finally:
        eng.shutdown(drain=False)


def test_racing_first_submits_start_one_engine_thread(adapters_dir, monkeypatch):
    from rankdial.serve import engine as engine_module

    started = []

    class SlowThread(threading.Thread):  # widens the window between "no thread yet" and "thread started"
        def start(self):
            started.append(self)
            time.sleep(0.05)
            super().start()

    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    monkeypatch.setattr(engine_module.threading, "Thread", SlowThread)
    barrier = threading.Barrier(6)
    handles = []

    def submit():
        barrier.wait()
        handles.append(eng.submit(PROMPTS[0], None, SamplingParams(max_tokens=2, temperature=0)))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    try:
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert len([t for t in started if t.name == "rankdial-engine"]) == 1
        assert all(h.result(timeout=60).finish_reason == "length" for h in handles) and len(handles) == 6
    finally:
        monkeypatch.undo()
        eng.shutdown(drain=False)


def test_a_closed_client_loop_cancels_only_its_request(engine):
    import asyncio

    params = SamplingParams(max_tokens=20, temperature=0)
    alone = engine.generate(PROMPTS[1], "ad0", params).token_ids
    gone = engine.submit(PROMPTS[0], None, SamplingParams(max_tokens=200, temperature=0))
    loop = asyncio.new_event_loop()
    with gone._lock:  # as aevents() does, then the loop closes under it (a client's thread that ended)
        gone._loop, gone._aqueue = loop, asyncio.Queue()
    loop.close()
    other = engine.submit(PROMPTS[1], "ad0", params)
    assert other.result(timeout=60).token_ids == alone
    final = list(gone.events(timeout=60))[-1]
    assert final.finish_reason == "cancelled" and final.completion_tokens < 200


def test_a_chat_template_that_raises_is_a_request_error(engine):
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = "{{ raise_exception('only user turns are supported') }}"
    try:
        with pytest.raises(RequestError, match="only user turns are supported"):
            engine.chat_prompt([{"role": "system", "content": "x"}])
    finally:
        engine.tokenizer.chat_template = template


def test_a_slow_adapter_read_does_not_block_other_requests(adapters_dir, engine):
    params = SamplingParams(max_tokens=10, temperature=0)
    alone = {a: engine.generate(PROMPTS[3], a, params).token_ids for a in (None, "ad0", "ad2")}
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    release, read = threading.Event(), eng.registry.read

    def slow_read(name, *args, **kw):
        if name == "ad2":
            release.wait(60)  # the disk is slow for ad2
        return read(name, *args, **kw)

    eng.registry.read = slow_read
    try:
        eng.generate(PROMPTS[0], "ad0", SamplingParams(max_tokens=1, temperature=0))  # ad0 resident
        slow = eng.submit(PROMPTS[3], "ad2", params)
        time.sleep(0.1)  # ad2's read has started and hangs
        others = [eng.submit(PROMPTS[3], a, params) for a in (None, "ad0")]
        assert [h.result(timeout=30).token_ids for h in others] == [alone[None], alone["ad0"]]
        assert not slow.finished and eng.stats()["adapters_loading"] == 1
        release.set()
        assert slow.result(timeout=60).token_ids == alone["ad2"]
    finally:
        release.set()
        eng.shutdown(drain=False)


def test_shutdown_says_how_many_requests_it_cancelled(adapters_dir):
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    quick = eng.submit(PROMPTS[0], None, SamplingParams(max_tokens=2, temperature=0))
    quick.result(timeout=60)
    slow = [eng.submit(PROMPTS[k], None, SamplingParams(max_tokens=400, temperature=0)) for k in range(2)]
    deadline = time.monotonic() + 30
    while eng.stats()["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.shutdown(drain=True, timeout=0.2) == 2
    assert all(list(h.events(timeout=10))[-1].finish_reason == "cancelled" for h in slow)


def test_a_full_budget_is_retried_on_a_release_or_every_100ms_not_every_step(adapters_dir):
    """Each retry takes the registry lock against the decode step: a bounded number of them while the wait lasts."""
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", budget_bytes=int(1.5 * SIZE_R4),
                                 budget_wait_s=1.0)
    calls, load_async = [], eng.registry.load_async
    eng.registry.load_async = lambda name: calls.append(name) or load_async(name)
    try:
        eng.registry.pin("ad0")
        busy = eng.submit(PROMPTS[0], None, SamplingParams(max_tokens=400, temperature=0))
        final = list(eng.submit(PROMPTS[1], "ad1", GREEDY).events(timeout=60))[-1]
        assert final.finish_reason == "error" and final.unavailable
        assert eng.steps > 20  # the engine ran many steps meanwhile...
        assert 2 <= calls.count("ad1") <= 15, calls.count("ad1")  # ...but retried only every ~100 ms
        busy.cancel()
    finally:
        eng.shutdown(drain=False)


def test_a_submit_racing_shutdown_is_refused_or_ended_never_left_hanging(adapters_dir):
    """A submit that passed the shutting-down check while shutdown() counts what is left: Unavailable, or a
    handle that gets its final event; never a handle that waits forever."""
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    eng.generate(PROMPTS[0], None, SamplingParams(max_tokens=1, temperature=0), timeout=60)  # the thread runs
    tokenizing, go = threading.Event(), threading.Event()
    tokens = eng.checks.tokens
    eng.checks.tokens = lambda prompt: (tokenizing.set(), go.wait(10), tokens(prompt))[2]
    end_all = eng._end_all_if_no_thread
    outcome = []

    def late_submit():
        try:
            outcome.append(eng.submit(PROMPTS[1], None, SamplingParams(max_tokens=2, temperature=0)))
        except Unavailable as err:
            outcome.append(err)

    def counted_then_let_in():  # shutdown() has counted what is left: now the late submit enqueues
        go.set()
        submitter.join(10)
        end_all()

    eng._end_all_if_no_thread = counted_then_let_in
    submitter = threading.Thread(target=late_submit)
    submitter.start()
    assert tokenizing.wait(10)  # past the _stopping check, tokenizing
    eng.shutdown(drain=True, timeout=1)
    submitter.join(10)
    assert len(outcome) == 1
    if not isinstance(outcome[0], Unavailable):
        assert list(outcome[0].events(timeout=10))[-1].finish_reason is not None


def test_a_refused_request_loads_no_adapter_and_holds_no_read(adapters_dir):
    """The API checks the request before it loads the adapter: a too-long prompt loads nothing (evicts nothing),
    and with the budget full no read is left behind in the registry."""
    from fastapi.testclient import TestClient

    from rankdial.serve.api import create_app

    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", budget_bytes=int(1.5 * SIZE_R4),
                                 max_prompt_tokens=8, budget_wait_s=0.3)
    eng.registry.pin("ad0")  # the budget is full
    with TestClient(create_app(eng), raise_server_exceptions=False) as c:
        misses = eng.registry.misses
        r = c.post("/v1/completions", json={"model": "ad1", "prompt": "word " * 40, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert eng.registry.misses == misses and not eng.registry._held_reads and eng.registry.loaded() == ["ad0"]
        r = c.post("/v1/completions", json={"model": "ad1", "prompt": "word", "max_tokens": 2})
        assert r.status_code == 503 and not eng.registry._held_reads


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_a_tiny_temperature_is_greedy_and_the_streams_beside_it_finish(engine, temperature):
    """Issue 18: temperature 1e-45 overflowed sampling and the engine failed every running request. Sent while
    other streams run, it samples greedily (temperatures below 1e-5 do), and the others end with their own text."""
    rows = [("ad0", PROMPTS[0]), (None, PROMPTS[1]), ("ad1", PROMPTS[2])]
    params = SamplingParams(max_tokens=20, temperature=0)
    alone = [engine.generate(p, a, params).text for a, p in rows]
    handles = [engine.submit(p, a, params) for a, p in rows]
    streams = [h.events(timeout=60) for h in handles]
    firsts = [next(s) for s in streams]  # every stream is running
    tiny = engine.submit(PROMPTS[3], "ad2", SamplingParams(max_tokens=4, temperature=temperature)).result(timeout=60)
    events = [[first, *s] for first, s in zip(firsts, streams)]
    assert [e[-1].finish_reason for e in events] == ["length"] * 3
    assert ["".join(x.text for x in e) for e in events] == alone
    assert tiny.finish_reason == "length"
    assert tiny.text == engine.generate(PROMPTS[3], "ad2", SamplingParams(max_tokens=4, temperature=0)).text


def test_a_row_with_nan_logits_fails_alone(engine, monkeypatch):
    """A diverged adapter's row (NaN logits) ends its own request with an error; the rows beside it go on."""
    rows = [("ad0", PROMPTS[0]), (None, PROMPTS[1]), ("ad3", PROMPTS[2])]
    params = SamplingParams(max_tokens=12, temperature=0)
    alone = [engine.generate(p, a, params).text for a, p in rows[:2]]
    forward = engine.runner._forward

    def nan_for_ad3(adapters, *args):
        logits = forward(adapters, *args)
        logits[[i for i, a in enumerate(adapters) if a == "ad3"]] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "_forward", nan_for_ad3)
    handles = [engine.submit(p, a, params) for a, p in rows]
    finals = [list(h.events(timeout=60)) for h in handles]
    assert [f[-1].finish_reason for f in finals] == ["length", "length", "error"]
    assert ["".join(e.text for e in f) for f in finals[:2]] == alone
    assert "non-finite" in finals[2][-1].error and "ad0" not in finals[2][-1].error


@pytest.mark.slow
def test_a_loaded_adapter_whose_files_change_is_read_again(tmp_path):
    """Issue 18: a loaded adapter whose files changed kept serving the old weights while its folder held others.
    The next request that finds it idle reads the new files; /v1/models' info shows what is loaded."""
    import shutil

    make_adapter(tmp_path / "a", seed=1, r=4)
    make_adapter(tmp_path / "b", seed=2, r=8)
    eng = Engine.from_pretrained("default", str(tmp_path), device="cpu")
    try:
        eng.registry.pin("a")
        old, new = (eng.generate(PROMPTS[0], name, GREEDY).text for name in ("a", "b"))
        assert old != new and eng.registry.info("a").rank == 4
        for f in (tmp_path / "b").iterdir():
            shutil.copy(f, tmp_path / "a" / f.name)
        eng.registry.recheck_s = 0.0  # compare at every request (default: at most once a second)
        assert eng.generate(PROMPTS[0], "a", GREEDY).text == new
        info = eng.registry.info("a")
        assert info.loaded and info.rank == 8 and info.pinned  # still pinned after the reload
    finally:
        eng.shutdown(drain=False)


@pytest.mark.slow
def test_lora_requests_name_the_running_and_waiting_adapters(adapters_dir):
    """What /metrics' vllm:lora_requests_info reads: with one row per batch, ad0's request runs and ad1's waits."""
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", max_batch_size=1)
    try:
        for name in ("ad0", "ad1"):
            eng.generate(PROMPTS[0], name, SamplingParams(max_tokens=1, temperature=0))  # loaded
        long = SamplingParams(max_tokens=200, temperature=0)
        running = eng.submit(PROMPTS[0], "ad0", long)
        events = running.events(timeout=60)
        next(events)
        waiting = eng.submit(PROMPTS[1], "ad1", long)
        deadline = time.monotonic() + 10
        while eng.lora_requests()["waiting"] != ["ad1"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.lora_requests() == {"max_lora": 1, "running": ["ad0"], "waiting": ["ad1"]}
        running.cancel()
        waiting.cancel()
    finally:
        eng.shutdown(drain=False)


def test_a_request_checks_its_adapter_exists_once(engine, monkeypatch):
    """Issue 18: a request's adapter was looked up on disk three times (the API, check(), prepare); once now."""
    from fastapi.testclient import TestClient

    from rankdial.serve.api import create_app

    engine.registry.unload("ad3")  # not loaded: existence is a look at its folder
    calls, exists = [], engine.registry.exists
    disk = lambda name: not engine.registry.is_loaded(name) and calls.append(name)  # a look at the folder
    monkeypatch.setattr(engine.registry, "exists", lambda name: disk(name) or exists(name))
    with TestClient(create_app(engine, shutdown_engine=False)) as c:
        r = c.post("/v1/completions", json={"model": "ad3", "prompt": "In the", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and calls == ["ad3"]
        missing = c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and "does not exist" in missing.json()["error"]["message"]
    assert missing.json()["error"]["param"] == "model"


def test_a_prompt_longer_than_the_tokens_in_flight_is_blamed_on_the_prompt(adapters_dir):
    """With --max-tokens-in-flight below the prompt limit, a prompt over it alone was a 400 naming max_tokens
    (which no max_tokens could fix): the prompt limit is what the tokens in flight leave room for."""
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu", max_tokens_in_flight=40)
    try:
        assert eng.max_prompt_tokens == 39
        with pytest.raises(RequestError, match="more than this server's limit of 39") as caught:
            eng.check(list(range(5, 50)), None, SamplingParams(max_tokens=1))
        assert caught.value.param == "prompt"
        eng.check(list(range(5, 44)), None, SamplingParams(max_tokens=1))  # 39 + 1 fills the 40 exactly
    finally:
        eng.shutdown(drain=False)


def test_one_record_per_request_from_check_to_the_runner(adapters_dir):
    """The request check() makes is the object the registry parks, the scheduler admits and the runner samples:
    one record (serve.request.Request), its tokens appended in one place, its adapter released when it ends."""
    from rankdial.serve.request import Request

    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    try:
        seen = []
        real_step = eng.runner.step
        eng.runner.step = lambda running: (seen.extend(running), real_step(running))[1]
        request = eng.check(PROMPTS[0], "ad0", SamplingParams(max_tokens=3, temperature=0))
        assert isinstance(request, Request) and request.id == ""  # no id until it is queued
        handle = eng.enqueue(request)
        completion = handle.result(timeout=60)
        assert request.id == handle.id and all(r is request for r in seen) and len(seen) == 3
        assert request.tokens == list(completion.token_ids) and request.ended and not request.holds_adapter
        assert eng.registry._in_use == {}  # released
    finally:
        eng.shutdown(drain=False)


def test_a_cancel_sent_while_the_request_is_still_in_the_inbox_is_kept():
    """A request enqueued and cancelled while the step admits the others (its id is read before it arrives) ends
    'cancelled', not after max_tokens (found by review; the old engine had the same gap)."""
    eng = Engine.from_pretrained("default", None, device="cpu")
    try:
        eng.generate(PROMPTS[0], None, SamplingParams(max_tokens=1, temperature=0), timeout=60)
        real_admit, late = eng.registry.admit, []

        def admit(arrivals, *, running, ready, failed):  # a client enqueues and cancels while this step admits
            if arrivals and not late:
                h = eng.enqueue(eng.check(PROMPTS[1], None, SamplingParams(max_tokens=20, temperature=0)))
                h.cancel()
                late.append(h)
            real_admit(arrivals, running=running, ready=ready, failed=failed)

        eng.registry.admit = admit
        eng.generate(PROMPTS[0], None, SamplingParams(max_tokens=1, temperature=0), timeout=60)
        done = late[0].result(timeout=60)
        assert done.finish_reason == "cancelled", (done.finish_reason, len(done.token_ids))
    finally:
        eng.shutdown(drain=False)


def test_an_error_while_admitting_ends_the_arrivals_and_releases_what_they_held(adapters_dir):
    """An unexpected error inside registry.admit (e.g. its reader gone) ends the requests of that step with an
    error, releasing any adapter already acquired for them, and the engine goes on (found by review)."""
    eng = Engine.from_pretrained("default", str(adapters_dir), device="cpu")
    try:
        real_admit, broken = eng.registry.admit, [True]

        def admit(arrivals, *, running, ready, failed):
            real_admit(arrivals, running=running, ready=ready, failed=failed)  # acquires ad0 for the arrival
            if broken and arrivals:
                broken.clear()
                ready.clear()  # as if it failed before handing them back
                for r in arrivals:
                    r.state = "waiting"
                raise RuntimeError("reader gone")

        eng.registry.admit = admit
        done = eng.generate(PROMPTS[0], "ad0", SamplingParams(max_tokens=2, temperature=0), timeout=60)
        assert done.finish_reason == "error" and eng.registry._in_use == {}
        assert eng.generate(PROMPTS[0], "ad0", SamplingParams(max_tokens=2, temperature=0), timeout=60).finish_reason \
            in ("length", "stop")
        request = eng.check(PROMPTS[0], None, SamplingParams(max_tokens=1))
        eng.enqueue(request).result(timeout=60)
        with pytest.raises(RequestError, match="queued already"):
            eng.enqueue(request)
    finally:
        eng.shutdown(drain=False)


def test_a_failed_request_s_completion_says_why(tmp_path):
    """Engine.generate / Handle.result(): a request whose adapter cannot be loaded ends with finish_reason "error"
    and the reason in Completion.error (the last event's), not an empty text alone."""
    make_adapter(tmp_path / "broken", seed=1)
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    engine = Engine.from_pretrained("default", str(tmp_path), device="cpu", max_batch_size=2)
    try:
        out = engine.generate(PROMPTS[0], "broken", SamplingParams(max_tokens=3))
        assert out.finish_reason == "error" and out.text == ""
        assert "truncated or corrupt" in out.error
        ok = engine.generate(PROMPTS[0], None, SamplingParams(max_tokens=3))
        assert ok.finish_reason == "length" and ok.error is None
    finally:
        engine.shutdown()
