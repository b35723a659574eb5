"""Executing a Torch-Pruning group while keeping everything that points at the old parameters valid.

Torch-Pruning replaces each pruned weight by a new `nn.Parameter` (which defaults to requires_grad=True).
`prune_items` runs the group's pruning functions and reports every replaced parameter with the indices
it kept, so the caller can re-freeze base weights, slice optimizer moments and slice stored scores.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .conv1d import weight_dim
from .fused import projection_items
from .graph import pruning_fn
from .head_parameters import remove_head_entries
from .indices import kept_indices, membership, select_by_root
from .models import AttentionLayout

# Groups built by `declared_group`: their coupling comes from the model layout, not from Torch-Pruning's
# propagation, so LoRAGuidedImportance scores their attention items without the checks of `group_check`.
_DECLARED: weakref.WeakSet = weakref.WeakSet()


def is_declared(group) -> bool:
    """Whether `group` was built by `declared_group` (whole heads of a known layout)."""
    return group in _DECLARED


@dataclass(frozen=True)
class Replaced:
    module: nn.Module
    attr: str  # "weight" or "bias"
    old: nn.Parameter
    new: nn.Parameter
    direction: str  # "out" or "in"
    dim: int
    keep: torch.Tensor  # kept indices along `dim` (ascending)


def declared_group(graph: tp.DependencyGraph, items: Iterable[tuple[nn.Module, str, list[int], list[int]]]):
    """A Torch-Pruning group built from known couplings instead of graph propagation.

    `items` are (module, "out" | "in", idxs, root_idxs); a root index may be None (an index the
    importance does not sum, e.g. a KV row shared by several query heads). Used for attention heads,
    whose coupling (q/k/v rows, o columns, per head) is declared by the model layout, and for the FFNs
    of `tp_loraprune.fused`, like Torch-Pruning's own
    `num_heads`: Torch-Pruning 1.6.1's propagation through RoPE's rotate_half does not terminate
    when a KV group holds two query heads, and it repeats k/v indices when whole KV groups go.
    """
    group = tp.dependency.Group()
    for module, direction, idxs, root_idxs in items:
        node = graph.module2node.get(module)
        if node is None:
            raise ValueError(f"{type(module).__name__} is not in the dependency graph; it cannot be pruned.")
        fn = pruning_fn(graph, module, direction)
        group.add_dep(tp.dependency.Dependency(fn, fn, source=node, target=node), list(idxs))
        group[len(group) - 1].root_idxs = list(root_idxs)
    group._DG = graph
    _DECLARED.add(group)
    return group


def head_group(graph: tp.DependencyGraph, a: AttentionLayout, heads: list[int], kv_heads: list[int]):
    """The declared group of some query heads (q rows, o columns) and KV heads (k/v rows) of one block.

    A fused q/k/v projection is one item holding the q, k and v rows (`a.rows`); the output projection
    then comes first, so the group's first item has one index per root (the head channels)."""
    q_rows, k_rows, v_rows = a.rows(heads, kv_heads)
    q_channels = [h * a.head_dim + j for h in heads for j in range(a.head_dim)]
    kv_channels = [g * a.head_dim + j for g in kv_heads for j in range(a.head_dim)]
    kv_roots = kv_channels if a.group_size == 1 else [None] * len(kv_channels)
    if a.fused is not None:
        return declared_group(
            graph,
            projection_items(a.o, "in", q_channels, q_channels)
            + projection_items(a.q, "out", q_rows + k_rows + v_rows, q_channels + kv_roots + kv_roots),
        )
    items: list[Any] = []
    for proj, direction, rows, roots in (
        (a.q, "out", q_rows, q_channels),
        (a.o, "in", q_channels, q_channels),
        (a.k, "out", k_rows, kv_roots),
        (a.v, "out", v_rows, kv_roots),
    ):
        if rows:
            items += projection_items(proj, direction, rows, roots)
    return declared_group(graph, items)


def remove_heads(
    graph: tp.DependencyGraph,
    a: AttentionLayout,
    heads: list[int],
    kv_heads: list[int],
    on_replaced: Callable[[Replaced], None],
    *,
    across_norms: bool = False,
) -> None:
    """Remove query heads and KV heads (current positions) of one block: their projection rows and columns
    (`head_group`) and every parameter laid out by heads (`AttentionLayout.extras`: per-head norms, per-head
    scalars; with `across_norms`, also the removed heads' entries of norms spanning all heads)."""
    extras, num_heads, num_kv = a.extras(), a.num_heads, a.num_kv_heads
    prune_items(graph, head_group(graph, a, heads, kv_heads), on_replaced)

    def report(module: nn.Module, attr: str, old: nn.Parameter, new: nn.Parameter, keep: torch.Tensor) -> None:
        on_replaced(Replaced(module, attr, old, new, "out", 0, keep))

    entries = extras.entries + (extras.spanning if across_norms else ())
    remove_head_entries(entries, num_heads, num_kv, heads, kv_heads, report)


