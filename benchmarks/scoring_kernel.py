"""Per-step cost of the LoRAPrune channel scores: the torch path (scores.channel_scores) vs the fused Triton
kernel (kernels.fused_channel_scores), at the LLaMA-7B projection shapes.

Per shape, both paths are timed on one layer (median of --repeat after --warmup, synchronized), and their
results must agree (--rtol, relative to each vector's largest score): the script exits 1 if they do not.
Then a whole model's worth of layers (--layers × q/k/v/o/gate/up/down, each with its own W so the L2 cache
does not flatter either path) is scored back to back, as LoRAGuidedImportance.accumulate does every step.

    python benchmarks/scoring_kernel.py --out benchmarks/results/scoring_kernel_h100.json
    python benchmarks/scoring_kernel.py --device cpu --small --out /tmp/scoring_kernel_cpu.json   # smoke test

Without CUDA (or without Triton) only the torch path is timed. Result on an H200 (torch 2.11, Triton 3.6, bf16 W,
r=8; benchmarks/results/scoring_kernel_h200.json): 116 ms → 21 ms per step for the 224 layers (5.5×), max
relative disagreement 6e-7.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tp_loraprune import kernels, scores


def projections(hidden: int, intermediate: int, kv_width: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA-wrapped projection of a LLaMA-style decoder layer."""
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv_width, hidden),
        "v_proj": (kv_width, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }


LLAMA7B = projections(4096, 11008, 4096)  # 32 layers
SMOLLM2 = projections(576, 1536, 192)  # SmolLM2-135M: 9 query / 3 KV heads of 64, 30 layers
MODELS = {"llama7b": (LLAMA7B, 32), "smollm2": (SMOLLM2, 30)}
SMALL_DIVISOR = 32  # --small: every dimension divided by this (128 × 344 for gate/up)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], warmup: int, repeat: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_layer(out: int, in_: int, rank: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """W, A, B, dA, dB of one LoRA layer: W in `dtype`, factors and gradients in fp32 (like a LoRA fine-tune)."""

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device) * std

    W = randn(out, in_, std=0.02).to(dtype)
    A, B = randn(rank, in_, std=in_**-0.5), randn(out, rank, std=0.01)
    dA, dB = randn(rank, in_, std=1e-4), randn(out, rank, std=1e-4)
    return A, B, dA, dB, W


