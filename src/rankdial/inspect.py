"""Inspect: what an adapter folder holds, checked: its config, each module's rank, shape and ‖ΔW‖_F.

The folder is checked as it is read: a module whose weights have another rank than adapter_config.json
says (with no rank_pattern entry to explain it), A and B that do not fit together, or NaN/Inf in any
tensor are reported in one AdapterFileError, since such a folder would load wrongly or not at all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters import read_adapter_config, read_adapter_weights
from .adapters.peft_format import KEY_PREFIX, WEIGHTS_NAME
from .errors import AdapterFileError
from .lora.inject import pattern_value
from .lora.layer import delta_weight

_A, _B = ".lora_A.weight", ".lora_B.weight"


def _module_row(config, module: str, A: torch.Tensor, B: torch.Tensor, problems: list[str]) -> dict:
    r = A.shape[0]
    declared = pattern_value(config.rank_pattern, module, config.r)
    if r != declared:
        said = f"{declared} (its rank_pattern)" if declared != config.r else f"r={config.r} (no rank_pattern entry matches it)"
        problems.append(f"{module} has rank {r} in its weights but adapter_config.json says {said}")
    if B.shape[1] != r:
        problems.append(f"{module}: lora_B has shape {list(B.shape)}, which does not fit lora_A {list(A.shape)}")
        return {"module": module, "r": r, "d_in": A.shape[1], "d_out": B.shape[0], "delta_norm": float("nan")}
    scale = config.scaling(r, pattern_value(config.alpha_pattern, module, config.lora_alpha))
    return {"module": module, "r": r, "d_in": A.shape[1], "d_out": B.shape[0],
            "delta_norm": delta_weight(A, B, scale).norm().item()}


def inspect_adapter(path: str | Path) -> dict:
    """Config, per-module ranks, parameter count, file size and ‖ΔW‖_F of each module of an adapter folder.

    Raises AdapterFileError (one line naming every problem) when the weights disagree with the config or
    hold NaN/Inf.
    """
    config = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    problems = []
    non_finite = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if non_finite:
        more = f" and {len(non_finite) - 3} more" if len(non_finite) > 3 else ""
        problems.append(f"NaN/Inf values in {sorted(non_finite)[:3]}{more} (the training diverged)")
    modules = []
    for key in sorted(k for k in tensors if k.endswith(_A)):
        module = key[len(KEY_PREFIX):-len(_A)]
        b_key = key[:-len(_A)] + _B
        if b_key not in tensors:
            problems.append(f"it has {key} but not {b_key} (the file is incomplete)")
            continue
        modules.append(_module_row(config, module, tensors[key], tensors[b_key], problems))
    if problems:
        raise AdapterFileError(f"adapter {path} is broken: {'; '.join(problems)}. Save or train it again")
    return {
        "base_model": config.base_model_name_or_path,
        "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
        "target_modules": config.target_modules, "modules_to_save": config.modules_to_save,
        "parameters": sum(t.numel() for t in tensors.values()),
        "file_bytes": (Path(path) / WEIGHTS_NAME).stat().st_size,
        "modules": modules,
    }
