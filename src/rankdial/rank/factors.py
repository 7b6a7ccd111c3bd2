"""An adapter folder as per-module low-rank factors: ΔW = s·B·A, and the SVD of it without forming ΔW.

For A: (r, d_in), B: (d_out, r), the SVD of the rank-≤r matrix s·B·A costs two thin QRs and one r×r SVD:
B = Q_B R_B, Aᵀ = Q_A R_A, so s·B·A = Q_B (s·R_B R_Aᵀ) Q_Aᵀ = (Q_B U) Σ (Q_A V)ᵀ with U Σ Vᵀ = s·R_B R_Aᵀ.
`svd_reference` forms ΔW and calls torch.linalg.svd; tests hold the two equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapters import read_adapter_config, read_adapter_weights
from ..adapters.io import check_adapter_tensors, is_plain_adapter_folder
from ..adapters.peft_format import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, config_to_json
from ..atomic import atomic_dir
from ..config import LoraConfig, init_mutates_base
from ..errors import AdapterFileError, ConfigError
from ..lora.inject import pattern_value
from ..lora.layer import delta_weight

@dataclass
class ModuleFactors:
    """One adapted module: ΔW = scale · B · A (fp32)."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return delta_weight(self.A, self.B, self.scale)  # (d_out, d_in)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, Vh) of ΔW restricted to its rank: U (d_out, r), S (r,), Vh (r, d_in), S descending."""
        q_b, r_b = torch.linalg.qr(self.B.double())  # (d_out, r), (r, r)
        q_a, r_a = torch.linalg.qr(self.A.double().T)  # (d_in, r), (r, r)
        u, s, vh = torch.linalg.svd(self.scale * (r_b @ r_a.T))
        return (q_b @ u).float(), s.float(), (vh @ q_a.T).float()

    def svd_reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same from the full ΔW (slow, obviously right)."""
        u, s, vh = torch.linalg.svd(self.delta().double(), full_matrices=False)
        k = min(self.rank, s.numel())
        return u[:, :k].float(), s[:k].float(), vh[:k].float()


@dataclass
class AdapterFactors:
    """An adapter folder read into memory: its config, its modules' factors, and other tensors kept as they are."""

    config: LoraConfig
    modules: dict[str, ModuleFactors]
    other: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors, under their file keys
    source: str = ""


def refuse_non_lora(config: LoraConfig, folder, verb: str) -> None:
    """One-line ConfigError for what `verb` (truncate, combine) cannot do right: a DoRA adapter (its update is a
    per-row rescale of W₀ plus a direction, not the low-rank s·BA these verbs work on) or an adapter that belongs
    to a residual base (PiSSA/OLoRA saved unconverted, LoftQ)."""
    if config.use_dora:
        raise ConfigError(f"{verb} works on plain LoRA; {folder} is a DoRA adapter (use_dora), whose update is not the "
                          f"low-rank s·B·A alone: merge it instead (rankdial merge), or train a LoRA adapter to {verb}")
    if init_mutates_base(config.init_lora_weights):
        raise ConfigError(f"{verb} works on adapters for the original base; {folder} has init_lora_weights="
                          f"{config.init_lora_weights!r} and belongs to the base that init rewrote")


def read_factors(folder: str | Path) -> AdapterFactors:
    """Read an adapter folder (rankdial's or PEFT's) into per-module factors, checked first
    (adapters.io.check_adapter_tensors: one AdapterFileError naming every problem)."""
    config = read_adapter_config(folder)
    if config.target_parameters:  # (experts·r, d_in) A and rank-major B: not one (A, B) pair per module
        raise AdapterFileError(f"adapter {folder} adapts MoE expert parameters (target_parameters="
                               f"{config.target_parameters}); inspect, truncate and combine read one (A, B) per module "
                               "and do not handle per-expert factors")
    tensors = read_adapter_weights(folder)
    check_adapter_tensors(config, tensors, str(folder))
    modules, other = {}, {}
    for key, tensor in sorted(tensors.items()):
        if key.endswith(".lora_A.weight"):
            path = key[len(KEY_PREFIX):-len(".lora_A.weight")]
            r = tensor.shape[0]
            alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            modules[path] = ModuleFactors(tensor.float(), B.float(), config.scaling(r, alpha))
        elif not key.endswith(".lora_B.weight"):
            other[key] = tensor
    if not modules:
        raise AdapterFileError(f"adapter {folder} holds no lora_A/lora_B tensors; is it a LoRA adapter?")
    return AdapterFactors(config, modules, other, str(folder))


def uniform_config(config: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """`config` for factors stored with scale 1 (alpha = rank everywhere, no rsLoRA), rank_pattern where ranks differ."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {path: k for path, k in ranks.items() if k != r}
    return replace(config, r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))


def write_factors(out: str | Path, config: LoraConfig, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  other: dict[str, torch.Tensor], inputs: list) -> Path:
    """Write {path: (A, B)} (already including their scale under `config`) as a PEFT adapter folder, atomically.

    The folder is refused if it is one of `inputs`, or a non-empty folder rankdial did not write as an adapter.
    """
    tensors = {}
    for path, (A, B) in modules.items():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = A.contiguous().float()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = B.contiguous().float()
    tensors.update({k: v.contiguous() for k, v in other.items()})
    with atomic_dir(out, kind="adapter", inputs=inputs, legacy=is_plain_adapter_folder, what="--out folder") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_json(config), indent=2, sort_keys=True) + "\n")
    return Path(out)


def balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank k with B·A = U_k Σ_k V_kᵀ, the singular values split evenly between the two factors."""
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root[None, :]  # A (k, d_in), B (d_out, k)
