"""Parameters of an attention block laid out by heads, outside its q/k/v/o projections.

When heads go, every such parameter must lose the same heads, so that each remaining head keeps its own
entries. They are found by shape inside the module that keeps the head counts (`AttentionLayout.head_owner`),
with H query heads, K KV heads and head size d:

* a weight of shape (H, ...) or (K, ...) whose trailing shape is (d,) or nothing: per-head entries stacked along
  its first dimension, e.g. Cohere's `use_qk_norm` (`q_norm.weight` (H, d), `k_norm.weight` (K, d)) or per-head
  scalars (attention sinks, (H,));
* a `ModuleList` of H (or K) modules: one module per head, e.g. StableLM's `qk_layernorm`
  (`q_layernorm.norms`, a LayerNorm(d) per head);
* a vector of shape (d,): shared by every head (Qwen3 / Gemma 3 `q_norm`, Phi `q_layernorm`), left as it is;
* a vector of shape (H·d,) or (K·d,) in a norm (a module whose class name contains "Norm"): it **spans all
  heads**. OLMo 2 / OLMo 3 normalise the whole q (and k) projection with one RMS before splitting it into heads,
  so removing a head changes how the remaining ones are normalised and cannot be exact (`spanning`). Outside a
  norm such a vector is ambiguous (a bias of the hidden-size output has the same shape when H·d = hidden) and
  is not guessed.

Anything else in that module (another linear layer, a parameter of another shape) is `unexplained`: pairing
it with heads is not known, so `tp_loraprune.support.check_supported` refuses the model.
A vector of length d == H (or K) is read as shared in a norm and as per-head elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from .conv1d import is_linear_like


@dataclass(frozen=True)
class HeadEntries:
    """One parameter (or list of per-head modules) that follows the heads.

    width: entries per head along dimension 0 (1 for a (heads, ...) weight or a module list, d for a (heads·d,)
    vector)."""

    name: str  # qualified name, relative to the attention block's head owner (for messages)
    module: nn.Module  # the parameter's owner, or the ModuleList
    attr: str | None  # the parameter's name; None for a ModuleList
    per: Literal["q", "kv"]  # indexed by query heads or by KV heads
    width: int

    def kept(self, removed: Iterable[int], heads: int) -> list[int]:
        """Dimension-0 indices that stay when the heads `removed` (of `heads`) go."""
        gone = set(removed)
        return [h * self.width + j for h in range(heads) if h not in gone for j in range(self.width)]


@dataclass(frozen=True)
class HeadExtras:
    """What an attention block holds besides its projections, by how it follows head removal."""

    entries: tuple[HeadEntries, ...] = ()  # follow their heads exactly
    spanning: tuple[HeadEntries, ...] = ()  # norms over all heads: their heads' entries can go, inexactly
    unexplained: tuple[str, ...] = ()  # "name (what)" of parts that cannot be paired with heads


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def head_extras(owner: nn.Module, projections: Iterable[nn.Module], heads: int, kv_heads: int, d: int) -> HeadExtras:
    """Classify everything in `owner` (the module keeping the head counts) outside the `projections` subtrees."""
    skip: set[nn.Module] = set()
    for p in projections:
        skip.update(p.modules())
    entries: list[HeadEntries] = []
    spanning: list[HeadEntries] = []
    unexplained: list[str] = []
    for name, module in owner.named_modules():
        if module in skip:
            continue
        if is_linear_like(module):
            unexplained.append(f"{name} ({type(module).__name__} {tuple(cast(torch.Tensor, module.weight).shape)})")
            skip.update(module.modules())
            continue
        if isinstance(module, nn.ModuleList) and len(module) in (heads, kv_heads) and _one_per_head(module):
            per: Literal["q", "kv"] = "q" if len(module) == heads else "kv"
            entries.append(HeadEntries(name, module, None, per, 1))
            skip.update(module.modules())
            continue
        for attr, p in module.named_parameters(recurse=False):
            where = f"{name}.{attr}" if name else attr
            shape = tuple(p.shape)
            if shape == (d,) and (_is_norm(module) or d not in (heads, kv_heads)):
                continue  # shared by every head
            if shape and shape[0] in (heads, kv_heads) and shape[1:] in ((), (d,)):
                entries.append(HeadEntries(where, module, attr, "q" if shape[0] == heads else "kv", 1))
            elif shape in ((heads * d,), (kv_heads * d,)) and _is_norm(module):
                spanning.append(HeadEntries(where, module, attr, "q" if shape[0] == heads * d else "kv", d))
            else:
                unexplained.append(f"{where} (a {type(module).__name__} parameter of shape {shape})")
    return HeadExtras(tuple(entries), tuple(spanning), tuple(unexplained))


def _one_per_head(modules: nn.ModuleList) -> bool:
    """Entries of one class with equal parameter shapes: one module per head (StableLM's per-head norms)."""
    kinds = {(type(m), tuple(tuple(p.shape) for p in m.parameters())) for m in modules}
    return len(kinds) == 1 and any(True for _ in modules[0].parameters())


def remove_head_entries(
    entries: Iterable[HeadEntries],
    heads: int,
    kv_heads: int,
    removed: list[int],
    removed_kv: list[int],
    on_replaced: Callable[[nn.Module, str, nn.Parameter, nn.Parameter, torch.Tensor], None],
) -> None:
    """Remove the heads `removed` (positions among `heads`) and KV heads `removed_kv` from every entry;
    `on_replaced(module, attr, old, new, kept)` is told of each replaced parameter."""
    for e in entries:
        gone, total = (removed, heads) if e.per == "q" else (removed_kv, kv_heads)
        if not gone:
            continue
        kept = e.kept(gone, total)
        if e.attr is None:
            modules = cast(nn.ModuleList, e.module)
            survivors = [modules[i] for i in kept]
            for i in reversed(range(len(modules))):
                del modules[i]
            modules.extend(survivors)
            continue
        old = cast(nn.Parameter, getattr(e.module, e.attr))
        index = torch.tensor(kept, dtype=torch.long, device=old.device)
        new = nn.Parameter(old.detach().index_select(0, index).clone(), requires_grad=old.requires_grad)
        setattr(e.module, e.attr, new)
        shape = getattr(e.module, "normalized_shape", None)  # torch's LayerNorm / RMSNorm check their input by it
        if isinstance(shape, tuple) and len(shape) == new.dim():
            e.module.normalized_shape = tuple(new.shape)  # type: ignore[assignment]
        on_replaced(e.module, e.attr, old, new, index.cpu())
