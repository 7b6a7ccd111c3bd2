"""`rankdial <verb>`: a thin command line over the library. Every verb is a public function first."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AdapterFileError, RankdialError

EPILOG = {
    "demo": "example: rankdial demo --out out/demo --steps 40 --method qlora",
    "inspect": "example: rankdial inspect out/demo/adapter",
    "convert-bin": "example: rankdial convert-bin downloads/old-adapter",
}


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_roundtrip

    methods = ["lora", "qlora"] if args.method == "both" else [args.method]
    ok = True
    for method in methods:
        name = "QLoRA (NF4 base)" if method == "qlora" else "LoRA"
        print(f"rankdial demo: {name} round trip on a tiny Llama-shaped model (r={args.r}, {args.steps} steps)\n")
        result = run_roundtrip(args.out, steps=args.steps, r=args.r, qlora=method == "qlora")
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


def inspect_adapter(path: str | Path) -> dict:
    """Config, per-module ranks, parameter count, file size and ‖ΔW‖_F of each module of an adapter folder."""
    from .adapters import read_adapter_config, read_adapter_weights
    from .adapters.peft_format import KEY_PREFIX, WEIGHTS_NAME
    from .lora.inject import pattern_value

    config = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    modules = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(KEY_PREFIX):-len(".lora_A.weight")]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise AdapterFileError(f"{path} has {key} but not {b_key}; the adapter file is incomplete: save it again")
        A, B = tensors[key].float(), tensors[b_key].float()
        r = A.shape[0]
        scale = config.scaling(r, pattern_value(config.alpha_pattern, module, config.lora_alpha))
        modules.append({"module": module, "r": r, "d_in": A.shape[1], "d_out": B.shape[0],
                        "delta_norm": (scale * (B @ A)).norm().item()})
    return {
        "base_model": config.base_model_name_or_path,
        "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
        "target_modules": config.target_modules, "modules_to_save": config.modules_to_save,
        "parameters": sum(t.numel() for t in tensors.values()),
        "file_bytes": (Path(path) / WEIGHTS_NAME).stat().st_size,
        "modules": modules,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter {args.adapter}\n  base model: {info['base_model']}\n  r={info['r']} lora_alpha={info['lora_alpha']} "
          f"rslora={info['use_rslora']}\n  target_modules: {info['target_modules']}\n"
          f"  modules_to_save: {info['modules_to_save']}\n  parameters: {info['parameters']:,}  "
          f"file: {info['file_bytes'] / 1e6:.2f} MB\n")
    width = max([len(m["module"]) for m in info["modules"]] + [6])
    print(f"  {'module':<{width}}  {'r':>4}  {'shape':>12}  {'|dW|_F':>10}")
    for m in info["modules"]:
        print(f"  {m['module']:<{width}}  {m['r']:>4}  {str(m['d_out']) + 'x' + str(m['d_in']):>12}  {m['delta_norm']:>10.4f}")
    return 0


def cmd_convert_bin(args: argparse.Namespace) -> int:
    from .adapters import convert_bin_adapter

    print(f"wrote {convert_bin_adapter(args.folder)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankdial", description="Low-rank adaptation you can see and trust.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    demo = verbs.add_parser("demo", help="the LoRA round trip on a tiny model: train, save, load, merge",
                            epilog=EPILOG["demo"])
    demo.add_argument("--out", default="out/demo", help="folder for the adapter (default: out/demo)")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    demo.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    demo.add_argument("--method", choices=["lora", "qlora", "both"], default="both",
                      help="LoRA on the fp32 base, QLoRA on an NF4 base, or both (default)")
    demo.set_defaults(run=cmd_demo)
    inspect = verbs.add_parser("inspect", help="describe an adapter folder: ranks, size, norm of each ΔW",
                               epilog=EPILOG["inspect"])
    inspect.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=cmd_inspect)
    convert = verbs.add_parser("convert-bin", help="rewrite a pickle adapter_model.bin as safetensors, running no code",
                               epilog=EPILOG["convert-bin"])
    convert.add_argument("folder")
    convert.set_defaults(run=cmd_convert_bin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RankdialError as err:
        print(f"rankdial {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
