"""Fine-tuning: `train()` (LoRA, QLoRA or full) with exact resume, progress, metrics and torchrun DDP.

The names below load on first use, so reading a config (rankdial.train.config, as `rankdial --help` does to list
every config key as a flag) does not import torch.
"""

from importlib import import_module

from ..errors import DataError, ModelError, TrainingError, TrainingInterrupted

# public name -> the module that defines it (imported on first access)
_LAZY = {
    **dict.fromkeys(["default_model_path", "default_samples_path", "load_model", "resolve_model"], "..models"),
    **dict.fromkeys(["TrainConfig", "make_config", "read_config_file", "read_run_config"], ".config"),
    "load_dataset": ".data",
    **dict.fromkeys(["TrainResult", "train"], ".loop"),
}

__all__ = ["TrainConfig", "make_config", "read_config_file", "read_run_config", "train", "TrainResult",
           "TrainingError", "TrainingInterrupted", "DataError", "ModelError", "load_dataset", "load_model",
           "resolve_model", "default_model_path", "default_samples_path"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
