"""Hugging Face PEFT's adapter format: adapter_config.json fields and safetensors key names.

A LoRA adapter folder holds `adapter_config.json` (PEFT's LoraConfig fields) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` (r, d_in) and
`.lora_B.weight` (d_out, r); a DoRA adapter adds `.lora_magnitude_vector` (d_out,); modules_to_save are stored
under their own key, `base_model.model.<path>.<param>`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import ALL_LINEAR, LoraConfig, init_mutates_base
from ..errors import AdapterFileError, ConfigError
from ..lora.inject import plan_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# PEFT fields that change the math when set; rankdial refuses them rather than load them wrongly.
_UNSUPPORTED = ("lora_bias", "layer_replication", "trainable_token_indices",
                "use_qalora", "alora_invocation_tokens", "megatron_config")
_TAKEN = [f.name for f in dataclasses.fields(LoraConfig)]


# init_lora_weights values PEFT writes that only decide where training starts: the saved weights mean plain LoRA.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def lora_key(path: str, which: str) -> str:
    """The file key of one LoRA matrix: which is 'A' or 'B'."""
    return f"{KEY_PREFIX}{path}.lora_{which}.weight"


def magnitude_key(path: str) -> str:
    """The file key of a DoRA magnitude vector (PEFT drops the module's '.weight' from it)."""
    return f"{KEY_PREFIX}{path}.lora_magnitude_vector"


def saved_key(path: str, param: str) -> str:
    """The file key of a modules_to_save tensor: its original name under the PEFT prefix."""
    return f"{KEY_PREFIX}{path}.{param}"


def _portable_targets(model: nn.Module, config: LoraConfig, paths: list[str]) -> list[str]:
    """'all-linear' spelled out for tools that do not expand it: leaf names if they pick exactly `paths`."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    try:
        chosen = [t.path for t in plan_targets(model, dataclasses.replace(config, target_modules=leaves)).targets]
    except (ConfigError, ValueError):
        chosen = []
    return leaves if sorted(chosen) == sorted(paths) else sorted(paths)


def config_to_peft(model: nn.Module, config: LoraConfig, paths: list[str]) -> dict[str, Any]:
    """adapter_config.json contents for an adapter with `config` that wraps the modules at `paths` of `model`."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        targets = _portable_targets(model, config, paths)
    base = config.base_model_name_or_path
    if base is None:
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return config_to_json(dataclasses.replace(config, target_modules=targets, base_model_name_or_path=base))


def config_to_json(config: LoraConfig) -> dict[str, Any]:
    """adapter_config.json contents for `config` as it stands (target_modules written as given)."""
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        "target_parameters": config.target_parameters,
        "fan_in_fan_out": config.fan_in_fan_out,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": config.modules_to_save,
        "init_lora_weights": config.init_lora_weights,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_dora": config.use_dora,
        "loftq_config": dict(config.loftq_config),
    }


def config_from_peft(data: Any, source: str) -> LoraConfig:
    """A LoraConfig from adapter_config.json contents; `source` names the file in errors."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source} must hold a JSON object, got {type(data).__name__}")
    if data.get("peft_type") != "LORA":
        raise AdapterFileError(f"{source} has peft_type={data.get('peft_type')!r}; rankdial reads LoRA adapters "
                               "(peft_type 'LORA') only")
    used = [k for k in _UNSUPPORTED if data.get(k) not in (None, False, {}, [], "")]
    if used:
        raise AdapterFileError(f"{source} uses PEFT features rankdial does not implement: "
                               f"{ {k: data[k] for k in used} }; load this adapter with PEFT instead")
    if data.get("target_modules") is None:
        raise AdapterFileError(f"{source} has no target_modules; add the module names the adapter wraps, "
                               "e.g. \"target_modules\": [\"q_proj\", \"v_proj\"]")
    init = data.get("init_lora_weights", True)
    if not (init in _PLAIN_INITS or init_mutates_base(init)) or str(init).lower().startswith(("corda", "lora_ga")):
        raise AdapterFileError(f"{source} has init_lora_weights={init!r}, which rankdial does not implement (it may "
                               "change the base or the forward); load this adapter with PEFT instead")
    fields = {k: data[k] for k in _TAKEN if k in data and data[k] is not None}
    if init in ("eva", "orthogonal"):
        fields["init_lora_weights"] = True  # init-only schemes: the saved weights are a plain LoRA
    if isinstance(fields.get("layers_pattern"), list) and not fields["layers_pattern"]:
        fields.pop("layers_pattern")
    try:
        return LoraConfig(**fields)
    except (ConfigError, TypeError) as err:
        raise AdapterFileError(f"{source} is not a valid LoRA config: {err}") from err
