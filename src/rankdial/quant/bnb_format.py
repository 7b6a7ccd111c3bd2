"""4-bit model folders in the layout Hugging Face transformers writes with bitsandbytes (save and load).

(Not training checkpoints: those are train/checkpoint.py.)

For each quantized linear at <path>: `<path>.weight` (packed uint8, (n/2, 1)), `<path>.weight.absmax`,
`<path>.weight.quant_map` (the 16 NF4 values), with double quantization `<path>.weight.nested_absmax` and
`<path>.weight.nested_quant_map`, and `<path>.weight.quant_state.bitsandbytes__nf4`: a uint8 tensor holding
JSON (quant_type, blocksize, dtype, shape, and nested_blocksize / nested_dtype / nested_offset).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..atomic import OwnFiles, atomic_dir
from .linear import NF4Linear
from .nf4 import NF4_CODE, NF4Tensor

STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
WEIGHTS_NAME = "model.safetensors"
# The quantization_config keys save_quantized writes. transformers' own BitsAndBytesConfig writes more
# (llm_int8_threshold, bnb_4bit_quant_storage, ...) and no bnb_4bit_blocksize, so this set tells them apart.
RANKDIAL_QUANT_KEYS = {"quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                       "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_blocksize"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quant_state_tensors(path: str, layer: NF4Linear) -> dict[str, torch.Tensor]:
    """The tensors one NF4Linear contributes to a checkpoint, under transformers/bitsandbytes' names."""
    q = layer.quantized
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype), "shape": list(q.shape)}
    out = {f"{path}.weight": q.packed.view(-1, 1), f"{path}.weight.absmax": q.absmax,
           f"{path}.weight.quant_map": NF4_CODE.to(q.packed.device)}
    if q.double_quant:
        out[f"{path}.weight.nested_absmax"] = q.nested_absmax
        out[f"{path}.weight.nested_quant_map"] = q.nested_code
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.nested_offset.item())
    out[path + STATE_SUFFIX] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    if layer.bias is not None:
        out[f"{path}.bias"] = layer.bias
    return out


