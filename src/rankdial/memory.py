"""The memory bill of a fine-tuning run, planned term by term before anything is loaded.

A Llama-shaped decoder (a preset, a config.json, or its dimensions) and a method (full, LoRA, QLoRA) give the
bytes of the stored weights, the NF4 quantization constants, the adapters, their gradients, the optimizer state,
the activations autograd keeps for backward, the logits and loss buffers (a term of their own), the
workspace (QLoRA's one dequantized weight, or LoRA's one merged W₀ + s·BA in float32 training on many rows), and
which accelerator sizes
(16/24/40/48/80 GB) the peak fits. Sources: Hu et al. 2021 (LoRA, arXiv:2106.09685) for the adapter
arithmetic r·(d_in + d_out); Dettmers et al. 2023 (QLoRA, arXiv:2305.14314) for NF4 at 4.127 bits per weight;
Korthikanti et al. 2022 (arXiv:2205.05198) for counting activations tensor by tensor, here redone for what
transformers' LlamaDecoderLayer and PyTorch's SDPA actually save (see `layer_activation_bytes`).

The planner is checked against measurement: rankdial.memory_measure.measure_training_peak (run it in a fresh
process, e.g. `python -m rankdial.memory_measure measure '{"model": "default", "method": "lora"}'`) trains a few
steps on CPU and reports the resident-memory peak minus a baseline taken after the imports and a warm-up step on a
tiny model. `peak_memory_mb` is the one reader of a process's own peak (training, benchmarks).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import is_positive_int
from .errors import ConfigError

MIB = 2**20  # bytes in a MiB: the one home of this constant (rankdial reports memory and files in MiB)

__all__ = ["estimate_memory", "MemoryPlan", "LlamaShape", "model_shape", "lora_params", "nf4_bytes",
           "layer_activation_bytes", "peak_memory_mb", "PRESETS"]

GB = 10 ** 9
ACCELERATOR_GB = (16, 24, 40, 48, 80)
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw-8bit")
SHARDINGS = ("ddp", "fsdp")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # QLoRA's blocks: 64 weights per absmax, 256 absmax per fp32 scale
ADAM8_BLOCK = 256  # bitsandbytes' 8-bit optimizers: one fp32 absmax per 256 state values

# Llama-2's published shapes (Touvron et al. 2023, Table 1 and the released config.json files).
PRESETS = {
    "llama-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000, tied=False),
    "llama-13b": dict(hidden=5120, layers=40, heads=40, kv_heads=40, ffn=13824, vocab=32000, tied=False),
    "llama-70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=32000, tied=False),
}


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that decide a Llama-shaped decoder's memory (head_dim defaults to hidden // heads)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None
    name: str = "custom"
    dtype: str = "bf16"  # of the stored weights: a config.json's own, bf16 for presets and dims

    def __post_init__(self):
        problems = [f"{k} must be a positive integer, got {getattr(self, k)!r}"
                    for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab")
                    if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool) or getattr(self, k) <= 0]
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
                                          or self.head_dim <= 0):
            problems.append(f"head_dim must be a positive integer or None, got {self.head_dim!r}")
        if not problems and self.head_dim is None and self.hidden % self.heads:
            problems.append(f"heads={self.heads} does not divide hidden={self.hidden}; pick a head count that "
                            f"divides it (e.g. {_divisor_near(self.hidden, self.heads)}) or give head_dim")
        if not problems and self.heads % self.kv_heads:
            problems.append(f"kv_heads={self.kv_heads} does not divide heads={self.heads}; grouped-query attention "
                            f"needs heads to be a multiple of kv_heads (e.g. {_divisor_near(self.heads, self.kv_heads)})")
        if problems:
            raise ConfigError(f"model {self.name}: " + "; ".join(problems))

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear layers as name -> (d_in, d_out)."""
        h, q, kv, f = self.hidden, self.heads * self.dim_head, self.kv_heads * self.dim_head, self.ffn
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears().values())

    @property
    def total_params(self) -> int:
        """Embedding, decoder layers (linears + two RMSNorm weights), final norm, and an untied output head."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.linear_params + (2 * self.layers + 1) * self.hidden


def merge_first(n: int, d_in: int, d_out: int) -> bool:
    """Whether a LoRA layer in training (lora.layer._FusedLora, float32 weights) computes x·(W₀ + s·BA)ᵀ rather than
    x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ for n rows: forming the merged weight costs r·d_in·d_out multiply-adds (plus one d_out × d_in
    buffer for the call: the plan's workspace), the two low-rank products n·r·(d_in + d_out) plus a pass over the
    (n, d_out) output (and in backward the same again for dL/dx); so merge once the rows outnumber
    d_in·d_out / (d_in + d_out). On the default model's 256/768-wide layers and ~1000 rows a step (threshold 128-192
    rows) that is ~5% of a training step (bench_train.py); a 1024/4096-wide layer at 128 rows stays unmerged."""
    return n * (d_in + d_out) > d_in * d_out


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def lora_params(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters LoRA adds to one (d_in -> d_out) linear: A is (r, d_in), B is (d_out, r)."""
    if not is_positive_int(r) or r > min(d_in, d_out):
        raise ConfigError(f"rank r must be an integer in 1..min(d_in, d_out) = 1..{min(d_in, d_out)} for a "
                          f"{d_in}x{d_out} linear, got {r!r}; typical: 8-64")
    return r * (d_in + d_out)


