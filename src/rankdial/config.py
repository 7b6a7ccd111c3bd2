"""LoraConfig: what to adapt and how, validated at construction. Field names are Hugging Face PEFT's."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AdapterError, ConfigError

ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Low-rank adaptation settings (Hu et al. 2021, arXiv:2106.09685).

    Args:
        r: rank of ΔW = B·A (typical 8-64).
        lora_alpha: scale numerator; ΔW is scaled by lora_alpha/r (lora_alpha/√r with use_rslora).
        lora_dropout: dropout on the adapter's input during training.
        target_modules: a list of names (exact module path, or the part after a dot: "q_proj"), a regex
            string (full match on the module path), or "all-linear" (every linear except the output head).
        exclude_modules: list or regex of modules never to adapt, with the same matching rules.
        target_parameters: 3-D expert parameters to adapt, one low-rank update per expert ("mlp.experts.gate_up_proj";
            matched as PEFT does, on the end of "<module path>.<parameter>"); see rankdial.lora.param.
            target_modules may then be [] (adapt only these).
        layers_to_transform: only adapt modules in these layer indices (the number after "layers.", "h.", ...).
        layers_pattern: the name(s) that precede the layer index, e.g. "layers"; None finds it automatically.
        rank_pattern / alpha_pattern: {regex matched on a suffix of the module path: rank or alpha}.
        use_rslora: scale by lora_alpha/√r (Kalajdzievski 2023, arXiv:2312.03732).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classification head).
        init_lora_weights: True gives A Kaiming-uniform and B = 0 (training starts at the base model); False
            gives both random (useful for tests); "gaussian" gives A ~ N(0, 1/r²), B = 0; "pissa" / "pissa_niter_K"
            put the top-r singular part of W₀ into B·A (exact SVD / K subspace iterations) and leave the residual
            in the base (Meng et al. 2024); "olora" does the same with a QR decomposition (Büyükakyüz 2024);
            "loftq" (with loftq_config) quantizes the base to NF4 as NF4(W₀ − s·BA) with B·A fitted to the
            quantization error (Li et al. 2023). PiSSA and OLoRA adapters are saved converted by default (see
            adapters.io.save_adapter), so they run on the original base.
        loftq_config: {"loftq_bits": 4, "loftq_iter": 1} for init_lora_weights="loftq" (PEFT's LoftQConfig).
        use_dora: DoRA (Liu et al. 2024, arXiv:2402.09353): a learned magnitude per output row times the
            direction W₀ + s·BA normalised per row (lora/dora.py).
        fan_in_fan_out: set automatically for GPT-2's Conv1D, which stores its weight as (d_in, d_out).
        bias: only "none" is supported.
        task_type, base_model_name_or_path: recorded in adapter_config.json.

    Raises:
        ConfigError: naming every invalid field at once.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    bias: str = "none"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    loftq_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if isinstance(self.target_parameters, (list, set, tuple)) and all(isinstance(t, str) for t in self.target_parameters):
            self.target_parameters = sorted(self.target_parameters)  # order-free (PEFT writes a set's order)
        if isinstance(self.modules_to_save, (set, tuple, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    def scaling(self, r: int, alpha: float) -> float:
        """The factor s in h = W₀x + s·BAx: alpha/r, or alpha/√r with rsLoRA."""
        return lora_scaling(r, alpha, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The one scaling formula: s = alpha/r (Hu et al.), or alpha/√r with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_name(name: Any) -> None:
    """Raise AdapterError unless `name` can name an adapter (a non-empty string without '.')."""
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterError(f"adapter name must be a non-empty string without '.', got {name!r} (e.g. 'default', 'sql')")


def adapter_value_problems(r: Any, alpha: Any, dropout: Any) -> list[str]:
    """What is wrong with one adapter's rank, alpha and dropout (empty when all are valid)."""
    p = []
    if not is_positive_int(r):
        p.append(f"r must be a positive integer, got {r!r} (typical: 8-64)")
    if not _is_alpha(alpha):
        p.append(f"lora_alpha must be a positive finite number, got {alpha!r} (typical: r or 2*r)")
    if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        p.append(f"lora_dropout must be in [0, 1), got {dropout!r} (typical: 0.0-0.1)")
    return p


