"""rankdial sweep: one config trained at several ranks, eval loss against rank and trainable parameters."""

import json

import pytest

from conftest import qa_rows, write_jsonl
import rankdial as rd
from rankdial import ConfigError, OutputError
from rankdial.cli import main
from rankdial.rank import sweep


@pytest.mark.slow
def test_sweep_trains_each_rank_and_writes_json_and_plot(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    assert main(["sweep", "--model", str(tiny_model_dir), "--data", str(data), "--eval-fraction", "0.25",
                 "--steps", "3", "--batch-size", "2", "--max-length", "64", "--no-progress",
                 "--ranks", "4,1,2", "--out", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert report["ranks"] == [1, 2, 4] and [row["r"] for row in report["rows"]] == [1, 2, 4]
    trainable = [row["trainable_params"] for row in report["rows"]]
    assert trainable[1] == 2 * trainable[0] and trainable[2] == 4 * trainable[0]  # r·(d_in + d_out) per module
    assert all(row["eval_loss"] < row["eval_loss_first"] for row in report["rows"])
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for r in (1, 2, 4):
        config = json.loads((tmp_path / "s" / f"r{r}" / "adapter_config.json").read_text())
        assert config["r"] == r and (tmp_path / "s" / f"r{r}" / "summary.json").exists()
    assert "trainable" in capsys.readouterr().out


def test_bad_sweeps_are_refused_before_training(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    base = dict(model=str(tiny_model_dir), data=str(data), steps=1, batch_size=2, max_length=64, progress=False)
    for ranks in ("1,x", [], [0, 2], "2,-1"):
        with pytest.raises(ConfigError, match="positive integers"):
            sweep(None, ranks, tmp_path / "s", eval_fraction=0.25, **base)
    with pytest.raises(ConfigError, match="eval_data.*eval_fraction"):
        sweep(None, [1, 2], tmp_path / "s", **base)
    with pytest.raises(ConfigError, match="full fine-tuning has no rank"):
        sweep(None, [1], tmp_path / "s", method="full", eval_fraction=0.25, **base)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="rankdial did not write it"):
        sweep(None, [1], tmp_path / "mine", eval_fraction=0.25, **base)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_its_finished_ranks_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """Before: the sweep's temporary folder was removed on Ctrl-C, with every finished rank in it."""
    import rankdial.train as train_pkg
    import rankdial.train.loop as loop
    from rankdial import TrainingInterrupted
    from rankdial.rank.sweep import partial_folder

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    common = dict(model=str(tiny_model_dir), data=str(data), eval_fraction=0.25, steps=4, batch_size=2,
                  max_length=64, progress=False, save_every=1)
    out = tmp_path / "s"
    real_train, real_loss, trained = train_pkg.train, loop.token_loss_sum, []

    def train_but_ctrl_c_in_r2_step_3(cfg, r, **kw):
        trained.append((r, kw["resume"]))
        calls = {"n": 0}

        def loss(*a, **k):
            calls["n"] += 1
            if r == 2 and calls["n"] == 4:  # Ctrl-C in step 4 of r2: its checkpoint of step 3 is kept
                raise KeyboardInterrupt
            return real_loss(*a, **k)
        monkeypatch.setattr(loop, "token_loss_sum", loss)
        return real_train(cfg, r=r, **kw)
    monkeypatch.setattr(train_pkg, "train", train_but_ctrl_c_in_r2_step_3)
    with pytest.raises(TrainingInterrupted, match=r"rank 2; finished ranks \(r1\).*--resume"):
        sweep(None, [1, 2], out, log=lambda *a: None, **common)
    work = partial_folder(out)
    assert not out.exists() and (work / "r1" / "summary.json").is_file() and (work / "r2" / "checkpoints").is_dir()
    r1 = (work / "r1" / "summary.json").read_bytes()
    with pytest.raises(rd.TrainingError, match="interrupted sweep.*finished: r1.*--resume"):
        sweep(None, [1, 2], out, log=lambda *a: None, **common)  # a new sweep never deletes the finished ranks
    with pytest.raises(ConfigError, match="another config or other ranks"):
        sweep(None, [1, 4], out, log=lambda *a: None, resume=True, **common)

    monkeypatch.setattr(loop, "token_loss_sum", real_loss)
    trained.clear()
    result = sweep(None, [1, 2], out, log=lambda *a: None, resume=True, **{**common})
    assert trained == [(2, True)]  # r1 was not trained again; r2 resumed from its checkpoint
    assert not work.exists() and (out / "r1" / "summary.json").read_bytes() == r1
    summary = json.loads((out / "r2" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 4
    report = json.loads((out / "sweep.json").read_text())
    assert [row["r"] for row in report["rows"]] == [1, 2] and report["rows"] == result.rows
    assert report["rows"][1]["seconds"] == summary["seconds"]
