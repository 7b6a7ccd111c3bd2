"""The spectrum of a learned update: singular values of ΔW = s·B·A per module, and its effective rank.

The effective rank at energy e is the smallest k whose top-k singular values hold a share e of
Σσ² = ‖ΔW‖_F²: how many directions the adapter really uses (Hu et al. 2021, §7, found few).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .factors import read_factors


def check_energy(energy) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy share must be a number in (0, 1], got {energy!r} (e.g. 0.9 keeps 90% of ‖ΔW‖²)")
    return float(energy)


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k with Σ_{i<k} σ_i² ≥ energy · Σ σ_i² (0 for an all-zero update)."""
    energy = check_energy(energy)
    sq = singular_values.double() ** 2
    total = sq.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(sq, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1


@dataclass
class ModuleSpectrum:
    module: str
    rank: int
    d_in: int
    d_out: int
    singular_values: list[float]
    rank_90: int
    rank_99: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def spectrum(folder: str | Path) -> list[ModuleSpectrum]:
    """Singular values of each module's ΔW = s·B·A, with its effective rank at 90% and 99% of the energy."""
    rows = []
    for path, f in sorted(read_factors(folder).modules.items()):
        _, s, _ = f.svd()
        rows.append(ModuleSpectrum(path, f.rank, f.A.shape[1], f.B.shape[0], [round(v, 8) for v in s.tolist()],
                                   effective_rank(s, 0.9), effective_rank(s, 0.99)))
    return rows


def suggest_rank_pattern(folder: str | Path, energy: float) -> dict[str, int]:
    """{module path: the rank that keeps `energy` of its ΔW's energy} (at least 1): a rank_pattern to train with."""
    energy = check_energy(energy)
    return {row.module: max(1, effective_rank(torch.tensor(row.singular_values), energy)) for row in spectrum(folder)}
