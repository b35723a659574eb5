"""Index lists as tensors, fast: Torch-Pruning hands indices around as Python lists of ~10⁴ ints, and
`torch.tensor(list)` converts them an order of magnitude slower than a typed buffer does."""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence

import torch


def index_tensor(indices: Sequence[int]) -> torch.Tensor:
    """A 1-D int64 tensor of `indices` (a list or tuple of ints)."""
    if not indices:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", indices), dtype=torch.long)


def kept_indices(width: int, removed: Iterable[int]) -> torch.Tensor:
    """The indices in range(width) that are not in `removed`, ascending."""
    keep = torch.ones(width, dtype=torch.bool)
    gone = index_tensor(list(removed))
    keep[gone] = False
    return keep.nonzero().flatten()


def membership(chosen: Iterable[int]) -> torch.Tensor:
    """A boolean table: `table[i]` is whether i is in `chosen` (for `select_by_root`)."""
    ids = index_tensor(sorted(set(chosen)))
    table = torch.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=torch.bool)
    table[ids] = True
    return table


def select_by_root(indices: Sequence[int], roots: Sequence[int], chosen: torch.Tensor) -> tuple[list[int], list[int]]:
    """The (indices, roots) pairs whose root is in the `membership` table `chosen`, as two lists in order."""
    root = index_tensor(roots)
    inside = root < len(chosen)
    mask = torch.zeros(len(root), dtype=torch.bool)
    mask[inside] = chosen[root[inside]]
    return index_tensor(indices)[mask].tolist(), root[mask].tolist()
