"""Memory: a rough estimate of what training a loaded model needs, and the one reader of a process's peak memory.

The estimate counts three terms: the stored weights and buffers as they are (fp32, NF4...), the trainable
state (fp32 gradient + AdamW's two moments: 12 bytes per trainable weight), and the activations kept for the
backward pass, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", arXiv:2205.05198): 34·s·b·h + 5·a·s²·b bytes per layer at 16 bit, doubled here for fp32.
A full planner (models not yet loaded, each method term by term) will grow from this module.
"""

from __future__ import annotations

import resource

import torch

MIB = 1 << 20


def estimate_loaded_model(model: torch.nn.Module, trainable: int, *, batch_size: int, max_length: int,
                          gradient_checkpointing: bool = False) -> dict[str, float]:
    """A rough breakdown in MiB of training `model` as loaded: weights, trainable state, activations, total."""
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    state = trainable * 4 * 3  # fp32 gradient + AdamW exp_avg + exp_avg_sq
    c = getattr(model, "config", None)
    h, layers = getattr(c, "hidden_size", 0), getattr(c, "num_hidden_layers", 0)
    heads = getattr(c, "num_attention_heads", 1)
    s, b = max_length, batch_size
    per_layer = 34 * s * b * h + 5 * heads * s * s * b  # 16-bit bytes per layer (Korthikanti et al. 2022)
    if gradient_checkpointing:  # each layer's input is kept; one layer's activations are rebuilt at a time
        act = 2 * s * b * h * 4 * layers + per_layer * 2
    else:
        act = per_layer * 2 * layers
    act += s * b * getattr(c, "vocab_size", 0) * 4 * 2  # logits and their fp32 gradient
    return {"weights_mib": weights / MIB, "train_state_mib": state / MIB, "activations_mib": act / MIB,
            "total_mib": (weights + state + act) / MIB}


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """This process's peak memory in MiB: CUDA's max_memory_allocated on a GPU, else the resident peak (VmHWM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    try:  # VmHWM: this process's own peak (ru_maxrss can carry a parent's peak across fork+exec)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