def is_positive_int(value: Any) -> bool:
    """THE "positive integer" test (a rank, a count, a token budget): an int >= 1, never a bool (True is an int to
    Python) nor a float such as 1.0. Every such check in rankdial calls this one."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_alpha(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _regex_problem(name: str, pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as err:
        return f"{name} {pattern!r} is not a valid regular expression ({err}); escape special characters or pass a list of names"
    return None


def _names_problem(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        problem = None if value == ALL_LINEAR and name == "target_modules" else _regex_problem(name, value)
        return [problem] if problem else []
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return [] if value or name != "target_modules" else ["target_modules is an empty list; name at least one module, e.g. ['q_proj', 'v_proj'], or use 'all-linear'"]
    return [f"{name} must be a list of module names or a regex string, got {value!r}"]


def _problems(cfg: LoraConfig) -> list[str]:
    p: list[str] = adapter_value_problems(cfg.r, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.target_modules is None:
        p.append("target_modules is required: a list like ['q_proj', 'v_proj'], a regex, or 'all-linear'")
    if not (cfg.target_parameters and cfg.target_modules == []):  # only expert parameters: no module needed
        p += _names_problem("target_modules", cfg.target_modules)
    if cfg.target_parameters is not None and not (isinstance(cfg.target_parameters, list) and all(
            isinstance(t, str) and t for t in cfg.target_parameters)):
        p.append(f"target_parameters must be a list of parameter names such as ['mlp.experts.gate_up_proj'], "
                 f"got {cfg.target_parameters!r}")
    p += _names_problem("exclude_modules", cfg.exclude_modules)
    if cfg.modules_to_save is not None and not all(isinstance(m, str) and m for m in cfg.modules_to_save):
        p.append(f"modules_to_save must be a list of module names, got {cfg.modules_to_save!r}")
    if cfg.layers_to_transform is not None and not (
        isinstance(cfg.layers_to_transform, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in cfg.layers_to_transform)
    ):
        p.append(f"layers_to_transform must be a non-negative int or a list of them, got {cfg.layers_to_transform!r}")
    for key, value in (cfg.rank_pattern or {}).items():
        p += [q for q in [_regex_problem("rank_pattern key", key)] if q]
        if not is_positive_int(value):
            p.append(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
    for key, value in (cfg.alpha_pattern or {}).items():
        p += [q for q in [_regex_problem("alpha_pattern key", key)] if q]
        if not _is_alpha(value):
            p.append(f"alpha_pattern[{key!r}] must be a positive finite number, got {value!r}")
    if cfg.bias != "none":
        p.append(f"bias={cfg.bias!r} is not supported; use bias='none' (train biases via modules_to_save instead)")
    p += init_problems(cfg.init_lora_weights, cfg.loftq_config)
    if not isinstance(cfg.use_dora, bool):
        p.append(f"use_dora must be true or false, got {cfg.use_dora!r}")
    elif cfg.use_dora and init_mutates_base(cfg.init_lora_weights):
        p.append(f"use_dora with init_lora_weights={cfg.init_lora_weights!r} is not supported: DoRA's magnitude "
                 "has no converted form for the original base; use one of the two")
    return p


INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_K", "olora", "loftq")
RESIDUAL_INITS = ("pissa", "olora", "loftq")  # (prefixes) inits that change the base weight as well as A and B


def init_mutates_base(value: Any) -> bool:
    """Whether init_lora_weights=value moves part of W₀ into the adapter (PiSSA, OLoRA, LoftQ; PEFT's CorDA and
    LoRA-GA too), so the trained adapter belongs to the residual base unless converted."""
    return isinstance(value, str) and value.lower().startswith(RESIDUAL_INITS + ("corda", "lora_ga"))


def pissa_niter(value: str) -> int | None:
    """K of "pissa_niter_K" (None for exact "pissa"); ValueError for any other spelling."""
    if value == "pissa":
        return None
    head, _, k = value.partition("_niter_")
    if head != "pissa" or not k.isdigit():
        raise ValueError(value)
    return int(k)


def init_problems(value: Any, loftq: Any) -> list[str]:
    """What is wrong with an init_lora_weights value and its loftq_config (empty when valid)."""
    choices = ", ".join(repr(c) for c in INIT_CHOICES)
    if isinstance(value, bool):
        pass
    elif not isinstance(value, str) or not (value in ("gaussian", "olora", "loftq") or value.startswith("pissa")):
        return [f"init_lora_weights={value!r} is not one rankdial knows; choose one of {choices}"]
    elif value.startswith("pissa"):
        try:
            pissa_niter(value)
        except ValueError:
            return [f"init_lora_weights={value!r}: write 'pissa' or 'pissa_niter_K' with K a whole number (e.g. "
                    f"'pissa_niter_4'); the choices are {choices}"]
    if not isinstance(loftq, dict):
        return [f"loftq_config must be a table like {{'loftq_bits': 4, 'loftq_iter': 1}}, got {loftq!r}"]
    if value != "loftq":
        return [f"loftq_config={loftq!r} is set but init_lora_weights={value!r}; set init_lora_weights='loftq' or "
                "remove loftq_config"] if loftq else []
    if not loftq:
        return ["init_lora_weights='loftq' needs loftq_config={'loftq_bits': 4, 'loftq_iter': 1} (LoftQ quantizes "
                "the base itself, to 4-bit NF4)"]
    p = []
    unknown = sorted(set(loftq) - {"loftq_bits", "loftq_iter"})
    if unknown:
        p.append(f"loftq_config has unknown keys {unknown}; its keys are loftq_bits and loftq_iter")
    if loftq.get("loftq_bits") != 4:
        p.append(f"loftq_config loftq_bits={loftq.get('loftq_bits')!r}: rankdial's LoftQ quantizes the base to 4-bit "
                 "NF4 only; set loftq_bits = 4")
    it = loftq.get("loftq_iter", 1)
    if not is_positive_int(it):
        p.append(f"loftq_config loftq_iter={it!r} must be a positive integer (typical: 1-5)")
    return p


_FIELD_NAMES = [f for f in LoraConfig.__dataclass_fields__]
_dataclass_init = LoraConfig.__init__


def _checked_init(self, *args, **kwargs):
    """LoraConfig(rr=4) names the unknown field and the nearest known one (a ConfigError, not a TypeError)."""
    unknown = [k for k in kwargs if k not in LoraConfig.__dataclass_fields__]
    if unknown or len(args) > len(_FIELD_NAMES):
        import difflib

        hints = [f"{k!r}" + (f" (did you mean {near[0]!r}?)" if (near := difflib.get_close_matches(k, _FIELD_NAMES, 1))
                             else "") for k in unknown]
        raise ConfigError(f"LoraConfig has no field {', '.join(hints) or 'for the extra positional values'}; "
                          f"its fields are PEFT's: {', '.join(_FIELD_NAMES)}")
    _dataclass_init(self, *args, **kwargs)


LoraConfig.__init__ = _checked_init
