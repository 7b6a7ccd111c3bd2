"""The one sampler (rankdial.sampling): safe for every accepted temperature, one row's failure stays its own."""

from __future__ import annotations

import pytest
import torch

from rankdial.errors import RequestError
from rankdial.sampling import GREEDY_BELOW, Row, SamplingParams, make_generator, sample


def rows(*params):
    return [Row(p, make_generator(k, "cpu")) for k, p in enumerate(params)]


@pytest.mark.parametrize("temperature", [0, 1e-300, 1e-45, 1e-10, GREEDY_BELOW / 2])
def test_a_temperature_below_the_threshold_is_greedy(temperature):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 30
    got = sample(logits, rows(*[SamplingParams(temperature=temperature)] * 3))
    assert got == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-3, 0.7, 2.0])
def test_any_accepted_temperature_samples_extreme_logits(temperature):
    logits = torch.tensor([[3e38, -3e38, 0.0, 1e30], [-1e9, float("-inf"), 5.0, 4.999]])
    r = rows(SamplingParams(temperature=temperature, top_p=0.9), SamplingParams(temperature=temperature))
    got = sample(logits, r)
    assert [x.failure for x in r] == [None, None]
    assert got[0] == 0 and got[1] in (2, 3)


def test_a_nan_row_fails_alone_and_the_others_are_sampled():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    logits[1, 4] = float("nan")
    r = rows(*[SamplingParams(temperature=0.8, seed=5)] * 3)
    got = sample(logits.clone(), r)
    assert [x.failure is None for x in r] == [True, False, True] and "non-finite" in r[1].failure
    clean = rows(*[SamplingParams(temperature=0.8, seed=5)] * 3)
    assert [got[0], got[2]] == [sample(logits[[0]], clean[:1])[0], sample(logits[[2]], clean[2:])[0]]


def test_a_row_whose_draw_raises_fails_alone():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(3))
    r = [Row(SamplingParams(temperature=1.0), object()), Row(SamplingParams(temperature=0))]
    got = sample(logits, r)
    assert "sampling" in r[0].failure and r[1].failure is None and got[1] == int(logits[1].argmax())


def test_same_seed_same_tokens():
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(4))
    draw = lambda seed: [sample(logits, [Row(SamplingParams(temperature=1.0), g)])[0]
                         for g in [make_generator(seed, "cpu")] for _ in range(20)]
    assert draw(7) == draw(7) and draw(7) != draw(8)


def test_params_are_checked():
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-46, 1e-6])
def test_a_tiny_top_p_keeps_the_top_token(top_p):
    # an accepted top_p below float32's smallest number rounds to 0 in the comparison with the scores; the top
    # token must still be kept (it was not: every probability cut, multinomial failed, the request got a 500)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(2))
    r = rows(*[SamplingParams(temperature=1.0, top_p=top_p)] * 2)
    got = sample(logits, r)
    assert [x.failure for x in r] == [None, None]
    assert got == logits.argmax(-1).tolist()