def model_shape(model: str | Path | dict | LlamaShape = "default") -> LlamaShape:
    """A LlamaShape from a preset name, "default" (the embedded model), a config.json (or its folder), or dims."""
    if isinstance(model, LlamaShape):
        return model
    if not isinstance(model, (str, Path, dict)):
        raise ConfigError(f"model must be a preset name ({', '.join(PRESETS)}, \"default\"), a config.json path or "
                          f"a dict of dims, got {type(model).__name__}")
    if isinstance(model, dict):
        fields = LlamaShape.__dataclass_fields__
        unknown = [k for k in model if k not in fields]
        missing = [k for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab") if k not in model]
        if unknown or missing:
            hints = [f"{k!r}" + (f" (did you mean {near[0]!r}?)" if (near := difflib.get_close_matches(k, fields, 1))
                                 else "") for k in unknown]
            raise ConfigError(f"a model given by its dimensions needs hidden, layers, heads, kv_heads, ffn and vocab"
                              f"{'; missing ' + ', '.join(missing) if missing else ''}"
                              f"{'; unknown ' + ', '.join(hints) if hints else ''}")
        return LlamaShape(**{"name": "custom", **model})
    if str(model) == "default":
        from .models import default_model_path

        return shape_from_config(default_model_path() / "config.json", name="default")
    if str(model) in PRESETS:
        return LlamaShape(name=str(model), **PRESETS[str(model)])
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return shape_from_config(path)
    names = ["default", *PRESETS]
    near = difflib.get_close_matches(str(model), names, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ConfigError(f"unknown model {str(model)!r}: not a preset and no config.json there; {hint}"
                      f"give one of {', '.join(names)}, a config.json path, or dims (hidden, layers, heads, ...)")


CONFIG_KEYS = {"hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
               "intermediate_size": "ffn", "vocab_size": "vocab"}


def shape_from_config(path: Path, name: str | None = None) -> LlamaShape:
    """Read a Hugging Face config.json of a Llama-shaped causal LM (refusing what is not one, naming the gap)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path} as a JSON model config: {err}") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} is not a model config (a JSON object); give a Hugging Face config.json")
    missing = [k for k in CONFIG_KEYS if not isinstance(cfg.get(k), int)]
    archs = cfg.get("architectures") or []
    not_causal = archs and not any(str(a).endswith("ForCausalLM") for a in archs)
    if missing or not_causal:
        what = (f"it has no {', '.join(missing)}" if missing else "") + \
               ("; " if missing and not_causal else "") + (f"its architectures {archs} are not a causal LM" if not_causal else "")
        raise ConfigError(f"{path} is not a Llama-shaped causal LM config: {what}; give a Llama/Mistral-style "
                          "config.json (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, "
                          "vocab_size) or the dimensions directly")
    dims = {v: cfg[k] for k, v in CONFIG_KEYS.items()}
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "fp32")
    return LlamaShape(**dims, kv_heads=cfg.get("num_key_value_heads") or dims["heads"],
                      tied=bool(cfg.get("tie_word_embeddings", False)), head_dim=cfg.get("head_dim"),
                      name=name or str(path), dtype=DTYPE_ALIASES.get(dtype, dtype))


@dataclass
class MemoryPlan:
    """A run's memory, term by term, in bytes. `total_bytes` is the planned peak (see estimate_memory)."""

    model: str
    method: str
    settings: dict
    weights: int
    quant_constants: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    workspace: int
    trainable_params: int
    total_params: int
    total_bytes: int = 0
    fits: list[int] = field(default_factory=list)
    gathered: int = 0  # FSDP: weights whole while in use (the root's, the running layer's); 0 unsharded

    @property
    def weights_bytes(self) -> int:
        """The stored base model: dense weights, or NF4 codes plus their constants."""
        return self.weights + self.quant_constants

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params

    def to_dict(self) -> dict:
        return {**asdict(self), "weights_bytes": self.weights_bytes, "trainable_share": self.trainable_share}

    def terms(self) -> dict[str, int]:
        """{term: bytes} in reading order (the peak is not their plain sum: see estimate_memory)."""
        return {"weights": self.weights, "quant constants": self.quant_constants, "adapters": self.adapters,
                "gradients": self.gradients, "optimizer state": self.optimizer, "activations": self.activations,
                "logits + loss": self.logits, "workspace": self.workspace, "gathered (fsdp)": self.gathered}

    def __str__(self) -> str:
        rows = list(self.terms().items())
        per = self.settings.get("processes", 1)
        lines = [f"{self.method} on {self.model}  "
                 + " ".join(f"{k}={v}" for k, v in self.settings.items()),
                 f"trainable {self.trainable_params:,} of {self.total_params:,} ({100 * self.trainable_share:.2f}%)"]
        lines += [f"  {name:<18} {b / GB:10.3f} GB" for name, b in rows if b]
        lines.append(f"  {'peak (planned)':<18} {self.total_bytes / GB:10.3f} GB"
                     + (f" per process, {per} processes" if per > 1 else ""))
        fits = ", ".join(f"{g} GB" for g in self.fits) or f"none of {', '.join(map(str, ACCELERATOR_GB))} GB"
        lines.append(f"fits on: {fits}" + (" (each process's card)" if per > 1 else ""))
        return "\n".join(lines)


def _dtype(value: str, what: str) -> int:
    name = DTYPE_ALIASES.get(str(value), str(value))
    if name not in DTYPE_BYTES:
        raise ConfigError(f"{what} {value!r} is not a known dtype; give one of fp32, bf16, fp16")
    return DTYPE_BYTES[name]


def _targets(targets) -> tuple[str, ...]:
    if targets == "all-linear":
        return LLAMA_LINEARS
    if isinstance(targets, str) and "," in targets:
        raise ConfigError(f"targets {targets!r} is one string; give a list of names, e.g. "
                          f"{[t.strip() for t in targets.split(',') if t.strip()]}, or \"all-linear\"")
    if not isinstance(targets, (str, list, tuple)) or not all(isinstance(t, str) for t in
                                                               ([targets] if isinstance(targets, str) else targets)):
        raise ConfigError(f"targets must be \"all-linear\" or a list of Llama linear names ({', '.join(LLAMA_LINEARS)}), "
                          f"got {targets!r}")
    names = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in names if t not in LLAMA_LINEARS]
    if bad or not names:
        near = {t: difflib.get_close_matches(t, LLAMA_LINEARS, n=1) for t in bad}
        hints = "; ".join(f"{t!r} (did you mean {n[0]!r}?)" if n else repr(t) for t, n in near.items())
        raise ConfigError(f"targets {hints or 'is empty'}: give \"all-linear\" or Llama linear names from "
                          f"{', '.join(LLAMA_LINEARS)}")
    return tuple(dict.fromkeys(names))


def _positive(name: str, value) -> None:
    if not is_positive_int(value):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value, choices) -> None:
    if name == "method" and value == "dora":
        raise ConfigError("method 'dora' is not planned separately: DoRA is LoRA (use_dora) plus a magnitude vector "
                          "per output and one more weight-sized pass; plan method='lora' for a close lower bound")
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        raise ConfigError(f"{name} {value!r} is unknown; give one of {', '.join(choices)}"
                          + (f" (did you mean {near[0]!r}?)" if near else ""))


