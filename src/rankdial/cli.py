"""`rankdial <verb>`: a thin command line over the library. Every verb is a public function first."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ConfigError, RankdialError, TrainingInterrupted

EPILOG = {
    "demo": "example: rankdial demo --out out/demo          (or: rankdial demo --tiny --method qlora)",
    "train": ("examples:\n  rankdial train run.toml\n  rankdial train run.yaml --lr 1e-4 --steps 500\n"
              "  rankdial train --data train.jsonl --method qlora --output-dir out/q\n"
              "  torchrun --nproc_per_node 2 -m rankdial.cli train run.toml\n"
              "  rankdial train run.toml --resume        (continue from the newest good checkpoint)"),
    "merge": "example: rankdial merge out/run --out out/run-merged   (then AutoModelForCausalLM.from_pretrained)",
    "generate": ("examples:\n  rankdial generate 'What does len do?'\n"
                 "  rankdial generate 'What does len do?' --adapter out/lora --adapter out/qlora\n"
                 "  rankdial generate 'And God said' --model out/run-merged --no-base --temperature 0.8"),
    "inspect": ("examples:\n  rankdial inspect out/demo/lora\n  rankdial inspect out/demo/lora --spectrum\n"
                "  rankdial inspect out/demo/lora --suggest-rank 0.9     (a rank_pattern for [lora] in a train config)"),
    "truncate": ("examples:\n  rankdial truncate out/demo/lora --rank 4 --out out/lora-r4\n"
                 "  rankdial truncate out/demo/lora --energy 0.9 --out out/lora-90"),
    "combine": ("examples:\n  rankdial combine out/a out/b --weights 0.5,0.5 --how cat --out out/ab\n"
                "  rankdial combine out/a out/b --weights 1,-0.3 --how svd --rank 8 --out out/ab8"),
    "convert-bin": "example: rankdial convert-bin downloads/old-adapter",
    "sweep": ("examples:\n  rankdial sweep run.toml --ranks 1,2,4,8,16,64 --out out/sweep\n"
              "  rankdial sweep --data d.jsonl --eval-fraction 0.1 --steps 200 --ranks 1,4,16 --out out/s"),
    "claims": "examples:\n  rankdial claims --quick --out out/claims\n  rankdial claims --out docs/claims",
    "serve": ("examples:\n  rankdial serve --adapters out/demo                (the default model, port 8000)\n"
              "  rankdial serve --base models/llama --adapters out/adapters --qlora --budget-mb 512\n"
              "  RANKDIAL_API_KEYS=k1,k2 RANKDIAL_ADMIN_KEY=boss rankdial serve --adapters out/demo --port 0\n"
              "then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='k1').completions.create(model=NAME, ...)"),
    "estimate": ("examples:\n  rankdial estimate llama-70b --method qlora\n"
                 "  rankdial estimate default --method full --batch-size 16 --seq-len 256 --json\n"
                 "  rankdial estimate llama-70b --method qlora --processes 2 --sharding fsdp\n"
                 "  rankdial estimate --hidden 4096 --layers 32 --heads 32 --ffn 11008 --vocab 32000"),
}


DEVICE_HELP = "auto (CUDA when there is a GPU, else cpu), cpu, cuda or cuda:N (default: auto)"


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_roundtrip

    if not args.tiny:
        return 0 if run_demo(args.out, steps=args.steps or 300, device=args.device) else 1
    args.steps = args.steps or 40

    methods = ["lora", "qlora"] if args.method == "both" else [args.method]
    ok = True
    for method in methods:
        name = "QLoRA (NF4 base)" if method == "qlora" else "LoRA"
        print(f"rankdial demo: {name} round trip on a tiny Llama-shaped model (r={args.r}, {args.steps} steps)\n")
        result = run_roundtrip(args.out, steps=args.steps, r=args.r, qlora=method == "qlora", device=args.device)
        print(f"\nwhat happened ({name})")
        print(f"  {result.report}")
        print(f"  loss: {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {len(result.losses)} steps")
        print(f"  adapter folder (PEFT format): {result.adapter_dir}")
        print(f"  reloaded into a fresh base: max |logit diff| = {result.load_max_diff:.2e}")
        print(f"  merged into the base (plain model, no adapter): max |logit diff| = {result.merge_max_diff:.2e}")
        print(f"  time: {result.seconds:.1f} s\n")
        ok &= result.losses[-1] < result.losses[0] and result.load_max_diff == 0.0 and result.merge_max_diff < 1e-4
    print("round trip OK" if ok else "round trip FAILED")
    return 0 if ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_adapter

    if args.suggest_rank is not None:
        from .rank import suggest_rank_pattern

        pattern = suggest_rank_pattern(args.adapter, args.suggest_rank)
        print(json.dumps({"rank_pattern": pattern}, indent=2) if args.json else
              f"# keeps {args.suggest_rank:.0%} of each module's ||dW||^2; put under [lora] in a train config\n"
              f"rank_pattern = {{ {', '.join(f'{json.dumps(k)} = {v}' for k, v in pattern.items())} }}")
        return 0
    if args.spectrum:
        return _print_spectrum(args)
    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter {args.adapter}\n  base model: {info['base_model']}\n  r={info['r']} lora_alpha={info['lora_alpha']} "
          f"rslora={info['use_rslora']}{' DoRA' if info['use_dora'] else ''}\n  target_modules: {info['target_modules']}\n"
          f"  modules_to_save: {info['modules_to_save']}\n  parameters: {info['parameters']:,}  "
          f"file: {info['file_bytes'] / 1e6:.2f} MB\n")
    width = max([len(m["module"]) for m in info["modules"]] + [6])
    print(f"  {'module':<{width}}  {'r':>4}  {'shape':>12}  {'|dW|_F':>10}")
    for m in info["modules"]:
        print(f"  {m['module']:<{width}}  {m['r']:>4}  {str(m['d_out']) + 'x' + str(m['d_in']):>12}  {m['delta_norm']:>10.4f}")
    return 0


def _print_spectrum(args: argparse.Namespace) -> int:
    from .rank import spectrum

    rows = spectrum(args.adapter)
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=2))
        return 0
    width = max(len(row.module) for row in rows)
    print("singular values of dW = s*B*A per module (effective rank: directions holding 90% / 99% of ||dW||^2)")
    print(f"  {'module':<{width}}  {'r':>3}  {'90%':>4}  {'99%':>4}  singular values")
    for row in rows:
        values = " ".join(f"{v:.3g}" for v in row.singular_values[:8]) + (" ..." if len(row.singular_values) > 8 else "")
        print(f"  {row.module:<{width}}  {row.rank:>3}  {row.rank_90:>4}  {row.rank_99:>4}  {values}")
    return 0


def cmd_truncate(args: argparse.Namespace) -> int:
    from .rank import truncate_adapter

    print(truncate_adapter(args.adapter, args.out, rank=args.rank, energy=args.energy))
    return 0


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: give comma-separated numbers, e.g. 0.5,0.5") from None


def cmd_combine(args: argparse.Namespace) -> int:
    from .rank import combine_adapters

    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    print(f"wrote {combine_adapters(args.adapters, weights, args.out, how=args.how, rank=args.rank)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train
    from .train.config import FIELDS

    overrides = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    switches = [k for k, v in overrides.items() if isinstance(v, bool)]
    if (isinstance(args.config, str) and switches and not os.path.exists(args.config)
            and args.config.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0")):
        flag = "--" + switches[0].replace("_", "-")  # argparse took the switch's "value" as the config file
        raise ConfigError(f"config file {args.config!r} does not exist: switches such as {flag} take no value: "
                          f"write {flag} or {flag.replace('--', '--no-', 1)}")
    train(args.config, resume=args.resume, overwrite=args.overwrite, **overrides)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .rank import sweep
    from .train.config import FIELDS

    overrides = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    print(sweep(args.config, args.ranks, args.out, resume=args.resume, **overrides))
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    from .claims import write_report

    write_report(args.out, quick=args.quick)
    print(f"report: {args.out}/report.md (figures in claims.json, one PNG per claim)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .export import merge_to_folder

    out = merge_to_folder(args.adapter, args.out, args.model, dense_base=args.dense_base or None, device=args.device)
    print(f"wrote {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .compare import check_sampling, compare, load_variants

    check_sampling(args.prompt, args.max_new_tokens, args.temperature, args.top_p)  # before the model loads
    net, tok, variants = load_variants(args.model, args.adapter or [], args.device, include_base=not args.no_base)
    rows = compare(net, tok, variants, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=args.chat)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"prompt: {row['prompt']!r}")
        for label, text in row["outputs"].items():
            print(f"  [{label}] {text.strip()}")
        print()
    return 0


def cmd_convert_bin(args: argparse.Namespace) -> int:
    from .adapters import convert_bin_adapter

    print(f"wrote {convert_bin_adapter(args.folder)}")
    return 0


def _flag_type(key, parse):
    def convert(text):
        try:
            return parse(key, text)
        except RankdialError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = key
    return convert


def cmd_estimate(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .memory import estimate_memory

    dims = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab")}
    if any(v is not None for v in dims.values()):
        missing = [f"--{k.replace('_', '-')}" for k, v in dims.items() if v is None and k != "kv_heads"]
        if missing:
            raise ConfigError(f"a model given by its dimensions also needs {', '.join(missing)}")
        model = {**dims, "kv_heads": dims["kv_heads"] or dims["heads"], "tied": args.tied}
    else:
        model = args.model
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    plan = estimate_memory(model, method=args.method, rank=args.r, targets=targets, batch_size=args.batch_size,
                           seq_len=args.seq_len, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                           optimizer=args.optimizer, processes=args.processes, sharding=args.sharding,
                           loss_chunk=args.loss_chunk)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .local_server import listen_socket, run, url_host
    from .serve.launch import app_from_args, check_serve_flags, graceful_seconds

    check_serve_flags(args)
    # bound and listening before the model loads (a port in use fails at once); the address is printed only once
    # the model has loaded, so a client that connects after the line waits milliseconds for uvicorn, never refused
    sock = listen_socket(args.host, args.port)
    try:
        app, line = app_from_args(args)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    print(line.format(url=f"http://{url_host(host)}:{port}/v1"), flush=True)
    for warning in app.state.startup_warnings:
        print(warning, file=sys.stderr, flush=True)
    # SIGTERM and Ctrl-C stop taking connections and begin the engine's drain at once: requests in flight finish,
    # those still running after --drain-timeout are cancelled (their streams end with OpenAI's finish_reason "length");
    # uvicorn waits for the connections no longer than that. SIGTERM then exits 0 with the line below, Ctrl-C
    # 130 (KeyboardInterrupt, as every verb), a second Ctrl-C 130 at once (rankdial.local_server).
    try:
        run(app, sock, name="rankdial serve", graceful_s=graceful_seconds(args.drain_timeout),
            on_first_signal=app.state.begin_drain, log_level=args.log_level, access_log=args.log_level == "debug")
    finally:  # after SIGTERM, and after Ctrl-C before its 'interrupted' line: what became of the requests in flight
        print(_stopped_line(app.state.cancelled_at_shutdown, args.drain_timeout), flush=True)
    return 0


def _stopped_line(cancelled: int | None, drain_timeout: float) -> str:
    if cancelled is None:
        return "rankdial serve: stopped"
    if cancelled:
        return (f"rankdial serve: stopped; {cancelled} request(s) still running after --drain-timeout "
                f"{drain_timeout:g} s were cancelled")
    return "rankdial serve: stopped; every request in flight was answered"


def add_serve_parser(verbs, fmt) -> None:
    p = verbs.add_parser("serve", help="serve the base and many adapters per request behind an OpenAI-compatible API",
                         epilog=EPILOG["serve"], formatter_class=fmt)
    p.add_argument("--base", default="default", help="base model folder, or 'default' for the embedded model")
    p.add_argument("--adapters", help="folder of PEFT adapter folders; each folder's name is its model name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--qlora", action="store_true", help="hold the base in 4-bit NF4")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--budget-mb", type=float, help="memory for resident adapters; least recently used evicted first")
    p.add_argument("--api-key", action="append", help="accept this bearer key (repeat for several; env RANKDIAL_API_KEYS)")
    p.add_argument("--admin-key", help="key for loading by path and unloading (env RANKDIAL_ADMIN_KEY)")
    p.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: 512)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt in tokens (default: what the model's context allows)")
    p.add_argument("--max-batch", type=int, help="most requests decoded at once: the KV cache's rows (default: 32)")
    p.add_argument("--max-tokens-in-flight", type=int,
                   help="most tokens held at once (prompt + max_tokens of each running request; also caps one row of "
                        "the KV cache; default: 16384)")
    p.add_argument("--max-prefill-tokens", type=int,
                   help="most prompt tokens prefilled in one step: a burst is prefilled over several steps, so the "
                        "first requests answer sooner (a longer prompt runs alone; default: 2048)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body in KiB (default: 1024)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C, seconds to let requests in flight finish before cancelling them (default: 30)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile (inductor; CUDA graphs on a GPU), compiled before "
                        "the address is printed (default: off; measured slower on a CPU)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=cmd_serve)


def add_estimate_parser(verbs, fmt) -> None:
    p = verbs.add_parser("estimate", help="plan a run's memory term by term (weights, adapters, optimizer, activations)",
                         epilog=EPILOG["estimate"], formatter_class=fmt)
    p.add_argument("model", nargs="?", default="default",
                   help="llama-7b, llama-13b, llama-70b, default, or a config.json / model folder")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="lora")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--targets", default="all-linear", help="all-linear or a comma list, e.g. q_proj,v_proj")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the config's; bf16 for presets)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for qlora")
    p.add_argument("--optimizer", choices=["adamw", "adamw-8bit"], default="adamw")
    p.add_argument("--processes", type=int, default=1, help="torchrun processes; the plan is per process (default: 1)")
    p.add_argument("--sharding", default="ddp", help="ddp (each process holds the whole model) or fsdp (sharded; "
                   "as train --sharding fsdp) (default: ddp)")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="rows of logits the loss computes at once (rankdial train's default: 1024); 0: all at once")
    for dim in ("hidden", "layers", "heads", "kv-heads", "ffn", "vocab"):
        p.add_argument(f"--{dim}", type=int, default=None, help="model dimension (instead of MODEL)")
    p.add_argument("--tied", action="store_true", help="with dimensions: tied input/output embeddings")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=cmd_estimate)


def cmd_playground(args: argparse.Namespace) -> int:
    from .playground import serve

    serve(port=args.port)
    return 0


def add_playground_parser(verbs, fmt) -> None:
    p = verbs.add_parser("playground", help="a local web page: turn the rank dial, watch training, memory, NF4",
                         epilog="example: rankdial playground --port 7860   (then open http://127.0.0.1:7860/)",
                         formatter_class=fmt)
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: 7860; 0 picks a free one)")
    p.set_defaults(run=cmd_playground)


def add_train_parser(verbs, fmt) -> None:
    from .train.config import TrainConfig

    p = verbs.add_parser("train", help="fine-tune with LoRA, QLoRA or in full from a TOML/YAML config and flags",
                         description="Fine-tune a model. Every config key is also a flag (--max-length 512); "
                                     "flags win over the file.\n\n" + (TrainConfig.__doc__ or ""),
                         epilog=EPILOG["train"], formatter_class=fmt)
    p.add_argument("config", nargs="?", default=None, help="a .toml or .yaml config file (optional)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    _add_config_flags(p)
    p.set_defaults(run=cmd_train)


def add_sweep_parser(verbs, fmt) -> None:
    p = verbs.add_parser("sweep", help="train one config at several ranks; eval loss against rank and parameters",
                         description="Train the same config (seed, data) at each rank; every config key is also a "
                                     "flag. Writes OUT/r<k>/ (complete runs), OUT/sweep.json and OUT/sweep.png.",
                         epilog=EPILOG["sweep"], formatter_class=fmt)
    p.add_argument("config", nargs="?", default=None, help="a .toml or .yaml config file (optional)")
    p.add_argument("--ranks", required=True, help="comma-separated ranks, e.g. 1,2,4,8,16,64")
    p.add_argument("--out", required=True, help="folder for the sweep (built in OUT.partial, swapped in when done)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep kept in OUT.partial")
    _add_config_flags(p, skip=("output_dir", "r"))
    p.set_defaults(run=cmd_sweep)


def add_claims_parser(verbs, fmt) -> None:
    p = verbs.add_parser("claims", help="measure LoRA's case on this machine: a Markdown report with one PNG per claim",
                         description="Measure each claim (parameter arithmetic, merged latency, memory planned and "
                                     "measured, rank as capacity, base + N adapters, steering vs new facts) and write "
                                     "OUT/report.md, OUT/<claim>.png and OUT/claims.json.",
                         epilog=EPILOG["claims"], formatter_class=fmt)
    p.add_argument("--quick", action="store_true", help="smaller runs (a couple of minutes on one core), as CI runs")
    p.add_argument("--out", required=True, help="folder for the report (built beside, swapped in when done)")
    p.set_defaults(run=cmd_claims)


def _add_config_flags(p, skip: tuple[str, ...] = ()) -> None:
    from .train.config import FIELDS, flag_help, parse_flag_value

    for key in FIELDS:
        if key in skip:
            continue
        flag = "--" + key.replace("_", "-")
        if FIELDS[key].type == "bool":
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                           help=flag_help(key))
        else:
            p.add_argument(flag, dest=key, default=None, metavar=key.upper(), type=_flag_type(key, parse_flag_value),
                           help=flag_help(key))


def add_demo_parser(verbs, fmt) -> None:
    """demo: the main job on the embedded default model."""
    demo = verbs.add_parser("demo", help="the main job: LoRA and QLoRA fine-tunes of the default model, compared",
                            epilog=EPILOG["demo"], formatter_class=fmt)
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 300; 40 with --tiny)")
    demo.add_argument("--tiny", action="store_true", help="the seconds-long round trip on a random tiny Llama instead")
    demo.add_argument("--r", type=int, default=8, help="LoRA rank for --tiny (default: 8)")
    demo.add_argument("--method", choices=["lora", "qlora", "both"], default="both",
                      help="for --tiny: LoRA on the fp32 base, QLoRA on an NF4 base, or both (default)")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.set_defaults(run=cmd_demo)

def add_model_parsers(verbs, fmt) -> None:
    """merge and generate: verbs that load a base model and adapters."""
    merge = verbs.add_parser("merge", help="base + adapter -> a plain model folder that transformers loads",
                             epilog=EPILOG["merge"], formatter_class=fmt)
    merge.add_argument("adapter", help="adapter folder (a rankdial train output, or any PEFT LoRA adapter)")
    merge.add_argument("--out", required=True, help="folder for the merged model")
    merge.add_argument("--model", default=None, help="base model folder or 'default' (default: the one the adapter names)")
    merge.add_argument("--dense-base", action="store_true", help="merge a QLoRA adapter into the original "
                       "full-precision weights (default: into the dequantized NF4 base it was trained on)")
    merge.add_argument("--device", default="auto", help=DEVICE_HELP)
    merge.set_defaults(run=cmd_merge)
    gen = verbs.add_parser("generate", help="sample from the base, adapters or a merged model, side by side",
                           epilog=EPILOG["generate"], formatter_class=fmt)
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument("--model", default=None, help="model folder or 'default' (default: the first adapter's base, "
                     "else the embedded default model)")
    gen.add_argument("--adapter", action="append", help="adapter folder; repeat to compare several")
    gen.add_argument("--no-base", action="store_true", help="do not show the base model's output")
    gen.add_argument("--max-new-tokens", type=int, default=40, help="at least 1 (default: 40)")
    gen.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off (default)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    gen.add_argument("--device", default="auto", help=DEVICE_HELP)
    gen.add_argument("--json", action="store_true", help="print JSON")
    gen.set_defaults(run=cmd_generate)

def add_adapter_parsers(verbs, fmt) -> None:
    """inspect, truncate, combine, convert-bin: verbs on adapter folders alone."""
    inspect = verbs.add_parser("inspect", help="describe an adapter folder: ranks, size, norm of each ΔW",
                               epilog=EPILOG["inspect"], formatter_class=fmt)
    inspect.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--spectrum", action="store_true",
                         help="singular values of each module's dW and its effective rank at 90%% and 99%% energy")
    inspect.add_argument("--suggest-rank", type=float, default=None, metavar="ENERGY",
                         help="print a per-module rank_pattern that keeps this share (0-1] of each dW's energy")
    inspect.set_defaults(run=cmd_inspect)
    truncate = verbs.add_parser("truncate", help="compress an adapter to a lower rank by SVD of each dW",
                                epilog=EPILOG["truncate"], formatter_class=fmt)
    truncate.add_argument("adapter", help="adapter folder (rankdial's or PEFT's)")
    keep = truncate.add_mutually_exclusive_group(required=True)
    keep.add_argument("--rank", type=int, help="the rank to keep in every module (at most its own)")
    keep.add_argument("--energy", type=float, help="per module, the smallest rank keeping this share (0-1] of ||dW||^2")
    truncate.add_argument("--out", required=True, help="folder for the truncated adapter (PEFT format)")
    truncate.set_defaults(run=cmd_truncate)
    combine = verbs.add_parser("combine", help="a weighted sum of adapters (PEFT's add_weighted_adapter)",
                               epilog=EPILOG["combine"], formatter_class=fmt)
    combine.add_argument("adapters", nargs="+", help="adapter folders of one base model")
    combine.add_argument("--weights", type=_weights, default=None, help="one weight per adapter (default: all 1)")
    combine.add_argument("--how", choices=["linear", "cat", "svd"], default="svd",
                         help="svd: best rank-k fit of the weighted sum (default); cat: exact, rank = sum of ranks; "
                              "linear: PEFT's cheap mix of A and B (equal ranks and targets only)")
    combine.add_argument("--rank", type=int, default=None, help="for --how svd: the rank of the result "
                         "(default: the largest input rank)")
    combine.add_argument("--out", required=True, help="folder for the combined adapter (PEFT format)")
    combine.set_defaults(run=cmd_combine)
    convert = verbs.add_parser("convert-bin", help="rewrite a pickle adapter_model.bin as safetensors, running no code",
                               epilog=EPILOG["convert-bin"])
    convert.add_argument("folder")
    convert.set_defaults(run=cmd_convert_bin)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankdial", description="Low-rank adaptation you can see and trust.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    fmt = argparse.RawDescriptionHelpFormatter
    add_demo_parser(verbs, fmt)
    add_train_parser(verbs, fmt)
    add_estimate_parser(verbs, fmt)
    add_sweep_parser(verbs, fmt)
    add_claims_parser(verbs, fmt)
    add_model_parsers(verbs, fmt)
    add_adapter_parsers(verbs, fmt)
    add_serve_parser(verbs, fmt)
    add_playground_parser(verbs, fmt)
    parser.verb_parsers = verbs.choices  # {verb: its sub-parser}, for --help checks and typo hints
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        return _unknown_arguments(parser, args.verb, unknown)
    missing = _missing_extra_of(args.verb)
    if missing:  # before anything heavy loads
        print(missing, file=sys.stderr)
        return 2
    try:
        if args.verb not in NO_MODEL_VERBS:
            _quiet_transformers()
        return args.run(args)
    except ModuleNotFoundError as err:  # an optional extra that is not installed, found deeper: say which one
        extra = _missing_extra(err.name, args.verb)
        if extra is None:
            raise
        print(_missing_line(args.verb, err.name, extra), file=sys.stderr)
        return 2
    except TrainingInterrupted as err:  # says where it stopped, the last checkpoint and --resume
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process has the same line: the main one says it
            print(f"rankdial {args.verb}: {_one_line(err)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # anywhere else, the slow imports included
        print(f"rankdial {args.verb}: interrupted", file=sys.stderr)
        return 130
    except RankdialError as err:
        print(f"rankdial {args.verb}: error: {_one_line(err)}", file=sys.stderr)
        return 2


# a module that an optional extra of the wheel installs -> that extra (pyproject.toml's optional-dependencies)
EXTRA_MODULES = {"fastapi": "serve", "starlette": "serve", "pydantic": "serve", "uvicorn": "serve",
                 "prometheus_client": "serve", "bitsandbytes": "bnb"}
# verbs that never load a transformers model: they skip importing transformers (most of `rankdial estimate`'s time)
NO_MODEL_VERBS = {"estimate", "inspect", "truncate", "combine", "convert-bin"}
# verbs that need an extra, checked before anything heavy loads (the modules they import from it)
VERB_MODULES = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "playground": ("fastapi", "uvicorn")}


def _missing_extra(module: str | None, verb: str) -> str | None:
    """The extra to install for a module an extra provides ('playground' for that verb's), else None."""
    extra = EXTRA_MODULES.get((module or "").partition(".")[0])
    return "playground" if extra == "serve" and verb == "playground" else extra


def _missing_line(verb: str, module: str, extra: str) -> str:
    return f"rankdial {verb}: error: needs {module}, which is not installed; pip install 'rankdial[{extra}]'"


def _missing_extra_of(verb: str) -> str | None:
    """The one-line error for a verb whose extra is not installed, else None."""
    import importlib.util

    for module in VERB_MODULES.get(verb, ()):
        if importlib.util.find_spec(module) is None:
            return _missing_line(verb, module, _missing_extra(module, verb))
    return None


def _quiet_transformers() -> None:
    """transformers' per-file "Loading weights" bars would drown rankdial's own progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _unknown_arguments(parser: argparse.ArgumentParser, verb: str, unknown: list[str]) -> int:
    import difflib

    flags = [a for action in parser.verb_parsers[verb]._actions for a in action.option_strings if a.startswith("--")]
    hints = []
    for u in unknown:
        near = difflib.get_close_matches(u.split("=")[0], flags, n=1, cutoff=0.6) if u.startswith("--") else []
        hints.append(f"{u} (did you mean {near[0]}?)" if near else u)
    print(f"rankdial {verb}: error: unknown argument(s): {', '.join(hints)}; see rankdial {verb} --help",
          file=sys.stderr)
    return 2


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
