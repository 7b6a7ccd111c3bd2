"""Injection: find the target linears of any PyTorch model, wrap them in LoraLayer, freeze the base.

Matching follows Hugging Face PEFT so that one adapter_config.json means the same model surgery in both:
a list entry matches a module path exactly or as the part after a dot; a string is a regex that must match
the whole path; "all-linear" takes every nn.Linear / Conv1D except the output head.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace

from torch import nn

from ..config import ALL_LINEAR, LoraConfig, check_name
from ..errors import AdapterError, ConfigError, TargetError
from ..layers import SEQ_CLS_HEADS, linear_dims, named_unwrapped, output_heads, path_matches, unwrap
from .dora import check_base as dora_check_base
from .init import check_bases
from .layer import BY_HAND, LoraLayer
from .modules_to_save import ModulesToSave
from .param import ExpertLora, inject_parameters, plan_parameters


@dataclass(frozen=True)
class Target:
    """One linear that an adapter will wrap, with the rank and alpha it gets there."""

    path: str
    d_in: int
    d_out: int
    fan_in_fan_out: bool
    r: int
    alpha: float
    dora: bool = False


@dataclass
class Plan:
    """What inject() would do, computed without touching the model."""

    targets: list[Target] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # paths of modules_to_save


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers (paths as the user sees).

    Raises TargetError for anything that is not a torch.nn.Module (every model-level verb goes through here).
    """
    if not isinstance(model, nn.Module):
        raise TargetError(f"expected a PyTorch model (torch.nn.Module), got {type(model).__name__} {model!r:.60}; "
                          "pass the model object itself, e.g. AutoModelForCausalLM.from_pretrained(folder)")
    while True:
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def named_wrappers(model: nn.Module):
    """Yield (path, module) for every LoraLayer and ModulesToSave in the model, not walking into them.

    Every model-level verb (and serving's route(), once per step) starts here; nn.Module.named_modules() would
    also visit each adapter's A, B and dropout modules, which can never hold another wrapper.
    """
    def walk(module: nn.Module, prefix: str):
        if isinstance(module, (LoraLayer, ModulesToSave, ExpertLora)):
            yield prefix, module
            return
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(unwrap_model(model), "")


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: LoraConfig} of every adapter in `model`, in injection order, read from its layers.

    A new dict each call, with no side effect on the model: the state lives on the layers, so it is found
    wherever the adapters were injected (model or model.model) and through DDP or torch.compile wrappers.
    An adapter added by hand with LoraLayer.add_adapter() gets a config naming the layers that hold it.
    """
    found: dict[str, tuple[int, LoraConfig]] = {}
    by_hand: dict[str, dict[str, int]] = {}
    for path, wrapper in named_wrappers(model):
        for name, (order, config) in wrapper.configs.items():
            if name not in found or order < found[name][0]:
                found[name] = (order, config)
            if config.target_modules == BY_HAND:
                by_hand.setdefault(name, {})[path] = wrapper.rank(name)
    for name, ranks in by_hand.items():
        order, config = found[name]
        pattern = {re.escape(p): k for p, k in ranks.items() if k != config.r}
        found[name] = (order, replace(config, target_modules=sorted(ranks), rank_pattern=pattern,
                                      alpha_pattern={}))
    return {name: config for name, (_, config) in sorted(found.items(), key=lambda item: item[1][0])}


def matches(spec: list[str] | str, path: str) -> bool:
    """PEFT's rule: a regex string matches the whole path; a list entry matches it exactly or after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return path_matches(spec, path)


