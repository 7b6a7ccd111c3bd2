"""The README's main job: fine-tune the embedded default model with LoRA and QLoRA and show what changed.

`rankdial demo` trains two adapters on the bundled sample data (Python docstring Q&A; the base model only
knows King James English), each through the real `rankdial train` command in its own process (so its
progress bar, timing and peak memory are its own); then the base and both adapters answer the same prompts
side by side, the LoRA adapter is merged into a plain model that must answer identically, and a table sums it
up. `rankdial demo --tiny` runs the older seconds-long round trip on a random tiny Llama.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import load_adapter, save_adapter
from .config import LoraConfig
from .errors import TrainingError
from .lora import inject, merge_and_unload, trainable_parameters
from .models import pick_device
from .quant import quantize_model, set_fused_inference

TEXT = "Low-rank adaptation: freeze W0, learn B times A, merge them back for free. "


# ------------------------------------------------------------------------------------- the real demo

def _train_subprocess(method: str, out: Path, steps: int, device: torch.device, log) -> dict:
    from .train import default_samples_path

    samples = default_samples_path()
    cmd = [sys.executable, "-m", "rankdial.cli", "train", "--model", "default", "--method", method,
           "--data", str(samples / "pydoc_qa.jsonl"), "--eval-data", str(samples / "pydoc_qa_eval.jsonl"),
           "--output-dir", str(out), "--steps", str(steps), "--batch-size", "16", "--lr", "2e-3",
           "--max-length", "64", "--r", "16", "--lora-alpha", "32", "--eval-every", str(max(1, steps // 4)),
           "--warmup-ratio", "0.05", "--device", str(device), "--overwrite"]
    log(f"$ rankdial train --method {method} --data samples/pydoc_qa.jsonl --steps {steps} ... "
        f"--output-dir {out}")
    proc = subprocess.run(cmd, stdout=sys.stdout, stderr=sys.stderr)
    if proc.returncode != 0:
        raise TrainingError(f"the demo's `rankdial train --method {method}` failed with exit code {proc.returncode} "
                            "(its error is printed above)")
    return json.loads((out / "summary.json").read_text())


def run_demo(out_dir: str | Path = "out/demo", steps: int = 300, log=print, device: str = "auto") -> bool:
    """Train LoRA and QLoRA adapters on the default model, compare outputs, merge; True when every check holds.

    Training, comparison and merge all run on one device (pick_device: CUDA when there is a GPU).
    """
    from .compare import compare, load_variants
    from .train import default_samples_path

    start = time.perf_counter()
    where = pick_device(device)
    out = Path(out_dir)
    summaries = {}
    for method in ("lora", "qlora"):
        log(f"\n== {method.upper()} fine-tune of the default model (kjv-llama-tiny) on {where} ==")
        summaries[method] = _train_subprocess(method, out / method, steps, where, log)

    samples = default_samples_path()
    held = [json.loads(l) for l in (samples / "pydoc_qa_eval.jsonl").read_text().splitlines()[:3]]
    seen = json.loads((samples / "pydoc_qa.jsonl").read_text().splitlines()[0])
    prompts = [h["prompt"] for h in held] + [seen["prompt"], "And the LORD said unto Moses,"]
    log("\n== the same prompts, greedy decoding: base, LoRA adapter, QLoRA adapter ==")
    net, tok, variants = load_variants("default", [str(out / "lora"), str(out / "qlora")], device=str(where))
    variants[1].label, variants[2].label = "LoRA", "QLoRA"
    rows = compare(net, tok, variants, prompts, max_new_tokens=32)
    expected = {h["prompt"]: h["completion"] for h in held + [seen]}
    for row in rows:
        log(f"\nprompt: {row['prompt']!r}" + ("   (held out of training)" if row["prompt"] in
                                                 [h["prompt"] for h in held] else ""))
        if row["prompt"] in expected:
            log(f"  {'docstring':>9} | {expected[row['prompt']]}")
        for label, text in row["outputs"].items():
            log(f"  {label.split(' ')[0]:>9} | {text.strip()[:110]}")

    log("\n== merge the LoRA adapter into a plain model folder ==")
    merged_dir, diff, same_text = merge_check(out, net, tok, variants[1].adapter, prompts[0],
                                              rows[0]["outputs"]["LoRA"], where)
    log(f"merged model: {merged_dir} (loads with transformers' AutoModelForCausalLM)")
    log(f"  max |logit difference| merged vs base+adapter: {diff:.2e}; same greedy answer: {same_text}")

    log("\n== summary ==")
    log(f"{'method':<7} {'trainable':>10} {'trainable%':>10} {'peak RSS':>9} {'time':>7} {'tokens/s':>9} "
        f"{'eval loss before -> after':>27}")
    ok = diff < 1e-3 and same_text
    for method, s in summaries.items():
        before, after = s["eval_losses"][0][1], s["eval_losses"][-1][1]
        ok &= after < before
        log(f"{method:<7} {s['trainable_params']:>10,} {s['trainable_percent']:>9.2f}% {s['peak_memory_mb']:>6.0f} MB "
            f"{s['seconds']:>6.1f}s {s['tokens_per_second']:>9,.0f} {before:>12.3f} -> {after:.3f}")
    log(f"\nadapters (PEFT format): {out / 'lora'}, {out / 'qlora'}; loss plots: {out / 'lora' / 'loss.png'}, "
        f"{out / 'qlora' / 'loss.png'}")
    log(f"demo {'OK' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return ok


def merge_check(out: Path, net, tok, adapter: str, prompt: str, answer: str, device: torch.device):
    """Merge out/lora into out/merged on `device`, reload it there; (folder, max |logit diff| against `net`
    with `adapter` active, whether its greedy answer to `prompt` equals `answer`)."""
    from .compare import max_logit_diff, sample
    from .export import merge_to_folder
    from .lora import set_active
    from .models import load_model

    merged_dir = merge_to_folder(out / "lora", out / "merged", model="default", device=str(device))
    merged, mtok = load_model(merged_dir, device)
    set_active(net, adapter)  # the shared model holds both adapters; compare with this one
    diff = max_logit_diff(merged, net, tok, prompt)
    return merged_dir, diff, sample(merged, mtok, prompt, max_new_tokens=32) == answer


# ------------------------------------------------------------------------------- the tiny round trip

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
                  log=print, device: str = "auto") -> RoundTrip:
    """Train a rank-r adapter on TEXT for `steps` AdamW steps, save, reload into a fresh base, merge; check outputs.

    With qlora=True the frozen base is first quantized to NF4 (the reloaded copy too) and the merge
    produces plain full-precision linears from the dequantized weights.
    """
    start = time.perf_counter()
    device = pick_device(device)
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
