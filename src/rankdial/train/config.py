"""TrainConfig: everything `rankdial train` needs, read from TOML or YAML, every key overridable by a flag."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

METHODS = ("lora", "qlora", "full")


@dataclass
class TrainConfig:
    """One fine-tuning run. Keys are flat; a config file may group them in tables ([lora], [data], ...).

    Model and method:
        model: "default" (the embedded kjv-llama-tiny) or a local Hugging Face model folder (loaded offline).
        method: "lora", "qlora" (4-bit NF4 base, adapters in fp32) or "full" (every weight trains; for comparison).
        r, lora_alpha, lora_dropout, target_modules, use_rslora: the adapter (PEFT's names).
    Data:
        data: JSONL file; each line {"prompt","completion"}, {"messages":[...]} or {"text"}.
        eval_data: a JSONL file for evaluation, or eval_fraction of `data` held out (by seed).
        max_length: tokens per example; longer ones are truncated (and counted).
        packing: concatenate examples into max_length rows (fewer pad tokens).
        skip_bad_lines: report malformed JSONL lines and go on, instead of stopping at the first.
    Loop:
        steps (optimizer steps; 0 = derived from epochs), epochs, batch_size (per process), grad_accum,
        lr, weight_decay, warmup_ratio, min_lr_ratio (cosine floor as a share of lr), max_grad_norm,
        gradient_checkpointing, bf16 (autocast), seed, device ("auto", "cpu", "cuda").
    Output:
        output_dir, eval_every, save_every (checkpoint period; 0 = none), keep_checkpoints, log_every,
        progress (a progress bar on stderr).
    """

    model: str = "default"
    method: str = "lora"
    data: str = ""
    output_dir: str = "out/run"
    eval_data: str = ""
    eval_fraction: float = 0.0
    max_length: int = 256
    packing: bool = False
    skip_bad_lines: bool = False
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"
    use_rslora: bool = False
    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    device: str = "auto"
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.data:
            problems.append("data is empty: give a JSONL file (data = \"train.jsonl\" or --data train.jsonl)")
        for name in ("max_length", "batch_size", "grad_accum", "r", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: must be at least 1")
        for name in ("steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}: must be 0 or more")
        if self.steps == 0 and not self.epochs > 0:
            problems.append(f"epochs={self.epochs!r} with steps=0: set steps or a positive number of epochs")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction={self.eval_fraction!r}: must be in [0, 1)")
        if self.eval_data and self.eval_fraction:
            problems.append("give eval_data or eval_fraction, not both")
        if not self.lr > 0:
            problems.append(f"lr={self.lr!r}: must be positive")
        for name in ("warmup_ratio", "min_lr_ratio", "lora_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)!r}: must be in [0, 1]")
        if self.max_grad_norm < 0:
            problems.append(f"max_grad_norm={self.max_grad_norm!r}: must be 0 (off) or positive")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            problems.append(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _unknown(key: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(FIELDS)}"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _flatten(raw: dict, where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if isinstance(value, dict) and key not in FIELDS:  # a table such as [lora] or [data]
            for sub, v in _flatten(value, where).items():
                flat[sub] = v
        else:
            flat[key] = value
    return flat


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check a value's type against the field (ints are accepted for floats)."""
    hint = FIELDS[key].type
    expected = {"str": str, "int": int, "float": float, "bool": bool}.get(hint if isinstance(hint, str) else "")
    if expected is None:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"config key {key!r} in {where} is {value!r} ({type(value).__name__}); "
                          f"it must be a {expected.__name__}")
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a TOML (.toml) or YAML (.yaml/.yml) config file, flattened and checked (not validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a .toml or .yaml file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    except Exception as err:  # yaml.YAMLError
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table of keys, not {type(raw).__name__}")
    flat = _flatten(raw, str(path))
    for key in flat:
        if key not in FIELDS:
            raise _unknown(key, str(path))
    out = {k: _coerce(k, v, str(path)) for k, v in flat.items()}
    base = path.resolve().parent  # relative paths in a config file are relative to the file
    for key in ("data", "eval_data", "output_dir", "model"):
        if isinstance(out.get(key), str) and out[key] and out[key] != "default" and not Path(out[key]).is_absolute():
            out[key] = str(base / out[key])
    return out


def make_config(config: str | Path | dict | TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a file path, a dict or a TrainConfig, with keyword overrides applied on top."""
    if isinstance(config, TrainConfig):
        values = config.to_dict()
    elif isinstance(config, dict):
        values = _flatten(config, "the config dict")
    elif config is None:
        values = {}
    else:
        values = read_config_file(config)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in FIELDS:
            raise _unknown(key, "the overrides")
        values[key] = value
    for key in values:
        if key not in FIELDS:
            raise _unknown(key, "the config")
    values = {k: _coerce(k, v, "the config") for k, v in values.items()}
    return TrainConfig(**values)


def parse_flag_value(key: str, text: str) -> Any:
    """A command-line string converted to the field's type (target_modules may be a list: q_proj,v_proj)."""
    if key not in FIELDS:
        raise _unknown(key, "the command line")
    hint = FIELDS[key].type
    try:
        if hint == "bool":
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint == "int":
            return int(text)
        if hint == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key.replace('_', '-')} {text!r}: expected a {hint}") from None
    if key == "target_modules" and text != "all-linear" and "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    return text
