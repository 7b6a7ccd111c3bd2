"""Serving many LoRA adapters on one base: the engine's greedy decoding against its peers, one run.

On the embedded default model (kjv-llama-tiny), a fixed set of requests (mixed prompt lengths and max_tokens,
greedy) all submitted at once; tokens/s = completion tokens / wall time, latency = submit to last token.
  engine_k      rankdial's Engine with k = 1, 8, 32, 128 distinct adapters in the mix (r=8, all linears)
  base          the same engine, every request on the base
  swap          one request at a time: load its adapter, generate, unload (the classic per-request swap)
  peft_mixed    PEFT's mixed batch: peft_model.generate(..., adapter_names=[...]), one static batch, 32 adapters
  hf_generate   transformers' static-batch model.generate on the base (left-padded, one batch)
  hf_generate_batch  transformers' continuous batching (model.generate_batch) on the base
Time to first token: a burst of 64 requests (the same prompts and max_tokens) submitted at once, on the base and
with 32 adapters, each read through its Handle's events() by its own thread; TTFT = the request's submit() to the
first token event that thread sees; p50 and p99 over the 64 (p99 of 64 is the slowest). One burst per mix,
after the tokens/s rounds (the tokens/s runs use result(), which does not wake at every token).
Loading: registry.load of a fresh adapter vs the faster of safetensors.load_file's readers of its file (mmap,
pread; load_ratio_vs_raw_read), and vs the default mmap read alone (load_ratio_vs_mmap_read).
Memory: base + 32 adapters vs 32 merged copies, computed from the tensors' bytes (numel x element size of the
base's parameters and of the adapters' A and B), not measured from the process.
Rounds: every configuration (engine mixes, base, swap, peft_mixed, hf_generate, hf_generate_batch) runs ROUNDS
times and reports its best round (the machine is shared: the slow round is noise); the engine mixes and
hf_generate interleave within a round.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py --quick     # ~2 minutes on one core
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py --quick --model 0.5b   # ~7 minutes on one core
--model 0.5b: the ~0.5B Llama shape of model_shapes.py (hidden 1024, 30 layers, 16 heads, MLP 4096, vocab 4096,
508M parameters, random weights from seed 0, built into a temporary folder; no download): 32 requests (64 full),
32 adapters (no 128 mix), swap on 4 (8 full); in quick mode 1 round and no generate_batch.

Ends with one JSON line of figures and ratios.

Figures (2-core machine shared by 5 people; rounds of the same configuration differ by up to 2x, so ratios only):
  `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py` (full, 128 requests, after the runner/loading
  work of h-engine's second pass): ratio_32_vs_base 0.90, speedup_vs_swap 9.8, speedup_vs_peft_mixed 2.0,
  base_speedup_vs_transformers 0.89 (engine base 730 tok/s vs static-batch generate 821; generate_batch 111),
  load_ratio_vs_raw_read 4.2 (16.0 ms vs 3.8 ms), p99_ms_32_adapters 3827, memory merged/adapters 14.7x.
  `... --quick` just before (64 requests): base_speedup_vs_transformers 0.91, load_ratio_vs_raw_read 4.2
  (17 ms vs 4.2 ms; it was 6.7, 26 ms, before add_adapter(init=False) and gc freezing).
  `... --quick` (64 requests), after the runner re-slots the routed stacks when rows leave or join instead of
  calling route() again (h-perf; route() re-keyed 128 adapters' stacks in every layer, ~50 ms per batch change):
  base_speedup_vs_transformers 1.49 (engine base 1,241 tok/s vs static-batch generate 831; generate_batch 72),
  ratio_32_vs_base 0.70 (870 tok/s; rounds 870/566, base 1,241/507), speedup_vs_swap 14.5, speedup_vs_peft_mixed
  6.5, load_ratio_vs_raw_read 4.2 (15.0 ms vs 3.6 ms), p99_ms_32_adapters 1470, memory merged/adapters 14.7x.
  The run before it: base_speedup_vs_transformers 1.39, ratio_32_vs_base 0.69. Profiled synchronously (same
  process, 64 requests): engine base 1,130 -> 1,610 tok/s against generate's 1,140-1,310.
  `... --quick` after batched_lora's grouped path (h-perf2): ratio_32_vs_base 0.68 (760 vs 1,126 tok/s), 1 adapter
  0.78, 8 adapters 0.74, base_speedup_vs_transformers 1.11, speedup_vs_swap 9.9, speedup_vs_peft_mixed 4.5,
  load_ratio_vs_raw_read 4.2. Same-process forward A/B (64 rows, 1 token): grouped vs gather equal with 32
  adapters (0.82/0.81 of base), 0.83 vs 0.67 with 4; 1 adapter at 0.78 says the rest is per-layer overhead.
  `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py` (full, 128 requests, the end of the session, a
  quiet machine; quoted in README): ratio_32_vs_base 0.80 (786 vs 980 tok/s), speedup_vs_swap 10.2,
  speedup_vs_peft_mixed 2.5, base_speedup_vs_transformers 0.85 (generate 1,150 tok/s; generate_batch 170),
  load_ratio_vs_raw_read 3.5 (10.1 ms vs 2.9 ms; after add_adapter's template-built modules and the fused
  non-finite check), p99_ms_32_adapters 3188, memory merged/adapters 14.7x.
  A same-process check alternating the engine (stepped synchronously and threaded) with generate, 3 times,
  gave engine/generate 0.65, 1.5-1.8, 1.0-1.1: the base comparison is within this machine's noise.
  `... --quick` before and after the adapters' storage moved into per-rank stacks (the registry's one copy, loaded
  straight from the file), the preallocated slot KV cache and route() reuse (h-B; run back to back, same machine):
  before  base 2,492 tok/s, 32 adapters 1,888 (ratio_32_vs_base 0.76), 128 adapters 1,734 (0.70),
          base_speedup_vs_transformers 1.02, load_ratio_vs_raw_read 3.75 (3.3 ms vs 0.88 ms)
  after   base 2,847 tok/s, 32 adapters 1,987 (ratio_32_vs_base 0.70), 128 adapters 1,861 (0.65),
          base_speedup_vs_transformers 1.18, load_ratio_vs_raw_read 2.67 (2.3 ms vs 0.87 ms)
  Every engine figure rose (base +14%, 32 adapters +5%, 128 +7%; generate 2,439 -> 2,417); the ratios fell because
  the base rose most. Three other after-runs that session: ratio_32 0.72/0.67/0.82, ratio_128 0.67/0.62/0.79,
  load 2.9/2.9/2.9, base_speedup 0.97/1.27/1.01 (one earlier before-run: 0.65, 0.65, 3.7, 1.09): rounds differ more
  than the change.
  `OMP_NUM_THREADS=1 heavy .venv/bin/python benchmarks/bench_serve.py --quick --model 0.5b` (h-S; the ~0.5B shape of
  model_shapes.py, 32 requests, 32 adapters, 1 round, ~7 minutes on one core of the shared machine):
  base 32.9 tok/s, 1 adapter 24.7, 8 adapters 24.9, 32 adapters 21.9: ratio_32_vs_base 0.67 (ratio_128_vs_base not
  run: 128 adapters of this shape hold 2.7 GB), base_speedup_vs_transformers 1.18 (static generate 28.0 tok/s;
  generate_batch skipped in this quick mode), speedup_vs_swap 5.0 (4.4 tok/s), speedup_vs_peft_mixed 1.49 (14.7),
  load_ratio_vs_raw_read 3.8 (30.0 ms vs 7.9 ms), p50/p99 ms base 14,146/19,479, 32 adapters 20,328/29,207,
  memory merged/adapters 23.6x. One adapter already costs 25% at this size, where the LoRA terms are ~1% of the
  flops: not profiled yet (one round on a shared machine; the next thing to look at).
  `OMP_NUM_THREADS=1 heavy .venv/bin/python benchmarks/bench_serve.py --quick --compile` against the same without
  --compile (h-S; the two ran at the same time, one core each, so compare each run's ratios, not its tok/s):
  compiled: warm-up 34.8 s at start-up, base 2,184 tok/s (its first round 45.7: compiling), 32 adapters 1,559,
  128 adapters 1,139, ratio_32_vs_base 0.71, ratio_128_vs_base 0.52, base_speedup_vs_transformers 1.31, load 2.7;
  torch._dynamo hit its recompile limit (8) in the first round (each new adapter mix recompiles the routed LoRA),
  past which the decode step ran eagerly. Eager: base 2,897, 32 adapters 1,979, 128 adapters 1,622,
  ratio_32_vs_base 0.68, ratio_128_vs_base 0.56, base_speedup_vs_transformers 1.21, load 2.9.
  No win from compile on this CPU: `rankdial serve` keeps it off by default (serve.runner.COMPILE_OFF_REASON).
  `OMP_NUM_THREADS=1 heavy .venv/bin/python benchmarks/bench_serve.py --quick` before and after h-Q's in-place
  groups in batched_lora (one adapter on every row, or groups in slot order: no gather of x, no index_add_), back to
  back: before base 2,255 tok/s, 1 adapter 1,795 (0.80), 32 adapters 1,501 (ratio_32_vs_base 0.67), 128 adapters
  1,372 (0.61), TTFT p50/p99 of a 64-request burst: base 134/193 ms, 32 adapters 156/209 ms; after base 2,147,
  1 adapter 1,822 (0.85), 32 adapters 1,460 (0.68), 128 adapters 1,435 (0.67), TTFT base 129/150 ms, 32 adapters
  156/206 ms. Per engine step (same process, stepped synchronously, best of 3; default model, 128 adapters
  loaded): prefill of the 64 prompts base 109 ms, 1 adapter 138, 32 adapters 161; a decode step of 64 rows 19.1,
  22.4, 26.5 ms (128 adapters: 28.3), of 16 rows 10.2, 12.3, 14.9 ms. 32 r=8 all-linear adapters of this model
  hold 21 MB against the base's 17.8 MB, so a decode step that serves them all reads 2.2x the base's bytes.
  `OMP_NUM_THREADS=1 heavy .venv/bin/python benchmarks/bench_serve.py --quick --model 0.5b` (h-Q, after; one round,
  both cores busy): base 22.0 tok/s, 1 adapter 23.7, 8 adapters 23.6, 32 adapters 21.6 (ratio_32_vs_base 0.98: one
  round, within its noise), static generate 20.9 (base_speedup_vs_transformers 1.06), speedup_vs_swap 5.1,
  speedup_vs_peft_mixed 1.8, load_ratio_vs_raw_read 3.1 (37.5 vs 12.1 ms); TTFT p50/p99 of the 64-request burst:
  base 10,110/10,126 ms, 32 adapters 10,998/11,010 ms: the 64 prompts are prefilled in one forward (~770 tokens
  through 0.5B parameters on one core), so every request's first token comes at its end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

PROMPTS = ["In the beginning God created", "And the LORD said unto Moses, Speak unto the children of Israel, that they",
           "Jesus wept", "Blessed are the meek: for they shall", "The LORD is my shepherd; I shall not want. He maketh me",
           "And it came to pass, when the men of the city saw", "Let there be light", "Honour thy father and thy mother"]
RANK = 8
ROUNDS = 2  # every configuration: best of this many


def requests(n: int) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs: prompts of 2-20 tokens, 8-32 new tokens, fixed."""
    return [(PROMPTS[k % len(PROMPTS)], (8, 16, 24, 32)[(k * 3) % 4]) for k in range(n)]


