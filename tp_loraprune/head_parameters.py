"""Parameters shaped by an attention block's query-head count, which follow their heads when heads are removed.

gpt-oss attention holds `sinks` (num_attention_heads,): one learned logit per query head, concatenated to that
head's attention scores before the softmax. Removing head h removes `sinks[h]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PER_HEAD_PARAMETERS: tuple[str, ...] = ("sinks",)


def head_parameters(attention: nn.Module, num_heads: int) -> list[str]:
    """Names of the per-head parameters directly on `attention` (shape (num_heads,))."""
    return [
        name
        for name in PER_HEAD_PARAMETERS
        if isinstance(getattr(attention, name, None), nn.Parameter)
        and tuple(getattr(attention, name).shape) == (num_heads,)
    ]


def remove_head_parameters(
    attention: nn.Module, num_heads: int, removed: list[int], on_replaced: Callable[..., None]
) -> None:
    """Drop the entries of `removed` query-head positions from every per-head parameter of `attention` (which had
    `num_heads` heads); `on_replaced(module, attr, old, new, keep)` is told of each replacement."""
    gone = set(removed)
    keep = torch.tensor([h for h in range(num_heads) if h not in gone], dtype=torch.long)
    for name in head_parameters(attention, num_heads):
        old = getattr(attention, name)
        new = nn.Parameter(old.detach().index_select(0, keep.to(old.device)), requires_grad=old.requires_grad)
        setattr(attention, name, new)
        on_replaced(attention, name, old, new, keep)
