"""Building Torch-Pruning's DependencyGraph on a PEFT model, with the preconditions it needs.

Tracing is autograd-based, so every parameter must require grad while the graph is built (frozen
layers would be invisible). On transformers 5, SDPA calls `enable_gqa=True` and skips `repeat_kv`,
which hides the coupling between query heads and their KV head; eager attention shows it. The trace
also leaves the model in eval mode and needs `use_cache=False`. `traceable` sets all of this up and
restores the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, cast

import torch
import torch_pruning as tp
from torch import nn

from .conv1d import customized_pruners as conv1d_pruners
from .mla import opaque_while_tracing
from .quant import customized_pruners as quantized_pruners

Direction = Literal["out", "in"]


def _configs(model: nn.Module) -> list:
    seen, configs = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "use_cache") and id(c) not in seen:
            seen.add(id(c))
            configs.append(c)
    return configs


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[nn.Module]:
    """All params trainable, eager attention, no KV cache; restores flags, mode and config afterwards."""
    grads = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    configs = _configs(model)
    saved = [(c, c.use_cache, getattr(c, "_attn_implementation", None)) for c in configs]
    try:
        for p in grads:
            if p.is_floating_point():  # quantized (integer) weights cannot; their layers are traced by input
                p.requires_grad_(True)
        for c in configs:
            c.use_cache = False
            if getattr(c, "_attn_implementation", None) not in (None, "eager"):
                c._attn_implementation = "eager"
        yield model
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for c, use_cache, attn in saved:
            c.use_cache = use_cache
            if attn is not None and getattr(c, "_attn_implementation", None) != attn:
                c._attn_implementation = attn
        model.train(was_training)


def model_output(out):
    """The tensor to trace back from: logits for LMs, hidden states for encoders."""
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    return out[0] if isinstance(out, (tuple, list)) else out


def example_input_ids(model: nn.Module, length: int = 8) -> torch.Tensor:
    """A short batch of token ids on the model's device, enough to trace the graph.

    Vision models (a forward taking `pixel_values` first and a config with `image_size` and `num_channels`, e.g.
    ViT) get one image of `pixel_values` instead, passed positionally like the token ids.
    """
    import inspect

    param = next(model.parameters())
    device = param.device
    config = getattr(model, "config", None)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    first = next(iter(inspect.signature(base.forward).parameters), None)
    if isinstance(channels, int) and size is not None and first == "pixel_values":
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return torch.linspace(-1, 1, channels * h * w, device=device, dtype=param.dtype).view(1, channels, h, w)
    vocab = getattr(config, "vocab_size", 100) or 100
    return torch.arange(length, device=device).remainder(vocab).unsqueeze(0)


def customized_pruners(model: nn.Module) -> dict:
    """Torch-Pruning pruners for the layers it does not know: transformers' Conv1D (GPT-2) and the
    bitsandbytes 8-bit / 4-bit linears of `model`."""
    return {**conv1d_pruners(), **quantized_pruners(model)}


def build_graph(model: nn.Module, example_inputs=None) -> tp.DependencyGraph:
    """Trace `model` into a DependencyGraph under `traceable`."""
    if example_inputs is None:
        example_inputs = example_input_ids(model)
    with traceable(model), opaque_while_tracing(model), torch.enable_grad():
        try:
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_inputs,
                output_transform=model_output,
                customized_pruners=customized_pruners(model),
                verbose=False,
            )
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            from .support import model_class_name, shown

            where = _failing_module(model, e)
            raise ValueError(
                f"Torch-Pruning could not trace {model_class_name(model)} (at {shown(where)!r}: {type(e).__name__}: "
                f"{e}); the model is unchanged. Its forward uses an operation Torch-Pruning's graph cannot follow, so "
                "its channel couplings are unknown and it is not pruned. See docs/architectures.md."
            ) from e


def _failing_module(model: nn.Module, error: BaseException) -> str:
    """The qualified name of the innermost module of `model` whose forward raised `error`, else of the model's
    first decoder layer (Torch-Pruning's own graph steps run after the forward)."""
    names = {m: n for n, m in model.named_modules()}
    found = ""
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if isinstance(module, nn.Module) and names.get(module):
            found = names[module]
        tb = tb.tb_next
    if not found:
        from .models import language_model

        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        inside = set(language_model(model).modules())
        lists = [(n, m) for n, m in lists if m in inside] or lists
        found = f"{max(lists, key=lambda x: len(x[1]))[0]}.0" if lists else type(model).__name__
    return found


def release_trace(graph: tp.DependencyGraph) -> None:
    """Drop what a graph kept from its trace, for a graph reused across prune events: the autograd nodes
    (they hold the tensors saved in the traced forward, weights included) and the parameter-name table
    (keyed by parameter objects), which would keep every replaced weight alive. The graph can still build declared
    groups and prune modules, but no longer propagate (`get_pruning_group`) or prune bare parameters."""
    for node in graph.module2node.values():
        node.grad_fn = None
        for attr in ("grad_fn", "_grad_fn"):  # Torch-Pruning's placeholders for functional ops keep theirs too
            if hasattr(node.module, attr) and not isinstance(node.module, nn.Parameter):
                setattr(node.module, attr, None)
    graph._param_to_name = {}


def pruning_fn(graph: tp.DependencyGraph, module: nn.Module, direction: str):
    """The function that removes output ("out") or input ("in") channels of `module` in `graph`
    (a customized pruner's for bitsandbytes layers, Torch-Pruning's own otherwise)."""
    pruner = graph.get_pruner_of_module(module)
    if pruner is None:
        raise ValueError(f"Torch-Pruning has no pruner for {type(module).__name__}; it cannot be pruned.")
    return pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels


def pruning_direction(handler) -> Direction | None:
    """Which side a Torch-Pruning pruning function removes (any pruner's, customized ones included)."""
    name = getattr(handler, "__name__", "")
    return "out" if name == "prune_out_channels" else "in" if name == "prune_in_channels" else None
