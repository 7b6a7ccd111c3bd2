"""The training loss: next-token cross-entropy summed over target tokens, computed in chunks of rows.

    loss = Σ_t [ logsumexp(W h_t + b) − (W h_t + b)[y_t] ]       over the positions t with a target y_t

A plain loss materialises the logits of every position, [batch × sequence × vocab] in fp32, and autograd
keeps them (and the log-softmax) until backward: at vocab 32k and 8×512 tokens that is ~0.5 GB per copy.
`chunked_linear_cross_entropy` applies the output head to `chunk` rows at a time and, in the same pass, writes
the gradients of the hidden states and of the head (d loss / d logits = softmax − onehot, never stored whole),
so at most one chunk's logits exist at once and backward only scales what was written (as in Liger-Kernel's
fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989). Rows without a target are skipped.

The model still runs its own forward (through DDP, hooks and all): a pre-hook on the output head takes the
final hidden states and hands the head an empty slice, so the logits it returns are [batch, 0, vocab]. That is
exact only for models whose forward does nothing to the logits after the head; CHUNKABLE_MODEL_TYPES lists
those whose forward was read, and any other model (or a head wrapped by an adapter) gets the plain loss.
`plain_token_loss_sum` is the reference the tests hold it to.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE = -100
# transformers models whose CausalLM forward is `logits = lm_head(hidden[:, keep])`, nothing after it (no
# softcapping as in Gemma 2, no logit_scale as in Cohere, no division as in Granite).
CHUNKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "phi3")

__all__ = ["token_loss_sum", "plain_token_loss_sum", "chunked_linear_cross_entropy", "chunkable_head"]


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1 and the last position predicts nothing. (Shifting the labels, not the
    logits: slicing the logits would copy a batch x length x vocab tensor.)"""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


def plain_token_loss_sum(model, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    """The reference: the whole fp32 logits tensor, then F.cross_entropy summed over target tokens."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted_labels(batch["labels"]).reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast, chunk: int = 0) -> torch.Tensor:
    """Sum over target tokens of the next-token cross-entropy (fp32): in chunks of `chunk` rows where the model
    allows it exactly (see chunkable_head), else (or with chunk=0) the plain computation."""
    head = chunkable_head(model) if chunk else None
    if head is None:
        return plain_token_loss_sum(model, batch, autocast)
    with autocast(), _head_input(head) as captured:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden, targets = captured[0], shifted_labels(batch["labels"])
    rows = (targets != IGNORE).reshape(-1).nonzero().squeeze(1)  # only rows with a target reach the head
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (n, h)
    with autocast():
        return chunked_linear_cross_entropy(hidden, head.weight, head.bias, targets.reshape(-1)[rows], chunk)


def chunkable_head(model) -> torch.nn.Linear | None:
    """The model's output head if the chunked loss is exact for it: a plain nn.Linear (not an adapter or a
    quantized layer, not a sharded FSDP weight) of a model type in CHUNKABLE_MODEL_TYPES; else None."""
    model = getattr(model, "module", model)  # DDP
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in CHUNKABLE_MODEL_TYPES or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or type(head.weight.data) is not torch.Tensor:
        return None
    return head


@contextlib.contextmanager
def _head_input(head: torch.nn.Module):
    """Inside the block the head's input is appended to the yielded list and the head sees an empty slice of it."""
    captured: list[torch.Tensor] = []

    def take(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield captured
    finally:
        handle.remove()


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ_i CE(hidden[i] @ weightᵀ + bias, targets[i]) over rows i with targets[i] != -100, in fp32, computed
    `chunk` rows at a time. hidden (n, h), weight (V, h), bias (V,) or None, targets (n,)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward writes the loss and, where needed, d loss/d hidden and d loss/d weight (and bias); backward scales
    them by the incoming gradient. Only one chunk's (chunk, V) logits are alive at any time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for lo in range(0, hidden.shape[0], chunk):
            h = hidden[lo:lo + chunk]
            loss, d = _chunk(h, weight, bias, targets[lo:lo + chunk], need_h or need_w or need_b)
            total += loss
            if need_h:
                grad_h[lo:lo + chunk] = d @ weight.to(d.dtype)  # (c, h)
            if need_w:
                grad_w += (d.t() @ h.to(d.dtype)).float()  # (V, h)
            if need_b:
                grad_b += d.float().sum(0)
            del d  # before the next chunk's logits exist: one chunk's buffers at a time
        # kept on ctx, not save_for_backward: they are results computed here, not inputs or outputs
        ctx.grads, ctx.dtypes = (grad_h, grad_w, grad_b), (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else (g * grad_out).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return grads[0], grads[1], grads[2], None, None


def _chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, grad: bool):
    """One chunk's summed loss and, if `grad`, d loss/d logits = softmax − onehot (rows without a target: 0),
    in the logits' dtype. Alive at most: the (c, V) logits and one fp32 (c, V) buffer."""
    logits = F.linear(h, weight, bias)  # (c, V), in the autocast dtype if any, as the plain head's
    valid = y != IGNORE
    safe = torch.where(valid, y, 0)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (c, V) fp32, as F.cross_entropy computes it
    loss = -logp.gather(1, safe[:, None]).squeeze(1).masked_fill(~valid, 0.0).sum()
    if not grad:
        return loss, None
    dtype = logits.dtype
    del logits
    d = logp.exp_()  # the softmax, in place
    d[torch.arange(len(y), device=y.device), safe] -= 1.0
    d.masked_fill_(~valid[:, None], 0.0)
    return loss, d.to(dtype)
