"""The LoRA layer: a frozen linear map plus low-rank updates (Hu et al. 2021, arXiv:2106.09685).

    h = W₀x + Σ_a s_a · B_a A_a dropout_a(x),   s_a = α_a / r_a   (α_a / √r_a with rsLoRA)

A_a: (r, d_in) starts Kaiming-uniform, B_a: (d_out, r) starts at zero, so a new adapter leaves the
output exactly where the base put it. `LoraLayer.reference_forward` is the formula written plainly; `_FusedLora` is the fast
path for the common training case (one active adapter, no dropout, a frozen dense or NF4 base), held equal to
the reference by tests.

A DoRA adapter (lora/dora.py) is the same term composed with a per-row rescale: without dropout its output is
(m/n)⊙(W₀x + s·BAx) + b, i.e. the LoRA output above (fused or not) rescaled; the reference form is PEFT's.
Other initialisations (gaussian, PiSSA, OLoRA, LoftQ) live in lora/init.py.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..config import LoraConfig, adapter_value_problems, check_name, init_mutates_base, lora_scaling
from ..errors import AdapterError, ConfigError, MergeError, TargetError
from ..layers import conv1d_class, dense_weight, linear_dims, quantized_kind
from ..memory import merge_first  # the form's choice, shared with the memory planner's workspace
from ..quant.linear import NF4Linear
from . import dora

_ORDER = itertools.count()  # injection order of adapters across layers (adapter_configs lists them in it)
BY_HAND = r"(?!)"  # target_modules of an adapter added with add_adapter(): adapter_configs names its layers instead


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = s·B·A in fp32, (d_out, d_in); transposed to (d_in, d_out) for a Conv1D base (fan_in_fan_out)."""
    delta = (B.float() @ A.float()) * scale  # (d_out, d_in)
    return delta.T if fan_in_fan_out else delta


_MODULE_STATE = nn.Module().__dict__  # what nn.Module.__init__ sets: copied per module by _bare_module


def _bare_module(cls: type[nn.Module]) -> nn.Module:
    """An instance of `cls` with nn.Module.__init__'s state and nothing else, made by copying that state (each
    container fresh) instead of running __init__, whose ~17 guarded __setattr__ calls dominate a small layer."""
    module = cls.__new__(cls)
    module.__dict__.update({k: v.copy() if isinstance(v, (dict, set)) else v for k, v in _MODULE_STATE.items()})
    return module


def _linear_around(weight: torch.Tensor) -> nn.Linear:
    """nn.Linear(d_in, d_out, bias=False) whose weight is `weight` (d_out, d_in) itself, as a Parameter: no
    init drawn (nn.Linear's __init__ draws a Kaiming init, skip_init's meta-device round trip costs more)."""
    layer = _bare_module(nn.Linear)
    layer.out_features, layer.in_features = weight.shape
    layer._parameters["weight"] = nn.Parameter(weight)
    layer._parameters["bias"] = None
    return layer


def _put(table: nn.ModuleDict, name: str, module: nn.Module) -> None:
    """table[name] = module, skipping add_module's checks where they cannot fail: `name` is already a checked
    adapter name, new to this layer; one that shadows a ModuleDict attribute takes the checked path (and its error)."""
    if name in table.__dict__ or hasattr(type(table), name):
        table[name] = module
    else:
        table._modules[name] = module


