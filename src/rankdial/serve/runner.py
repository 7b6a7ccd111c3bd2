"""The runner: every tensor of the serving engine (the batch's KV cache, its masks and positions).

One KV cache, preallocated at start-up (SlotCache), holds every running request:

    keys/values (slots, kv_heads, row_tokens, head_dim) per layer    slots = max_batch_size
    slot s: one request's tokens at columns 0..n_s-1, position of its next token = n_s

A request joins by taking a free slot: its prompt is prefilled (new rows together, left-padded) and its keys and
values are written into its slot; it leaves by freeing the slot. The others' cache stays where it is, and the
cache never grows: its bytes are slots x row_tokens, fixed by the flags (`rankdial serve --max-batch`,
`--max-tokens-in-flight`), and a start-up whose cache does not fit the device is refused. A decode step feeds
slots 0..n-1 their last token, writes each new key at its own column and attends over the columns a mask allows;
so that it computes no empty slot, a hole that joining rows do not fill takes the highest row (that one row's
columns copied). Each forward is routed (serve.batched_lora.route) so row i adds
only its own adapter's term. A masked column gets an attention weight of exactly zero, so a row's tokens are
those it would get alone, up to float rounding in the batched matmuls.

Compiled decode (`rankdial serve --compile`, Runner.enable_compile): the decode forward runs through
torch.compile (inductor; mode "reduce-overhead", CUDA graphs, on a GPU) with dynamic shapes, its batch padded to
the next of BUCKETS (capped at the slots; the padding rows are free slots computing a throwaway token at column
0, exactly as a hole does), so one compiled graph serves many batch sizes. The prefill and the eager model stay
the reference: a compile that fails, at the start-up warm-up or at any later step, is reported in one line and
the runner goes on eagerly (a step that failed is rerun eagerly: the cache is written by position, so the rerun
overwrites what the failed one wrote). The routed LoRA runs inside the graph; its routing is Python state the
graph guards on, so a new mix of adapters in the batch recompiles (up to torch._dynamo's recompile limit, past
which that code runs eagerly). Measured on this CPU (2 cores, the embedded 4.5M model, 18 requests of 24
tokens, 4 adapter mixes): compiled 0.49 s per run against eager 0.23-0.26 s, after ~190 s of compiling five
variants: so it is off by default (COMPILE_OFF_REASON). The CUDA path (reduce-overhead, the cache written in
place inside the graph) has not been run on a GPU yet.

Sampling is rankdial.sampling's (the one sampler of the server and `rankdial generate`): a row it cannot sample
is marked on its Request (failure) and the engine ends that request alone.
"""

from __future__ import annotations

import inspect
import sys
import time

import torch
from torch import nn

from ..errors import ConfigError, RequestError
from ..sampling import sample
from .batched_lora import route
from .request import Request


