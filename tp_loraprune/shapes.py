"""Shapes of pruned tensors outside linear layers (expert stacks, routers, attention sinks, per-head norms),
recorded when a model is saved in the per-layer format and restored before its weights are loaded back."""

from __future__ import annotations

from itertools import chain
from typing import Any, cast

import torch
from torch import nn

from .conv1d import is_linear_like


def _tensors(module: nn.Module):
    return chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))


def changed_tensor_shapes(model: nn.Module, reference: nn.Module) -> dict[str, list[int]]:
    """Parameters and buffers of `model` outside linear layers whose shape differs from `reference` (the model its
    config builds), by qualified name. Linear layers are recorded by their features instead."""
    expected = {
        f"{m}.{n}" if m else n: list(t.shape) for m, module in reference.named_modules() for n, t in _tensors(module)
    }
    changed = {}
    for m, module in model.named_modules():
        if is_linear_like(module):
            continue
        for n, t in _tensors(module):
            name = f"{m}.{n}" if m else n
            if name in expected and expected[name] != list(t.shape):
                changed[name] = list(t.shape)
    return changed


def reshape_tensors(model: nn.Module, shapes: dict[str, list[int]], source: str) -> None:
    """Give the named parameters and buffers new, uninitialised tensors of the recorded shapes (weights are loaded
    into them afterwards). `source` names the file the shapes come from, for the error message."""
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        old = getattr(module, attr, None) if module is not None else None
        if not isinstance(old, torch.Tensor):
            raise ValueError(
                f"{source} reshapes {name!r}, which is not a parameter or buffer of {type(model).__name__}."
            )
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        setattr(
            module, attr, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        )
        normalized = getattr(module, "normalized_shape", None)  # torch's LayerNorm checks its input by it
        if isinstance(normalized, tuple) and len(normalized) == len(shape):
            cast(Any, module).normalized_shape = tuple(shape)
