"""LoRAPrune on a base spread over several GPUs with an accelerate device map (models larger than one GPU).

The decoder layers are split evenly over the GPUs (embeddings on the first, norm and head on the last),
each block is materialized directly on its GPU with random weights at a real shape (bf16, or quantized
layer by layer to an 8-bit / 4-bit bitsandbytes base), and `accelerate.dispatch_model` moves activations
between them. Then a LoRA fine-tune with gradient checkpointing runs `LoRAPruner.step()` after every
optimizer step (accumulate every step, physical removal every `--prune-every` steps) to the target ratio.

Recorded: per-GPU peak memory, median step time outside prune events, each prune event's time, parameters
before/after, whether every weight is still on its block's GPU, and a forward pass of the merged model.

    python benchmarks/device_map.py --shape llama65b --gpus 2 --out benchmarks/results/device_map_65b.json
    python benchmarks/device_map.py --shape tiny --devices cpu,cpu --out /tmp/dm.json          # CPU smoke
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import SHAPES, build, environment, lora_model  # noqa: E402


def split_layers(num_layers: int, devices: list[str]) -> dict[str, str]:
    """An accelerate device map: contiguous, equal runs of decoder layers per device."""
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    for i in range(num_layers):
        device_map[f"model.layers.{i}"] = devices[i * len(devices) // num_layers]
    device_map.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    return device_map


def build_spread(shape: str, device_map: dict[str, str], base: str):
    """A random LLaMA of `shape` whose blocks are created on their own device (never whole on one)."""
    from tp_loraprune.quant import quantize_model

    model = build(shape, "meta")  # the modules, no memory
    config = model.config
    torch.manual_seed(0)
    for name, device in device_map.items():
        if name == "model.rotary_emb":  # its buffers are computed, not initialized
            with torch.device(device):
                model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
            continue
        block = model.get_submodule(name).to_empty(device=device)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, config.initializer_range) if p.ndim > 1 else p.fill_(1.0)
        if base != "bf16" and name.startswith("model.layers."):  # one layer in float at a time
            quantize_model(block, base, compute_dtype=torch.bfloat16)
    if base != "bf16":
        setattr(model, "is_loaded_in_8bit" if base == "8bit" else "is_loaded_in_4bit", True)
    return model


def top(profile: cProfile.Profile, n: int = 25) -> list[str]:
    """The `n` functions with the most cumulative time, one line each."""
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("cumulative").print_stats(n)
    return [line.strip() for line in stream.getvalue().splitlines() if line.strip()[:1].isdigit()][:n]


def sync_all(devices: list[str]) -> None:
    for d in dict.fromkeys(devices):
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def device_of(name: str, device_map: dict[str, str]) -> str:
    return next(device_map[k] for k in device_map if name.startswith(f"{k}.") or name == k)


def run(args) -> dict:
    import accelerate

    from tp_loraprune import LoRAPruneConfig, LoRAPruner, merge_lora
    from tp_loraprune.models import count_parameters

    devices = args.devices.split(",") if args.devices else [f"cuda:{i}" for i in range(args.gpus)]
    cuda = devices[0].startswith("cuda")
    num_layers = SHAPES[args.shape]["num_hidden_layers"]
    device_map = split_layers(num_layers, devices)
    t = time.perf_counter()
    base = build_spread(args.shape, device_map, args.base)
    base = accelerate.dispatch_model(base, device_map=device_map, main_device=devices[0])
    build_s = time.perf_counter() - t
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    initial = count_parameters(base)
    model = lora_model(base, bf16_adapters=True)
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    config = LoRAPruneConfig(ratio=args.ratio, total_steps=args.steps, prune_every=args.prune_every)
    pruner = LoRAPruner(model, config, optimizer=opt)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=devices[0])
    if cuda:
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
    step_times, events, losses = [], [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sync_all(devices)
        step_s = time.perf_counter() - t
        t = time.perf_counter()
        profile = cProfile.Profile()
        with profile:
            event = pruner.step()
            sync_all(devices)
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if event is None:
            step_times.append(step_s)
        else:
            seconds = round(time.perf_counter() - t, 2)
            events.append(
                {"step": event["step"], "s": seconds, "parameters": event["parameters"], "profile": top(profile)}
            )
        report = {"step": pruner.step_count, "step_s": round(step_s, 3), "event": event and events[-1]}
        print(json.dumps(report), flush=True)
    misplaced = [
        n
        for n, p in model.named_parameters()
        if str(p.device) != device_of(n.removeprefix("base_model.model."), device_map)
    ]
    layer_map = {k: v for k, v in device_map.items() if k.startswith("model.layers.")}
    peaks = {d: round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in devices} if cuda else {}
    merged = merge_lora(model, dtype=torch.bfloat16)
    with torch.no_grad():
        out = merged(input_ids=ids[:1, :64]).logits
    return {
        "shape": args.shape,
        "base": args.base,
        "devices": devices,
        "device_names": [torch.cuda.get_device_name(d) for d in devices] if cuda else ["cpu"] * len(devices),
        "layers_per_device": {d: sum(v == d for k, v in layer_map.items()) for d in devices},
        "build_s": round(build_s, 1),
        "parameters_before": initial,
        "parameters_after": count_parameters(merged),
        "step_s_median": round(statistics.median(step_times), 3) if step_times else None,
        "prune_events": events,
        "peak_gib_per_device": peaks,
        "weights_off_their_device": misplaced[:10],
        "losses": losses,
        "merged_logits_finite": bool(torch.isfinite(out).all()),
        "merged_output_device": str(out.device),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama65b", choices=list(SHAPES))
    p.add_argument("--base", default="bf16", choices=["bf16", "8bit", "4bit"])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--devices", default="", help="explicit device list, e.g. cpu,cpu for a smoke run")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prune-every", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = {
        "environment": environment(args.devices or "cuda", extra=("accelerate",)),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    result.update(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
