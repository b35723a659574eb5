"""Are head and channel scores on one scale? One-shot damage predicted by the allocation versus measured.

allocation="auto" compares a head's score with a channel's per removed parameter. That is only sound if both
estimate the same thing (the loss increase of removing them). This checks it on the real SmolLM2-135M: after K
LoRA steps (PiSSA init) on C4 blocks, which accumulate LoRAPrune's score while the full weight gradients of the
same batches are summed for Taylor, the allocator picks, for several parameter budgets, the lowest-ranked
heads only, the lowest-ranked FFN channels only, and its own mix of both. Each choice is removed one-shot from
a copy of the model (LoRA factors of the K steps in place, no fine-tune after) and its WikiText-2 loss increase
ΔL = ln ppl − ln ppl₀ is measured. The scale is right when, at equal parameters, the kind with the lower
predicted score (summed over the removed structures) is the kind with the lower measured ΔL, and when the
predicted scores rank all cells as the measured ΔL does (Spearman ρ).

    python benchmarks/allocation_scale.py --device cuda --steps 16 --out benchmarks/results/allocation_scale.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import _BaseWeightsOnly, pissa_lora_after_steps, write_result  # noqa: E402
from criterion_damage import SquaredTaylor  # noqa: E402
from quality import environment  # noqa: E402

from tp_loraprune import LoRAGuidedImportance, LoRAPruneConfig, LoRAPruner  # noqa: E402
from tp_loraprune.allocation import allocate  # noqa: E402
from tp_loraprune.eval import perplexity  # noqa: E402

KINDS = ("heads", "channels", "auto")


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation of two equally long lists (no ties expected)."""
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(len(v)), key=v.__getitem__))}  # noqa: E731
    rx, ry = rank(x), rank(y)
    n = len(x)
    return 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16, help="LoRA steps whose gradients the criteria see")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--budgets", default="0.02,0.05,0.1", help="fractions of the pruned layers' parameters")
    p.add_argument("--ppl-windows", type=int, default=64, help="WikiText-2 windows of 512 tokens")
    p.add_argument("--criteria", default="loraprune,taylor,taylor-square", help="also: loraprune-projected")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    lora, projected = LoRAGuidedImportance(), LoRAGuidedImportance(gradient="projected")
    peft_model, tok, wikitext = pissa_lora_after_steps(args, [lora, projected])
    criteria = {
        "loraprune": lora,
        "loraprune-projected": projected,
        "taylor": _BaseWeightsOnly(
            tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None), peft_model
        ),
        "taylor-square": _BaseWeightsOnly(SquaredTaylor(), peft_model),
    }

    def log_ppl(m) -> float:
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            return math.log(perplexity(m, tok, wikitext, seq_len=512, max_windows=args.ppl_windows))

    base = log_ppl(peft_model)
    # only its layer selection and guards matter (nothing is pruned here); per-layer units, as the results were made
    config = LoRAPruneConfig(ratio=0.5, uniform=False, round_to=1)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for name in args.criteria.split(","):
        pruner = LoRAPruner(peft_model, config, importance=criteria[name])
        blocks_now = pruner.removal_units()  # before any removal, positions are the original ids
        total = sum(pruner._layer_parameters.values())
        for budget in budgets:
            for kind in KINDS:
                chosen = allocate([b for b in blocks_now if kind == "auto" or b.kind == kind], budget * total)
                pruned = copy.deepcopy(peft_model)
                LoRAPruner(pruned, config).replay([{"removed": chosen.removals}])
                d_loss = log_ppl(pruned) - base
                rows.append(
                    {
                        "criterion": name,
                        "budget": budget,
                        "kind": kind,
                        "removed_parameters": chosen.cost,
                        "predicted_score": chosen.score,
                        "measured_delta_loss": round(d_loss, 5),
                        "heads_removed": sum(len(v) for k, v in chosen.removals.items() if k.endswith("attn")),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                del pruned
        del pruner
    summary = {}
    for name in args.criteria.split(","):
        mine = [r for r in rows if r["criterion"] == name]
        agree = []
        for budget in budgets:
            h, c = (next(r for r in mine if r["budget"] == budget and r["kind"] == k) for k in ("heads", "channels"))
            agree.append(
                (h["predicted_score"] < c["predicted_score"]) == (h["measured_delta_loss"] < c["measured_delta_loss"])
            )
        summary[name] = {
            "heads_vs_channels_order_agrees": agree,
            "spearman_predicted_vs_measured": round(
                spearman([r["predicted_score"] for r in mine], [r["measured_delta_loss"] for r in mine]), 3
            ),
            "auto_at_most_the_best_single_kind": [
                next(r for r in mine if r["budget"] == b and r["kind"] == "auto")["measured_delta_loss"]
                <= min(r["measured_delta_loss"] for r in mine if r["budget"] == b and r["kind"] != "auto") + 1e-9
                for b in budgets
            ],
        }
    result = {
        "what": "one-shot damage (WikiText-2 ΔL, no fine-tune) of heads-only / channels-only / auto removals at equal "
        "parameter budgets, against the allocator's predicted (summed) score",
        "settings": vars(args),
        "unpruned_wikitext2_ppl": round(math.exp(base), 3),
        "summary": summary,
        "rows": rows,
        "environment": environment(args.device),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(args.out, result, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
