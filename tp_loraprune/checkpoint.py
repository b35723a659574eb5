"""Checkpoint and resume of a pruning fine-tune: safetensors for tensors, JSON for the rest.

A checkpoint directory holds the PEFT model's weights (pruned shapes), the optimizer state, the
learning-rate scheduler state and the pruner state (step, schedule position, moving-average scores,
every removal so far). Resuming rebuilds the same architecture on a fresh copy of the original model
by replaying the removals, then loads the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .pruner import LoRAPruner

STATE = "state.json"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, values in state["state"].items():
        rest["state"][str(idx)] = {}
        for key, v in values.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{key}"] = v.detach().cpu().contiguous()
            else:
                rest["state"][str(idx)][key] = v
    return tensors, rest


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state = {int(idx): dict(values) for idx, values in rest["state"].items()}
    for name, v in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pruner: LoRAPruner,
    scheduler=None,
    extra: dict | None = None,
) -> Path:
    from safetensors.torch import save_file, save_model

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_rest = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    pruner_state = pruner.state_dict()
    save_file(
        {k: v.contiguous() for k, v in pruner_state.pop("importance").items()}, str(tmp / "importance.safetensors")
    )
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if not callable(v) and k != "lr_lambdas"}
    state = {"pruner": pruner_state, "optimizer": opt_rest, "scheduler": scheduler_state, "extra": extra or {}}
    (tmp / STATE).write_text(json.dumps(state))
    if path.exists():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    tmp.rename(path)  # a checkpoint is either complete or absent
    return path


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, pruner: LoRAPruner, scheduler=None
) -> dict:
    """Resume into freshly built (unpruned) model / optimizer / pruner; returns the `extra` dict."""
    from safetensors.torch import load_file, load_model

    path = Path(path)
    if not (path / STATE).is_file():
        raise ValueError(f"{path} is not a tp_loraprune checkpoint (no {STATE}).")
    state = json.loads((path / STATE).read_text())
    pruner_state = dict(state["pruner"], importance=load_file(str(path / "importance.safetensors")))
    pruner.load_state_dict(pruner_state)  # replays removals: model now has the checkpoint's shapes
    device = next(model.parameters()).device
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    if pruner.optimizer is not optimizer:
        raise ValueError(
            "Pass the pruner's own optimizer (LoRAPruner(..., optimizer=optimizer)) so it follows the replay."
        )
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    return state["extra"]
