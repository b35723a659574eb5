"""Quality benchmark: LoRAPrune vs magnitude / Taylor / random / "separate" at equal LoRA budget.

Every method gets the same LoRA fine-tune (rank, steps, tokens, learning rate, data, seed). LoRAPrune
prunes progressively inside it; the baselines prune one-shot at step 0 and then fine-tune. Results are
appended to a JSON file after every run (a killed run keeps what finished), with device, versions and
settings.

    # full table (GPU):
    python benchmarks/quality.py --device cuda --out benchmarks/results/quality_gpu.json
    # reduced configuration for a 2-core CPU (under 30 minutes):
    python benchmarks/quality.py --preset cpu --out benchmarks/results/quality_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import (  # noqa: E402
    calibration_batches,
    keep_latency_table,
    make_importance,
    prefill_seconds_in_turns,
    shared_latency_table,
)

from tp_loraprune import LoRAPruneConfig, LoRAPruner  # noqa: E402
from tp_loraprune.data import read_text_documents, token_blocks  # noqa: E402
from tp_loraprune.eval import find_data_dir, perplexity, perplexity_text, zero_shot  # noqa: E402
from tp_loraprune.export import merge_lora  # noqa: E402
from tp_loraprune.loading import load_model_and_tokenizer  # noqa: E402
from tp_loraprune.models import count_parameters  # noqa: E402
from tp_loraprune.quant import quantize_model  # noqa: E402
from tp_loraprune.results import macs_per_token  # noqa: E402
from tp_loraprune.train import TrainConfig, finetune, make_optimizer, prepare_lora_model, prune  # noqa: E402
from tp_loraprune.widths import layer_widths  # noqa: E402

PRESETS = {
    "gpu": dict(
        ratios=[0.2, 0.3, 0.5],
        steps=100,
        prune_every=10,
        batch_size=8,
        block_size=256,
        ppl_windows=None,
        zs_limit=200,
        seeds=[0],
        ablation_ratio=0.5,
        extra_seeds=[1, 2],
        quantized_bases=["8bit", "4bit"],
        quantized_ratios=[0.2, 0.5],
    ),
    "cpu": dict(
        ratios=[0.2, 0.5],
        steps=16,
        prune_every=2,
        batch_size=2,
        block_size=128,
        ppl_windows=24,
        zs_limit=0,
        seeds=[0],
        ablation_ratio=None,
        extra_seeds=[],
        quantized_bases=[],
        quantized_ratios=[],
    ),
}


def environment(device: str) -> dict:
    import peft
    import torch_pruning as tp
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "device": device,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run_one(name, method, ratio, dense, tokenizer, blocks, args, seed, config_overrides=None) -> dict:
    device = args.device
    overrides = dict(config_overrides or {})
    base = overrides.pop("base", "float")  # "8bit" / "4bit": LoRAPrune on a bitsandbytes base
    keep_quantized = overrides.pop("keep_quantized", False)  # merge into the quantized base instead
    steps = overrides.pop("steps", args.steps)  # a longer (or shorter) budget for this run only
    mmlu = overrides.pop("mmlu", True)  # False: skip MMLU for this run (the allocation plan's extra seeds)
    data = overrides.pop("data", None)  # another fine-tune text for this run only (args.datasets)
    if data is not None:
        blocks = args.datasets[data]()
    lora_init = overrides.pop("lora_init", "default")  # TrainConfig.lora_init; the table's cells: PEFT's default
    prune_every = overrides.pop("prune_every", args.prune_every)  # a denser prune schedule for this run only
    lr = overrides.pop("lr", args.lr)  # another peak learning rate for this run only
    lr_schedule = overrides.pop("lr_schedule", "linear")  # TrainConfig.lr_schedule / decay_ratio for this run only
    decay_ratio = overrides.pop("decay_ratio", 0.1)
    lora_r = overrides.pop("lora_r", 8)  # another LoRA rank for this run only (alpha stays 2 * r)
    if overrides.get("target") == "latency" and args.time_prefill:  # the table is timed at the timed length
        overrides.setdefault("latency_tokens", args.time_prefill)
    reuse = shared_latency_table(args.latency_table, overrides.get("target"))
    if reuse:
        overrides["latency_table"] = reuse
    config = LoRAPruneConfig(ratio=ratio, total_steps=steps, prune_every=prune_every, **overrides)
    train = TrainConfig(
        lr=lr,
        lr_schedule=lr_schedule,
        decay_ratio=decay_ratio,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        lora_init=lora_init,
        precision=args.precision,
        seed=seed,
        device=device,
        progress=False,
    )
    model = copy.deepcopy(dense)
    if base != "float":
        model = quantize_model(model, base, compute_dtype=torch.bfloat16 if device.startswith("cuda") else None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if method == "loraprune":
        result = prune(model, tokenizer, blocks, config, train, dequantize=not keep_quantized)
        merged, events = result.model, len(result.events)
        keep_latency_table(args.latency_table, result.latency_table)
    else:
        peft_model = prepare_lora_model(model, train)
        batches = calibration_batches(blocks, args.calibration_batches, args.batch_size, device)
        imp = make_importance(method, peft_model, batches, config)
        pruner = LoRAPruner(peft_model, config, importance=imp)
        pruner.prune(1.0)
        getattr(imp, "release", lambda: None)()
        optimizer, scheduler = make_optimizer(peft_model, train, steps)
        finetune(peft_model, blocks, train, steps, optimizer=optimizer, scheduler=scheduler)
        merged, events = merge_lora(peft_model).eval(), len(pruner.events)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    row = {
        "name": name,
        "method": method,
        "ratio": ratio,
        "seed": seed,
        "base": base,
        "config": config_overrides or {},
        "parameters": count_parameters(merged),
        "macs_per_token": macs_per_token(merged, args.ppl_seq_len),
        "steps": steps,
        "prune_and_finetune_s": round(seconds, 2),
        "peak_gib": None if peak is None else round(peak, 3),
        "prune_events": events,
        "layer_widths": widths_per_layer(merged),
    }
    row.update(evaluate_model(merged, tokenizer, args, mmlu=mmlu))
    if args.time_prefill:  # timed with the others at the end
        args.timed_models[name] = merged
    del merged, model
    return row


def widths_per_layer(model) -> list[list[int | None]]:
    """[query heads, KV heads, FFN width] of every decoder layer."""
    return [[w["heads"], w["kv_heads"], w["ffn"]] for w in layer_widths(model)]


def time_prefills(models: dict, results: dict, args) -> None:
    """Fill in each run's "prefill_s": the median of 11 prefills of `--time-prefill` tokens, every model of this
    process timed in turns (in the evaluation dtype), and the speedup over dense when dense ran here."""
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        seconds = prefill_seconds_in_turns(models, args.time_prefill, 11, args.device)
    for row in results["runs"]:
        if row["name"] in seconds:
            row["prefill_s"] = round(seconds[row["name"]], 5)
            if "dense" in seconds:
                row["prefill_speedup"] = round(seconds["dense"] / seconds[row["name"]], 3)


def evaluate_model(model, tokenizer, args, mmlu: bool = True) -> dict:
    """Perplexity at `ppl_seq_len` (and at each of `extra_seq_lens`, e.g. 128 as LLM-Pruner), zero-shot, MMLU."""
    out = {}
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        for seq_len in [args.ppl_seq_len, *args.extra_seq_lens]:
            suffix = "" if seq_len == args.ppl_seq_len else f"_{seq_len}"
            for name in ("wikitext2", "ptb"):
                out[f"{name}_ppl{suffix}"] = round(
                    perplexity(
                        model,
                        tokenizer,
                        perplexity_text(name, args.data_dir),
                        seq_len=seq_len,
                        max_windows=args.ppl_windows,
                        batch_size=8,
                    ),
                    3,
                )
    for key, tasks, limit in (("zero_shot", None, args.zs_limit), ("mmlu", ["mmlu_local"], mmlu and args.mmlu_limit)):
        if not limit:
            continue
        try:
            kwargs = {} if tasks is None else {"tasks": tasks}
            out[key] = zero_shot(
                model, tokenizer, data_dir=args.data_dir, limit=limit, batch_size=args.zs_batch_size, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - recorded in the results, the table says why a cell is empty
            out[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


# name: (method, config overrides). LoRAPrune starts LoRA from PiSSA (its default); round_to=1 and the explicit
# `uniform` are what the table on docs/benchmarks.md ran with (before uniform=True and round_to=None were defaults).
# Eq. 10 (`gradient="eq10"`) everywhere the table ran before gradient="projected" became the default.
_PISSA = {"lora_init": "pissa_niter_4", "round_to": 1, "gradient": "eq10"}
_DEFAULT = {"lora_init": "pissa_niter_4", "gradient": "eq10"}
R32 = ("lp-projected-r32", "taylor-fixed-r32", "lp-projected-r32-lr1e-3", "taylor-fixed-r32-lr1e-3")
ALLOCATIONS_LR1E3 = ("lp-ffn_only-lr1e-3", "lp-fixed-lr1e-3", "taylor-default-lr1e-3", "taylor-ffn_only-lr1e-3")
BEST_R32 = ("lp-projected-r32-lr4e-4", "taylor-default-r32-lr1e-3")
SEPARATE = ("lp-separate-lr4e-4", "lp-separate-lr1e-3")
# the tuned comparisons run at every seed and ratio: today's defaults, Taylor fixed and in the default allocator at
# its best peak, each at its best fine-tune, and LoRAPrune's scores used one-shot ("separate") at both peaks
TUNED = ("lp-projected-lr4e-4", "taylor-fixed-lr1e-3", "taylor-default-lr1e-3", *BEST_R32, *SEPARATE)
LRS = ("1e-4", "2e-4", "4e-4", "1e-3")  # old API default, the tables', 2x (the default since), old CLI default
ALLOCATION_CELLS = {
    "lp-auto": ("loraprune", _PISSA | {"uniform": False}),
    "lp-fixed": ("loraprune", _PISSA | {"allocation": "fixed"}),
    "lp-ffn_only": ("loraprune", _PISSA | {"allocation": "ffn_only"}),
    "lp-uniform": ("loraprune", _PISSA | {"uniform": True}),
    "lp-default": ("loraprune", _DEFAULT),  # every default: uniform auto, round_to=None
    "lp-default-cd0.3": ("loraprune", _DEFAULT | {"cooldown": 0.3}),  # the last 30% of steps recover, not 10%
    "lp-default-every2": ("loraprune", _DEFAULT | {"prune_every": 2}),  # 40 smaller prune events instead of 8
    "lp-default-cd0.3-every2": ("loraprune", _DEFAULT | {"cooldown": 0.3, "prune_every": 2}),
    "lp-auto-cap": ("loraprune", _PISSA | {"uniform": False, "max_layer_ratio": "ratio+0.2"}),
    "taylor-auto": ("taylor", {"round_to": 1, "uniform": False}),
    "taylor-fixed": ("taylor", {"round_to": 1, "allocation": "fixed"}),
    "taylor-ffn_only": ("taylor", {"round_to": 1, "allocation": "ffn_only"}),
    "taylor-default": ("taylor", {}),  # Taylor scores in the default allocator: uniform auto, round_to=None
    # the learning-rate schedule: "wsd" holds the peak through the pruning ramp and decays over the last 10%
    # (the cooldown); a higher peak under the linear decay is its simplest rival
    "lp-default-wsd": ("loraprune", _DEFAULT | {"lr_schedule": "wsd"}),
    "lp-default-wsd-d0.3": ("loraprune", _DEFAULT | {"lr_schedule": "wsd", "decay_ratio": 0.3}),
    "lp-default-wsd-every2": ("loraprune", _DEFAULT | {"lr_schedule": "wsd", "prune_every": 2}),
    "lp-ffn_only-wsd": ("loraprune", _DEFAULT | {"allocation": "ffn_only", "lr_schedule": "wsd"}),
    "lp-default-lr4e-4": ("loraprune", _DEFAULT | {"lr": 4e-4}),
    "taylor-fixed-wsd": ("taylor", {"round_to": 1, "allocation": "fixed", "lr_schedule": "wsd"}),
    "taylor-fixed-lr4e-4": ("taylor", {"round_to": 1, "allocation": "fixed", "lr": 4e-4}),
    "taylor-default-wsd": ("taylor", {"lr_schedule": "wsd"}),
    # the weight-gradient estimate: Eq. 10 (the defaults) vs its projection onto what LoRA can see
    "lp-default-projected": ("loraprune", _DEFAULT | {"gradient": "projected"}),
    "lp-default-wsd-projected": ("loraprune", _DEFAULT | {"lr_schedule": "wsd", "gradient": "projected"}),
    # per-layer widths, where the scores of different layers are compared with each other
    "lp-auto-projected": ("loraprune", _PISSA | {"uniform": False, "gradient": "projected"}),
    # the peak learning rate under the linear decay, for today's defaults and their Taylor rival (`--plan lr`)
    **{f"lp-projected-lr{lr}": ("loraprune", {"lora_init": "pissa_niter_4", "lr": float(lr)}) for lr in LRS},
    **{f"taylor-fixed-lr{lr}": ("taylor", {"round_to": 1, "allocation": "fixed", "lr": float(lr)}) for lr in LRS},
    # LoRA rank 32 instead of 8: the projected gradient sees a 4x larger subspace, and the fine-tune recovers more
    "lp-projected-r32": ("loraprune", {"lora_init": "pissa_niter_4", "lora_r": 32}),
    "taylor-fixed-r32": ("taylor", {"round_to": 1, "allocation": "fixed", "lora_r": 32}),
    "lp-projected-r32-lr1e-3": ("loraprune", {"lora_init": "pissa_niter_4", "lora_r": 32, "lr": 1e-3}),
    "taylor-fixed-r32-lr1e-3": ("taylor", {"round_to": 1, "allocation": "fixed", "lora_r": 32, "lr": 1e-3}),
    # each pruner in the default allocator at its best fine-tune of the grid (rank 32; Taylor's best peak is 1e-3)
    "lp-projected-r32-lr4e-4": ("loraprune", {"lora_init": "pissa_niter_4", "lora_r": 32, "lr": 4e-4}),
    "taylor-default-r32-lr1e-3": ("taylor", {"lora_r": 32, "lr": 1e-3}),
    # the allocations again under the best peak of the sweep (1e-3): does auto still beat one kind only?
    "lp-ffn_only-lr1e-3": ("loraprune", {"lora_init": "pissa_niter_4", "allocation": "ffn_only", "lr": 1e-3}),
    "lp-fixed-lr1e-3": ("loraprune", {"lora_init": "pissa_niter_4", "round_to": 1, "allocation": "fixed", "lr": 1e-3}),
    "taylor-default-lr1e-3": ("taylor", {"lr": 1e-3}),
    "taylor-ffn_only-lr1e-3": ("taylor", {"allocation": "ffn_only", "lr": 1e-3}),
    # LoRAPrune's scores from the calibration batches Taylor gets, then one-shot and the same fine-tune as Taylor:
    # tells the progressive schedule's share of the result from the criterion's
    **{f"lp-separate-lr{lr}": ("separate", {"lora_init": "pissa_niter_4", "lr": float(lr)}) for lr in ("4e-4", "1e-3")},
    # ratio of the pruned layers' measured prefill time instead of their parameters (`--plan latency`)
    "lp-projected-latency": ("loraprune", {"lora_init": "pissa_niter_4", "target": "latency"}),
}


# cells run at every seed: the auto allocations and their strongest fixed rival
SEEDED_CELLS = (
    *R32,
    *TUNED,
    "lp-projected-lr4e-4",
    "taylor-fixed-lr4e-4",
    "lp-projected-lr1e-3",
    "taylor-fixed-lr1e-3",
    "lp-auto",
    "lp-uniform",
    "lp-ffn_only",
    "taylor-auto",
    "lp-default",
    "taylor-default",
    "lp-default-cd0.3",
    "lp-default-every2",
    "lp-default-cd0.3-every2",
    "taylor-fixed",
    "lp-default-wsd",
    "lp-default-wsd-every2",
    "lp-ffn_only-wsd",
    "taylor-fixed-wsd",
    "lp-default-projected",
    "lp-default-wsd-projected",
    "lp-auto-projected",
)


def allocation_plan(args) -> list[tuple]:
    """The allocation table: every cell at every ratio (SEEDED_CELLS at every seed, MMLU at the first seed
    only), dense first; then a longer budget and instruction data for LoRAPrune-auto and Taylor-auto at the
    first ratio."""
    runs = [("dense", "dense", 0.0, args.seeds[0], None)]
    for ratio in args.ratios:
        for cell, (method, overrides) in ALLOCATION_CELLS.items():
            seeds = args.seeds + args.extra_seeds if cell in SEEDED_CELLS else args.seeds[:1]
            if overrides.get("max_layer_ratio") == "ratio+0.2":  # no layer loses more than 20 points over the ratio
                overrides = overrides | {"max_layer_ratio": round(min(ratio + 0.2, 1.0), 3)}
            for seed in seeds:
                extra = {} if seed == args.seeds[0] else {"mmlu": False}
                runs.append((f"{cell}@{ratio}/s{seed}", method, ratio, seed, overrides | extra))
    r, seed = args.ratios[0], args.seeds[0]
    for cell in ("lp-auto", "taylor-auto"):
        method, overrides = ALLOCATION_CELLS[cell]
        runs.append(
            (f"{cell}-{args.long_steps}steps@{r}/s{seed}", method, r, seed, overrides | {"steps": args.long_steps})
        )
        runs.append((f"{cell}-alpaca@{r}/s{seed}", method, r, seed, overrides | {"data": "alpaca"}))
    return runs


def schedule_plan(args) -> list[tuple]:
    """The allocation cells under a stronger fine-tune (docs/benchmarks.md): the defaults, ffn_only and Taylor
    fixed with lr_schedule="wsd" at every seed, seeds past the first of Taylor fixed under the linear decay, the
    wsd variants and a twice higher peak at the first seed, and wsd with prune_every=2 at the last ratio."""
    seeds, first, last = args.seeds + args.extra_seeds, args.seeds[:1], args.ratios[-1]
    wanted = set()
    for ratio in args.ratios:
        for cell in ("lp-default-wsd", "lp-ffn_only-wsd", "taylor-fixed-wsd"):
            wanted |= {f"{cell}@{ratio}/s{s}" for s in seeds}
        wanted |= {f"taylor-fixed@{ratio}/s{s}" for s in args.extra_seeds}
        for cell in ("lp-default-wsd-d0.3", "lp-default-lr4e-4", "taylor-fixed-lr4e-4", "taylor-default-wsd"):
            wanted |= {f"{cell}@{ratio}/s{s}" for s in first}
    wanted |= {f"lp-default-wsd-every2@{last}/s{s}" for s in seeds}
    return [run for run in allocation_plan(args) if run[0] in wanted]


def gradient_plan(args) -> list[tuple]:
    """Eq. 10 vs the projected gradient (docs/benchmarks.md), each under the linear decay and "wsd" and with
    per-layer widths, with Taylor fixed beside them: every ratio, every seed, dense first."""
    cells = ("lp-default", "lp-default-projected", "lp-default-wsd", "lp-default-wsd-projected", "taylor-fixed")
    cells += ("lp-auto", "lp-auto-projected")
    seeds = args.seeds + args.extra_seeds
    wanted = {"dense"} | {f"{c}@{r}/s{s}" for c in cells for r in args.ratios for s in seeds}
    return [run for run in allocation_plan(args) if run[0] in wanted]


def lr_plan(args) -> list[tuple]:
    """The peak learning rate and the LoRA rank (docs/benchmarks.md), dense first: today's defaults and Taylor fixed
    at every rate in `LRS`, at rank 32 (`R32`), every allocation at 1e-3 and the best rank-32 fine-tunes, each at
    every ratio for the first seed; the per-layer projected cells (for their zero-shot); LoRAPrune's scores one-shot
    (`SEPARATE`); the extra seeds of the decisive cells at the last ratio and of the `TUNED` ones at every ratio."""
    first = [f"{m}-lr{lr}" for lr in LRS for m in ("lp-projected", "taylor-fixed")]
    first += ["lp-auto-projected", *R32, *ALLOCATIONS_LR1E3, *BEST_R32, *SEPARATE]
    wanted = {"dense"} | {f"{c}@{r}/s{args.seeds[0]}" for c in first for r in args.ratios}
    for c in ("lp-projected-lr4e-4", "taylor-fixed-lr4e-4", "lp-projected-lr1e-3", "taylor-fixed-lr1e-3", *R32):
        wanted |= {f"{c}@{args.ratios[-1]}/s{s}" for s in args.extra_seeds}
    wanted |= {f"{c}@{r}/s{s}" for c in TUNED for r in args.ratios for s in args.extra_seeds}
    return [run for run in allocation_plan(args) if run[0] in wanted]


def latency_plan(args) -> list[tuple]:
    """target="latency" vs "parameters" after the same fine-tune, every ratio and seed, dense first; run with
    --time-prefill. A ratio the latency target cannot reach is recorded as refused."""
    runs = [("dense", "dense", 0.0, args.seeds[0], None)]
    for ratio in args.ratios:
        for seed in args.seeds:
            for cell in ("lp-projected-lr2e-4", "lp-projected-latency"):
                method, overrides = ALLOCATION_CELLS[cell]
                runs.append((f"{cell}@{ratio}/s{seed}", method, ratio, seed, overrides))
    return runs


def plan(args) -> list[tuple]:
    if args.plan == "lr":
        return lr_plan(args)
    if args.plan == "latency":
        return latency_plan(args)
    if args.plan == "allocation":
        return allocation_plan(args)
    if args.plan == "schedule":
        return schedule_plan(args)
    if args.plan == "gradient":
        return gradient_plan(args)
    runs = [("dense", "dense", 0.0, args.seeds[0], None)]
    for ratio in args.ratios:
        for method in args.methods:
            for seed in args.seeds:
                runs.append((f"{method}@{ratio}/s{seed}", method, ratio, seed, None))
    if args.ablation_ratio is not None:
        r = args.ablation_ratio
        for seed in args.extra_seeds:
            runs.append((f"loraprune@{r}/s{seed}", "loraprune", r, seed, None))
        for lam in (0.0, 0.5, 0.99):
            runs.append((f"ema={lam}@{r}", "loraprune", r, args.seeds[0], {"ema": lam}))
        # recovery budget: pruning done by mid-run (50 LoRA-only steps after the last removal), and 4x the steps
        runs.append((f"cooldown=0.5@{r}", "loraprune", r, args.seeds[0], {"cooldown": 0.5}))
        for method in ("loraprune", "taylor"):
            long = 4 * args.steps
            runs.append((f"{method}-{long}steps@{r}", method, r, args.seeds[0], {"steps": long}))
        for score, norm in (("abs", True), ("abs", False), ("square", True)):
            runs.append(
                (f"{score}-norm={norm}@{r}", "loraprune", r, args.seeds[0], {"score": score, "normalize": norm})
            )
    # LoRA initialized from each weight's top singular vectors (B != 0 from the first step); random with the
    # same init tells the criterion's share from the fine-tune's, "separate" the schedule's. (Taylor and
    # magnitude would score the PiSSA residual instead of the weight: not run.)
    pissa = {"lora_init": "pissa_niter_4"}
    for ratio in args.ratios:
        for method in ("loraprune", "random", "separate"):
            runs.append((f"{method}-pissa@{ratio}", method, ratio, args.seeds[0], pissa))
    for ratio in args.ratios:
        for seed in args.extra_seeds:
            runs.append((f"loraprune-pissa@{ratio}/s{seed}", "loraprune", ratio, seed, pissa))
    if args.ablation_ratio is not None:
        r = args.ablation_ratio
        runs.append(
            (
                f"loraprune-pissa-{4 * args.steps}steps@{r}",
                "loraprune",
                r,
                args.seeds[0],
                pissa | {"steps": 4 * args.steps},
            )
        )
    for base in args.quantized_bases:
        for ratio in args.quantized_ratios:
            runs.append((f"loraprune-{base}@{ratio}", "loraprune", ratio, args.seeds[0], {"base": base}))
        first = args.quantized_ratios[0] if args.quantized_ratios else None
        if first is not None and base == "4bit":  # a pruned 8-bit base is always merged dequantized
            overrides = {"base": base, "keep_quantized": True}
            runs.append((f"loraprune-{base}-merged-quantized@{first}", "loraprune", first, args.seeds[0], overrides))
    return runs


def estimated_cost(run: tuple, args) -> float:
    """Rough seconds of one run on a GPU, for balancing workers: steps, plus a fixed evaluation cost."""
    name, method, ratio, seed, overrides = run
    steps = 0 if method == "dense" else (overrides or {}).get("steps", args.steps)
    return steps * 0.4 + 40.0


def balanced_shards(runs: list[tuple], workers: int, args) -> list[list[str]]:
    """Run names split into `workers` lists of about equal estimated cost (longest first, first seeds before
    extra seeds, each to the least loaded worker): under a time budget, what is skipped is extra seeds."""
    shards: list[list[str]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for run in sorted(runs, key=lambda r: (-estimated_cost(r, args), r[3] != args.seeds[0])):
        k = load.index(min(load))
        shards[k].append(run[0])
        load[k] += estimated_cost(run, args)
    return [s for s in shards if s]


def run_in_workers(argv: list[str], args, runs: list[tuple]) -> int:
    """The same benchmark in `args.workers` processes sharing the device (a 135M model leaves a GPU mostly idle),
    merged into `args.out` in plan order. Timings of concurrent runs are not comparable across rows."""
    import subprocess

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    passthrough, skip = [], False
    for a in argv:  # drop --workers/--only/--out (and their values): each worker gets its own
        if skip:
            skip = False
            continue
        if a in ("--workers", "--only", "--out"):
            skip = True
            continue
        if a.split("=")[0] in ("--workers", "--only", "--out"):
            continue
        passthrough.append(a)
    shards = balanced_shards(runs, args.workers, args)
    threads = str(max(1, (os.cpu_count() or 1) // len(shards)))
    procs = []
    for k, names in enumerate(shards):
        part = out.with_suffix(f".part{k}.json")
        log = open(out.with_suffix(f".part{k}.log"), "w")
        cmd = [sys.executable, __file__, *passthrough, "--only", ",".join(names), "--out", str(part)]
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        procs.append((part, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        print(f"worker {k}: {len(names)} runs -> {part}", flush=True)
    merged: dict | None = None
    by_name, skipped = {}, []
    for part, proc, log in procs:
        proc.wait()
        log.close()
        if not part.exists():
            print(f"{part}: no results (exit {proc.returncode}); see {part.with_suffix('.log')}", flush=True)
            continue
        res = json.loads(part.read_text())
        merged = merged or {k: v for k, v in res.items() if k not in ("runs", "skipped")}
        by_name |= {r["name"]: r for r in res["runs"]}
        skipped += res.get("skipped", [])
    if merged is None:
        return 1
    merged["settings"] = dict(merged["settings"], only=args.only, workers=len(shards))
    merged["runs"] = [by_name[r[0]] for r in runs if r[0] in by_name]
    merged["skipped"] = [r[0] for r in runs if r[0] not in by_name]
    merged["total_s"] = round(time.perf_counter() - args.t_start, 1)
    out.write_text(json.dumps(merged, indent=1))
    print(f"{len(merged['runs'])} runs -> {out}; not run: {merged['skipped']}", flush=True)
    return 0 if all(p.returncode == 0 for _, p, _ in procs) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="gpu")
    p.add_argument(
        "--plan",
        choices=["methods", "allocation", "schedule", "gradient", "lr", "latency"],
        default="methods",
        help="which table's runs",
    )
    p.add_argument("--long-steps", type=int, default=1000, help="the allocation plan's longer LoRA budget")
    p.add_argument("--mmlu-limit", type=int, default=0, help="MMLU (5-shot) questions per subject; 0 skips it")
    p.add_argument(
        "--zs-batch-size", type=int, default=8, help="lm-eval batch size (32 ran 12 workers out of GPU memory)"
    )
    p.add_argument("--extra-seq-lens", default="", help="also measure perplexity at these lengths, e.g. 128")
    p.add_argument("--model", default=None, help="default: packaged SmolLM2-135M-Instruct")
    p.add_argument("--data", default=None, help="fine-tune text (default: the C4 sample in the data dir)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--methods", default="loraprune,magnitude,taylor,random,separate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument(
        "--time-prefill",
        type=int,
        default=0,
        help="also time a prefill of this many tokens of every model (median of 11, all models in turns at the "
        "end; keeps them in memory); 0 skips it",
    )
    p.add_argument(
        "--latency-table",
        default=None,
        help='target="latency" runs share this table: the first one measures and writes it, the rest reuse it '
        "(LoRAPruneConfig.latency_table), so they allocate by the same costs",
    )
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later runs are skipped past it")
    p.add_argument("--only", default=None, help="comma-separated run names to run (default: all)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset value, e.g. --set steps=4 --set ratios=[0.2]",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="run the plan in this many processes sharing the device, then merge"
    )
    p.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.t_start = time.perf_counter()
    args.timed_models = {}  # name -> merged model, with --time-prefill
    for k, v in PRESETS[args.preset].items():
        setattr(args, k, v)
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(args, key, json.loads(value))
    args.methods = args.methods.split(",")
    args.extra_seq_lens = [int(n) for n in args.extra_seq_lens.split(",") if n]
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.data_dir = str(find_data_dir(args.data_dir)) if find_data_dir(args.data_dir) else None
    runs = plan(args)
    if args.only:  # those runs, in the order given
        order = {name: i for i, name in enumerate(args.only.split(","))}
        runs = sorted((r for r in runs if r[0] in order), key=lambda r: order[r[0]])
    if args.workers > 1:
        return run_in_workers(argv, args, runs)
    data = args.data or os.path.join(args.data_dir, "calibration", "c4_demo.jsonl")
    t_start = args.t_start
    dense, tokenizer = load_model_and_tokenizer(args.model)
    dense.to(args.device)
    blocks = token_blocks(read_text_documents(data), tokenizer, block_size=args.block_size)
    # the allocation plan's instruction-data cells fine-tune (and score) on Alpaca-cleaned instead of C4
    alpaca = os.path.join(args.data_dir, "calibration", "alpaca_cleaned.jsonl.gz") if args.data_dir else None
    args.datasets = {
        "alpaca": (
            lambda: token_blocks(read_text_documents(alpaca, max_documents=8000), tokenizer, block_size=args.block_size)
        )
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "datasets", "t_start", "timed_models")}
    results = {"environment": environment(args.device), "settings": settings, "train_blocks": len(blocks), "runs": []}
    for name, method, ratio, seed, overrides in runs:
        if time.perf_counter() - t_start > args.time_budget:
            results.setdefault("skipped", []).append(name)
            continue
        print(f"[{time.perf_counter() - t_start:7.1f}s] {name}", flush=True)
        if method == "dense":
            row = {
                "name": "dense",
                "method": "dense",
                "ratio": 0.0,
                "seed": seed,
                "parameters": count_parameters(dense),
                "macs_per_token": macs_per_token(dense, args.ppl_seq_len),
                "layer_widths": widths_per_layer(dense),
            }
            row.update(evaluate_model(dense, tokenizer, args))
            if args.time_prefill:
                args.timed_models["dense"] = dense
        else:
            try:
                row = run_one(name, method, ratio, dense, tokenizer, blocks, args, seed, overrides)
            except ValueError as e:  # refused before any work: a ratio the guards make impossible
                if "cannot be reached" not in str(e):
                    raise
                row = {"name": name, "method": method, "ratio": ratio, "seed": seed, "refused": str(e)}
        print("   ", json.dumps({k: v for k, v in row.items() if k != "zero_shot"}), flush=True)
        results["runs"].append(row)
        out_path.write_text(json.dumps(results, indent=1))
    if args.timed_models:
        time_prefills(args.timed_models, results, args)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    out_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
