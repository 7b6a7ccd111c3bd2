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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from ..quant.nf4_tensor import make_shardable

    make_shardable(model)
    mesh = init_device_mesh(device.type, (dist_info.world,))
    kwargs: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if bf16 and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        say(f"sharding=fsdp: {type(model).__name__} has no repeated decoder layers to wrap; sharding the whole "
            "model as one unit (every weight is gathered for the whole forward and backward)")
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
