"""Config files (TOML/YAML), flag overrides, and the errors for keys and values that do not fit."""

import pytest

from rankdial import ConfigError
from rankdial.cli import main
from rankdial.models import resolve_model
from rankdial.train import TrainConfig, make_config
from rankdial.models import ModelError


def test_toml_with_tables_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text('method = "qlora"\ndata = "d.jsonl"\n[lora]\nr = 8\nlora_alpha = 16\n'
                                     '[loop]\nlr = 1e-4\nsteps = 50\n')
    (tmp_path / "a.yaml").write_text("method: qlora\ndata: d.jsonl\nlora: {r: 8, lora_alpha: 16}\nlr: 1.0e-4\nsteps: 50\n")
    a, b = make_config(tmp_path / "a.toml"), make_config(tmp_path / "a.yaml")
    assert a == b and a.lora.r == 8 and a.lora.lora_alpha == 16.0 and a.lr == 1e-4
    assert a.data == str(tmp_path / "d.jsonl")  # relative to the config file
    assert make_config(tmp_path / "a.toml", r=32, lr=3e-4).lora.r == 32


def test_unknown_key_suggests_the_nearest(tmp_path):
    (tmp_path / "c.toml").write_text('data = "d.jsonl"\nlearning_rat = 0.1\nbatchsize = 4\n')
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'"):
        make_config(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text('data = "d.jsonl"\nbatchsize = 4\n')
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        make_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="did you mean 'max_length'"):
        make_config(None, data="d", max_lenght=3)


@pytest.mark.parametrize("text, match", [
    ('data = "d"\nr = "eight"\n', "r must be a positive integer, got 'eight'"),
    ('data = "d"\nlr = inf\n', "lr=inf: must be a finite number"),
    ('data = "d"\nmax_grad_norm = nan\n', "max_grad_norm=nan: must be a finite number"),
    ('data = "d"\n[lora]\nlora_dropout = 1.0\n', r"lora_dropout must be in \[0, 1\), got 1.0"),
    ('data = "d"\nmethod = "dora"\n', "method='dora': choose one of lora, qlora, full"),
    ('data = "d"\nlr = -1\nbatch_size = 0\n', "batch_size=0: must be at least 1; lr=-1.0: must be positive"),
    ('r = 4\n', "data is empty"),
    ("data = [\n", "not valid TOML"),
])
def test_bad_values_name_key_value_and_fix(tmp_path, text, match):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        make_config(tmp_path / "c.toml")