def max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got − ref| relative to the largest |ref| (channel scores span orders of magnitude)."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def time_shape(shape, run_torch, run_fused, args, dtype, device, gen) -> dict:
    """One layer of `shape`: median seconds of each path and, with the kernel, their disagreement."""
    layer = make_layer(*shape, args.rank, dtype, device, gen)
    row: dict = {"shape": list(shape)}
    row["torch_s"] = median_seconds(lambda: run_torch(layer), args.warmup, args.repeat, device)
    if run_fused is not None:
        row["fused_s"] = median_seconds(lambda: run_fused(layer), args.warmup, args.repeat, device)
        row["speedup"] = row["torch_s"] / row["fused_s"]
        ref, got = run_torch(layer), run_fused(layer)
        row["max_rel_error"] = [max_rel_error(g, r) for g, r in zip(got, ref, strict=True)]
        row["fused_w_read_gb_per_s"] = shape[0] * shape[1] * torch.finfo(dtype).bits / 8 / row["fused_s"] / 1e9
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=sorted(MODELS), default="llama7b", help="projection shapes and layer count")
    p.add_argument("--small", action="store_true", help=f"shapes divided by {SMALL_DIVISOR}, 2 layers (smoke test)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers in the model loop (default 32; 2 small)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scaling", type=float, default=2.0, help="LoRA alpha / r")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the frozen W")
    p.add_argument("--kind", choices=["square", "abs"], default="square")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--model-repeat", type=int, default=5, help="timed passes over the whole model")
    p.add_argument("--rtol", type=float, default=1e-3, help="agreement bound, relative to the largest score")
    p.add_argument("--out", required=True, help="JSON result path")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device} but CUDA is not available; use --device cpu.", file=sys.stderr)
        return 2
    model_shapes, model_layers = MODELS[args.model]
    layers = args.layers if args.layers is not None else (2 if args.small else model_layers)
    div = SMALL_DIVISOR if args.small else 1
    shapes = {name: (o // div, i // div) for name, (o, i) in model_shapes.items()}
    dtype = DTYPES[args.dtype]
    fused = device.type == "cuda" and kernels.use_fused(torch.empty(0, device=device))
    fused_note = None if fused else "torch path only: the fused kernel needs CUDA, Triton and TP_LORAPRUNE_FUSED!=0"
    if fused_note:
        print(fused_note)
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch path as the library runs it by default
    gen = torch.Generator(device=device).manual_seed(0)

    def run_torch(layer) -> tuple[torch.Tensor, torch.Tensor]:
        return scores.channel_scores(*layer, args.scaling, args.kind)

    def run_fused(layer) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.fused_channel_scores(*layer, args.scaling, args.kind)

    per_shape = [
        time_shape(shape, run_torch, run_fused if fused else None, args, dtype, device, gen)
        for shape in sorted(set(shapes.values()))
    ]
    worst = max((e for row in per_shape for e in row.get("max_rel_error", [])), default=0.0)

    # A whole model: every projection of every layer, each its own tensors, scored back to back.
    model = [make_layer(*shapes[n], args.rank, dtype, device, gen) for _ in range(layers) for n in shapes]

    def score_model(fn) -> None:
        for layer in model:
            fn(layer)

    total: dict = {"layers": layers, "lora_layers": len(model)}
    total["torch_s"] = median_seconds(lambda: score_model(run_torch), 1, args.model_repeat, device)
    if fused:
        total["fused_s"] = median_seconds(lambda: score_model(run_fused), 1, args.model_repeat, device)
        total["speedup"] = total["torch_s"] / total["fused_s"]

    # gradient="projected": left factors (two r×r pseudo-inverses each) one layer at a time or all in a few batched
    # calls (`batched_projected_left_factors`, what LoRAGuidedImportance.accumulate runs), each followed by the
    # torch path or the dispatcher (the fused kernel where it applies)
    def projected(channel_scores, batched: bool) -> Callable[[], None]:
        def run() -> None:
            if batched:
                lefts = scores.batched_projected_left_factors([(A, B, dB, args.scaling) for A, B, _, dB, _ in model])
            else:
                lefts = [None] * len(model)
            for layer, left in zip(model, lefts, strict=True):
                channel_scores(*layer, args.scaling, args.kind, "projected", left)

        return run

    def left_factors_only() -> None:
        scores.batched_projected_left_factors([(A, B, dB, args.scaling) for A, B, _, dB, _ in model])

    for key, fn in (
        ("projected_per_layer_s", projected(scores.channel_scores, batched=False)),
        ("projected_batched_s", projected(scores.channel_scores, batched=True)),
        ("projected_fused_per_layer_s", projected(kernels.channel_scores, batched=False)),
        ("projected_s", projected(kernels.channel_scores, batched=True)),
        ("projected_left_factors_s", left_factors_only),
    ):
        total[key] = median_seconds(fn, 1, args.model_repeat, device)
    total["projected_over_eq10"] = total["projected_s"] / total.get("fused_s", total["torch_s"])
    print(json.dumps(total))

    # the dispatcher's projected scores (fused where it applies) against the torch path, one layer per shape
    projected_worst = 0.0
    for layer in {layer[-1].shape: layer for layer in model}.values():
        A, B, _, dB, _ = layer
        (left,) = scores.batched_projected_left_factors([(A, B, dB, args.scaling)])
        ref = scores.channel_scores(*layer, args.scaling, args.kind, "projected")
        got = kernels.channel_scores(*layer, args.scaling, args.kind, "projected", left)
        projected_worst = max([projected_worst, *(max_rel_error(g, r) for g, r in zip(got, ref, strict=True))])

    agree = worst <= args.rtol and projected_worst <= args.rtol
    result = {
        "what": "channel scores of every LoRA layer of one model, once (what accumulate does per step)",
        "settings": {**vars(args), "layers": layers, "shapes": shapes},
        "fused": {
            "ran": fused,
            "note": fused_note,
            "dot_precision": kernels.DOT_PRECISION,
            "max_rel_error": worst,
            "projected_max_rel_error": projected_worst,
            "agree": agree,
        },
        "per_shape": per_shape,
        "model": total,
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _triton_version(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if not agree:
        print(
            f"DISAGREEMENT: fused vs torch max relative error {worst:.3g} (Eq. 10), {projected_worst:.3g} (projected)"
            f" > --rtol {args.rtol}",
            file=sys.stderr,
        )
        return 1
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
