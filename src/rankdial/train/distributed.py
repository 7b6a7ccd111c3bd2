"""torchrun's process group for a training run: which process this is, its device, and a sum across them."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def pick_run_device(name: str, dist_info: Dist) -> torch.device:
    """This process's GPU under torchrun, else rankdial.models.pick_device's choice."""
    from ..models import pick_device

    if dist_info.world > 1 and torch.cuda.is_available() and name != "cpu":
        return torch.device("cuda", dist_info.local_rank)
    return pick_device(name)


def all_sum(value: float, dist_info: Dist, device) -> float:
    if dist_info.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(dist_info: Dist) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------------ FSDP (sharding="fsdp")

def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the longest nn.ModuleList whose entries are all one class (a Llama's
    model.layers, a GPT-2's transformer.h); [] when it has none."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if len(module) > len(best):
                best = list(module)
    return best


def _layers_to_wrap(model: torch.nn.Module, say) -> list[torch.nn.Module]:
    layers = decoder_layers(model)
    if not layers:
        say(f"sharding=fsdp: {type(model).__name__} has no repeated decoder layers to wrap; sharding the whole "
            "model as one unit (every weight is gathered for the whole forward and backward)")
    return layers


def fsdp_options(dist_info: Dist, device: torch.device, bf16: bool, reshard_after_forward: bool,
                 cpu_offload: bool) -> dict:
    """fully_shard's keyword arguments: a 1-D mesh of all processes; on CUDA with bf16, weights gathered in bf16
    and gradients reduced in fp32; CPU offload of the shards when asked (CUDA runs only, checked by the loop)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict = {"mesh": init_device_mesh(device.type, (dist_info.world,)),
                    "reshard_after_forward": reshard_after_forward}
    if bf16 and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def shard_model(model: torch.nn.Module, dist_info: Dist, device: torch.device, *, bf16: bool = False,
                reshard_after_forward: bool = True, cpu_offload: bool = False, say=print) -> None:
    """Shard `model` in place with FSDP2 over a 1-D mesh of all processes: fully_shard on each decoder layer,
    then on the root (embeddings, final norm, output head and anything outside the layers).

    Frozen weights shard as well as trainable ones (each process keeps 1/N of every parameter and gathers a
    layer's whole weights only while that layer runs); NF4 layers are first made shardable on whole
    quantization blocks (rankdial.quant.nf4_tensor). Gradients are reduce-scattered in fp32: on CUDA with bf16
    the weights are gathered in bf16 (MixedPrecisionPolicy) and reduced in fp32; on CPU everything is fp32
    (gloo's bf16 reductions are not reliable). Parameters are replaced by DTensors: build the optimizer after.
    """
    from torch.distributed.fsdp import fully_shard

    from ..quant.nf4_tensor import make_shardable

    make_shardable(model)
    kwargs = fsdp_options(dist_info, device, bf16, reshard_after_forward, cpu_offload)
    layers = _layers_to_wrap(model, say)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    say(f"sharding=fsdp: {len(layers)} decoder layers and the root sharded over {dist_info.world} processes")


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process must call it, in the same order); a tensor as is."""
    return t.full_tensor() if is_sharded(t) else t


def gather_parameters(model: torch.nn.Module, dist_info: Dist, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """{name: whole value} of the model's state_dict entries (only the trainable parameters with
    trainable_only: an adapter needs nothing else, and a sharded base may not fit one process) on the main
    process, {} on the others. Every process must call it. One tensor is gathered at a time."""
    out: dict[str, torch.Tensor] = {}
    entries = model.state_dict(keep_vars=True).items()
    for name, t in entries:
        if trainable_only and not t.requires_grad:
            continue
        value = full_value(t.detach())
        if dist_info.main:
            out[name] = value.to("cpu")
    return out


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module, dist_info: Dist, trainable_only: bool = False):
    """Within the block, on the main process, each sharded parameter of `model` is replaced by its whole value
    (so code that reads modules, such as save_adapter, sees the ordinary model); restored after. Yields the
    {name: tensor} of gather_parameters. Every process must enter it."""
    values = gather_parameters(model, dist_info, trainable_only)
    saved = []
    if dist_info.main:
        owners = dict(model.named_modules())
        for name, value in values.items():
            path, _, leaf = name.rpartition(".")
            module = owners.get(path)
            current = None if module is None else module._parameters.get(leaf)
            if current is not None and is_sharded(current):
                saved.append((module, leaf, current))
                module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=current.requires_grad)
    try:
        yield values
    finally:
        for module, leaf, current in saved:
            module._parameters[leaf] = current


# ------------------------------------------------------- loading straight into shards (no process holds the model)

def meta_model(path):
    """The model of folder `path` built on the meta device (no memory), or None when its weights are not in
    safetensors files under the model's own parameter names (then the ordinary loader is used: it also converts
    checkpoint layouts, such as Mixtral's per-expert w1/w2/w3 files for its stacked experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.loading import _safetensors_index, _weight_files, dtype_kwarg

    files = _weight_files(path)
    if files is None:
        return None
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch.float32))
    stored = {key for f in files for key in _safetensors_index(f)}
    if any(name not in stored for name, _ in model.named_parameters()):  # tied weights are named once
        return None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _lora_init_values(model) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """The values LoraLayer.add_adapter gives each adapter's (A, B), drawn from the CPU generator as inject()
    draws them on the CPU: so adapters injected on the meta device (which draws nothing) start exactly as in a
    process that loaded the whole model and injected there. Small: the adapters only."""
    import math

    from ..lora.init import initialise
    from ..lora.verbs import lora_layers

    out = {}
    for path, layer in lora_layers(model):
        for name in sorted(layer.configs, key=lambda n: layer.configs[n][0]):
            r = layer.lora_A[name].weight.shape[0]
            # nn.Linear(d_in, r) and nn.Linear(r, d_out) each draw their reset_parameters() init, then the
            # scheme's own draws (lora/init.initialise: none of these schemes reads or rewrites the base).
            a, b = torch.empty(r, layer.in_features), torch.empty(layer.out_features, r)
            for t in (a, b):
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            initialise(layer, a, b, layer.scaling[name], layer.configs[name][1].init_lora_weights)
            out[(path, name)] = (a, b)
    return out


