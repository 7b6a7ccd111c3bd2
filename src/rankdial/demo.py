"""The LoRA round trip on a small model: inject, train, save, load, merge, and check each step.

This is the README's main job until the embedded pretrained default model lands: a tiny Llama-shaped
model (random weights from a fixed seed, characters as tokens) learns one sentence through a rank-r adapter.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import load_adapter, save_adapter
from .config import LoraConfig
from .lora import inject, merge_and_unload, trainable_parameters
from .quant import quantize_model, set_fused_inference

TEXT = "Low-rank adaptation: freeze W0, learn B times A, merge them back for free. "


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128) -> torch.nn.Module:
    """A small LlamaForCausalLM with random weights from `seed` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@dataclass
class RoundTrip:
    """What the round trip measured."""

    report: str
    losses: list[float]
    adapter_dir: Path
    load_max_diff: float
    merge_max_diff: float
    seconds: float


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def run_roundtrip(out_dir: str | Path, steps: int = 40, r: int = 8, seed: int = 0, qlora: bool = False,
                  log=print) -> RoundTrip:
    """Train a rank-r adapter on TEXT for `steps` AdamW steps, save, reload into a fresh base, merge; check outputs.

    With qlora=True the frozen base is first quantized to NF4 (the reloaded copy too) and the merge
    produces plain full-precision linears from the dequantized weights.
    """
    start = time.perf_counter()
    device = default_device()
    base = tiny_llama(seed).to(device).eval()
    if qlora:
        log(str(quantize_model(base)))
    model = copy.deepcopy(base)
    inject(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
    report = trainable_parameters(model)
    log(str(report))
    ids = torch.tensor([[min(ord(c), 127) for c in TEXT]], device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for step in range(steps):
        loss = _loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    for m in (model, base):  # compare on the exact fp32 path, not bitsandbytes' bf16 fused one
        set_fused_inference(m, False)
    adapter_dir = save_adapter(model, Path(out_dir) / ("qlora-adapter" if qlora else "adapter"))
    log(f"saved adapter to {adapter_dir}")
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, adapter_dir)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        load_diff = (reloaded(input_ids=ids).logits - trained).abs().max().item()
        merged = merge_and_unload(reloaded)
        merge_diff = (merged(input_ids=ids).logits - trained).abs().max().item()
    return RoundTrip(report.summary(), losses, adapter_dir, load_diff, merge_diff, time.perf_counter() - start)
