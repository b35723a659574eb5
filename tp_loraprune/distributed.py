"""Data-parallel LoRAPrune under torch.distributed: every rank removes the same structures, in lockstep.

A hand-written loop (launched with `torchrun` or `accelerate launch`)::

    device = init_from_env("cuda")                      # process group from the launcher's env, cuda:LOCAL_RANK
    ddp = wrap_ddp(peft_model)                          # DistributedDataParallel on that device
    pruner = LoRAPruner(peft_model, config, optimizer=optimizer, agree=agree_on_removals)
    for batch in my_shard_of_the_data:                  # e.g. a DistributedSampler
        ddp(**batch).loss.backward()                    # DDP averages the LoRA gradients over ranks
        optimizer.step()
        if pruner.step() is not None:                   # a prune event replaced parameters:
            ddp = rewrap_ddp(ddp)                       # DDP's buckets and hooks point at the old ones
        optimizer.zero_grad()

Why this stays in sync: after DDP's all-reduce every rank holds the same LoRA gradients, so every
rank folds the same scores and picks the same heads and channels. `agree_on_removals` checks this on
every prune event (one all_gather of the removal ids) before anything is removed, and raises on every
rank if one rank would remove something else. Removal then runs on every rank on identical weights;
the optimizer follows as in one process (the pruner swaps its parameters and slices AdamW moments).
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Removed = dict[str, list[int]]


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: str) -> str:
    """Join the process group a launcher describes (WORLD_SIZE, RANK, MASTER_ADDR, ... from `torchrun` or
    `accelerate launch`) and return this rank's device: "cuda" becomes "cuda:<LOCAL_RANK>".

    Does nothing when WORLD_SIZE is unset or 1, or when the group is already initialized. The backend
    is NCCL for CUDA devices and gloo otherwise.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return device
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and torch_device.index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return device


def agree_on_removals(removed: Removed, *, on_mismatch: Literal["raise", "adopt"] = "raise") -> Removed:
    """Check that every rank chose the same removals (structure key → original ids); pass as
    `LoRAPruner(..., agree=agree_on_removals)`.

    All ranks must call it together (each prune event does). With DDP they always agree, since their
    gradients, and so their scores, are identical; a mismatch means the replicas diverged (no DDP
    wrapper, a rank that skipped a step, per-rank state in the score). "raise" (the default) raises
    the same RuntimeError on every rank; "adopt" warns and returns rank 0's choice, which keeps the
    architectures identical even where the scores are not.
    """
    if on_mismatch not in ("raise", "adopt"):
        raise ValueError(f"`on_mismatch` must be 'raise' or 'adopt', got {on_mismatch!r}.")
    if not is_distributed():
        return removed
    mine = {str(k): sorted(int(i) for i in ids) for k, ids in removed.items()}
    everyone: list[Removed | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    reference = everyone[0] or {}
    differing = [r for r, theirs in enumerate(everyone) if theirs != reference]
    if not differing:
        return reference
    message = (
        f"Ranks {differing} chose different structures to remove than rank 0 "
        f"({_first_difference(reference, everyone[differing[0]] or {})}). Data-parallel pruning needs "
        "identical scores on every rank: run the forward/backward through DistributedDataParallel (its "
        "all-reduce gives every rank the same LoRA gradients) and call `pruner.step()` on every rank at "
        "every step."
    )
    if on_mismatch == "raise":
        raise RuntimeError(message)
    warnings.warn(message + " Adopting rank 0's choice.", stacklevel=2)
    return reference


def _first_difference(a: Removed, b: Removed) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"first at {key!r}: rank 0 removes {a.get(key)}, the other {b.get(key)}"
    return "no difference"


def wrap_ddp(module: nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """DistributedDataParallel on the device of `module`'s first parameter (device_ids set for CUDA)."""
    device = next(module.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **ddp_kwargs)


def rewrap_ddp(ddp: DistributedDataParallel, **ddp_kwargs) -> DistributedDataParallel:
    """A new DDP wrapper around `ddp.module` after a prune event; returns it (drop the old one).

    DDP registers gradient hooks and flat buckets for the parameters it saw when it was built, and a
    prune event replaces the pruned parameters. The new wrapper keeps the device, process group and
    bucket options of the old one (`ddp_kwargs` overrides them; communication hooks must be registered
    again). It skips DDP's initial collectives (the shape check and the broadcast of rank 0's weights,
    the whole model at every prune event): the ranks already hold identical weights and shapes, since
    they ran the same steps and `agree_on_removals` made them remove the same structures.
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(
            f"rewrap_ddp needs the DistributedDataParallel wrapper, got {type(ddp).__name__}. Keep the wrapper "
            "returned by wrap_ddp (or by accelerate's prepare) and pass that."
        )
    options = dict(
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        process_group=ddp.process_group,
        find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
        init_sync=False,
    )
    return DistributedDataParallel(ddp.module, **{**options, **ddp_kwargs})


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a global batch (rank-strided): the ranks together see exactly `batch`."""
    if len(batch) % world:
        raise ValueError(
            f"A global batch of {len(batch)} rows does not split evenly over {world} ranks; make the batch size "
            f"a multiple of the number of processes (e.g. {world * max(1, len(batch) // world)})."
        )
    return batch[rank::world]


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number (a loss) over all ranks; the number itself in one process."""
    if not is_distributed():
        return value
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
