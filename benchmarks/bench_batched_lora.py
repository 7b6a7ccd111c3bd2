"""Heterogeneous batching, forward only: 32 rows, each with its own r=16 adapter, in one forward of the base.

On the embedded default model (kjv-llama-tiny, a hidden-256 Llama), compared in one process, interleaved
round by round (ratios are medians of per-round ratios):
  routed    rankdial: route(model, 32 distinct adapters) + one forward (the route() call is timed too)
  base      the base model alone, same batch
  peft      Hugging Face PEFT's mixed-batch forward, model(..., adapter_names=[...]), same 32 adapters' shapes
  swap      one request at a time: set_active(that adapter), forward its row alone (adapters all resident)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py            # ~1 minute on one core
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py --rounds 2 # a smoke run

--decode: the serving runner's decode step instead (serve.runner.Runner, 64 rows each decoding one token from a
prompt of 8 tokens, the slot KV cache; adapters r=8 on all linears), base rows against 1, 32 and 128 distinct
adapters, interleaved step by step (ratios: medians of per-round ratios). --model 0.5b-4: the 0.5B shape of
model_shapes.py with 4 of its 30 layers (per-layer costs are the same; random weights). --profile MIX: one
torch.profiler table (self CPU time by op) over steps of that mix instead of the timing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py --decode                    # ~1 minute
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py --decode --model 0.5b-4
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py --decode --profile 32
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_lora.py --decode --fusion-probe [--model 0.5b-4]

--fusion-probe: a measurement, not a serving path: the first LoRA matmul fused over the layers that share an input
(q/k/v; gate/up), their A stacks concatenated along r (here an extra copy, built once from the routed stacks),
x·[A_q|A_k|A_v] computed once per input and split for each B; timed against the serving path, interleaved.

Measured (h-Q, 2-core shared machine, 64 rows, time per decode step fused / now, base as the noise check):
  default  base 0.995, 1 adapter 0.982, 32 adapters 1.015, 128 adapters 0.994: no gain (noise)
  0.5b-4   base 0.995, 1 adapter 0.978, 32 adapters 0.965, 64 distinct 0.987: 1-3.5% of a step
So the serving path does not fuse: a product version needs the q/k/v (gate/up) stacks to share one A tensor per
rank (slots aligned across the layers, each layer's At a view), i.e. the registry to allocate them together.

Ends with one JSON line of figures and ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

ADAPTERS, ROWS, TOKENS, RANK = 32, 32, 32, 16


def rankdial_model(base: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    import rankdial as rd

    model = copy.deepcopy(base)
    for name in names:  # non-zero B, so every adapter changes the output
        rd.inject(model, rd.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear",
                                       init_lora_weights=False), adapter=name)
    return model.eval()


def peft_model(base: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    import peft

    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    return model.eval()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def decode_model(which: str, adapters: int) -> torch.nn.Module:
    """The model for --decode: the default model, or the 0.5B shape cut to its first 4 layers; `adapters` r=8
    adapters a0.. on all linears with non-zero A and B."""
    import rankdial as rd
    from rankdial.models import default_model_path, load_model

    torch.manual_seed(0)
    if which == "default":
        model = load_model(default_model_path())[0]
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from model_shapes import SHAPE_500M

        model = LlamaForCausalLM(LlamaConfig(**{**SHAPE_500M, "num_hidden_layers": 4}, max_position_embeddings=512,
                                             tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    for k in range(adapters):
        rd.inject(model, rd.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
                  adapter=f"a{k}")
    return model.eval()


def fusion_probe(model: torch.nn.Module, mode: str) -> None:
    """--fusion-probe: route q/k/v and gate/up through one first matmul over their concatenated A stacks (an extra
    copy made here) when `mode` is "fused"; the serving path when "now". Only the grouped paths (1, 32, 128 mixes
    of 64 rows take them)."""
    import importlib

    bl = importlib.import_module("rankdial.serve.batched_lora")  # the package exports a function of that name
    serving = getattr(bl.Routing, "_serving_forward", bl.Routing.forward)
    bl.Routing._serving_forward = serving
    if mode == "now":
        bl.Routing.forward = serving
        return
    for block in model.model.layers:
        for group in ([block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj],
                      [block.mlp.gate_proj, block.mlp.up_proj]):
            stacks = [layer.routing.stacks for layer in group]
            assert all(s.where == stacks[0].where for s in stacks), "the probe needs aligned stacks"
            cat = {r: torch.cat([s.stacks[r].At for s in stacks], 2) for r in stacks[0].stacks}
            state: dict = {}
            for k, layer in enumerate(group):
                layer._probe = (state, [s.stacks for s in stacks[:k]], cat)

    def forward(self, layer, x):
        probe = getattr(layer, "_probe", None)
        if probe is None or not self.any_adapter:
            return serving(self, layer, x)
        state, before, cat = probe
        h = layer.base_layer(x)
        x3, h3 = x.reshape(x.shape[0], -1, x.shape[-1]), h.reshape(h.shape[0], -1, h.shape[-1])
        for plan in self.plans:
            uniq, pos, valid, rows = plan.group_tensors()
            U, L, r, off = len(plan.span), x3.shape[1], plan.r, sum(b[plan.r].r for b in before)
            if state.get("x") is not x or state.get("plan") is not plan:  # the group's first layer: x·[A_q|A_k|A_v]
                xg = x3 if pos is None else x3.index_select(0, pos)
                A = cat[r][uniq] if isinstance(uniq, slice) else cat[r].index_select(0, uniq)
                state.update(x=x, plan=plan, z=torch.bmm(xg.view(U, plan.size * L, -1), A))
            z = state["z"][:, :, off:off + r] * self._scale(plan, True)[:, None, None]
            stack = self.stacks.stacks[r]
            Bt = stack.Bt[uniq] if isinstance(uniq, slice) else stack.Bt.index_select(0, uniq)
            if rows is None:
                h3.view(U, plan.size * L, -1).baddbmm_(z, Bt)
            else:
                y = torch.bmm(z, Bt).view(U * plan.size, L, -1)
                h3.index_add_(0, rows, y if valid is None else y.index_select(0, valid))
        return h3.view(h.shape)

    bl.Routing.forward = forward


def decode_main(args) -> None:
    """--decode: the runner's decode step, 64 rows, per mix of adapters (see the module's docstring)."""
    from rankdial.sampling import SamplingParams
    from rankdial.serve.runner import Runner, Sequence

    rows, steps = 64, args.steps
    mixes = {"base": 0, "1": 1, "32": 32, "128": 128}
    model = decode_model(args.model, 128)
    vocab = model.config.vocab_size

    def runner_for(k: int):  # a runner past its prefill: every later step() is one decode forward of 64 rows
        runner = Runner(model, 0, slots=rows, row_tokens=8 + 2 * steps * args.rounds + 8)
        g = torch.Generator().manual_seed(k)
        seqs = [Sequence(f"r{i}", None if k == 0 else f"a{i % k}", torch.randint(3, vocab, (8,), generator=g).tolist(),
                         SamplingParams(max_tokens=10 ** 6, temperature=0)) for i in range(rows)]
        runner.step(seqs)
        return runner, seqs

    runners = {m: runner_for(k) for m, k in mixes.items()}
    if args.profile:
        runner, seqs = runners[args.profile]
        runner.step(seqs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                runner.step(seqs)
        print(f"profile: {args.model}, mix {args.profile}, {steps} decode steps of {rows} rows")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    if args.fusion_probe:
        return probe_main(args, model, runners)
    times: dict[str, list[float]] = {m: [] for m in mixes}
    for _ in range(args.rounds):  # no inference_mode: the runner's own no_grad, as the engine steps it
        for m, (runner, seqs) in runners.items():
            start = time.perf_counter()
            for _ in range(steps):
                runner.step(seqs)
            times[m].append((time.perf_counter() - start) / steps)
    ratio = lambda a: statistics.median(x / y for x, y in zip(times[a], times["base"]))  # noqa: E731
    print(json.dumps({"model": args.model, "rows": rows, "steps_per_round": steps, "rounds": args.rounds,
                      **{f"ms_step_{m}": round(1e3 * statistics.median(times[m]), 3) for m in mixes},
                      **{f"ratio_{m}_vs_base": round(ratio(m), 3) for m in mixes if m != "base"}}))


def probe_main(args, model, runners) -> None:
    """--fusion-probe: per mix, the decode step with the probe's fused first matmul against the serving path."""
    from rankdial.serve import clear_route, route

    for runner, seqs in runners.values():  # route every layer (the probe reads the routed stacks)
        runner.step(seqs)
    route(model, ["a0"] * 64)
    fusion_probe(model, "fused")
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for mode in ("now", "fused"):
            fusion_probe(model, mode)
            for m, (runner, seqs) in runners.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    runner.step(seqs)
                times.setdefault((mode, m), []).append((time.perf_counter() - start) / args.steps)
    ids = torch.randint(3, model.config.vocab_size, (64, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        route(model, [f"a{i % 32}" for i in range(64)])
        outs = {}
        for mode in ("now", "fused"):
            fusion_probe(model, mode)
            outs[mode] = model(input_ids=ids).logits
    fusion_probe(model, "now")
    clear_route(model)
    mixes = [m for _, m in times if _ == "now"]
    print(json.dumps({"model": args.model, "rows": 64, "rounds": args.rounds,
                      **{f"ms_step_{mode}_{m}": round(1e3 * statistics.median(t), 3) for (mode, m), t in times.items()},
                      **{f"fused_vs_now_{m}": round(statistics.median(
                          f / n for n, f in zip(times["now", m], times["fused", m])), 3) for m in mixes},
                      "max_abs_diff_logits_32": (outs["now"] - outs["fused"]).abs().max().item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode", action="store_true", help="the serving runner's decode step, 64 rows")
    parser.add_argument("--model", choices=("default", "0.5b-4"), default="default", help="for --decode")
    parser.add_argument("--steps", type=int, default=4, help="decode steps per round (--decode)")
    parser.add_argument("--profile", choices=("base", "1", "32", "128"), help="--decode: profile this mix")
    parser.add_argument("--fusion-probe", action="store_true",
                        help="--decode: time a fused first matmul over q/k/v and gate/up against the serving path")
    args = parser.parse_args()
    if args.decode:
        return decode_main(args)

    import rankdial as rd
    from rankdial.models import default_model_path, load_model
    from rankdial.serve import clear_route, route

    torch.manual_seed(0)
    base, _ = load_model(default_model_path())
    names = [f"a{i}" for i in range(ADAPTERS)]
    ours, theirs = rankdial_model(base, names), peft_model(base, names)
    ids = torch.randint(3, base.config.vocab_size, (ROWS, TOKENS), generator=torch.Generator().manual_seed(1))
    print(f"config: default model (hidden {base.config.hidden_size}, {base.config.num_hidden_layers} layers), "
          f"{ADAPTERS} adapters r={RANK} all-linear, batch {ROWS} rows x {TOKENS} tokens, forward only, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds")

    def routed():
        route(ours, names)
        return ours(input_ids=ids).logits

    def swap():
        outs = []
        for i, name in enumerate(names):
            rd.set_active(ours, name)
            outs.append(ours(input_ids=ids[i:i + 1]).logits)
        return torch.cat(outs)

    methods = {
        "base": lambda: base(input_ids=ids).logits,
        "routed": routed,
        "peft": lambda: theirs(input_ids=ids, adapter_names=names).logits,
        "swap": lambda: (clear_route(ours), swap())[1],
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    outs = {}
    with torch.inference_mode():
        for m, fn in methods.items():  # warm-up
            outs[m] = fn()
        for _ in range(args.rounds):
            for m, fn in methods.items():
                t, _ = timed(fn)
                times[m].append(t)
    diff = (outs["routed"] - outs["swap"]).abs().max().item()
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    for m in methods:
        print(f"{m:>7}: median {1e3 * statistics.median(times[m]):8.1f} ms per batch")
    print(f"routed vs swap logits: max |diff| {diff:.2e}")
    print(json.dumps({
        "ms_base": round(1e3 * statistics.median(times["base"]), 2),
        "ms_routed_32": round(1e3 * statistics.median(times["routed"]), 2),
        "ms_peft_mixed_32": round(1e3 * statistics.median(times["peft"]), 2),
        "ms_swap_32": round(1e3 * statistics.median(times["swap"]), 2),
        "ratio_routed_vs_base": round(ratio("routed", "base"), 3),
        "ratio_peft_mixed_vs_base": round(ratio("peft", "base"), 3),
        "ratio_swap_vs_base": round(ratio("swap", "base"), 3),
        "speedup_vs_peft_mixed": round(ratio("peft", "routed"), 3),
        "speedup_vs_swap": round(ratio("swap", "routed"), 3),
        "max_abs_diff_routed_vs_swap": diff,
    }))


if __name__ == "__main__":
    main()
