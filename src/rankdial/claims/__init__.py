"""LoRA's case, measured (`rankdial claims`): each claim of the LoRA and QLoRA papers measured on this run.

One module per claim, each holding its measurement (a function returning the figures as a plain dict, JSON-ready),
its plot and its words, computed from the figures: parameters.py (the parameter arithmetic), merge_cost.py (a merged
adapter costs nothing at inference), training_memory.py (QLoRA's memory against LoRA and full fine-tuning),
capacity.py (rank is capacity, on a synthetic task of known rank), adapter_storage.py (one base + N adapters
against N full copies), steering.py (LoRA steers, it does not re-educate?). report.py runs them all (run_claims)
and writes the report (write_report); diverged.py is how a NaN/Inf figure reads in it. Nothing is typed in:
counts come from the planner or the models, times and bytes from this machine.
(Hu et al. 2021, arXiv:2106.09685; Dettmers et al. 2023, arXiv:2305.14314.)
"""

from .adapter_storage import adapters_vs_copies
from .capacity import SyntheticResult, SyntheticTask, rank_as_capacity, rank_capacity, synthetic_task, train_synthetic
from .merge_cost import merge_latency
from .parameters import parameter_arithmetic
from .report import run_claims, write_report
from .steering import steers_not_reeducates
from .training_memory import memory_bill

__all__ = ["run_claims", "write_report", "parameter_arithmetic", "merge_latency", "memory_bill", "rank_as_capacity",
           "adapters_vs_copies", "steers_not_reeducates",
           "SyntheticTask", "SyntheticResult", "synthetic_task", "train_synthetic", "rank_capacity"]
