"""LoRA: the layer, injection into any model, and the model-level verbs."""

from .inject import adapter_configs, inject, plan_targets
from .layer import LoraLayer
from .verbs import (active_adapters, adapter_names, delete_adapter, disabled, lora_layers, merge, merge_and_unload,
                    set_active, trainable_parameters, unload, unmerge)
from .modules_to_save import ModulesToSave

__all__ = ["LoraLayer", "ModulesToSave", "inject", "plan_targets", "adapter_configs", "active_adapters", "adapter_names",
           "delete_adapter", "disabled", "lora_layers", "merge", "merge_and_unload", "set_active",
           "trainable_parameters", "unload", "unmerge"]
