"""Modules trained in full beside the adapters (PEFT's `modules_to_save`), e.g. a classification head.

The original module stays frozen as `original_module`; each adapter trains its own copy in
`modules_to_save.<adapter>`. The forward uses the active adapter's copy, or the original when none is active.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterError, TargetError


class ModulesToSave(nn.Module):
    """x ↦ copy_a(x) for the active adapter a, else original(x)."""

    base_replaceable = False  # layers.Wrapper: tools (quantize_model) leave what is inside alone

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.configs: dict = {}  # adapter -> (injection order, its model-level LoraConfig), as in LoraLayer

    def wrapped(self) -> nn.Module:
        """The frozen original this module stands for (layers.Wrapper)."""
        return self.original_module

    def replace_base(self, module: nn.Module) -> None:
        raise TargetError("modules_to_save keeps trained copies of its module; its original cannot be replaced")

    def add_adapter(self, name: str, config=None) -> None:
        """Add a trainable copy of the original module for adapter `name` (`config`: its model-level LoraConfig)."""
        if name in self.modules_to_save:
            raise AdapterError(f"adapter {name!r} already has a copy of this module; pick another name")
        trained = copy.deepcopy(self.original_module)
        trained.requires_grad_(True)
        self.modules_to_save[name] = trained
        if config is not None:
            from .layer import _ORDER

            self.configs[name] = (next(_ORDER), config)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.configs.pop(name, None)
        if self.active == name:
            self.active = None

    def set_active(self, names: list[str]) -> None:
        """The first of `names` this module has a copy for becomes active (only one copy can run)."""
        self.active = next((n for n in names if n in self.modules_to_save), None)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.active is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)
