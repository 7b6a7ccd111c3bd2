"""Rank, LoRA's capacity dial: the spectrum of a learned ΔW, truncation by SVD, and weighted combination.

The adapter tools work on adapter folders (PEFT's format) alone: no base model is loaded. synthetic.py is
rank as capacity on a task whose true update has a known rank; claims.py measures LoRA's case
(`rankdial claims`), each claim a function returning its figures.
"""

from .claims import (adapters_vs_copies, memory_bill, merge_latency, parameter_arithmetic, rank_as_capacity,
                     run_claims, steers_not_reeducates)
from .claims_report import write_report
from .combine import combine_adapters
from .factors import AdapterFactors, ModuleFactors, read_factors, write_factors
from .spectrum import ModuleSpectrum, effective_rank, spectrum, suggest_rank_pattern
from .sweep import SweepResult, sweep
from .synthetic import SyntheticResult, SyntheticTask, rank_capacity, synthetic_task, train_synthetic
from .truncate import TruncateReport, truncate_adapter

__all__ = ["AdapterFactors", "ModuleFactors", "ModuleSpectrum", "TruncateReport", "combine_adapters",
           "effective_rank", "read_factors", "spectrum", "suggest_rank_pattern", "sweep", "SweepResult", "truncate_adapter", "write_factors",
           "SyntheticTask", "SyntheticResult", "synthetic_task", "train_synthetic", "rank_capacity",
           "run_claims", "write_report", "parameter_arithmetic", "merge_latency", "memory_bill", "rank_as_capacity",
           "adapters_vs_copies", "steers_not_reeducates"]
