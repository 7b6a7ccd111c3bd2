"""The runner: every tensor of the serving engine (the batch's KV cache, its masks and positions).

One batch KV cache holds every running request, left-padded to a common length T:

    keys/values (N, heads, T, head_dim) per layer   mask (N, T): 1 where a row has a real token
    position of row i's next token = its own count of real tokens (so padding never shifts RoPE positions)

A decode step feeds each row its last token (N, 1) and grows the cache by one column. The cache is rebuilt only
when requests join (their prompts are prefilled together, left-padded, then padded on the left to the common
length and concatenated along the batch) or leave (rows selected, then the columns that every remaining row
masks are cut). Each forward is routed (serve.batched_lora.route) so row i adds only its own adapter's term.
A padded position gets an attention weight of exactly zero, so a row's tokens are those it would get alone,
up to float rounding in the batched matmuls.

Sampling is rankdial.sampling's (the one sampler of the server and `rankdial generate`): a row it cannot sample
is marked on its Sequence (failure) and the engine ends that request alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..lora import LoraLayer
from ..lora.inject import named_wrappers
from ..sampling import SamplingParams, sample
from .batched_lora import Routing, route


@dataclass
class Sequence:
    """One request as the runner sees it: its tokens, its adapter, how to sample it."""

    id: str
    adapter: str | None
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far
    failure: str | None = None  # set by sample() when this row's last token could not be sampled


class Runner:
    """Owns the batch KV cache; step() gives every running sequence its next token (see the module docstring)."""

    def __init__(self, model: nn.Module, pad_id: int):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.pad_id = int(pad_id)
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
        self._keep_kw = "logits_to_keep" in params
        self._check_full_attention()
        self.ids: list[str] = []  # row i of every tensor belongs to request ids[i]
        self.cache = None  # transformers DynamicCache, (N, heads, T, head_dim) per layer
        self.mask = None  # (N, T) long
        self.next_pos = None  # (N,) long: each row's next position
        self.last = None  # (N,) long: each row's last token, the next decode input
        self._routed = None  # (rows, [(layer, its Routing, its generation)]) of the last route(): see _route

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, running: list[Sequence]) -> list[int]:
        """One token for every sequence in `running`: rows that left are dropped, those already in the cache
        decode one step, new ones are prefilled and join. Returns the tokens in `running`'s order."""
        present = {s.id for s in running}
        if [i for i in self.ids if i in present] != self.ids:
            self._select([k for k, i in enumerate(self.ids) if i in present])
        if not running:
            return []
        by_id = {s.id: s for s in running}
        old = [by_id[i] for i in self.ids]
        known = set(self.ids)
        new = [s for s in running if s.id not in known]
        logits = []
        if old:
            logits.append(self._decode(old))
        if new:
            logits.append(self._prefill(new))
        tokens = sample(torch.cat(logits), old + new)
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        out = dict(zip(self.ids, tokens))
        return [out[s.id] for s in running]

    def release_all(self) -> None:
        self.ids, self.cache, self.mask, self.next_pos, self.last = [], None, None, None, None

    def _route(self, rows: list[str | None]) -> None:
        """route() the model for these rows, unless it is still routed for exactly them: same rows, every LoRA
        layer still holding the Routing we set and the adapters it had (generation). route() walks every layer
        and every adapter, so calling it at each decode step would cost more than the step's LoRA terms.
        Weights changed in place while serving are not seen: call invalidate_route() after such a change."""
        key = tuple(rows)
        unchanged = self._routed is not None and all(layer.routing is routing and layer.generation == generation
                                                     for layer, routing, generation in self._routed[1])
        if unchanged and self._routed[0] == key:
            return
        if unchanged and set(key) <= set(self._routed[0]):
            self._reslot(key)  # rows left or were reordered, no new adapter: the same stacks, new slots
            return
        route(self.model, rows)
        self._routed = (key, [(layer, layer.routing, layer.generation) for _, layer in named_wrappers(self.model)
                              if isinstance(layer, LoraLayer)])

    def _reslot(self, key: tuple) -> None:
        """What route() would set when every layer keeps its adapters and the rows use only adapters it already
        checked: a Routing per layer on the same stack, with the new rows' slots (route() also re-keys every
        stack, ~50 ms with 128 adapters, which it would find fresh). Layers with the same adapters share one index."""
        slot_maps, indices, routed = {}, {}, []
        for layer, routing, _ in self._routed[1]:
            if routing is None:  # a wrapper without adapters (route() left it unrouted)
                routed.append((layer, None, layer.generation))
                continue
            stack = routing.stack
            slot_of = slot_maps.get(stack.names)
            if slot_of is None:
                slot_of = slot_maps[stack.names] = {name: k for k, name in enumerate(stack.names, start=1)}
            slots = tuple(slot_of.get(name, 0) for name in key)
            device = stack.At.device
            if (slots, device) not in indices:
                indices[slots, device] = torch.tensor(slots, dtype=torch.long, device=device)
            layer.routing = Routing(stack, indices[slots, device], slots)
            routed.append((layer, layer.routing, layer.generation))
        self._routed = (key, routed)

    def invalidate_route(self) -> None:
        """Make the next forward call route() again (after adapter weights were changed in place)."""
        self._routed = None

    def _forward(self, rows: list[str | None], ids, mask, positions, cache) -> torch.Tensor:
        self._route(rows)
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1].float()  # (n, vocab)

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(seqs), 1)], 1)  # (N, T+1)
        logits = self._forward([s.adapter for s in seqs], self.last[:, None], self.mask, self.next_pos[:, None],
                               self.cache)
        self.next_pos = self.next_pos + 1
        return logits

    def _check_full_attention(self) -> None:
        """Refuse at start-up (not at every request) a model whose cache slides: the batch cache keeps every column."""
        from transformers import DynamicCache

        if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=self.model.config).layers):
            raise ConfigError("this model uses sliding-window attention, which the serving runner's batch cache "
                              "does not support; serve a model with full attention (Llama-shaped)")

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        from transformers import DynamicCache

        length = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (length - len(s.prompt)) + s.prompt for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (length - len(s.prompt)) + [1] * len(s.prompt) for s in seqs], device=self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (n, L): a row's first real token is position 0
        cache = DynamicCache(config=self.model.config)
        logits = self._forward([s.adapter for s in seqs], ids, mask, positions, cache)
        self._join(cache, mask, torch.tensor([len(s.prompt) for s in seqs], device=self.device), [s.id for s in seqs])
        return logits

    # -- rebuilding the batch cache -------------------------------------------------------------------
    def _join(self, cache, mask: torch.Tensor, next_pos: torch.Tensor, ids: list[str]) -> None:
        """Append the prefilled rows: both caches padded on the left to the longer length, then concatenated."""
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.ids = cache, mask, next_pos, list(ids)
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(mask, length)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.ids += ids

    def _select(self, rows: list[int]) -> None:
        """Keep only these rows, and cut the leading columns that every kept row masks."""
        if not rows:
            self.release_all()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).nonzero()[0, 0])  # (T,) -> the first column some kept row uses
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.next_pos = self.next_pos.index_select(0, index)
        self.last = self.last.index_select(0, index)
        self.ids = [self.ids[k] for k in rows]


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros on the left of the sequence dimension (-2 for (N, H, T, D) caches, -1 for (N, T) masks)."""
    dim = -2 if t.dim() == 4 else -1
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)
