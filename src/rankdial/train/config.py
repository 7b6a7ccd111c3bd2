"""TrainConfig: everything `rankdial train` needs, read from TOML or YAML, every key overridable by a flag.

The adapter settings are a rankdial.LoraConfig nested as `cfg.lora`, so every LoRA option reaches a run. In a
file they sit in a [lora] table (or, as in older configs, at the top level: `r = 16`); a key given in both
places is an error naming both.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib  # Python 3.11+, which pyproject requires

from ..config import LoraConfig
from ..errors import ConfigError

METHODS = ("lora", "qlora", "full")
SHARDINGS = ("ddp", "fsdp")  # how torchrun's processes share the model: whole copies, or FSDP2 shards
OPTIMIZERS = ("adamw", "adamw-8bit")
# What a run's adapter starts from (LoraConfig's own defaults are PEFT's: r=8, lora_alpha=8).
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "target_modules": "all-linear"}
# Set by the loop (task_type) or taken from the model (base_model_name_or_path), never by the user.
_LORA_SET_BY_RUN = ("task_type", "base_model_name_or_path")
LORA_FIELDS = {f.name: f for f in dataclasses.fields(LoraConfig) if f.name not in _LORA_SET_BY_RUN}
REGEX_CHARS = set("\\^$|?*+()[]{}")


def default_lora() -> LoraConfig:
    return LoraConfig(**LORA_DEFAULTS)


@dataclass
class TrainConfig:
    """One fine-tuning run. A config file may group keys in tables ([lora], [data], [loop], ...).

    Model and method:
        model: "default" (the embedded kjv-llama-tiny) or a local Hugging Face model folder (loaded offline).
        method: "lora", "qlora" (4-bit NF4 base, adapters in fp32) or "full" (every weight trains; for comparison).
        lora: a rankdial.LoraConfig (PEFT's names): r, lora_alpha, lora_dropout, target_modules, exclude_modules,
            rank_pattern, alpha_pattern, use_rslora, modules_to_save, layers_to_transform, layers_pattern...
            Default here: r=16, lora_alpha=32, target_modules="all-linear".
    Data:
        data: JSONL file; each line {"prompt","completion"}, {"messages":[...]} or {"text"}.
        eval_data: a JSONL file for evaluation, or eval_fraction of `data` held out (by seed).
        max_length: tokens per example; longer ones are truncated (and counted).
        packing: concatenate examples into max_length rows (fewer pad tokens).
        skip_bad_lines: report malformed JSONL lines and go on, instead of stopping at the first.
    Loop:
        steps (optimizer steps; 0 = derived from epochs), epochs, batch_size (per process), grad_accum,
        lr, weight_decay, warmup_ratio, min_lr_ratio (cosine floor as a share of lr), max_grad_norm,
        optimizer ("adamw", or "adamw-8bit": blockwise 8-bit moments from bitsandbytes or torchao),
        loss_chunk (rows of logits computed at once by the loss, where exact for the model; 0: all at once),
        gradient_checkpointing, bf16 (autocast), seed, device ("auto", "cpu", "cuda").
        compile: each decoder layer through torch.compile (inductor), compiled during the first step; off by
            default (benchmarks/bench_train.py measures it against eager and PEFT with and without compile).
    Processes (torchrun):
        sharding: "ddp" (each process holds the whole model; the default) or "fsdp" (PyTorch's FSDP2
            fully_shard on each decoder layer and the root: weights, gradients and optimizer state sharded).
        fsdp_reshard_after_forward: free a layer's gathered weights after its forward (gather again for backward).
        fsdp_cpu_offload: keep the sharded parameters in CPU memory between uses (CUDA only).
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
    lora: LoraConfig = field(default_factory=default_lora)
    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    loss_chunk: int = 1024
    gradient_checkpointing: bool = False
    compile: bool = False
    bf16: bool = False
    seed: int = 0
    device: str = "auto"
    sharding: str = "ddp"
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        if isinstance(self.lora, dict):  # from a file, a dict or rankdial_train.json
            try:
                self.lora = LoraConfig(**{**LORA_DEFAULTS, **self.lora})
            except ConfigError as err:
                problems.append(str(err).replace("invalid LoraConfig:\n  - ", "lora: ").replace("\n  - ", "; lora: "))
            except TypeError as err:
                problems.append(f"lora: {err}")
        elif not isinstance(self.lora, LoraConfig):
            problems.append(f"lora={self.lora!r}: must be a rankdial.LoraConfig or a table of its keys")
        wrong = self._type_problems()
        if wrong:  # comparisons below would raise TypeError on a value of the wrong type
            raise ConfigError("invalid training config: " + "; ".join(problems + wrong))
        if self.method not in METHODS:
            problems.append(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.sharding not in SHARDINGS:
            problems.append(f"sharding={self.sharding!r}: choose one of {', '.join(SHARDINGS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "adamw-8bit" and self.sharding == "fsdp":  # checkpoint.write_sharded_checkpoint
            problems.append("optimizer='adamw-8bit' with sharding='fsdp': FSDP checkpoints store fp32 AdamW's "
                            "moments only, so 8-bit states would be lost on save; use optimizer = \"adamw\" "
                            "with fsdp, or sharding = \"ddp\"")
        if not self.data:
            problems.append("data is empty: give a JSONL file (data = \"train.jsonl\" or --data train.jsonl)")
        for name in ("max_length", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: must be at least 1")
        for name in ("steps", "eval_every", "save_every", "loss_chunk"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}: must be 0 or more")
        for f in dataclasses.fields(self):  # inf and nan compare oddly and are not JSON: refuse them first
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name}={value!r}: must be a finite number")
        problems += self._range_problems()
        problems += self._init_problems()
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def _init_problems(self) -> list[str]:
        """init_lora_weights that the method cannot honour: LoftQ makes the 4-bit base itself (method qlora);
        PiSSA/OLoRA rewrite the full-precision weight (PEFT requires it too), so not on an NF4 base."""
        init = getattr(self.lora, "init_lora_weights", True)
        if self.method == "full":  # no adapter to shape: these would be dropped silently
            asked = {"use_dora": self.lora.use_dora, "init_lora_weights": init,
                     "target_parameters": self.lora.target_parameters}
            default = {"use_dora": False, "init_lora_weights": True, "target_parameters": None}
            given = [f"{k}={v!r}" for k, v in asked.items() if v != default[k] and v != []]
            if given:
                return [f"{', '.join(given)} with method='full': full fine-tuning trains every weight and has no "
                        "adapter for them to shape; use method = \"lora\" (or \"qlora\"), or drop them"]
        if init == "loftq" and self.method != "qlora":
            return [f"init_lora_weights='loftq' with method={self.method!r}: LoftQ initialises against a 4-bit NF4 "
                    "base that it quantizes itself; use method = \"qlora\""]
        if isinstance(init, str) and init.startswith(("pissa", "olora")) and self.method == "qlora":
            return [f"init_lora_weights={init!r} with method='qlora': {init} needs the full-precision weight (PEFT "
                    "requires it too); use method = \"lora\", or init_lora_weights = \"loftq\" for a 4-bit base"]
        return []

    def _type_problems(self) -> list[str]:
        """Values of the wrong type (TrainConfig(...) built directly skips make_config's conversion)."""
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        problems = []
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), kinds.get(f.type if isinstance(f.type, str) else "")
            if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
                problems.append(f"{f.name}={value!r} ({type(value).__name__}): must be of type {f.type}")
        return problems

    def _range_problems(self) -> list[str]:
        problems = []
        if self.steps == 0 and not self.epochs > 0:
            problems.append(f"epochs={self.epochs!r} with steps=0: set steps or a positive number of epochs")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction={self.eval_fraction!r}: must be in [0, 1)")
        if self.eval_data and self.eval_fraction:
            problems.append("give eval_data or eval_fraction, not both")
        if not self.lr > 0:
            problems.append(f"lr={self.lr!r}: must be positive")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)!r}: must be in [0, 1]")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay={self.weight_decay!r}: must be 0 or more")
        if not self.max_grad_norm >= 0:
            problems.append(f"max_grad_norm={self.max_grad_norm!r}: must be 0 (off) or positive")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            problems.append(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """Every key, the adapter's nested under "lora" (what rankdial_train.json records)."""
        out = dataclasses.asdict(self)
        out["lora"] = {k: v for k, v in out["lora"].items() if k in LORA_FIELDS}
        return out


TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "lora"}
# Every key a file or a flag may set, flat: the run's own and the adapter's (r, lora_alpha, rank_pattern...).
FIELDS = {**TRAIN_FIELDS, **LORA_FIELDS}


