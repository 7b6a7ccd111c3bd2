"""The benchmarks' realistic model size: a Llama shape of about 0.5B parameters, random weights, no download.

    hidden 1024, 30 layers, 16 attention heads (16 KV heads, head_dim 64), MLP 4096, vocab 4096 (the embedded
    model's tokenizer, so every generated id decodes), tied embeddings, fp32: 508M parameters, ~2 GB.

Built with a fixed seed into a folder with the embedded model's tokenizer files, so `load_model` and PEFT load
it like any local model. Building and saving takes ~30-60 s on one core.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE_500M = dict(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=30,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=64)


def make_500m(folder: Path, seed: int = 0) -> Path:
    """Write the ~0.5B Llama (SHAPE_500M, random weights from `seed`) into `folder`; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankdial.train import default_model_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = default_model_path() / name
        if src.exists():
            (folder / name).write_bytes(src.read_bytes())
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPE_500M, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
