"""Allocation: which attention heads and FFN channels to remove, chosen by score per saving (pure functions).

Every prunable block (one attention block, one FFN) offers *units* of removal in the order of its own ranking:

* an FFN: its next lowest-scoring channels, `multiple` at a time (widths stay multiples of `multiple`);
* GQA attention, per-group mode: the next lowest-scoring query head of *every* KV group (the layout stays valid);
* KV-group mode, and multi-head attention: the next lowest-scoring whole KV group (a head for MHA).

A unit's score is the sum of its structures' scores and its cost what it saves: the base parameters it removes
(or, under a latency target, the measured seconds). Head and channel scores are sums of the same per-weight
importance over the weights each structure owns (for LoRAPrune (Ĝ ∘ W')², a Fisher-style estimate of the loss
increase), so a head and a channel are on one scale and a unit's score per saving compares across kinds and
layers. `allocate` takes units by score per saving, lowest first, across every block until the budget is met:
the greedy solution of "save at least P at the least summed score", exact for the fractional relaxation when
each block's units come in increasing score per saving.

Uniform mode (`merge_uniform`) zips the k-th unit of every block of a kind into one unit: every pruned layer then
keeps the same widths and head counts, and the allocation decides only heads versus channels.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Unit:
    """One step of removal: which positions of which blocks, its summed score and what it saves (parameters, or
    seconds under a latency target)."""

    score: float
    cost: float
    removals: Mapping[str, tuple[int, ...]]  # block key → current positions among its alive structures (any order)
    layer_costs: Mapping[int, float]  # decoder layer → what this unit saves there


# What removing structures saves, from the count before to the count after (default: parameters per structure).
Saving = Callable[[int, int], float]


@dataclass(frozen=True)
class Block:
    """A block's removal units in the order its ranking takes them, and the kind of structure it holds."""

    key: str
    kind: str  # "heads" or "channels"
    units: tuple[Unit, ...]


