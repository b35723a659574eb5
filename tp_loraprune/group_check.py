"""Refusing Torch-Pruning groups that would leave a PEFT model wrong, before anything is pruned.

`LoRAGuidedImportance` scores every group a pruner considers, and Torch-Pruning's pruners score all groups
before they remove anything, so a check here stops a bad prune while the weights are still intact. Groups
whose coupling tp_loraprune declared itself (`tp_loraprune.surgery.declared_group`: whole heads of a known
attention layout) pass; traced groups are refused when:

* a LoRA factor is in the group without its base layer: the graph was traced while the base weights were
  frozen, so Torch-Pruning never saw them (it traces through autograd);
* under grouped-query attention, k/v rows carry root indices: they would be cut on their own (a group
  rooted at k_proj / v_proj), or the trace coupled them one to one with query channels (transformers 5's
  SDPA path calls `enable_gqa=True` and skips `repeat_kv`, which the trace needs to see);
* the group holds the head channels of an attention block at all (q/k/v rows, output-projection columns):
  Torch-Pruning 1.6.1 prunes them as channels unless `num_heads` names every base layer and `lora_B`, and
  even then picks wrong heads under GQA (a group left with one query head per KV group is skipped while
  its head count is decremented; `global_pruning` offsets heads by the KV count) and leaves PEFT's shapes,
  `num_key_value_groups` and the HF config stale. `tp_loraprune.LoRAMetaPruner` removes heads exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from .graph import Direction, pruning_direction
from .lora import base_layer, lora_layers
from .models import AttentionLayout, attention_layouts
from .surgery import is_declared

USE_LORA_METAPRUNER = (
    "Prune PEFT models with tp_loraprune.LoRAMetaPruner(model, example_inputs, importance=imp, ...): it takes "
    "tp.pruner.MetaPruner's arguments, traces the model correctly, removes whole heads and repairs the model."
)


@dataclass(frozen=True)
class HeadSide:
    """Where a module holds attention head channels: the `direction` of `projection` in `layout`."""

    layout: AttentionLayout
    projection: str  # "q", "k", "v", "o", or "qkv" for a fused projection
    direction: Direction  # "out" for q/k/v rows, "in" for the output projection's columns


def _parts(projection: nn.Module, direction: Direction) -> list[nn.Module]:
    """The base layer of a projection and the LoRA factors that share its `direction` channels."""
    parts = [base_layer(projection)]
    if projection is not parts[0]:
        factors = cast(Any, projection).lora_B if direction == "out" else cast(Any, projection).lora_A
        parts += list(factors.values())
    return parts


class GroupChecker:
    """The attention layouts and LoRA factors of one model, to check the groups a pruner scores."""

    def __init__(self, model: nn.Module):
        self.head_sides: dict[nn.Module, HeadSide] = {}
        for a in attention_layouts(model):
            named = {"o": a.o} if a.fused is None else {"qkv": a.q, "o": a.o}
            if a.fused is None:
                named.update(q=a.q, k=a.k, v=a.v)
            for name, projection in named.items():
                direction: Direction = "in" if name == "o" else "out"
                for part in _parts(projection, direction):
                    self.head_sides[part] = HeadSide(a, name, direction)
        # lora_B rows follow the base layer's output channels, lora_A columns its input channels
        self.factor_base: dict[tuple[nn.Module, Direction | None], nn.Module] = {}
        for layer in lora_layers(model).values():
            base = base_layer(layer)
            for factor in cast(Any, layer).lora_B.values():
                self.factor_base[(factor, "out")] = base
            for factor in cast(Any, layer).lora_A.values():
                self.factor_base[(factor, "in")] = base
        self._names = {m: n for n, m in model.named_modules()}

    def check(self, group) -> None:
        """Raise a ValueError for a group that would prune the model wrongly (see the module docstring)."""
        if is_declared(group):
            return
        items = [
            (dep.target.module, pruning_direction(dep.handler), list(idxs), list(group[i].root_idxs or []))
            for i, (dep, idxs) in enumerate(group)
        ]
        present = {(module, direction) for module, direction, _, _ in items}
        for module, direction, idxs, _ in items:
            base = self.factor_base.get((module, direction))
            if base is not None and idxs and (base, direction) not in present:
                raise ValueError(
                    f"This Torch-Pruning group would prune {self._names.get(module, 'a LoRA factor')!r} but not "
                    f"its base layer {self._names.get(base, '')!r}: the graph was traced while the base weights "
                    "were frozen (Torch-Pruning traces through autograd and does not see them). Build the pruner "
                    "inside `with tp_loraprune.graph.traceable(model):`. " + USE_LORA_METAPRUNER
                )
        heads = [
            (side, roots)
            for module, direction, idxs, roots in items
            if idxs and (side := self.head_sides.get(module)) is not None and side.direction == direction
        ]
        if not heads:
            return
        layout = heads[0][0].layout
        if layout.fused is None and layout.group_size > 1:
            kv_rows = [roots for side, roots in heads if side.projection in ("k", "v")]
            kv_rooted = any(r is not None for roots in kv_rows for r in roots)
            with_queries = any(side.projection in ("q", "o") for side, _ in heads)
            if kv_rooted and with_queries:
                raise ValueError(
                    f"{layout.name}: this group couples k/v rows one to one with query channels, but the block has "
                    f"{layout.num_heads} query heads sharing {layout.num_kv_heads} KV heads: the graph was traced "
                    "with SDPA, which on transformers 5 skips `repeat_kv`. Trace inside "
                    "`with tp_loraprune.graph.traceable(model):` (eager attention). " + USE_LORA_METAPRUNER
                )
            if kv_rooted:
                raise ValueError(
                    f"{layout.name}: this group would remove k/v rows without their query heads (the block has "
                    f"{layout.num_heads} query heads sharing {layout.num_kv_heads} KV heads), so the heads that "
                    "read them would break. " + USE_LORA_METAPRUNER
                )
        raise ValueError(
            f"{layout.name}: Torch-Pruning's own pruner would prune this attention block's head channels. It "
            "cuts rows inside heads unless `num_heads` names every base layer and lora_B, picks wrong heads under "
            "grouped-query attention in 1.6.1, and leaves PEFT's shapes, num_key_value_groups and the HF config "
            "stale. " + USE_LORA_METAPRUNER + " Or keep attention out: add the attention modules to ignored_layers."
        )
