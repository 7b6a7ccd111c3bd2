"""Save and load adapter folders in Hugging Face PEFT's format, atomically and with every check up front.

Loading reads only JSON and safetensors, so it never executes code from a file; a pickle
`adapter_model.bin` is refused unless the caller opts in (then read with torch.load(weights_only=True)).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import os

from ..atomic import OwnFiles, atomic_dir, atomic_file
from ..config import LoraConfig, init_mutates_base
from ..errors import AdapterError, AdapterFileError
from ..lora.inject import (Plan, adapter_configs, apply_plan, check_adapter_name, named_wrappers, pattern_value,
                           plan_targets, unwrap_model, with_task_heads)
from ..layers import unwrap
from ..lora.init import check_bases
from ..lora.layer import LoraLayer
from ..lora.modules_to_save import ModulesToSave
from ..lora.param import ExpertLora, file_shapes, is_expert_key, plan_parameters
from ..lora.verbs import active_adapters, adapter_names, lora_layers
from .peft_format import (CONFIG_NAME, KEY_PREFIX, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, config_from_peft, config_to_peft,
                          lora_key, magnitude_key, saved_key)


def _pick_adapter(model: nn.Module, adapter: str | None) -> str:
    names = adapter_names(model)
    if adapter is None:
        active = active_adapters(model)
        adapter = active[0] if len(active) == 1 else ("default" if "default" in names else None)
        if adapter is None:
            raise AdapterError(f"say which adapter to save: this model has {names or 'none'}")
    if adapter not in names:
        raise AdapterError(f"unknown adapter {adapter!r}; this model has {names or 'no adapters (inject() one first)'}")
    return adapter


def _folder(path, what: str = "adapter folder") -> Path:
    """`path` as a Path, or a clear error for None, numbers and other non-paths."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise AdapterFileError(f"{what} must be a folder path (str or pathlib.Path), got {path!r}; "
                               "e.g. 'out/my-adapter'")
    return Path(path)


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `adapter` (default: the active one) under PEFT's file keys (CPU copies, contiguous).

    PEFT's get_peft_model_state_dict: these are exactly the keys and tensors save_adapter writes.
    """
    adapter = _pick_adapter(model, adapter)
    out: dict[str, torch.Tensor] = {}
    for path, module in named_wrappers(model):
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[lora_key(path, "A")] = module.lora_A[adapter].weight
            out[lora_key(path, "B")] = module.lora_B[adapter].weight
            if module.is_dora(adapter):
                out[magnitude_key(path)] = module.lora_magnitude_vector[adapter].weight
        elif isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
            for param, tensor in module.modules_to_save[adapter].state_dict().items():
                out[saved_key(path, param)] = tensor
        elif isinstance(module, ExpertLora) and adapter in module.lora_A:
            out.update({KEY_PREFIX + k: v for k, v in module.file_tensors(adapter, path).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def converted_state(model: nn.Module, adapter: str, config: LoraConfig, tensors: dict[str, torch.Tensor]):
    """A PiSSA/OLoRA adapter as a plain LoRA of doubled rank against the original base (PEFT's
    path_initial_model_for_weight_conversion): A' = [A; A₀], B' = [B, −B₀], r' = 2r, α' = 2α (√2·α with rsLoRA),
    so s'·B'A' = s·(BA − B₀A₀) and W₀ + s'·B'A' = W_res + s·BA. Returns (config, tensors)."""
    out = dict(tensors)
    for path, module in named_wrappers(model):
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if adapter not in module.initial_factors:
                raise AdapterError(f"adapter {adapter!r} was made with init_lora_weights={config.init_lora_weights!r} "
                                   f"but {path} has no record of its initial A and B (loaded from a folder?), so it "
                                   "cannot be converted; save it with residual_base=True")
            A0, B0 = (t.detach().to("cpu") for t in module.initial_factors[adapter])
            a, b = lora_key(path, "A"), lora_key(path, "B")
            out[a] = torch.cat([tensors[a], A0.to(tensors[a].dtype)], dim=0).contiguous()
            out[b] = torch.cat([tensors[b], -B0.to(tensors[b].dtype)], dim=1).contiguous()
    factor = 2 ** 0.5 if config.use_rslora else 2
    config = replace(config, init_lora_weights=True, r=2 * config.r, lora_alpha=factor * config.lora_alpha,
                     rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                     alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()})
    return config, out


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point tensors holding NaN or Inf, in the dict's order.

    One fused pass first: a tensor's norm is finite whenever all its elements are unless the sum of squares
    overflows, and NaN/Inf in it always makes the norm NaN/Inf; so only when some norm is not finite does every
    tensor get the exact per-element check, and a sound adapter costs one fused call instead of one per tensor.
    """
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point()]
    if not floats:
        return []
    if len({t.device for _, t in floats}) == 1:  # (tensors spread over devices take the exact path)
        norms = torch._foreach_norm([t for _, t in floats])
        if torch.isfinite(torch.stack(norms)).all():  # stack promotes mixed dtypes
            return []
    return [k for k, t in floats if not torch.isfinite(t).all()]


ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME}  # not README.md: a user's notes may be called that


