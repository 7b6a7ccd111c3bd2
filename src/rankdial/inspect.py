"""Inspect: what an adapter folder holds, checked: its config, each module's rank, shape and ‖ΔW‖_F.

The folder is checked as it is read: a module whose weights have another rank than adapter_config.json
says (with no rank_pattern entry to explain it), A and B that do not fit together, or NaN/Inf in any
tensor are reported in one AdapterFileError, since such a folder would load wrongly or not at all.
"""

from __future__ import annotations

from pathlib import Path

from .adapters.peft_format import KEY_PREFIX, WEIGHTS_NAME
from .rank.factors import read_factors


def inspect_adapter(path: str | Path) -> dict:
    """Config, per-module ranks, parameter count, file size and ‖ΔW‖_F of each module of an adapter folder.

    Raises AdapterFileError (one line naming every problem) when the weights disagree with the config or
    hold NaN/Inf (rank.factors.read_factors does the checking).
    """
    factors = read_factors(path)
    config = factors.config
    modules = [{"module": m, "r": f.rank, "d_in": f.A.shape[1], "d_out": f.B.shape[0], "delta_norm": f.delta().norm().item()}
               for m, f in sorted(factors.modules.items())]
    for m in modules if config.use_dora else []:  # DoRA: the magnitude is a file tensor of its own (in "parameters")
        magnitude = factors.other[f"{KEY_PREFIX}{m['module']}.lora_magnitude_vector"].float()
        m["magnitude_norm"] = magnitude.norm().item()
    return {
        "base_model": config.base_model_name_or_path,
        "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "init_lora_weights": config.init_lora_weights,
        # for DoRA, delta_norm is ‖s·BA‖ (the direction's update); W' = m⊙(W₀+s·BA)/‖W₀+s·BA‖ needs the base
        "delta_norm_of": "s*B*A (DoRA: direction update only; magnitude per row separate)" if config.use_dora else "s*B*A",
        "target_modules": config.target_modules, "modules_to_save": config.modules_to_save,
        "parameters": sum(f.A.numel() + f.B.numel() for f in factors.modules.values())
        + sum(t.numel() for t in factors.other.values()),
        "file_bytes": (Path(path) / WEIGHTS_NAME).stat().st_size,
        "modules": modules,
    }
