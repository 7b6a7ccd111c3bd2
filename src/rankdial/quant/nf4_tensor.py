"""An NF4 linear layer whose 4-bit weight FSDP2 can shard: packed codes and block scales as parameters that
split on whole quantization blocks.

FSDP2 (torch.distributed.fsdp.fully_shard) shards a module's *parameters* along dim 0 (process i gets rows
[i·ceil(R/N), (i+1)·ceil(R/N)), the last one padded) and leaves buffers whole on every process. NF4Linear keeps
its weight in buffers (a flat byte string of codes and one scale per 64 weights), so FSDP would copy the whole
4-bit base into every process. ShardableNF4Linear keeps the same bytes as two frozen parameters that share
their dim 0, the block index:

    packed  uint8   (blocks, blocksize/2)   the codes of block b in row b (a trailing partial block zero-padded)
    absmax  uint8 or float32 (blocks,)     block b's scale (its 8-bit code when double-quantized)

so every shard holds whole blocks with their own scales, and FSDP's all-gather before a layer's forward (and
backward) rebuilds exactly the unsharded rows; the layer is freed again after (reshard_after_forward). What stays
whole on every process: the double-quantization constants (one float32 per 256 blocks, i.e. 4 bytes per 16384
weights, plus the offset and the 1 KiB code book per layer).

This is the storage route (bitsandbytes' bnb_4bit_quant_storage takes it for FSDP1: the quantized weight
stored as a plain tensor of a dtype FSDP can flatten), not torchao's: torchao's NF4Tensor is a tensor
subclass whose fsdp_pre_all_gather hook hands FSDP its plain inner tensors (codes and scales) to all-gather
and whose fsdp_post_all_gather hook wraps the gathered tensors back into an NF4Tensor; it needs the subclass
to implement the aten ops FSDP applies to a parameter (split, new_zeros, copy_, view, as_strided...). Here the
gathered rows are already a valid layout, so no hook is needed: the layer reads its parameters as they are.
The dequantized values are bit-identical to the NF4Linear it was made from (tests/quant/test_nf4_tensor.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import NF4Linear
from .nf4 import NF4Tensor


class ShardableNF4Linear(NF4Linear):
    """NF4Linear with its codes and scales stored as block-aligned frozen parameters (see the module doc)."""

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__(weight, bias, compute_dtype)
        bs, blocks = weight.blocksize, weight.absmax.numel()
        rows = torch.zeros(blocks * bs // 2, dtype=torch.uint8, device=weight.packed.device)
        rows[:weight.packed.numel()] = weight.packed
        del self._buffers["packed"], self._buffers["absmax"]
        self.packed = nn.Parameter(rows.view(blocks, bs // 2), requires_grad=False)
        self.absmax = nn.Parameter(weight.absmax.detach().clone(), requires_grad=False)

    @classmethod
    def from_nf4_linear(cls, layer: NF4Linear) -> "ShardableNF4Linear":
        new = cls(layer.quantized, layer.bias, layer.compute_dtype)
        new.fused_inference = layer.fused_inference
        return new.train(layer.training)

    @property
    def quantized(self) -> NF4Tensor:
        """The weight as NF4Linear holds it (views, no copy): valid while the parameters are whole (unsharded)."""
        n = self.out_features * self.in_features
        packed = self.packed.reshape(-1)[:(n + 1) // 2]
        return NF4Tensor(packed, self.absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                         self.blocksize, self.nested_absmax, self.nested_offset, self.nested_code)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", shardable=True"


def fsdp_keeps_frozen_integers(version: str | None = None) -> bool:
    """Whether this torch's FSDP2 can shard the uint8 codes: from torch 2.13 fully_shard rebuilds each shard as a
    Parameter with the original's requires_grad; torch 2.11 (seen on a CUDA machine) makes every shard a
    trainable Parameter, which an integer tensor cannot be ("only Tensors of floating point dtype can require
    gradients"). 2.12 is untested, so it is refused too."""
    major, minor = (int(x) for x in (version or torch.__version__).split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 13)


def make_shardable(model: nn.Module) -> int:
    """Replace every NF4Linear of `model` (inside LoRA wrappers too) by a ShardableNF4Linear; returns how many.
    ConfigError, before anything is replaced, on a torch whose FSDP2 cannot shard integer parameters."""
    from ..errors import ConfigError
    from ..layers import Wrapper

    if not fsdp_keeps_frozen_integers() and any(type(m) is NF4Linear for m in model.modules()):
        raise ConfigError(f"QLoRA with sharding='fsdp' needs torch >= 2.13 (this is {torch.__version__}, whose FSDP2 "
                          "makes the NF4 codes' shards trainable, which integers cannot be); upgrade torch, or use "
                          "sharding = \"ddp\"")
    count = 0
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is NF4Linear:
                new = ShardableNF4Linear.from_nf4_linear(child)
                if isinstance(module, Wrapper) and module.base_replaceable and module.wrapped() is child:
                    module.replace_base(new)
                else:
                    setattr(module, name, new)
                count += 1
    return count
