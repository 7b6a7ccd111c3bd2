"""The chunked loss (train/loss.py) against the plain computation: loss and gradients equal within fp32 rounding,
the whole logits tensor never built, and the plain loss wherever chunking would not be exact."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model, token_batch
from rankdial import LoraConfig
from rankdial.lora import inject
from rankdial.train.loss import chunkable_head, chunked_linear_cross_entropy, plain_token_loss_sum, token_loss_sum
from contextlib import nullcontext


def _reference(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("n,h,v,chunk,bias", [(37, 24, 53, 8, True), (64, 16, 101, 64, False), (5, 8, 31, 1, True),
                                               (19, 12, 40, 1000, False)])
def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradients(n, h, v, chunk, bias):
    g = torch.Generator().manual_seed(n * v + chunk)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g).mul_(0.3).requires_grad_(True)
    b = torch.randn(v, generator=g).requires_grad_(True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.3] = -100  # rows without a target
    ours = chunked_linear_cross_entropy(hidden, weight, b, targets, chunk)
    got = torch.autograd.grad(ours * 1.7, [hidden, weight] + ([b] if bias else []))
    ref = _reference(hidden, weight, b, targets)
    want = torch.autograd.grad(ref * 1.7, [hidden, weight] + ([b] if bias else []))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_no_gradient_wanted_gives_the_loss_alone():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (9,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy(hidden, weight, None, targets, 4),
                                   _reference(hidden, weight, None, targets), rtol=1e-6, atol=1e-5)


def _batch(vocab=96, seed=1):
    ids = token_batch(vocab, seed=seed, batch=3, length=11)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100  # a prompt without targets
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model, loss):
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("method", ["lora", "full", "full-tied"])
def test_token_loss_sum_chunked_equals_plain_on_a_model(method):
    import transformers as tf

    if method == "full-tied":
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   tie_word_embeddings=True))
    else:
        model = tiny_model("llama")
    model.train()
    if method == "lora":
        inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for n, p in model.named_parameters():  # B = 0 at init would leave A's gradient zero: give B values
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    else:
        model.requires_grad_(True)
    batch = _batch()
    plain = plain_token_loss_sum(model, batch, nullcontext)
    want = _grads(model, plain)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    ours = token_loss_sum(model, batch, nullcontext, chunk=5)
    handle.remove()
    got = _grads(model, ours)
    assert seen == [(3, 0, 96)]  # the head never computed logits for the whole batch
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-5)
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_plain_loss_where_chunking_would_not_be_exact():
    gpt2 = tiny_model("gpt2")  # not a model type whose forward was read
    assert chunkable_head(gpt2) is None
    llama = tiny_model("llama")
    assert chunkable_head(llama) is llama.lm_head
    inject(llama, LoraConfig(r=4, target_modules=["lm_head"]))  # an adapter on the head: its output is not W h
    assert chunkable_head(llama) is None
    batch = _batch()
    torch.testing.assert_close(token_loss_sum(llama, batch, nullcontext, chunk=4),
                               plain_token_loss_sum(llama, batch, nullcontext))


def test_loss_chunk_zero_or_positive():
    from rankdial import ConfigError
    from rankdial.train.config import TrainConfig

    assert TrainConfig(data="x.jsonl").loss_chunk == 1024  # on by default
    with pytest.raises(ConfigError, match="loss_chunk=-1"):
        TrainConfig(data="x.jsonl", loss_chunk=-1)


def test_under_bf16_autocast_the_chunked_loss_follows_the_plain_one():
    model = tiny_model("llama").train()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = _batch()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    plain = plain_token_loss_sum(model, batch, autocast)
    want = _grads(model, plain)
    ours = token_loss_sum(model, batch, autocast, chunk=5)
    got = _grads(model, ours)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-3, atol=1e-2)  # both round the logits to bf16 the same way
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-2, atol=2e-3, msg=k)


def test_a_training_run_uses_the_chunked_loss_by_default(tiny_model_dir, tmp_path, monkeypatch):
    import rankdial.train.loop as loop
    from conftest import qa_rows, write_jsonl
    from rankdial.train import train

    chunks = []
    real = loop.token_loss_sum
    monkeypatch.setattr(loop, "token_loss_sum", lambda *a: chunks.append(a[3]) or real(*a))
    train(model=str(tiny_model_dir), data=str(write_jsonl(tmp_path / "d.jsonl", qa_rows(8))), steps=1, batch_size=4,
          max_length=32, output_dir=str(tmp_path / "out"), progress=False, log=lambda *a: None)
    assert chunks == [1024]
