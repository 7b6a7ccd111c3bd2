"""The routed adapters' storage: per LoRA layer, one stack per rank (punica's stacked layout, without padding).

    RankStack      every adapter of rank r in one layer: Aᵀ (K, d_in, r), Bᵀ (K, r, d_out), s per slot
    AdapterStacks  one layer's RankStacks, `where` each adapter sits (rank, slot), a `version` for stale routes

For the serving registry these stacks are the adapters' only copy (written straight from the file); for a model
whose adapters live on its layers, serve.batched_lora.route() builds them from lora_A / lora_B. Their bytes are
what they hold (`nbytes`): exactly r·(d_in + d_out) per slot in the adapters' dtype, free slots included.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from ..lora import LoraLayer


class RankStack:
    """Every adapter of rank r in one layer: slot k holds At[k] = Aᵀ (d_in, r), Bt[k] = Bᵀ (r, d_out) and s[k].

    Slots are reused when adapters leave; a full stack grows by half its capacity (at least one slot), so loading
    K adapters copies O(K) slots in all. `trim()` gives back the free slots' memory."""

    def __init__(self, r: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype, capacity: int = 1):
        self.r, self.d_in, self.d_out = r, d_in, d_out
        # free slots are never read (no row routes to them), so they need no zeros
        self.At = torch.empty(capacity, d_in, r, device=device, dtype=dtype)
        self.Bt = torch.empty(capacity, r, d_out, device=device, dtype=dtype)
        self.names: list[str | None] = [None] * capacity  # per slot; None: free
        self.scale: list[float] = [0.0] * capacity

    @property
    def slot_bytes(self) -> int:
        return self.r * (self.d_in + self.d_out) * self.At.element_size()

    @property
    def nbytes(self) -> int:
        return len(self.names) * self.slot_bytes

    def growth(self, minimal: bool = False) -> int:
        """How many slots the next put() allocates: 0 when a slot is free, else half the capacity (or one, minimal)."""
        return 0 if None in self.names else 1 if minimal else max(1, len(self.names) // 2)

    def put(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float, minimal: bool = False) -> int:
        """Copy A (r, d_in) and B (d_out, r) into a free slot (growing the stack if none is); the slot."""
        grow = self.growth(minimal)
        if grow:
            self._resize(len(self.names) + grow)
        k = self.names.index(None)
        self.At[k].copy_(A.detach().t())  # detached: copy_ into the stack never records autograd history
        self.Bt[k].copy_(B.detach().t())
        self.names[k], self.scale[k] = name, float(scale)
        return k

    def free(self, slot: int) -> None:
        self.names[slot], self.scale[slot] = None, 0.0

    def trim(self) -> dict[str, int]:
        """Keep only the occupied slots (moved to the front, in order); their new slots by name."""
        keep = [k for k, n in enumerate(self.names) if n is not None]
        if len(keep) < len(self.names):
            index = torch.tensor(keep, dtype=torch.long, device=self.At.device)
            self.At, self.Bt = self.At.index_select(0, index), self.Bt.index_select(0, index)
            self.names, self.scale = [self.names[k] for k in keep], [self.scale[k] for k in keep]
        return {n: k for k, n in enumerate(self.names)}

    def _resize(self, capacity: int) -> None:
        old = len(self.names)
        At = self.At.new_empty(capacity, self.d_in, self.r)
        Bt = self.Bt.new_empty(capacity, self.r, self.d_out)
        At[:old], Bt[:old] = self.At, self.Bt
        self.At, self.Bt = At, Bt
        self.names += [None] * (capacity - old)
        self.scale += [0.0] * (capacity - old)


class AdapterStacks:
    """One layer's routed adapters, one RankStack per rank; `where` maps a name to its (rank, slot).

    `version` changes whenever a slot is written or moved, so a Routing made before knows it is stale."""

    def __init__(self, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype, key: tuple = ()):
        self.d_in, self.d_out, self.device, self.dtype = d_in, d_out, device, dtype
        self.stacks: dict[int, RankStack] = {}
        self.where: dict[str, tuple[int, int]] = {}
        self.version = 0
        self.key = key  # built from a layer's own adapters: what they were (stack_key); () for the registry's

    @classmethod
    def for_layer(cls, layer: LoraLayer) -> AdapterStacks:
        """Empty stacks on the layer's adapter device and dtype (fp32 unless the base computes in fp32/fp64)."""
        device, dtype = layer._base_device_dtype()
        return cls(layer.in_features, layer.out_features, device, dtype)

    @classmethod
    def build(cls, layer: LoraLayer) -> AdapterStacks:
        """Stacks holding a copy of the adapters the layer holds itself (lora_A / lora_B)."""
        ref = layer.lora_A[next(iter(layer.lora_A))].weight
        stacks = cls(layer.in_features, layer.out_features, ref.device, ref.dtype, stack_key(layer))
        for name in layer.lora_A:
            stacks.add(name, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
        return stacks

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stacks.values())

    @property
    def slack(self) -> bool:
        """Whether some slot is free (trim() would give memory back)."""
        return any(None in s.names for s in self.stacks.values())

    def growth_bytes(self, r: int, minimal: bool = False) -> int:
        """The bytes that adding a rank-r adapter would allocate (minimal: growing a full stack by one slot)."""
        stack = self.stacks.get(r)
        if stack is None:
            return r * (self.d_in + self.d_out) * torch.empty((), dtype=self.dtype).element_size()
        return stack.growth(minimal) * stack.slot_bytes

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float, minimal: bool = False) -> None:
        """Copy adapter `name` in: A (r, d_in), B (d_out, r), its scaling s. AdapterError for a taken name."""
        if name in self.where:
            raise AdapterError(f"adapter {name!r} is already in this layer's stacks; remove it first")
        r = A.shape[0]
        if r not in self.stacks:
            self.stacks[r] = RankStack(r, self.d_in, self.d_out, self.device, self.dtype)
        self.where[name] = (r, self.stacks[r].put(name, A, B, scale, minimal))
        self.version += 1

    def remove(self, name: str) -> None:
        r, slot = self.where.pop(name)
        stack = self.stacks[r]
        stack.free(slot)
        if all(n is None for n in stack.names):
            del self.stacks[r]  # the rank's last adapter: its memory goes back at once
        self.version += 1

    def trim(self) -> None:
        """Give back every free slot's memory (slots move: routes made before are stale)."""
        for r, stack in self.stacks.items():
            self.where.update({n: (r, k) for n, k in stack.trim().items()})
        self.version += 1

    def rank(self, name: str) -> int:
        return self.where[name][0]

    def weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r, d_in), B (d_out, r), s) of adapter `name`, views into the stacks."""
        r, k = self.where[name]
        stack = self.stacks[r]
        return stack.At[k].t(), stack.Bt[k].t(), stack.scale[k]


def stack_key(layer: LoraLayer) -> tuple:
    """What stacks built from a layer's own adapters depend on: the layer's adapter generation (bumped by add/delete,
    so an adapter unloaded and loaded again under the same name is new), each weight's storage, dtype, device and
    version counter (autograd's in-place ops and copy_ bump it), and the scaling. Updates that bypass the version
    counter (a fused optimizer step, writes through .data) are not seen: call route(..., refresh=True) after them."""
    B = layer.lora_B._modules

    def weight(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.dtype, t.device, t._version

    return (layer.generation,) + tuple((n, weight(a._parameters["weight"]), weight(B[n]._parameters["weight"]),
                                        layer.scaling[n]) for n, a in layer.lora_A._modules.items())
