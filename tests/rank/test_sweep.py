"""rankdial sweep: one config trained at several ranks, eval loss against rank and trainable parameters."""

import json

import pytest

from conftest import qa_rows, write_jsonl
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