def nf4_bytes(numel: int) -> tuple[int, int]:
    """(codes, constants) of one weight in NF4 with double quantization (QLoRA §2): 4 bits per weight; per
    64-weight block one 8-bit absmax; per 256 blocks one fp32 scale; one fp32 offset and the 256-entry fp32
    code book per layer as rankdial stores them. 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2), blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 + 4 * 256


def layer_activation_bytes(s: LlamaShape, method: str, targets: tuple[str, ...], rank: int, e: int, a: int,
                           first: bool = False) -> int:
    """Bytes one decoder layer leaves saved for backward, per token (transformers' LlamaDecoderLayer, SDPA).

    e: bytes of an activation (the compute dtype); a: bytes of an adapter weight. Counted tensor by tensor as
    autograd saves them (after Korthikanti et al. 2022, redone for this layer); views share storage.
    """
    h, q, kv, f = s.hidden, s.heads * s.dim_head, s.kv_heads * s.dim_head, s.ffn
    full = method == "full"
    trained = set(LLAMA_LINEARS) if full else set(targets)
    norm_in = 4 * h + 4  # RMSNorm upcasts its input to fp32 and saves it, with rsqrt(mean x²) per token
    b = norm_in * (1 if first and not full else 2)  # layer 1's input is a frozen embedding's: no grad, not saved
    b += 2 * h * e if full else 0  # the normalized x, saved by the trainable norm weight's product
    b += (2 * q + 2 * kv) * e + 4 * s.heads  # SDPA saves q and k after RoPE, v, its output, fp32 log-sum-exp
    b += 3 * f * e  # SwiGLU keeps gate(x), up(x) and silu(gate(x)) for silu's and the product's backward
    inputs = {"norm1": h if trained & {"q_proj", "k_proj", "v_proj"} else 0,
              "norm2": h if trained & {"gate_proj", "up_proj"} else 0,
              "act": f if "down_proj" in trained else 0}  # a trained linear saves its input (o_proj's: SDPA's output)
    b += sum(inputs.values()) * e
    if not full:
        b += len(targets) * rank * a  # x·Aᵀ of each adapter, for dL/dB
        if a != e:  # each adapter casts its input to the adapter dtype (no autocast) and A saves that copy
            b += sum(s.linears()[t][0] for t in targets) * a
    return b


def estimate_memory(model="default", method: str = "lora", rank: int = 16, targets="all-linear",
                    batch_size: int = 1, seq_len: int = 512, dtype: str | None = None, adapter_dtype: str = "fp32",
                    gradient_checkpointing: bool | None = None, optimizer: str = "adamw", processes: int = 1,
                    sharding: str = "ddp", loss_chunk: int = 0, merged_weight: bool = True) -> MemoryPlan:
    """Plan the memory of fine-tuning a Llama-shaped model; returns a MemoryPlan (bytes per term).

    model: a preset ("llama-7b", "llama-13b", "llama-70b": Llama-2's shapes), "default" (the embedded model),
    a config.json path or its folder, a dict of dims (hidden, layers, heads, kv_heads, ffn, vocab, tied,
    head_dim) or a LlamaShape. dtype: of the weights and activations (fp32/bf16/fp16; default: the config's,
    bf16 for presets and dims); QLoRA keeps every decoder linear in NF4 and computes in dtype.
    gradient_checkpointing: None follows the method's recipe: on for QLoRA (Dettmers et al. train with it),
    off for full and LoRA. loss_chunk: rows of logits the loss computes at once (rankdial.train.loss, what
    `rankdial train` does by default with 1024); 0 plans the plain loss over the whole logits tensor.
    merged_weight: whether LoRA's training forward may form W₀ + s·BA (float32 weights and adapters on many rows,
    merge_first; rankdial's fused path, which LoRA dropout or autocast turn off): the workspace then holds the
    largest such weight for the call. False plans none (`rankdial train` passes it for bf16 or dropout runs).

    total_bytes is the planned peak of the steady state (second step on): weights, constants, adapters and
    optimizer state stay; backward frees a layer's activations as it writes that layer's gradients, so the
    peak holds the larger of all gradients and (activations + logits + workspace + the output head's gradient,
    written first). What it does not count: the interpreter, imported libraries and their one-time buffers,
    the tokenizer and data (constant in the model's size), and allocator slack.

    processes, sharding: the plan is per process. "ddp" (and any run on one process) holds the whole model in
    each. "fsdp" with N processes (FSDP2, rankdial's sharding="fsdp") divides the weights, constants, adapters,
    gradients and optimizer state by N and adds what is whole for a while (see _fsdp_terms): the root's
    weights (embeddings, final norm, head) for the whole step, and the largest decoder layer gathered while it
    runs. batch_size is per process. The chunked loss does not run under FSDP (its head is sharded), so loss_chunk
    is planned as 0 there.
    """
    shape = model_shape(model)
    _choice("sharding", sharding, SHARDINGS)
    _positive("processes", processes)
    _choice("method", method, METHODS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "adamw-8bit" and sharding == "fsdp":  # as rankdial.train.TrainConfig refuses it
        raise ConfigError("optimizer='adamw-8bit' with sharding='fsdp': the 8-bit step takes whole tensors and "
                          "FSDP's are shards; plan optimizer='adamw' under FSDP, or sharding='ddp' for 8-bit states")
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    if not isinstance(loss_chunk, int) or isinstance(loss_chunk, bool) or loss_chunk < 0:
        raise ConfigError(f"loss_chunk must be 0 (the whole logits at once) or a positive number of rows, got {loss_chunk!r}")
    if not isinstance(merged_weight, bool):
        raise ConfigError(f"merged_weight must be true or false, got {merged_weight!r}")
    if gradient_checkpointing is None:
        gradient_checkpointing = method == "qlora"
    if sharding == "fsdp" and processes > 1:
        loss_chunk = 0  # the head's weight is a sharded DTensor when the loss looks: train/loss.py takes the plain loss
    dtype = DTYPE_ALIASES.get(str(dtype), dtype) if dtype else shape.dtype
    e, a, tgt = _dtype(dtype, "dtype"), _dtype(adapter_dtype, "adapter_dtype"), _targets(targets)
    weights, consts = _weight_bytes(shape, method, e)
    dims = shape.linears()
    adapter_params = 0 if method == "full" else shape.layers * sum(lora_params(*dims[t], rank) for t in tgt)
    trainable = shape.total_params if method == "full" else adapter_params
    p = e if method == "full" else a  # bytes of a trainable parameter (and of its gradient)
    gradients = trainable * p
    # torch's AdamW keeps two moments in the parameter's dtype; 8-bit: one byte each + an fp32 absmax per block
    # of each, and two shared 256-entry fp32 quantization maps
    opt = 2 * trainable * p if optimizer == "adamw" else 2 * trainable + 8 * math.ceil(trainable / ADAM8_BLOCK) + 2048
    acts = batch_size * seq_len * _token_activation_bytes(shape, method, tgt, rank, e, a, gradient_checkpointing)
    logits = _logits_bytes(shape, batch_size * seq_len, e, loss_chunk)
    if method == "qlora":  # one weight dequantized at a time
        workspace = max(i * o for i, o in dims.values()) * e
    elif method == "lora" and merged_weight and e == a == 4:  # float32: one merged W0 + s*BA at a time
        workspace = max((math.prod(dims[t]) for t in tgt if merge_first(batch_size * seq_len, *dims[t])),
                        default=0) * e
    else:
        workspace = 0
    first_grad = shape.vocab * shape.hidden * p if method == "full" else 0  # the output head's, written first
    adapters, unsharded = adapter_params * a, 0
    if sharding == "fsdp" and processes > 1:
        weights, consts, adapters, gradients, opt, unsharded, first_grad = _fsdp_terms(
            shape, method, tgt, rank, e, a, p, processes, weights, consts, adapters, gradients, opt)
        # The sharded gradients do not take the freed activations' place (they are 1/N of a layer's, written
        # into their own shards), and the peak comes at the end of backward with the root's whole weights and
        # gradients live: every term adds up.
        total = weights + consts + adapters + opt + gradients + acts + logits + workspace + first_grad + unsharded
    else:
        total = weights + consts + adapters + opt + max(gradients, acts + logits + workspace + first_grad)
    adapter_dtype = DTYPE_ALIASES.get(str(adapter_dtype), adapter_dtype)
    settings = dict(rank=None if method == "full" else rank, targets=None if method == "full" else targets,
                    batch_size=batch_size, seq_len=seq_len, dtype=dtype, adapter_dtype=adapter_dtype,
                    gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, processes=processes,
                    sharding=sharding, loss_chunk=loss_chunk)
    return MemoryPlan(shape.name, method, settings, weights, consts, adapters, gradients, opt, acts, logits,
                      workspace, trainable, shape.total_params + adapter_params, total,
                      [g for g in ACCELERATOR_GB if total <= g * GB], unsharded)


def _fsdp_terms(shape: LlamaShape, method: str, tgt: tuple[str, ...], rank: int, e: int, a: int, p: int, n: int,
                weights: int, consts: int, adapters: int, gradients: int, opt: int) -> tuple[int, ...]:
    """The per-process terms under FSDP2 over n processes, as rankdial shards (each decoder layer, then the root):

    - sharded (/n, rounded up per tensor; dim-0 padding is below a row per tensor): the weights, the NF4 codes and
      per-block absmax (split on whole blocks), the adapters, the gradients and AdamW's moments. The
      double-quantization constants (an fp32 scale per 256 blocks, the offset, the code book) stay whole.
    - whole while in use ("gathered"): the root's parameters (embeddings, final norm, head; its forward spans
      the whole model, so they stay gathered through the step), plus two of the largest decoder layer (the one
      running, and the all-gather's flat buffer it is copied out of, or the next layer gathered ahead in
      backward). For full fine-tuning a layer's whole gradient and the reduce-scatter's flat copy of it, and the
      root's whole gradient (reduce-scattered only when backward ends), replace the head's gradient term.
    Returns (weights, consts, adapters, gradients, optimizer, gathered, first_grad)."""
    dims = shape.linears()
    nested = 0
    if method == "qlora":  # per linear: codes + absmax shard; 4 B per 256 blocks + offset + code book do not
        for d_in, d_out in dims.values():
            blocks = math.ceil(d_in * d_out / NF4_BLOCK)
            nested += shape.layers * (4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 + 4 * 256)
    root = (shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden) * e
    if method == "qlora":
        layer = sum(sum(nf4_bytes(i * o)[:1]) + math.ceil(i * o / NF4_BLOCK) for i, o in dims.values())
    else:
        layer = sum(i * o for i, o in dims.values()) * e
    layer += 2 * shape.hidden * e  # the two RMSNorm weights
    layer_adapters = 0 if method == "full" else sum(lora_params(*dims[t], rank) for t in tgt) * a
    gathered = root + 2 * (layer + layer_adapters)
    first_grad = 0
    if method == "full":
        first_grad = root // e * p + 2 * layer // e * p
    else:
        first_grad = 2 * layer_adapters  # a layer's whole adapter gradients and their reduce-scatter copy

    def shard(b: int) -> int:
        return math.ceil(b / n)
    return (shard(weights), shard(consts - nested) + nested, shard(adapters), shard(gradients), shard(opt), gathered,
            first_grad)


def _logits_bytes(shape: LlamaShape, rows: int, e: int, chunk: int) -> int:
    """The loss's buffers. Plain: the logits (dtype e), the fp32 log-softmax kept for backward and two fp32
    gradients of the logits' size. Chunked (rankdial.train.loss): one chunk's logits (e) and its fp32
    log-softmax (turned in place into d loss/d logits once the logits are freed), plus the rows' hidden states
    gathered, their gradient and the gather's backward: fp32 (rows, h) tensors."""
    if not chunk:
        return rows * shape.vocab * (e + 3 * 4)
    return min(rows, chunk) * shape.vocab * (e + 4) + 3 * rows * shape.hidden * 4


def _weight_bytes(shape: LlamaShape, method: str, e: int) -> tuple[int, int]:
    """(weights, quantization constants): QLoRA stores every decoder linear in NF4, the rest in dtype."""
    if method != "qlora":
        return shape.total_params * e, 0
    weights, consts = (shape.total_params - shape.linear_params) * e, 0
    for d_in, d_out in shape.linears().values():
        codes, c = nf4_bytes(d_in * d_out)
        weights, consts = weights + codes * shape.layers, consts + c * shape.layers
    return weights, consts


def _token_activation_bytes(shape: LlamaShape, method: str, tgt: tuple[str, ...], rank: int, e: int, a: int,
                            checkpointing: bool) -> int:
    """Bytes saved for backward per token over the whole model (the layers, the final norm, the token ids)."""
    layer = layer_activation_bytes(shape, method, tgt, rank, e, a)
    if checkpointing:  # each layer keeps only its input; one layer at a time is recomputed during backward
        acts = shape.layers * shape.hidden * e + layer
    else:
        acts = layer_activation_bytes(shape, method, tgt, rank, e, a, first=True) + (shape.layers - 1) * layer
    acts += 4 * shape.hidden + 4 + (2 * shape.hidden * e if method == "full" else 0)  # final RMSNorm, as in a layer
    return acts + 8  # the int64 token id the embedding keeps


def process_status_bytes(key: str) -> int:
    """A memory line of /proc/self/status in bytes (VmRSS: resident now; VmHWM: this process's own resident peak,
    which ru_maxrss is not, since it can carry a parent's peak across fork+exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) * 1024


def reset_peak_memory(device="cpu") -> None:
    """Start peak_memory_mb afresh, so it reports what happens from here on (one run of several in a process):
    CUDA's peak statistics, else the resident peak (writing 5 to /proc/self/clear_refs; where that is not
    possible the process's peak stays, and peak_memory_mb reports it as before)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device="cpu") -> float:
    """This process's peak memory in MiB: CUDA's max_memory_allocated on a GPU, else the resident peak (VmHWM)."""
    import resource

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    try:
        return process_status_bytes("VmHWM") / MIB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
