"""The runner's batch KV cache (rows joining and leaving) and sampling, on the embedded default model."""

from __future__ import annotations

import pytest
import torch

from rankdial.errors import RequestError
from rankdial.models import load_model, resolve_model
from rankdial.quant import quantize_model
from rankdial.serve import Engine, SamplingParams
from rankdial.sampling import make_generator, sample
from rankdial.serve.request import Request
from rankdial.serve.runner import Runner
from engine_helpers import PROMPTS, make_adapter, tensor_storages

GREEDY = SamplingParams(max_tokens=64, temperature=0)


@pytest.fixture(scope="module")
def model_tok():
    return load_model(resolve_model("default"))


def seqs(tok, prompts, tag=""):
    return [Request(f"{tag}{k}", None, tok.encode(p), GREEDY) for k, p in enumerate(prompts)]


def run_alone(model, tok, prompt, n):
    runner = Runner(model, 0)
    s = seqs(tok, [prompt])[0]
    for _ in range(n):
        s.tokens.append(runner.step([s])[0])
    return s.tokens


def test_rows_join_and_leave_and_keep_their_tokens(model_tok):
    model, tok = model_tok
    runner = Runner(model, 0)
    first, second = seqs(tok, PROMPTS[:3], "a"), seqs(tok, PROMPTS[3:], "b")
    running = list(first)
    for step in range(10):
        if step == 3:
            running += second  # join mid-flight: the cache is padded to a common length
        if step == 6:
            running = [s for s in running if s.id not in ("a1", "b0")]  # leave: rows selected, columns cut
        for s, t in zip(running, runner.step(running)):
            s.tokens.append(t)
        held = {s.id: runner.lengths[runner.slot_of[s.id]] for s in running}
        assert held == {s.id: len(s.prompt) + len(s.tokens) - 1 for s in running}  # each row's own columns
    assert sorted(runner.ids) == sorted(s.id for s in running)  # a1 and b0 left slots 1 and 3: the two highest
    assert runner.slot_ids[:4] == ["a0", "b2", "a2", "b1"] and runner.slot_ids[4:] == [None] * (runner.slots - 4)
    for s in first + second:
        assert s.tokens == run_alone(model, tok, tok.decode(s.prompt), len(s.tokens))


def test_all_rows_leaving_empties_the_cache(model_tok):
    model, tok = model_tok
    runner = Runner(model, 0)
    s = seqs(tok, PROMPTS[:2])
    runner.step(s)
    runner.step([])
    assert runner.ids == [] and runner.slot_of == {} and runner.lengths == [0] * runner.slots


def test_the_kv_cache_is_preallocated_and_written_in_place_under_a_burst_of_long_prompts():
    """Issue 19/17: a burst of long prompts through an engine with 3 slots: the runner's tensors are the same
    storages at every step (rows join and leave without copying anyone's cache) and their bytes stay within the
    slots x row_tokens the flags set; every request still gets the tokens it gets alone."""
    eng = Engine.from_pretrained("default", device="cpu", max_batch_size=3, max_tokens_in_flight=160,
                                 max_new_tokens=6)
    try:
        runner, seen = eng.runner, []
        real_step = runner.step

        def step(running):
            out = real_step(running)
            seen.append(tensor_storages(runner))
            return out

        runner.step = step
        long = [" ".join([PROMPTS[k % len(PROMPTS)]] * (5 + k)) for k in range(8)]  # ~30-140 tokens each
        params = SamplingParams(max_tokens=6, temperature=0)
        handles = [eng.submit(p, None, params) for p in long]
        results = [h.result(timeout=120).token_ids for h in handles]
        c = eng.model.config
        bound = 2 * c.num_hidden_layers * 3 * c.num_key_value_heads * 160 * c.head_dim * 4  # K and V, float32
        kv = {ptr for ptr, n in seen[0].items() if n >= bound // (2 * c.num_hidden_layers)}
        assert len(kv) == 2 * c.num_hidden_layers and sum(seen[0][p] for p in kv) == bound
        for storages in seen:
            assert kv <= set(storages)  # the same buffers, written in place
            assert sum(storages.values()) <= bound + 64 * 1024  # + the small per-step tensors (ids, masks)
        assert len(seen) > 8
        assert results == [eng.generate(p, None, params).token_ids for p in long]
    finally:
        eng.shutdown(drain=False)


def test_a_kv_cache_that_does_not_fit_refuses_the_start_naming_the_flags(monkeypatch):
    import rankdial.serve.runner as runner_mod
    from rankdial.errors import ConfigError

    monkeypatch.setattr(runner_mod, "available_bytes", lambda device: 4 * 2**20)
    with pytest.raises(ConfigError, match=r"KV cache for 32 rows x 512 tokens needs \d+ MiB.*--max-batch.*"
                                          r"--max-tokens-in-flight"):
        Engine.from_pretrained("default", device="cpu")
    eng = Engine.from_pretrained("default", device="cpu", max_batch_size=2, max_tokens_in_flight=64)
    eng.shutdown(drain=False)


def test_slots_never_exceed_the_rows_tokens_in_flight_can_run():
    """--max-batch 100000 with --max-tokens-in-flight 1000 sized 100,000 cache rows although at most 500 requests
    (2 tokens each at the least) can ever run at once; the cache is sized to what can run, and a burst wider than
    it still gets every answer."""
    eng = Engine.from_pretrained("default", device="cpu", max_batch_size=100_000, max_tokens_in_flight=40,
                                 max_new_tokens=4)
    try:
        assert eng.runner.slots == 20 and eng.runner.cache.shape[0] == 20
        params = SamplingParams(max_tokens=2, temperature=0)
        assert all(h.result(timeout=60).token_ids for h in [eng.submit([5, 6], None, params) for _ in range(25)])
    finally:
        eng.shutdown(drain=False)


def test_sampling_top_p_near_zero_is_greedy_and_seeds_repeat():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    tight = [Request(str(k), None, [1], SamplingParams(temperature=1.0, top_p=1e-6), make_generator(k, "cpu"))
             for k in range(3)]
    assert sample(logits, tight) == logits.argmax(-1).tolist()

    def draw(seed):
        s = Request("x", None, [1], SamplingParams(temperature=2.0, seed=seed), make_generator(seed, "cpu"))
        return [sample(logits[:1], [s])[0] for _ in range(20)]

    assert draw(5) == draw(5) and draw(5) != draw(6)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Request("x", None, [1], SamplingParams(temperature=1.0, top_p=0.75), make_generator(0, "cpu"))
    assert {sample(logits, [s])[0] for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("max_tokens", True), ("temperature", float("nan")),
                                         ("top_p", 1.5), ("stop", ("",)), ("seed", -1)])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.slow
