"""LoRAPruner: progressive structured pruning inside a LoRA fine-tune, with physical removal.

The user's loop stays theirs::

    pruner = LoRAPruner(peft_model, LoRAPruneConfig(ratio=0.2, total_steps=200), optimizer=optimizer)
    for batch in data:
        peft_model(**batch).loss.backward()
        optimizer.step()
        pruner.step()            # accumulate scores; every `prune_every` steps remove heads/channels
        optimizer.zero_grad()

One prune event: trace Torch-Pruning's DependencyGraph (fresh shapes) → score each structure with
LoRAGuidedImportance → pick the lowest-scoring heads / channels down to the scheduled size → remove
them physically through the graph → restore every invariant (frozen base weights, optimizer state,
stored scores, PEFT shapes, attention bookkeeping, HF config).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import nn

from . import allocation, latency, latency_replay
from .config import LoRAPruneConfig
from .conv1d import features, is_linear_like
from .fused import declared_ffns
from .graph import build_graph, example_input_ids, pruning_fn, release_trace
from .importance import Direction, LoRAGuidedImportance
from .indices import original_ids, positions_of
from .latency_table import LatencyTable, device_name
from .lora import NO_LORA_HELP, base_layer, lora_b_is_zero, lora_layers, sync_lora_features
from .mla import mla_modules
from .models import (
    AttentionLayout,
    attention_layouts,
    count_parameters,
    decoder_layers,
    model_structure,
    sync_config,
    text_config,
)
from .moe import check_moe_supported, shared_expert_modules
from .moe_pruning import RoutedExperts
from .optim_state import replace_parameter
from .quant import check_quantized, has_quantized_layers, width_multiple
from .schedule import progress
from .support import (
    normalised_channels,
    nothing_prunable_message,
    prunable_head_layouts,
    unsupported_layers_message,
    warn_normalised_ffns,
    writes_residual,
)
from .surgery import Replaced, declared_group, head_group, prune_items, remove_heads, subgroup


def selected_layer_indices(num_layers: int, config: LoRAPruneConfig) -> list[int]:
    """Decoder layers to prune: explicit `layers`, else all but the first `skip_first` and last `skip_last`."""
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"`layers` {bad} are out of range: the model has {num_layers} decoder layers.")
        return sorted(set(config.layers))
    first = int(num_layers * config.skip_first)
    chosen = list(range(first, num_layers - config.skip_last))
    if not chosen:
        raise ValueError(
            f"The layer selection selects nothing: {num_layers} layers, skip_first={config.skip_first} skips "
            f"{first}, skip_last={config.skip_last}. Lower them or pass `layers=[...]`."
        )
    return chosen


def _keep_count(initial: int, ratio: float, multiple: int = 1) -> int:
    """round(initial·(1 − ratio)) to the nearest multiple, within [multiple, initial]."""
    kept = initial * (1.0 - ratio)
    kept = int(math.floor(kept / multiple + 0.5)) * multiple
    return max(min(kept, initial), min(multiple, initial))


@dataclass
class _Heads:
    """Bookkeeping of one attention block: original ids of the query heads still alive."""

    layout: AttentionLayout
    initial_heads: int
    initial_kv: int
    alive: list[int] = field(default_factory=list)
    cost: tuple[int, int] | None = None  # parameters per query head and per KV head (`LoRAPruner._head_cost`)

    @property
    def initial_group_size(self) -> int:
        return self.initial_heads // self.initial_kv


@dataclass
class _Channels:
    """Bookkeeping of one channel group (an FFN): its width and the original ids still alive."""

    key: str
    initial: int
    cost: int  # base parameters removed with one channel
    alive: list[int] = field(default_factory=list)


class LoRAPruner:
    """Drives LoRAPrune through a fine-tune: call `step()` after every optimizer step.

    Args:
        model: a PEFT model with LoRA on the projections to be scored (all of q/k/v/o/gate/up/down is best).
        config: size target, layer selection, schedule and score options.
        optimizer: the optimizer of the LoRA parameters; its state is sliced when parameters are pruned.
        importance: a LoRAGuidedImportance (built from `config` when omitted). Any other
            `tp.importance.Importance` also works for one-shot baselines (magnitude, Taylor, random):
            `step()` then only counts steps, since only LoRA-guided scores accumulate.
        example_inputs: inputs to trace the graph with: a tensor passed positionally, or a dict of keyword
            inputs (when omitted: a short batch of token ids, or one image of `pixel_values` for a config
            with `image_size` and `num_channels`, e.g. ViT).
        agree: called on every prune event with the chosen removals (structure key → original ids) and
            returns the removals to apply; `tp_loraprune.distributed.agree_on_removals` makes all ranks of
            a data-parallel run check that they remove the same structures.
        graph: a DependencyGraph of `model` already traced under `tp_loraprune.graph.traceable` (with
            `tp_loraprune.graph.customized_pruners(model)`), used instead of tracing again; `LoRAMetaPruner`
            passes the one Torch-Pruning's constructor built.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoRAPruneConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        importance: LoRAGuidedImportance | None = None,
        example_inputs=None,
        agree: Callable[[dict[str, list[int]]], dict[str, list[int]]] | None = None,
        graph: tp.DependencyGraph | None = None,
    ):
        self.model = model
        self.agree = agree
        self.config = config or LoRAPruneConfig()
        self.optimizer = optimizer
        self.importance = importance or LoRAGuidedImportance(
            ema=self.config.ema,
            score=self.config.score,
            normalize=self.config.normalize,
            gradient=self.config.gradient,
        )
        self._accumulates = isinstance(self.importance, LoRAGuidedImportance)
        self.example_inputs = example_inputs if example_inputs is not None else example_input_ids(model)
        if not lora_layers(model):
            raise ValueError(
                f"LoRAPruner needs a model with LoRA layers, got {type(model).__name__} without. {NO_LORA_HELP}"
            )
        offloaded = [n for n, p in model.named_parameters() if p.is_meta]
        if offloaded:
            raise ValueError(
                f"LoRAPruner cannot prune weights that are offloaded to the meta device ({len(offloaded)} "
                f"parameters, e.g. {offloaded[0]!r}): accelerate keeps their values elsewhere. Load the model "
                "without CPU/disk offload (a device_map over GPUs only)."
            )
        check_quantized(model)
        if self._accumulates and not has_quantized_layers(model) and lora_b_is_zero(model):
            warnings.warn(
                "Every LoRA B factor is zero (PEFT's default init). Until B grows, the LoRA-guided scores of input "
                "channels (o_proj / down_proj columns) follow the random A and the weights' magnitude, which picks "
                "poor heads; on SmolLM2-135M at 20% this cost WikiText-2 117 vs 66 (docs/benchmarks.md). Initialize "
                "LoRA with PiSSA: peft.LoraConfig(..., init_lora_weights='pissa_niter_4') (the default of "
                "tp_loraprune.prune and the CLI).",
                stacklevel=2,
            )
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(unsupported_layers_message(model, attention_layouts(model)))
        self.layer_indices = selected_layer_indices(len(layers), self.config)
        self._selected_layers = [layers[i] for i in self.layer_indices]
        self._selected = {m for layer in self._selected_layers for m in layer.modules()}
        check_moe_supported(model, self._selected)
        self._experts = RoutedExperts(
            model,
            {m: i for i, layer in zip(self.layer_indices, self._selected_layers, strict=True) for m in layer.modules()},
        )
        self._names = {m: n for n, m in model.named_modules()}
        self._structure = model_structure(model)  # for sync_config at every event
        self.step_count = 0
        self.progress = 0.0
        self.events: list[dict] = []
        self.initial_parameters = count_parameters(model)
        self._latency: LatencyTable | None = None  # target="latency": set by _measure_latency
        self._heads = {
            a.name: _Heads(a, a.num_heads, a.num_kv_heads, list(range(a.num_heads)))
            for a in prunable_head_layouts(
                [a for a in attention_layouts(model) if a.module in self._selected], self.config.heads_across_norms
            )
        }
        self._check_moe_targets()
        if graph is None:
            graph = build_graph(model, self.example_inputs)
        self._graph: tp.DependencyGraph | None = None
        self._channels = {}
        groups = self._channel_groups(graph)
        for key, group in groups.items():
            width = len(cast(Any, group)[0].idxs)
            self._channels[key] = _Channels(key, width, self._channel_cost(graph, group), list(range(width)))
        shared = shared_expert_modules(model)
        self._shared_keys = {key for key, m in self._channel_roots.items() if m in shared}
        if not self._heads and not self._channels and not self._experts:
            raise ValueError(nothing_prunable_message(model, self._selected_layers))
        # FFN widths stay at multiples of this: `round_to`, and 4 on 8-bit bases (cuBLASLt's int8 matmul needs it)
        self.channel_multiple = math.lcm(self.config.round_to or self._default_multiple(), width_multiple(model))
        self._layer_of_key = self._layer_of_blocks()
        self._layer_parameters = {
            i: count_parameters(layer) for i, layer in zip(self.layer_indices, self._selected_layers, strict=True)
        }
        self.auto = self.config.allocation == "auto" and not self.config.explicit_ratios
        # the per-layer fractions of the fixed rules; None under allocation="auto", which decides per event
        self.head_ratio: float | None = None
        self.channel_ratio: float | None = None
        if not self.auto:
            self.head_ratio, self.channel_ratio = self._resolve_ratios()
        if self.auto:
            self._check_allocation()
        # Removing channels changes widths, not coupling: when every channel group maps its channels one to one
        # onto its members, later events reuse this graph (no trace, no group propagation per event).
        templates = {key: self._template(graph, groups[key]) for key in self._channel_roots}
        self._templates = {key: t for key, t in templates.items() if t is not None}
        if len(self._templates) == len(templates):
            self._graph = graph
            release_trace(graph)

    # ------------------------------------------------------------------ targets
    def _check_moe_targets(self) -> None:
        """Refuse a head target on layers whose attention is multi-head latent attention (its heads stay), and a
        latency target on MoE layers (not timed)."""
        c = self.config
        mla = [(n, m) for n, m in mla_modules(self.model) if m in self._selected]
        wants_heads = (c.head_ratio or 0.0) > 0 if c.explicit_ratios else c.allocation == "fixed" and c.ratio > 0
        if mla and wants_heads:
            name, module = mla[0]
            raise ValueError(
                f"{type(module).__name__} at {name!r} is multi-head latent attention (MLA), whose heads tp_loraprune "
                "does not prune. Use allocation='auto' or 'ffn_only' (its FFNs and experts are pruned, its heads "
                "kept), or head_ratio=0."
            )
        if mla and self._heads == {} and c.allocation == "auto" and not c.explicit_ratios:
            warnings.warn(
                f"{type(mla[0][1]).__name__} is multi-head latent attention: its heads are kept, only FFNs and "
                "experts are pruned.",
                stacklevel=3,
            )
        if self._experts and c.target == "latency":
            raise ValueError(
                "target='latency' does not time mixture-of-experts layers; use target='parameters' for "
                f"{type(self.model).__name__}, or select layers without experts with `layers=[...]`."
            )

    def _channel_cost(self, graph: tp.DependencyGraph, group) -> int:
        lora_parts = {
            m
            for layer in lora_layers(self.model).values()
            for m in layer.modules()
            if m is not layer and m is not base_layer(layer)
        }
        cost, width = 0, len(group[0].idxs)
        for dep, idxs in group:
            m = dep.target.module
            if not is_linear_like(m) or m in lora_parts:
                continue
            out_features, in_features = features(m)
            per_index = 0
            if graph.is_out_channel_pruning_fn(dep.handler):
                per_index = in_features + (1 if getattr(m, "bias", None) is not None else 0)
            elif graph.is_in_channel_pruning_fn(dep.handler):
                per_index = out_features
            cost += per_index * len(idxs) // width  # a fused gate_up_proj has two rows per channel
        return cost

    def _kept_heads(self, h: _Heads, fraction: float) -> tuple[int, int]:
        """(query heads, KV heads) to keep in one block after `fraction` of the head target."""
        ratio = (self.head_ratio or 0.0) * fraction
        if self.config.head_mode == "per_group" and h.initial_group_size > 1:
            per_group = _keep_count(h.initial_group_size, ratio)
            return per_group * h.initial_kv, h.initial_kv
        kv = _keep_count(h.initial_kv, ratio)
        return kv * h.initial_group_size, kv

    def _check_head_ratio(self, ratio: float) -> None:
        for h in self._heads.values():
            per_group = self.config.head_mode == "per_group" and h.initial_group_size > 1
            n = h.initial_group_size if per_group else h.initial_kv
            if round(n * (1.0 - ratio)) < 1:
                what = "query heads per KV group" if per_group else "KV groups" if h.initial_group_size > 1 else "heads"
                raise ValueError(
                    f"head ratio {ratio} would leave 0 {what} in {h.layout.name} ({n} {what}); the largest "
                    f"ratio that keeps one is {(n - 1) / n:.3f} (values round to whole heads)."
                )

    def _head_cost(self, h: _Heads) -> tuple[int, int]:
        """Base parameters removed with one query head, and with one KV head (k and v rows). Pruning heads never
        changes a row's length, so it is computed once per block."""
        cached = h.cost
        if cached is None:
            q, k, v, o = (base_layer(m) for m in (h.layout.q, h.layout.k, h.layout.v, h.layout.o))
            d = h.layout.head_dim
            row = lambda m: features(m)[1] + (1 if getattr(m, "bias", None) is not None else 0)  # noqa: E731
            cached = h.cost = (d * (row(q) + features(o)[0]), d * (row(k) + row(v)))
        return cached

    def _resolve_ratios(self) -> tuple[float, float]:
        c = self.config
        if c.explicit_ratios:
            head_ratio, channel_ratio = c.head_ratio or 0.0, c.channel_ratio or 0.0
            self._check_head_ratio(head_ratio)
            return head_ratio, channel_ratio
        head_ratio = 0.0 if c.allocation == "ffn_only" else c.ratio
        self._check_head_ratio(head_ratio)
        self.head_ratio = head_ratio
        total = sum(self._layer_parameters.values())
        removed_by_heads = 0
        for h in self._heads.values():
            q_heads, kv_heads = self._kept_heads(h, 1.0)
            per_q, per_kv = self._head_cost(h)
            removed_by_heads += (h.initial_heads - q_heads) * per_q + (h.initial_kv - kv_heads) * per_kv
        channel_total = sum(ch.initial * ch.cost for ch in self._channels.values())
        channel_total += self._experts.channel_parameters(self.importance)
        needed = c.ratio * total - removed_by_heads
        if needed <= 0:
            return head_ratio, 0.0
        if channel_total == 0:
            raise ValueError(
                f"ratio {c.ratio} cannot be reached (allocation={c.allocation!r}): heads remove "
                f"{removed_by_heads / total:.3f} of the pruned layers' parameters and no FFN channel can be pruned."
                f"{self._experts.unscorable_hint(self.importance)}"
            )
        channel_ratio = needed / channel_total
        if channel_ratio >= 1.0:
            rule = "FFN channels alone" if c.allocation == "ffn_only" else "heads at the ratio and FFN channels"
            largest = (removed_by_heads + channel_total) / total
            raise ValueError(
                f"ratio {c.ratio} cannot be reached by {rule} (allocation={c.allocation!r}): it would remove every "
                f"FFN channel of the {len(self._channels)} pruned FFNs{self._experts_phrase()}; it can reach less "
                f"than {largest:.3f}. {self._prunable_share()} Use a lower ratio or allocation='auto'."
            )
        return head_ratio, channel_ratio

    def _experts_phrase(self) -> str:
        blocks = self._experts.blocks.values()
        return f" and of the routed experts of {len(blocks)} MoE layers" if blocks else ""

    def _prunable_share(self) -> str:
        """What share of the pruned layers' parameters the structures this pruner removes hold (the rest: norms,
        blocks kept whole, anything it cannot prune)."""
        heads = sum(
            h.initial_heads * self._head_cost(h)[0] + h.initial_kv * self._head_cost(h)[1] for h in self._heads.values()
        )
        channels = sum(ch.initial * ch.cost for ch in self._channels.values())
        experts = self._experts.channel_parameters(self.importance) if self._experts else 0
        total = sum(self._layer_parameters.values())
        return (
            f"The prunable part (attention heads, FFN and expert channels) holds "
            f"{(heads + channels + experts) / total:.1%} of the pruned layers' {total} parameters."
        )

    def _default_multiple(self) -> int:
        """round_to=None: the largest of 64 and 8 that leaves every pruned FFN (experts too) at least 32 steps of
        width (64 at LLaMA-7B, 8 at SmolLM2's 1536), else 1."""
        widths = [ch.initial for ch in self._channels.values()] + ([self._experts.narrowest] if self._experts else [])
        narrowest = min(widths, default=0)
        return next((m for m in (64, 8) if narrowest >= 32 * m), 1)

    # ------------------------------------------------------------------ allocation="auto"
    def _layer_of_blocks(self) -> dict[str, int]:
        """Decoder layer index of every attention block and FFN that is pruned."""
        layer_of = {
            m: i for i, layer in zip(self.layer_indices, self._selected_layers, strict=True) for m in layer.modules()
        }
        roots = {**{k: f.up for k, f in self._declared_ffns.items()}, **self._channel_roots}
        return {
            **{key: layer_of[h.layout.module] for key, h in self._heads.items()},
            **{key: layer_of[m] for key, m in roots.items()},
            **self._experts.layers(),
        }

    @property
    def budget(self) -> float:
        """What the whole target saves in the pruned layers: `ratio` of their parameters (or of their measured
        time under target="latency")."""
        return self.config.ratio * sum(self._layer_totals().values())

    def _layer_totals(self) -> dict[int, float]:
        """Each pruned layer's parameters, or under target="latency" the measured time of its blocks, unpruned."""
        if self.config.target == "parameters":
            return dict(self._layer_parameters)
        totals = dict.fromkeys(self._layer_parameters, 0.0)
        for key, h in self._heads.items():
            totals[self._layer_of_key[key]] += self._attention_cost(h, h.initial_heads, h.initial_kv)
        for key, ch in self._channels.items():
            totals[self._layer_of_key[key]] += self._ffn_cost(ch, ch.initial)
        return totals

    def _attention_cost(self, h: _Heads, heads: int, kv: int) -> float:
        """Parameters (or seconds, target="latency") of an attention block with `heads` query and `kv` KV heads."""
        if self.config.target == "latency":
            return cast(LatencyTable, self._latency).attention[h.layout.name][(heads, kv)]  # set before any cost
        per_q, per_kv = self._head_cost(h)
        return heads * per_q + kv * per_kv

    def _ffn_cost(self, ch: _Channels, width: int) -> float:
        """Parameters (or seconds, target="latency") of an FFN `width` channels wide."""
        if self.config.target == "latency":
            return latency.interpolate(cast(LatencyTable, self._latency).ffn[ch.key], width)
        return width * ch.cost

    def _latency_shape(self, module: nn.Module, hidden: int) -> latency.Shape:
        """The timing shape of a block with the projection `module` and model width `hidden`: the block's device,
        a float dtype, the configured tokens and phase."""
        weight = cast(torch.Tensor, base_layer(module).weight)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.bfloat16
        if weight.device.type == "cpu" and dtype != torch.float32:
            dtype = torch.float32
        c = self.config
        return latency.Shape(hidden, c.latency_tokens, c.latency_phase == "decode", dtype, weight.device)

    @property
    def latency_table(self) -> LatencyTable | None:
        """The timings target="latency" allocates by (None under target="parameters"); `.save(path)` writes them
        for `LoRAPruneConfig(latency_table=path)` to reuse."""
        return self._latency

    def _head_states(self, h: _Heads) -> list[tuple[int, int]]:
        """Every (query heads, KV heads) the allocation can leave this attention block with, smallest first."""
        size, kv0 = h.initial_group_size, h.initial_kv
        if self.config.head_mode == "per_group" and size > 1:
            # query heads per group down to one, and from there whole KV groups as for multi-head attention (the
            # allocation's per-group units become KV-group units once a group has one query head left)
            return [(g, g) for g in range(kv0)] + [(q * kv0, kv0) for q in range(1, size + 1)]
        return [(g * size, g) for g in range(kv0 + 1)]

    def _measure_latency(self) -> None:
        """The latency table: loaded from `config.latency_table` and checked against this model, or measured
        (`_measured_latency`)."""
        c = self.config
        blocks = [h.layout.o for h in self._heads.values()] + [self._ffn_root(key) for key in self._channels]
        device = device_name(cast(torch.Tensor, base_layer(blocks[0]).weight).device) if blocks else "cpu"
        if c.latency_table is None:
            self._latency = self._measured_latency(device)
            return
        table = LatencyTable.load(c.latency_table)
        table.check(
            c.latency_tokens,
            c.latency_phase,
            device,
            {key: ch.initial for key, ch in self._channels.items()},
            {key: self._head_states(h) for key, h in self._heads.items()},
        )
        self._latency = table

    def _ffn_root(self, key: str) -> nn.Module:
        return self._channel_roots.get(key) or self._declared_ffns[key].up

    def _measured_latency(self, device: str) -> LatencyTable:
        """Time every FFN at 17 widths and the smallest one (linear between) and attention at every head count
        the allocation can reach, once, on the model's device; identical layers share the timings."""
        ffn_times: dict[str, dict[int, float]] = {}
        replayed_ffns: dict[tuple, dict[int, float] | None] = {}
        for key, ch in self._channels.items():
            root = self._ffn_root(key)
            shape = self._latency_shape(root, hidden=features(base_layer(root))[1])  # root: hidden → channels
            times = None
            block = latency_replay.ffn_block(self.model, key) if key in self._channel_roots else None
            if (
                block is not None
                and not shape.decode
                and latency_replay.ffn_replayable(block, ch.initial, shape.hidden)
            ):
                ffn = (type(block), ch.initial, shape)
                if ffn not in replayed_ffns:
                    replayed_ffns[ffn] = self._replayed_ffn(block, shape, ch.initial)
                times = replayed_ffns[ffn]
            if times is None:  # decode steps, fused or expert FFNs, blocks that cannot be replayed: synthetic
                rows = max(ch.cost // shape.hidden - 1, 1)  # output projections per channel (gate and up: 2)
                measure = partial(latency.ffn_seconds, shape, rows_per_channel=rows)
                times = latency.measured_widths(measure, ch.initial, self.channel_multiple)
            ffn_times[key] = times
        attention_times: dict[str, dict[tuple[int, int], float]] = {}
        replayed: dict[tuple, dict[int, float] | None] = {}  # identical blocks share the timings of the first
        for key, h in self._heads.items():  # every head layout the allocation can reach, smallest first
            shape = self._latency_shape(h.layout.o, hidden=features(base_layer(h.layout.o))[0])  # o: heads → hidden
            states = self._head_states(h)
            measured = None
            if not shape.decode and latency_replay.replayable(h.layout):  # the block itself, as the model calls it
                same = (type(h.layout.module), h.initial_heads, h.initial_kv, h.layout.head_dim, shape)
                if same not in replayed:
                    replayed[same] = self._replayed_attention(h, shape, states)
                measured = replayed[same]
            if measured is None:  # decode steps, fused projections, blocks that cannot be replayed: synthetic
                measured = {
                    i: latency.attention_seconds(shape, q, kv, h.layout.head_dim) for i, (q, kv) in enumerate(states)
                }
            times = latency.monotone(measured)
            attention_times[key] = {state: times[i] for i, state in enumerate(states)}
        c = self.config
        return LatencyTable(c.latency_tokens, c.latency_phase, device, ffn_times, attention_times)

    def _replayed_attention(
        self, h: _Heads, shape: latency.Shape, states: list[tuple[int, int]]
    ) -> dict[int, float] | None:
        """The block's own time at every (heads, KV heads) state, or None (with a warning) when it cannot be cut
        and called outside the model."""
        try:
            inputs = latency_replay.block_inputs(self.model, h.layout.module, shape.tokens)
            timed = partial(latency.fastest_seconds, device=shape.device, repeats=shape.repeats)
            return {
                i: latency_replay.attention_seconds(h.layout, inputs, q, kv, timed) for i, (q, kv) in enumerate(states)
            }
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            warnings.warn(  # e.g. more tokens than the model's positions, or a forward that reads the config
                f"{h.layout.name}: its attention could not be replayed for the latency table ({type(e).__name__}: "
                f"{e}); a synthetic block of the same shape is timed instead.",
                stacklevel=4,
            )
            return None

    def _replayed_ffn(self, block: nn.Module, shape: latency.Shape, width: int) -> dict[int, float] | None:
        """The FFN block's own time at the measured widths (interpolated between), or None (with a warning) when it
        cannot be cut and called outside the model."""
        try:
            inputs = latency_replay.block_inputs(self.model, block, shape.tokens)
            timed = partial(latency.fastest_seconds, device=shape.device, repeats=shape.repeats)
            measure = partial(latency_replay.ffn_seconds, block, inputs, width, timed=timed)
            return latency.measured_widths(measure, width, self.channel_multiple)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            warnings.warn(
                f"{type(block).__name__}: its FFN could not be replayed for the latency table ({type(e).__name__}: "
                f"{e}); a synthetic block of the same shape is timed instead.",
                stacklevel=4,
            )
            return None

    def _saved_heads(self, h: _Heads, before: int, after: int) -> float:
        """What removing query heads (every KV group kept) from `before` to `after` saves."""
        kv = h.layout.num_kv_heads
        return self._attention_cost(h, before, kv) - self._attention_cost(h, after, kv)

    def _saved_groups(self, h: _Heads, before: int, after: int) -> float:
        """What removing whole KV groups (with their query heads) from `before` to `after` saves."""
        size = h.layout.group_size
        return self._attention_cost(h, before * size, before) - self._attention_cost(h, after * size, after)

    def _saved_channels(self, ch: _Channels, before: int, after: int) -> float:
        """What narrowing an FFN from `before` to `after` channels saves."""
        return self._ffn_cost(ch, before) - self._ffn_cost(ch, after)

    def _removed_by_layer(self) -> dict[int, float]:
        """What each pruned layer has saved so far (parameters, or seconds), from the structures no longer alive."""
        removed = dict.fromkeys(self._layer_parameters, 0.0)
        for key, h in self._heads.items():
            now = self._attention_cost(h, len(h.alive), h.layout.num_kv_heads)
            removed[self._layer_of_key[key]] += self._attention_cost(h, h.initial_heads, h.initial_kv) - now
        for key, ch in self._channels.items():
            removed[self._layer_of_key[key]] += self._ffn_cost(ch, ch.initial) - self._ffn_cost(ch, len(ch.alive))
        for layer, n in self._experts.removed_by_layer().items():
            removed[layer] += n
        return removed

    def _layer_room(self) -> dict[int, float] | None:
        """What each pruned layer may still lose under `max_layer_ratio` (None: no cap)."""
        if self.config.max_layer_ratio >= 1.0:
            return None
        removed = self._removed_by_layer()
        return {i: self.config.max_layer_ratio * n - removed[i] for i, n in self._layer_totals().items()}

    def _blocks(self, graph, groups: dict[str, object] | None, scored: bool = True) -> list[allocation.Block]:
        """Every pruned block's removal units, from the current scores (zeros when not `scored`)."""
        c = self.config
        blocks = []
        for key, h in self._heads.items():
            a, layer = h.layout, self._layer_of_key[key]
            head_scores = self._head_scores(graph, h) if scored else torch.zeros(a.num_heads)
            if head_scores is None:
                continue
            per_q, per_kv = self._head_cost(h)
            size, kv = a.group_size, a.num_kv_heads
            if c.head_mode == "per_group" and size > 1:
                blocks.append(
                    allocation.per_group_head_units(
                        key,
                        layer,
                        head_scores.view(kv, size),
                        per_q,
                        c.min_heads_per_group,
                        partial(self._saved_heads, h),
                    )
                )
            else:
                group_scores = self._kv_group_scores(h, head_scores) if scored else torch.zeros(kv)
                blocks.append(
                    allocation.kv_group_units(
                        key,
                        layer,
                        group_scores,
                        size,
                        size * per_q + per_kv,
                        c.min_kv_heads,
                        partial(self._saved_groups, h),
                    )
                )
        for key, ch in self._channels.items():
            scores = self._channel_scores(ch, groups[key]) if scored and groups is not None else None
            if scored and scores is None:
                continue
            scores = scores if scores is not None else torch.zeros(len(ch.alive))
            min_width = max(c.min_ffn_width, 1)
            block = allocation.channel_units(
                key,
                self._layer_of_key[key],
                scores,
                ch.cost,
                self.channel_multiple,
                min_width,
                partial(self._saved_channels, ch),
            )
            # MoE shared experts are a kind of their own: uniform=True keeps them one width, not the dense FFNs'
            blocks.append(replace(block, kind="shared_channels") if key in self._shared_keys else block)
        blocks += self._experts.units(self.importance, self.channel_multiple, max(c.min_ffn_width, 1), scored)
        if c.uniform:
            blocks = allocation.merge_uniform(blocks)
        return blocks

    def removal_units(self) -> list[allocation.Block]:
        """Every pruned block's removal units from the current scores: what allocation="auto" chooses from
        (`tp_loraprune.allocation.allocate`). Positions index the structures still alive."""
        graph = self._event_graph()
        return self._blocks(graph, self._channel_groups(graph))

    def _check_allocation(self) -> None:
        """Refuse, before any weight changes, a uniform layout the model cannot take or a target the guards forbid."""
        c = self.config
        if c.uniform:
            shapes = {(h.initial_heads, h.initial_kv, h.layout.head_dim) for h in self._heads.values()}
            widths = {ch.initial for k, ch in self._channels.items() if k not in self._shared_keys}
            shared = {ch.initial for k, ch in self._channels.items() if k in self._shared_keys}
            experts = self._experts.check_uniform()
            if len(shapes) > 1 or len(widths) > 1 or len(shared) > 1 or experts:
                more = f", shared-expert widths {sorted(shared)}" if len(shared) > 1 else ""
                more += f", {experts}" if experts else ""
                raise ValueError(
                    f"uniform=True needs every pruned layer to start with the same attention shape and FFN width; "
                    f"these layers have (heads, kv heads, head_dim) {sorted(shapes)} and FFN widths {sorted(widths)}"
                    f"{more}. Use uniform=False or select layers of one shape with `layers=[...]`."
                )
        if c.target == "latency":
            warnings.warn(
                "target='latency' is experimental. Its table (the model's own attention and FFN blocks, timed alone on "
                "this device; measure it once and reuse it with latency_table=...) predicted the prefill of the "
                "LLaMA-7B shape on an H200 within 7% (1.19x / 1.65x predicted at 20% / 50%, 1.18x / 1.73-1.76x "
                "measured), and it removes more parameters than target='parameters'. After a fine-tune of "
                "SmolLM2-135M on a 2-core CPU it was on the parameter target's quality-vs-speed curve, not above "
                "it, and saved less time than asked at 20%; decode is timed with synthetic blocks "
                "(docs/benchmarks.md). Measure the result's speed and quality, and compare with target='parameters'.",
                stacklevel=3,
            )
            self._measure_latency()
        reachable = allocation.removable(self._blocks(None, None, scored=False), self._layer_room())
        if reachable < self.budget:
            total = sum(self._layer_totals().values())
            raise ValueError(
                f"ratio {c.ratio} cannot be reached under the allocation guards (min_heads_per_group="
                f"{c.min_heads_per_group}, min_kv_heads={c.min_kv_heads}, min_ffn_width={c.min_ffn_width}, "
                f"max_layer_ratio={c.max_layer_ratio}, uniform={c.uniform}, widths in multiples of "
                f"{self.channel_multiple}): the largest reachable ratio is {reachable / total:.4f}. "
                f"{self._prunable_share()} Lower the ratio or loosen the guards."
                f"{self._experts.unscorable_hint(self.importance)}"
            )

    def _allocate(self, graph, groups: dict[str, object], fraction: float) -> dict[str, list[int]]:
        """Original ids to remove at this event: the scheduled share of the budget, chosen by score per parameter
        across heads and channels of every pruned layer (`tp_loraprune.allocation`)."""
        removed_so_far = sum(self._removed_by_layer().values())
        budget = fraction * self.budget - removed_so_far
        if budget <= 0:
            return {}
        chosen = allocation.allocate(self._blocks(graph, groups), budget, self._layer_room())
        alive = {
            **{k: h.alive for k, h in self._heads.items()},
            **{k: ch.alive for k, ch in self._channels.items()},
            **self._experts.alive(),
        }
        return {key: original_ids(alive[key], positions) for key, positions in chosen.removals.items()}

    # ------------------------------------------------------------------ the loop
    def step(self) -> dict | None:
        """Call once per optimizer step, after `optimizer.step()` and before `zero_grad()`.

        Folds the current LoRA gradients into the scores and, on a prune step, removes heads and
        channels. Returns the prune event (a dict also appended to `events`) or None.
        """
        if self._accumulates:
            self.importance.accumulate(self.model)
        self.step_count += 1
        c = self.config
        target = progress(self.step_count, c.total_steps, c.schedule, c.warmup, c.cooldown)
        due = self.step_count % c.prune_every == 0 or target >= 1.0
        if due and target > self.progress:
            return self.prune(target)
        return None

    @torch.no_grad()
    def prune(self, fraction: float = 1.0) -> dict | None:
        """Prune now to `fraction` of the final target (1.0 = the whole target; used by `step`)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"`fraction` must be in [0, 1], got {fraction}.")
        graph = self._event_graph()
        groups = self._channel_groups(graph)
        if self.auto:
            removed = self._allocate(graph, groups, fraction)
        elif self.config.ranking == "global":
            removed = self._choose_channels_globally(groups, fraction)
        else:
            removed = {key: self._choose_channels(self._channels[key], g, fraction) for key, g in groups.items()}
        if not self.auto:
            for key, h in self._heads.items():
                removed[key] = self._choose_heads(graph, h, fraction)
            ratio, multiple = (
                (self.channel_ratio or 0.0) * fraction,
                self._experts.width_multiple(self.channel_multiple),
            )
            removed.update(
                self._experts.choose_channels(lambda width: _keep_count(width, ratio, multiple), self.importance)
            )
        removed = {k: ids for k, ids in removed.items() if ids}
        if self.agree is not None:
            removed = self.agree(removed)
        self._remove(graph, removed, groups)
        if self.auto and self._experts:
            removed = self._allocate_rest(fraction, removed)
        self.progress = max(self.progress, fraction)
        if not removed:
            return None
        event = {
            "step": self.step_count,
            "fraction": round(fraction, 6),
            "removed": removed,
            "parameters": count_parameters(self.model),
        }
        self.events.append(event)
        return event

    def _allocate_rest(self, fraction: float, removed: dict[str, list[int]]) -> dict[str, list[int]]:
        """Allocate again what the event still falls short of, on the pruned model, until nothing more fits.

        An expert and its channels share parameters, and units are costed on the model before the event: when one
        allocation takes an expert and channel units of the same layer, that expert's channels are counted twice.
        Returns the event's removals (all rounds as one, replaying to the same model)."""
        for _ in range(_MAX_ROUNDS):
            graph = self._event_graph()
            groups = self._channel_groups(graph)
            more = {k: ids for k, ids in self._allocate(graph, groups, fraction).items() if ids}
            if self.agree is not None:
                more = self.agree(more)
            if not more:
                break
            self._remove(graph, more, groups)
            removed = self._experts.merge(removed, more)
        return removed

    @torch.no_grad()
    def replay(self, events: list[dict]) -> None:
        """Remove exactly what `events` removed (original ids), without scoring: rebuilds an architecture."""
        for event in events:
            graph = self._event_graph()
            groups = self._channel_groups(graph) if any(k in self._channels for k in event["removed"]) else {}
            self._remove(graph, event["removed"], groups)
            self.events.append(event)

    def _event_graph(self) -> tp.DependencyGraph:
        """The graph a prune event works on: the one traced at construction when channel groups replay their
        templates, else a fresh trace (fresh widths for Torch-Pruning's propagation)."""
        if self._graph is not None:
            return self._graph
        with torch.enable_grad():
            return build_graph(self.model, self.example_inputs)

    def _remove(self, graph: tp.DependencyGraph, removed: dict[str, list[int]], groups: dict[str, object]) -> None:
        """Physically remove structures given by original ids, then restore every invariant."""
        replaced: list[Replaced] = []
        experts = {key: ids for key, ids in removed.items() if key in self._experts}
        if experts:
            self._experts.remove(experts, self.optimizer, self.importance if self._accumulates else None)
        for key, ids in removed.items():
            if key in self._experts:
                continue
            if key in self._channels:
                self._remove_channels(graph, self._channels[key], groups[key], ids, replaced.append)
            elif key in self._heads:
                self._remove_heads(graph, self._heads[key], ids, replaced.append)
            else:
                raise ValueError(f"Unknown structure {key!r}: the events do not belong to this model/config.")
        self._restore_invariants(replaced)

    # ------------------------------------------------------------------ structures
    def _channel_groups(self, graph: tp.DependencyGraph) -> dict[str, object]:
        """Channel groups (FFNs) of the selected layers, keyed by the name of their root module.

        The first call discovers them from every linear of the selected layers outside attention
        (groups reaching an unselected module, e.g. the residual stream, are dropped). Later calls
        rebuild each group from its template on the kept graph (or, where a group is not one to one,
        ask a fresh graph for the known roots). FFNs with a fused or Conv1D up projection
        (`tp_loraprune.fused.DECLARED_FFN`) get declared groups instead.
        """
        if getattr(self, "_channel_roots", None) is None:
            self._declared_ffns = {f.name: f for f in declared_ffns(self.model) if f.up in self._selected}
            self._channel_roots = self._discover_channel_roots(graph)
        groups: dict[str, object] = {
            key: declared_group(graph, f.items(list(range(f.width)))) for key, f in self._declared_ffns.items()
        }
        for key, m in self._channel_roots.items():
            channels = list(range(m.out_features))
            if self._graph is not None:
                template = self._templates[key]
                groups[key] = declared_group(graph, [(x, d, channels, channels) for x, d in template])
            else:
                groups[key] = graph.get_pruning_group(m, pruning_fn(graph, m, "out"), channels)
        return groups

    def _template(self, graph: tp.DependencyGraph, group) -> list[tuple[nn.Module, str]] | None:
        """(module, "out" | "in") of each layer in a full channel group whose channel i is the root's channel i
        (gate/up rows, down columns, their LoRA factors); None when some member maps channels otherwise."""
        template = []
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if isinstance(module, nn.Parameter):
                return None  # a bare parameter: pruned through the graph's parameter table
            if module not in self._names:
                continue  # Torch-Pruning's placeholders for functional ops: nothing to remove
            direction = "out" if graph.is_out_channel_pruning_fn(handler) else "in"
            if not graph.is_out_channel_pruning_fn(handler) and not graph.is_in_channel_pruning_fn(handler):
                return None
            if list(item.idxs) != list(item.root_idxs) or list(item.idxs) != list(range(len(group[0].idxs))):
                return None
            template.append((module, direction))
        return template

    def _discover_channel_roots(self, graph: tp.DependencyGraph) -> dict[str, nn.Linear]:
        attention: set[nn.Module]
        lora_parts: set[nn.Module]
        attention, lora_parts = set(), set()
        for a in attention_layouts(self.model):
            for m in (a.q, a.k, a.v, a.o):
                attention.update(m.modules())
        for f in self._declared_ffns.values():  # already grouped; a chunked gate_up_proj must not be traced
            attention.update(f.up.modules())
        for _, m in mla_modules(self.model):  # latent attention's low-rank projections are not FFNs
            attention.update(m.modules())
        for layer in lora_layers(self.model).values():
            lora_parts.update(m for m in layer.modules() if m is not layer and m is not base_layer(layer))
        allowed = self._selected
        residual = {features(base_layer(a.o))[0] for a in attention_layouts(self.model)}  # the hidden size
        hidden = getattr(text_config(getattr(self.model, "config", None)), "hidden_size", None)
        residual |= {hidden} if isinstance(hidden, int) else set()
        roots: dict[str, nn.Linear]
        visited: set[nn.Module]
        spanning: list[tuple[str, list[str]]]
        roots, visited, spanning = {}, set(), []
        for m in self.model.modules():
            if not isinstance(m, nn.Linear) or m not in allowed or m in lora_parts or m in attention or m in visited:
                continue
            if m not in graph.module2node:
                continue
            group = graph.get_pruning_group(m, pruning_fn(graph, m, "out"), list(range(m.out_features)))
            items = [(dep.target.module, dep.handler) for dep, _ in group if dep.target.module in self._names]
            members = [x for x, _ in items]
            outs = [x for x, fn in items if graph.is_out_channel_pruning_fn(fn)]
            visited.update(outs)
            if any(x not in allowed for x in outs) or any(x in attention for x in members):
                continue
            if not writes_residual(graph, group, residual, lora_parts):
                continue  # not an FFN: its channels feed something other than the residual stream (a router)
            reasons = normalised_channels(group, self.model)
            if reasons:
                spanning.append((self._names[m], reasons))
                continue
            roots[self._names[m]] = m
        warn_normalised_ffns(spanning)
        return roots

    def _choose_channels(self, ch: _Channels, group, fraction: float) -> list[int]:
        """Original ids of the lowest-scoring channels to remove to reach the scheduled width."""
        keep = _keep_count(ch.initial, (self.channel_ratio or 0.0) * fraction, self.channel_multiple)
        n_remove = len(ch.alive) - keep
        if n_remove <= 0:
            return []
        scores = self._channel_scores(ch, group)
        if scores is None:
            return []
        return sorted(ch.alive[p] for p in torch.argsort(scores.float().cpu())[:n_remove].tolist())

    def _channel_scores(self, ch: _Channels, group) -> torch.Tensor | None:
        """One score per alive channel of an FFN, or None (with a warning) when no LoRA layer scores it."""
        scores = self.importance(group)
        if scores is None:
            warnings.warn(
                f"{ch.key}: no LoRA layer in this group, so it cannot be scored; left unpruned.", stacklevel=4
            )
        return scores

    def _choose_channels_globally(self, groups: dict, fraction: float) -> dict[str, list[int]]:
        """Remove the same total number of channels as local ranking, picked by score across all groups.

        Raw scores are compared across layers (use `normalize=True` to compare relative importance
        instead); every group keeps a multiple of `channel_multiple` channels, at least one multiple (a group's
        highest-scoring picks are kept back to round its width up).
        """
        m = self.channel_multiple
        candidates, total = [], 0
        for key, group in groups.items():
            ch = self._channels[key]
            total += len(ch.alive) - _keep_count(ch.initial, (self.channel_ratio or 0.0) * fraction, m)
            scores = self.importance(group)
            if scores is not None:
                candidates += [(float(v), key, p) for p, v in enumerate(scores.float().cpu().tolist())]
        removed: dict[str, list[int]] = {key: [] for key in groups}
        for _, key, p in sorted(candidates):
            if total <= 0:
                break
            ch = self._channels[key]
            if len(ch.alive) - len(removed[key]) > m:
                removed[key].append(ch.alive[p])
                total -= 1
        for key, ids in removed.items():  # picked in ascending score: un-pick the last ones
            kept = len(self._channels[key].alive) - len(ids)
            del ids[len(ids) - min(-kept % m, len(ids)) :]
        return {key: sorted(ids) for key, ids in removed.items()}

    def _remove_channels(self, graph, ch: _Channels, group, ids: list[int], on_replaced) -> None:
        prune_items(graph, subgroup(group, positions_of(ch.alive, ids, ch.key)), on_replaced)
        gone = set(ids)
        ch.alive = [c for c in ch.alive if c not in gone]

    def _choose_heads(self, graph, h: _Heads, fraction: float) -> list[int]:
        """Original ids of the query heads to remove (whole KV groups in kv_groups mode)."""
        a = h.layout
        keep_q, keep_kv = self._kept_heads(h, fraction)
        heads, kv = a.num_heads, a.num_kv_heads
        if keep_q >= heads:
            return []
        head_scores = self._head_scores(graph, h)
        if head_scores is None:
            return []
        size = heads // kv
        if keep_kv == kv:  # the same number of query heads from every KV group
            drop = torch.argsort(head_scores.view(kv, size), dim=1)[:, : size - keep_q // kv]
            positions = (drop + torch.arange(kv).unsqueeze(1) * size).flatten().tolist()
        else:  # whole KV groups: their query heads, k and v
            group_scores = self._kv_group_scores(h, head_scores)
            positions = [
                g * size + j for g in torch.argsort(group_scores)[: kv - keep_kv].tolist() for j in range(size)
            ]
        return sorted(h.alive[p] for p in positions)

    def _head_scores(self, graph, h: _Heads) -> torch.Tensor | None:
        """One score per alive query head (q rows and o columns; k/v too under MHA), None when unscored."""
        a = h.layout
        heads, kv = a.num_heads, a.num_kv_heads
        size = heads // kv
        scores = self.importance(head_group(graph, a, list(range(heads)), list(range(kv)) if size == 1 else []))
        if scores is None:
            warnings.warn(
                f"{a.name}: no LoRA layer on its projections, so heads cannot be scored; left unpruned.", stacklevel=4
            )
            return None
        return scores.float().cpu().view(heads, a.head_dim).sum(1)

    def _kv_group_scores(self, h: _Heads, head_scores: torch.Tensor) -> torch.Tensor:
        """One score per KV group: its query heads' scores plus its k and v rows' (LoRA-guided scores only)."""
        a = h.layout
        kv, d = a.num_kv_heads, a.head_dim
        size = a.num_heads // kv
        group_scores = head_scores.view(kv, size).sum(1)
        if size > 1 and self._accumulates:
            _, k_rows, v_rows = a.rows([], list(range(kv)))
            for proj, rows in ((a.k, k_rows), (a.v, v_rows)):
                s = self.importance.channel_scores(base_layer(proj), "out")
                if s is not None:
                    group_scores += s.float().cpu()[rows].view(kv, d).sum(1)
        return group_scores

    def _remove_heads(self, graph, h: _Heads, ids: list[int], on_replaced) -> None:
        a = h.layout
        size = a.group_size
        positions = positions_of(h.alive, ids, a.name)
        by_group = [sum(1 for p in positions if p // size == g) for g in range(a.num_kv_heads)]
        if self.config.head_mode == "per_group" and size > 1:
            if len(set(by_group)) != 1:
                raise ValueError(f"{a.name}: removing query heads {ids} would leave KV groups of unequal size.")
            kv_heads: list[int] = []
        else:
            kv_heads = [g for g, n in enumerate(by_group) if n > 0]
            if any(n not in (0, size) for n in by_group):
                raise ValueError(f"{a.name}: query heads {ids} are not whole KV groups, which kv_groups mode removes.")
        remove_heads(graph, a, positions, kv_heads, on_replaced, across_norms=self.config.heads_across_norms)
        gone = set(ids)
        h.alive = [x for x in h.alive if x not in gone]

    # ------------------------------------------------------------------ invariants
    def _restore_invariants(self, replaced: list[Replaced]) -> None:
        """After physical removal: frozen stays frozen, optimizer and scores follow the new parameters,
        PEFT's cached shapes, attention head bookkeeping and the HF config match the weights."""
        for r in replaced:
            r.new.requires_grad_(r.old.requires_grad)
            if self.optimizer is not None and r.old.requires_grad:
                replace_parameter(self.optimizer, r.old, r.new, r.dim, r.keep)
            if r.attr == "weight" and self._accumulates:
                self.importance.on_pruned(r.module, cast(Direction, r.direction), r.keep)
        sync_lora_features(self.model)
        sync_config(self.model, self._structure)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """JSON-able state (step, schedule position, what was removed) plus the score tensors."""
        return {
            "step_count": self.step_count,
            "progress": self.progress,
            "events": self.events,
            "config": self.config.to_dict(),
            "importance": self.importance.state_dict() if self._accumulates else {},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a pruner built on a fresh copy of the original model: replays the removals first."""
        if self.events:
            raise ValueError("load_state_dict needs a pruner on the unpruned model; this one has already pruned.")
        if state["config"] != self.config.to_dict():
            raise ValueError("The checkpoint was made with a different LoRAPruneConfig; use the same config to resume.")
        self.replay(state["events"])
        self.step_count, self.progress = int(state["step_count"]), float(state["progress"])
        if self._accumulates:
            self.importance.load_state_dict(state["importance"], self.model)

    # ------------------------------------------------------------------ reporting
    @property
    def parameters(self) -> int:
        return count_parameters(self.model)

    def summary(self) -> dict:
        return {
            "initial_parameters": self.initial_parameters,
            "parameters": self.parameters,
            "pruned_layers": self.layer_indices,
            "allocation": "explicit" if self.config.explicit_ratios else self.config.allocation,
            "uniform": self.config.uniform,
            "target": self.config.target,
            "head_ratio": self.head_ratio,
            "channel_ratio": self.channel_ratio,
            "channel_multiple": self.channel_multiple,
            "heads": {k: len(h.alive) for k, h in self._heads.items()},
            "channels": {k: len(c.alive) for k, c in self._channels.items()},
            **(self._experts.summary() if self._experts else {}),
        }


# Allocation rounds of one prune event on MoE models (each round removes something or ends the event).
_MAX_ROUNDS = 8