def load_into_shards(model, path, dist_info: Dist, device: torch.device, *, qlora: bool, bf16: bool = False,
                     reshard_after_forward: bool = True, cpu_offload: bool = False, say=print) -> None:
    """Fill a meta-device `model` (adapters already injected) from the safetensors files of `path` one decoder
    layer at a time, sharding each with fully_shard as soon as it is whole (and, for QLoRA, quantized to NF4),
    then the rest and the root: each process's peak holds one whole layer plus its shards, never the model.
    The values are the ones load_model (load_model_nf4) + inject would give; the adapters' random start
    included (_lora_init_values)."""
    from torch.distributed.fsdp import fully_shard

    from ..errors import ModelError
    from ..layers import Wrapper, linear_dims
    from ..lora.verbs import lora_layers
    from ..models.loading import (_read_tensor, _release_freed_memory, _safetensors_index, _weight_files,
                                  rebuild_meta_buffers)
    from ..quant import quantize_nf4
    from ..quant.linear import NF4Linear, quantize_candidates
    from ..quant.nf4_tensor import make_shardable

    where = {}
    for f in _weight_files(path):
        for key, meta in _safetensors_index(f).items():
            where[key] = (f, meta)

    def file_key(name: str) -> str:
        return name.replace(".base_layer.", ".")

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise ModelError(f"{path} has no tensor {key}; the weights do not fit config.json")
        t = _read_tensor(*where[key]).to(device)
        return t.float() if t.is_floating_point() else t

    inits = _lora_init_values(model)
    adapters = {}
    for lpath, layer in lora_layers(model):
        for name in layer.lora_A:
            a, b = inits[(lpath, name)]
            adapters[f"{lpath}.lora_A.{name}.weight"] = a
            adapters[f"{lpath}.lora_B.{name}.weight"] = b

    def fill(unit: torch.nn.Module, prefix: str) -> None:
        if qlora:  # quantize the unit's linears from the file (the policy of quantize_model: not the head)
            for name, module, target, reason in quantize_candidates(unit):
                if reason is not None or not any(p.is_meta for p in target.parameters()):
                    continue
                full = f"{prefix}{name}"
                weight = read(file_key(f"{full}.weight"))
                weight = weight.t() if linear_dims(target)[2] else weight
                bias = read(file_key(f"{full}.bias")) if getattr(target, "bias", None) is not None else None
                new = NF4Linear(quantize_nf4(weight.contiguous()), bias)
                if isinstance(module, Wrapper) and target is not module:
                    module.replace_base(new)
                else:
                    unit.set_submodule(name, new)
                del weight, bias
        for mname, m in unit.named_modules():
            for kind, table in (("p", m._parameters), ("b", m._buffers)):
                for leaf, t in list(table.items()):
                    if t is None or not t.is_meta:
                        continue
                    full = f"{prefix}{mname + '.' if mname else ''}{leaf}"
                    if full in adapters:
                        value = adapters[full].to(device)
                    elif file_key(full) in where:
                        value = read(file_key(full))
                    else:
                        continue  # a non-persistent buffer (rotary inv_freq): rebuilt below
                    table[leaf] = torch.nn.Parameter(value, requires_grad=t.requires_grad) if kind == "p" else value
        _release_freed_memory()

    kwargs = fsdp_options(dist_info, device, bf16, reshard_after_forward, cpu_offload)
    names = {id(m): n for n, m in model.named_modules()}
    layers = _layers_to_wrap(model, say)
    for layer in layers:
        fill(layer, names[id(layer)] + ".")
        make_shardable(layer)
        fully_shard(layer, **kwargs)  # the whole layer's tensors are dropped here; its shards stay
    # The rest: embeddings, final norm, head. Tied weights were one meta Parameter: tie them again.
    tied = getattr(model.config, "tie_word_embeddings", False)
    fill(model, "")
    if tied:
        model.tie_weights()
    rebuild_meta_buffers(model, model.config, device)
    still = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise ModelError(f"{path}: could not load {still[:3]} into the sharded model")
    make_shardable(model)
    fully_shard(model, **kwargs)
    say(f"sharding=fsdp: {len(layers)} decoder layers and the root loaded straight into shards over "
        f"{dist_info.world} processes")
