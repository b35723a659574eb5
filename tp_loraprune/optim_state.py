"""Keeping an optimizer valid when Torch-Pruning replaces a parameter by a sliced copy.

Torch-Pruning builds a new `nn.Parameter` for every pruned weight; the optimizer still holds the old
one. `replace_parameter` swaps it in every param group and slices the per-parameter state (AdamW's
`exp_avg` / `exp_avg_sq`, momentum buffers) to the kept indices, so the moments are not reset.
"""

from __future__ import annotations

import torch


def replace_parameter(
    optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, dim: int, keep: torch.Tensor
) -> None:
    """Swap `old` for `new` in `optimizer`, its state tensors sliced to `keep` along `dim` like the parameter."""
    replace_parameter_by(optimizer, old, new, lambda value: value.index_select(dim, keep.to(value.device)))


def replace_parameter_by(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, transform) -> None:
    """Swap `old` for `new` in `optimizer`; `transform` maps every state tensor of the old parameter's shape like the
    parameter (one index_select in `replace_parameter`; MoE experts gather channels per expert)."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            state[key] = transform(value)
    optimizer.state[new] = state


def trainable_parameters_match(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
    """True when the optimizer holds exactly the model's trainable parameters (by identity)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return held == trainable