def make_adapters(root: Path, n: int, model_path: str = "default") -> list[str]:
    import rankdial as rd
    from rankdial.lora import lora_layers
    from rankdial.models import load_model, resolve_model

    model, _ = load_model(resolve_model(model_path))
    rd.inject(model, rd.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"), adapter="default")
    names = []
    for k in range(n):
        torch.manual_seed(k)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].weight.normal_(0, 0.3 / RANK ** 0.5)
        rd.save_adapter(model, root / f"ad{k}", "default")
        names.append(f"ad{k}")
    return names


def run_engine(engine, reqs, adapters) -> dict:
    from rankdial.serve import SamplingParams

    t0 = time.perf_counter()
    handles = [engine.submit(p, a, SamplingParams(max_tokens=m, temperature=0)) for (p, m), a in zip(reqs, adapters)]
    lat, counts = [], []

    def wait(h):  # one waiter per request, so each latency is its own finish time
        counts.append(h.result(timeout=600).completion_tokens)
        lat.append(time.perf_counter() - t0)

    waiters = [threading.Thread(target=wait, args=(h,)) for h in handles]
    [w.start() for w in waiters]
    [w.join() for w in waiters]
    wall, tokens = time.perf_counter() - t0, sum(counts)
    return {"tps": tokens / wall, "tokens": tokens, "wall_s": wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * sorted(lat)[min(len(lat) - 1, int(0.99 * len(lat)))]}