class SlotCache:
    """The batch KV cache, preallocated: per layer keys and values (slots, kv_heads, row_tokens, head_dim).

    Slot s holds one request's tokens at columns 0..n_s-1, written in place: a prefill writes the prompt's keys and
    values into its rows' slots (and its attention reads only the prompt's own), a decode step writes each row's
    new token at its column n_s and attends over columns 0..max(n)+1 with a mask. Passed to the model as its cache
    (transformers calls update(keys, values, layer_idx) in every attention layer); the runner sets what the next
    forward writes (prefill / decode) before it runs."""

    def __init__(self, model: nn.Module, slots: int, row_tokens: int, device: torch.device):
        config = model.config
        self.layers = int(config.num_hidden_layers)
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        dtype = model.get_input_embeddings().weight.dtype
        self.shape = (slots, heads, row_tokens, head_dim)
        self._alloc(dtype, device)
        self._plan = None  # ("prefill", [(row, slot, length)], L) or ("decode", rows index, columns index, span)

    @staticmethod
    def bytes_needed(model: nn.Module, slots: int, row_tokens: int) -> int:
        config = model.config
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        size = model.get_input_embeddings().weight.element_size()
        return 2 * int(config.num_hidden_layers) * slots * heads * row_tokens * head_dim * size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _alloc(self, dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: a masked column still enters softmax(QKᵀ)V with weight 0, and 0 x NaN would be NaN
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(self.layers)]

    def prefill(self, rows: list[tuple[int, int, int]], length: int) -> None:
        """The next forward prefills `length` left-padded tokens; (row, slot, prompt length) per new row."""
        self._plan = ("prefill", rows, length)

    def decode(self, lengths: torch.Tensor, span: int) -> None:
        """The next forward decodes one token for slots 0..n-1, written at column lengths[s]; attends 0..span-1."""
        n = lengths.shape[0]
        self._plan = ("decode", torch.arange(n, device=lengths.device), lengths, span)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys.dtype != key_states.dtype:  # a base whose attention computes in another dtype than its embeddings
            self._alloc(key_states.dtype, keys.device)
            keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._plan[0] == "prefill":
            _, rows, length = self._plan
            for row, slot, n in rows:  # (n_new, H, L, D): a row's prompt is its last n columns
                keys[slot, :, :n] = key_states[row, :, length - n:]
                values[slot, :, :n] = value_states[row, :, length - n:]
            return key_states, value_states  # a prompt attends only to itself
        _, rows, columns, span = self._plan
        keys[rows, :, columns] = key_states[:, :, 0]  # (n, H, D) each at its own column
        values[rows, :, columns] = value_states[:, :, 0]
        n = rows.shape[0]
        return keys[:n, :, :span], values[:n, :, :span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly (position_ids)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: the driver's free bytes; CPU: MemAvailable), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # decode batch sizes a compiled step pads to
COMPILE_OFF_REASON = ("torch.compile is off by default: on a CPU the compiled decode step measured ~2x slower than "
                      "eager (the 4.5M default model; minutes of compiling) and each new adapter mix recompiles; "
                      "pass --compile to try it (on a GPU it uses CUDA graphs, not measured here)")


def bucket(n: int, slots: int) -> int:
    """The decode batch a compiled step runs for n rows: the next of BUCKETS, capped at the slots (a batch past
    the largest bucket runs at its own size)."""
    return min(next((b for b in BUCKETS if b >= n), n), max(slots, n))


def compile_model(model: nn.Module):
    """torch.compile over the model's forward: inductor, dynamic shapes; CUDA graphs on a GPU."""
    device = next(model.parameters()).device
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model, dynamic=True, mode=mode)


