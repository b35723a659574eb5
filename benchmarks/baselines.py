"""One-shot baseline criteria on the same graph and removal path as LoRAPrune.

Each baseline scores only the frozen base weights (the LoRA factors are skipped), so magnitude,
Taylor and random see exactly the weights a user would prune without LoRA:

* magnitude: Torch-Pruning's GroupMagnitudeImportance (L2, mean over the group).
* taylor:    Torch-Pruning's GroupTaylorImportance, |W ∘ ∂L/∂W| with full weight gradients accumulated
             over calibration batches (LLM-Pruner's "vanilla" element-wise first-order criterion), summed over
             each structure's weights (one scale for heads and channels, so it can feed allocation="auto").
* random:    Torch-Pruning's RandomImportance.
* separate:  LoRAGuidedImportance accumulated over the calibration batches at the start, then one-shot
             pruning and fine-tuning (the paper's "separate" ablation).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from tp_loraprune import LoRAGuidedImportance
from tp_loraprune.lora import lora_layers


def _lora_parts(model: nn.Module) -> set[nn.Module]:
    parts = set()
    for layer in lora_layers(model).values():
        parts.update(layer.lora_A.values())
        parts.update(layer.lora_B.values())
    return parts


class _BaseWeightsOnly:
    """Drop the LoRA factor items of a group before a stock Torch-Pruning importance sees it."""

    def __init__(self, inner, model: nn.Module):
        self.inner, self.skip = inner, _lora_parts(model)

    def __call__(self, group):
        kept = tp.dependency.Group()
        for i, item in enumerate(group):
            if item.dep.target.module in self.skip:
                continue
            kept.add_dep(item.dep, item.idxs)
            kept[len(kept) - 1].root_idxs = group[i].root_idxs
        kept._DG = group._DG
        return self.inner(kept)


def calibration_batches(blocks: torch.Tensor, n: int, batch_size: int, device) -> list[torch.Tensor]:
    return [blocks[i * batch_size : (i + 1) * batch_size].to(device) for i in range(n)]


def make_importance(method: str, peft_model: nn.Module, batches: list[torch.Tensor], config):
    """A ready-to-use importance for `method`, computed on `batches` where it needs data."""
    if method == "magnitude":
        return _BaseWeightsOnly(tp.importance.GroupMagnitudeImportance(p=2), peft_model)
    if method == "random":
        return _BaseWeightsOnly(tp.importance.RandomImportance(), peft_model)
    if method == "taylor":
        skip = _lora_parts(peft_model)
        bases = [
            m
            for m in peft_model.modules()
            if isinstance(m, nn.Linear) and m not in skip and m.weight.requires_grad is False and m.weight.dim() == 2
        ]
        for m in bases:
            m.weight.requires_grad_(True)
        for ids in batches:
            (peft_model(input_ids=ids, labels=ids).loss / len(batches)).backward()
        # summed, not normalized per group: a head's and a channel's scores stay on one scale (allocation="auto")
        taylor = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
        imp = _BaseWeightsOnly(taylor, peft_model)
        imp.release = lambda: [(m.weight.requires_grad_(False), setattr(m.weight, "grad", None)) for m in bases]
        return imp
    if method == "separate":
        imp = LoRAGuidedImportance(
            ema=config.ema, score=config.score, normalize=config.normalize, gradient=config.gradient
        )
        for ids in batches:
            peft_model(input_ids=ids, labels=ids).loss.backward()
            imp.accumulate(peft_model)
            peft_model.zero_grad(set_to_none=True)
        return imp
    raise ValueError(f"Unknown baseline {method!r}; choose magnitude, taylor, random or separate.")


def lora_steps_with_weight_gradients(
    peft_model: nn.Module, blocks: torch.Tensor, steps: int, batch_size: int, lr: float, importances, vocab_size: int
) -> None:
    """`steps` LoRA steps (AdamW on the LoRA factors, consecutive blocks) that feed every LoRA-guided importance
    in `importances` while each frozen projection's weight gradient sums over the same batches (what Taylor
    reads). The projections are frozen again afterwards; their .grad sums stay. The output embedding (rows =
    `vocab_size`) is left out."""
    bases = [
        m.weight
        for m in peft_model.modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.shape[0] != vocab_size
    ]
    for w in bases:
        w.requires_grad_(True)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(lora_params, lr=lr)
    for step in range(steps):
        ids = blocks[step * batch_size : (step + 1) * batch_size]
        peft_model(input_ids=ids, labels=ids).loss.backward()
        for imp in importances:
            imp.accumulate(peft_model)
        optimizer.step()
        for p in lora_params:
            p.grad = None
    for w in bases:
        w.requires_grad_(False)


def pissa_lora_after_steps(args, importances) -> tuple[nn.Module, object, str]:
    """The real model (`args.model`, default the packaged SmolLM2) on `args.device` with PiSSA LoRA after
    `args.steps` LoRA steps on C4 blocks of `args.block_size` (batch `args.batch_size`, lr `args.lr`) that feed
    `importances` (see `lora_steps_with_weight_gradients`). Returns (peft model, tokenizer, WikiText-2 test text)."""
    from tp_loraprune.data import read_text_documents, token_blocks
    from tp_loraprune.eval import find_data_dir, perplexity_text
    from tp_loraprune.loading import load_model_and_tokenizer
    from tp_loraprune.train import TrainConfig, prepare_lora_model

    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        raise SystemExit("needs the data folder (C4 sample and WikiText-2); pass --data-dir or set TP_LORAPRUNE_DATA.")
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.model)
    model.to(args.device)
    c4 = read_text_documents(os.path.join(data_dir, "calibration", "c4_demo.jsonl"))
    blocks = token_blocks(c4, tok, block_size=args.block_size).to(args.device)
    train = TrainConfig(lr=args.lr, lora_dropout=0.0, lora_init="pissa_niter_4", progress=False, device=args.device)
    peft_model = prepare_lora_model(model, train)
    lora_steps_with_weight_gradients(peft_model, blocks, args.steps, args.batch_size, args.lr, importances, len(tok))
    return peft_model, tok, perplexity_text("wikitext2", data_dir)


def allocation_cost(pruner) -> dict:
    """What the allocation counts: the pruned layers' cost before pruning and what it removed (parameters, or the
    latency table's seconds under target="latency")."""
    return {"before": sum(pruner._layer_totals().values()), "removed": sum(pruner._removed_by_layer().values())}