def _cpu() -> dict:
    """What this machine runs the fp32 matmuls with (the kernels torch picks differ by CPU: AVX512 or not)."""
    from rankdial.quant.kernels import has_avx512_bf16

    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": has_avx512_bf16(),
            "torch": torch.__version__}


def run_ttft(engine, reqs, adapters) -> dict:
    """Submit the burst at once; the time from each request's submit() to its first token event as its reader sees
    it (Handle.events()), and to its last."""
    from rankdial.serve import SamplingParams

    first, last = [], []

    def read(h, t0):
        seen = None
        for event in h.events(timeout=600):
            if seen is None:
                seen = time.perf_counter() - t0
        first.append(seen)
        last.append(time.perf_counter() - t0)

    submitted = []
    for (p, m), a in zip(reqs, adapters):
        submitted.append((time.perf_counter(), engine.submit(p, a, SamplingParams(max_tokens=m, temperature=0))))
    readers = [threading.Thread(target=read, args=(h, t0)) for t0, h in submitted]
    [r.start() for r in readers]
    [r.join() for r in readers]
    pct = lambda v, q: 1000 * sorted(v)[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"ttft_p50_ms": 1000 * statistics.median(first), "ttft_p99_ms": pct(first, 0.99),
            "latency_p50_ms": 1000 * statistics.median(last), "requests": len(reqs)}


