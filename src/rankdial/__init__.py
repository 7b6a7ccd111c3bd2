"""rankdial: low-rank adaptation (LoRA, QLoRA) you can see and trust, in Hugging Face PEFT's file format.

`import rankdial` is light: the errors and LoraConfig load at once, everything that needs torch (inject, merge,
save_adapter, quantize_nf4, ...) loads on first use, so `rankdial --help` and scripts that only read a config
start in a fraction of a second. `from rankdial import inject` and `rankdial.inject` work as before.
"""

from importlib import import_module

from . import _quiet
from .config import LoraConfig
from .errors import (AdapterError, AdapterFileError, AdapterInUse, Unavailable, CheckpointError, ConfigError, DataError, MergeError, ModelError,
                     OutputError, RankdialError, RequestError, TargetError, TrainingError, TrainingInterrupted)

_quiet.install()  # before any dependency that would print a warning the user cannot act on is imported

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first access: these need torch)
_LAZY = {
    **dict.fromkeys(["adapter_state_dict", "convert_bin_adapter", "load_adapter", "read_adapter_config", "save_adapter",
                     "set_adapter_state_dict"], ".adapters"),
    **dict.fromkeys(["LoraLayer", "active_adapters", "adapter_names", "delete_adapter", "disabled", "inject", "merge",
                     "merge_and_unload", "set_active", "trainable_parameters", "unmerge"], ".lora"),
    **dict.fromkeys(["merge_and_requantize", "unload"], ".lora.verbs"),
    "estimate_memory": ".memory",
    **dict.fromkeys(["NF4Linear", "NF4Tensor", "dequantize_nf4", "quantize_model", "quantize_nf4"], ".quant"),
}

__all__ = [
    "LoraConfig", "LoraLayer",
    "inject", "trainable_parameters", "set_active", "active_adapters", "adapter_names", "delete_adapter",
    "disabled", "merge", "unmerge", "merge_and_unload", "merge_and_requantize", "unload",
    "estimate_memory", "quantize_model", "quantize_nf4", "dequantize_nf4", "NF4Tensor", "NF4Linear",
    "save_adapter", "load_adapter", "read_adapter_config", "convert_bin_adapter", "adapter_state_dict",
    "set_adapter_state_dict",
    "RankdialError", "ConfigError", "TargetError", "AdapterError", "AdapterFileError", "MergeError", "ModelError",
    "DataError", "TrainingError", "TrainingInterrupted", "CheckpointError", "OutputError", "RequestError",
    "AdapterInUse", "Unavailable",
]


def __getattr__(name: str):
    """A public name on first use (then cached as a module global), or a submodule: `rankdial.lora` as before."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
