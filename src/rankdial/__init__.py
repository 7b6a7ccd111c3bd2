"""rankdial: low-rank adaptation (LoRA, QLoRA) you can see and trust, in Hugging Face PEFT's file format."""

from .adapters import (adapter_state_dict, convert_bin_adapter, load_adapter, read_adapter_config, save_adapter,
                       set_adapter_state_dict)
from .config import LoraConfig
from .errors import (AdapterError, AdapterFileError, AdapterInUse, Unavailable, CheckpointError, ConfigError, DataError, MergeError, ModelError,
                     OutputError, RankdialError, RequestError, TargetError, TrainingError, TrainingInterrupted)
from .lora import (LoraLayer, active_adapters, adapter_names, delete_adapter, disabled, inject, merge, merge_and_unload,
                   set_active, trainable_parameters, unmerge)
from .lora.verbs import merge_and_requantize, unload
from .memory import estimate_memory
from .quant import NF4Linear, NF4Tensor, dequantize_nf4, quantize_model, quantize_nf4

__version__ = "0.1.0"

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
