"""Rank as capacity on a synthetic task with a known true rank k (claims/capacity.py)."""

import pytest
import torch

from rankdial import ConfigError
from rankdial.claims import synthetic_task, train_synthetic


def test_task_is_deterministic_and_its_update_has_the_stated_rank():
    a, b = synthetic_task(true_rank=3, d=16, n_train=24, n_eval=32, seed=5), synthetic_task(3, 16, 24, 32, seed=5)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.delta, b.delta)
    assert int(torch.linalg.matrix_rank(a.delta)) == 3
    assert torch.linalg.matrix_norm(a.delta) ** 2 == pytest.approx(16, rel=1e-4)  # unit signal per output
    noiseless = synthetic_task(true_rank=3, d=16, n_train=24, n_eval=32, noise=0.0, seed=5)
    assert torch.allclose(noiseless.y_eval, noiseless.x_eval @ (noiseless.W0 + noiseless.delta).T)


def test_rank_below_k_stays_up_and_rank_k_fits():
    task = synthetic_task(true_rank=4, d=16, n_train=64, n_eval=128, noise=0.1, seed=1)
    low, exact = train_synthetic(task, 2, steps=300), train_synthetic(task, 4, steps=300)
    assert low.final_eval > 0.3  # ≈ (k - r)/k = 0.5 of the signal is out of reach
    assert exact.final_eval < 0.1 and exact.final_eval < low.final_eval / 5
    assert exact.singular_values[3] > 10 * exact.singular_values[4]  # it found exactly k directions
    assert len(low.singular_values) == 16 and low.singular_values[2] < 1e-4  # rank-2 ΔW has two directions


def test_callbacks_stream_each_recorded_step_and_stop_the_run():
    task = synthetic_task(true_rank=2, d=8, n_train=16, n_eval=16, seed=0)
    seen = []
    result = train_synthetic(task, 2, steps=50, eval_every=5, on_step=lambda *row: seen.append(row),
                             should_stop=lambda: len(seen) >= 3)
    assert result.stopped_early and [s for s, _, _ in seen] == [0, 5, 10] == result.steps
    assert [t for _, t, _ in seen] == result.train_loss and result.delta.shape == (8, 8)
    full = train_synthetic(task, 2, steps=12, eval_every=5)
    assert full.steps == [0, 5, 10, 12] and not full.stopped_early
    assert full.to_dict()["final_eval"] == full.eval_loss[-1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be an integer >= 1, got 0"), (dict(rank=9), "at most min.*got 9"),
    (dict(rank=2, steps=0), "steps"), (dict(rank=2, lr=-1.0), "lr must be a positive number, got -1.0"),
])
def test_bad_training_arguments_name_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        train_synthetic(synthetic_task(true_rank=2, d=8, n_train=4, n_eval=4), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(true_rank=0), "true_rank"), (dict(true_rank=9, d=8), "at most d=8, got 9"),
    (dict(noise=-0.1), "noise"), (dict(n_train=0), "n_train"), (dict(d=True), "d must be"),
])
def test_bad_task_arguments_name_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        synthetic_task(**kwargs)
