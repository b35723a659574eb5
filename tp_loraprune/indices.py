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
    selected = root[mask].tolist()
    if indices == roots:  # most items of a channel group index the root's own channels: one conversion
        return selected, list(selected)
    return index_tensor(indices)[mask].tolist(), selected


def positions_of(alive: Sequence[int], ids: Iterable[int], where: str) -> list[int]:
    """The positions of `ids` in the ascending list `alive`, ascending; a ValueError naming `where` for ids that
    are not in it."""
    wanted = index_tensor(sorted(set(ids)))
    alive_t = index_tensor(alive)
    pos = torch.searchsorted(alive_t, wanted)
    if len(alive_t):
        found = alive_t[pos.clamp(max=len(alive_t) - 1)] == wanted
    else:
        found = torch.zeros(len(wanted), dtype=torch.bool)
    if not bool(found.all()):
        missing = wanted[~found].tolist()
        raise ValueError(f"{where}: ids {missing} were already removed or never existed.")
    return pos.tolist()


def original_ids(alive: Sequence[int], positions: Sequence[int]) -> list[int]:
    """`alive[p]` for every position p, ascending."""
    return index_tensor(alive)[index_tensor(positions)].sort().values.tolist()