def _unknown(key: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, list(FIELDS) + ["lora"], n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(FIELDS)}"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _put(values: dict, origin: dict, key: str, value: Any, place: str) -> None:
    if key in values:
        raise ConfigError(f"{key!r} is given twice: {origin[key]} ({values[key]!r}) and {place} ({value!r}); "
                          "keep one of them")
    values[key], origin[key] = value, place


def _gather(raw: dict, where: str, values: dict, origin: dict, table: str | None = None) -> None:
    """Flatten tables into `values` ({key: value}); LoRA keys may sit at the top level or under [lora]."""
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        place = f"the [{table}] table of {where}" if table else f"the top level of {where}"
        if key == "lora" and isinstance(value, LoraConfig):
            value = {k: v for k, v in value.to_dict().items() if k in LORA_FIELDS}
        if isinstance(value, dict) and key not in FIELDS:  # a table such as [lora] or [data]
            _gather(value, where, values, origin, table=key if table is None else f"{table}.{key}")
        elif key in FIELDS:
            _put(values, origin, key, value, place)
        else:
            raise _unknown(key, where)


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check a run key's type against its field (ints are accepted for floats); LoraConfig checks its own."""
    if key not in TRAIN_FIELDS:
        return value
    hint = TRAIN_FIELDS[key].type
    expected = {"str": str, "int": int, "float": float, "bool": bool}.get(hint if isinstance(hint, str) else "")
    if expected is None:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"config key {key!r} in {where} is {value!r} ({type(value).__name__}); "
                          f"it must be a {expected.__name__}")
    return value