def subgroup(group, root_positions: Iterable[int]):
    """The part of a full group that removes `root_positions` of its root: each item keeps the indices
    whose root index is selected. Equivalent to asking the graph again for those root indices, without a
    second propagation (and its index-mapping refresh) per structure."""
    chosen = set(root_positions)
    table = membership(chosen)
    part = tp.dependency.Group()
    for item in group:
        if None in item.root_idxs:
            pairs = [(i, r) for i, r in zip(item.idxs, item.root_idxs, strict=True) if r in chosen]
            idxs, roots = [i for i, _ in pairs], [r for _, r in pairs]
        else:
            if len(item.idxs) != len(item.root_idxs):
                raise ValueError(f"a group item has {len(item.idxs)} indices but {len(item.root_idxs)} root indices.")
            idxs, roots = select_by_root(item.idxs, item.root_idxs, table)
        if idxs:
            part.add_dep(item.dep, idxs)
            part[len(part) - 1].root_idxs = roots
    part._DG = group._DG
    return part


def prune_items(graph: tp.DependencyGraph, items: Iterable, on_replaced: Callable[[Replaced], None]) -> None:
    """Prune the given group items (a whole group or a filtered part of one).

    Plain `nn.Linear` items under Torch-Pruning's own Linear pruning functions are sliced here with one
    `index_select` per tensor (what those functions do, without their set arithmetic on Python lists of ~10⁴
    indices); every other item goes through Torch-Pruning."""
    group = tp.dependency.Group()
    watched = []
    for dep, idxs in items:
        module = dep.target.module
        direction = _plain_linear(dep, idxs)
        if direction is not None:
            keep = kept_indices(_width(module, "weight", module.weight, direction == "out"), idxs)
            for replaced in slice_linear(module, direction, keep):
                on_replaced(replaced)
            continue
        group.add_dep(dep, idxs)
        if not isinstance(module, nn.Module):
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and not (attr == "bias" and not out):
                watched.append((module, attr, p, "out" if out else "in", _width(module, attr, p, out), set(idxs)))
    if len(group):
        group._DG = graph
        group.prune(record_history=False)
    for module, attr, old, direction, width, removed in watched:
        new = getattr(module, attr)
        if new is old:
            continue
        dim = weight_dim(module, direction) if attr == "weight" else 0  # biases are watched on "out" only
        keep = kept_indices(width, removed)
        on_replaced(Replaced(module, attr, old, new, direction, dim, keep))


_LINEAR_PRUNING = {
    tp.pruner.function.LinearPruner.prune_out_channels: "out",
    tp.pruner.function.LinearPruner.prune_in_channels: "in",
}


def _plain_linear(dep, idxs) -> str | None:
    """'out' / 'in' when `dep` is Torch-Pruning's own pruning of a plain `nn.Linear` with plain int indices."""
    if type(dep.target.module) is not nn.Linear or (idxs and not isinstance(idxs[0], int)):
        return None
    return _LINEAR_PRUNING.get(getattr(dep.handler, "__func__", None))


def slice_linear(module: nn.Linear, direction: str, keep: torch.Tensor) -> list[Replaced]:
    """Keep rows (`direction="out"`, with the bias) or columns ("in") `keep` of a Linear, gradients included; the
    new parameters keep `requires_grad` of the old ones."""
    dim = 0 if direction == "out" else 1
    on_device = keep.to(module.weight.device)
    replaced = []
    for attr, d in (("weight", dim), ("bias", 0)):
        old = getattr(module, attr)
        if old is None or (attr == "bias" and direction == "in"):
            continue
        new = nn.Parameter(old.detach().index_select(d, on_device), requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = old.grad.index_select(d, on_device)
        setattr(module, attr, new)
        replaced.append(Replaced(module, attr, old, new, direction, d, keep))
    if direction == "out":
        module.out_features = len(keep)
    else:
        module.in_features = len(keep)
    return replaced


def _width(module: nn.Module, attr: str, p: nn.Parameter, out: bool) -> int:
    """Channels along the pruned side; a packed (4-bit) weight's shape is not its logical one."""
    if attr == "bias":
        return p.shape[0]
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    return p.shape[weight_dim(module, "out" if out else "in")]
