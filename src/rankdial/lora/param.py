"""LoRA on a parameter that stacks the weights of a mixture of experts (PEFT's `target_parameters`).

transformers keeps an MoE layer's experts as one 3-D parameter, e.g. Mixtral's `experts.gate_up_proj`
(E, 2·ffn, hidden) and `experts.down_proj` (E, hidden, ffn), each slice W[e] used as F.linear(x, W[e]);
GPT-OSS stores the slices the other way round, (E, d_in, d_out) used as x @ W[e] (`is_transposed`). There
is no nn.Linear to wrap, so each expert gets its own low-rank update of the parameter itself:

    W[e] ← W[e] + s · B_e A_e          A_e: (r, d_in), B_e: (d_out, r), s = α / r   (ΔW[e]ᵀ when transposed)

`ExpertLora` wraps the module holding such parameters and runs the module's own forward with W + ΔW put in
place of W for that call (torch.func.functional_call), so every experts implementation transformers picks
(the eager loop, grouped or batched matmuls) sees the updated weights and autograd reaches A and B. Merging
adds ΔW into W in place.

File layout (PEFT's ParamWrapper, checked against PEFT in tests): A as one (E·r, d_in) matrix, expert-major
(rows e·r .. e·r+r-1 are A_e); B as one (d_out, r·E) matrix, rank-major (column j·E + e is column j of B_e).
PEFT nests one wrapper per targeted parameter of a module, in the module's parameter order, so the k-th of n
targeted parameters is stored under `<module>` + ".base_layer" × (n−1−k) + ".lora_A.weight".
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..config import LoraConfig, check_name, lora_scaling
from ..errors import AdapterError, ConfigError, MergeError, TargetError

__all__ = ["ExpertLora", "plan_parameters", "inject_parameters", "expert_delta", "file_shapes", "is_expert_key"]


def expert_delta(A: torch.Tensor, B: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """ΔW = s · B_e A_e for every expert e, fp32, in the parameter's layout: (E, d_out, d_in), or (E, d_in, d_out)
    when transposed. A: (E, r, d_in), B: (E, d_out, r)."""
    delta = torch.bmm(B.float(), A.float()) * scale  # (E, d_out, d_in)
    return delta.transpose(1, 2) if transposed else delta


class ExpertLora(nn.Module):
    """f(x) = base(x) with each targeted 3-D parameter W replaced by W + Σ_a s_a·ΔW_a (see the module docstring)."""

    base_replaceable = False  # layers.Wrapper: tools (quantize_model) leave what is inside alone

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = bool(getattr(base_layer, "is_transposed", False))  # GPT-OSS: (E, d_in, d_out)
        self.lora_A = nn.ModuleDict()  # adapter -> ParameterDict {parameter name: (E, r, d_in)}
        self.lora_B = nn.ModuleDict()  # adapter -> ParameterDict {parameter name: (E, d_out, r)}
        self.scaling: dict[str, float] = {}
        self.configs: dict = {}  # adapter -> (injection order, its model-level LoraConfig), as in LoraLayer
        self._active: list[str] = []
        self._merged: list[str] = []
        self.disabled = False

    def wrapped(self) -> nn.Module:
        return self.base_layer

    def replace_base(self, module: nn.Module) -> None:
        raise TargetError("an expert LoRA wrapper holds its module's 3-D parameters; its base cannot be replaced")

    @property
    def active(self) -> list[str]:
        return list(self._active)

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def dims(self, param: str) -> tuple[int, int, int]:
        """(E, d_in, d_out) of a 3-D parameter of the base."""
        E, d1, d2 = getattr(self.base_layer, param).shape
        return (E, d1, d2) if self.transposed else (E, d2, d1)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, params: list[str], r: int, alpha: float, use_rslora: bool = False,
                    init_lora_weights: bool = True, config: LoraConfig | None = None) -> None:
        """Add adapter `name` (inactive) on these parameters of the base: A Kaiming-uniform per expert (bound
        1/√d_in, as nn.Linear's and PEFT's), B zero, so the module's output starts exactly where it was."""
        check_name(name)
        if name in self.lora_A:
            raise AdapterError(f"adapter {name!r} is already on this module; pick another name")
        A, B = nn.ParameterDict(), nn.ParameterDict()
        for p in params:
            W = getattr(self.base_layer, p)
            E, d_in, d_out = self.dims(p)
            a = torch.empty(E, r, d_in, device=W.device, dtype=torch.float32).uniform_(-1, 1).mul_(1 / math.sqrt(d_in))
            b = torch.zeros(E, d_out, r, device=W.device, dtype=torch.float32)
            if not init_lora_weights:
                b.uniform_(-1, 1).mul_(1 / math.sqrt(r))
            A[p], B[p] = nn.Parameter(a), nn.Parameter(b)
        self.lora_A[name], self.lora_B[name] = A, B
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        if config is not None:
            from .layer import _ORDER

            self.configs[name] = (next(_ORDER), config)

    def rank(self, name: str) -> int:
        return next(iter(self.lora_A[name].values())).shape[1]

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self._merged:
            self.unmerge([name])
        del self.lora_A[name], self.lora_B[name]
        del self.scaling[name]
        self.configs.pop(name, None)
        self._active = [a for a in self._active if a != name]

    def set_active(self, names: list[str]) -> None:
        self._active = [n for n in names if n in self.lora_A]

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise AdapterError(f"unknown adapter {name!r}; this module has {sorted(self.lora_A)}")

    def delta_weight(self, name: str, param: str) -> torch.Tensor:
        self._require(name)
        return expert_delta(self.lora_A[name][param], self.lora_B[name][param], self.scaling[name], self.transposed)

    # -- forward ----------------------------------------------------------------------------------
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """{parameter: W + Σ ΔW over the active, unmerged adapters} for the parameters they target."""
        out: dict[str, torch.Tensor] = {}
        for name in self._active:
            if name in self._merged:
                continue
            for p in self.lora_A[name]:
                W = out.get(p, getattr(self.base_layer, p))
                out[p] = W + self.delta_weight(name, p).to(W.dtype)
        return out

    def forward(self, *args, **kwargs):
        weights = {} if self.disabled else self.effective_weights()
        if not weights:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)

    # -- merge ------------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None, module_path: str = "") -> None:
        """Add each named (default: active) adapter's ΔW into the parameters in place; twice is a no-op."""
        todo = [n for n in (self._active if names is None else names) if n not in self._merged]
        for name in todo:
            self._require(name)
        with torch.no_grad():
            new = {}
            for name in todo:
                for p in self.lora_A[name]:
                    W = new.get(p, getattr(self.base_layer, p))
                    new[p] = W.float() + self.delta_weight(name, p)
            bad = [p for p, w in new.items() if not torch.isfinite(w).all()]
            if bad:
                raise MergeError(f"merging {todo} into {module_path or 'this module'}.{bad[0]} would give NaN/Inf; "
                                 "the parameters were left as they were")
            for p, w in new.items():
                getattr(self.base_layer, p).copy_(w)
        self._merged += todo

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged adapters' ΔW again (default: every merged one)."""
        todo = list(self._merged) if names is None else [n for n in names if n in self._merged]
        with torch.no_grad():
            for name in reversed(todo):
                for p in self.lora_A[name]:
                    W = getattr(self.base_layer, p)
                    W.copy_(W.float() - self.delta_weight(name, p))
        self._merged = [n for n in self._merged if n not in todo]

    # -- PEFT's file layout -----------------------------------------------------------------------
    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """{PEFT key without its "base_model.model." prefix: tensor} of adapter `name`, this module at `path`."""
        out = {}
        for prefix, p in self._nesting(name, path):
            A, B = self.lora_A[name][p], self.lora_B[name][p]
            E, r = A.shape[0], A.shape[1]
            out[f"{prefix}.lora_A.weight"] = A.reshape(E * r, A.shape[2])  # expert-major rows
            out[f"{prefix}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], r * E)  # column j·E + e
        return out

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy adapter `name`'s tensors in from PEFT's keys (without the prefix); shapes already checked."""
        for prefix, p in self._nesting(name, path):
            A, B = self.lora_A[name][p], self.lora_B[name][p]
            E, r, d_out = A.shape[0], A.shape[1], B.shape[1]
            A.copy_(tensors[f"{prefix}.lora_A.weight"].reshape(E, r, -1))
            B.copy_(tensors[f"{prefix}.lora_B.weight"].reshape(d_out, r, E).permute(2, 0, 1))

    def _nesting(self, name: str, path: str) -> list[tuple[str, str]]:
        order = [q for q, _ in self.base_layer.named_parameters(recurse=False) if q in self.lora_A[name]]
        return _nested(path, order)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.lora_A)}, transposed={self.transposed}"


def file_shapes(base: nn.Module, params: list[str], r: int, path: str) -> dict[str, tuple[int, int]]:
    """The file keys (without "base_model.model.") and shapes an adapter of rank r on these 3-D parameters of
    `base`, the module at `path`, has."""
    transposed = bool(getattr(base, "is_transposed", False))
    out = {}
    for prefix, p in _nested(path, [q for q, _ in base.named_parameters(recurse=False) if q in params]):
        E, d1, d2 = getattr(base, p).shape
        d_in, d_out = (d1, d2) if transposed else (d2, d1)
        out[f"{prefix}.lora_A.weight"] = (E * r, d_in)
        out[f"{prefix}.lora_B.weight"] = (d_out, r * E)
    return out


def is_expert_key(config: LoraConfig, path: str) -> bool:
    """Whether a file key's module path (".base_layer"s and all) belongs to one of config.target_parameters."""
    while path.endswith(".base_layer"):
        path = path[:-len(".base_layer")]
    modules = [t.rpartition(".")[0] for t in config.target_parameters or []]
    return any(path == m or path.endswith("." + m) or not m for m in modules)


def _nested(path: str, params: list[str]) -> list[tuple[str, str]]:
    """(key prefix, parameter) in PEFT's nesting: the last targeted parameter is the outermost wrapper."""
    n = len(params)
    return [(path + ".base_layer" * (n - 1 - k), p) for k, p in enumerate(params)]


def plan_parameters(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """{module path: [parameter names]} that config.target_parameters picks, checked: every entry must match a
    3-D parameter; a 2-D one (a linear's weight) or one that matches nothing is a TargetError naming it."""
    targets = list(config.target_parameters or [])
    if not targets:
        return {}
    if config.lora_dropout:
        raise ConfigError(f"lora_dropout={config.lora_dropout} with target_parameters: dropout cannot be applied to a "
                          "weight update (PEFT refuses it too); set lora_dropout = 0")
    found: dict[str, list[str]] = {}
    matched, flat = set(), []
    for path, module in _modules(model):
        for pname, param in module.named_parameters(recurse=False):
            key = f"{path}.{pname}" if path else pname
            hits = [t for t in targets if key == t or key.endswith("." + t)]
            if not hits:
                continue
            matched.update(hits)
            if param.ndim != 3:
                flat.append(f"{key} {list(param.shape)}")
                continue
            found.setdefault(path, []).append(pname)
    patterned = [f"{path}.{p}" for path, ps in found.items() for p in ps
                 if _pattern_hit(config.rank_pattern, f"{path}.{p}") or _pattern_hit(config.alpha_pattern, f"{path}.{p}")]
    if patterned:
        raise ConfigError(f"rank_pattern/alpha_pattern match the expert parameter {patterned[0]}; rankdial gives "
                          "target_parameters the adapter's r and lora_alpha only: drop those pattern entries")
    if flat:
        raise TargetError(f"target_parameters matched {len(flat)} parameters that are not 3-D expert stacks "
                          f"(e.g. {flat[0]}); target_parameters is for MoE experts stored as one (experts, out, in) "
                          "parameter; adapt a linear's weight with target_modules instead")
    missing = [t for t in targets if t not in matched]
    if missing:
        names = sorted({f"{p.rsplit('.', 1)[-1]}.{n}" for p, m in _modules(model)
                        for n, q in m.named_parameters(recurse=False) if q.ndim == 3})
        raise TargetError(f"target_parameters {missing} matched no parameter of {type(model).__name__}; its 3-D "
                          f"parameters are {names[:10] or 'none (it has no stacked experts)'}")
    return found


def _pattern_hit(patterns: dict, key: str) -> bool:
    """Whether a rank_pattern/alpha_pattern key matches a dot-bounded suffix of `key` (inject.pattern_value's rule,
    which PEFT applies to "<module path>.<parameter>" for target_parameters)."""
    return any(re.match(rf"(.*\.)?({k})$", key) for k in patterns or {})


def _modules(model: nn.Module):
    """(path, module) of every module, seen through ExpertLora wrappers (paths as the model had them)."""
    def walk(module: nn.Module, prefix: str):
        if isinstance(module, ExpertLora):
            module = module.base_layer
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def inject_parameters(model: nn.Module, config: LoraConfig, adapter: str, plan: dict[str, list[str]] | None = None,
                      trainable: bool = True) -> dict[str, nn.Module]:
    """Wrap each module holding target_parameters in an ExpertLora and add adapter `adapter` there.
    Returns {path: original module} for the modules this call wrapped."""
    plan = plan_parameters(model, config) if plan is None else plan
    replaced = {}
    for path, params in plan.items():
        module = model.get_submodule(path)
        if not isinstance(module, ExpertLora):
            replaced[path] = module
            module = ExpertLora(module)
            model.set_submodule(path, module)
        module.add_adapter(adapter, params, config.r, config.lora_alpha, config.use_rslora, config.init_lora_weights,
                           config=config)
        for p in (*module.lora_A[adapter].values(), *module.lora_B[adapter].values()):
            p.requires_grad_(trainable)
    return replaced
