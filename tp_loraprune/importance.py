"""LoRAGuidedImportance: Torch-Pruning importance from LoRA factors and their gradients only.

Use it like any Torch-Pruning importance::

    imp = LoRAGuidedImportance()
    pruner = tp_loraprune.LoRAMetaPruner(peft_model, example_inputs, importance=imp, ...)  # a tp.pruner.MetaPruner
    for batch in data:
        loss = peft_model(**batch).loss
        loss.backward()
        imp.accumulate(peft_model)      # after backward, before optimizer.step() / zero_grad()
        optimizer.step(); optimizer.zero_grad()
    pruner.step()

State is one moving average per LoRA layer and direction: a score per output channel and a score
per input channel (O(channels)). No gradient of a frozen weight is ever computed or stored.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch_pruning as tp
from torch import nn

from .graph import Direction, pruning_direction
from .group_check import GroupChecker
from .indices import index_tensor
from .kernels import channel_scores
from .lora import NO_LORA_HELP, LoRAGradients, base_layer, base_weight, lora_gradients, lora_layers
from .moe import expert_channel_scores, is_expert_wrapper
from .scores import GradientEstimate, LeftFactors, ScoreKind, batched_projected_left_factors, l2_normalized


def _index_pairs(idxs: list[int], root_idxs: list[int | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(member channels, root channels) of a group item as index tensors, leaving out members without a root
    channel; None when no member has one. Lists of 10⁴ ints convert directly (the common case, no None)."""
    if len(idxs) != len(root_idxs):
        raise ValueError(f"a group item has {len(idxs)} indices but {len(root_idxs)} root indices.")
    if None not in root_idxs:
        return (index_tensor(idxs), index_tensor(cast(list[int], root_idxs))) if idxs else None
    pairs = [(j, r) for j, r in zip(idxs, root_idxs, strict=True) if r is not None]
    if not pairs:
        return None
    rows, roots = zip(*pairs, strict=True)
    return index_tensor(rows), index_tensor(roots)


