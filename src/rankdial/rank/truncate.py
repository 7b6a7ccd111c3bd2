"""Truncation: compress an adapter to a lower rank by SVD of each module's ΔW (Eckart-Young: the best rank-k
approximation in Frobenius norm), keeping a chosen rank or a chosen share of the energy.

The written factors carry the scale (alpha = r, no rsLoRA), so s'·B'A' = U_k Σ_k V_kᵀ exactly; truncating to
the adapter's own rank reproduces its ΔW up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import is_positive_int
from ..errors import ConfigError
from .factors import balanced, read_factors, refuse_non_lora, uniform_config, write_factors
from .spectrum import check_energy, effective_rank


@dataclass
class TruncateReport:
    out: Path
    rows: list[tuple[str, int, int, float]]  # (module, old rank, new rank, share of its ‖ΔW‖² kept)
    kept: float  # Σ over modules of the ‖ΔW‖² kept
    total: float  # Σ over modules of ‖ΔW‖²

    @property
    def energy_kept(self) -> float:
        """The share of the total ‖ΔW‖² over all modules that the truncated adapter keeps."""
        return self.kept / self.total if self.total > 0 else 1.0

    def __str__(self) -> str:
        worst = min(self.rows, key=lambda r: r[3])
        return (f"wrote {self.out}: {len(self.rows)} modules, ranks {sorted({r[2] for r in self.rows})}, energy kept "
                f"{100 * self.energy_kept:.2f}% overall (worst module {worst[0]}: {100 * worst[3]:.2f}%)")


def truncate_adapter(folder: str | Path, out: str | Path, rank: int | None = None,
                     energy: float | None = None) -> TruncateReport:
    """Write `folder`'s adapter at rank `rank` (per module at most its own rank), or per module at the rank that
    keeps `energy` of its ‖ΔW‖², as a PEFT folder at `out`."""
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank (e.g. --rank 8) or energy (e.g. --energy 0.9)")
    if rank is not None and not is_positive_int(rank):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None:
        check_energy(energy)
    factors = read_factors(folder)
    refuse_non_lora(factors.config, folder, "truncate")
    written, rows, ranks, kept_total, total = {}, [], {}, 0.0, 0.0
    for path, f in sorted(factors.modules.items()):
        u, s, vh = f.svd()
        k = min(rank, f.rank) if rank is not None else max(1, effective_rank(s, energy))
        sq = (s.double() ** 2)
        share = float(sq[:k].sum() / sq.sum()) if sq.sum() > 0 else 1.0
        written[path] = balanced(u, s, vh, k)
        ranks[path] = k
        rows.append((path, f.rank, k, share))
        kept_total, total = kept_total + float(sq[:k].sum()), total + float(sq.sum())
    config = uniform_config(factors.config, ranks)
    out = write_factors(out, config, written, factors.other, inputs=[folder])
    return TruncateReport(out, rows, kept_total, total)
