"""Heterogeneous batching: one forward of the base serves a batch whose rows use different LoRA adapters.

    h_i = W₀x_i + s_i·B_i·A_i·x_i      (h_i = W₀x_i for a row with no adapter)
    x: (N, L, d_in)  A_i: (r_i, d_in)  B_i: (d_out, r_i)  h: (N, L, d_out);  N rows, L tokens per row

The base runs once for the whole batch. The adapter terms come from per-layer stacks (`AdapterStack`: every
adapter the layer holds, ranks zero-padded to the largest, s folded into B, slot 0 all zeros for "no adapter"):
each row gathers its slot and two batched matmuls add the terms, as punica's BGMV kernel does (Chen et al. 2023,
"Punica: Multi-Tenant LoRA Serving", arXiv:2310.18547). Zero padding adds exact zeros, so a rank-2 and a
rank-16 adapter share one stack. `reference_rows` is the per-request reference: each row alone through the
single-adapter formula (LoraLayer.reference_forward); tests hold the two equal.

The model-level verbs are explicit, with no global forward context: `route(model, rows)` sets each LoRA
layer's `routing` (a `Routing`: the stack and the per-row slot index), and `clear_route(model)` removes it.
While a model is routed, every forward takes rows[i]'s adapter for row i, whatever set_active said. Routing is
for inference: the stacks are detached copies (rebuilt when a layer's adapters, their weights or their
scaling change), and dropout is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, MergeError, RequestError
from ..lora import LoraLayer, ModulesToSave, adapter_names
from ..lora.inject import named_wrappers


GATHER_CACHE_BYTES = 4 << 20  # per layer: a Routing keeps its rows' gathered A and B when they take at most this


def batched_lora(h: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """h[i] += x[i]·At[index[i]]·Bt[index[i]]:  h (N, L, d_out), x (N, L, d_in), At (K, d_in, r), Bt (K, r, d_out), index (N,).

    With index None, At (N, d_in, r) and Bt (N, r, d_out) are already one per row (gathered beforehand).
    Adds into h in place (and returns it): one pass over the output instead of a product and an add.
    """
    if index is not None:
        At, Bt = At.index_select(0, index), Bt.index_select(0, index)
    return h.baddbmm_(torch.bmm(x, At), Bt)  # (N, L, r) then (N, L, d_out)


def _stack_key(layer: LoraLayer) -> tuple:
    """What the stack depends on: the layer's adapter generation (bumped by add/delete, so an adapter unloaded and
    loaded again under the same name is new), each weight's storage, dtype, device and version counter (autograd's
    in-place ops and copy_ bump it), and the scaling. Updates that bypass the version counter (a fused optimizer
    step, writes through .data) are not seen: call route(..., refresh=True) or clear_route() after them."""
    B = layer.lora_B._modules

    def weight(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.dtype, t.device, t._version

    return (layer.generation,) + tuple((n, weight(a._parameters["weight"]), weight(B[n]._parameters["weight"]),
                                        layer.scaling[n]) for n, a in layer.lora_A._modules.items())


@dataclass(frozen=True)
class AdapterStack:
    """Every adapter of one layer, stacked: slot 0 is "no adapter" (zeros), slot k+1 is the k-th adapter."""

    names: tuple[str, ...]
    key: tuple
    At: torch.Tensor  # (K+1, d_in, r_max): Aᵀ, zero-padded past each adapter's rank
    Bt: torch.Tensor  # (K+1, r_max, d_out): s·Bᵀ, zero-padded likewise

    @classmethod
    def build(cls, layer: LoraLayer) -> AdapterStack:
        names = tuple(layer.lora_A)
        r_max = max(layer.rank(n) for n in names)
        ref = layer.lora_A[names[0]].weight
        At = torch.zeros(len(names) + 1, layer.in_features, r_max, device=ref.device, dtype=ref.dtype)
        Bt = torch.zeros(len(names) + 1, r_max, layer.out_features, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for k, name in enumerate(names, start=1):
                r = layer.rank(name)
                At[k, :, :r] = layer.lora_A[name].weight.t()
                Bt[k, :r, :] = layer.lora_B[name].weight.t() * layer.scaling[name]
        return cls(names, _stack_key(layer), At, Bt)

    def slot(self, name: str | None) -> int:
        """The stack slot of adapter `name`; 0 (no term) for None or an adapter this layer does not hold."""
        return self.names.index(name) + 1 if name in self.names else 0


class Routing:
    """One layer's routing state: its AdapterStack and the slot each batch row uses (set by route()).

    Two paths, the same sums: "gather" gives each row its own copy of its adapter (index_select) and runs the
    batched matmuls over rows; "grouped" (punica's SGMV idea) runs them over the distinct adapters, each with its
    rows padded to the largest group, and adds the terms back with index_add_, so every adapter's weights are read
    once per forward however many rows share it (decode is bound by memory traffic: the gathered copies of 32
    adapters over 64 rows outweigh the base's weights). Rule: grouped when some adapter serves more than one row
    and padding at most doubles the rows (distinct adapters x largest group <= 2 x rows with an adapter);
    otherwise gather. Rows with no adapter (slot 0) take no part in the grouped path.
    """

    def __init__(self, stack: AdapterStack, index: torch.Tensor, slots: tuple[int, ...]):
        self.stack, self.index, self.slots = stack, index, slots
        self.any_adapter = any(slots)  # no row adds a term in this layer: the base alone
        self._rows = None  # (At, Bt) gathered per row: a decode step reuses them (small enough, see GATHER_CACHE_BYTES)
        per_row = stack.At[0].numel() + stack.Bt[0].numel()
        self._keep_rows = len(slots) * per_row * stack.At.element_size() <= GATHER_CACHE_BYTES
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                groups.setdefault(slot, []).append(row)
        active, size = sum(map(len, groups.values())), max(map(len, groups.values()), default=0)
        self.grouped = len(groups) < active and len(groups) * size <= 2 * active  # the rule (class docstring)
        self._groups = self._group_plan = None
        if groups:  # planned whenever a row has an adapter, so tests can hold either path to the reference
            uniq = sorted(groups)
            pos = [g[i] if i < len(g) else g[0] for u in uniq for g in (groups[u],) for i in range(size)]
            valid = [k for k, u in enumerate(uniq) for k in range(k * size, k * size + len(groups[u]))]
            self._group_plan = (uniq, size, pos, valid, [groups[u][i] for u in uniq for i in range(len(groups[u]))])

    def _group_tensors(self) -> tuple:
        """(At, Bt) of the distinct adapters (a view when their slots are contiguous), the rows each group reads
        (padded with its first row), the valid positions (None without padding) and the rows they add to."""
        if self._groups is None:
            uniq, size, pos, valid, rows = self._group_plan
            At, Bt, device = self.stack.At, self.stack.Bt, self.stack.At.device
            if uniq == list(range(uniq[0], uniq[0] + len(uniq))):
                At_u, Bt_u = At[uniq[0]:uniq[0] + len(uniq)], Bt[uniq[0]:uniq[0] + len(uniq)]
            else:
                u = torch.tensor(uniq, dtype=torch.long, device=device)
                At_u, Bt_u = At.index_select(0, u), Bt.index_select(0, u)
            as_index = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
            self._groups = (At_u, Bt_u, size, as_index(pos),
                            None if len(valid) == len(pos) else as_index(valid), as_index(rows))
        return self._groups

    def forward(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        """base(x) + batched_lora(x): row i of x (its first dimension) adds its own adapter's term."""
        if x.shape[0] != len(self.slots):
            raise RequestError(f"the model is routed for {len(self.slots)} rows (route(model, rows)) but this batch has "
                               f"{x.shape[0]}; call route() with one adapter name (or None) per row")
        h = layer.base_layer(x)
        if not self.any_adapter or layer.disabled:
            return h
        n, dtype = x.shape[0], self.stack.At.dtype
        x3 = x.reshape(n, -1, x.shape[-1])  # (N, L, d_in)
        if x3.dtype != dtype:
            x3 = x3.to(dtype)
        h3 = h.reshape(n, -1, h.shape[-1])  # (N, L, d_out)
        if h3.dtype != dtype or not h3.is_contiguous():
            h3 = h3.to(dtype, copy=True)
        if self.grouped:
            grouped_lora(h3, x3, *self._group_tensors())
        elif not self._keep_rows:
            batched_lora(h3, x3, self.stack.At, self.stack.Bt, self.index)
        else:
            if self._rows is None:
                self._rows = (self.stack.At.index_select(0, self.index), self.stack.Bt.index_select(0, self.index))
            batched_lora(h3, x3, *self._rows)
        out = h3.view(h.shape)
        return out if out.dtype == h.dtype else out.to(h.dtype)


def grouped_lora(h: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, size: int, pos: torch.Tensor,
                 valid: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """h[rows] += x[rows]·At[u]·Bt[u] per distinct adapter u:  At (U, d_in, r), Bt (U, r, d_out); group u reads the
    rows pos[u·size:(u+1)·size] (padded with repeats); valid picks the unpadded results (None: no padding), which
    index_add_ adds to `rows` (each row once). In place into h, which it returns."""
    U, L = At.shape[0], x.shape[1]
    xg = x.index_select(0, pos).view(U, size * L, x.shape[-1])
    y = torch.bmm(torch.bmm(xg, At), Bt).view(U * size, L, Bt.shape[-1])
    if valid is not None:
        y = y.index_select(0, valid)
    return h.index_add_(0, rows, y)


def reference_rows(layer: LoraLayer, x: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """The per-request reference: row i alone through the single-adapter formula (adapters in float32)."""
    return torch.cat([layer.reference_forward(x[i:i + 1], (name,) if name in layer.lora_A else ())
                      for i, name in enumerate(rows)])


def _check_rows(model: nn.Module, rows) -> list[str | None]:
    """rows as a list of known adapter names or None; AdapterError names the unknown ones and those loaded."""
    if not isinstance(rows, (list, tuple)) or not rows or not all(r is None or isinstance(r, str) for r in rows):
        raise RequestError(f"route() takes a non-empty list with one adapter name (or None) per batch row, got {rows!r}")
    loaded = {name for _, w in named_wrappers(model) if isinstance(w, LoraLayer) for name in w.lora_A._modules}
    unknown = sorted({r for r in rows if r is not None and r not in loaded})
    if unknown:
        loaded = adapter_names(model)
        raise AdapterError(f"unknown adapter(s) {unknown} in route(); this model has {loaded or 'no adapters'} "
                           "(load_adapter() it first, or use None for the base)")
    return list(rows)


def _check_routable(wrappers: list[tuple[str, nn.Module]], layers: list[tuple[str, LoraLayer]], rows: list[str | None]) -> None:
    """MergeError for merged adapters, AdapterError for whole-module copies, ConfigError for active dropout."""
    merged = sorted({a for _, layer in layers for a in layer.merged})
    if merged:
        raise MergeError(f"adapter(s) {merged} are merged into the base weights, so every row would get them; "
                         "call unmerge(model) before route()")
    wanted = set(rows) - {None}
    for path, wrapper in wrappers:
        if isinstance(wrapper, ModulesToSave) and wrapper.active is not None and not wrapper.disabled:
            raise AdapterError(f"adapter {wrapper.active!r} is active and replaces the whole module {path} "
                               "(modules_to_save), which would apply to every row; call set_active(model, []) "
                               "before route()")
        if isinstance(wrapper, ModulesToSave) and wanted & set(wrapper.modules_to_save):
            raise AdapterError(f"adapter(s) {sorted(wanted & set(wrapper.modules_to_save))} replace the whole module "
                               f"{path} (modules_to_save), which cannot differ per row; serve them with set_active()")
    for path, layer in layers:
        if layer.training and any(not isinstance(layer.lora_dropout[n], nn.Identity) for n in wanted & set(layer.lora_A)):
            raise ConfigError(f"{path} is in training mode with LoRA dropout, which route() does not apply; "
                              "call model.eval() before routing (routing is for inference)")


def route(model: nn.Module, rows: list[str | None], refresh: bool = False) -> None:
    """Route the next forwards of `model`: batch row i adds adapter rows[i]'s term (None: the base alone).

    Sets `routing` on every LoRA layer; a layer's stack is rebuilt only when its adapters changed since the
    last route() (see _stack_key), or always with refresh=True. A layer that does not hold rows[i]'s adapter adds
    nothing for that row, as with set_active. Inside rd.disabled(model) every row computes the base.

    Raises:
        AdapterError: a name is not an adapter of the model (the message lists those loaded), or an adapter
            also replaces whole modules (modules_to_save).
        MergeError: an adapter is merged into the base: unmerge(model) first.
        RequestError: rows is not a non-empty list of names and None.
    """
    rows = _check_rows(model, rows)
    wrappers = list(named_wrappers(model))
    layers = [(path, w) for path, w in wrappers if isinstance(w, LoraLayer)]
    _check_routable(wrappers, layers, rows)
    indices: dict[tuple, torch.Tensor] = {}  # layers holding the same adapters share one index tensor
    for _, layer in layers:
        if not layer.lora_A:  # a wrapper left without adapters computes the base either way
            layer.routing = None
            continue
        old = layer.routing
        fresh = old is not None and not refresh and old.stack.key == _stack_key(layer)
        stack = old.stack if fresh else AdapterStack.build(layer)
        slots = tuple(stack.slot(name) for name in rows)
        device = stack.At.device
        if (slots, device) not in indices:
            indices[slots, device] = torch.tensor(slots, dtype=torch.long, device=device)
        layer.routing = Routing(stack, indices[slots, device], slots)


def clear_route(model: nn.Module) -> None:
    """Remove the routing from every LoRA layer (and free its stacks): forwards follow set_active again."""
    for _, wrapper in named_wrappers(model):
        if isinstance(wrapper, LoraLayer):
            wrapper.routing = None
