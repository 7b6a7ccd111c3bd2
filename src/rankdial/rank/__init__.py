"""Rank, LoRA's capacity dial: the spectrum of a learned ΔW, truncation by SVD, weighted combination, and a sweep
of one training config over several ranks.

The adapter tools work on adapter folders (PEFT's format) alone: no base model is loaded. LoRA's case
(`rankdial claims`, rank as capacity among its claims) is rankdial.claims.
"""

from .combine import combine_adapters
from .factors import AdapterFactors, ModuleFactors, read_factors, write_factors
from .spectrum import ModuleSpectrum, effective_rank, spectrum, suggest_rank_pattern
from .sweep import SweepResult, sweep
from .truncate import TruncateReport, truncate_adapter

__all__ = ["AdapterFactors", "ModuleFactors", "ModuleSpectrum", "TruncateReport", "combine_adapters",
           "effective_rank", "read_factors", "spectrum", "suggest_rank_pattern", "sweep", "SweepResult",
           "truncate_adapter", "write_factors"]
