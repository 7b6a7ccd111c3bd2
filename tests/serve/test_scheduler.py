"""The continuous-batching scheduler, tested as pure bookkeeping (no tensors)."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rankdial.errors import ConfigError, RequestError
from rankdial.serve.request import Request
from rankdial.serve.scheduler import CANCELLED, FINISHED, RUNNING, Scheduler, SchedulerLimits

SRC = Path(__file__).resolve().parents[2] / "src" / "rankdial"


class _Params:
    """What the scheduler reads of a request's sampling settings (max_tokens), unchecked: the scheduler's own
    checks are what these tests hold to."""

    def __init__(self, max_tokens):
        self.max_tokens = max_tokens


def req(request_id, adapter, prompt_tokens: int, max_tokens) -> Request:
    """The engine's request record with `prompt_tokens` prompt tokens."""
    return Request(request_id, adapter, [0] * prompt_tokens, _Params(max_tokens))


def run_until_empty(s: Scheduler, max_steps: int = 10_000) -> list[str]:
    """Drive the scheduler as the engine would (one token per running request per step); admission order."""
    admitted = []
    for _ in range(max_steps):
        if not s.has_work():
            return admitted
        batch = s.schedule()
        admitted += [r.id for r in batch.new]
        for r in batch.requests:
            s.record(r.id, 0)
    raise AssertionError("requests never finished")


def random_trace(seed: int, limits: SchedulerLimits) -> list[tuple]:
    """A random mix of submits, steps, early finishes and cancels; checks the limits after every operation."""
    rng, s, trace, n = random.Random(seed), Scheduler(limits), [], 0
    adapters = ["a", "b", "c", None, "d"]
    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            n += 1
            s.submit(req(f"q{n}", rng.choice(adapters), rng.randint(1, 40), rng.randint(1, 30)))
        elif op < 0.85:
            batch = s.schedule()
            trace.append(("step", tuple(r.id for r in batch.requests), tuple(r.id for r in batch.new)))
            for r in batch.requests:
                s.record(r.id, 0, finished=rng.random() < 0.05)
        elif s.running or s.waiting:
            victim = rng.choice(s.running + s.waiting).id
            trace.append(("cancel", victim, s.cancel(victim)))
        assert len(s.running) <= limits.max_batch_size
        assert s.tokens_in_flight <= s.reserved_tokens <= limits.max_tokens_in_flight
    return trace


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_limits_are_never_exceeded(seed):
    trace = random_trace(seed, SchedulerLimits(max_batch_size=5, max_tokens_in_flight=137))
    assert sum(len(t[2]) for t in trace if t[0] == "step") > 20  # the trace did admit work


def test_same_input_gives_the_same_order():
    limits = SchedulerLimits(max_batch_size=4, max_tokens_in_flight=120)
    assert random_trace(7, limits) == random_trace(7, limits)


def test_fifo_within_one_adapter():
    s = Scheduler(SchedulerLimits(max_batch_size=2, max_tokens_in_flight=1000))
    order = {"a": [], "b": []}
    for i in range(12):
        adapter = "ab"[i % 3 == 0]
        s.submit(req(f"{adapter}{i}", adapter, 3 + i % 4, 2 + i % 3))
        order[adapter].append(f"{adapter}{i}")
    admitted = run_until_empty(s)
    for adapter, ids in order.items():
        assert [i for i in admitted if i.startswith(adapter)] == ids


def test_a_flood_for_one_adapter_delays_another_by_at_most_one_round():
    s = Scheduler(SchedulerLimits(max_batch_size=1, max_tokens_in_flight=1000))
    for i in range(50):
        s.submit(req(f"a{i}", "a", 5, 1))
    first = s.schedule().new
    s.submit(req("b0", "b", 5, 1))
    for c in range(3):  # a third and fourth adapter join after b: they queue behind it
        s.submit(req(f"c{c}", "c", 5, 1))
    s.submit(req("base0", None, 5, 1))
    s.record(first[0].id, 0)
    admitted = [first[0].id] + run_until_empty(s)
    assert admitted.index("b0") <= 2  # a0 (already running), at most one more a, then b0
    assert admitted.index("base0") <= 4  # one round: a, b, c, then the base
    assert admitted[:6] == ["a0", "a1", "b0", "c0", "base0", "a2"]


def test_a_large_request_is_not_overtaken_by_smaller_ones_behind_it():
    s = Scheduler(SchedulerLimits(max_batch_size=8, max_tokens_in_flight=100))
    s.submit(req("small0", "a", 30, 30))
    s.schedule()
    s.submit(req("big", "b", 50, 40))  # 90 tokens: waits for small0 to leave
    s.submit(req("small1", "a", 5, 5))  # would fit now, but it is behind big in the turn
    assert s.schedule().new == []
    while s.running:
        s.record("small0", 0)
    assert [r.id for r in s.schedule().new] == ["big", "small1"]  # big first, then small1 in the room left


