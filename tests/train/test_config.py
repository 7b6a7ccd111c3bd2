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
    assert a == b and a.r == 8 and a.lora_alpha == 16.0 and a.lr == 1e-4
    assert a.data == str(tmp_path / "d.jsonl")  # relative to the config file
    assert make_config(tmp_path / "a.toml", r=32, lr=3e-4).r == 32


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
    ('data = "d"\nr = "eight"\n', "'r' .* is 'eight' .*must be a int"),
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
