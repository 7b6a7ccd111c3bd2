"""Measuring what a training run really holds, to check the memory planner (rankdial.memory) against it.

`measure_training_peak` trains a few AdamW steps on CPU and reports the resident-memory peak minus a baseline
taken after the imports and a warm-up step on a tiny model (the interpreter, imports and the first step's lazy
setup do not grow with the model). `measure_in_fresh_processes` runs each case in a fresh forked process.
`python -m rankdial.memory_measure measure '{"model": "default", "method": "lora"}'` runs one case.
"""

from __future__ import annotations

import json

from .memory import METHODS, LlamaShape, _choice, model_shape, process_status_bytes

def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 128 KiB: big blocks are mapped on allocation and unmapped on free, so the
    resident size tracks live tensors (the CPU analogue of CUDA's max_memory_allocated). By default glibc
    raises the threshold as big blocks are freed (up to 32 MiB), and the heap then keeps freed activations
    resident: ~25% more peak on these models, slack of the allocator rather than tensors that are alive."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap memory back, so the baseline holds live memory only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _build(shape: LlamaShape, method: str, rank: int, targets):
    """A random-weight LlamaForCausalLM of `shape` in fp32, prepared for `method` (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .config import LoraConfig
    from .lora import inject
    from .quant import quantize_model

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, head_dim=shape.dim_head, tie_word_embeddings=shape.tied,
                      use_cache=False)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    if method == "qlora":
        quantize_model(model)
    if method == "full":
        model.requires_grad_(True)
    else:
        inject(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    return model.train()


def _optimizer(params: list, optimizer: str):
    """torch's AdamW, or the 8-bit AdamW `rankdial train` uses for optimizer="adamw-8bit"."""
    import torch

    if optimizer == "adamw-8bit":
        from .train.pieces import adamw_8bit

        return adamw_8bit([{"params": params}], 1e-4, params[0].device)
    return torch.optim.AdamW(params, lr=1e-4)


def _steps(model, batch_size: int, seq_len: int, steps: int, vocab: int, optimizer: str = "adamw",
           loss_chunk: int | None = 0) -> None:
    import contextlib

    import torch

    from .train.loss import token_loss_sum

    opt = _optimizer([p for p in model.parameters() if p.requires_grad], optimizer)
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(steps):
        if loss_chunk is None:  # no output head at all: the floor the logits' share is measured from
            out = model.model(input_ids=ids).last_hidden_state.float().square().mean()
            out.backward()
        elif loss_chunk:
            out = token_loss_sum(model, batch, contextlib.nullcontext, loss_chunk)
            out.backward()
        else:
            out = model(input_ids=ids, labels=ids)  # kept during backward, as a caller of HF models usually does
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out


def _warm_up(method: str, rank: int, targets, optimizer: str = "adamw") -> None:
    """Two steps of `method` on a tiny model: lazy imports, kernel and autograd initialisation."""
    tiny = LlamaShape(hidden=64, layers=1, heads=2, kv_heads=2, ffn=128, vocab=128)
    _steps(_build(tiny, method, min(rank, 32), targets), 2, 16, 2, tiny.vocab, optimizer)


def measure_training_peak(model="default", method: str = "lora", rank: int = 16, targets="all-linear",
                          batch_size: int = 1, seq_len: int = 512, steps: int = 2, allocator: str = "live",
                          optimizer: str = "adamw", loss_chunk: int | None = 0) -> dict:
    """Measure, in THIS process, the resident-memory peak of a few fp32 AdamW steps on CPU, in bytes
    (optimizer="adamw-8bit": the 8-bit AdamW `rankdial train` builds; loss_chunk: 0 is transformers' own loss
    over the whole logits, N > 0 rankdial.train.loss's chunked one, None no output head at all).

    Run it in a fresh process (`python -m rankdial.memory_measure measure '{...}'`). The baseline is the resident
    memory after the interpreter, torch, transformers and rankdial are imported and one warm-up step of the
    same method has run on a tiny model (lazy imports, kernel and autograd initialisation: ~140 MB that does
    not grow with the model), then freed and trimmed. The model is then built with random weights and the
    peak counter (VmHWM) reset, so that the full-precision copy QLoRA quantizes from does not count. Returns
    {"peak": VmHWM - baseline, "model": resident after building - baseline, "baseline": baseline}.
    allocator: "live" makes glibc return freed big blocks at once (see _return_freed_memory), so the peak
    is that of live memory, which is what the planner predicts; "default" leaves glibc as it is, and the peak
    then also holds freed memory the heap kept. Linux only (reads /proc/self/status).
    """
    import time

    import torch

    _choice("allocator", allocator, ("live", "default"))
    t0 = time.perf_counter()
    if allocator == "live":
        _return_freed_memory()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = model_shape(model)
    _warm_up(method, rank, targets, optimizer)
    _trim()
    baseline = process_status_bytes("VmRSS")
    net = _build(shape, method, rank, targets)
    _trim()
    built, t1 = process_status_bytes("VmRSS"), time.perf_counter()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux 4.0+)
    except OSError:
        pass
    _steps(net, batch_size, seq_len, steps, shape.vocab, optimizer, loss_chunk)
    return {"peak": process_status_bytes("VmHWM") - baseline, "model": built - baseline, "baseline": baseline,
            "seconds": {"warmup+build": round(t1 - t0, 1), "steps": round(time.perf_counter() - t1, 1)}}


def measure_in_fresh_processes(cases: list[dict]) -> list[dict]:
    """measure_training_peak(**case) for each case, each in its own fresh process.

    One server process (`python -m rankdial.memory_measure serve`) imports torch, transformers and rankdial once and
    forks a new child per case, so each case starts clean without paying the imports again. A case that fails
    comes back as {"error": "..."}.
    """
    import subprocess
    import sys

    lines = "".join(json.dumps(case) + "\n" for case in cases)
    done = subprocess.run([sys.executable, "-m", "rankdial.memory_measure", "serve"], input=lines, capture_output=True,
                          text=True, check=False)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(results) != len(cases):
        raise RuntimeError(f"the measuring process returned {len(results)} of {len(cases)} results: {done.stderr[-2000:]}")
    return results


def _serve() -> None:
    """Read one case (JSON) per line from stdin; measure each in a child forked from this warm process."""
    import os
    import sys

    import torch

    torch.set_num_threads(1)  # no thread pool to carry across fork()
    for method in METHODS:  # lazy imports and kernel initialisation, once, before the forks
        _warm_up(method, 16, "all-linear")
    for line in sys.stdin:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                result = measure_training_peak(**json.loads(line))
            except Exception as err:  # noqa: BLE001 - reported to the parent, which raises nothing itself
                result = {"error": f"{type(err).__name__}: {err}"}
            os.write(write_end, json.dumps(result).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        print(answer or json.dumps({"error": "the measuring process died"}), flush=True)


def _main(argv: list[str]) -> int:
    if argv == ["serve"]:
        _serve()
        return 0
    if len(argv) != 2 or argv[0] != "measure":
        print("usage: python -m rankdial.memory_measure measure '{\"model\": \"default\", \"method\": \"lora\", ...}' | serve")
        return 2
    print(json.dumps(measure_training_peak(**json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
