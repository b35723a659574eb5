"""What LoRAPruner tracks for the routed experts of the pruned layers: the experts and expert channels still alive
(by original id), their removal units for the allocation, and their physical removal.

Each MoE block gives two structure keys: its experts module's name for expert FFN channels (ids
`expert · initial width + channel`, original ids) and its router's name for whole experts (original expert ids).

Scores (LoRAPrune's (Ĝ ∘ W')² summed over the weights a structure owns, as for heads and dense channels):

* an expert channel: its gate and up rows and its down column, in that expert;
* a whole expert: all its weights (the sum of its channels' scores). An expert's output is multiplied by its routing
  weight, so the gradient of its weights, and with it this score, is a sum over the tokens routed to it weighted by
  their routing weight: an expert no token picks scores exactly 0. Its router row is removed with it but not
  scored: for an expert that is never picked, Eq. 10 still gives that row B·dA ≠ 0 (the router's LoRA A has a
  gradient from the other rows), which on small models outweighed the experts' own scores.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from . import allocation
from .moe import (
    DOWN,
    EXPERT_WIDTH_MULTIPLE,
    GATE_UP,
    MoELayout,
    lora_modules,
    moe_layouts,
    prune_routed,
    routed_channel_scores,
)
from .optim_state import replace_parameter_by


@dataclass
class _Routed:
    """One MoE block: its original expert ids still alive and, per alive expert, its original channel ids."""

    layout: MoELayout
    layer: int  # decoder layer index
    initial_experts: int
    initial_width: int
    alive: list[int] = field(default_factory=list)
    channels: dict[int, list[int]] = field(default_factory=dict)
    wrappers: dict[str, nn.Module] = field(default_factory=dict)  # its LoRA ParamWrappers (moe.MoELayout.wrappers)

    @property
    def width(self) -> int:
        return len(self.channels[self.alive[0]])

    def channel_ids(self) -> list[int]:
        """Original ids of the alive expert channels, in position order (expert position · width + channel)."""
        return [e * self.initial_width + c for e in self.alive for c in self.channels[e]]

    def parameters(self, experts: int, width: int) -> int:
        """Base parameters of the routed experts (and their router rows) at `experts` experts `width` wide."""
        return experts * (width * self.layout.channel_cost + self.layout.expert_cost)


class RoutedExperts:
    """The routed experts of the selected layers (`layer_of`: module → decoder layer index)."""

    def __init__(self, model: nn.Module, layer_of: dict[nn.Module, int]):
        self.model = model
        self.blocks: dict[str, _Routed] = {}
        self.router_keys: dict[str, str] = {}  # router key → channel key of the same block
        lora = lora_modules(model)
        for layout in moe_layouts(model):
            if layout.block not in layer_of:
                continue
            E, width = layout.num_experts, layout.width
            self.blocks[layout.experts_name] = _Routed(
                layout,
                layer_of[layout.block],
                E,
                width,
                list(range(E)),
                {e: list(range(width)) for e in range(E)},
                layout.wrappers(model, lora),
            )
            self.router_keys[layout.router_name] = layout.experts_name

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def __contains__(self, key: str) -> bool:
        return key in self.blocks or key in self.router_keys

    def layers(self) -> dict[str, int]:
        """Decoder layer of every structure key."""
        return {
            **{key: b.layer for key, b in self.blocks.items()},
            **{key: self.blocks[c].layer for key, c in self.router_keys.items()},
        }

    def alive(self) -> dict[str, list[int]]:
        """Original ids in position order, per structure key (what allocation positions index)."""
        return {
            **{key: b.channel_ids() for key, b in self.blocks.items()},
            **{key: list(self.blocks[c].alive) for key, c in self.router_keys.items()},
        }

    @property
    def narrowest(self) -> int:
        return min((b.initial_width for b in self.blocks.values()), default=0)

    # ------------------------------------------------------------------ costs
    def initial_parameters(self) -> dict[int, int]:
        """Base parameters of the routed experts per decoder layer, unpruned."""
        totals: dict[int, int] = {}
        for b in self.blocks.values():
            totals[b.layer] = totals.get(b.layer, 0) + b.parameters(b.initial_experts, b.initial_width)
        return totals

    def removed_by_layer(self) -> dict[int, int]:
        """Base parameters removed so far per decoder layer."""
        removed: dict[int, int] = {}
        for b in self.blocks.values():
            gone = b.parameters(b.initial_experts, b.initial_width) - b.parameters(len(b.alive), b.width)
            removed[b.layer] = removed.get(b.layer, 0) + gone
        return removed

    def channel_parameters(self, importance) -> int:
        """Base parameters of the expert channels that can be scored, unpruned (what a channel ratio applies to)."""
        return sum(
            b.initial_experts * b.initial_width * b.layout.channel_cost
            for b in self.blocks.values()
            if self._scorable(b, importance)[0]
        )

    def _scorable(self, b: _Routed, importance) -> tuple[bool, bool]:
        """Whether LoRA scores (its channels, its whole experts) of a block."""
        if getattr(importance, "channel_scores", None) is None:
            return False, False
        channels = GATE_UP in b.wrappers or DOWN in b.wrappers
        return channels, channels

    def unscorable_hint(self, importance) -> str:
        """A sentence naming the MoE layers whose experts nothing scores ('' when every one is scored)."""
        names = [b.layout.name for b in self.blocks.values() if not self._scorable(b, importance)[1]]
        if not names:
            return ""
        return (
            f" The routed experts of {len(names)} MoE layers (e.g. {names[0]!r}) carry no LoRA, so they cannot be "
            "scored or pruned: add peft.LoraConfig(..., target_parameters=['gate_up_proj', 'down_proj']) "
            "(docs/architectures.md, Mixture of experts)."
        )

    # ------------------------------------------------------------------ scores and units
    def scores(self, b: _Routed, importance) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(per expert and channel (E, I), per expert (E,)) of one block from the importance's stored scores."""
        read = getattr(importance, "channel_scores", None)
        if read is None:  # not a LoRA-guided importance: nothing scores experts
            return None, None
        wrappers = b.wrappers
        up = read(wrappers[GATE_UP], "out") if GATE_UP in wrappers else None
        down = read(wrappers[DOWN], "in") if DOWN in wrappers else None
        channels = routed_channel_scores(b.layout, up, down)
        return (channels, channels.sum(1)) if channels is not None else (None, None)

    @staticmethod
    def width_multiple(multiple: int) -> int:
        """The multiple expert widths stay at: lcm of the pruner's and `EXPERT_WIDTH_MULTIPLE` (grouped_mm)."""
        return math.lcm(multiple, EXPERT_WIDTH_MULTIPLE)

    def units(self, importance, multiple: int, min_width: int, scored: bool = True) -> list[allocation.Block]:
        """Every block's removal units: expert channels (kind "expert_channels", widths at multiples of
        `width_multiple(multiple)`) and whole experts ("experts")."""
        multiple = self.width_multiple(multiple)
        units = []
        for key, b in self.blocks.items():
            E, width = len(b.alive), b.width
            if scored:
                channels, experts = self.scores(b, importance)
            else:  # the reach of the target: what the scores will be able to choose from
                can_channels, can_experts = self._scorable(b, importance)
                channels = torch.zeros(E, width) if can_channels else None
                experts = torch.zeros(E) if can_experts else None
                if experts is None:
                    continue
            if experts is None:
                warnings.warn(
                    f"{b.layout.name}: no LoRA layer on its experts, so they cannot be scored; left "
                    "unpruned. Add LoRA on them: peft.LoraConfig(..., target_parameters=['gate_up_proj', "
                    "'down_proj']) (docs/architectures.md, Mixture of experts).",
                    stacklevel=4,
                )
                continue
            # what an expert saves: at its width, or, for the reach of the whole target (not `scored`), at the width
            # its channel units leave (so the two kinds together save exactly the block's reachable parameters)
            expert_width = width
            if channels is not None:
                saved = partial(_saved_channels, b)
                block = allocation.expert_channel_units(
                    key, b.layer, channels, b.layout.channel_cost, multiple, min_width, saved
                )
                units.append(block)
                if not scored:
                    expert_width -= sum(len(u.removals[key]) for u in block.units) // E
            groups, _ = b.layout.groups
            units.append(
                allocation.expert_units(
                    b.layout.router_name,
                    b.layer,
                    experts.view(groups, E // groups),
                    b.parameters(1, expert_width),
                    b.layout.min_per_group,
                    partial(_saved_experts, b, expert_width),
                )
            )
        return units

    def choose_channels(self, keep_width, importance) -> dict[str, list[int]]:
        """Per block, the lowest-scoring channels of every expert down to `keep_width(initial width)` (fixed rules:
        the channel ratio applies to expert FFNs like dense ones; whole experts go only under allocation="auto")."""
        removed = {}
        for key, b in self.blocks.items():
            n_remove = b.width - keep_width(b.initial_width)
            if n_remove <= 0:
                continue
            channels, _ = self.scores(b, importance)
            if channels is None:
                warnings.warn(f"{b.layout.name}: no LoRA layer on its experts; left unpruned.", stacklevel=4)
                continue
            drop = torch.argsort(channels, dim=1, stable=True)[:, :n_remove]
            removed[key] = sorted(
                e * b.initial_width + b.channels[e][p] for i, e in enumerate(b.alive) for p in drop[i].tolist()
            )
        return removed

    # ------------------------------------------------------------------ removal
    def remove(self, removed: dict[str, list[int]], optimizer=None, importance=None) -> None:
        """Physically remove experts (router keys) and expert channels (channel keys), by original ids.

        Channel ids of experts removed in the same call are dropped with their expert."""
        for key, b in self.blocks.items():
            experts, channels = removed.get(b.layout.router_name, []), removed.get(key, [])
            if experts or channels:
                self._remove_block(b, experts, channels, optimizer, importance)

    def _remove_block(self, b: _Routed, experts: list[int], channel_ids: list[int], optimizer, importance) -> None:
        name = b.layout.name
        missing = [e for e in experts if e not in b.alive]
        if missing:
            raise ValueError(f"{name}: experts {missing} were already removed or never existed.")
        gone = set(experts)
        kept = [e for e in b.alive if e not in gone]
        groups, _ = b.layout.groups
        size = len(b.alive) // groups
        per_group = [sum(1 for e in kept if b.alive.index(e) // size == g) for g in range(groups)]
        if len(set(per_group)) != 1 or per_group[0] < b.layout.min_per_group:
            raise ValueError(
                f"{name}: removing experts {sorted(gone)} would keep {per_group} experts per routing group; the router "
                f"(top_k={b.layout.top_k}, n_group={groups}) needs the same number in every group and at least "
                f"{b.layout.min_per_group}."
            )
        by_expert: dict[int, set[int]] = {e: set() for e in kept}
        for i in channel_ids:
            e, c = divmod(i, b.initial_width)
            if e in gone:
                continue
            if e not in by_expert or c not in b.channels[e]:
                raise ValueError(f"{name}: expert channel {i} (expert {e}, channel {c}) is not alive.")
            by_expert[e].add(c)
        counts = {len(v) for v in by_expert.values()}
        if len(counts) > 1 or b.width - max(counts, default=0) < 1:
            raise ValueError(
                f"{name}: removing expert channels {channel_ids} would leave experts of unequal or zero width; the "
                "experts of one layer share one width."
            )
        kept_channels = [[p for p, c in enumerate(b.channels[e]) if c not in by_expert[e]] for e in kept]
        replaced, score_transforms = prune_routed(
            b.layout,
            b.wrappers,
            torch.tensor([b.alive.index(e) for e in kept]),
            torch.tensor(kept_channels, dtype=torch.long).view(len(kept), -1),
        )
        for r in replaced:
            if optimizer is not None and isinstance(r.old, nn.Parameter) and r.old.requires_grad:
                replace_parameter_by(optimizer, r.old, r.new, r.transform)
        transform_scores = getattr(importance, "transform_scores", None)
        if transform_scores is not None:
            for s in score_transforms:
                transform_scores(s.module, s.direction, s.transform)
        b.channels = {e: [c for c in b.channels[e] if c not in by_expert[e]] for e in kept}
        b.alive = kept

    def merge(self, first: dict[str, list[int]], then: dict[str, list[int]]) -> dict[str, list[int]]:
        """The removals of two consecutive rounds of one event as one (channel ids of experts that the second round
        removes are dropped, so the merged removal replays to the same model)."""
        merged = {k: sorted(set(first.get(k, [])) | set(then.get(k, []))) for k in {*first, *then}}
        for key, b in self.blocks.items():
            gone = set(merged.get(b.layout.router_name, []))
            if key in merged:
                merged[key] = [i for i in merged[key] if i // b.initial_width not in gone]
        return {k: v for k, v in merged.items() if v}

    def check_uniform(self) -> str | None:
        """Why the experts of the pruned layers cannot keep one layout (uniform=True), or None."""
        shapes = {(b.initial_experts, b.initial_width, b.layout.groups) for b in self.blocks.values()}
        if len(shapes) > 1:
            return f"routed experts (experts, width, groups) {sorted(shapes)}"
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "experts": {b.layout.name: len(b.alive) for b in self.blocks.values()},
            "expert_ffn": {b.layout.name: b.width for b in self.blocks.values()},
        }


def _saved_channels(b: _Routed, before: int, after: int) -> float:
    return b.parameters(len(b.alive), before) - b.parameters(len(b.alive), after)


def _saved_experts(b: _Routed, width: int, before: int, after: int) -> float:
    return b.parameters(before, width) - b.parameters(after, width)
