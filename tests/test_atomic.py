"""Atomic folders: a target that cannot be written is refused before any work, and the temporary folders a killed
process leaves beside an output are swept by the next write, and nothing else."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankdial.atomic import _HOST, atomic_dir, check_target, read_marker, sweep_stale
from rankdial.errors import OutputError


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_write_sweeps_what_a_killed_process_left(tmp_path):
    target = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}@{_HOST}-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "half.safetensors").write_bytes(b"x" * 10)
    with atomic_dir(target, kind="adapter") as tmp:
        assert not stale.exists()
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}@{_HOST}-")
        (tmp / "a.txt").write_text("a")
    assert read_marker(target) == "adapter" and (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_live_processes_old_copies_and_user_files_are_left_alone(tmp_path):
    target = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}@{_HOST}-abc123"  # a live process (our parent) may still be writing it
    remote = tmp_path / f".out.tmp-{_dead_pid()}@another_machine-abc123"  # dead here, maybe alive there
    old = tmp_path / ".out.old-abc123"  # after a crash between two renames this may be the only good copy
    other = tmp_path / f".other.tmp-{_dead_pid()}@{_HOST}-abc123"  # another target's
    mine = tmp_path / ".out.tmp-notapid"  # not rankdial's pattern
    for p in (live, remote, old, other, mine):
        p.mkdir()
    link = tmp_path / f".out.tmp-{_dead_pid()}@{_HOST}-link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert sweep_stale(target) == []
    assert all(p.exists() for p in (live, remote, old, other, mine)) and link.is_symlink()


@pytest.mark.parametrize("where", ["file_below", "empty", "proc"])
def test_a_target_that_cannot_be_written_is_refused_before_any_work(tmp_path, where):
    from rankdial.atomic import check_target
    from rankdial.errors import OutputError

    (tmp_path / "thesis.txt").write_text("mine")
    target = {"file_below": tmp_path / "thesis.txt" / "x", "empty": "", "proc": Path("/proc/rankdial-report")}[where]
    with pytest.raises(OutputError) as err:
        check_target(target, kind="claims-report", what="--out folder")
    assert "--out folder" in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "thesis.txt").read_text() == "mine"


def test_replacing_an_existing_output_where_no_new_folder_can_be_made_is_refused_before_any_work():
    from rankdial.atomic import check_target
    from rankdial.errors import OutputError

    assert Path("/proc/self/fd").is_dir()  # exists, in a folder that takes no new entries, even for root
    with pytest.raises(OutputError, match="does not take new folders"):
        check_target("/proc/self/fd", kind="adapter")


def test_a_killed_writers_folder_that_is_an_input_is_not_swept(tmp_path):
    stale = tmp_path / f".out.tmp-{_dead_pid()}@{_HOST}-abc123"
    (stale / "checkpoints").mkdir(parents=True)  # the only copy of a killed run's checkpoints, read as an input
    assert sweep_stale(tmp_path / "out", inputs=[stale / "checkpoints"]) == []
    assert stale.is_dir()


def test_a_symlinked_target_is_refused(tmp_path):
    from rankdial.atomic import check_target
    from rankdial.errors import OutputError

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link"):
        check_target(tmp_path / "link", kind="adapter")


def _old_outputs():
    """(kind, its before-markers rule, the files such an output held) for every kind rankdial replaces."""
    from rankdial.adapters.io import is_plain_adapter_folder
    from rankdial.export import MERGED_BEFORE_MARKERS
    from rankdial.quant.bnb_format import RANKDIAL_QUANT_KEYS, written_before_markers
    from rankdial.train.artefacts import is_legacy_run
    from rankdial.train.checkpoint import _is_checkpoint_folder

    quant = json.dumps({"quantization_config": {k: None for k in RANKDIAL_QUANT_KEYS}})
    return [
        ("adapter", is_plain_adapter_folder, {"adapter_config.json": "{}", "adapter_model.safetensors": ""}),
        ("train-run", is_legacy_run, {"rankdial_train.json": "{}", "metrics.jsonl": "", "summary.json": "{}",
                                      "checkpoints/step-000002/state.json": "{}"}),
        ("quantized-model", written_before_markers, {"config.json": quant, "model.safetensors": ""}),
        ("train-checkpoint", _is_checkpoint_folder, {"state.json": "{}", "trainable.safetensors": "",
                                                     "training_state.pt": "", "manifest.json": "{}",
                                                     "adapter/adapter_config.json": "{}"}),
        ("merged-model", MERGED_BEFORE_MARKERS, {"rankdial_merge.json": "{}", "config.json": "{}",
                                                 "model-00001-of-00002.safetensors": "", "tokenizer.json": "{}",
                                                 "model.safetensors.index.json": "{}"}),
    ]


@pytest.mark.parametrize("case", range(5))
def test_an_unmarked_output_of_every_kind_is_ours_only_while_it_holds_nothing_else(tmp_path, case):
    """One rule (atomic.OwnFiles) for every kind: an old output's tell-tale file alone never makes a folder
    rankdial's to replace; a single file of the user's in it makes it the user's."""
    kind, rule, files = _old_outputs()[case]
    folder = tmp_path / "out"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    assert check_target(folder, kind, legacy=rule) == folder
    (folder / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match=r"holds \['notes.md'\], which rankdial did not write there"):
        check_target(folder, kind, legacy=rule)
