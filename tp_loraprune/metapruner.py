"""LoRAMetaPruner: Torch-Pruning's `MetaPruner` for PEFT LoRA models, exact on every architecture tp_loraprune knows.

It takes `tp.pruner.MetaPruner`'s arguments and is one (`isinstance(pruner, tp.pruner.MetaPruner)`; MetaPruner is
`tp.pruner.BasePruner` under its older name)::

    imp = LoRAGuidedImportance()
    pruner = LoRAMetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                            prune_num_heads=True, head_pruning_ratio=0.5, iterative_steps=2)
    ...  # loss.backward(); imp.accumulate(model); optimizer.step(); optimizer.zero_grad()
    pruner.step()

What a PEFT model needs and plain `MetaPruner` does not do is set up here: the trace (`graph.traceable`: every
parameter requires grad, eager attention, no KV cache), the pruners Torch-Pruning lacks (GPT-2's Conv1D,
bitsandbytes layers), the logits as the traced output, and LoRA ranks kept. Each `step()` removes whole heads
and FFN channels through `LoRAPruner` (declared head groups, so Torch-Pruning 1.6.1's GQA head selection is
not used) and restores every invariant: frozen base weights, optimizer state, stored scores, PEFT shapes,
attention bookkeeping, HF config.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.algorithms.scheduler import linear_scheduler

from .config import LoRAPruneConfig
from .graph import customized_pruners, example_input_ids, model_output, traceable
from .importance import LoRAGuidedImportance
from .lora import lora_layers
from .mla import opaque_while_tracing
from .models import decoder_layers
from .pruner import LoRAPruner

# MetaPruner arguments LoRAMetaPruner sets itself or cannot honour, with what to do instead.
_NOT_TAKEN = {
    "num_heads": "head counts are read from the model (GQA and fused q/k/v included)",
    "in_channel_groups": "channel groups are read from the model",
    "out_channel_groups": "channel groups are read from the model (Phi-3's gate_up_proj included)",
    "channel_groups": "channel groups are read from the model",
    "customized_pruners": "the pruners for Conv1D and bitsandbytes layers are set for you",
    "unwrapped_parameters": "the hidden size is never pruned, so no bare parameter is",
    "root_module_types": "the structures pruned are attention heads and FFN channels",
    "output_transform": "the logits (or last_hidden_state) are traced",
    "forward_fn": "pass a dict of keyword inputs as example_inputs instead",
    "pruning_ratio_dict": "use one pruning_ratio; keep decoder layers whole with ignored_layers",
    "head_pruning_ratio_dict": "use one head_pruning_ratio; keep decoder layers whole with ignored_layers",
    "max_pruning_ratio": "widths follow pruning_ratio exactly",
    "isomorphic": "use global_pruning=True to rank FFN channels across layers",
    "ch_sparsity": "use pruning_ratio",
    "ch_sparsity_dict": "use pruning_ratio",
}

_LORA_PARTS = ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}. It is the fraction removed; 0.2 keeps 80%.")


def selected_layers(model: nn.Module, ignored_layers) -> list[int]:
    """Indices of the decoder layers to prune: all but the ones in `ignored_layers`.

    Modules outside the decoder layers (lm_head, embeddings) and LoRA factors are never pruned, so ignoring
    them changes nothing; any other module inside a decoder layer must be ignored with its whole layer."""
    layers = decoder_layers(model)
    ignored: set[nn.Module] = set()
    for x in ignored_layers or ():
        if isinstance(x, nn.Module):
            ignored.update(x.modules())
        elif not isinstance(x, nn.Parameter):
            raise TypeError(f"`ignored_layers` holds modules (or parameters), got {type(x).__name__}.")
    names = {m: n for n, m in model.named_modules()}
    chosen = []
    for i, layer in enumerate(layers):
        if layer in ignored:
            continue
        partial = [
            names[m]
            for m in layer.modules()
            if m in ignored and not any(part in names[m].split(".") for part in _LORA_PARTS)
        ]
        if partial:
            raise ValueError(
                f"`ignored_layers` holds {partial[0]!r}, a part of decoder layer {i} ({names[layer]!r}). "
                "LoRAMetaPruner keeps or prunes whole decoder layers: ignore the whole layer instead."
            )
        chosen.append(i)
    if not chosen:
        raise ValueError(f"`ignored_layers` covers all {len(layers)} decoder layers: nothing is left to prune.")
    return chosen


class LoRAMetaPruner(tp.pruner.BasePruner):  # BasePruner is MetaPruner (its 1.6 name; MetaPruner is an alias)
    """`tp.pruner.MetaPruner` for a PEFT LoRA model: heads and FFN channels removed exactly, the model repaired.

    Args (as for `tp.pruner.MetaPruner`):
        model: a PEFT model with LoRA on the projections to be scored.
        example_inputs: inputs to trace with: a tensor passed positionally or a dict of keyword inputs (default:
            a short batch of token ids).
        importance: a `LoRAGuidedImportance` (default: a new one, `pruner.importance`); call
            `importance.accumulate(model)` after each backward. Other `tp.importance.Importance`s work one-shot.
        pruning_ratio: fraction of every pruned FFN's channels to remove; widths round to the nearest multiple
            of `round_to`.
        global_pruning: rank FFN channels across layers (the same total as local; heads stay ranked per layer,
            so every layer keeps the same head layout).
        iterative_steps, iterative_pruning_ratio_scheduler: `step()` number t prunes to `scheduler(ratio,
            steps)[t]`, cumulative and relative to the initial widths and head counts.
        ignored_layers: decoder layers to keep whole (lm_head, embeddings and LoRA factors are never pruned).
        round_to: keep FFN widths at multiples of this.
        prune_num_heads, head_pruning_ratio: remove this fraction of query heads; under grouped-query
            attention every KV group keeps round(group size · (1 − ratio)) query heads, at least one.
        prune_head_dims: must stay False: a head's dimensions are never cut (RoPE, per-head norms).

    Beyond MetaPruner:
        optimizer: the optimizer of the LoRA parameters; its state is sliced when parameters are pruned.
        head_mode: "per_group" (Torch-Pruning's GQA behaviour: the same number of query heads from every KV
            group, KV heads stay) or "kv_groups" (whole KV groups with their query heads).

    `engine` is the `LoRAPruner` doing the work (`pruner.events`: what each step removed, by original ids).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs=None,
        importance: tp.importance.Importance | None = None,
        *,
        global_pruning: bool = False,
        pruning_ratio: float = 0.5,
        iterative_steps: int = 1,
        iterative_pruning_ratio_scheduler: Callable[[float, int], list[float]] = linear_scheduler,
        ignored_layers: list | None = None,
        round_to: int | None = None,
        prune_num_heads: bool = False,
        prune_head_dims: bool = False,
        head_pruning_ratio: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
        head_mode: Literal["per_group", "kv_groups"] = "per_group",
        **metapruner_kwargs,
    ):
        for name in metapruner_kwargs:
            if name in _NOT_TAKEN:
                raise ValueError(f"LoRAMetaPruner does not take `{name}`: {_NOT_TAKEN[name]}.")
            raise TypeError(f"LoRAMetaPruner got an unexpected keyword argument {name!r}.")
        if prune_head_dims:
            raise ValueError(
                "`prune_head_dims=True` would cut rows inside attention heads (head_dim must stay whole for RoPE "
                "and per-head norms). Pass prune_head_dims=False and prune whole heads with prune_num_heads=True."
            )
        if head_pruning_ratio and not prune_num_heads:
            raise ValueError(
                f"`head_pruning_ratio={head_pruning_ratio}` needs `prune_num_heads=True` (Torch-Pruning removes "
                "heads only then); pass it, or head_pruning_ratio=0 to keep every head."
            )
        _check_ratio("pruning_ratio", pruning_ratio)
        _check_ratio("head_pruning_ratio", head_pruning_ratio)
        if not isinstance(iterative_steps, int) or iterative_steps < 1:
            raise ValueError(f"`iterative_steps` must be an int >= 1, got {iterative_steps!r}.")
        fractions = [float(f) for f in iterative_pruning_ratio_scheduler(1.0, iterative_steps)]
        if len(fractions) != iterative_steps + 1 or any(not 0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(
                "`iterative_pruning_ratio_scheduler(ratio, steps)` must return steps + 1 cumulative ratios in "
                f"[0, ratio] (like Torch-Pruning's linear_scheduler); for ratio 1.0 it returned {fractions}."
            )
        if not lora_layers(model):
            raise ValueError(f"LoRAMetaPruner needs a PEFT LoRA model, got {type(model).__name__} without LoRA.")
        importance = importance if importance is not None else LoRAGuidedImportance()
        if example_inputs is None:
            example_inputs = example_input_ids(model)
        config = LoRAPruneConfig(
            head_ratio=head_pruning_ratio if prune_num_heads else 0.0,
            channel_ratio=pruning_ratio,
            head_mode=head_mode,
            layers=selected_layers(model, ignored_layers),
            ranking="global" if global_pruning else "local",
            round_to=round_to or 1,
        )
        with traceable(model), opaque_while_tracing(model), torch.enable_grad(), warnings.catch_warnings():
            # the norms' weights it lists only follow the hidden size, which is never pruned
            warnings.filterwarnings("ignore", message="Unwrapped parameters")
            super().__init__(
                model,
                example_inputs,
                importance,
                global_pruning=global_pruning,
                pruning_ratio=pruning_ratio,
                iterative_steps=iterative_steps,
                iterative_pruning_ratio_scheduler=iterative_pruning_ratio_scheduler,
                ignored_layers=ignored_layers,
                round_to=round_to,
                in_channel_groups={},  # fresh dicts: MetaPruner's defaults are shared and mutated
                out_channel_groups={},
                num_heads={},
                prune_num_heads=prune_num_heads,
                prune_head_dims=False,
                head_pruning_ratio=head_pruning_ratio,
                customized_pruners=customized_pruners(model),
                root_module_types=(),  # groups are declared by the engine, not walked by MetaPruner
                output_transform=model_output,
            )
        self._fractions = fractions
        self.engine = LoRAPruner(
            model, config, optimizer=optimizer, importance=importance, example_inputs=example_inputs, graph=self.DG
        )

    @property
    def events(self) -> list[dict]:
        """What each step removed: structure key (attention block or FFN root) → original ids."""
        return self.engine.events

    def step(self, interactive: bool = False) -> dict | None:
        """Prune to the next scheduled ratio and repair the model; returns what was removed (or None).

        `interactive=True` is refused (nothing is pruned, no step is used): Torch-Pruning would hand out groups to
        prune one by one, and a PEFT model pruned group by group is left with stale LoRA shapes, optimizer state and
        head counts; here the removal and that repair happen in one call.
        """
        if interactive:
            raise ValueError(
                "LoRAMetaPruner.step(interactive=True) is not supported: pruning Torch-Pruning's groups one by one "
                "would leave the PEFT model unrepaired (LoRA shapes, optimizer state, head counts), so removal and "
                "repair happen in one call. Call `pruner.step()`; it returns what it removed (all steps: "
                "`pruner.events`). To remove structures you chose, use `pruner.engine.replay([{'removed': "
                "{structure key: original ids}}])`. Nothing was pruned."
            )
        self.current_step += 1
        if self.current_step > self.iterative_steps:
            warnings.warn("Pruning exceed the maximum iterative steps, no pruning will be performed.", stacklevel=2)
            return None
        return self.engine.prune(self._fractions[self.current_step])

    def manual_prune_width(self, layer, pruning_fn, pruning_ratios_or_idxs) -> None:
        raise ValueError(
            "LoRAMetaPruner does not prune single layers: the model would not be repaired. Use `step()`, or "
            "`pruner.engine.replay([{'removed': {structure key: original ids}}])` for chosen structures."
        )
