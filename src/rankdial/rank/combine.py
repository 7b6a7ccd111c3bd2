"""Weighted combination of adapters, with Hugging Face PEFT's add_weighted_adapter semantics.

For adapters i with weights w_i and scales s_i, on each module:
- "cat":    A = [w_i·s_i·A_i stacked], B = [B_i side by side]: ΔW = Σ w_i·s_i·B_i·A_i exactly, rank Σ r_i.
- "svd":    ΔW = Σ w_i·s_i·B_i·A_i, then its best rank-k approximation (k = `rank`, default the largest r_i).
- "linear": A = Σ ±√|w_i·s_i|·A_i, B = Σ √|w_i·s_i|·B_i (sign on A): cheap, but not the weighted sum of the
            ΔW_i (cross terms B_i·A_j appear); PEFT allows it for equal ranks only, and so do we, for equal
            targets too.
The result is written with alpha = r (scale 1), as PEFT does; rsLoRA is switched off in it so that the scale
stays 1 (PEFT keeps the first adapter's use_rslora, which would rescale the result by √r).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from ..config import is_positive_int
from ..errors import AdapterFileError, ConfigError
from .factors import balanced, read_factors, refuse_non_lora, uniform_config, write_factors

HOW = ("linear", "cat", "svd")


def _check(adapters, weights, how, rank):
    problems = []
    if how not in HOW:
        problems.append(f"how={how!r}: choose linear, cat or svd")
    if not adapters:
        problems.append("give at least one adapter folder")
    if len(weights) != len(adapters):
        problems.append(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
        problems.append(f"weights must be finite numbers, got {weights}")
    if rank is not None and not is_positive_int(rank):
        problems.append(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and how != "svd":
        problems.append(f"rank applies to how='svd' only (how={how!r})")
    if problems:
        raise ConfigError("cannot combine adapters: " + "; ".join(problems))


def _shape(f) -> tuple[int, int]:
    return f.B.shape[0], f.A.shape[1]  # (d_out, d_in) of ΔW


def _compatible(parts, how):
    first = parts[0]
    for p in parts[1:]:
        a, b = first.config.base_model_name_or_path, p.config.base_model_name_or_path
        if a and b and a != b:
            raise AdapterFileError(f"{p.source} is for base model {b!r}, {first.source} for {a!r}: adapters of "
                                   "different base models cannot be combined")
        for path in set(first.modules) & set(p.modules):
            mine, theirs = _shape(first.modules[path]), _shape(p.modules[path])
            if mine != theirs:
                raise AdapterFileError(f"{path} is {theirs[0]}x{theirs[1]} in {p.source} but {mine[0]}x{mine[1]} in "
                                       f"{first.source}: adapters of different base models cannot be combined")
        if how == "linear" and set(p.modules) != set(first.modules):
            raise AdapterFileError(f"how='linear' needs the same target modules in every adapter; {p.source} and "
                                   f"{first.source} differ in {sorted(set(p.modules) ^ set(first.modules))[:5]}. "
                                   "Use how='cat' or how='svd'")
    saved = [p for p in parts if p.other]
    if len(saved) > 1:
        raise AdapterFileError(f"{saved[0].source} and {saved[1].source} both train full modules (modules_to_save); "
                               "PEFT refuses to combine those too. Combine adapters without modules_to_save")
    if how == "linear" and len({f.rank for p in parts for f in p.modules.values()}) > 1:
        raise AdapterFileError("how='linear' needs one rank in every module of every adapter (as PEFT); "
                               "use how='cat' or how='svd'")


def _combine_module(parts, path, weights, how, rank):
    here = [(p.modules[path], w) for p, w in zip(parts, weights) if path in p.modules]
    if how == "cat":
        A = torch.cat([w * f.scale * f.A for f, w in here], dim=0)  # (Σr, d_in)
        B = torch.cat([f.B for f, _ in here], dim=1)  # (d_out, Σr)
        return A, B
    if how == "linear":
        A = sum(math.copysign(math.sqrt(abs(w * f.scale)), w * f.scale) * f.A for f, w in here)
        B = sum(math.sqrt(abs(w * f.scale)) * f.B for f, w in here)
        return A, B
    delta = sum(w * f.delta().double() for f, w in here)  # (d_out, d_in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank or max(f.rank for f, _ in here), s.numel())
    return tuple(t.float() for t in balanced(u, s, vh, k))


def combine_adapters(adapters: list[str | Path], weights: list[float], out: str | Path, how: str = "svd",
                     rank: int | None = None) -> Path:
    """Write Σ_i weights[i]·adapters[i] (see the module docstring for each `how`) as one PEFT folder at `out`."""
    adapters, weights = list(adapters), list(weights)
    _check(adapters, weights, how, rank)
    parts = [read_factors(a) for a in adapters]
    for folder, part in zip(adapters, parts):
        refuse_non_lora(part.config, folder, "combine")
    _compatible(parts, how)
    paths = sorted(set().union(*(p.modules for p in parts)))
    modules = {path: _combine_module(parts, path, weights, how, rank) for path in paths}
    config = uniform_config(parts[0].config, {path: A.shape[0] for path, (A, _) in modules.items()})
    # The inputs' selectors (lists, regexes, layers_to_transform, exclude_modules) may each pick other modules:
    # the result names exactly the modules it holds, which every PEFT reader resolves the same way.
    config = replace(config, target_modules=paths, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    other = next((p.other for p in parts if p.other), {})
    return write_factors(out, config, modules, other, inputs=adapters)
