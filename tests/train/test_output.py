"""The run folder: nothing a user owns is lost. --overwrite replaces a finished run only once the new one has
finished; a typo, bad data, a crash or Ctrl-C leaves it byte for byte; --resume never writes into a folder
rankdial did not write."""

import json

import pytest

from conftest import fail_on_call, qa_rows, write_jsonl
from rankdial import ConfigError, DataError, ModelError, OutputError
from rankdial.atomic import MARKER, read_marker
from rankdial.cli import main
from rankdial.train import TrainingInterrupted, make_config, read_run_config, train


def _args(tiny_model_dir, data, out, **kw):
    args = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(out), steps=3, batch_size=4, lr=5e-3,
                max_length=48, progress=False, log=lambda *a: None)
    return {**args, **kw}


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    out = tmp_path / "run"
    train(**_args(tiny_model_dir, data, out, save_every=2))
    return data, out, _snapshot(out)


def _cli(tiny_model_dir, data, out, *extra):
    return main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--steps",
                 "2", "--batch-size", "4", "--max-length", "48", "--no-progress", "--overwrite", *extra])


def test_overwrite_with_a_typo_or_bad_value_leaves_the_finished_run_intact(finished, tiny_model_dir, tmp_path,
                                                                          capsys):
    data, out, before = finished
    assert _cli(tiny_model_dir, tmp_path / "typo.jsonl", out) == 2
    assert "typo.jsonl does not exist" in capsys.readouterr().err
    assert _cli(tiny_model_dir, data, out, "--lora-alpha", "0") == 2
    assert "lora_alpha must be a positive finite number, got 0.0" in capsys.readouterr().err
    assert _cli(tiny_model_dir, tmp_path, out) == 2  # a directory given as --data
    assert "is a directory, not a file" in capsys.readouterr().err
    assert _cli(tmp_path / "no-model", data, out) == 2
    assert "no-model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    assert _cli(tiny_model_dir, bad, out) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d.jsonl", "run"]  # nothing left beside it


@pytest.mark.parametrize("crash", [RuntimeError("boom"), KeyboardInterrupt()])
def test_overwrite_that_crashes_or_is_interrupted_leaves_the_finished_run_intact(finished, tiny_model_dir, tmp_path,
                                                                                monkeypatch, crash):
    import rankdial.train.loop as loop

    data, out, before = finished
    fail_on_call(monkeypatch, loop, "token_loss_sum", 3, crash)  # dies at step 3
    expected = RuntimeError if isinstance(crash, RuntimeError) else TrainingInterrupted
    with pytest.raises(expected) as err:
        train(**_args(tiny_model_dir, data, out, steps=6, save_every=1), overwrite=True)
    if expected is TrainingInterrupted:
        assert f"the old run in {out} is untouched" in str(err.value)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "run"]


def test_overwrite_replaces_the_run_only_when_the_new_one_finishes(finished, tiny_model_dir):
    data, out, before = finished
    r = train(**_args(tiny_model_dir, data, out, steps=2), overwrite=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and r.output_dir == out
    assert not (out / "checkpoints").exists()  # the old run's checkpoints went with it
    assert read_marker(out) == "train-run"


def test_a_run_from_before_markers_is_recognised_by_rankdial_train_json(finished, tiny_model_dir):
    data, out, _ = finished
    (out / MARKER).unlink()
    train(**_args(tiny_model_dir, data, out, steps=1), overwrite=True)
    assert read_marker(out) == "train-run"


def test_resume_into_a_folder_rankdial_did_not_write_touches_nothing(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text('{"my": "own numbers"}\n')
    before = _snapshot(mine)
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(mine), "--steps",
                 "1", "--no-progress", "--resume"])
    assert code == 2 and "rankdial did not write it" in capsys.readouterr().err
    assert _snapshot(mine) == before
    with pytest.raises(OutputError):  # nor into one of the run's own inputs
        train(**_args(tiny_model_dir, data, tmp_path, steps=1))


def test_resume_and_overwrite_together_is_refused(finished, tiny_model_dir):
    from rankdial import TrainingError

    data, out, before = finished
    with pytest.raises(TrainingError, match="pass one of them"):
        train(**_args(tiny_model_dir, data, out), overwrite=True, resume=True)
    assert _snapshot(out) == before


def test_rankdial_train_json_records_the_nested_config_and_reloads(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    r = train(**_args(tiny_model_dir, data, tmp_path / "run", steps=1, r=4, rank_pattern={"q_proj": 2},
                      exclude_modules=["o_proj"], use_rslora=True))
    saved = json.loads((r.output_dir / "rankdial_train.json").read_text())
    assert saved["lora"]["rank_pattern"] == {"q_proj": 2} and "r" not in saved
    cfg = read_run_config(r.output_dir)
    assert cfg.to_dict() == {k: v for k, v in saved.items() if k not in ("base_model", "world_size")}
    assert make_config(cfg) == cfg
    assert cfg.lora.r == 4 and cfg.lora.exclude_modules == ["o_proj"] and cfg.lora.use_rslora


def test_bad_values_fail_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import rankdial.models as models

    def never(*a, **k):
        raise AssertionError("the model loader was called")

    monkeypatch.setattr(models, "load_model", never)
    monkeypatch.setattr(models, "load_model_nf4", never)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    for bad in ({"lora_dropout": 1.0}, {"r": 0}, {"target_modules": []}, {"lr": float("inf")}):
        with pytest.raises(ConfigError):
            train(**_args(tiny_model_dir, data, tmp_path / "o", **bad))
    with pytest.raises(DataError, match="is a directory"):
        train(**_args(tiny_model_dir, tmp_path, tmp_path / "o"))
    with pytest.raises(ModelError):
        train(**_args(tmp_path / "missing-model", data, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_overwrite_refuses_a_finished_run_that_holds_the_users_own_file(tiny_model_dir, tmp_path):
    """--overwrite replaces what rankdial wrote, never a file the user put in the run folder since."""
    from rankdial.errors import OutputError
    from rankdial.train import train

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    args = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), steps=1, batch_size=2,
                max_length=64, progress=False)
    train(**args)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt.*rankdial did not write"):
        train(overwrite=True, **args)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_overwrite_of_an_unfinished_run_keeps_the_users_file(tiny_model_dir, tmp_path):
    from rankdial.errors import OutputError
    from rankdial.train import train

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    args = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), steps=4, batch_size=2,
                max_length=64, progress=False, save_every=2)
    train(**args)
    (tmp_path / "run" / "summary.json").unlink()  # as if stopped after its checkpoints
    (tmp_path / "run" / "thesis-notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="thesis-notes.txt"):
        train(overwrite=True, **args)
    assert (tmp_path / "run" / "thesis-notes.txt").read_text() == "mine"
    (tmp_path / "run" / "thesis-notes.txt").unlink()
    train(overwrite=True, **args)  # rankdial's own files alone: replaced


def test_a_folder_with_rankdial_train_json_and_the_users_files_is_not_a_run_to_replace(finished, tiny_model_dir):
    data, out, _ = finished
    (out / MARKER).unlink()
    (out / "my-notes.txt").write_text("mine")  # one common file name does not make the folder rankdial's
    with pytest.raises(OutputError):
        train(**_args(tiny_model_dir, data, out, steps=1), overwrite=True)
    assert (out / "my-notes.txt").read_text() == "mine"