def channel_units(
    key: str, layer: int, scores: torch.Tensor, cost: int, multiple: int, min_width: int, saved: Saving | None = None
) -> Block:
    """An FFN's channels, lowest score first, `multiple` per unit, keeping at least `min_width` channels.

    A unit saves `cost` parameters per channel, or `saved(width before, width after)`. A width that is not a
    multiple of `multiple` first drops to the multiple below it."""
    scores = scores.double().cpu()
    ranked = torch.argsort(scores, stable=True)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.double), torch.cumsum(scores[ranked], 0)]).tolist()
    order = ranked.tolist()
    width = len(order)
    floor = max(-(-min_width // multiple) * multiple, multiple)
    units, start = [], 0
    size = width % multiple or multiple
    while width - start - size >= floor:
        taken = order[start : start + size]
        c = saved(width - start, width - start - size) if saved else size * cost
        score = cumulative[start + size] - cumulative[start]
        units.append(Unit(score, c, {key: tuple(taken)}, {layer: c}))  # `allocate` sorts what it takes
        start += size
        size = multiple
    return Block(key, "channels", tuple(units))


def per_group_head_units(
    key: str, layer: int, head_scores: torch.Tensor, q_cost: int, min_per_group: int, saved: Saving | None = None
) -> Block:
    """GQA query heads in per-group mode: unit k removes the k-th lowest query head of every KV group.

    `head_scores` is (KV groups, query heads per group) over the alive heads; positions are row-major. A unit
    saves `q_cost` parameters per query head, or `saved(query heads before, after)`."""
    kv, size = head_scores.shape
    ranked, order = torch.sort(head_scores.double().cpu(), dim=1, stable=True)
    units = []
    for k in range(size - max(min_per_group, 1)):
        positions = tuple(sorted(g * size + int(order[g, k]) for g in range(kv)))
        cost = saved((size - k) * kv, (size - k - 1) * kv) if saved else kv * q_cost
        units.append(Unit(float(ranked[:, k].sum()), cost, {key: positions}, {layer: cost}))
    return Block(key, "heads", tuple(units))


def kv_group_units(
    key: str,
    layer: int,
    group_scores: torch.Tensor,
    size: int,
    group_cost: int,
    min_kv: int,
    saved: Saving | None = None,
) -> Block:
    """Whole KV groups (a KV head and its `size` query heads; one head for MHA), lowest score first. A unit saves
    `group_cost` parameters, or `saved(KV groups before, after)`."""
    order = torch.argsort(group_scores.double().cpu(), stable=True).tolist()
    units = []
    for k, g in enumerate(order[: len(order) - max(min_kv, 1)]):
        positions = tuple(range(g * size, (g + 1) * size))
        cost = saved(len(order) - k, len(order) - k - 1) if saved else group_cost
        units.append(Unit(float(group_scores[g]), cost, {key: positions}, {layer: cost}))
    return Block(key, "heads", tuple(units))


def expert_channel_units(
    key: str,
    layer: int,
    scores: torch.Tensor,
    cost: int,
    multiple: int,
    min_width: int,
    saved: Saving | None = None,
) -> Block:
    """The FFN channels of a layer's routed experts at one common width: unit k removes the next `multiple`
    lowest-scoring channels of *every* expert (each expert its own), keeping at least `min_width` per expert.

    `scores` is (experts, width) over the alive ones; positions are row-major (expert · width + channel). A unit
    saves `cost` parameters per expert channel, or `saved(width before, width after)`. A width that is not a
    multiple of `multiple` first drops to the multiple below it."""
    experts, width = scores.shape
    ranked, order = torch.sort(scores.double().cpu(), dim=1, stable=True)
    floor = max(-(-min_width // multiple) * multiple, multiple)
    units, start = [], 0
    size = width % multiple or multiple
    while width - start - size >= floor:
        taken = order[:, start : start + size]
        positions = tuple(sorted(e * width + int(p) for e in range(experts) for p in taken[e].tolist()))
        c = saved(width - start, width - start - size) if saved else experts * size * cost
        units.append(Unit(float(ranked[:, start : start + size].sum()), c, {key: positions}, {layer: c}))
        start += size
        size = multiple
    return Block(key, "expert_channels", tuple(units))


def expert_units(
    key: str, layer: int, scores: torch.Tensor, expert_cost: int, min_per_group: int, saved: Saving | None = None
) -> Block:
    """Whole routed experts of a layer, `scores` (routing groups, experts per group) over the alive ones: unit k
    removes the k-th lowest-scoring expert of every group (one expert when the router has no groups), keeping
    `min_per_group` per group. A unit saves `expert_cost` per expert, or `saved(experts before, after)`."""
    block = per_group_head_units(key, layer, scores, expert_cost, min_per_group, saved)
    return Block(key, "experts", block.units)


def merge_uniform(blocks: Iterable[Block]) -> list[Block]:
    """One block per kind whose unit k is the k-th unit of every block of that kind (chains cut to the shortest)."""
    by_kind: dict[str, list[Block]] = {}
    for b in blocks:
        by_kind.setdefault(b.kind, []).append(b)
    merged = []
    for kind, group in by_kind.items():
        units = []
        for parts in zip(*(b.units for b in group), strict=False):
            layer_costs: dict[int, float] = {}
            for u in parts:
                for layer, c in u.layer_costs.items():
                    layer_costs[layer] = layer_costs.get(layer, 0) + c
            removals = {k: v for u in parts for k, v in u.removals.items()}
            units.append(Unit(sum(u.score for u in parts), sum(u.cost for u in parts), removals, layer_costs))
        merged.append(Block(kind, kind, tuple(units)))
    return merged


def removable(blocks: Iterable[Block], layer_room: Mapping[int, float] | None = None) -> float:
    """The most these blocks can give up: every unit, within each layer's room where it is capped."""
    return allocate(blocks, budget=float("inf"), layer_room=layer_room).cost


@dataclass(frozen=True)
class Allocation:
    """What `allocate` chose: positions to remove per block, their summed score and cost."""

    removals: dict[str, list[int]]
    score: float
    cost: float


def allocate(blocks: Iterable[Block], budget: float, layer_room: Mapping[int, float] | None = None) -> Allocation:
    """Take units by score per saving, lowest first, across all blocks, until they save `budget` (parameters or
    seconds, whatever the units' costs are).

    A unit is taken only whole and only if it fits in what is left of the budget and of its layers' room
    (`layer_room`: decoder layer → what it may still lose; layers not listed are not capped); a unit that
    does not fit ends its block's chain (the chain's later units cost as much and score higher). The result
    saves at most `budget`, short of it by less than the smallest unit that was left."""
    room = dict(layer_room or {})
    chains = [chain for chain in (paid(b.units) for b in blocks) if chain]
    heap = [(_per_parameter(chain[0]), i, 0) for i, chain in enumerate(chains)]
    heapq.heapify(heap)
    removals: dict[str, list[int]] = {}
    cost, score = 0.0, 0.0
    while heap and cost < budget:
        _, i, k = heapq.heappop(heap)
        unit = chains[i][k]
        if cost + unit.cost > budget or any(c > room.get(layer, c) for layer, c in unit.layer_costs.items()):
            continue
        for layer, c in unit.layer_costs.items():
            if layer in room:
                room[layer] -= c
        for key, positions in unit.removals.items():
            removals.setdefault(key, []).extend(positions)
        cost += unit.cost
        score += unit.score
        if k + 1 < len(chains[i]):
            heapq.heappush(heap, (_per_parameter(chains[i][k + 1]), i, k + 1))
    return Allocation({k: sorted(v) for k, v in removals.items()}, score, cost)


def paid(chain: tuple[Unit, ...]) -> tuple[Unit, ...]:
    """The chain with every unit that saves nothing merged into the unit after it, and none at its end: removing
    structures costs quality, so it is taken only for a saving (under a latency target, a block's time can stay
    flat over several head counts and drop after them)."""
    out, pending = [], None
    for unit in chain:
        if pending is not None:
            removals = {
                k: tuple(pending.removals.get(k, ())) + tuple(unit.removals.get(k, ()))
                for k in {*pending.removals, *unit.removals}
            }
            layers = {
                k: pending.layer_costs.get(k, 0.0) + unit.layer_costs.get(k, 0.0)
                for k in {*pending.layer_costs, *unit.layer_costs}
            }
            unit = Unit(pending.score + unit.score, pending.cost + unit.cost, removals, layers)
        pending = None if unit.cost > 0 else unit
        if pending is None:
            out.append(unit)
    return tuple(out)


def _per_parameter(unit: Unit) -> float:
    return unit.score / unit.cost  # `paid` chains: every unit saves something
