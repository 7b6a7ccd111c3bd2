"""Adapter folders in Hugging Face PEFT's format."""

from .io import (adapter_state_dict, convert_bin_adapter, load_adapter, read_adapter_config, read_adapter_weights,
                 save_adapter, set_adapter_state_dict)

__all__ = ["adapter_state_dict", "convert_bin_adapter", "load_adapter", "read_adapter_config",
           "read_adapter_weights", "save_adapter", "set_adapter_state_dict"]