def shared_latency_table(path: str | None, target: str | None) -> str | None:
    """`--latency-table` of a benchmark, whose first latency run measures the table and every later one allocates
    by it: the file for `LoRAPruneConfig.latency_table` once it is written, None while it is not (or for another
    target)."""
    return path if target == "latency" and path and Path(path).is_file() else None


def keep_latency_table(path: str | None, table) -> None:
    """Write the table a latency run measured to `--latency-table` if no run has written it yet."""
    if path and table is not None and not Path(path).is_file():
        table.save(path)


def prefill_seconds(model, tokens: int, repeats: int, device: str) -> float:
    """Median of `repeats` prefills of `tokens` tokens after one warm-up."""
    return prefill_seconds_in_turns({"model": model}, tokens, repeats, device)["model"]


def times_in_turns(calls: dict, n_warmup: int, rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds of each call in `calls`, timed in turns: `n_warmup` calls each, then `rounds` rounds of one call of
    each, so a change of clock or load during the run falls on every call alike."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for call in calls.values():
        for _ in range(n_warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def prefill_seconds_in_turns(models: dict, tokens: int, repeats: int, device: str) -> dict[str, float]:
    """Median prefill time of each model, timed in turns (`times_in_turns`): one warm-up each, then `repeats`
    rounds of one prefill per model, so whatever else loads the machine falls on every model alike."""
    vocab = min(m.config.vocab_size for m in models.values())
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    calls = {name: (lambda model=model: model(input_ids=ids, use_cache=False)) for name, model in models.items()}
    return {name: statistics.median(t) for name, t in times_in_turns(calls, 1, repeats, device).items()}


def cpu_environment() -> dict:
    """Versions and machine recorded with the CPU studies' results."""
    return {
        "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "python": platform.python_version(),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
    }


def write_result(out: str, result: dict, summary: dict) -> None:
    """Write `result` as JSON to `out` (folders created) and print its summary."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
