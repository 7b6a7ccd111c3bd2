"""`rankdial merge` (rankdial.export): never replaces a folder it did not write, nor one of its own inputs."""

import json
import shutil

import pytest
import torch

import rankdial as rd
from conftest import make_model_dir
from rankdial.cli import main


def snapshot(folder):
    """{relative path: bytes} of every file below folder (folders included as None)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    from rankdial.models import load_model

    tmp = tmp_path_factory.mktemp("export")
    base = make_model_dir(tmp / "base")
    model, _ = load_model(base)
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    rd.save_adapter(model, tmp / "adapter")
    return base, tmp / "adapter"


def merge(adapter, out, base, *extra):
    return main(["merge", str(adapter), "--model", str(base), "--out", str(out), *extra])


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model is an error: the output checks must come first."""
    import rankdial.export as export

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(export, "load_model", refuse)
    monkeypatch.setattr(export, "load_model_nf4", refuse)


def test_a_project_folder_holding_config_json_is_never_replaced(base_and_adapter, tmp_path, capsys, no_model_load):
    base, adapter = base_and_adapter
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"mine": true}')
    (project / "thesis.txt").write_text("four years of work")
    (project / "src" / "main.py").write_text("print('hi')\n")
    before = snapshot(project)
    assert merge(adapter, project, base) == 2
    one_line_error(capsys, str(project), "rankdial did not write it")
    assert snapshot(project) == before


def test_the_base_model_is_never_the_output(base_and_adapter, tmp_path, capsys, no_model_load):
    _, adapter = base_and_adapter
    base = shutil.copytree(base_and_adapter[0], tmp_path / "base")
    (base / "MODEL_CARD.md").write_text("my base model")
    before = snapshot(base)
    assert merge(adapter, base, base) == 2
    one_line_error(capsys, "an input of this command")
    assert snapshot(base) == before


@pytest.mark.parametrize("where", ["adapter", "inside", "parent"])
def test_the_adapter_is_never_the_output_nor_inside_it_nor_holding_it(base_and_adapter, tmp_path, capsys,
                                                                       no_model_load, where):
    base, original = base_and_adapter
    adapter = shutil.copytree(original, tmp_path / "runs" / "adapter")
    out = {"adapter": adapter, "inside": adapter / "merged", "parent": tmp_path / "runs"}[where]
    before = snapshot(tmp_path)
    assert merge(adapter, out, base) == 2
    one_line_error(capsys, "an input of this command")
    assert snapshot(tmp_path) == before


def test_merging_again_into_its_own_folder_works_and_an_old_merge_folder_is_recognised(base_and_adapter, tmp_path):
    from rankdial.atomic import read_marker

    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    assert merge(adapter, out, base) == 0
    first = snapshot(out)
    assert read_marker(out) == "merged-model" and (out / "model.safetensors").is_file()
    assert merge(adapter, out, base) == 0  # its own marker: replaced
    assert snapshot(out).keys() == first.keys()
    (out / ".rankdial-output.json").unlink()  # a folder merged before rankdial wrote markers
    assert merge(adapter, out, base) == 0
    assert read_marker(out) == "merged-model" and snapshot(out).keys() == first.keys()
    assert json.loads((out / "rankdial_merge.json").read_text())["base_model"] == str(base)


def test_an_old_merge_folder_holding_a_users_file_is_never_replaced(base_and_adapter, tmp_path, capsys):
    """Before markers a merged folder was recognised by rankdial_merge.json alone, and merging into it again
    deleted whatever else the user had put there. Now only a folder holding nothing but a merged model's files
    counts as rankdial's (the rule runs, adapters and quantized models use)."""
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    assert merge(adapter, out, base) == 0
    (out / ".rankdial-output.json").unlink()
    (out / "notes.md").write_text("my evaluation notes")
    before = snapshot(out)
    capsys.readouterr()
    assert merge(adapter, out, base) == 2
    one_line_error(capsys, str(out), "notes.md")
    assert snapshot(out) == before


def test_a_folder_holding_only_rankdial_merge_json_and_user_files_is_never_replaced(base_and_adapter, tmp_path,
                                                                                    capsys, no_model_load):
    base, adapter = base_and_adapter
    out = tmp_path / "project"
    out.mkdir()
    (out / "rankdial_merge.json").write_text("{}")
    (out / "thesis.txt").write_text("four years of work")
    before = snapshot(out)
    assert merge(adapter, out, base) == 2
    one_line_error(capsys, str(out), "thesis.txt")
    assert snapshot(out) == before


def test_an_interrupted_merge_leaves_the_old_folder_whole(base_and_adapter, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    assert merge(adapter, out, base) == 0
    before = snapshot(out)
    capsys.readouterr()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", ctrl_c)
    assert merge(adapter, out, base) == 130
    assert capsys.readouterr().err == "rankdial merge: interrupted\n"
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no half-built folder left beside it


def test_merge_runs_on_the_device_it_is_given(base_and_adapter, tmp_path, capsys, monkeypatch):
    import rankdial.export as export
    from rankdial.errors import ModelError

    base, adapter = base_and_adapter
    seen = []

    def record(path, device="cpu"):
        seen.append(device)
        raise ModelError("stop here")
    monkeypatch.setattr(export, "load_model", record)
    assert merge(adapter, tmp_path / "m", base, "--device", "cpu") == 2
    assert seen == [torch.device("cpu")]
    capsys.readouterr()
    assert merge(adapter, tmp_path / "m", base, "--device", "nonsense") == 2
    one_line_error(capsys, "'nonsense'", "auto, cpu, cuda")
    if not torch.cuda.is_available():
        assert merge(adapter, tmp_path / "m", base, "--device", "cuda") == 2
        one_line_error(capsys, "no CUDA GPU")
    assert len(seen) == 1 and not (tmp_path / "m").exists()
