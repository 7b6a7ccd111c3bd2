"""The LoRA layer: a frozen linear map plus low-rank updates (Hu et al. 2021, arXiv:2106.09685).

    h = W₀x + Σ_a s_a · B_a A_a dropout_a(x),   s_a = α_a / r_a   (α_a / √r_a with rsLoRA)

A_a: (r, d_in) starts Kaiming-uniform, B_a: (d_out, r) starts at zero, so a new adapter leaves the
output exactly where the base put it. `LoraLayer.forward` is the reference; `_FusedLora` is the fast path
for the common training case (one active adapter, no dropout, frozen dense base), held equal to the
reference by tests.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from ..errors import AdapterError, MergeError
from ..layers import conv1d_class, linear_dims
from ..quant.linear import NF4Linear


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = s·B·A in fp32, (d_out, d_in); transposed to (d_in, d_out) for a Conv1D base (fan_in_fan_out)."""
    delta = (B.float() @ A.float()) * scale  # (d_out, d_in)
    return delta.T if fan_in_fan_out else delta


class LoraLayer(nn.Module):
    """Wraps a linear layer: x ↦ W₀x + Σ_active (α/r)·B·A·dropout(x).

    Several named adapters can live in one layer; `active` lists those that add their term.
    Parameters are named as in PEFT: `lora_A.<adapter>.weight` (r, d_in), `lora_B.<adapter>.weight` (d_out, r).

    Args:
        base_layer: an nn.Linear or transformers' Conv1D; it is kept, frozen, as `base_layer`.

    Raises:
        TypeError: for any other module type.
    """

    base_replaceable = True  # layers.Wrapper: tools (quantize_model) reach the base only through replace_base()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        dims = linear_dims(base_layer)
        if dims is None:
            raise TypeError(f"LoraLayer wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.in_features, self.out_features, self.fan_in_fan_out = dims
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._refresh()

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool = True) -> None:
        """Add adapter `name` (inactive); A Kaiming-uniform and B zero unless init_lora_weights is False."""
        if name in self.lora_A:
            raise AdapterError(f"adapter {name!r} already exists in this layer; pick another name or delete it first")
        device, dtype = self._base_device_dtype()
        # Half-precision bases keep their adapters in fp32 (as PEFT's autocast_adapter_dtype does): updates of
        # size lr·grad vanish when rounded to bf16.
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # the same init as nn.Linear and PEFT
        if init_lora_weights:
            nn.init.zeros_(B.weight)
        else:
            nn.init.normal_(B.weight, std=1.0 / math.sqrt(r))
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self._refresh()

    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        base = self.base_layer
        if isinstance(base, NF4Linear):
            return base.packed.device, base.compute_dtype or base.weight_dtype
        return base.weight.device, base.weight.dtype

    def wrapped(self) -> nn.Module:
        """The frozen base this layer stands for (layers.Wrapper)."""
        return self.base_layer

    def replace_base(self, module: nn.Module) -> None:
        """Swap the frozen base (e.g. for its NF4 version); dimensions must match and nothing may be merged."""
        if linear_dims(module) is None or linear_dims(module)[:2] != (self.in_features, self.out_features):
            raise MergeError(f"replacement base {type(module).__name__} does not have this layer's shape "
                             f"({self.in_features} -> {self.out_features})")
        if self.merged:
            raise MergeError(f"adapters {self.merged} are merged into the base; unmerge before replacing it")
        self.base_layer = module
        self.fan_in_fan_out = linear_dims(module)[2]
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if it is merged)."""
        self._require(name)
        if name in self.merged:
            self.unmerge([name])
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        del self.scaling[name]
        self.active = [a for a in self.active if a != name]
        self._refresh()

    def set_active(self, names: list[str]) -> None:
        """Make exactly these adapters (those this layer holds) add their term."""
        self.active = [n for n in names if n in self.lora_A]
        self._refresh()

    def rank(self, name: str) -> int:
        return self.lora_A[name].weight.shape[0]

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise AdapterError(f"unknown adapter {name!r}; this layer has {sorted(self.lora_A)}")

    def _refresh(self) -> None:
        """Recompute what forward() needs from the adapter state, so each call does the least work."""
        self._unmerged_active = tuple(a for a in self.active if a not in self.merged)
        self._single = None
        plain_base = type(self.base_layer).forward in (nn.Linear.forward, getattr(conv1d_class(), "forward", None))
        if len(self._unmerged_active) == 1 and (plain_base or isinstance(self.base_layer, NF4Linear)):
            name = self._unmerged_active[0]
            self._single = (self.base_layer, self.lora_A[name], self.lora_B[name], self.scaling[name])
            self._single_dropout_free = isinstance(self.lora_dropout[name], nn.Identity)

    # -- merge ------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A in the base weight's layout (transposed for Conv1D), computed in fp32."""
        self._require(name)
        return delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.fan_in_fan_out)

    def merge(self, names: list[str] | None = None, module_path: str = "") -> None:
        """Add s·BA of each named (default: active) adapter into W₀ in place; merging twice is a no-op.

        Raises MergeError, leaving W₀ untouched, if the merged weight would hold NaN or Inf.
        """
        if isinstance(self.base_layer, NF4Linear) and (names is None or names):
            raise MergeError(
                f"the base of {module_path or 'this layer'} is 4-bit NF4: merging in place would round the adapter "
                "away. Use merge_and_unload(model) for a 16/32-bit merged model, or "
                "merge_and_requantize(model) to go back to NF4 with the rounding error reported")
        weight = self.base_layer.weight
        for name in self.active if names is None else names:
            self._require(name)
            if name in self.merged:
                continue
            merged = weight.float() + self.delta_weight(name).to(weight.device)
            if not torch.isfinite(merged).all():
                raise MergeError(
                    f"merging adapter {name!r} into {module_path or 'a layer'} would put NaN/Inf in the base weight; "
                    "the adapter weights are corrupt or diverged: reload a good checkpoint (the base is unchanged)")
            with torch.no_grad():
                weight.copy_(merged.to(weight.dtype))
            self.merged.append(name)
        self._refresh()

    def merged_weight(self, module_path: str = "") -> torch.Tensor:
        """W₀ + Σ s·BA over the active unmerged adapters, in fp32 and the (d_out, d_in) layout; W₀ is not changed."""
        base = self.base_layer
        if isinstance(base, NF4Linear):
            weight = base.dequantized_weight(torch.float32)
        else:
            weight = (base.weight.t() if self.fan_in_fan_out else base.weight).float()
        for name in self._unmerged_active:
            delta = self.delta_weight(name)
            weight = weight + (delta.t() if self.fan_in_fan_out else delta).to(weight.device)
        if not torch.isfinite(weight).all():
            raise MergeError(f"merging adapters {list(self._unmerged_active)} into {module_path or 'a layer'} gives "
                             "NaN/Inf weights; the adapter weights are corrupt or diverged (the model is unchanged)")
        return weight

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged adapters (default: all merged) from W₀, restoring it up to rounding."""
        weight = self.base_layer.weight
        for name in list(reversed(self.merged)) if names is None else names:
            if name not in self.merged:
                continue
            with torch.no_grad():
                weight.copy_((weight.float() - self.delta_weight(name).to(weight.device)).to(weight.dtype))
            self.merged.remove(name)
        self._refresh()

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = () if self.disabled else self._unmerged_active
        if not adapters:
            return self.base_layer(x)
        if self._single is not None and self._fusable(x):
            base, A, B, scale = self._single
            if isinstance(base, NF4Linear):
                return _FusedLora.apply(x, None, None, A.weight, B.weight, scale, base)
            weight = base.weight.t() if self.fan_in_fan_out else base.weight
            return _FusedLora.apply(x, weight, base.bias, A.weight, B.weight, scale, None)
        return self.reference_forward(x, adapters)

    def reference_forward(self, x: torch.Tensor, adapters: tuple[str, ...]) -> torch.Tensor:
        """The formula written plainly: base(x) + Σ s·B(A(dropout(x)))."""
        h = self.base_layer(x)
        for name in adapters:
            A, B = self.lora_A[name], self.lora_B[name]
            z = B(A(self.lora_dropout[name](x.to(A.weight.dtype))))
            h = h + (z * self.scaling[name]).to(h.dtype)
        return h

    def _fusable(self, x: torch.Tensor) -> bool:
        """The fused path covers one adapter, no active dropout, a frozen base, one dtype, no autocast.

        An NF4 base is fused only while autograd records (training): without it, NF4Linear's own forward may
        take bitsandbytes' fused 4-bit inference kernel, which is faster than dequantizing.
        """
        base, A, _, _ = self._single
        if isinstance(base, NF4Linear):
            return (
                torch.is_grad_enabled()
                and (not self.training or self._single_dropout_free)
                and x.dtype == A.weight.dtype == (base.compute_dtype or x.dtype)
                and (base.bias is None or not base.bias.requires_grad)
                and not torch.is_autocast_enabled(x.device.type)
            )
        return (
            (not self.training or self._single_dropout_free)
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and x.dtype == base.weight.dtype == A.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.lora_A}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active}, merged={self.merged}"


class _FusedLora(torch.autograd.Function):
    """h = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with W and b frozen, in one autograd node.

    Shapes: x (N, d_in), W (d_out, d_in), A (r, d_in), B (d_out, r). The backward computes exactly
    dL/dx = g·W + s·(g·B)·A, dL/dA = s·(g·B)ᵀ·x, dL/dB = s·gᵀ·(x·Aᵀ), accumulating into one buffer
    instead of summing separate autograd branches. With `nf4` (an NF4Linear) in place of weight/bias, the base
    products are NF4Linear.matmul / matmul_grad_input (W dequantized chunk by chunk into one reused buffer).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, nf4):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        xa = x2 @ A.t()  # (N, r)
        if nf4 is not None:
            h = nf4.matmul(x2)  # (N, d_out), bias included
        else:
            h = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (N, d_out)
        h.addmm_(xa, B.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, A, B)
        ctx.scale, ctx.nf4 = scale, nf4
        return h.view(x.shape[:-1] + h.shape[-1:])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, A, B = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        g_xa = (g @ B).mul_(s)  # (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            base_grad = ctx.nf4.matmul_grad_input(g) if ctx.nf4 is not None else g @ weight
            grad_x = base_grad.addmm_(g_xa, A)  # (N, d_in)
            grad_x = grad_x.view(grad.shape[:-1] + grad_x.shape[-1:])
        if ctx.needs_input_grad[3]:
            grad_A = g_xa.t() @ x2  # (r, d_in)
        if ctx.needs_input_grad[4]:
            grad_B = (g.t() @ xa).mul_(s)  # (d_out, r)
        return grad_x, None, None, grad_A, grad_B, None, None
