"""GPT-2's `Conv1D` as a linear layer with a transposed weight: shapes, and its Torch-Pruning pruning function.

`transformers.pytorch_utils.Conv1D(nf, nx)` computes `x @ weight + bias` with `weight` of shape (in, out) =
(nx, nf). Torch-Pruning 1.6.1 has no pruner for it, so `Conv1DPruner` is registered through
`build_dependency(customized_pruners=...)`. Everything else in tp_loraprune speaks in (out, in) terms;
`features` and `weight_dim` translate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch_pruning as tp
from torch import nn


def conv1d_type() -> type | None:
    """transformers' Conv1D class (None when transformers is not installed)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency of every model we prune
        return None
    return cast(type, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_type()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D."""
    m = cast(Any, module)
    if is_conv1d(module):
        return int(m.nf), int(m.nx)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise TypeError(f"Expected nn.Linear or transformers Conv1D, got {type(module).__name__}.")


def weight_dim(module: nn.Module, direction: str) -> int:
    """The dimension of `module.weight` that holds output ("out") or input ("in") channels."""
    out_dim = 1 if is_conv1d(module) else 0
    return out_dim if direction == "out" else 1 - out_dim


class Conv1DPruner(tp.pruner.BasePruningFunc):
    """Removes output channels (weight columns + bias) or input channels (weight rows) of a Conv1D."""

    TARGET_MODULES = None  # transformers' Conv1D, checked lazily so importing this module stays cheap

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        m = cast(Any, layer)
        keep = sorted(set(range(m.nf)) - set(idxs))
        m.weight = self._prune_parameter_and_grad(m.weight, keep, 1)
        if m.bias is not None:
            m.bias = self._prune_parameter_and_grad(m.bias, keep, 0)
        m.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        m = cast(Any, layer)
        keep = sorted(set(range(m.nx)) - set(idxs))
        m.weight = self._prune_parameter_and_grad(m.weight, keep, 0)
        m.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(cast(Any, layer).nf)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(cast(Any, layer).nx)


CONV1D_PRUNER = Conv1DPruner()


def customized_pruners() -> dict:
    """The `customized_pruners=` argument of `build_dependency` for transformers models."""
    cls = conv1d_type()
    return {cls: CONV1D_PRUNER} if cls is not None else {}