def run_swap(engine, reqs, adapters) -> dict:
    from rankdial.serve import SamplingParams

    t0, tokens = time.perf_counter(), 0
    for (p, m), a in zip(reqs, adapters):
        engine.registry.load(a)
        tokens += engine.generate(p, a, SamplingParams(max_tokens=m, temperature=0)).completion_tokens
        engine.registry.unload(a)
    wall = time.perf_counter() - t0
    return {"tps": tokens / wall, "tokens": tokens, "wall_s": wall}


def hf_batch(tok, reqs):
    enc = [tok.encode(p, add_special_tokens=False) for p, _ in reqs]
    length = max(map(len, enc))
    ids = torch.tensor([[0] * (length - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in enc])
    return ids, mask


def useful_tokens(out: torch.Tensor, reqs, prompt_len: int, eos: int) -> int:
    """Tokens each request would have received: up to its max_tokens or its EOS, whichever comes first."""
    total = 0
    for row, (_, m) in zip(out[:, prompt_len:].tolist(), reqs):
        row = row[:m]
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def run_hf_generate(model, tok, reqs, adapter_names=None) -> dict:
    ids, mask = hf_batch(tok, reqs)
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(m for _, m in reqs),
                             do_sample=False, pad_token_id=0, **kwargs)
    wall = time.perf_counter() - t0
    tokens = useful_tokens(out, reqs, ids.shape[1], tok.eos_token_id)
    return {"tps": tokens / wall, "tokens": tokens, "wall_s": wall}