def test_cancellation_frees_the_slot_at_once():
    s = Scheduler(SchedulerLimits(max_batch_size=2, max_tokens_in_flight=1000))
    for i in range(4):
        s.submit(req(f"r{i}", None, 4, 10))
    assert [r.id for r in s.schedule().new] == ["r0", "r1"]
    assert s.cancel("r0") is True  # a client disconnect
    assert s.running[0].id == "r1" and s.tokens_in_flight == 4
    assert [r.id for r in s.schedule().new] == ["r2"]
    assert s.cancel("r3") is True  # still waiting: removed from its queue
    assert s.waiting == [] and s.cancel("r3") is False and s.cancel("never") is False
    s.record("r1", 0)
    assert s.tokens_in_flight == (4 + 1) + 4  # r1's prompt and one generated token, r2's prompt


def test_requests_leave_when_finished_or_at_max_tokens():
    s = Scheduler(SchedulerLimits(max_batch_size=4, max_tokens_in_flight=100))
    a, b = s.submit(req("a", "x", 3, 2)), s.submit(req("b", "y", 3, 9))
    s.schedule()
    assert a.state == b.state == RUNNING
    s.record("a", 0), s.record("b", 0)
    s.record("a", 0)
    s.record("b", 0, finished=True)  # a stop sequence
    assert a.state == b.state == FINISHED and a.generated == 2 and b.generated == 2 and not s.has_work()
    with pytest.raises(RequestError, match="no running request"):
        s.record("a", 0)
    c = s.submit(req("a", "x", 1, 1))  # a finished id may be used again
    s.cancel("a")
    assert c.state == CANCELLED


def test_a_request_larger_than_the_token_limit_is_refused_at_submission():
    s = Scheduler(SchedulerLimits(max_batch_size=4, max_tokens_in_flight=64))
    with pytest.raises(RequestError, match=r"40 \+ 30 = 70 tokens.*max_tokens_in_flight=64.*lower max_tokens"):
        s.submit(req("huge", "a", 40, 30))
    assert not s.has_work()
    s.submit(req("fits", "a", 40, 24))  # exactly the limit


@pytest.mark.parametrize("args, field", [(("", "a", 1, 1), "request id"), (("r", 3, 1, 1), "adapter"),
                                         (("r", "a", 0, 1), "prompt_tokens"), (("r", "a", 1, True), "max_tokens")])
def test_bad_requests_name_the_field(args, field):
    with pytest.raises(RequestError, match=field):
        Scheduler().submit(req(*args))


def test_a_reused_live_id_is_refused():
    s = Scheduler()
    s.submit(req("r", "a", 1, 1))
    with pytest.raises(RequestError, match="already waiting or running"):
        s.submit(req("r", "b", 1, 1))


def test_limits_are_validated():
    with pytest.raises(ConfigError, match=r"max_batch_size must be a positive integer, got 0.*max_tokens_in_flight"):
        SchedulerLimits(max_batch_size=0, max_tokens_in_flight=-5)
    with pytest.raises(ConfigError, match=r"max_prefill_tokens must be a positive integer, got 0"):
        SchedulerLimits(max_prefill_tokens=0)


def test_the_scheduler_does_not_import_torch():
    tree = ast.parse((SRC / "serve" / "scheduler.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "numpy")}, imported
    # and at run time: with the package __init__ files bypassed, importing it loads no torch
    code = ("import sys, types\n"
            f"for name, path in (('rankdial', {str(SRC)!r}), ('rankdial.serve', {str(SRC / 'serve')!r})):\n"
            "    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m\n"
            "import rankdial.serve.scheduler as s\n"
            "from rankdial.serve.request import Request\n"
            "s.Scheduler().submit(Request('x', None, [0], types.SimpleNamespace(max_tokens=1)))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_step_admits_at_most_max_prefill_tokens_of_new_prompts_but_always_one():
    """A burst is prefilled over several steps (the first requests get their first token after a short prefill),
    in admission order; a prompt longer than the budget still runs, alone; the other limits hold as before."""
    s = Scheduler(SchedulerLimits(max_batch_size=64, max_tokens_in_flight=10_000, max_prefill_tokens=100))
    for i in range(10):
        s.submit(req(f"r{i}", None, 30, 5))
    s.submit(req("long", None, 250, 5))
    steps = []
    while s.has_work() and len(steps) < 50:
        batch = s.schedule()
        steps.append([r.id for r in batch.new])
        for r in batch.requests:
            s.record(r.id, 0)
    assert steps[:5] == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6", "r7", "r8"], ["r9"], ["long"]]
    assert [r for step in steps for r in step] == [f"r{i}" for i in range(10)] + ["long"]


def test_random_traces_hold_the_prefill_budget():
    rng, s = random.Random(7), Scheduler(SchedulerLimits(max_batch_size=6, max_tokens_in_flight=200,
                                                        max_prefill_tokens=50))
    for n in range(300):
        if rng.random() < 0.4:
            s.submit(req(f"q{n}", rng.choice(["a", "b", None]), rng.randint(1, 60), rng.randint(1, 20)))
        batch = s.schedule()
        assert len(batch.new) <= 1 or sum(r.prompt_tokens for r in batch.new) <= 50
        for r in batch.requests:
            s.record(r.id, 0, finished=rng.random() < 0.05)
