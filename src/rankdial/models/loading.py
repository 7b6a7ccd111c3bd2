"""Finding and loading a base model: the embedded default or a local Hugging Face folder, always offline."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import torch

from ..errors import ModelError

DEFAULT_MODEL_NAME = "kjv-llama-tiny"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """{"dtype": dtype} for transformers >= 4.56, {"torch_dtype": dtype} before (where `dtype=` is not taken)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def default_model_path() -> Path:
    """The embedded default model's folder (kjv-llama-tiny: a 4.5M-parameter Llama trained on the KJV Bible)."""
    return Path(__file__).resolve().parent / "default"


def default_samples_path() -> Path:
    return default_model_path() / "samples"


def resolve_model(name: str | Path) -> Path:
    """The folder for `name` ("default" or a path), checked for a config, weights and a tokenizer."""
    path = default_model_path() if str(name) == "default" else Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist; give a local Hugging Face model folder "
                         "(config.json, weights, tokenizer) or 'default' for the embedded model. rankdial never "
                         "downloads from a hub")
    if not path.is_dir():
        raise ModelError(f"model {path} is a file; give the folder that holds config.json and the weights")
    files = {p.name for p in path.iterdir()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not any(w in files for w in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any(t in files for t in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.*)")
    if missing:
        raise ModelError(f"model folder {path} has no {' and no '.join(missing)}; save it with "
                         "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
    return path


# transformers' model loading is not thread-safe (it patches torch's module init while it builds on the meta device:
# two loads at once leave meta tensors), so every model load here holds this lock, and callers in threads (the
# playground's jobs and panels) need none of their own. Re-entrant: load_model_nf4 may fall back to load_model.
_LOADING = threading.RLock()


def _one_load_at_a_time(load):
    @functools.wraps(load)
    def locked(*args, **kwargs):
        with _LOADING:
            return load(*args, **kwargs)
    return locked


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; report them as one
        raise ModelError(f"cannot load the tokenizer in {path}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@_one_load_at_a_time
def load_model(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a checked folder: a causal LM in float32 on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **dtype_kwarg(torch.float32))
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot load a causal language model from {path}: {err}") from None
    return model.to(device).eval(), load_tokenizer(path)


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """THE device choice: "auto" is CUDA when there is a GPU, else the CPU; "cpu", "cuda", "cuda:N" as given."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name!r} but this machine has no CUDA GPU; use --device auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"--device {name!r} but this machine has {torch.cuda.device_count()} GPU(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _weight_files(path: Path) -> list[Path] | None:
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.exists():
        import json

        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_index(path: Path) -> dict[str, dict]:
    """{name: {dtype, shape, data_offsets}} from a safetensors file's header (8-byte length + JSON)."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for meta in header.values():
        meta["start"] = 8 + n + meta["data_offsets"][0]
    return header


def _read_tensor(path: Path, meta: dict) -> torch.Tensor:
    """One tensor read with plain file I/O into fresh memory (safe_open maps the whole file, and the pages a
    load touches then count in the process's resident memory for as long as any tensor from it lives)."""
    dtype = _ST_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise ModelError(f"{path}: tensor dtype {meta['dtype']} is not supported by the 4-bit loader")
    out = torch.empty(meta["shape"], dtype=dtype)
    nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
    if out.numel() * out.element_size() != nbytes:
        raise ModelError(f"{path}: a tensor's byte size does not match its shape; the file is corrupt")
    with open(path, "rb") as f:
        f.seek(meta["start"])
        if nbytes and f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
            raise ModelError(f"{path} ends early; the file is truncated")
    return out


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), where that exists.

    Each layer's full-precision weight is freed right after quantization, but glibc keeps freed blocks that
    sit below newer small allocations (the packed 4-bit tensors) in the heap; without a trim the process's
    resident memory would grow by most of the full-precision model anyway.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@_one_load_at_a_time
def load_model_nf4(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) with every linear but the output head stored in NF4, quantized while loading.

    The model is built on the meta device and each linear weight is read from the safetensors file, quantized
    and placed on its own, so the peak memory is the 4-bit model plus one full-precision layer, never the whole
    full-precision model (which load_model + quantize_model would hold for a moment). Folders with only
    pytorch_model.bin fall back to exactly that.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..layers import linear_dims
    from ..quant import quantize_model, quantize_nf4
    from ..quant.linear import NF4Linear, quantize_candidates

    files = _weight_files(path)
    if files is None:
        model, tok = load_model(path, device)
        quantize_model(model)
        return model, tok
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch.float32))
    where = {}
    for f in files:
        for key, meta in _safetensors_index(f).items():
            where[key] = (f, meta)

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise ModelError(f"{path} has no tensor {key}; the weights do not fit config.json")
        return _read_tensor(*where[key]).to(device)

    missing = [k for k in model.state_dict() if k not in where]
    for name, module, _, reason in quantize_candidates(model):  # the same policy as quantize_model
        if reason is not None:
            continue
        weight = read(f"{name}.weight").float()
        weight = weight.t() if linear_dims(module)[2] else weight  # GPT-2's Conv1D stores (d_in, d_out)
        bias = read(f"{name}.bias").float() if getattr(module, "bias", None) is not None else None
        model.set_submodule(name, NF4Linear(quantize_nf4(weight.contiguous()), bias))
        del weight, bias
        _release_freed_memory()
    # What is left in full precision (embeddings, norms, the head): the quantized layers' keys are NF4 buffers
    # now (packed, absmax, ...), which the file does not hold. Integer tensors keep their dtype.
    rest = {}
    for key in model.state_dict():
        if key in where:
            t = read(key)
            rest[key] = t.float() if t.is_floating_point() else t
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, module in list(model.named_modules()):  # non-persistent buffers (rotary inv_freq) are rebuilt
        if any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                fresh = type(module)(config=getattr(module, "config", config), device=device)
            except TypeError:
                fresh = type(module)(config=getattr(module, "config", config))
            model.set_submodule(name, fresh.to(device))
    still = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise ModelError(f"{path}: could not load {still[:3]} while quantizing on load (missing from the weights: "
                         f"{missing[:3]})")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), load_tokenizer(path)