def run_hf_generate_batch(model, tok, reqs, limit_s: float) -> dict:
    from transformers import GenerationConfig

    inputs = [tok.encode(p, add_special_tokens=False) for p, _ in reqs]
    config = GenerationConfig(max_new_tokens=max(m for _, m in reqs), do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=0)
    t0 = time.perf_counter()
    try:
        out = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
    except Exception as err:  # noqa: BLE001 - a peer that fails is reported, not fatal
        return {"tps": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    wall = time.perf_counter() - t0
    tokens = sum(min(len(o.generated_tokens), m) for o, (_, m) in zip(out.values(), reqs))
    return {"tps": tokens / wall, "tokens": tokens, "wall_s": wall, "note": "generates max(max_tokens) for all; "
            "tokens counted up to each request's max_tokens" if wall < limit_s else "slower than the limit"}


def load_figures(engine, root: Path, names: list[str], n: int) -> dict:
    """registry.load against the raw read of the same file, the floor being the faster of safetensors' two
    readers: load_file's default mmap (lazy: the bytes are read at first touch) and its pread backend (reads
    them now; safetensors 0.8+), which the registry itself uses (adapters.io.read_safetensors)."""
    from safetensors.torch import load_file

    loads, reads = [], {"mmap": [], "pread": []}
    for name in names[:n]:
        engine.registry.unload(name) if engine.registry.is_loaded(name) else None
        file = str(root / name / "adapter_model.safetensors")
        for backend, times in reads.items():
            t0 = time.perf_counter()
            try:
                load_file(file, **({} if backend == "mmap" else {"backend": backend}))
            except TypeError:  # safetensors < 0.8: no pread backend
                continue
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.registry.load(name)
        loads.append(time.perf_counter() - t0)
    read = {k: statistics.median(v) for k, v in reads.items() if v}
    floor = min(read.values())
    return {"adapter_load_ms": 1000 * statistics.median(loads), "raw_read_ms": 1000 * floor,
            **{f"raw_read_{k}_ms": 1000 * v for k, v in read.items()},
            "load_ratio_vs_raw_read": statistics.median(loads) / floor,
            "load_ratio_vs_mmap_read": statistics.median(loads) / read["mmap"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 requests, swap on 16 (default: 128 and 32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=("default", "0.5b"), default="default",
                        help="default: the embedded kjv-llama-tiny; 0.5b: the ~0.5B Llama shape of model_shapes.py "
                             "(random weights; 32 requests (64 full), 32 adapters, 1 round, no generate_batch in quick)")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="the engine's prompt tokens prefilled per step (default: the engine's, 2048)")
    parser.add_argument("--compile", action="store_true",
                        help="the engine's decode step through torch.compile (Engine(compile=True), warmed up first)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from rankdial.models import load_model, resolve_model
    from rankdial.serve import Engine

    global ROUNDS
    big = args.model == "0.5b"
    n_req = (32 if args.quick else 64) if big else (64 if args.quick else 128)
    n_adapters = 32 if big else 128  # 128 adapters of the 0.5B shape hold 2.7 GB: the 0.5B run stops at 32
    if big and args.quick:
        ROUNDS = 1
    reqs = requests(n_req)
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_path = "default"
    if big:
        from model_shapes import make_500m

        model_path = str(make_500m(root / "model-0.5b"))
    names = make_adapters(root / "adapters", n_adapters, model_path)
    root = root / "adapters"
    engine = Engine.from_pretrained(model_path, str(root), device="cpu", max_batch_size=64, freeze_gc=True,
                                    compile=args.compile, **({"max_prefill_tokens": args.max_prefill_tokens}
                                                             if args.max_prefill_tokens else {}))
    print(json.dumps({"config": {"requests": n_req, "rank": RANK, "threads": args.threads, "max_batch_size": 64,
                                 "device": "cpu", "model": "0.5b (model_shapes.SHAPE_500M)" if big else "kjv-llama-tiny",
                                 "adapters": n_adapters, "rounds": ROUNDS, "quick": args.quick,
                                 "compile": engine.runner.compile_status, "compile_warmup_s": engine.compile_seconds,
                                 "max_prefill_tokens": engine.scheduler.limits.max_prefill_tokens, "cpu": _cpu()}}))
    for name in names:
        engine.registry.load(name)  # all resident, as a warm server holds them
    base, tok = load_model(resolve_model(model_path))  # transformers' own copy of the base, for hf_generate
    run_engine(engine, reqs[:8], [None] * 8)  # warm-up
    run_hf_generate(base, tok, reqs[:8])
    mixes = {"base": [None] * n_req, **{f"engine_{k}": [names[i % k] for i in range(n_req)] for k in (1, 8, 32, 128) if k <= n_adapters}}
    rounds = {key: [] for key in [*mixes, "hf_generate"]}
    for _ in range(ROUNDS):  # interleaved rounds; the best of each (the machine is shared: the slow round is noise)
        for key, rows in mixes.items():
            rounds[key].append(run_engine(engine, reqs, rows))
        rounds["hf_generate"].append(run_hf_generate(base, tok, reqs))  # same rounds, same best-of rule
    res = {key: max(runs, key=lambda r: r["tps"]) for key, runs in rounds.items()}
    res["base_again"] = min(rounds["base"], key=lambda r: r["tps"])
    print(json.dumps({key: [round(r["tps"], 1) for r in runs] for key, runs in rounds.items()}))
    burst = requests(64)
    for key, rows in (("base", [None] * 64), ("32_adapters", [names[i % 32] for i in range(64)])):
        res[f"ttft_{key}"] = run_ttft(engine, burst, rows)
    print(json.dumps({k: res[k] for k in ("ttft_base", "ttft_32_adapters")}))
    n_swap = (4 if args.quick else 8) if big else (16 if args.quick else 32)
    for name in names:  # the classic swap holds one adapter at a time
        engine.registry.unload(name)
    rounds["swap"] = [run_swap(engine, reqs[:n_swap], [names[i % 32] for i in range(n_swap)]) for _ in range(ROUNDS)]
    res["swap"] = max(rounds["swap"], key=lambda r: r["tps"])
    res["load"] = load_figures(engine, root, names, 16)
    engine.shutdown(drain=False)
    adapter_bytes = engine.registry.info(names[0]).bytes
    del engine  # the 0.5B run cannot hold a third copy of the base
    print(json.dumps({k: res[k] for k in ("base", "base_again", "swap", "load")}))

    import peft
    if big and args.quick:
        rounds["hf_generate_batch"] = [{"tps": None, "error": "skipped in the 0.5b quick run (minutes per round)"}]
    else:
        rounds["hf_generate_batch"] = [run_hf_generate_batch(base, tok, reqs, limit_s=300) for _ in range(ROUNDS)]
    res["hf_generate_batch"] = max(rounds["hf_generate_batch"], key=lambda r: r.get("tps") or 0)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())  # the base's tensors, in bytes
    # PEFT wraps transformers' copy of the base in place: it is not used again
    pm = peft.PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
    for name in names[1:32]:
        pm.load_adapter(str(root / name), adapter_name=name)
    rounds["peft_mixed"] = [run_hf_generate(pm.eval(), tok, reqs, [names[i % 32] for i in range(n_req)])
                            for _ in range(ROUNDS)]
    res["peft_mixed"] = max(rounds["peft_mixed"], key=lambda r: r["tps"])
    print(json.dumps({k: res[k] for k in ("hf_generate", "hf_generate_batch", "peft_mixed")}))

    tps_base = res["base"]["tps"]
    hf = max(x["tps"] for x in (res["hf_generate"], res["hf_generate_batch"]) if x.get("tps"))
    final = {
        "tps_base": tps_base, "tps_1_adapter": res["engine_1"]["tps"], "tps_8_adapters": res["engine_8"]["tps"],
        "tps_32_adapters": res["engine_32"]["tps"],
        "tps_128_adapters": res["engine_128"]["tps"] if "engine_128" in res else None,
        "ratio_32_vs_base": res["engine_32"]["tps"] / tps_base,
        "ratio_128_vs_base": res["engine_128"]["tps"] / tps_base if "engine_128" in res else None,
        "tps_swap": res["swap"]["tps"], "speedup_vs_swap": res["engine_32"]["tps"] / res["swap"]["tps"],
        "tps_peft_mixed": res["peft_mixed"]["tps"], "speedup_vs_peft_mixed": res["engine_32"]["tps"] / res["peft_mixed"]["tps"],
        "tps_hf_generate": res["hf_generate"]["tps"], "tps_hf_generate_batch": res["hf_generate_batch"].get("tps"),
        "hf_generate_batch_error": res["hf_generate_batch"].get("error"),
        "base_speedup_vs_transformers": tps_base / hf,
        "p50_ms_base": res["base"]["p50_ms"], "p99_ms_base": res["base"]["p99_ms"],
        "p50_ms_32_adapters": res["engine_32"]["p50_ms"], "p99_ms_32_adapters": res["engine_32"]["p99_ms"],
        "p99_ms_1_adapter": res["engine_1"]["p99_ms"], "p99_ms_8_adapters": res["engine_8"]["p99_ms"],
        "p99_ms_128_adapters": res["engine_128"]["p99_ms"] if "engine_128" in res else None,
        "ttft_p50_ms_base": res["ttft_base"]["ttft_p50_ms"], "ttft_p99_ms_base": res["ttft_base"]["ttft_p99_ms"],
        "ttft_p50_ms_32_adapters": res["ttft_32_adapters"]["ttft_p50_ms"],
        "ttft_p99_ms_32_adapters": res["ttft_32_adapters"]["ttft_p99_ms"],
        "ttft_basis": "a burst of 64 requests submitted at once, one burst per mix; submit to the first token "
                      "event each request's reader sees (Handle.events())",
        **res["load"],
        "memory_basis": "computed from tensor bytes (numel x element size, float32), not measured",
        "tps_basis": f"every configuration: best of {ROUNDS} rounds (engine mixes and hf_generate interleaved)",
        "tps_rounds": {key: [round(r["tps"], 1) if r.get("tps") else None for r in runs] for key, runs in rounds.items()},
        "resident_bytes_base_plus_32_adapters": base_bytes + 32 * adapter_bytes,
        "resident_bytes_32_merged_copies": 32 * base_bytes,
        "memory_ratio_merged_vs_adapters": 32 * base_bytes / (base_bytes + 32 * adapter_bytes),
    }
    print(json.dumps(final))


if __name__ == "__main__":
    main()