class LoraLayer(nn.Module):
    """Wraps a linear layer: x ↦ W₀x + Σ_active (α/r)·B·A·dropout(x).

    Several named adapters can live in one layer; `active` lists those that add their term. Parameters are
    named as in PEFT: `lora_A.<adapter>.weight` (r, d_in), `lora_B.<adapter>.weight` (d_out, r). `weight` and
    `bias` are the base's (as in PEFT's and torchtune's layers), so model code that reads or ties them works.

    The adapter state (which adapters exist, their config, which are active or merged) lives here, on the
    layer; model-level verbs derive a model's adapters from its layers. `scaling` and `lora_dropout` are read
    at every forward, so changing them takes effect at once; `active` and `merged` change only through
    set_active / merge / unmerge. `routing` is None unless serve.batched_lora.route() set it; while set, it decides
    the forward (batch row i adds its own adapter's term) and `active` is not read.

    Args:
        base_layer: nn.Linear (bitsandbytes' Linear4bit/Linear8bitLt included), GPT-2's Conv1D, or NF4Linear;
            kept, frozen, as `base_layer`.

    Raises:
        TargetError: for any other module type.
    """

    base_replaceable = True  # layers.Wrapper: tools (quantize_model) reach the base only through replace_base()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        dims = linear_dims(base_layer)
        if dims is None:
            raise TargetError(f"LoraLayer wraps a linear layer (nn.Linear, GPT-2 Conv1D or NF4Linear), got "
                              f"{type(base_layer).__name__}; target its linear sub-layers instead")
        self.in_features, self.out_features, self.fan_in_fan_out = dims
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: m, (d_out,), PEFT's name
        self._dora_norms: dict[str, torch.Tensor] = {}  # n of each merged DoRA adapter, recorded at merge for unmerge
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA: (A₀, B₀), for conversion
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, tuple[int, LoraConfig]] = {}  # adapter -> (injection order, its model-level config)
        self._active: list[str] = []
        self._merged: list[str] = []
        self.disabled = False
        self._unmerged_active: tuple[str, ...] = ()
        self.routing = None  # serve.batched_lora.Routing, set by route(): each batch row adds its own adapter
        self.stacks = None  # serve.batched_lora.AdapterStacks: adapters held for routing only (the serving registry's)
        self.generation = 0  # bumped whenever an adapter is added or deleted (caches such as routing's key on it)

    # -- the base, seen through the wrapper -------------------------------------------------------
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def __setattr__(self, name, value):
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self._modules["base_layer"], name, value)  # e.g. transformers tying the head to the embedding
            return
        super().__setattr__(name, value)

    def wrapped(self) -> nn.Module:
        """The frozen base this layer stands for (layers.Wrapper)."""
        return self.base_layer

    @property
    def active(self) -> list[str]:
        """The adapters whose terms are added (a copy: change it with set_active)."""
        return list(self._active)

    @property
    def merged(self) -> list[str]:
        """The adapters merged into the base weight (a copy: change it with merge/unmerge)."""
        return list(self._merged)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init_lora_weights: bool | str = True, config: LoraConfig | None = None, *, init: bool = True,
                    use_dora: bool = False, loftq_config: dict | None = None) -> None:
        """Add adapter `name` (inactive); A Kaiming-uniform and B zero unless init_lora_weights says otherwise
        (False, "gaussian", "pissa", "pissa_niter_K", "olora", "loftq": lora/init.py; PiSSA, OLoRA and LoftQ
        change the base weight too). use_dora adds DoRA's magnitude m = ‖W₀ + s·BA‖ per row (after the init).

        `config` is the model-level LoraConfig it was injected with (what save_adapter writes). init=False leaves
        A and B uninitialised (torch.empty, no random numbers drawn) for a caller that copies weights into them
        straight away; the layer is wrong until it does.
        Raises AdapterError for a bad or taken name, ConfigError for a bad r, alpha or dropout.
        """
        check_name(name)
        tables = self._modules
        if name in tables["lora_A"]._modules:
            raise AdapterError(f"adapter {name!r} already exists in this layer; pick another name or delete it first")
        problems = adapter_value_problems(r, alpha, dropout)
        if problems:
            raise ConfigError(f"adapter {name!r}: " + "; ".join(problems))
        if use_dora:
            dora.check_base(self.base_layer)
        device, dtype = self._base_device_dtype()
        if not init:
            A = _linear_around(torch.empty(r, self.in_features, device=device, dtype=dtype))
            B = _linear_around(torch.empty(self.out_features, r, device=device, dtype=dtype))
        else:
            A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
            B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        scale = lora_scaling(r, alpha, use_rslora)
        if init:
            from .init import initialise  # (init.py uses quant/ and this layer's base; imported when used)

            initialise(self, A.weight, B.weight, scale, init_lora_weights, loftq_config)
            if init_mutates_base(init_lora_weights) and init_lora_weights != "loftq":
                self.initial_factors[name] = (A.weight.detach().clone(), B.weight.detach().clone())
        _put(tables["lora_A"], name, A)
        _put(tables["lora_B"], name, B)
        _put(tables["lora_dropout"], name, nn.Dropout(dropout) if dropout > 0 else _bare_module(nn.Identity))
        if use_dora:
            m = dora.row_norm(self.base_layer, A.weight, B.weight, scale) if init else torch.empty(self.out_features)
            _put(tables["lora_magnitude_vector"], name, dora.Magnitude(m.to(device=device, dtype=dtype)))
        self.scaling[name] = scale
        self.generation += 1
        if config is None:  # added by hand: recorded all the same, so the model-level verbs see it
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                                init_lora_weights=init_lora_weights, target_modules=BY_HAND, use_dora=use_dora,
                                loftq_config=loftq_config or {})
        self.configs[name] = (next(_ORDER), config)

    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the adapters live, and in which dtype: fp32 unless the base computes in fp32/fp64 itself.

        Half-precision and quantized bases keep their adapters in fp32 (as PEFT's autocast_adapter_dtype does):
        updates of size lr·grad vanish when rounded to bf16, and integer weights cannot train at all.
        """
        base = self.base_layer
        if isinstance(base, NF4Linear):
            device, dtype = base.packed.device, base.compute_dtype or base.weight_dtype
        else:
            device, dtype = base.weight.device, base.weight.dtype
        return device, dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def replace_base(self, module: nn.Module) -> None:
        """Swap the frozen base (e.g. for its NF4 version); dimensions must match and nothing may be merged."""
        dims = linear_dims(module)
        if dims is None or dims[:2] != (self.in_features, self.out_features):
            raise MergeError(f"replacement base {type(module).__name__} does not have this layer's shape "
                             f"({self.in_features} -> {self.out_features})")
        if self._merged:
            raise MergeError(f"adapters {self._merged} are merged into the base; unmerge before replacing it")
        self.base_layer = module
        self.fan_in_fan_out = dims[2]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if it is merged)."""
        self._require(name)
        if name in self._merged:
            self.unmerge([name])
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.restore_base([name])
        del self.scaling[name]
        self.generation += 1
        self.configs.pop(name, None)
        self._active = [a for a in self._active if a != name]
        self._refresh()

    def restore_base(self, names: list[str] | None = None) -> None:
        """Give the base back the principal part that PiSSA/OLoRA adapters `names` (default: all) moved into their
        initial A₀, B₀: W₀ = W_res + s·B₀A₀. Those adapters then no longer start from the residual (delete them)."""
        for name in list(self.initial_factors) if names is None else names:
            if name not in self.initial_factors:
                continue
            A0, B0 = self.initial_factors.pop(name)
            weight = self.base_layer.weight
            delta = delta_weight(A0, B0, self.scaling[name], self.fan_in_fan_out).to(weight.device)
            with torch.no_grad():
                weight.copy_((weight.float() + delta).to(weight.dtype))

    def set_active(self, names: list[str]) -> None:
        """Make exactly these adapters (those this layer holds) add their term."""
        self._active = [n for n in names if n in self.lora_A]
        self._refresh()

    def rank(self, name: str) -> int:
        return self.lora_A[name].weight.shape[0]

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def dora_norm(self, name: str) -> torch.Tensor:
        """n = ‖W₀ + s·BA‖ per output row of DoRA adapter `name`, detached, (d_out,) fp32 (lora/dora.row_norm)."""
        return dora.row_norm(self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise AdapterError(f"unknown adapter {name!r}; this layer has {sorted(self.lora_A)}")

    def _refresh(self) -> None:
        """The one derived value forward() caches; active and merged change only through the methods above."""
        self._unmerged_active = tuple(a for a in self._active if a not in self._merged)

    # -- merge ------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A in the base weight's layout (transposed for Conv1D), computed in fp32."""
        self._require(name)
        return delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.fan_in_fan_out)

    def merge(self, names: list[str] | None = None, module_path: str = "") -> None:
        """Add s·BA of each named (default: active) adapter into W₀ in place; merging twice is a no-op.

        Checked before anything is written: MergeError, W₀ untouched, if the merged weight would hold NaN or
        Inf in W₀'s own dtype (an fp16 base overflows past 65504), or if the base is quantized (NF4 or
        bitsandbytes 4/8-bit), where adding in place would round the update away. Each ΔW is computed once.
        """
        todo = self._merge_todo(names, module_path)
        if todo:
            merged = self._merged_in_place_dtype(todo, module_path, record=True)
            with torch.no_grad():
                self.base_layer.weight.copy_(merged)
            self._merged += todo
            self._refresh()

    def _with_adapters(self, weight: torch.Tensor, names, record: bool = False) -> torch.Tensor:
        """W₀ (fp32, the base's layout) with the terms of `names` added: + s·BA for LoRA, + (m/n)⊙(W₀+s·BA) − W₀
        for DoRA (its forward term, written as a weight; n recorded for unmerge when `record`)."""
        merged = weight
        for name in names:
            delta = self.delta_weight(name).to(weight.device)
            if not self.is_dora(name):
                merged = merged + delta
                continue
            w0 = weight.t() if self.fan_in_fan_out else weight  # (d_out, d_in)
            d = delta.t() if self.fan_in_fan_out else delta
            norm = torch.linalg.norm(w0 + d, dim=1)  # n, as forward computes it (dora.row_norm)
            if record:
                self._dora_norms[name] = norm
            term = dora.merged(w0, d, self.lora_magnitude_vector[name].weight.detach().to(w0.device), norm) - w0
            merged = merged + (term.t() if self.fan_in_fan_out else term)
        return merged

    def merge_check(self, names: list[str] | None = None, module_path: str = "") -> list[str]:
        """The adapters merge(names) would add (each once, none already merged), after checking that it may:
        raises MergeError naming the first adapter whose merge would give NaN/Inf, or a quantized base.

        Cheap when the answer is plain: a bound on |W₀ + Σ s·BA| from the largest entries of W₀, A and B proves
        the merge finite without forming ΔW; only a layer whose bound reaches its dtype's range is merged in
        full to find out (so merge, which forms ΔW, usually does it once)."""
        todo = self._merge_todo(names, module_path)
        if todo and not self._surely_finite(todo):
            self._merged_in_place_dtype(todo, module_path)
        return todo

    def _merge_todo(self, names: list[str] | None, module_path: str) -> list[str]:
        todo = list(dict.fromkeys(n for n in (self._active if names is None else names) if n not in self._merged))
        for name in todo:
            self._require(name)
        dora_names = [n for n in todo + self._merged if self.is_dora(n)]
        if todo and dora_names and len(todo) + len(self._merged) > 1:
            raise MergeError(
                f"DoRA adapter {dora_names[0]!r} in {module_path or 'this layer'} merges only alone: its row norm is "
                f"taken against the unmerged base, so merge it with no other adapter merged (now merged: "
                f"{self._merged or 'none'}, asked: {todo})")
        quantized = quantized_kind(self.base_layer) if todo else None
        if quantized:
            raise MergeError(
                f"the base of {module_path or 'this layer'} is {quantized}: merging in place would round the adapter "
                "away. Use merge_and_unload(model) for a 16/32-bit merged model, or (for NF4) "
                "merge_and_requantize(model) to go back to NF4 with the rounding error reported")
        return todo

    def _surely_finite(self, todo: list[str]) -> bool:
        """True when |W₀ + Σ s·BA| provably stays inside W₀'s dtype: max|W₀| + Σ |s|·Σ_k max_i|B_ik|·max_j|A_kj|.
        (A DoRA adapter's term rescales rows by m/n: no bound here, so its merge is checked in full.)"""
        if any(self.is_dora(name) for name in todo):
            return False
        weight = self.base_layer.weight
        bound = torch.linalg.vector_norm(weight, float("inf"), dtype=torch.float32)
        for name in todo:
            A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
            bound = bound + abs(self.scaling[name]) * (B.abs().amax(0) @ A.abs().amax(1))
        return bool(bound < torch.finfo(weight.dtype).max * 0.99)  # NaN compares False; margin for fp32 rounding

    def _merged_in_place_dtype(self, todo: list[str], module_path: str, record: bool = False) -> torch.Tensor:
        """W₀ with the terms of `todo` added (_with_adapters), in W₀'s dtype; MergeError naming the adapter if any
        entry is NaN/Inf. `record`: keep DoRA's row norms for unmerge."""
        weight = self.base_layer.weight
        merged = weight.float()
        for name in todo:  # (a DoRA adapter merges alone, so `merged` is still W₀ when it comes)
            merged = self._with_adapters(merged, [name], record)
            if not torch.isfinite(merged).all():
                break
        merged = merged.to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise MergeError(
                f"merging adapter {name!r} into {module_path or 'a layer'} would put NaN/Inf in the base weight "
                f"({str(weight.dtype).removeprefix('torch.')}); the adapter weights are corrupt or diverged: reload a "
                "good checkpoint (the base is unchanged)")
        return merged

    def merged_weight(self, module_path: str = "") -> torch.Tensor:
        """W₀ + Σ s·BA over the active unmerged adapters, in fp32 and the (d_out, d_in) layout; W₀ is not changed.

        A quantized base (NF4, bitsandbytes 4/8-bit) is dequantized first.
        """
        weight = dense_weight(self.base_layer)
        if self.fan_in_fan_out:  # _with_adapters works in the base's layout
            weight = self._with_adapters(weight.t(), self._unmerged_active).t()
        else:
            weight = self._with_adapters(weight, self._unmerged_active)
        if not torch.isfinite(weight).all():
            raise MergeError(f"merging adapters {list(self._unmerged_active)} into {module_path or 'a layer'} gives "
                             "NaN/Inf weights; the adapter weights are corrupt or diverged (the model is unchanged)")
        return weight

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged adapters (default: all merged) from W₀, restoring it up to rounding."""
        weight = self.base_layer.weight
        for name in list(reversed(self._merged)) if names is None else names:
            if name not in self._merged:
                continue
            delta = self.delta_weight(name).to(weight.device)
            if self.is_dora(name):
                w, d = (weight.float().t(), delta.t()) if self.fan_in_fan_out else (weight.float(), delta)
                m = self.lora_magnitude_vector[name].weight.detach().to(weight.device)
                restored = dora.unmerged(w, d, m, self._dora_norms.pop(name))
                restored = restored.t() if self.fan_in_fan_out else restored
            else:
                restored = weight.float() - delta
            with torch.no_grad():
                weight.copy_(restored.to(weight.dtype))
            self._merged.remove(name)
        self._refresh()

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:  # serving: row i adds its own adapter's term (serve.batched_lora.route)
            return self.routing.forward(self, x)
        adapters = () if self.disabled else self._unmerged_active
        if not adapters:
            return self.base_layer(x)
        if len(adapters) == 1 and self._fusable(x, adapters[0]):
            name = adapters[0]
            base, A, B, scale = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            if isinstance(base, NF4Linear):
                h = _FusedLora.apply(x, None, None, A, B, scale, base)
            else:
                weight = base.weight.t() if self.fan_in_fan_out else base.weight
                h = _FusedLora.apply(x, weight, base.bias, A, B, scale, None)
            if self.is_dora(name):  # DoRA without dropout: the LoRA output rescaled per row
                h = dora.rescale(base, h, self.lora_magnitude_vector[name].weight, self.dora_norm(name))
            return h
        return self.reference_forward(x, adapters)

    def reference_forward(self, x: torch.Tensor, adapters: tuple[str, ...]) -> torch.Tensor:
        """The formula written plainly: base(x) + Σ s·B(A(dropout(x))); a DoRA adapter's term is
        (m/n − 1)⊙W₀·dropout(x) + (m/n)⊙s·BA·dropout(x) (lora/dora.py), its W₀x taken from the base output."""
        h0 = h = self.base_layer(x)
        for name in adapters:
            A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            x_d = drop(x.to(A.weight.dtype))
            z = B(A(x_d)) * self.scaling[name]
            if self.is_dora(name):
                same_x = isinstance(drop, nn.Identity) or not self.training
                z = dora.dora_term(self.base_layer, x_d, h0 if same_x else None, z,
                                   self.lora_magnitude_vector[name].weight, self.dora_norm(name))
            h = h + z.to(h.dtype)
        return h

    def _fusable(self, x: torch.Tensor, name: str | None = None) -> bool:
        """The fused path covers one adapter, no active dropout, a frozen dense or NF4 base, one dtype, no autocast.

        Everything is read now (not cached), so a changed dropout, scaling or base is always honoured. An NF4
        base is fused only while autograd records (training): without it NF4Linear's own forward is used.
        """
        if name is None:
            if len(self._unmerged_active) != 1:
                return False
            name = self._unmerged_active[0]
        base, A = self.base_layer, self.lora_A[name].weight
        dropout_free = isinstance(self.lora_dropout[name], nn.Identity) or not self.training
        if not dropout_free or torch.is_autocast_enabled(x.device.type):
            return False
        if base.bias is not None and base.bias.requires_grad:
            return False
        if isinstance(base, NF4Linear):
            return torch.is_grad_enabled() and x.dtype == A.dtype == (base.compute_dtype or x.dtype)
        plain = type(base).forward in (nn.Linear.forward, getattr(conv1d_class(), "forward", None))
        return plain and not base.weight.requires_grad and x.dtype == base.weight.dtype == A.dtype

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.lora_A}
        dora_names = f", dora={list(self.lora_magnitude_vector)}" if len(self.lora_magnitude_vector) else ""
        return (f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self._active}, "
                f"merged={self._merged}{dora_names}")


def _merged(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W₀ + s·B·A, (d_out, d_in), a new tensor (W₀ untouched)."""
    return torch.addmm(weight, B, A, alpha=scale)


def _linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()


class _FusedLora(torch.autograd.Function):
    """h = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with W and b frozen, in one autograd node.

    Two forms of the same sum, chosen by merge_first() from the row count: the low-rank term added in place into
    x·Wᵀ (few rows), or one product with W + s·BA formed for the call (many rows; a dense base only).

    Shapes: x (N, d_in), W (d_out, d_in), A (r, d_in), B (d_out, r). The backward computes exactly
    dL/dx = g·W + s·(g·B)·A, dL/dA = s·(g·B)ᵀ·x, dL/dB = s·gᵀ·(x·Aᵀ), accumulating into one buffer
    instead of summing separate autograd branches. With `nf4` (an NF4Linear) in place of weight/bias, the base
    products are NF4Linear.matmul / matmul_grad_input (W dequantized chunk by chunk into one reused buffer).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, nf4):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        xa = x2 @ A.t()  # (N, r)
        # fp32 only: in bf16/fp16 W₀ + s·BA would round the small LoRA term away (merging in low precision)
        merge = nf4 is None and weight.dtype == torch.float32 and merge_first(x2.shape[0], A.shape[1], B.shape[0])
        if merge:  # many rows: one product with W₀ + s·BA (formed in one addmm) instead of adding s·(xAᵀ)Bᵀ
            h = _linear(x2, _merged(weight, A, B, scale), bias)
        else:
            h = nf4.matmul(x2) if nf4 is not None else _linear(x2, weight, bias)  # (N, d_out), bias included
            h.addmm_(xa, B.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, A, B)
        ctx.scale, ctx.nf4, ctx.merge = scale, nf4, merge
        return h.view(x.shape[:-1] + h.shape[-1:])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, A, B = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        g_xa = (g @ B).mul_(s)  # (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            if ctx.merge:  # g·(W₀ + s·BA), the merged weight formed again (not kept between forward and backward)
                grad_x = g @ _merged(weight, A, B, s)
            else:
                base_grad = ctx.nf4.matmul_grad_input(g) if ctx.nf4 is not None else g @ weight
                grad_x = base_grad.addmm_(g_xa, A)  # (N, d_in)
            grad_x = grad_x.view(grad.shape[:-1] + grad_x.shape[-1:])
        if ctx.needs_input_grad[3]:
            grad_A = g_xa.t() @ x2  # (r, d_in)
        if ctx.needs_input_grad[4]:
            grad_B = (g.t() @ xa).mul_(s)  # (d_out, r)
        return grad_x, None, None, grad_A, grad_B, None, None
