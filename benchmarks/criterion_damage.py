"""What each criterion's choice costs before any recovery: perplexity right after one-shot pruning.

The quality benchmark mixes the criterion with the schedule and the fine-tune. This isolates the
criterion: on the real SmolLM2-135M, K LoRA steps on C4 blocks accumulate LoRAPrune's score while the
full weight gradients of the same batches are summed for Taylor; then a copy of the model is pruned
one-shot by each criterion — heads only, FFN channels only, or both — and scored on WikiText-2 with the
LoRA factors of the K steps in place (identical for every criterion). No criterion is fine-tuned after.

Criteria: loraprune (the default score), taylor (Torch-Pruning's group Taylor |W ∘ ∂L/∂W|),
taylor-square (Σ (W ∘ ∂L/∂W)², the paper's square applied to the true gradient), magnitude, random
(median of three seeds).

    python benchmarks/criterion_damage.py --steps 8 --out benchmarks/results/criterion_damage_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import _BaseWeightsOnly, cpu_environment, lora_steps_with_weight_gradients, write_result  # noqa: E402

from tp_loraprune import LoRAGuidedImportance, LoRAPruneConfig, LoRAPruner  # noqa: E402
from tp_loraprune.data import read_text_documents, token_blocks  # noqa: E402
from tp_loraprune.eval import find_data_dir, perplexity, perplexity_text  # noqa: E402
from tp_loraprune.graph import pruning_direction as _direction  # noqa: E402
from tp_loraprune.importance import _index_pairs  # noqa: E402
from tp_loraprune.loading import load_model_and_tokenizer  # noqa: E402
from tp_loraprune.train import TrainConfig, prepare_lora_model  # noqa: E402

TARGETS = {
    "heads": dict(head_ratio=0.34, channel_ratio=0.0),  # one query head of every KV group (3 of 9)
    "ffn": dict(head_ratio=0.0, channel_ratio=0.2),
    "both": dict(ratio=0.2),
}


class SquaredTaylor:
    """Σ (W ∘ ∂L/∂W)² of each channel over the group's base layers (weights whose .grad holds the gradient)."""

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        total = torch.zeros(len(group[0].idxs))
        hit = False
        for i, (dep, idxs) in enumerate(group):
            layer, direction = dep.target.module, _direction(dep.handler)
            if not isinstance(layer, nn.Linear) or layer.weight.grad is None or direction is None:
                continue
            pairs = _index_pairs(idxs, group[i].root_idxs or [])
            if pairs is None:
                continue
            per_element = (layer.weight * layer.weight.grad).float().pow(2)
            per_channel = per_element.sum(1) if direction == "out" else per_element.sum(0)
            rows, roots = pairs
            total.scatter_add_(0, roots, per_channel[rows].cpu())
            hit = True
        return total if hit else None


class OutputSideOnly:
    """Score a group by its members' output channels only (q/k/v rows for heads, gate/up rows for FFN
    channels), leaving out the input-channel members (o_proj / down_proj columns)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, group):
        kept = tp.dependency.Group()
        for i, item in enumerate(group):
            if _direction(item.dep.handler) == "in":
                continue
            kept.add_dep(item.dep, item.idxs)
            kept[len(kept) - 1].root_idxs = group[i].root_idxs
        kept._DG = group._DG
        return self.inner(kept)


def importances(peft_model: nn.Module, lora: dict[str, LoRAGuidedImportance]) -> dict:
    taylor = _BaseWeightsOnly(tp.importance.GroupTaylorImportance(), peft_model)
    return {
        "loraprune": lora["square"],
        "loraprune-out": OutputSideOnly(lora["square"]),
        "loraprune-abs": lora["abs"],
        "taylor": taylor,
        "taylor-out": OutputSideOnly(taylor),
        "taylor-square": _BaseWeightsOnly(SquaredTaylor(), peft_model),
        "magnitude": _BaseWeightsOnly(tp.importance.GroupMagnitudeImportance(p=2), peft_model),
        "random-0": _BaseWeightsOnly(tp.importance.RandomImportance(), peft_model),
        "random-1": _BaseWeightsOnly(tp.importance.RandomImportance(), peft_model),
        "random-2": _BaseWeightsOnly(tp.importance.RandomImportance(), peft_model),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="LoRA steps whose gradients the criteria see")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 windows of 512 tokens")
    p.add_argument("--targets", default="heads,ffn,both")
    p.add_argument("--criteria", default="all", help="comma list of criteria, or all")
    p.add_argument("--lora-init", default="default", help="TrainConfig.lora_init: default (B = 0), pissa_niter_4, ...")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data_dir = find_data_dir()
    if data_dir is None:
        raise SystemExit("needs ../shared/data (C4 sample and WikiText-2); set TP_LORAPRUNE_DATA.")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer()
    blocks = token_blocks(
        read_text_documents(os.path.join(data_dir, "calibration", "c4_demo.jsonl")), tok, block_size=args.block_size
    )
    wikitext = perplexity_text("wikitext2", data_dir)
    train = TrainConfig(lr=args.lr, lora_dropout=0.0, lora_init=args.lora_init, progress=False)
    peft_model = prepare_lora_model(model, train)
    lora = {"square": LoRAGuidedImportance(gradient="eq10"), "abs": LoRAGuidedImportance(score="abs", gradient="eq10")}
    lora_steps_with_weight_gradients(peft_model, blocks, args.steps, args.batch_size, args.lr, lora.values(), len(tok))

    def ppl(m: nn.Module) -> float:
        return round(perplexity(m, tok, wikitext, seq_len=512, max_windows=args.ppl_windows), 3)

    rows = [{"criterion": "none", "target": "unpruned", "wikitext2": ppl(peft_model)}]
    print(json.dumps(rows[-1]), flush=True)
    for target in args.targets.split(","):
        for name in importances(peft_model, lora):
            if args.criteria != "all" and name not in args.criteria.split(","):
                continue
            # one deepcopy of model and criteria together, so the criteria point at the copy's modules
            pruned, imps = copy.deepcopy((peft_model, importances(peft_model, lora)))
            for original, copied in zip(peft_model.parameters(), pruned.parameters(), strict=True):
                copied.grad = original.grad  # deepcopy leaves .grad out; Taylor reads it (pruning slices a copy)
            torch.manual_seed(int(name.split("-")[1]) if name.startswith("random-") else 0)
            config = LoRAPruneConfig(**TARGETS[target])  # prune(1.0): the whole target at once
            pruner = LoRAPruner(pruned, config, importance=imps[name])
            pruner.prune(1.0)
            rows.append(
                {"criterion": name, "target": target, "parameters": pruner.parameters, "wikitext2": ppl(pruned)}
            )
            print(json.dumps(rows[-1]), flush=True)
            del pruned, imps, pruner
    summary: dict[str, dict[str, float]] = {}
    for r in rows[1:]:
        key = "random (median of 3)" if r["criterion"].startswith("random-") else r["criterion"]
        summary.setdefault(key, {}).setdefault(r["target"], []).append(r["wikitext2"])  # type: ignore[arg-type]
    summary = {k: {t: statistics.median(v) for t, v in d.items()} for k, d in summary.items()}  # type: ignore[misc]
    result = {
        "what": "WikiText-2 perplexity right after one-shot pruning, no fine-tune; LoRA factors of the K steps kept",
        "settings": vars(args) | {"targets_config": TARGETS},
        "unpruned": rows[0]["wikitext2"],
        "summary": summary,
        "rows": rows,
        "environment": cpu_environment(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(args.out, result, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
