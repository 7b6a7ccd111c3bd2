"""Steering's learning-rate selection: picked on the validation split, never on the eval split it reports."""

import pytest

from rankdial import ConfigError, DataError
from rankdial.models.loading import load_model, resolve_model
from rankdial.claims import steering as st


@pytest.fixture(scope="module")
def default_model():
    return load_model(resolve_model("default"))


def test_splits_are_disjoint(default_model):
    _, tok = default_model
    fmt = st.format_task(tok, n_train=64, n_eval=16)
    words = [set(t[:, :3].flatten().tolist()) for t in (fmt.train_ids, fmt.val_ids, fmt.eval_ids)]
    assert not (words[0] & words[1]) and not (words[0] & words[2]) and not (words[1] & words[2])
    assert len(fmt.val_ids) == len(fmt.eval_ids) == 16
    facts = st.facts_task(tok, n_facts=32)
    val, ev = {tuple(r) for r in facts.val_ids.tolist()}, {tuple(r) for r in facts.eval_ids.tolist()}
    assert len(val) == 8 and len(ev) == 24 and not (val & ev)
    assert val | ev == {tuple(r) for r in facts.train_ids.tolist()}  # recall: every fact is trained on


def _fake_trainer(calls):
    """Validation prefers the smallest rate, eval the largest: a selection that peeked at eval would differ."""
    def fake(base_model, task, rank, steps, batch=32, lr=None, seed=0):
        calls.append((task.name, rank, lr))
        return {"method": "full" if rank is None else "lora", "rank": rank, "lr": lr, "steps": steps,
                "trainable_params": 1, "eval_loss_before": 9.0, "eval_loss": 1.0 / lr, "eval_accuracy": 0.5,
                "val_loss": lr, "val_accuracy": 0.5, "seconds": 0.5}
    return fake


def test_selection_uses_validation_not_eval(monkeypatch, default_model):
    model, tok = default_model
    calls = []
    monkeypatch.setattr(st, "fine_tune", _fake_trainer(calls))
    grids = {"full": [1e-4, 1e-3], "lora": [2e-3, 6e-3, 2e-2]}
    f = st.steering(model, tok, [1, 8], steps=3, n_facts=16, lr_grids=grids)
    assert f["lr_grids"] == grids and f["selected_on"] == "validation loss"
    for name, runs in f["tasks"].items():
        assert [r["rank"] for r in runs] == [1, 8, None]
        for r in runs:
            family = "full" if r["rank"] is None else "lora"
            assert r["lr"] == min(grids[family]) and r["eval_loss"] == 1.0 / r["lr"]  # the val-best run's eval
            assert [x["lr"] for x in r["lr_search"]] == grids[family] and r["lr_at_edge"]
            assert r["search_seconds"] == 0.5 * len(grids[family])  # the stand-in reports 0.5 s per run: a sum, no clock
        assert runs[-1]["loss_over_full"] == 1.0
    assert len(calls) == 2 * (2 * 3 + 2)  # every rate of each family's grid, per method, per task


def test_fine_tune_reports_validation_figures_from_the_validation_rows(default_model):
    model, tok = default_model
    task = st.format_task(tok, n_train=32, n_eval=8)
    row = st.fine_tune(model, task, 2, steps=2, batch=4, lr=1e-3)
    assert row["val_loss"] != row["eval_loss"] and 0 <= row["val_accuracy"] <= 1
    same = st.TokenTask("format", task.train_ids, task.train_labels, task.eval_ids, task.eval_labels,
                        task.eval_ids, task.eval_labels)
    row2 = st.fine_tune(model, same, 2, steps=2, batch=4, lr=1e-3)
    assert row2["val_loss"] == pytest.approx(row2["eval_loss"]) and row2["eval_loss"] == pytest.approx(row["eval_loss"])


def test_selection_refuses_a_task_without_validation_or_an_empty_grid(default_model):
    model, tok = default_model
    task = st.format_task(tok, n_train=8, n_eval=4)
    bare = st.TokenTask("bare", task.train_ids, task.train_labels, task.eval_ids, task.eval_labels)
    with pytest.raises(DataError, match="no validation split"):
        st.select_lr(model, bare, 2, 1, [1e-3])
    for bad in ([], [0.0], [2.0]):
        with pytest.raises(ConfigError, match="learning-rate grid"):
            st.select_lr(model, task, 2, 1, bad)


def _trainer_with_val(losses: dict):
    """A stand-in fine_tune whose validation loss at each rate is losses[lr] (NaN/Inf: that rate diverged)."""
    def fake(base_model, task, rank, steps, batch=32, lr=None, seed=0):
        return {"method": "full" if rank is None else "lora", "rank": rank, "lr": lr, "steps": steps,
                "trainable_params": 1, "eval_loss_before": 9.0, "eval_loss": losses[lr], "eval_accuracy": 0.5,
                "val_loss": losses[lr], "val_accuracy": 0.5, "seconds": 0.5}
    return fake


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_rate_is_never_picked(monkeypatch, default_model, bad):
    """min() over [nan, 2.0, 1.0] returns nan: the diverged rate was picked silently."""
    model, tok = default_model
    task = st.format_task(tok, n_train=8, n_eval=4)
    monkeypatch.setattr(st, "fine_tune", _trainer_with_val({1e-3: bad, 2e-3: 2.0, 3e-3: 1.0}))
    row = st.select_lr(model, task, 2, 1, [1e-3, 2e-3, 3e-3])
    assert row["lr"] == 3e-3 and row["val_loss"] == 1.0 and not row["diverged"]
    assert row["diverged_lrs"] == [1e-3] and row["lr_at_edge"]  # 3e-3 is the top of the grid


def test_a_method_that_diverges_at_every_rate_is_shown_as_diverged(monkeypatch, default_model):
    model, tok = default_model
    nan = float("nan")
    monkeypatch.setattr(st, "fine_tune", _trainer_with_val({1e-3: nan, 2e-3: float("inf")}))
    f = st.steering(model, tok, [1], steps=1, n_facts=16, lr_grids={"full": [1e-3, 2e-3], "lora": [1e-3, 2e-3]})
    for runs in f["tasks"].values():
        for row in runs:
            assert row["diverged"] and row["diverged_lrs"] == [1e-3, 2e-3] and not row["lr_at_edge"]
            assert row["loss_over_full"] != row["loss_over_full"]  # NaN: nothing to compare