def _parse_file(path: Path) -> dict:
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (not UTF-8); give a .toml or .yaml config") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except Exception as err:  # yaml.YAMLError
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .toml, .yaml or .yml")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a TOML (.toml) or YAML (.yaml/.yml) config file, flattened and checked (not validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a .toml or .yaml file")
    raw = _parse_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table of keys, not {type(raw).__name__}")
    values: dict[str, Any] = {}
    _gather(raw, str(path), values, {})
    out = {k: _coerce(k, v, str(path)) for k, v in values.items()}
    base = path.resolve().parent  # relative paths in a config file are relative to the file
    for key in ("data", "eval_data", "output_dir", "model"):
        if isinstance(out.get(key), str) and out[key] and out[key] != "default" and not Path(out[key]).is_absolute():
            out[key] = str(base / out[key])
    return out


def make_config(config: str | Path | dict | TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a file path, a dict or a TrainConfig, with keyword overrides (flat keys, or lora=...)
    applied on top."""
    if isinstance(config, TrainConfig):
        values: dict[str, Any] = {}
        _gather(config.to_dict(), "the TrainConfig", values, {})
    elif isinstance(config, dict):
        values = {}
        _gather(config, "the config dict", values, {})
    elif config is None:
        values = {}
    else:
        values = read_config_file(config)
    over: dict[str, Any] = {}
    _gather({k: v for k, v in overrides.items() if v is not None}, "the overrides", over, {})
    values.update(over)  # flags and keyword arguments win over the file
    values = {k: _coerce(k, v, "the config") for k, v in values.items()}
    lora = {k: values.pop(k) for k in list(values) if k in LORA_FIELDS}
    return TrainConfig(**values, lora=lora)


def read_run_config(folder: str | Path) -> TrainConfig:
    """The TrainConfig a run folder's rankdial_train.json records."""
    data = json.loads((Path(folder) / "rankdial_train.json").read_text())
    return make_config({k: v for k, v in data.items() if k not in ("base_model", "world_size")})


# ------------------------------------------------------------------------------------------------ flags

FLAG_SYNTAX = {
    "target_modules": "'all-linear'; a comma list of names (q_proj,v_proj; dotted names are fine); a JSON list; "
                      "or one regex on the module path, used whole when it holds any of \\^$|?*+()[]{} "
                      "(commas included: 'model\\.layers\\.[0-9]{1,2}\\.mlp\\..*')",
    "exclude_modules": "like --target-modules: a comma list, a JSON list, or one regex",
    "modules_to_save": "a comma list or a JSON list of module names",
    "layers_to_transform": "layer indices: 0,1,2 or a JSON list",
    "layers_pattern": "the name(s) before the layer index: layers, or a comma list / JSON list",
    "rank_pattern": "JSON object {regex: rank}, e.g. '{\"q_proj\": 4}'",
    "alpha_pattern": "JSON object {regex: alpha}, e.g. '{\"q_proj\": 8}'",
    "init_lora_weights": "true, false, gaussian, pissa, pissa_niter_K, olora or loftq",
    "loftq_config": "JSON object, e.g. '{\"loftq_bits\": 4, \"loftq_iter\": 1}'",
}


def flag_help(key: str) -> str:
    """The --help text of a key's flag: its syntax where it is not a plain value, and its default."""
    if key in LORA_FIELDS:
        default = LORA_DEFAULTS.get(key, getattr(LoraConfig(), key))
    else:
        default = TRAIN_FIELDS[key].default
    syntax = FLAG_SYNTAX.get(key)
    return f"{syntax} (default: {default})" if syntax else f"(default: {default})"


def _json(flag: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        example = ("'{\"loftq_bits\": 4, \"loftq_iter\": 1}'" if flag == "--loftq-config" else
                   "'{\"q_proj\": 4}'" if kind is dict else "'[\"q_proj\", \"v_proj\"]'")
        raise ConfigError(f"{flag} {text!r} is not valid JSON ({err.msg}); e.g. {flag} {example}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{flag} {text!r} must be a JSON {'object' if kind is dict else 'list'}")
    return value


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _lora_flag(key: str, flag: str, text: str) -> Any:
    if key in ("rank_pattern", "alpha_pattern", "loftq_config"):
        return _json(flag, text, dict)
    if key in ("init_lora_weights", "use_dora") and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lstrip().startswith("["):
        return _json(flag, text, list)
    if key in ("target_modules", "exclude_modules"):
        if text == "all-linear" or REGEX_CHARS & set(text):
            return text  # one regex, commas and all
        return _names(text)
    if key == "layers_to_transform":
        try:
            return [int(t) for t in _names(text)]
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected layer indices such as 0,1,2") from None
    if key == "modules_to_save":
        return _names(text)
    return _names(text) if "," in text else text  # layers_pattern, bias


def parse_flag_value(key: str, text: str) -> Any:
    """A command-line string converted to the key's type; see FLAG_SYNTAX for lists, patterns and regexes."""
    if key not in FIELDS:
        raise _unknown(key, "the command line")
    flag = f"--{key.replace('_', '-')}"
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
            value = float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected a {hint}") from None
    if hint == "float":
        if not math.isfinite(value):
            raise ConfigError(f"{flag} {text!r}: must be a finite number (inf and nan are not learning settings)")
        return value
    if key in LORA_FIELDS:
        return _lora_flag(key, flag, text)
    return text
