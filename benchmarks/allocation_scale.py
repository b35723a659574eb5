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


def one_shot_rows(
    model, pruners: dict, config: LoRAPruneConfig, budgets: list[float], measure
) -> tuple[float, list[dict]]:
    """For every criterion (name → `make(model, config)` giving the LoRAPruner whose removal units the allocator
    reads), budget and kind: remove the allocator's pick one-shot from a copy of `model` and measure its damage,
    `measure(pruned) − measure(model)`. Returns `measure(model)` and the rows."""
    base = measure(model)
    rows = []
    for name, make in pruners.items():
        pruner = make(model, config)
        units = pruner.removal_units()  # before any removal, positions are the original ids
        total = pruner.budget / config.ratio  # the pruned layers' parameters
        head_blocks = set(pruner.summary()["heads"])
        for budget in budgets:
            for kind in KINDS:
                chosen = allocate([u for u in units if kind == "auto" or u.kind == kind], budget * total)
                pruned = copy.deepcopy(model)
                LoRAPruner(pruned, config).replay([{"removed": chosen.removals}])
                rows.append(
                    {
                        "criterion": name,
                        "budget": budget,
                        "kind": kind,
                        "removed_parameters": chosen.cost,
                        "predicted_score": chosen.score,
                        "measured_delta_loss": round(measure(pruned) - base, 5),
                        "heads_removed": sum(len(v) for k, v in chosen.removals.items() if k in head_blocks),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                del pruned
        del pruner
    return base, rows


def summarize(rows: list[dict], budgets: list[float]) -> dict:
    """Per criterion: does the predicted order of heads-only vs channels-only match the measured one at every
    budget, the rank correlation of predicted score and measured damage over all cells, and whether the mix
    (auto) did at most the damage of the better single kind."""
    summary = {}
    for name in dict.fromkeys(r["criterion"] for r in rows):
        by = {(r["budget"], r["kind"]): r for r in rows if r["criterion"] == name}
        mine = list(by.values())
        summary[name] = {
            "heads_vs_channels_order_agrees": [
                (by[b, "heads"]["predicted_score"] < by[b, "channels"]["predicted_score"])
                == (by[b, "heads"]["measured_delta_loss"] < by[b, "channels"]["measured_delta_loss"])
                for b in budgets
            ],
            "spearman_predicted_vs_measured": round(
                spearman([r["predicted_score"] for r in mine], [r["measured_delta_loss"] for r in mine]), 3
            ),
            "auto_at_most_the_best_single_kind": [
                by[b, "auto"]["measured_delta_loss"]
                <= min(by[b, "heads"]["measured_delta_loss"], by[b, "channels"]["measured_delta_loss"]) + 1e-9
                for b in budgets
            ],
        }
    return summary


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
    lora, projected = LoRAGuidedImportance(gradient="eq10"), LoRAGuidedImportance(gradient="projected")
    peft_model, tok, wikitext = pissa_lora_after_steps(args, [lora, projected])
    taylor = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    criteria = {
        "loraprune": lambda m, c: LoRAPruner(m, c, importance=lora),
        "loraprune-projected": lambda m, c: LoRAPruner(m, c, importance=projected),
        "taylor": lambda m, c: LoRAPruner(m, c, importance=_BaseWeightsOnly(taylor, peft_model)),
        "taylor-square": lambda m, c: LoRAPruner(m, c, importance=_BaseWeightsOnly(SquaredTaylor(), peft_model)),
    }

    def log_ppl(m) -> float:
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            return math.log(perplexity(m, tok, wikitext, seq_len=512, max_windows=args.ppl_windows))

    # only its layer selection and guards matter (nothing is pruned here); per-layer units, as the results were made
    config = LoRAPruneConfig(ratio=0.5, uniform=False, round_to=1)
    budgets = [float(b) for b in args.budgets.split(",")]
    chosen = {name: criteria[name] for name in args.criteria.split(",")}
    base, rows = one_shot_rows(peft_model, chosen, config, budgets, log_ppl)
    summary = summarize(rows, budgets)
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
