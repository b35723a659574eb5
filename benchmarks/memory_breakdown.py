"""Where a LoRA step's peak GPU memory goes, on bf16, 8-bit and 4-bit bases (random weights at a real shape).

For each base: memory held before the step (weights, LoRA, optimizer state), the peaks of the forward and of
the whole step, and, from one step recorded with `torch.cuda.memory._record_memory_history`, the allocations
alive at the step's peak grouped by the innermost line of transformers / peft / bitsandbytes / tp_loraprune
code that made them (the biggest groups are what the peak is made of).

    python benchmarks/memory_breakdown.py --shape llama7b --out benchmarks/results/memory_breakdown_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import build, environment, lora_model  # noqa: E402

OWN_CODE = ("transformers", "peft", "bitsandbytes", "tp_loraprune", "accelerate", "torch/utils/checkpoint")


def frame_key(frames: list[dict]) -> str:
    """The innermost frame in library code (else the innermost frame): 'file.py:line:function'."""
    for f in frames:
        if any(part in f["filename"] for part in OWN_CODE):
            return f"{f['filename'].split('site-packages/')[-1]}:{f['line']}:{f['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']}:{frames[0]['name']}" if frames else "?"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[str, list[int]]]:
    """Replay a device trace: (the peak of bytes allocated during it, {frame key: [bytes, count]} alive then)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], frame_key(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, key in at_peak.values():
        groups[key][0] += size
        groups[key][1] += 1
    return peak, dict(groups)


def dtypes(model) -> dict[str, int]:
    """Parameter bytes by dtype."""
    out: dict[str, int] = defaultdict(int)
    for p in model.parameters():
        out[str(p.dtype)] += p.numel() * p.element_size()
    return {k: round(v / 2**30, 3) for k, v in out.items()}


def measure(base_kind: str, args) -> dict:
    from tp_loraprune.quant import quantize_model

    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    base = build(args.shape, "cuda")
    if base_kind != "bf16":
        base = quantize_model(base, base_kind, compute_dtype=torch.bfloat16)
    gc.collect()
    torch.cuda.empty_cache()
    row: dict = {"base": base_kind, "weights_gib": gib(torch.cuda.memory_allocated()), "param_dtypes": dtypes(base)}
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    model = lora_model(base, bf16_adapters=True)
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device="cuda")
    hidden_dtype = []
    hook = base.model.layers[0].register_forward_hook(lambda m, i, o: hidden_dtype.append(str(o[0].dtype)))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here on
    hook.remove()
    torch.cuda.synchronize()
    row["hidden_state_dtype"] = hidden_dtype[0]
    row["held_before_step_gib"] = gib(torch.cuda.memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    loss = model(input_ids=ids, labels=ids).loss
    torch.cuda.synchronize()
    row["forward_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss
    torch.cuda.synchronize()
    row["step_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak, groups = live_at_peak(trace)
    row["recorded_step_peak_gib"] = gib(start + peak)
    row["trace_events"] = len(trace)
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[: args.top]
    row["alive_at_peak"] = [{"where": k, "gib": gib(b), "tensors": n} for k, (b, n) in top]
    print(json.dumps(row, indent=1), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama7b")
    p.add_argument("--bases", default="bf16,8bit,4bit")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = {
        "environment": environment("cuda", extra=("bitsandbytes",)),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "bases": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.bases.split(","):
        result["bases"].append(measure(kind, args))
        gc.collect()
        torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
