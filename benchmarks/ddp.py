"""Data-parallel LoRAPrune benchmark: step time, tokens/s and peak memory per rank under DDP, the cost of one
prune event (trace + score + agree + remove + DDP rebuild), and a check that every rank pruned the same
structures (and, with --reference, the same as one process on the same global batch).

    torchrun --nproc_per_node=1 benchmarks/ddp.py --shape smollm2 --out benchmarks/results/ddp_smollm2_1gpu.json
    torchrun --nproc_per_node=2 benchmarks/ddp.py --shape smollm2 --out benchmarks/results/ddp_smollm2_2gpu.json
    torchrun --nproc_per_node=2 benchmarks/ddp.py --shape llama7b --out benchmarks/results/ddp_llama7b_2gpu.json
    torchrun --nproc_per_node=2 benchmarks/ddp.py --device cpu --shape tiny --reference --out /tmp/ddp.json

Random-initialized LLaMA configs of the named shapes (bf16 base weights on CUDA, fp32 on the CPU), PEFT LoRA
r=8 on all 7 projections (fp32 adapters, dropout 0), AdamW. `--batch` is the per-rank batch (weak scaling):
a step processes world × batch sequences, so tokens/s of nproc 1 vs 2 is the throughput scaling. Every step
draws a seeded global batch and each rank takes its rank-strided rows, so `--reference` (rank 0 reruns the
same steps in one process on the whole global batch) sees exactly the same data. With one process the model
is not wrapped in DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import SHAPES, TARGETS, sync  # noqa: E402 - the shapes every benchmark uses
from efficiency import build as build_base  # noqa: E402


def build(args, device: str):
    """Seeded random LLaMA of the shape with LoRA: identical on every rank."""
    import peft

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_base(args.shape, device, dtype, layers=args.layers)
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(model, lora).train()


def global_batch(step: int, rows: int, args, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, args.seq), generator=torch.Generator().manual_seed(1_000 + step))


class Run:
    """One model + optimizer + pruner, stepped on this rank's rows (or on the whole batch in one process)."""

    def __init__(self, args, device: str, rank: int, world: int):
        from tp_loraprune import LoRAPruneConfig, LoRAPruner
        from tp_loraprune.distributed import agree_on_removals, wrap_ddp

        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.model = build(args, device)
        self.vocab = self.model.config.vocab_size
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        # total_steps far beyond the run: step() only accumulates scores; the prune event is called explicitly
        config = LoRAPruneConfig(ratio=args.ratio, total_steps=1_000_000)
        t = time.perf_counter()
        agree = agree_on_removals if world > 1 else None  # the one-process reference runs on rank 0 alone
        self.pruner = LoRAPruner(self.model, config, optimizer=self.optimizer, agree=agree)
        self.pruner_init_s = time.perf_counter() - t
        self.forward = wrap_ddp(self.model) if world > 1 else self.model

    def step(self, step: int) -> float:
        from tp_loraprune.distributed import local_rows

        sync(self.device)
        t = time.perf_counter()
        ids = local_rows(global_batch(step, self.world * self.args.batch, self.args, self.vocab), self.rank, self.world)
        ids = ids.to(self.device)
        self.forward(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.pruner.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t

    def prune(self) -> dict:
        from tp_loraprune.distributed import rewrap_ddp

        sync(self.device)
        t = time.perf_counter()
        event = self.pruner.prune(1.0)
        sync(self.device)
        t_prune = time.perf_counter() - t
        if self.world > 1:
            self.forward = rewrap_ddp(self.forward)
        sync(self.device)
        return {"event": event, "prune_s": t_prune, "prune_and_rewrap_s": time.perf_counter() - t}

    def architecture(self) -> dict:
        return {
            "removed": [e["removed"] for e in self.pruner.events],
            "shapes": {n: list(p.shape) for n, p in self.model.named_parameters()},
        }

    def fingerprint(self) -> list[float]:
        """Sum and absolute sum of the trainable parameters in float64: equal when the replicas are."""
        with torch.no_grad():
            ps = [p.double() for p in self.model.parameters() if p.requires_grad]
            return [float(sum(p.sum() for p in ps)), float(sum(p.abs().sum() for p in ps))]


def memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def removed_pairs(architecture: dict) -> set[tuple[int, str, int]]:
    return {(n, k, i) for n, removed in enumerate(architecture["removed"]) for k, ids in removed.items() for i in ids}


def reference(args, device: str, world: int, n_steps: int) -> dict:
    """The same steps in one process on the whole global batch (world × batch rows), then the prune event."""
    run = Run(args, device, rank=0, world=1)
    run.args = argparse.Namespace(**{**vars(args), "batch": args.batch * world})
    for s in range(n_steps):
        run.step(s)
    run.prune()
    return run.architecture()


def versions() -> dict:
    import peft
    import torch_pruning
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_pruning": torch_pruning.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the shape's own depth)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=5, help="timed steps before the prune event, and again after it")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--checkpointing", type=int, choices=[0, 1], default=None, help="default: 1 for llama7b")
    p.add_argument("--reference", action="store_true", help="rank 0 also reruns the steps in one process")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.checkpointing is None:
        args.checkpointing = int(args.shape == "llama7b")

    from tp_loraprune.distributed import init_from_env, rank, world_size

    device = init_from_env(args.device)
    me, world = rank(), world_size()
    torch.backends.cuda.matmul.allow_tf32 = False  # keep scores comparable with the one-process reference

    run = Run(args, device, me, world)
    before_s = [run.step(s) for s in range(args.warmup + args.steps)][args.warmup :]
    peak_before = memory_gib(device)
    prune = run.prune()
    first = args.warmup + args.steps
    after_s = [run.step(s) for s in range(first, first + args.warmup + args.steps)][args.warmup :]
    peak = memory_gib(device)

    architecture = run.architecture()
    parameters = [run.pruner.initial_parameters, run.pruner.parameters]
    per_rank = gather(
        {
            "rank": me,
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "peak_memory_gib_before_prune": peak_before,
            "peak_memory_gib": peak,
            "prune_s": prune["prune_s"],
            "prune_and_rewrap_s": prune["prune_and_rewrap_s"],
            "fingerprint": run.fingerprint(),
            "architecture": architecture,
        },
        world,
    )
    ref = None
    if args.reference and me == 0:
        del run
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        ref = reference(args, device, world, first)
    if world > 1:
        dist.barrier()
    if me == 0:
        tokens = world * args.batch * args.seq
        result = {
            "world_size": world,
            "ddp": world > 1,
            "devices": [r["device"] for r in per_rank],
            "versions": versions(),
            "settings": {**vars(args), "device": device, "global_batch": world * args.batch},
            "parameters_before_prune": parameters[0],
            "parameters_after_prune": parameters[1],
            "median_step_s_before_prune": statistics.median(before_s),
            "median_step_s_after_prune": statistics.median(after_s),
            "tokens_per_s_before_prune": tokens / statistics.median(before_s),
            "tokens_per_s_after_prune": tokens / statistics.median(after_s),
            "peak_memory_gib_per_rank": [r["peak_memory_gib"] for r in per_rank],
            "peak_memory_gib_before_prune_per_rank": [r["peak_memory_gib_before_prune"] for r in per_rank],
            "prune_event_s_per_rank": [r["prune_and_rewrap_s"] for r in per_rank],
            "prune_only_s_per_rank": [r["prune_s"] for r in per_rank],
            "ranks_same_architecture": all(r["architecture"] == architecture for r in per_rank),
            "ranks_same_weights": all(r["fingerprint"] == per_rank[0]["fingerprint"] for r in per_rank),
            "removed_per_structure": {k: len(v) for e in architecture["removed"] for k, v in e.items()},
        }
        if ref is not None:
            mine, theirs = removed_pairs(architecture), removed_pairs(ref)
            result["reference_same_architecture"] = ref == architecture
            result["reference_overlap"] = len(mine & theirs) / max(1, len(mine | theirs))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "settings")}, indent=1))
    if world > 1:
        dist.destroy_process_group()
    ok = per_rank and all(r["architecture"] == architecture for r in per_rank)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
