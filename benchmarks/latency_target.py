"""target="latency" vs target="parameters": what each removes at the same ratio, and the prefill time it buys.

On the real SmolLM2-135M: K LoRA steps (PiSSA init) accumulate LoRAPrune's scores; then a copy is pruned one-shot
with allocation="auto" at `ratio` of the pruned layers' parameters, and another copy at `ratio` of their measured
time (the latency table is measured on this device, for a prefill of `--tokens` tokens). Both are merged and
timed side by side (prefill, median of `--repeats`), with WikiText-2 perplexity right after pruning (no
fine-tune), so the trade between time saved and damage is visible.

    python benchmarks/latency_target.py --device cuda --dtype bf16 --tokens 4096 --ratios 0.2,0.3,0.5 \
        --out benchmarks/results/latency_target_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import allocation_cost, pissa_lora_after_steps, prefill_seconds, write_result  # noqa: E402
from quality import environment  # noqa: E402

from tp_loraprune import LoRAGuidedImportance, LoRAPruneConfig, LoRAPruner, latency_replay, merge_lora  # noqa: E402
from tp_loraprune.eval import perplexity  # noqa: E402
from tp_loraprune.widths import layer_widths  # noqa: E402


@contextlib.contextmanager
def synthetic_attention(on: bool):
    """Time attention as a synthetic block (the table before the replay of the model's own blocks)."""
    saved = latency_replay.replayable
    if on:
        latency_replay.replayable = lambda layout: False
    try:
        yield
    finally:
        latency_replay.replayable = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ratios", default="0.3", help="comma list: each ratio is pruned under both targets")
    p.add_argument("--tokens", type=int, default=256, help="prefill length of the latency table and the timing")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="prune, time and evaluate in this dtype")
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic-too", action="store_true", help="also the latency table of synthetic attention blocks")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    imp = LoRAGuidedImportance(gradient="eq10")
    peft_model, tok, wikitext = pissa_lora_after_steps(args, [imp])
    if args.dtype == "bf16":  # what a GPU serves; the latency table is measured in the weights' dtype
        peft_model.to(torch.bfloat16)
    dense = merge_lora(copy.deepcopy(peft_model)).eval()
    rows = [
        {
            "target": "dense",
            "parameters": sum(p.numel() for p in dense.parameters()),
            "prefill_s": prefill_seconds(dense, args.tokens, args.repeats, args.device),
            "wikitext2": round(perplexity(dense, tok, wikitext, seq_len=512, max_windows=args.ppl_windows), 3),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    del dense
    variants = ["parameters", "latency"] + (["latency-synthetic"] if args.synthetic_too else [])
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for target in variants:
            pruned, scores = copy.deepcopy((peft_model, imp))
            config = LoRAPruneConfig(ratio=ratio, target=target.split("-")[0], latency_tokens=args.tokens)
            t1 = time.perf_counter()
            try:
                with synthetic_attention(target == "latency-synthetic"):
                    pruner = LoRAPruner(pruned, config, importance=scores)
                setup_s = time.perf_counter() - t1
                pruner.prune(1.0)
            except ValueError as e:  # a ratio the guards cannot reach is refused up front: record why
                rows.append({"target": target, "ratio": ratio, "refused": str(e)[:400]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            cost = allocation_cost(pruner)
            merged = merge_lora(pruned).eval()
            widths = layer_widths(merged)[pruner.layer_indices[0]]
            rows.append(
                {
                    "target": target,
                    "ratio": ratio,
                    "parameters": sum(p.numel() for p in merged.parameters()),
                    "pruned_layer": {k: widths[k] for k in ("heads", "kv_heads", "ffn")},
                    "pruner_setup_s": round(setup_s, 2),
                    # the share of the pruned layers' cost the allocation believes it removed (the table's, in time)
                    "believed_share": round(cost["removed"] / cost["before"], 4),
                    "prefill_s": prefill_seconds(merged, args.tokens, args.repeats, args.device),
                    "wikitext2": round(perplexity(merged, tok, wikitext, seq_len=512, max_windows=args.ppl_windows), 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del pruned, scores, pruner, merged
    dense_s = rows[0]["prefill_s"]
    summary = {
        f"{r['target']}@{r.get('ratio', 0)}": {
            "speed-up": round(dense_s / r["prefill_s"], 3),
            "wikitext2": r["wikitext2"],
        }
        for r in rows
        if "prefill_s" in r
    }
    result = {
        "what": "one-shot auto allocation at the same ratio of parameters vs of measured prefill time",
        "settings": vars(args),
        "summary": summary,
        "rows": rows,
        "environment": environment(args.device),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(args.out, result, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
