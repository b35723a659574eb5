"""Attention and FFNs timed as the model runs them: a copy of the model's own block at each head count or width,
called with the arguments that block receives in the model's forward.

`latency.attention_seconds` times a synthetic block (bare matmuls and flash attention with `is_causal`), which on
an H200 did not predict the model's own time (docs/benchmarks.md: the model's attention ran another kernel, with
its mask). Replaying the real block keeps everything the model does there: its attention implementation, mask,
rotary embedding, per-head norms and biases. It covers prefill of blocks with separate q / k / v / o linears;
`replayable` says when, and the pruner falls back to the synthetic block otherwise. FFNs the same way
(`ffn_replayable`, `cut_ffn_copy`, `ffn_seconds`): the model's own MLP with its activation and gating, for MLPs
made of plain linears into and out of the channels.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import nn

from .head_parameters import remove_head_entries
from .indices import index_tensor
from .lora import base_layer, lora_layers
from .models import AttentionLayout, attention_layouts, sync_attention_attributes, text_config
from .surgery import slice_linear


class _Captured(Exception):
    """Raised by the capturing hook: the forward has delivered what was needed."""


def replayable(layout: AttentionLayout) -> bool:
    """Whether the block can be copied and cut to any head count here: separate, plain float linears."""
    projections = [base_layer(m) for m in (layout.q, layout.k, layout.v, layout.o)]
    return layout.fused is None and all(type(p) is nn.Linear and p.weight.is_floating_point() for p in projections)


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, tokens: int) -> tuple[tuple, dict]:
    """The positional and keyword arguments `block` receives in a forward of `model` on `tokens` random token ids
    (batch 1, no cache, LoRA off); the forward stops at `block`."""
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    param = next(model.parameters())
    vocab = getattr(text_config(getattr(model, "config", None)), "vocab_size", None) or 100
    ids = torch.randint(0, vocab, (1, tokens), device=param.device)
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    extra = {"use_cache": False} if "use_cache" in inspect.signature(base.forward).parameters else {}
    without_lora = cast(Any, model).disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with without_lora:
            model(input_ids=ids, **extra)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(block).__name__} was not called in a forward of {type(model).__name__}.")
    kwargs = dict(captured["kwargs"])
    for name in CACHE_ARGUMENTS:  # a replayed call must not append to a cache
        if name in kwargs:
            kwargs[name] = False if name == "use_cache" else None
    return captured["args"], kwargs


# keyword arguments through which an attention block reads or writes a KV cache
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "use_cache")


def _copy_without_lora(module: nn.Module) -> nn.Module:
    block = copy.deepcopy(module)
    for name, layer in lora_layers(block).items():
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, base_layer(layer))
    return block


def cut_copy(layout: AttentionLayout, heads: int, kv_heads: int) -> nn.Module:
    """A copy of the attention block without LoRA, keeping the first `kv_heads` KV groups and the first
    `heads // kv_heads` query heads of each (weights, biases and per-head parameters), its head bookkeeping set."""
    block = _copy_without_lora(layout.module)
    (cut,) = [a for a in attention_layouts(block) if a.module is block]
    total, kv_total = cut.num_heads, cut.num_kv_heads
    size, keep_size = total // kv_total, heads // kv_heads
    kept = [g * size + j for g in range(kv_heads) for j in range(keep_size)]
    removed = sorted(set(range(total)) - set(kept))
    removed_kv = list(range(kv_heads, kv_total))  # for multi-head attention the same as `removed`
    q_rows, k_rows, v_rows = (index_tensor(r) for r in cut.rows(kept, list(range(kv_heads))))
    extras = cut.extras()
    entries = extras.entries + extras.spanning  # a norm over all heads (OLMo 2) is cut as heads_across_norms cuts it
    for proj, rows in ((cut.q, q_rows), (cut.k, k_rows), (cut.v, v_rows)):
        slice_linear(cast(nn.Linear, proj), "out", rows)
    slice_linear(cast(nn.Linear, cut.o), "in", q_rows)
    remove_head_entries(entries, total, kv_total, removed, removed_kv, lambda *_: None)
    sync_attention_attributes(block, [cut])
    return block


def attention_seconds(
    layout: AttentionLayout, inputs: tuple[tuple, dict], heads: int, kv_heads: int, timed: Callable
) -> float:
    """The block's forward time with `heads` query and `kv_heads` KV heads, on `inputs` (`block_inputs`), by
    `timed(fn)` (`latency.fastest_seconds` with the device and repeats bound)."""
    return 0.0 if heads == 0 else _replayed_seconds(cut_copy(layout, heads, kv_heads), inputs, timed)


def _replayed_seconds(block: nn.Module, inputs: tuple[tuple, dict], timed: Callable) -> float:
    """`timed` of one gradient-free call of `block` on the captured (args, kwargs)."""
    args, kwargs = inputs
    with torch.no_grad():
        return timed(lambda: block(*args, **kwargs))


def ffn_block(model: nn.Module, root_name: str) -> nn.Module:
    """The module holding the FFN whose channels are rooted at the linear named `root_name` (its LoRA wrapper's
    parent: `...mlp` for `...mlp.gate_proj.base_layer`)."""
    name = root_name.removesuffix(".base_layer")
    return model.get_submodule(name.rpartition(".")[0])


def _linears(block: nn.Module) -> dict[str, nn.Linear] | None:
    """The block's children as base layers when every child is a plain float linear or has no parameters (an
    activation), else None."""
    out: dict[str, nn.Linear] = {}
    for name, child in block.named_children():
        layer = base_layer(child)
        if type(layer) is nn.Linear and layer.weight.is_floating_point():
            out[name] = layer
        elif next(child.parameters(), None) is not None:
            return None
    return out


def ffn_replayable(block: nn.Module, width: int, hidden: int) -> bool:
    """Whether the FFN block can be cut to any width here: its linears all map hidden → `width` (gate, up) or
    `width` → hidden (down), at least one each way, and nothing else in it holds parameters."""
    linears = _linears(block)
    if not linears or width == hidden:
        return False
    shapes = [(m.in_features, m.out_features) for m in linears.values()]
    return (
        all(s in ((hidden, width), (width, hidden)) for s in shapes)
        and (hidden, width) in shapes
        and (width, hidden) in shapes
    )


def cut_ffn_copy(block: nn.Module, width: int, keep: int) -> nn.Module:
    """A copy of the FFN block without LoRA that keeps its first `keep` of `width` channels."""
    cut = _copy_without_lora(block)
    rows = index_tensor(list(range(keep)))
    for layer in (_linears(cut) or {}).values():
        slice_linear(layer, "out" if layer.out_features == width else "in", rows)
    return cut


def ffn_seconds(block: nn.Module, inputs: tuple[tuple, dict], width: int, keep: int, timed: Callable) -> float:
    """The FFN block's forward time with `keep` of its `width` channels, on `inputs` (`block_inputs`), by
    `timed(fn)`."""
    return 0.0 if keep == 0 else _replayed_seconds(cut_ffn_copy(block, width, keep), inputs, timed)