# A folder written before rankdial's marker (or by PEFT) may be replaced: it holds an adapter_config.json and
# nothing but adapter files, so nothing else is lost (rankdial.atomic.OwnFiles, the rule every kind uses).
is_plain_adapter_folder = OwnFiles(CONFIG_NAME, ADAPTER_FILES)


def save_adapter(model: nn.Module, path: str | Path, adapter: str | None = None, residual_base: bool = False) -> Path:
    """Write `adapter` (default: the active one) to folder `path` as adapter_config.json + adapter_model.safetensors.

    The folder is written beside the target and renamed into place, so an existing adapter at `path` is
    replaced whole or not at all. A PiSSA/OLoRA adapter is written converted (converted_state: a plain LoRA of
    twice the rank that runs on the original base); residual_base=True writes it as trained instead, marked by
    init_lora_weights="pissa"/"olora" in adapter_config.json, for the residual base only. A LoftQ adapter is
    always marked "loftq": it belongs to the NF4 base LoftQ made (load_adapter rebuilds that base).
    """
    path = _folder(path)
    model = unwrap_model(model)  # DDP / torch.compile: the names and config of the model inside
    adapter = _pick_adapter(model, adapter)
    tensors = adapter_state_dict(model, adapter)
    bad = _non_finite(tensors)
    if bad:
        raise AdapterFileError(f"adapter {adapter!r} holds NaN/Inf in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                               "not saving it. The training diverged: lower the learning rate or resume from a good checkpoint")
    paths = [p for p, layer in lora_layers(model) if adapter in layer.lora_A]
    config = adapter_configs(model)[adapter]
    if init_mutates_base(config.init_lora_weights) and config.init_lora_weights != "loftq" and not residual_base:
        config, tensors = converted_state(model, adapter, config, tensors)
    config = config_to_peft(model, config, paths)
    with atomic_dir(path, kind="adapter", legacy=is_plain_adapter_folder, what="adapter folder") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_adapter_config(path: str | Path) -> LoraConfig:
    """The LoraConfig stored in an adapter folder."""
    folder = _folder(path)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist or is not a folder; "
                               "pass the folder that holds adapter_config.json")
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise AdapterFileError(f"{folder} has no {CONFIG_NAME} (it holds {sorted(p.name for p in folder.iterdir())}); "
                               "is this an adapter folder?")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file} is not valid JSON ({err}); restore it or save the adapter again") from err
    return config_from_peft(data, str(file))