class LoRAGuidedImportance(tp.importance.Importance):
    """LoRAPrune's criterion (arXiv 2305.18403) as a `tp.importance.Importance`.

    Args:
        ema: λ of the moving average across steps, S̄_t = λ·S̄_{t−1} + (1−λ)·S_t (0 keeps only the last step).
        score: "square" for the paper's (Ĝ ∘ W')², "abs" for the official code's |Ĝ ∘ W'|.
        normalize: divide each layer's channel scores by their L2 norm before they are summed into a
            group (the official code does; it balances layers whose gradients differ in scale).
        gradient: "projected" (default) estimates the weight gradient by its projection onto what LoRA can see
            (`scores.projected_weight_gradient`), which does not grow with the factors' magnitudes, so layers and
            kinds of structure are scored on one scale; "eq10" by the paper's Ĝ, which grows with them. On
            all-MiniLM-L6-v2 Eq. 10 put a head at half a channel's cost per parameter where removing heads costs
            2–3× more; on SmolLM2-135M the two tie within a layer and the projection is better across layers
            (docs/benchmarks.md).

    Calling it on a group returns one score per root index: the sum, over the group's coupled LoRA
    layers (q/k/v/o for a head, gate/up/down for an FFN channel, whatever the graph couples), of each
    layer's scores on the coupled channels. A group without LoRA layers gives None, which makes
    Torch-Pruning skip it. Indices that are mapped without a root index (the k/v rows of a GQA model
    seen from a query-head group, also inside a fused q/k/v projection) are not summed into the group.

    Before scoring, a group that would prune the model wrongly raises a ValueError (Torch-Pruning scores every
    group before it removes anything): attention head channels traced by Torch-Pruning, k/v rows without their
    query heads, a trace with frozen base weights or SDPA (`tp_loraprune.group_check`). Heads are pruned through
    `tp_loraprune.LoRAMetaPruner` or `LoRAPruner`, which declare whole heads.
    """

    def __init__(
        self,
        ema: float = 0.9,
        score: ScoreKind = "square",
        normalize: bool = False,
        gradient: GradientEstimate = "projected",
    ):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"`ema` must be in [0, 1), got {ema}. 0.9 is the paper's value.")
        if score not in ("square", "abs"):
            raise ValueError(f"`score` must be 'square' (paper) or 'abs' (official code), got {score!r}.")
        if gradient not in ("eq10", "projected"):
            raise ValueError(
                f"`gradient` must be 'projected' (the default) or 'eq10' (the paper's estimate), got {gradient!r}."
            )
        self.ema = float(ema)
        self.score: ScoreKind = score
        self.gradient: GradientEstimate = gradient
        self.normalize = bool(normalize)
        self.steps = 0
        self._scores: dict[str, dict[Direction, torch.Tensor]] = {}
        self._name_of: dict[nn.Module, str] = {}
        self._checker: GroupChecker | None = None
        self._checked_model: int | None = None

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        """Fold the current LoRA gradients of every LoRA layer of `model` into the moving average."""
        layers = lora_layers(model)
        if not layers:
            raise ValueError(f"LoRAGuidedImportance found no LoRA layers in {type(model).__name__}. {NO_LORA_HELP}")
        self._watch(model)
        folds: list[tuple[str, Direction, torch.Tensor]] = []
        linear: dict[str, tuple[nn.Module, LoRAGradients]] = {}
        for name, layer in layers.items():
            if is_expert_wrapper(layer):  # routed experts (MoE): one score per expert and channel
                self._name_of[layer] = name
                scores = expert_channel_scores(layer, self.score, self.gradient)
                if scores is not None:
                    folds += [(name, "out", scores[0]), (name, "in", scores[1])]
                continue
            self._name_of[layer] = self._name_of[base_layer(layer)] = name
            g = lora_gradients(layer)
            if g is not None:
                linear[name] = (layer, g)
        # the projection's left factors of every layer in a few batched calls; base weights are read (for
        # quantized bases: dequantized) one layer at a time below
        grads = [g for _, g in linear.values()]
        if self.gradient == "projected":
            lefts: list[LeftFactors | None] = list(
                batched_projected_left_factors([(g.A, g.B, g.dB, g.scaling) for g in grads])
            )
        else:
            lefts = [None] * len(grads)
        for (name, (layer, g)), left in zip(linear.items(), lefts, strict=True):
            out_scores, in_scores = channel_scores(
                g.A, g.B, g.dA, g.dB, base_weight(layer), g.scaling, self.score, self.gradient, left
            )
            folds += [(name, "out", out_scores), (name, "in", in_scores)]
        if not folds:
            raise ValueError(
                "No LoRA layer has a gradient: call `imp.accumulate(model)` after `loss.backward()` and "
                "before `optimizer.zero_grad()`."
            )
        averages = [self._average(name, direction, current) for name, direction, current in folds]
        # S̄ ← S̄ + (1 − λ)(S − S̄) = λ·S̄ + (1 − λ)·S for every layer and direction in one multi-tensor kernel
        # (two small launches per layer and direction otherwise, which a small model's step would notice).
        torch._foreach_lerp_(averages, [current for *_, current in folds], 1.0 - self.ema)
        self.steps += 1

    def _average(self, name: str, direction: Direction, current: torch.Tensor) -> torch.Tensor:
        """The stored moving average of one layer and direction (zeros the first time)."""
        state = self._scores.setdefault(name, {})
        previous = state.get(direction)
        if previous is None:
            previous = state[direction] = torch.zeros_like(current)
        elif previous.shape != current.shape:
            raise ValueError(
                f"Stored scores of {name!r} ({direction}) have {previous.numel()} channels but the layer now has "
                f"{current.numel()}: the layer was pruned without telling the importance. Call "
                f"`imp.on_pruned(module, direction, keep_idxs)` after pruning, or prune with tp_loraprune.LoRAPruner."
            )
        return previous

    def _watch(self, model: nn.Module) -> None:
        """Learn the attention layouts and LoRA factors of `model`, to check the groups it is asked to score."""
        if self._checked_model != id(model):
            self._checker, self._checked_model = GroupChecker(model), id(model)

    # ------------------------------------------------------------------ scoring
    def channel_scores(self, module: nn.Module, direction: Direction) -> torch.Tensor | None:
        """The moving-average scores of a LoRA layer (or its base layer) along one direction."""
        name = self._name_of.get(module)
        if name is None:
            return None
        v = self._scores.get(name, {}).get(direction)
        if v is None:
            return None
        return l2_normalized(v) if self.normalize else v

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        if not self._scores:
            raise ValueError(
                "LoRAGuidedImportance has no scores yet: call `imp.accumulate(model)` after each "
                "`loss.backward()` before pruning."
            )
        if self._checker is not None:
            self._checker.check(group)
        total = torch.zeros(len(group[0].idxs))
        hit = False
        for i, (dep, idxs) in enumerate(group):
            direction = pruning_direction(dep.handler)
            if direction is None:
                continue
            v = self.channel_scores(dep.target.module, direction)
            root_idxs = group[i].root_idxs
            if v is None or root_idxs is None:
                continue
            indices = _index_pairs(idxs, root_idxs)
            if indices is None:
                continue
            rows, roots = indices
            total.scatter_add_(0, roots, v[rows.to(v.device)].cpu())
            hit = True
        return total if hit else None

    # ------------------------------------------------------------------ bookkeeping
    def on_pruned(self, module: nn.Module, direction: Direction, keep_idxs: torch.Tensor) -> None:
        """Keep the stored scores aligned with a layer whose channels were removed."""
        name = self._name_of.get(module)
        if name is None or direction not in self._scores.get(name, {}):
            return
        v = self._scores[name][direction]
        self._scores[name][direction] = v[torch.as_tensor(keep_idxs, device=v.device)]

    def transform_scores(self, module: nn.Module, direction: Direction, transform) -> None:
        """Replace a layer's stored scores along one direction by `transform(scores)` (experts, whose channels are
        gathered per expert, follow their weights this way)."""
        name = self._name_of.get(module)
        if name is not None and direction in self._scores.get(name, {}):
            self._scores[name][direction] = transform(self._scores[name][direction])

    def reset(self) -> None:
        self._scores.clear()
        self.steps = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: '<layer name>.<out|in>' → scores, plus the step count."""
        flat = {f"{name}.{d}": v.detach().cpu() for name, s in self._scores.items() for d, v in s.items()}
        flat["__steps__"] = torch.tensor(self.steps)
        return flat

    def load_state_dict(self, flat: dict[str, torch.Tensor], model: nn.Module | None = None) -> None:
        self._scores = {}
        for key, v in flat.items():
            if key == "__steps__":
                self.steps = int(v)
                continue
            name, direction = key.rsplit(".", 1)
            self._scores.setdefault(name, {})[cast(Direction, direction)] = v.clone()
        if model is not None:
            self._watch(model)
            for name, layer in lora_layers(model).items():
                self._name_of[layer] = name
                if not is_expert_wrapper(layer):
                    self._name_of[base_layer(layer)] = name
                device = next(cast(Any, layer).lora_A.parameters()).device
                self._scores[name] = {d: v.to(device) for d, v in self._scores.get(name, {}).items()}
