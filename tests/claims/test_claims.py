"""rankdial claims: LoRA's case measured on this run, its report, and its refusals (claims/)."""

import json
from pathlib import Path

import pytest

from rankdial import OutputError
from rankdial.cli import main
from rankdial.claims import merge_latency, parameter_arithmetic, rank_as_capacity
from rankdial.claims.report import PLOTS, write_report


def test_parameter_arithmetic_comes_from_the_planner():
    f = parameter_arithmetic()
    assert f["trainable"] == 131_072 and f"{f['share_percent']:.2f}" == "0.78"
    p = f["llama_70b"]
    assert 125 <= p["full"]["weights_gb"] <= 150 and 33 <= p["qlora"]["total_gb"] <= 48
    assert p["qlora"]["total_gb"] < p["lora"]["total_gb"] < p["full"]["total_gb"]
    assert parameter_arithmetic(d=1024, r=8)["trainable"] == 8 * 2048


def test_a_user_folder_or_a_file_is_refused_before_anything_is_measured(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="rankdial did not write it"):
        write_report(mine, quick=True, log=pytest.fail)  # log is called once measuring starts
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    afile = tmp_path / "report.md"
    afile.write_text("x")
    assert main(["claims", "--quick", "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "x"
    with pytest.raises(SystemExit):
        main(["claims", "--quick"])  # --out is required


@pytest.mark.slow
def test_merged_adapter_equals_unmerged_and_changes_the_base():
    f = merge_latency(repeats=2, seq_len=16)
    assert f["max_abs_diff_merged_vs_unmerged"] < 1e-3 < f["max_abs_diff_adapter_vs_base"]
    assert not f["merged_has_lora_layers"] and min(f["base_ms"], f["unmerged_ms"], f["merged_ms"]) > 0


@pytest.mark.slow
def test_quick_report_writes_every_claim_with_consistent_figures(tmp_path, capsys):
    out = tmp_path / "claims"
    assert main(["claims", "--quick", "--out", str(out)]) == 0
    f = json.loads((out / "claims.json").read_text())
    report = (out / "report.md").read_text()
    for name in PLOTS:
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and f"![{name}]({name}.png)" in report
    assert "**131,072**" in report and "**0.78%**" in report and "rankdial claims --quick" in report

    merge = f["merge"]
    assert merge["max_abs_diff_merged_vs_unmerged"] < 1e-3 < merge["max_abs_diff_adapter_vs_base"]
    assert "equal to fp32 rounding" in report

    mem = {row["method"]: row for row in f["memory"]["rows"] if row["model"] == "default"}
    assert all(row["error"] is None and row["measured_mb"] > 0 for row in mem.values())
    assert mem["qlora"]["planned_weights_mb"] < mem["lora"]["planned_weights_mb"]
    assert mem["lora"]["trainable_params"] < mem["full"]["trainable_params"]

    rank = f["rank"]
    k, floor = rank["task"]["true_rank"], rank["task"]["noise_floor"]
    by_rank = {run["rank"]: run for run in rank["runs"]}
    assert max(r["final_eval"] for r in rank["runs"] if r["rank"] >= k) < min(
        r["final_eval"] for r in rank["runs"] if r["rank"] < k)
    assert by_rank[k]["final_eval"] < 1.5 * floor  # at k it fits, close to the noise floor
    top = by_rank[max(by_rank)]
    assert top["final_train"] < floor < top["final_eval"] and top["final_eval"] > by_rank[k]["final_eval"]

    ad = f["adapters"]
    assert 0 < ad["adapter_bytes"] < ad["base_bytes"]
    assert all(row["base_plus_adapters"] < row["full_copies"] for row in ad["rows"] if row["n"] >= 2)

    steer = f["steering"]
    for name, runs in steer["tasks"].items():
        assert runs[-1]["method"] == "full" and all(run["eval_loss"] < run["eval_loss_before"] for run in runs), name
        for run in runs:  # each method's rate comes from its family's grid, kept by the lowest validation loss
            grid = steer["lr_grids"][run["method"]]
            assert run["lr"] in grid and run["lr_grid"] == grid and len(run["lr_search"]) == len(grid)
            assert run["val_loss"] == min(x["val_loss"] for x in run["lr_search"])
    assert "Learning rates were tuned, not picked by hand" in report and "validation loss" in report
    assert "report:" in capsys.readouterr().out

    # its own report folder may be rewritten; a file the user put there makes it refuse
    write_report(out, figures=f, log=None)
    (out / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match="mine.txt"):
        write_report(out, figures=f, log=None)
    assert (out / "mine.txt").read_text() == "mine"


def test_rank_capacity_claim_runs_each_rank_on_the_known_task():
    f = rank_as_capacity([1, 4], steps=5)
    assert f["task"]["true_rank"] == 4 and [run["rank"] for run in f["runs"]] == [1, 4]
    assert all(len(run["steps"]) == 2 and len(run["singular_values"]) == 64 for run in f["runs"])


def _rank_figures(evals: dict[int, tuple[float, float]]) -> dict:
    runs = [{"rank": r, "final_train": tr, "final_eval": ev} for r, (tr, ev) in evals.items()]
    return {"task": {"true_rank": 4, "d": 64, "n_train": 96, "n_eval": 512, "noise_floor": 0.09}, "runs": runs}


def test_the_rank_verdict_is_worded_from_the_figures_either_way():
    from rankdial.claims.capacity import section as _rank

    usual = " ".join(_rank(_rank_figures({2: (0.5, 0.6), 4: (0.085, 0.095), 64: (0.03, 0.2)})))
    assert "eval loss stays up" in usual and "below the floor: it fits the noise" in usual and "eval rises to" in usual
    other = " ".join(_rank(_rank_figures({2: (0.05, 0.08), 4: (0.085, 0.095), 64: (0.1, 0.09)})))
    assert "does not stay up" in other and "not below the floor: it does not fit the noise" in other
    assert "it fits the noise" not in other.replace("does not fit", "") and "eval rises" not in other
    assert "does not rise above r = k's" in other


def test_the_steering_verdict_says_from_r_up_only_when_every_higher_rank_does_as_well():
    from rankdial.claims.steering import _steering_verdict

    full = {"eval_loss": 1.0}
    runs = lambda *losses: [{"rank": r, "eval_loss": x} for r, x in zip((1, 8, 64), losses)]  # noqa: E731
    assert _steering_verdict(runs(1.2, 0.9, 0.8), full).endswith("from r = 8 up")
    assert _steering_verdict(runs(0.9, 1.1, 0.8), full) == "LoRA matches or beats full fine-tuning only at r = 1, 64"
    assert _steering_verdict(runs(1.2, 1.1, 1.3), full) == "no LoRA rank reaches full fine-tuning"


REPORT = Path(__file__).resolve().parents[2] / "docs" / "claims" / "claims.json"  # the committed full report


def _diverged_figures() -> dict:
    """The committed report's figures with a diverged run in every claim that trains or measures."""
    nan, inf = float("nan"), float("inf")
    f = json.loads(REPORT.read_text())
    f["merge"]["max_abs_diff_merged_vs_unmerged"] = nan
    f["memory"]["rows"][1]["measured_mb"] = inf
    run = f["rank"]["runs"][2]  # r = 3, the rank just below the true rank 4: the verdict reads it
    run["final_eval"], run["eval_loss"] = nan, [nan] * len(run["eval_loss"])
    facts = f["steering"]["tasks"]["facts"]
    lora = facts[1]  # LoRA r=8 diverged at every rate
    for x in lora["lr_search"]:
        x["val_loss"] = nan
    lora.update(val_loss=nan, eval_loss=nan, loss_over_full=nan, diverged=True, lr_at_edge=False,
                diverged_lrs=lora["lr_grid"])
    full = f["steering"]["tasks"]["format"][-1]  # full fine-tuning diverged on the format task
    full.update(val_loss=inf, eval_loss=inf, diverged=True, lr_at_edge=False)
    for row in f["steering"]["tasks"]["format"]:
        row["loss_over_full"] = nan
    return f


def test_a_diverged_figure_is_reported_as_diverged_never_a_crash(tmp_path):
    out = write_report(tmp_path / "r", figures=_diverged_figures(), log=None) and tmp_path / "r"
    report = (out / "report.md").read_text()
    assert "nan" not in report.lower().replace("nanosecond", "") and "| inf" not in report
    assert "Merged against unmerged logits: max |Δ| = diverged" in report
    assert "| default | lora | 8×128 | 327,680 | 17 | 167 | diverged | diverged |" in report
    assert "| 3 | 0.2494 | diverged | diverged |" in report and "r = 3 diverged, so these runs give no verdict" in report
    assert "| facts | LoRA r=8 | 163,840 | diverged at every rate (" in report
    assert "- format: full fine-tuning diverged at every rate: LoRA has nothing to be compared with." in report
    assert "- facts: " in report and "r = 8 diverged" in report
    for name in PLOTS:
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "claims.json").read_text())  # strict JSON: the diverged figures are null, and listed
    assert saved["merge"]["max_abs_diff_merged_vs_unmerged"] is None
    assert saved["not_finite"]["merge.max_abs_diff_merged_vs_unmerged"] == "nan"
    assert saved["not_finite"]["steering.tasks.format.3.eval_loss"] == "inf"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_report_whose_every_figure_is_non_finite_is_still_written(tmp_path, value):
    def every(x):
        if isinstance(x, dict):
            return {k: every(v) for k, v in x.items()}
        if isinstance(x, list):
            return [every(v) for v in x]
        return value if isinstance(x, float) else x
    f = json.loads(REPORT.read_text())
    f = {**f, **{name: every(f[name]) for name in PLOTS}}
    write_report(tmp_path / "r", figures=f, log=None)
    assert "diverged" in (tmp_path / "r" / "report.md").read_text()
