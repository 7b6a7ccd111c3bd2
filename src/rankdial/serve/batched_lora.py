"""Heterogeneous batching: one forward of the base serves a batch whose rows use different LoRA adapters.

    h_i = W₀x_i + s_i·B_i·A_i·x_i      (h_i = W₀x_i for a row with no adapter)
    x: (N, L, d_in)  A_i: (r_i, d_in)  B_i: (d_out, r_i)  h: (N, L, d_out);  N rows, L tokens per row

The base runs once for the whole batch. The adapter terms come from the layer's `AdapterStacks`: one `RankStack`
per rank (Aᵀ (K, d_in, r), Bᵀ (K, r, d_out) and s per slot), so adapters of one rank share a stack and a large
rank never pads the others. For each rank present among the rows, the rows of that rank gather their slots and
two batched matmuls add their terms, as punica's BGMV kernel does (Chen et al. 2023, "Punica: Multi-Tenant LoRA
Serving", arXiv:2310.18547); rows with no adapter take no part. `reference_rows` is the per-request reference:
each row alone through the single-adapter formula (LoraLayer.reference_forward); tests hold the two equal.

Storage (serve/stacks.py): for the serving registry the stacks ARE the adapters' storage (`layer.stacks`, written
straight from the file, nothing else held), so the bytes it charges are the bytes held. For a model whose adapters
live on its layers (lora_A / lora_B, as rd.inject and rd.load_adapter make them), route() builds the stacks from
them, rebuilt when the layer's adapters, their weights or their scaling change (stack_key).

The model-level verbs are explicit, with no global forward context: `route(model, rows)` sets each LoRA layer's
`routing` (a `Routing`: the stacks and the slots of the rows), and `clear_route(model)` removes it. While a model
is routed, every forward takes rows[i]'s adapter for row i, whatever set_active said. route() is cheap to call at
every step: a layer whose stacks and rows are unchanged keeps its Routing. Routing is for inference: dropout is
not applied.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, MergeError, RequestError
from ..lora import LoraLayer, ModulesToSave
from ..lora.inject import named_wrappers
from .stacks import AdapterStacks, stack_key


def batched_lora(h: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """h[i] += scale[i]·x[i]·At[i]·Bt[i]:  h (N, L, d_out), x (N, L, d_in), At (N, d_in, r), Bt (N, r, d_out),
    scale (N,). Adds into h in place (and returns it): one pass over the output instead of a product and an add."""
    z = torch.bmm(x, At).mul_(scale[:, None, None])  # (N, L, r): s applied on the small side
    return h.baddbmm_(z, Bt)  # (N, L, d_out)


def grouped_lora(h: torch.Tensor, xg: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, scale: torch.Tensor,
                 size: int, valid: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    """h[rows] += s_u·xg[u]·At[u]·Bt[u] per distinct adapter u:  At (U, d_in, r), Bt (U, r, d_out), scale (U,);
    xg (U·size, L, d_in) is x's rows grouped by adapter, group u at u·size..(u+1)·size-1 (padded with repeats);
    valid picks the unpadded results (None: no padding), which index_add_ adds to `rows` (each row once).
    rows None: xg is x itself (the groups are the batch's rows in order), so the terms go into h in place with
    no copy. In place into h, which it returns."""
    U, L = At.shape[0], xg.shape[1]
    z = torch.bmm(xg.view(U, size * L, xg.shape[-1]), At).mul_(scale[:, None, None])
    if rows is None:
        h.view(U, size * L, h.shape[-1]).baddbmm_(z, Bt)
        return h
    y = torch.bmm(z, Bt).view(U * size, L, Bt.shape[-1])
    if valid is not None:
        y = y.index_select(0, valid)
    return h.index_add_(0, rows, y)


class _RankPlan:
    """The rows of one rank in one batch: which rows, their slots, the path the rule picks, and the index tensors
    each path reads (made on first use; shared by every layer whose stacks put these rows in the same slots).

    `span` is the slots the grouped matmuls run over: the distinct slots, or, when every row has its own adapter
    and their slots lie within a range at most twice their number, that whole range (a view of the stack, the gaps
    computed and dropped): reading the range costs less than copying each row's adapter, so the gather path then
    runs this way (`by_view`)."""

    def __init__(self, r: int, rows: list[int], slots: list[int], n_rows: int, device: torch.device):
        self.r, self.rows, self.slots, self.device, self.n_rows = r, rows, slots, device, n_rows
        self.all_rows = len(rows) == n_rows  # rows are listed in order, so then they are 0..N-1
        groups: dict[int, list[int]] = {}
        for row, slot in zip(rows, slots):
            groups.setdefault(slot, []).append(row)
        self.groups, self.size = groups, max(map(len, groups.values()))
        self.grouped = len(groups) < len(rows) and len(groups) * self.size <= 2 * len(rows)  # the rule (Routing)
        uniq = sorted(groups)
        self.by_view = self.size == 1 and uniq[-1] - uniq[0] + 1 <= 2 * len(uniq)
        self.span = list(range(uniq[0], uniq[-1] + 1)) if self.by_view else uniq
        self._gather = self._group = None

    def gather_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the rows' slots, the rows: None when they are all the batch's rows)."""
        if self._gather is None:
            as_index = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
            self._gather = (as_index(self.slots), None if self.all_rows else as_index(self.rows))
        return self._gather

    def group_tensors(self) -> tuple:
        """(the span's slots as a slice or an index, the rows each slot of the span reads (padded with a row), the
        valid positions (None without padding), the rows they add to). The last three are None when the groups
        are the batch's rows in order (pos = rows = 0..N-1): grouped_lora then reads x and writes h directly."""
        if self._group is None:
            span, size, groups, pad = self.span, self.size, self.groups, [self.rows[0]]
            as_index = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
            pos = [g[i] if i < len(g) else g[0] for u in span for g in (groups.get(u, pad),) for i in range(size)]
            valid = [k * size + i for k, u in enumerate(span) for i in range(len(groups.get(u, ())))]
            contiguous = span == list(range(span[0], span[0] + len(span)))
            uniq = slice(span[0], span[0] + len(span)) if contiguous else as_index(span)
            rows = [row for u in span for row in groups.get(u, ())]
            if pos == rows == list(range(self.n_rows)):  # no padding, every row, in order: no copy either way
                self._group = (uniq, None, None, None)
            else:
                self._group = (uniq, as_index(pos), None if len(valid) == len(pos) else as_index(valid), as_index(rows))
        return self._group


def _plans(where: tuple, device: torch.device) -> list[_RankPlan]:
    """One _RankPlan per rank present among the rows; where[i] is row i's (rank, slot), or None."""
    by_rank: dict[int, tuple[list[int], list[int]]] = {}
    for row, place in enumerate(where):
        if place is not None:
            rows, slots = by_rank.setdefault(place[0], ([], []))
            rows.append(row)
            slots.append(place[1])
    return [_RankPlan(r, rows, slots, len(where), device) for r, (rows, slots) in sorted(by_rank.items())]


class Routing:
    """One layer's routing state: its AdapterStacks and, per rank present in the batch, the rows and their slots.

    Two paths, the same sums: "gather" gives each row its own copy of its adapter (index_select) and runs the
    batched matmuls over rows; "grouped" (punica's SGMV idea) runs them over the distinct adapters, each with its
    rows padded to the largest group, and adds the terms back with index_add_, so every adapter's weights are read
    once per forward however many rows share it (decode is bound by memory traffic: the gathered copies of 32
    adapters over 64 rows outweigh the base's weights). Rule, per rank: grouped when some adapter serves more than
    one row and padding at most doubles the rows (distinct adapters x largest group <= 2 x rows of that rank);
    otherwise gather. Rows with no adapter take no part in either.
    """

    def __init__(self, stacks: AdapterStacks, rows: tuple, plans: list[_RankPlan]):
        self.stacks, self.rows, self.version, self.plans = stacks, rows, stacks.version, plans
        self.any_adapter = bool(plans)  # no row adds a term in this layer: the base alone
        self._scales: dict[tuple[int, bool], torch.Tensor] = {}

    @property
    def grouped(self) -> bool:
        """Whether every rank's rows take the grouped path (settable, so tests can hold either to the reference)."""
        return bool(self.plans) and all(p.grouped for p in self.plans)

    @grouped.setter
    def grouped(self, value: bool) -> None:
        for plan in self.plans:
            plan.grouped = value
            plan.by_view = plan.by_view and value  # forced gather: each row's own copy, the plain way

    def slot(self, row: int) -> tuple[int, int] | None:
        """Row `row`'s (rank, slot) in this layer's stacks; None when it adds nothing here."""
        return next(((p.r, s) for p in self.plans for r, s in zip(p.rows, p.slots) if r == row), None)

    def _scale(self, plan: _RankPlan, grouped: bool) -> torch.Tensor:
        """s per row (gather) or per distinct adapter (grouped), from this layer's stack."""
        key = (plan.r, grouped)
        if key not in self._scales:
            scale = self.stacks.stacks[plan.r].scale
            slots = plan.span if grouped else plan.slots
            self._scales[key] = torch.tensor([scale[k] for k in slots], dtype=self.stacks.dtype, device=plan.device)
        return self._scales[key]

    def forward(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        """base(x) + each row's own adapter term: row i of x (its first dimension) is batch row i."""
        if x.shape[0] != len(self.rows):
            raise RequestError(f"the model is routed for {len(self.rows)} rows (route(model, rows)) but this batch has "
                               f"{x.shape[0]}; call route() with one adapter name (or None) per row")
        h = layer.base_layer(x)
        if not self.any_adapter or layer.disabled:
            return h
        n, dtype = x.shape[0], self.stacks.dtype
        x3 = x.reshape(n, -1, x.shape[-1])  # (N, L, d_in)
        if x3.dtype != dtype:
            x3 = x3.to(dtype)
        h3 = h.reshape(n, -1, h.shape[-1])  # (N, L, d_out)
        if h3.dtype != dtype or not h3.is_contiguous():
            h3 = h3.to(dtype, copy=True)
        for plan in self.plans:
            stack = self.stacks.stacks[plan.r]
            if plan.grouped or plan.by_view:
                uniq, pos, valid, rows = plan.group_tensors()
                At, Bt = (stack.At[uniq], stack.Bt[uniq]) if isinstance(uniq, slice) else (
                    stack.At.index_select(0, uniq), stack.Bt.index_select(0, uniq))
                xg = x3 if pos is None else x3.index_select(0, pos)
                grouped_lora(h3, xg, At, Bt, self._scale(plan, True), plan.size, valid, rows)
                continue
            slots, rows = plan.gather_tensors()
            At, Bt = stack.At.index_select(0, slots), stack.Bt.index_select(0, slots)
            if rows is None:
                batched_lora(h3, x3, At, Bt, self._scale(plan, False))
            else:
                y = batched_lora(x3.new_zeros(len(plan.rows), x3.shape[1], h3.shape[-1]), x3.index_select(0, rows),
                                 At, Bt, self._scale(plan, False))
                h3.index_add_(0, rows, y)
        out = h3.view(h.shape)
        return out if out.dtype == h.dtype else out.to(h.dtype)


def reference_rows(layer: LoraLayer, x: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """The per-request reference: row i alone through the single-adapter formula (adapters in float32).

    Adapters held in the layer's serving stacks (the registry's) are read from there, through the same formula."""
    out = []
    for i, name in enumerate(rows):
        xi = x[i:i + 1]
        stacks = layer.stacks
        if stacks is not None and name in stacks.where:
            A, B, s = stacks.weights(name)
            h = layer.base_layer(xi)
            out.append(h + (s * (xi.to(A.dtype) @ A.t() @ B.t())).to(h.dtype))
        else:
            out.append(layer.reference_forward(xi, (name,) if name in layer.lora_A else ()))
    return torch.cat(out)


def _held(layer: LoraLayer, name: str) -> bool:
    return name in layer.lora_A._modules or (layer.stacks is not None and name in layer.stacks.where)


def _check_rows(layers: list[tuple[str, LoraLayer]], rows) -> list[str | None]:
    """rows as a list of known adapter names or None; AdapterError names the unknown ones and those loaded."""
    if not isinstance(rows, (list, tuple)) or not rows or not all(r is None or isinstance(r, str) for r in rows):
        raise RequestError(f"route() takes a non-empty list with one adapter name (or None) per batch row, got {rows!r}")
    unknown = sorted(r for r in set(rows) - {None} if not any(_held(layer, r) for _, layer in layers))
    if unknown:
        loaded = sorted({n for _, layer in layers
                         for n in [*layer.lora_A, *(layer.stacks.where if layer.stacks else ())]})
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


def _stacks_of(path: str, layer: LoraLayer, refresh: bool) -> AdapterStacks | None:
    """The stacks a layer routes from: its serving stacks, or stacks built from its own adapters (kept while
    stack_key holds); None when it holds no adapter."""
    held = layer.stacks if layer.stacks is not None and layer.stacks.where else None
    if not layer.lora_A:
        return held
    if held is not None:
        raise ConfigError(f"{path} holds adapters both on the layer ({sorted(layer.lora_A)}) and in serving stacks "
                          f"({sorted(held.where)}); serve a model through one of them (the registry's or load_adapter's)")
    old = layer.routing
    if old is not None and old.stacks.key and not refresh and old.stacks.key == stack_key(layer):
        return old.stacks
    return AdapterStacks.build(layer)


def route(model: nn.Module, rows: list[str | None], refresh: bool = False) -> None:
    """Route the next forwards of `model`: batch row i adds adapter rows[i]'s term (None: the base alone).

    Sets `routing` on every LoRA layer. Cheap to call at every step: a layer whose stacks and rows are unchanged
    keeps its Routing, and stacks built from a layer's own adapters are rebuilt only when they changed since the
    last route() (see stack_key), or always with refresh=True. A layer that does not hold rows[i]'s adapter adds
    nothing for that row, as with set_active. Inside rd.disabled(model) every row computes the base.

    Raises:
        AdapterError: a name is not an adapter of the model (the message lists those loaded), or an adapter
            also replaces whole modules (modules_to_save).
        MergeError: an adapter is merged into the base: unmerge(model) first.
        RequestError: rows is not a non-empty list of names and None.
    """
    wrappers = list(named_wrappers(model))
    layers = [(path, w) for path, w in wrappers if isinstance(w, LoraLayer)]
    rows = _check_rows(layers, rows)
    _check_routable(wrappers, layers, rows)
    key = tuple(rows)
    plans: dict[tuple, list[_RankPlan]] = {}  # layers whose stacks place the rows alike share the plans
    for path, layer in layers:
        stacks = _stacks_of(path, layer, refresh)
        if stacks is None:  # a wrapper without adapters computes the base either way
            layer.routing = None
            continue
        old = layer.routing
        if old is not None and old.stacks is stacks and old.version == stacks.version and old.rows == key:
            continue  # the reuse path: same stacks, untouched, same rows
        where = tuple(None if name is None else stacks.where.get(name) for name in key)
        if (where, stacks.device) not in plans:
            plans[where, stacks.device] = _plans(where, stacks.device)
        layer.routing = Routing(stacks, key, plans[where, stacks.device])


def clear_route(model: nn.Module) -> None:
    """Remove the routing from every LoRA layer (and the stacks built from its own adapters): forwards follow
    set_active again."""
    for _, wrapper in named_wrappers(model):
        if isinstance(wrapper, LoraLayer):
            wrapper.routing = None
