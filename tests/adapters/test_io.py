"""Adapter folders: bit-exact round trips, atomic writes, and a clear error for every bad file."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankdial as rd
import rankdial.adapters.io as adapter_io
from rankdial.lora import lora_layers
from conftest import model_output, tiny_model, token_batch


def trained(seed=3, **kwargs):
    model = tiny_model("llama")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    rd.inject(model, rd.LoraConfig(**{**cfg, **kwargs}))
    return model


def adapter_tensors(model, adapter="default"):
    return adapter_io.adapter_state_dict(model, adapter)


def test_save_load_round_trips_bit_exactly(tmp_path):
    model = trained(modules_to_save=["lm_head"])
    rd.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".rankdial-output.json", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
    fresh = tiny_model("llama")
    rd.load_adapter(fresh, tmp_path / "a")
    saved, loaded = adapter_tensors(model), adapter_tensors(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = token_batch()
    assert torch.equal(model_output(fresh, ids), model_output(model, ids))


def test_file_layout_is_peft(tmp_path):
    model = trained()
    rd.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)


def test_all_linear_is_spelled_out_for_other_tools(tmp_path):
    model = tiny_model("llama")
    rd.inject(model, rd.LoraConfig(r=2))
    rd.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    rd.save_adapter(trained(), tmp_path / "a")
    frozen, live = tiny_model("llama"), tiny_model("llama")
    rd.load_adapter(frozen, tmp_path / "a")
    rd.load_adapter(live, tmp_path / "a", trainable=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert {n for n, p in live.named_parameters() if p.requires_grad} == {n for n, _ in live.named_parameters() if ".lora_" in n}


def test_a_crash_mid_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    good = trained(seed=1)
    rd.save_adapter(good, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(adapter_io, "save_file", crash)
    with torch.no_grad():
        for _, layer in lora_layers(good):
            layer.lora_B["default"].weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        rd.save_adapter(good, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary folder left behind


def test_save_replaces_an_existing_adapter_but_never_a_foreign_folder(tmp_path):
    rd.save_adapter(trained(), tmp_path / "a")
    rd.save_adapter(trained(r=2), tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(rd.RankdialError, match="rankdial did not write it"):
        rd.save_adapter(trained(), tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


# -- bad files: each a clear error, and the model untouched ---------------------------------------

@pytest.fixture
def saved(tmp_path):
    rd.save_adapter(trained(), tmp_path / "a")
    return tmp_path / "a"


def load_fails(folder, match, **kwargs):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((rd.AdapterFileError, rd.AdapterError, rd.TargetError)) as err:
        rd.load_adapter(model, folder, **kwargs)
    after = model.state_dict()
    assert state.keys() == after.keys(), "a failed load must leave the model untouched"
    assert all(torch.equal(state[k], after[k]) for k in state), "a failed load changed a weight"
    assert all(type(m).__name__ != "LoraLayer" for m in model.modules())
    assert not rd.adapter_names(model)
    assert __import__("re").search(match, str(err.value), __import__("re").S), str(err.value)
    return str(err.value)


def rewrite(folder, fn):
    file = folder / "adapter_model.safetensors"
    tensors = fn(load_file(file))
    save_file(tensors, file, metadata={"format": "pt"})


def test_shapes_that_do_not_fit_name_module_and_both_shapes(saved):
    rewrite(saved, lambda t: {**t, "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": torch.zeros(4, 31)})
    load_fails(saved, r"model\.layers\.1\.self_attn\.v_proj\.lora_A\.weight: the file has shape \[4, 31\], the model needs \[4, 32\]")


def test_missing_and_unexpected_keys_are_all_listed_at_once(saved):
    def damage(t):
        t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 32)
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 4)
        return t
    rewrite(saved, damage)
    message = load_fails(saved, "missing keys \\(2\\).*unexpected keys \\(2\\)")
    assert "layers.0.self_attn.q_proj.lora_A" in message and "layers.0.self_attn.q_proj.lora_B" in message
    assert "layers.7.self_attn.q_proj" in message


def test_a_matrix_without_its_partner_or_of_the_wrong_kind_is_named(saved):
    rewrite(saved, lambda t: {k: v for k, v in t.items() if not k.endswith("layers.1.self_attn.v_proj.lora_A.weight")})
    load_fails(saved, "1 LoRA matrices lack their partner .*layers.1.self_attn.v_proj.lora_B")
    rewrite(saved, lambda t: {k: (v * 100).to(torch.int32) for k, v in t.items()})
    load_fails(saved, "not floating point")


def test_nan_or_inf_in_adapter_weights(saved):
    def poison(t):
        key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        t[key] = t[key].clone()
        t[key][0, 0] = float("inf")
        return t
    rewrite(saved, poison)
    message = load_fails(saved, "NaN/Inf values in .*layers.0.self_attn.v_proj.lora_B")
    assert "another base model" not in message  # the file is corrupt, not for another model


def test_convert_bin_refuses_a_folder_holding_both_files(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in tensors.items()}, saved / "adapter_model.bin")
    before = (saved / "adapter_model.safetensors").read_bytes()
    with pytest.raises(rd.AdapterFileError, match="both adapter_model.bin and adapter_model.safetensors"):
        rd.convert_bin_adapter(saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before


def test_save_adapter_into_a_training_run_folder_keeps_the_run(tmp_path):
    """A finished `rankdial train` folder holds the adapter plus metrics, plot, config and summary: saving
    another adapter there would delete them (written before markers: recognised by its own files)."""
    run = tmp_path / "run"
    rd.save_adapter(trained(), run)
    (run / ".rankdial-output.json").unlink()
    for name in ("loss.png", "metrics.jsonl", "rankdial_train.json", "summary.json"):
        (run / name).write_text("{}")
    with pytest.raises(rd.OutputError, match=r"holds \['loss.png', 'metrics.jsonl', .*which rankdial did not write"):
        rd.save_adapter(trained(r=2), run)
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "loss.png",
                                                     "metrics.jsonl", "rankdial_train.json", "summary.json"]
    (run / ".rankdial-output.json").write_text('{"kind": "train-run"}')
    with pytest.raises(rd.OutputError, match="as a 'train-run'"):
        rd.save_adapter(trained(r=2), run)


def test_saved_files_follow_the_umask(tmp_path):
    rd.save_adapter(trained(), tmp_path / "a")
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    for p in [tmp_path / "a", *(tmp_path / "a").iterdir()]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, (p.name, oct(p.stat().st_mode))


@pytest.mark.parametrize("bad", [None, 5, ""])
def test_paths_that_are_not_paths(bad):
    model = trained()
    with pytest.raises(rd.AdapterFileError, match="must be a folder path"):
        rd.load_adapter(tiny_model("llama"), bad)
    with pytest.raises(rd.AdapterFileError, match="must be a folder path"):
        rd.save_adapter(model, bad)


def test_state_dict_round_trip_at_the_top_level():
    source, target = trained(seed=3), trained(seed=4)
    tensors = rd.adapter_state_dict(source)
    assert tensors.keys() == rd.adapter_state_dict(target).keys()
    rd.set_adapter_state_dict(target, tensors)
    ids = token_batch()
    assert torch.equal(model_output(source, ids), model_output(target, ids))
    broken = dict(tensors)
    broken.pop(next(iter(broken)))
    before = rd.adapter_state_dict(target)
    with pytest.raises(rd.AdapterFileError, match="missing keys"):
        rd.set_adapter_state_dict(target, broken)
    assert all(torch.equal(before[k], v) for k, v in rd.adapter_state_dict(target).items())


@pytest.mark.parametrize("cut", [5, 60, -10])
def test_truncated_or_corrupt_safetensors(saved, cut):
    file = saved / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:cut] if cut > 0 else data[:cut])
    load_fails(saved, "truncated or corrupt")


def test_garbage_safetensors_header(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"not json at all" * 4)
    load_fails(saved, "truncated or corrupt")


def test_pickle_adapter_is_refused_by_default_and_converts_without_running_code(saved, tmp_path):
    tensors = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    load_fails(saved, "pickle file.*rankdial convert-bin")
    rd.convert_bin_adapter(saved)
    model = tiny_model("llama")
    rd.load_adapter(model, saved)
    assert torch.equal(adapter_tensors(model)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the hostile file, read by torch's safe unpickler
def test_a_malicious_pickle_never_runs(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Exploit()}))
    load_fails(saved, "pickle file")
    load_fails(saved, "could not be read as tensors", allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()


def test_config_problems(saved, tmp_path):
    load_fails(tmp_path / "nowhere", "does not exist")
    (saved / "adapter_config.json").write_text("{not json")
    load_fails(saved, "not valid JSON")
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    load_fails(saved, "peft_type='IA3'")
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": True}))
    load_fails(saved, "use_dora")
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}))
    load_fails(saved, "r must be a positive integer, got 0")
    (saved / "adapter_config.json").unlink()
    load_fails(saved, "no adapter_config.json")


def test_adapter_for_another_model_names_the_targets(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    load_fails(saved, "matched no linear layer.*q_proj")


def test_adapter_name_already_used_or_unknown(saved):
    model = tiny_model("llama")
    rd.load_adapter(model, saved, adapter="sql")
    with pytest.raises(rd.AdapterError, match="'sql' is already"):
        rd.load_adapter(model, saved, adapter="sql")
    with pytest.raises(rd.AdapterError, match="unknown adapter 'chat'"):
        rd.save_adapter(model, saved.parent / "b", adapter="chat")


def test_saving_a_diverged_adapter_is_refused(tmp_path):
    model = trained()
    with torch.no_grad():
        next(layer for _, layer in lora_layers(model)).lora_A["default"].weight.fill_(float("nan"))
    with pytest.raises(rd.AdapterFileError, match="NaN/Inf"):
        rd.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_folder_holding_only_the_users_readme_is_not_replaced(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README.md").write_text("my notes")
    with pytest.raises(rd.OutputError, match="rankdial did not write it"):
        rd.save_adapter(trained(), tmp_path / "d")
    assert (tmp_path / "d" / "README.md").read_text() == "my notes"


def test_a_file_the_user_added_to_a_saved_adapter_is_kept(tmp_path):
    rd.save_adapter(trained(), tmp_path / "a")
    (tmp_path / "a" / "eval_notes.txt").write_text("mine")
    with pytest.raises(rd.OutputError, match="eval_notes.txt.*rankdial did not write"):
        rd.save_adapter(trained(r=2), tmp_path / "a")
    assert (tmp_path / "a" / "eval_notes.txt").read_text() == "mine"


def test_convert_bin_names_what_it_cannot_convert_and_handles_shared_tensors(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(list(tensors.values()), saved / "adapter_model.bin")
    with pytest.raises(rd.AdapterFileError, match="holds a list, not a dict of named tensors"):
        rd.convert_bin_adapter(saved)
    first, second = list(tensors)[:2]
    shared = dict(tensors)
    shared[second] = shared[first]  # two names, one storage: safetensors itself refuses that
    torch.save(shared, saved / "adapter_model.bin")
    rd.convert_bin_adapter(saved)
    assert torch.equal(load_file(saved / "adapter_model.safetensors")[second], tensors[first])


def test_an_old_adapter_folder_with_a_readme_is_not_replaced(tmp_path):
    rd.save_adapter(trained(), tmp_path / "a")
    (tmp_path / "a" / ".rankdial-output.json").unlink()  # as written before markers
    (tmp_path / "a" / "README.md").write_text("my notes")
    with pytest.raises(rd.OutputError):
        rd.save_adapter(trained(r=2), tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "my notes"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_non_finite_check_equals_the_per_tensor_reference(seed):
    from rankdial.adapters.io import _non_finite
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(3, 5 + i, generator=g) for i in range(8)}
    tensors["half_big"] = torch.full((4, 4), 60000.0, dtype=torch.float16)  # finite, but its norm overflows
    tensors["double_big"] = torch.full((2,), 1e300, dtype=torch.float64)  # likewise
    tensors["ints"], tensors["empty"] = torch.arange(4), torch.zeros(0, 3)
    reference = lambda d: [k for k, t in d.items() if t.is_floating_point() and not torch.isfinite(t).all()]  # noqa: E731
    assert _non_finite(tensors) == reference(tensors) == []
    for k, bad in zip(sorted(tensors)[seed::4], (float("nan"), float("inf"), -float("inf"))):
        if tensors[k].is_floating_point() and tensors[k].numel():
            tensors[k].view(-1)[int(torch.randint(tensors[k].numel(), (1,), generator=g))] = bad
    assert _non_finite(tensors) == reference(tensors) != []


def test_a_weights_path_that_is_not_a_regular_file_is_named_as_such(saved):
    file = saved / "adapter_model.safetensors"
    file.unlink()
    file.mkdir()
    load_fails(saved, "adapter_model.safetensors is not a regular file \\(a directory\\)")
    file.rmdir()
    file.symlink_to(saved / "nowhere")
    load_fails(saved, "not a regular file \\(a broken link\\)")


def test_a_file_that_cannot_be_opened_says_so_not_corrupt(saved, monkeypatch):
    """safetensors reports a file it may not read as missing; rankdial opens it first and says why (root ignores
    permissions, so the refusal is simulated)."""
    import rankdial.adapters.io as io_mod

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io_mod, "open", denied, raising=False)
    load_fails(saved, "cannot be opened \\(Permission denied\\); make it readable")


def test_pread_and_mmap_reads_give_the_same_tensors(saved, monkeypatch):
    """Files up to PREAD_MAX_BYTES are read now, larger ones mapped: the same tensors either way."""
    import rankdial.adapters.io as io_mod

    file = saved / "adapter_model.safetensors"
    read = io_mod.read_safetensors(file)
    monkeypatch.setattr(io_mod, "PREAD_MAX_BYTES", 0)
    mapped = io_mod.read_safetensors(file)
    assert read.keys() == mapped.keys() and all(torch.equal(read[k], mapped[k]) for k in read)