def pattern_value(patterns: dict, path: str, default):
    """The value of the first key of rank_pattern/alpha_pattern that matches a dot-bounded suffix of path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first layer number in a path, e.g. 3 in 'model.layers.3.self_attn.q_proj'."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
        return int(found.group(1)) if found else None
    for name in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        found = re.match(rf"(?:^|.*?\.){name}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def _mha_out_projs(model: nn.Module) -> set[int]:
    """The out_proj linears of nn.MultiheadAttention: MHA reads out_proj.weight directly, so an adapter there
    would be skipped silently by its forward."""
    return {id(unwrap(m.out_proj)) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def with_task_heads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """For task_type SEQ_CLS the new classification head trains in full, as PEFT arranges: add it to modules_to_save."""
    if config.task_type != "SEQ_CLS":
        return config
    heads = [n for n in SEQ_CLS_HEADS if isinstance(getattr(model, n, None), nn.Module)]
    extra = [h for h in heads if h not in (config.modules_to_save or [])]
    return replace(config, modules_to_save=(config.modules_to_save or []) + extra) if extra else config


def _saved_match(config: LoraConfig, path: str) -> bool:
    """PEFT selects modules_to_save by a plain suffix test ("norm" also takes "input_layernorm"); so do we."""
    return any(path.endswith(m) for m in config.modules_to_save or [])


def _selected(config: LoraConfig, path: str, module: nn.Module, heads: list[int]) -> bool:
    """Whether target_modules, exclude_modules and layers_to_transform select this module for an adapter."""
    if config.target_modules == ALL_LINEAR:
        hit = linear_dims(module) is not None and id(module) not in heads
    else:
        hit = matches(config.target_modules, path)
    if not hit or (config.exclude_modules and matches(config.exclude_modules, path)):
        return False
    return config.layers_to_transform is None or layer_index(path, config.layers_pattern) in config.layers_to_transform


def plan_targets(model: nn.Module, config: LoraConfig) -> Plan:
    """Resolve `config` against `model`: which linears get which rank, which modules are saved in full.

    A module inside one that modules_to_save trains in full gets no adapter (its copy trains anyway); a module
    that target_modules names and modules_to_save also takes is an error ('all-linear' just leaves it out).

    Raises:
        TargetError: nothing matched (with the closest names the model has), a match is not a linear, a module
            is both a target and saved in full, or a target is an nn.MultiheadAttention out_proj.
        ConfigError: a rank does not fit a layer (every such layer listed).
    """
    plan, problems = Plan(), {"rank": [], "type": [], "mha": [], "both": []}
    heads = [id(h) for h in output_heads(model, config.task_type)] if config.target_modules == ALL_LINEAR else []
    mha = _mha_out_projs(model)
    for path, module in named_unwrapped(model):
        inside = any(path == s or path.startswith(s + ".") for s in plan.saved)
        if not inside and _saved_match(config, path):
            plan.saved.append(path)
            inside = True
        if not _selected(config, path, module, heads):
            continue
        if inside:
            if path in plan.saved and config.target_modules != ALL_LINEAR:
                problems["both"].append(path)
            continue
        target = _target(config, path, module, mha, problems)
        if target is not None:
            plan.targets.append(target)
    _raise_problems(problems)
    _check_saved_found(model, config, plan)
    if config.target_parameters:
        plan_parameters(model, config)  # expert parameters (lora/param.py): checked before anything is touched
    if not plan.targets and not config.target_parameters:
        raise TargetError(_nothing_matched(model, config))
    if problems["rank"]:
        raise ConfigError("rank does not fit the layer:\n  - " + "\n  - ".join(problems["rank"]))
    return plan


def _target(config: LoraConfig, path: str, module: nn.Module, mha: set[int], problems: dict) -> Target | None:
    """The Target for one selected module, or None with the reason filed under `problems`."""
    dims = linear_dims(module)
    if dims is None:
        problems["type"].append(f"{path} ({type(module).__name__})")
        return None
    if id(module) in mha:
        if config.target_modules != ALL_LINEAR:
            problems["mha"].append(path)
        return None
    d_in, d_out, fan_in_fan_out = dims
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    if r > min(d_in, d_out):
        problems["rank"].append(f"r={r} for {path} exceeds min(d_in={d_in}, d_out={d_out}) = {min(d_in, d_out)}; "
                                f"use r <= {min(d_in, d_out)} (set it for this module with rank_pattern)")
    if config.use_dora:
        dora_check_base(module, path)
    return Target(path, d_in, d_out, fan_in_fan_out, r, alpha, config.use_dora)


def _raise_problems(problems: dict) -> None:
    if problems["both"]:
        raise TargetError(f"{problems['both']} are both in target_modules and modules_to_save; a module either gets "
                          "an adapter or trains in full: remove it from one of the two")
    if problems["mha"]:
        raise TargetError(f"target_modules matched {problems['mha']}, the out_proj of nn.MultiheadAttention, which "
                          "reads out_proj.weight directly so an adapter there would never run; exclude it "
                          "(exclude_modules) or target other linears")
    if problems["type"]:
        raise TargetError("target_modules matched modules that are not nn.Linear or Conv1D: "
                          + ", ".join(problems["type"]) + "; target their linear sub-layers instead (e.g. 'q_proj') "
                          "or exclude them")


def _check_saved_found(model: nn.Module, config: LoraConfig, plan: Plan) -> None:
    missing = [m for m in config.modules_to_save or [] if not any(p.endswith(m) for p in plan.saved)]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in named_unwrapped(model)})
        close = sorted({c for m in missing for c in difflib.get_close_matches(m, names, n=5, cutoff=0.5)})
        raise TargetError(f"modules_to_save {missing} matched no module of {type(model).__name__}; "
                          f"closest names it has: {close or names[:20]}")


def _nothing_matched(model: nn.Module, config: LoraConfig) -> str:
    """A message listing the linear layer names the model does have, closest first."""
    linear_paths = [p for p, m in named_unwrapped(model) if linear_dims(m) is not None]
    names = sorted({p.rsplit(".", 1)[-1] for p in linear_paths})
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    close = []
    for want in wanted:
        close += difflib.get_close_matches(want.rsplit(".", 1)[-1], names, n=3, cutoff=0.4)
        close += difflib.get_close_matches(want, linear_paths, n=3, cutoff=0.6)
    filters = [f for f in ("exclude_modules", "layers_to_transform", "modules_to_save") if getattr(config, f)]
    hint = f" after applying {', '.join(filters)}" if filters else ""
    return (f"target_modules {config.target_modules!r} matched no linear layer of {type(model).__name__}{hint}. "
            f"Closest names it has: {sorted(set(close)) or '(none close)'}; all its linear layer names: {names}")


def check_adapter_name(model: nn.Module, name: str) -> None:
    """Raise AdapterError if `name` is not a usable new adapter name for this model."""
    check_name(name)
    if name in adapter_configs(model):
        raise AdapterError(f"adapter {name!r} is already in this model (adapters: {sorted(adapter_configs(model))}); "
                           "choose another name or call delete_adapter(model, name) first")


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default", trainable: bool = True) -> dict[str, nn.Module]:
    """Wrap the target linears of `model` in place with adapter `adapter`; freeze everything but adapters.

    The first adapter injected into a model becomes active; later ones wait for set_active().

    Returns:
        {module path: the original module} for each module this call replaced.
    Raises:
        AdapterError, TargetError, ConfigError: before the model is touched.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"inject() takes a rankdial.LoraConfig, got {type(config).__name__}")
    unwrap_model(model)  # a clear error for a model that is not an nn.Module
    check_adapter_name(model, adapter)
    config = with_task_heads(model, config)
    plan = plan_targets(model, config)
    check_bases([unwrap(model.get_submodule(t.path)) for t in plan.targets], config.init_lora_weights)
    return apply_plan(model, config, plan, adapter, trainable)