def nf4_from_tensors(path: str, tensors: dict[str, torch.Tensor]) -> NF4Tensor:
    """Rebuild the NF4 weight of module `path` from checkpoint tensors, checking that every part fits."""
    try:
        meta = json.loads(bytes(tensors[path + STATE_SUFFIX].tolist()).decode())
        packed, absmax = tensors[f"{path}.weight"].reshape(-1), tensors[f"{path}.weight.absmax"]
    except KeyError as err:
        raise CheckpointError(f"4-bit weight {path}: missing {err.args[0]!r}; the checkpoint is incomplete") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"4-bit weight {path}: its quant_state is not valid JSON ({err})") from err
    problems = []
    if meta.get("quant_type") != "nf4":
        problems.append(f"quant_type is {meta.get('quant_type')!r}; rankdial reads 'nf4' only")
    shape, blocksize = torch.Size(meta.get("shape") or []), meta.get("blocksize")
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if len(shape) != 2 or not isinstance(blocksize, int) or not isinstance(dtype, torch.dtype):
        problems.append(f"quant_state needs a 2-D shape, an int blocksize and a dtype, got {meta}")
    else:
        if packed.dtype != torch.uint8 or packed.numel() != (shape.numel() + 1) // 2:
            problems.append(f"weight holds {packed.numel()} {packed.dtype} values; shape {list(shape)} needs "
                            f"{(shape.numel() + 1) // 2} uint8")
        if absmax.numel() != -(-shape.numel() // blocksize):
            problems.append(f"absmax has {absmax.numel()} values; shape {list(shape)} in blocks of {blocksize} "
                            f"needs {-(-shape.numel() // blocksize)}")
    quant_map = tensors.get(f"{path}.weight.quant_map")
    if quant_map is not None and not torch.equal(quant_map.float().cpu(), NF4_CODE):
        problems.append("quant_map is not the NF4 code book")
    nested = "nested_offset" in meta
    if nested != (f"{path}.weight.nested_absmax" in tensors):
        problems.append("double quantization is half there: nested_offset and nested_absmax must come together")
    if problems:
        raise CheckpointError(f"4-bit weight {path} is inconsistent:\n  - " + "\n  - ".join(problems))
    if not nested:
        return NF4Tensor(packed, absmax.float(), shape, dtype, blocksize)
    return NF4Tensor(packed, absmax, shape, dtype, blocksize, tensors[f"{path}.weight.nested_absmax"].float(),
                     torch.tensor(float(meta["nested_offset"])), tensors[f"{path}.weight.nested_quant_map"].float(),
                     int(meta.get("nested_blocksize", 256)))


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state in the transformers/bitsandbytes 4-bit layout (plain tensors for everything else)."""
    out, quantized = {}, []
    for path, module in model.named_modules():
        if isinstance(module, NF4Linear):
            out.update(quant_state_tensors(path, module))
            quantized.append(path + ".")
    for key, value in model.state_dict().items():
        if not any(key.startswith(p) for p in quantized):
            out[key] = value
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _rankdial_quant_config(folder: Path) -> bool:
    """Whether folder's config.json holds exactly the quantization_config keys save_quantized writes."""
    try:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(quant, dict) and set(quant) == RANKDIAL_QUANT_KEYS


# A folder save_quantized wrote before rankdial marked its folders: config.json and model.safetensors only, with
# exactly the quantization_config keys it writes (a transformers folder has more). rankdial.atomic.OwnFiles.
written_before_markers = OwnFiles(("config.json", WEIGHTS_NAME), (), check=_rankdial_quant_config)


def save_quantized(model: nn.Module, folder: str | Path) -> Path:
    """Write model.safetensors (4-bit layout) and config.json (with a quantization_config) atomically.

    An existing folder is replaced only if rankdial wrote it as a quantized model (its marker, or for older
    folders written_before_markers); anything else is refused with an OutputError.
    """
    tensors = quantized_state_dict(model)
    # tied weights (e.g. GPT-2's head and embedding) share storage; safetensors stores each tensor once
    seen: dict[int, str] = {}
    for key in list(tensors):
        ptr = tensors[key].data_ptr()
        if ptr in seen and tensors[key].numel():
            tensors[key] = tensors[key].clone()
        seen[ptr] = key
    config = model.config.to_dict() if hasattr(model, "config") else {}
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(layers) and layers[0].nested_absmax is not None,
        "bnb_4bit_compute_dtype": _dtype_name(layers[0].compute_dtype or torch.float32) if layers else "float32",
        "bnb_4bit_blocksize": layers[0].blocksize if layers else 64,
    }
    with atomic_dir(folder, kind="quantized-model", legacy=written_before_markers, what="4-bit model folder") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return Path(folder)


def load_quantized_into(model: nn.Module, folder: str | Path) -> nn.Module:
    """Fill `model` (built from the folder's config) with a 4-bit checkpoint: NF4Linear where the file has a
    quant state, plain tensors elsewhere. Missing or unexpected keys are listed together."""
    file = Path(folder) / WEIGHTS_NAME
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}); it is missing, truncated or corrupt") from err
    quantized = sorted(k[:-len(STATE_SUFFIX)] for k in tensors if k.endswith(STATE_SUFFIX))
    for path in quantized:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{file} holds a 4-bit weight for {path!r}, which {type(model).__name__} does not "
                                  "have; is the checkpoint for another architecture? Check config.json") from None
        compute = getattr(module, "compute_dtype", None)
        layer = NF4Linear(nf4_from_tensors(path, tensors), tensors.get(f"{path}.bias"), compute).train(module.training)
        model.set_submodule(path, layer)
    used = {k for p in quantized for k in tensors if k == f"{p}.bias" or k.startswith(f"{p}.weight")}
    rest = {k: v for k, v in tensors.items() if k not in used}
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in quantized)}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(rest, strict=False)
    return model


def load_quantized(folder: str | Path) -> nn.Module:
    """Build the transformers model described by folder/config.json and load its 4-bit checkpoint (offline)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a model folder saved by save_quantized or transformers")
    data = json.loads(config_file.read_text())
    data.pop("quantization_config", None)
    config = AutoConfig.for_model(**data)
    return load_quantized_into(AutoModelForCausalLM.from_config(config), folder)