def read_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors. Up to PREAD_MAX_BYTES they are read now (safetensors' pread backend, 0.8+):
    about twice as fast as its default mmap for an adapter-sized file, whose mapped pages would be faulted in by the
    first use anyway (the NaN check), and the tensors never alias a file that may be rewritten while they are in
    use. A larger file (or older safetensors) is mapped: its bytes stay in the page cache, never all in the
    process's own memory before the checks have looked at them."""
    if _PREAD and os.path.getsize(file) <= PREAD_MAX_BYTES:
        return load_file(str(file), backend="pread")
    return load_file(str(file))


_PREAD = "backend" in inspect.signature(load_file).parameters  # safetensors 0.8+
PREAD_MAX_BYTES = 256 * 2 ** 20


def path_kind(path: Path) -> str:
    """What a path that is not a regular file is, in a word or two (for errors that name it)."""
    if not path.exists():
        return "a broken link"
    if path.is_dir():
        return "a directory"
    if path.is_fifo():
        return "a FIFO"
    if path.is_socket():
        return "a socket"
    return "a device" if path.is_char_device() or path.is_block_device() else "a special file"


def read_adapter_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder, from safetensors (or, only if allowed, a weights-only pickle)."""
    folder = _folder(path)
    file = folder / WEIGHTS_NAME
    if file.is_file():
        try:  # opened first: safetensors reports a file it may not read as missing
            with open(file, "rb"):
                pass
        except OSError as err:
            raise AdapterFileError(f"{file} cannot be opened ({err.strerror or type(err).__name__}); make it "
                                   "readable by this process") from err
        try:
            return read_safetensors(file)
        except (SafetensorError, ValueError) as err:
            raise AdapterFileError(f"{file} is truncated or corrupt ({err}); save the adapter again or restore "
                                   "it from a copy") from err
        except OSError as err:
            raise AdapterFileError(f"{file} cannot be read ({err.strerror or err}); check the disk and the "
                                   "file, then retry") from err
    if file.exists() or file.is_symlink():
        raise AdapterFileError(f"{file} is not a regular file ({path_kind(file)}); put the saved weights file there")
    pickled = folder / PICKLE_WEIGHTS_NAME
    if pickled.is_file() and not allow_pickle:
        raise AdapterFileError(
            f"{pickled} is a pickle file, which can run code when loaded, so rankdial refuses it. Convert it once "
            f"with `rankdial convert-bin {folder}` (it reads tensors only, with torch.load(weights_only=True)), "
            "or pass allow_pickle=True")
    if pickled.is_file():
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad pickle; all mean the same to the user
            raise AdapterFileError(f"{pickled} could not be read as tensors ({err})") from err
    raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME} (it holds {sorted(p.name for p in folder.iterdir())})")


def expected_shapes(model: nn.Module, plan: Plan, config: LoraConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every file key an adapter with this plan (and config's target_parameters) must have, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, params in (plan_parameters(model, config) if config is not None else {}).items():
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, ExpertLora) else module
        shapes.update({KEY_PREFIX + k: v for k, v in file_shapes(base, params, config.r, path).items()})
    for t in plan.targets:
        shapes[lora_key(t.path, "A")] = (t.r, t.d_in)
        shapes[lora_key(t.path, "B")] = (t.d_out, t.r)
        if t.dora:
            shapes[magnitude_key(t.path)] = (t.d_out,)
    for path in plan.saved:
        module = model.get_submodule(path)
        original = module.original_module if isinstance(module, ModulesToSave) else module
        shapes.update({saved_key(path, k): tuple(v.shape) for k, v in original.state_dict().items()})
    return shapes


_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"


def check_adapter_tensors(config: LoraConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise one AdapterFileError naming what makes an adapter file broken on its own (whatever the model):
    tensors that are not floating point or hold NaN/Inf, a lora_A without its lora_B (or the reverse), A and B
    that do not multiply, and ranks other than adapter_config.json says (r, or its rank_pattern)."""
    problems = []
    not_float = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if not_float:
        problems.append(f"{len(not_float)} tensors are not floating point (e.g. {not_float[0]}: "
                        f"{tensors[not_float[0]].dtype})")
    bad = _non_finite(tensors)
    if bad:
        problems.append(f"NaN/Inf values in {bad[:3]}{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} "
                        "(the training diverged)")
    magnitudes = [k for k in tensors if k.endswith(_M)]
    if magnitudes and not config.use_dora:
        problems.append(f"{len(magnitudes)} DoRA magnitude vectors (e.g. {magnitudes[0]}) but adapter_config.json has "
                        "use_dora false; loading it as plain LoRA would give wrong answers")
    elif config.use_dora and len(magnitudes) != sum(k.endswith(_A) for k in tensors):
        problems.append(f"use_dora is true but {len(magnitudes)} lora_magnitude_vector tensors for "
                        f"{sum(k.endswith(_A) for k in tensors)} modules: the file is incomplete")
    lone = sorted([k for k in tensors if k.endswith(_A) and k[:-len(_A)] + _B not in tensors]
                  + [k for k in tensors if k.endswith(_B) and k[:-len(_B)] + _A not in tensors])
    if lone:
        problems.append(f"{len(lone)} LoRA matrices lack their partner (e.g. {lone[0]}): the file is incomplete")
    ranks, unfit = [], []
    for key in sorted(k for k in tensors if k.endswith(_A) and k[:-len(_A)] + _B in tensors):
        A, B, path = tensors[key], tensors[key[:-len(_A)] + _B], key[len(KEY_PREFIX):-len(_A)]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            unfit.append(f"{path}: lora_B has shape {list(B.shape)}, which does not fit lora_A {list(A.shape)}")
        elif is_expert_key(config, path):  # (experts·r, d_in): one rank-r A per expert (lora/param.py)
            if A.shape[0] % config.r:
                ranks.append((path, A.shape[0], config.r))
        elif A.shape[0] != pattern_value(config.rank_pattern, path, config.r):
            ranks.append((path, A.shape[0], pattern_value(config.rank_pattern, path, config.r)))
    problems += unfit[:3] + ([f"and {len(unfit) - 3} more modules whose lora_A and lora_B do not fit"]
                             if len(unfit) > 3 else [])  # a few, like the NaN list: one line, never kilobytes
    if ranks:
        path, r, said = ranks[0]
        problems.append(f"{len(ranks)} modules have another rank in their weights than adapter_config.json says "
                        f"(e.g. {path}: rank {r}, config r={said}, no rank_pattern entry explains it)")
    if problems:
        raise AdapterFileError(f"adapter {source} is broken: {'; '.join(problems)}. Save or train it again")


def check_tensor_shapes(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one AdapterFileError listing every missing key, unexpected key and wrong shape for this model."""
    problems = []
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{key}: the file has shape {list(tensors[key].shape)}, the model needs {list(shapes[key])}"
             for key in sorted(set(shapes) & set(tensors)) if tuple(tensors[key].shape) != shapes[key]]
    problems += wrong[:5] + ([f"... and {len(wrong) - 5} more shapes"] if len(wrong) > 5 else [])
    if problems:
        raise AdapterFileError(f"{source} does not fit this model (is it for another base model?): "
                               + "; ".join(problems))


def load_adapter(model: nn.Module, path: str | Path, adapter: str = "default", trainable: bool = False,
                 allow_pickle: bool = False, residual_base: bool = False) -> LoraConfig:
    """Inject the adapter saved at `path` into `model` under the name `adapter` and load its weights.

    Every check (name, config, file integrity, keys, shapes, NaN/Inf) runs before the model is touched.
    The first adapter of a model becomes active; use set_active() for later ones. A folder marked as trained on
    a residual base (init_lora_weights "pissa" or "olora": PEFT's unconverted form) is refused unless
    residual_base=True says `model` is that base. A LoftQ folder ("loftq") on the full-precision model rebuilds
    LoftQ's NF4 base from it first (the init is deterministic: the same SVD and NF4 rounding), then loads the
    weights; with residual_base=True the model is taken to hold that base already.
    """
    path = _folder(path)
    config = with_task_heads(model, read_adapter_config(path))
    rebuild = config.init_lora_weights == "loftq" and not residual_base
    if not rebuild:
        check_residual(config, str(path), residual_base)
    tensors = read_adapter_weights(path, allow_pickle)
    check_adapter_tensors(config, tensors, str(path))
    check_adapter_name(model, adapter)
    plan = plan_targets(model, config)
    check_tensor_shapes(tensors, expected_shapes(model, plan, config), str(path))
    if rebuild:
        check_bases([unwrap(model.get_submodule(t.path)) for t in plan.targets], config.init_lora_weights)
    apply_plan(model, config, plan, adapter, trainable, init=rebuild)
    _copy_in(model, tensors, adapter)
    return config


def check_servable(config: LoraConfig, name: str) -> None:
    """AdapterFileError (one line) for an adapter the batched server cannot apply per request: DoRA (its per-row
    rescale of W₀x is not a low-rank term), or one that needs a residual base the server does not hold."""
    if config.use_dora:
        raise AdapterFileError(f"adapter {name!r} is a DoRA adapter (use_dora): the server adds s·B·A·x per request and "
                               "does not apply DoRA's per-row magnitude; merge it into its own model folder "
                               "(rankdial merge) to serve it")
    check_residual(config, f"adapter {name!r}")


def check_residual(config: LoraConfig, source: str, residual_base: bool = False) -> None:
    """AdapterFileError for a folder that needs the residual base PiSSA/OLoRA/LoftQ left, unless told it is there."""
    init = config.init_lora_weights
    if init_mutates_base(init) and not residual_base:
        base = "the NF4 base LoftQ quantized" if init == "loftq" else f"the residual base {init} left (W₀ − s·B₀A₀)"
        raise AdapterFileError(f"{source} has init_lora_weights={init!r}: it was trained against {base}, and on the "
                               "original base it gives wrong answers. Load it with residual_base=True on that base, "
                               "or save it converted (rankdial.save_adapter's default for PiSSA/OLoRA)")


def _current_shapes(model: nn.Module, adapter: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in adapter_state_dict(model, adapter).items()}


def set_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Copy `tensors` (PEFT's file keys, as adapter_state_dict gives them) into an adapter already in `model`.

    PEFT's set_peft_model_state_dict, checked first: every key of the adapter present, none unexpected, shapes
    equal, no NaN/Inf; on any problem nothing is copied.
    """
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterFileError(f"set_adapter_state_dict() takes a dict of tensors, got {type(tensors).__name__}")
    adapter = _pick_adapter(model, adapter)
    bad = _non_finite(tensors)
    if bad:
        raise AdapterFileError(f"the state dict holds NaN/Inf values in {bad[:3]}; nothing was copied")
    check_tensor_shapes(tensors, _current_shapes(model, adapter), "the state dict")
    _copy_in(model, tensors, adapter)


def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor], adapter: str) -> None:
    with torch.no_grad():
        for path_, module in named_wrappers(model):
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                module.lora_A[adapter].weight.copy_(tensors[lora_key(path_, "A")])
                module.lora_B[adapter].weight.copy_(tensors[lora_key(path_, "B")])
                if module.is_dora(adapter):
                    module.lora_magnitude_vector[adapter].weight.copy_(tensors[magnitude_key(path_)])
            elif isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
                copy = module.modules_to_save[adapter]
                copy.load_state_dict({k: tensors[saved_key(path_, k)] for k in copy.state_dict()})
            elif isinstance(module, ExpertLora) and adapter in module.lora_A:
                module.load_file_tensors(adapter, path_, {k[len(KEY_PREFIX):]: v for k, v in tensors.items()})


def convert_bin_adapter(path: str | Path) -> Path:
    """Rewrite a folder's pickle adapter_model.bin as adapter_model.safetensors (tensors only, no code run).

    Refuses a folder that already holds adapter_model.safetensors: the two may differ, and loading prefers
    the safetensors file, so silently keeping it would make the conversion a lie.
    """
    folder = _folder(path)
    target = folder / WEIGHTS_NAME
    if target.exists() and (folder / PICKLE_WEIGHTS_NAME).exists():
        raise AdapterFileError(f"{folder} holds both {PICKLE_WEIGHTS_NAME} and {WEIGHTS_NAME}; rankdial will not "
                               f"overwrite one with the other. Remove the one you do not trust, then convert again")
    if not (folder / PICKLE_WEIGHTS_NAME).is_file():
        raise AdapterFileError(f"{folder} has no {PICKLE_WEIGHTS_NAME} to convert"
                               + (f" (it already holds {WEIGHTS_NAME})" if target.exists() else ""))
    tensors = read_adapter_weights(folder, allow_pickle=True)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise AdapterFileError(f"{folder / PICKLE_WEIGHTS_NAME} holds a {type(tensors).__name__}, not a dict of named "
                               "tensors; it is not a PEFT adapter file")
    with atomic_file(target) as tmp:  # clone: safetensors refuses tensors that share memory
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    return target
