"""Data-parallel LoRAPrune: two gloo ranks on the CPU (torch.multiprocessing) prune exactly what one process
prunes with the same global batch, end with identical weights, and refuse to go on when a rank would remove
something else.

One spawn runs every multi-rank scenario (process start-up and imports cost seconds); each rank saves what
it saw, and the tests below read it.
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import VOCAB, build_llama, train_step, wrap_peft

from tp_loraprune import LoRAPruneConfig, LoRAPruner
from tp_loraprune.distributed import agree_on_removals, init_from_env, is_distributed, local_rows, rewrap_ddp
from tp_loraprune.train import TrainConfig, prune

WORLD = 2


def _driver_run(grad_accum: int = 1):
    """The one-call driver: 4 rows a step globally (2 per rank under DDP), 3 prune events; with grad_accum=2,
    two micro-batches of 2 rows (1 per rank, gradients all-reduced once per step)."""
    blocks = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    config = LoRAPruneConfig(ratio=0.3, layers=[0, 1, 2], total_steps=8, prune_every=2, warmup=0.0, cooldown=0.25)
    train = TrainConfig(
        lr=1e-2,
        batch_size=4 // grad_accum,
        grad_accum=grad_accum,
        block_size=12,
        lora_r=2,
        lora_dropout=0.0,
        progress=False,
    )
    return prune(build_llama(), None, blocks, config, train)


def _tampered_pruner(rank: int, on_mismatch: str) -> tuple[LoRAPruner, torch.nn.Module]:
    """A pruner whose rank 1 moves one removal to another id before the ranks compare their choices."""

    def tamper(removed):
        if rank == 1:  # swap the first removed id of one structure for a kept one
            key = sorted(removed)[0]
            kept = next(i for i in itertools.count() if i not in removed[key])
            removed = {**removed, key: sorted([*removed[key][1:], kept])}
        return agree_on_removals(removed, on_mismatch=on_mismatch)

    model = wrap_peft(build_llama())
    train_step(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(head_ratio=0.34, channel_ratio=0.25, layers=[1]), agree=tamper)
    pruner.importance.accumulate(model)
    return pruner, model


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        record = {}
        for grad_accum in (1, 2):
            result = _driver_run(grad_accum)
            record[grad_accum] = {
                "events": [e["removed"] for e in result.events],
                "losses": result.losses,
                "summary": result.summary,
                "state": result.model.state_dict(),
            }
        pruner, model = _tampered_pruner(rank, "raise")
        before = sum(p.numel() for p in model.parameters())
        try:
            pruner.prune(1.0)
            record["raised"] = None
        except RuntimeError as e:
            record["raised"] = str(e)
        record["unchanged_after_raise"] = before == sum(p.numel() for p in model.parameters())
        pruner, _ = _tampered_pruner(rank, "adopt")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record["adopted"] = pruner.prune(1.0)["removed"]
        record["adopt_warned"] = any("Adopting rank 0" in str(w.message) for w in caught)
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_prune_like_one_process(ranks, grad_accum):
    single = _driver_run(grad_accum)
    expected = [e["removed"] for e in single.events]
    assert len(expected) >= 2  # several prune events, so later choices depend on training after a prune
    for record in (r[grad_accum] for r in ranks):
        assert record["events"] == expected
        assert record["summary"] == single.summary
        # the same global batch: the mean of the ranks' losses is the one-process loss, up to float rounding
        assert record["losses"] == pytest.approx(single.losses, rel=1e-5)
    shapes = {k: v.shape for k, v in single.model.state_dict().items()}
    assert {k: v.shape for k, v in ranks[0][grad_accum]["state"].items()} == shapes


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ranks_end_with_identical_weights(ranks, grad_accum):
    first, second = ranks[0][grad_accum]["state"], ranks[1][grad_accum]["state"]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_disagreeing_rank_raises_on_every_rank_before_removing(ranks):
    for record in ranks:
        assert record["raised"] is not None
        assert "Ranks [1] chose different structures to remove than rank 0" in record["raised"]
        assert "DistributedDataParallel" in record["raised"]
        assert record["unchanged_after_raise"]


def test_adopt_mode_warns_and_applies_rank0_choice(ranks):
    assert ranks[1]["adopt_warned"]
    assert ranks[0]["adopted"] == ranks[1]["adopted"]


# ------------------------------------------------------------------ single-process behaviour of the helpers
def test_helpers_are_identity_outside_a_process_group():
    assert not is_distributed()
    removed = {"layers.1.mlp": [3, 1]}
    assert agree_on_removals(removed) is removed


def test_init_from_env_is_a_no_op_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cuda") == "cuda"
    assert not dist.is_initialized()


def test_local_rows_split_the_global_batch_rank_strided():
    batch = torch.arange(8).view(4, 2)
    parts = [local_rows(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts).sort(dim=0).values, batch)
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        local_rows(batch, 0, 3)


def test_rewrap_needs_the_ddp_wrapper():
    with pytest.raises(TypeError, match="needs the DistributedDataParallel wrapper, got Linear"):
        rewrap_ddp(torch.nn.Linear(2, 2))


def test_agree_rejects_unknown_mismatch_policy():
    with pytest.raises(ValueError, match="`on_mismatch` must be 'raise' or 'adopt', got 'ignore'"):
        agree_on_removals({}, on_mismatch="ignore")