def test_config_file_missing_or_wrong_format(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_config(tmp_path / "nope.toml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="unknown format '.ini'"):
        make_config(tmp_path / "c.ini")


def test_model_folder_without_weights_or_tokenizer(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights .* and no tokenizer files"):
        resolve_model(tmp_path / "m")
    with pytest.raises(ModelError, match="does not exist.*never downloads"):
        resolve_model(tmp_path / "missing")


def test_cli_flags_override_and_typos_are_caught(tmp_path, capsys):
    assert main(["train", "--data", "x.jsonl", "--bach-size", "3"]) == 2
    assert "did you mean --batch-size" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_defaults_are_valid():
    assert TrainConfig(data="x").method == "lora"


def test_every_lora_option_reaches_the_run_from_toml_yaml_and_flags(tmp_path):
    from rankdial.train.config import parse_flag_value

    (tmp_path / "a.toml").write_text(
        'data = "d.jsonl"\n[lora]\nr = 8\nuse_rslora = true\nexclude_modules = ["o_proj"]\n'
        'modules_to_save = ["lm_head"]\nlayers_to_transform = [0, 1]\nlayers_pattern = "layers"\n'
        '[lora.rank_pattern]\nq_proj = 4\n[lora.alpha_pattern]\nq_proj = 2\n')
    (tmp_path / "a.yaml").write_text(
        "data: d.jsonl\nlora:\n  r: 8\n  use_rslora: true\n  exclude_modules: [o_proj]\n  modules_to_save: [lm_head]\n"
        "  layers_to_transform: [0, 1]\n  layers_pattern: layers\n  rank_pattern: {q_proj: 4}\n"
        "  alpha_pattern: {q_proj: 2}\n")
    a, b = make_config(tmp_path / "a.toml"), make_config(tmp_path / "a.yaml")
    assert a == b
    assert (a.lora.rank_pattern, a.lora.alpha_pattern, a.lora.exclude_modules, a.lora.modules_to_save,
            a.lora.layers_to_transform, a.lora.layers_pattern, a.lora.use_rslora) == (
        {"q_proj": 4}, {"q_proj": 2}, ["o_proj"], ["lm_head"], [0, 1], "layers", True)
    flags = {k: parse_flag_value(k, v) for k, v in [
        ("r", "8"), ("use_rslora", "true"), ("exclude_modules", "o_proj"), ("modules_to_save", "lm_head"),
        ("layers_to_transform", "0,1"), ("layers_pattern", "layers"), ("rank_pattern", '{"q_proj": 4}'),
        ("alpha_pattern", '{"q_proj": 2}')]}
    assert make_config(None, data=str(tmp_path / "d.jsonl"), **flags) == a


def test_flat_lora_keys_still_work_and_a_key_in_both_places_names_both(tmp_path):
    (tmp_path / "flat.toml").write_text('data = "d"\nr = 4\nlora_alpha = 8\ntarget_modules = ["q_proj"]\n')
    cfg = make_config(tmp_path / "flat.toml")
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (4, 8, ["q_proj"])
    (tmp_path / "both.toml").write_text('data = "d"\nr = 16\n[lora]\nr = 8\n')
    with pytest.raises(ConfigError, match=r"'r' is given twice: the top level of .*both.toml \(16\) and the \[lora\] "
                                          r"table of .*both.toml \(8\)"):
        make_config(tmp_path / "both.toml")


@pytest.mark.parametrize("text, value", [
    ("all-linear", "all-linear"),
    ("q_proj", ["q_proj"]),
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("self_attn.q_proj,mlp.up_proj", ["self_attn.q_proj", "mlp.up_proj"]),
    ('["q_proj", "v_proj"]', ["q_proj", "v_proj"]),
    (r"model\.layers\.[0-9]{1,2}\.mlp\..*", r"model\.layers\.[0-9]{1,2}\.mlp\..*"),
    (r".*\.(q_proj|v_proj)", r".*\.(q_proj|v_proj)"),
])
def test_target_modules_flag_is_json_a_regex_or_a_comma_list(text, value):
    from rankdial.train.config import parse_flag_value

    assert parse_flag_value("target_modules", text) == value
    assert make_config(None, data="d", target_modules=value).lora.target_modules == value


def test_regex_with_commas_selects_the_layers_it_names(tiny_model_dir, tmp_path):
    from conftest import qa_rows, write_jsonl
    from rankdial.lora import lora_layers
    from rankdial.train.loop import setup

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    cfg = make_config(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "o"), max_length=32,
                      target_modules=r"model\.layers\.[0-9]{1,2}\.mlp\.(gate|up|down)_proj", progress=False)
    run = setup(cfg, log=lambda *a: None)
    paths = sorted(p for p, _ in lora_layers(run.model))
    assert paths and all(".mlp." in p for p in paths) and len(paths) == 6  # 2 layers x gate/up/down


@pytest.mark.parametrize("flag, text, match", [
    ("lr", "inf", "--lr 'inf': must be a finite number"),
    ("lr", "nan", "--lr 'nan': must be a finite number"),
    ("weight_decay", "-inf", "must be a finite number"),
    ("rank_pattern", "q_proj=4", "--rank-pattern 'q_proj=4' is not valid JSON"),
    ("rank_pattern", "[1]", "must be a JSON object"),
    ("layers_to_transform", "a,b", "expected layer indices"),
])
def test_bad_flag_values(flag, text, match):
    from rankdial.train.config import parse_flag_value

    with pytest.raises(ConfigError, match=match):
        parse_flag_value(flag, text)


def test_lr_inf_on_the_command_line_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse rejects the flag's value
        main(["train", "--data", "x.jsonl", "--lr", "inf", "--output-dir", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "finite" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_yaml_exponents_without_a_dot_and_binary_config_files(tmp_path):
    (tmp_path / "a.yaml").write_text("data: d.jsonl\nlr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    assert make_config(tmp_path / "a.yaml").lr == 1e-4
    (tmp_path / "b.yaml").write_text("data: d.jsonl\nlr: fast\n")
    with pytest.raises(ConfigError, match="'lr'.*must be a float"):
        make_config(tmp_path / "b.yaml")
    (tmp_path / "c.toml").write_bytes(b"\x80\xff\x00binary")
    with pytest.raises(ConfigError, match="not a text file"):
        make_config(tmp_path / "c.toml")
    (tmp_path / "w.safetensors").write_bytes(b"\x80\xff")
    with pytest.raises(ConfigError, match="unknown format '.safetensors'"):
        make_config(tmp_path / "w.safetensors")


def test_a_trainconfig_built_directly_names_values_of_the_wrong_type():
    with pytest.raises(ConfigError, match="batch_size='8' \\(str\\): must be of type int"):
        TrainConfig(data="x", batch_size="8")


def test_adamw_8bit_with_fsdp_is_refused_in_one_line():
    """bitsandbytes' 8-bit step takes plain tensors, FSDP's parameters are DTensors: the run crashed with a stack
    trace at its first optimizer step, after writing rankdial_train.json and metrics.jsonl."""
    with pytest.raises(ConfigError, match=r"optimizer='adamw-8bit' with sharding='fsdp'.*optimizer = \"adamw\"") as err:
        make_config(data="d.jsonl", sharding="fsdp", optimizer="adamw-8bit")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value", [("use_dora", True), ("init_lora_weights", "pissa"),
                                        ("init_lora_weights", "gaussian"),
                                        ("target_parameters", ["mlp.experts.gate_up_proj"])])
def test_adapter_only_options_with_method_full_are_refused_in_one_line(key, value):
    """method='full' trains every weight and has no adapter: DoRA, an init or expert targets were dropped silently."""
    with pytest.raises(ConfigError, match=rf"{key}=.* with method='full'.*method = \"lora\"") as err:
        make_config(data="d.jsonl", method="full", **{key: value})
    assert "\n" not in str(err.value)


def test_a_value_after_a_switch_flag_says_switches_take_none(tmp_path, capsys, monkeypatch):
    """`--use-dora true` left 'true' as the config file: 'config file true does not exist; pass a .toml'."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "x.jsonl", "--use-dora", "true"]) == 2
    err = capsys.readouterr().err
    assert "switches such as --use-dora take no value: write --use-dora or --no-use-dora" in err, err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_bad_loftq_config_json_shows_a_loftq_example():
    """The example was rank_pattern's ('{"q_proj": 4}'), which loftq_config then refuses."""
    from rankdial.train.config import parse_flag_value

    example = r"e\.g\. --loftq-config '\{\"loftq_bits\": 4, \"loftq_iter\": 1\}'$"
    with pytest.raises(ConfigError, match=r"not valid JSON.*" + example):
        parse_flag_value("loftq_config", '{"loftq_bits":4')