def apply_plan(model: nn.Module, config: LoraConfig, plan: Plan, adapter: str, trainable: bool,
               init: bool = True) -> dict[str, nn.Module]:
    """Carry out a Plan from plan_targets(): wrap, add the adapter, freeze the base. init=False leaves the
    adapter's tensors empty for a caller that copies weights in at once (no init drawn, no base rewritten)."""
    replaced: dict[str, nn.Module] = {}
    first = not adapter_configs(model)
    recorded = replace(config, fan_in_fan_out=any(t.fan_in_fan_out for t in plan.targets))
    for t in plan.targets:
        layer = model.get_submodule(t.path)
        if not isinstance(layer, LoraLayer):
            replaced[t.path] = layer
            layer = LoraLayer(layer)
            model.set_submodule(t.path, layer)
        layer.add_adapter(adapter, t.r, t.alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights,
                          config=recorded, init=init, use_dora=config.use_dora, loftq_config=config.loftq_config)
    for path in plan.saved:
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSave):
            replaced[path] = wrapper
            wrapper = ModulesToSave(wrapper)
            model.set_submodule(path, wrapper)
        wrapper.add_adapter(adapter, config=recorded)
    if config.target_parameters:
        replaced.update(inject_parameters(model, recorded, adapter, trainable=trainable))
    if first:
        for _, wrapper in named_wrappers(model):
            wrapper.set_active([adapter])
    _guard_save_pretrained(unwrap_model(model))
    freeze_base(model)
    for p in adapter_parameters(model, adapter):
        p.requires_grad_(trainable)
    return replaced


class _SavePretrainedGuard:
    """Stands in for model.save_pretrained while adapters are injected: transformers would write a checkpoint
    with base_layer./lora_A. keys that neither transformers nor PEFT can load. unload/merge_and_unload remove it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        if adapter_configs(self.model):
            raise AdapterError(
                "model.save_pretrained() would write LoRA wrapper keys (base_layer., lora_A.) that neither transformers "
                "nor PEFT can load. Save the adapter with rankdial.save_adapter(model, folder) (PEFT format), or a "
                "plain model with rankdial.merge_and_unload(model).save_pretrained(folder)")
        self.model.__dict__.pop("save_pretrained", None)
        return self.model.save_pretrained(*args, **kwargs)


def _guard_save_pretrained(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = _SavePretrainedGuard(model)


def adapter_parameters(model: nn.Module, adapter: str):
    """Every parameter that belongs to `adapter` (its A and B matrices and its modules_to_save copies)."""
    for _, wrapper in named_wrappers(model):
        if isinstance(wrapper, LoraLayer) and adapter in wrapper.lora_A:
            yield wrapper.lora_A[adapter].weight
            yield wrapper.lora_B[adapter].weight
            if adapter in wrapper.lora_magnitude_vector:
                yield wrapper.lora_magnitude_vector[adapter].weight
        elif isinstance(wrapper, ModulesToSave) and adapter in wrapper.modules_to_save:
            yield from wrapper.modules_to_save[adapter].parameters()
        elif isinstance(wrapper, ExpertLora) and adapter in wrapper.lora_A:
            yield from wrapper.lora_A[adapter].parameters()
            yield from wrapper.lora_B[adapter].parameters()


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter that belongs to no adapter."""
    owned = {id(p) for name in adapter_configs(model) for p in adapter_parameters(model, name)}
    owned |= {id(p) for _, w in named_wrappers(model) if isinstance(w, LoraLayer)
              for table in (w.lora_A, w.lora_B, w.lora_magnitude_vector) for p in table.parameters()}
    owned |= {id(p) for _, w in named_wrappers(model) if isinstance(w, ExpertLora)
              for table in (w.lora_A, w.lora_B) for p in table.parameters()}
    for p in model.parameters():
        if id(p) not in owned:
            p.requires_grad_(False)