def test_nf4_base_mixed_batch_equals_alone(tmp_path):
    for k, r in enumerate([4, 8]):
        make_adapter(tmp_path / f"q{k}", seed=20 + k, r=r)
    eng = Engine.from_pretrained("default", str(tmp_path), qlora=True, device="cpu")
    try:
        assert type(eng.model.model.layers[0].self_attn.q_proj).__name__ == "NF4Linear"
        rows = ["q0", "q1", None, "q0", "q1"]
        params = SamplingParams(max_tokens=10, temperature=0)
        alone = [eng.generate(PROMPTS[k], a, params).token_ids for k, a in enumerate(rows)]
        handles = [eng.submit(PROMPTS[k], a, params) for k, a in enumerate(rows)]
        assert [h.result(timeout=60).token_ids for h in handles] == alone
        assert len({alone[0], alone[1], alone[2]}) == 3
    finally:
        eng.shutdown(drain=False)


@pytest.mark.slow
def test_rows_leaving_keep_the_stacks_and_their_tokens(tmp_path, monkeypatch):
    """Rows that leave (or join) route the same stacks (the registry's storage, never rebuilt); every layer's
    slots are where the stacks hold each row's adapter, and every row's tokens those it gets alone."""
    import rankdial.serve.runner as runner_mod
    from rankdial.lora import LoraLayer
    from rankdial.lora.inject import named_wrappers

    for k, r in enumerate([4, 8]):
        make_adapter(tmp_path / f"a{k}", seed=30 + k, r=r)
    eng = Engine.from_pretrained("default", str(tmp_path), device="cpu")
    try:
        for name in ("a0", "a1"):
            eng.registry.load(name)
        model, tok = eng.model, eng.tokenizer
        calls = []
        real_route = runner_mod.route
        monkeypatch.setattr(runner_mod, "route", lambda m, rows: (calls.append(list(rows)), real_route(m, rows)))
        adapters = ["a0", "a1", None, "a0", "a1"]
        running = [Request(f"r{k}", a, tok.encode(PROMPTS[k]), GREEDY) for k, a in enumerate(adapters)]
        every = list(running)
        runner = Runner(model, 0)
        stacks_before = {id(layer): layer.stacks for _, layer in named_wrappers(model) if isinstance(layer, LoraLayer)}
        for step in range(8):
            if step == 3:
                running = [s for s in running if s.id not in ("r1", "r2")]  # a1 and the base still in use
            if step == 5:
                running = [s for s in running if s.id != "r4"]  # a1 leaves: a subset of the routed adapters
            for s, t in zip(running, runner.step(running)):
                s.tokens.append(t)
            adapter_of = {s.id: s.adapter for s in running}
            rows = [adapter_of[i] if i is not None else None for i in runner.slot_ids[:1 + max(runner.slot_of.values())]]
            for _, layer in named_wrappers(model):
                if isinstance(layer, LoraLayer) and layer.routing is not None:
                    stacks = layer.routing.stacks
                    assert [layer.routing.slot(k) for k in range(len(rows))] == [
                        stacks.where.get(a) if a is not None else None for a in rows]
                    assert layer.routing.stacks is stacks_before[id(layer)]  # never rebuilt
        assert all(rows and len(rows) >= len(running) for rows in calls)
        for s in every:
            runner_alone = Runner(model, 0)
            alone = Request("x", s.adapter, s.prompt, GREEDY)
            for _ in range(len(s.tokens)):
                alone.tokens.append(runner_alone.step([alone])[0])
            assert s.tokens == alone.tokens, s.id
        assert len({tuple(s.tokens) for s in every[:3]}) == 3  # the adapters change the text
    finally:
        eng.shutdown(drain=False)