class Runner:
    """Owns the batch KV cache (a SlotCache); step() gives every running sequence its next token.

    Args:
        model: the served model (Llama-shaped, full attention).
        pad_id: the token fed to padding.
        slots: the most rows at once (the engine's max_batch_size, `rankdial serve --max-batch`).
        row_tokens: the most tokens one row holds, prompt and completion (default: the model's context).

    Raises:
        ConfigError: a model with sliding-window attention, or a KV cache of slots x row_tokens that does not fit
            the device's free memory (naming the flags to lower).
    """

    def __init__(self, model: nn.Module, pad_id: int, *, slots: int = 32, row_tokens: int | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.pad_id = int(pad_id)
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
        self._keep_kw = "logits_to_keep" in params
        self._check_full_attention()
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.slots, self.row_tokens = slots, int(row_tokens or context or 2048)
        self._check_fits()
        self.cache = SlotCache(model, slots, self.row_tokens, self.device)
        self.slot_ids: list[str | None] = [None] * slots  # slot -> the request it holds
        self.slot_of: dict[str, int] = {}
        self.lengths = [0] * slots  # tokens held per slot
        self.last = torch.full((slots,), self.pad_id, dtype=torch.long, device=self.device)  # next decode input
        self._compiled = None  # the compiled model (enable_compile), None: eager
        self.compile_status = "off"  # "off", "on" or "failed: <the error's first line>"

    def enable_compile(self, log=None) -> float:
        """Compile the decode step and warm it up (a decode of free slots at the buckets 1 and 2: the size-1 and
        the dynamic graph), before any request. Returns the seconds it took. A failure is reported in one line
        through `log` (default: stderr) and leaves the runner eager."""
        t0 = time.perf_counter()
        try:
            self._compiled = compile_model(self.model)
            for n in sorted({bucket(1, self.slots), bucket(2, self.slots)}):
                self._warm(n)
            self.compile_status = "on"
        except Exception as err:  # noqa: BLE001 - any compile failure: eager is the reference, and it works
            self._compile_failed(err, log)
        return time.perf_counter() - t0

    def _warm(self, n: int) -> None:
        """One compiled decode over free slots 0..n-1 (column 0, base rows); nothing held is touched."""
        assert not self.slot_of, "warm-up runs before any request"
        lengths = torch.zeros(n, dtype=torch.long, device=self.device)
        self.cache.decode(lengths, 1)
        mask = torch.zeros((n, 1, 1, 1), dtype=self.cache.keys[0].dtype, device=self.device)
        self._forward([None] * n, self.last[:n, None], mask, lengths[:, None])

    def _compile_failed(self, err: BaseException, log=None) -> None:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        self._compiled = None
        self.compile_status = f"failed: {type(err).__name__}: {first}"
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"rankdial serve: warning: torch.compile failed ({type(err).__name__}: {first}); decoding eagerly")

    @property
    def ids(self) -> list[str]:
        """The requests held, in slot order."""
        return [i for i in self.slot_ids if i is not None]

    def _check_fits(self) -> None:
        need = SlotCache.bytes_needed(self.model, self.slots, self.row_tokens)
        free = available_bytes(self.device)
        if free is not None and need > 0.9 * free:  # the rest of a step (activations, logits) needs room too
            raise ConfigError(f"the KV cache for {self.slots} rows x {self.row_tokens} tokens needs {need / 2**20:.0f} "
                              f"MiB, more than the {free / 2**20:.0f} MiB free on {self.device}; lower --max-batch "
                              f"(max_batch_size) or --max-tokens-in-flight (max_tokens_in_flight)")

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, running: list[Request]) -> list[int]:
        """One token for every sequence in `running`: rows that left free their slots, those already held decode
        one step, new ones are prefilled into free slots. Returns the tokens in `running`'s order."""
        by_id = {s.id: s for s in running}
        for rid in [i for i in self.slot_of if i not in by_id]:
            self._leave(rid)
        if not running:
            return []
        new = [s for s in running if s.id not in self.slot_of]
        if len(self.slot_of) + len(new) > self.slots:
            raise RequestError(f"{len(self.slot_of) + len(new)} rows at once, more than the runner's {self.slots} "
                               "slots (max_batch_size); schedule at most that many")
        self._compact(len(new))
        out: dict[str, int] = {}
        if self.slot_of:
            old = sorted(self.slot_of.items(), key=lambda kv: kv[1])
            logits = self._decode(by_id)
            out.update(zip((i for i, _ in old), self._sample(logits[[s for _, s in old]], [by_id[i] for i, _ in old])))
        if new:
            out.update(zip((s.id for s in new), self._sample(self._prefill(new), new)))
        return [out[s.id] for s in running]

    def _sample(self, logits: torch.Tensor, seqs: list[Request]) -> list[int]:
        tokens = sample(logits, seqs)
        slots = [self.slot_of[s.id] for s in seqs]
        self.last[slots] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return tokens

    def release_all(self) -> None:
        for rid in list(self.slot_of):
            self._leave(rid)

    def _compact(self, joining: int) -> None:
        """Keep the rows in slots 0..n-1 (a decode step computes every slot below the highest held one): the
        holes that the joining rows will not fill take the highest rows, one row's columns copied each."""
        held = len(self.slot_of) + joining
        holes = [k for k in range(held) if self.slot_ids[k] is None][joining:]  # the lowest ones go to new rows
        high = sorted((s for s in self.slot_of.values() if s >= held), reverse=True)
        for src, dst in zip(high, holes):
            n = self.lengths[src]
            for keys, values in zip(self.cache.keys, self.cache.values):
                keys[dst, :, :n] = keys[src, :, :n]
                values[dst, :, :n] = values[src, :, :n]
            rid = self.slot_ids[src]
            self.slot_ids[dst], self.slot_of[rid], self.lengths[dst] = rid, dst, n
            self.slot_ids[src], self.lengths[src] = None, 0
            self.last[dst] = self.last[src]

    def _leave(self, rid: str) -> None:
        """Free the row's slot: nothing is copied (its columns are overwritten by the next request there)."""
        slot = self.slot_of.pop(rid)
        self.slot_ids[slot], self.lengths[slot] = None, 0

    def _forward(self, rows: list[str | None], ids, mask, positions) -> torch.Tensor:
        route(self.model, rows)  # cheap when the rows and adapters are those of the last step
        kwargs = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        if self._compiled is not None and self.cache._plan[0] == "decode":  # the compiled step decodes only
            try:
                out = self._compiled(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
                return out.logits[:, -1].float()
            except Exception as err:  # noqa: BLE001 - rerun eagerly: the cache is written by position
                if not self.slot_of:
                    raise  # the warm-up: enable_compile reports it
                self._compile_failed(err)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1].float()  # (n, vocab)

    def _decode(self, by_id: dict[str, Request]) -> torch.Tensor:
        """One token for slots 0..n-1 (n past the last held slot; a free slot among them computes a throwaway row
        at column 0). The logits, one row per slot."""
        n = 1 + max(self.slot_of.values())
        if self._compiled is not None:  # pad to the bucket: free slots, each a throwaway row at column 0
            n = bucket(n, self.slots)
        lengths = torch.tensor(self.lengths[:n], dtype=torch.long, device=self.device)  # (n,) the write columns
        span = 1 + max(self.lengths[:n])
        if span > self.row_tokens:
            raise RequestError(f"a row would hold {span} tokens, more than the runner's {self.row_tokens} per row "
                               "(max_tokens_in_flight / the context)")
        self.cache.decode(lengths, span)
        columns = torch.arange(span, device=self.device)
        mask = _additive(columns[None, :] <= lengths[:, None], self.cache.keys[0].dtype)[:, None, None, :]  # (n,1,1,T)
        rows = [by_id[i].adapter if i is not None else None for i in self.slot_ids[:n]]
        logits = self._forward(rows, self.last[:n, None], mask, lengths[:, None])
        for s in range(n):
            if self.slot_ids[s] is not None:
                self.lengths[s] += 1
        return logits

    def _check_full_attention(self) -> None:
        """Refuse at start-up (not at every request) a model whose cache slides: the batch cache keeps every column."""
        from transformers import DynamicCache

        if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=self.model.config).layers):
            raise ConfigError("this model uses sliding-window attention, which the serving runner's batch cache "
                              "does not support; serve a model with full attention (Llama-shaped)")

    def _prefill(self, seqs: list[Request]) -> torch.Tensor:
        """The new rows' prompts, left-padded to a common length, in one forward; each row's keys and values go
        into a free slot. The logits of each row's last prompt token."""
        length = max(len(s.prompt) for s in seqs)
        if length + 1 > self.row_tokens:
            raise RequestError(f"a prompt of {length} tokens leaves no room in the runner's {self.row_tokens} tokens "
                               "per row (max_tokens_in_flight / the context)")
        free = [k for k, i in enumerate(self.slot_ids) if i is None]
        plan = []
        for row, (s, slot) in enumerate(zip(seqs, free)):
            self.slot_ids[slot], self.slot_of[s.id], self.lengths[slot] = s.id, slot, len(s.prompt)
            plan.append((row, slot, len(s.prompt)))
        ids = torch.tensor([[self.pad_id] * (length - len(s.prompt)) + s.prompt for s in seqs], device=self.device)
        real = torch.tensor([[0] * (length - len(s.prompt)) + [1] * len(s.prompt) for s in seqs], device=self.device)
        positions = (real.cumsum(1) - 1).clamp(min=0)  # (n, L): a row's first real token is position 0
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        mask = _additive(causal[None] & real[:, None, :].bool(), self.cache.keys[0].dtype)[:, None]  # (n, 1, L, L)
        self.cache.prefill(plan, length)
        return self._forward([s.adapter for s in seqs], ids, mask, positions)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one every attention implementation takes: 0 or dtype's min."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
