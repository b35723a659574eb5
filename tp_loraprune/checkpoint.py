"""Checkpoint and resume of a pruning fine-tune: safetensors for tensors, JSON for the rest.

A checkpoint holds the PEFT model's weights (pruned shapes), the optimizer state, the learning-rate
scheduler state and the pruner state (step, schedule position, moving-average scores, every removal so
far). Resuming rebuilds the same architecture on a fresh copy of the original model by replaying the
removals, then loads the tensors.

Layout of a checkpoint directory:

    latest.json            {"checkpoint": "step-00000012", "state": sha256 of its state.json}: replaced
                           atomically, so it always names a complete checkpoint
    step-00000012/         model / optimizer / importance .safetensors, then state.json (written last; it
                           records every file's size and sha256, the step and the run's fingerprint)

A new checkpoint is written into a temporary directory beside the old one, fsynced and renamed into
place; only then does `latest.json` move to it and the old one is deleted, so at every moment there is a
complete checkpoint. `state.json` may carry a fingerprint of the run (base model, data, settings):
resuming onto anything else is refused with what differs. A directory with `state.json` and the tensor
files directly in it (the layout before 0.1.0) is still read.

A checkpoint written before a setting existed (e.g. `allocation`, added with the "auto" rule) resumes as it
ran: `LEGACY_SETTINGS` gives every missing setting the value that reproduces the code that wrote it
(allocation="fixed", ...), and resuming with other values is refused, naming them.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .integrity import (
    check_finite,
    file_record,
    fsync_path,
    read_json,
    records,
    remove_tree,
    verify_records,
    write_errors,
    write_text_atomic,
)
from .pruner import LoRAPruner

STATE = "state.json"
LATEST = "latest.json"
MODEL, OPTIMIZER, IMPORTANCE = "model.safetensors", "optimizer.safetensors", "importance.safetensors"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-\d{8}(-\d+)?")
_NON_FINITE_FIX = (
    "Fine-tune again with a lower `lr` (CLI --lr) or `max_grad_norm`, or in fp32/bf16 instead of fp16 (a checkpoint "
    "resumes only with the settings it was written with, so this is a new run)."
)


# Settings that checkpoints predating them lack, with the value that reproduces how those checkpoints ran
# ("config": LoRAPruneConfig fields, "train": TrainConfig fields).
LEGACY_SETTINGS = {
    "config": {
        "allocation": "fixed",  # the one rule before "auto": heads at the ratio in every layer
        "uniform": False,
        "min_heads_per_group": 1,
        "min_kv_heads": 1,
        "min_ffn_width": 1,
        "max_layer_ratio": 1.0,
        "target": "parameters",
        "latency_tokens": 2048,
        "latency_phase": "prefill",
        "servable": False,
        "gradient": "eq10",  # the paper's estimate, the only one before the option existed
    },
    "train": {
        "lora_init": "default",  # PEFT's init (B = 0) before lora_init existed
        "warmup_ratio": 0.03,  # the fixed 3% warmup before the option existed
        "lr_schedule": "linear",  # the one schedule before the option existed
        "decay_ratio": 0.1,
    },
}


def upgrade_state(state: dict) -> list[str]:
    """Give a checkpoint's `state` (its state.json, in place) the settings it predates, from LEGACY_SETTINGS.

    Returns the filled settings as "section.key" ("config.allocation", ...): empty for a current checkpoint."""
    filled: set[str] = set()
    sections = [("config", (state.get("pruner") or {}).get("config"))]
    fingerprint = state.get("fingerprint") or {}
    sections += [("config", fingerprint.get("config")), ("train", fingerprint.get("train"))]
    for section, settings in sections:
        if not isinstance(settings, dict):
            continue
        for key, value in LEGACY_SETTINGS[section].items():
            if key not in settings:
                settings[key] = value
                filled.add(f"{section}.{key}")
    return sorted(filled)


def checkpoint_settings(path: str | os.PathLike) -> dict[str, dict]:
    """{"config": LoRAPruneConfig fields, "train": TrainConfig fields} the latest checkpoint in `path` was written
    with (settings it predates filled from LEGACY_SETTINGS; "train" is empty for a checkpoint without fingerprint)."""
    state = checkpoint_state(path, verify=False)
    upgrade_state(state)
    fingerprint = state.get("fingerprint") or {}
    return {
        "config": dict(fingerprint.get("config") or state["pruner"].get("config") or {}),
        "train": dict(fingerprint.get("train") or {}),
    }


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


def _fix(root: Path) -> str:
    return (
        f"Delete {root} to start over (or resume from a copy of it); it was not written completely or was changed "
        "after writing."
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pruner: LoRAPruner,
    scheduler=None,
    extra: dict | None = None,
    *,
    fingerprint: dict | None = None,
) -> Path:
    """Write a checkpoint into the directory `path` (see the module docstring); returns the checkpoint's dir.

    Refuses (NonFiniteError) to write weights, optimizer state or scores holding inf/NaN.
    """
    from safetensors.torch import save_file, save_model

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_rest = _flatten_optimizer(optimizer.state_dict())
    pruner_state = pruner.state_dict()
    scores = {k: v.contiguous() for k, v in pruner_state.pop("importance").items()}
    step = pruner.step_count
    what = f"Checkpoint at step {step}"
    check_finite(model.state_dict().items(), what=what, fix=_NON_FINITE_FIX)
    check_finite(opt_tensors.items(), what=f"{what} (optimizer state)", fix=_NON_FINITE_FIX)
    check_finite(scores.items(), what=f"{what} (importance scores)", fix=_NON_FINITE_FIX)
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if not callable(v) and k != "lr_lambdas"}

    name = _free_name(root, f"step-{step:08d}")
    tmp = root / f".{name}.tmp"
    remove_tree(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / MODEL))  # drops the copies of tied weights
        save_file(opt_tensors, str(tmp / OPTIMIZER))
        save_file(scores, str(tmp / IMPORTANCE))
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": records(tmp, [MODEL, OPTIMIZER, IMPORTANCE]),
            "fingerprint": fingerprint,
            "pruner": pruner_state,
            "optimizer": opt_rest,
            "scheduler": scheduler_state,
            "extra": extra or {},
        }
        (tmp / STATE).write_text(json.dumps(state))
        fsync_path(tmp / STATE)
        fsync_path(tmp)
        os.rename(tmp, root / name)
        fsync_path(root)
    except BaseException as e:
        remove_tree(tmp)  # a full disk gets its space back; the previous checkpoint is untouched
        if isinstance(e, write_errors()):
            kept = "the previous checkpoint is kept" if has_checkpoint(root) else "there is no earlier checkpoint"
            raise OSError(
                getattr(e, "errno", None) or errno.EIO,
                f"Writing the checkpoint of step {step} into {root} failed ({e}); {kept}. Free some space or choose "
                "another checkpoint directory, then resume",
            ) from e
        raise
    _publish(root, name)
    return root / name


def _free_name(root: Path, name: str) -> str:
    candidate, n = name, 1
    while (root / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _publish(root: Path, name: str) -> None:
    """Point latest.json at `name`, then delete every other checkpoint in `root`."""
    state = file_record(root / name / STATE)["sha256"]
    write_text_atomic(root / LATEST, json.dumps({"format_version": FORMAT_VERSION, "checkpoint": name, "state": state}))
    for entry in root.iterdir():
        debris = entry.name.startswith((".step-", f".{LATEST}.")) and entry.name.endswith(".tmp")
        if entry.name != name and (_STEP_DIR.fullmatch(entry.name) or debris):
            entry.unlink() if entry.is_file() else remove_tree(entry)
    for legacy in (STATE, MODEL, OPTIMIZER, IMPORTANCE):  # the flat layout of earlier versions
        (root / legacy).unlink(missing_ok=True)


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a checkpoint (it may still be unreadable; `load_checkpoint` says why)."""
    return (Path(path) / LATEST).exists() or (Path(path) / STATE).exists()


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The directory of the latest checkpoint in `path`."""
    return _latest(Path(path))[0]


def _latest(root: Path) -> tuple[Path, str | None]:
    """(directory of the latest checkpoint, sha256 its state.json must have, if recorded)."""
    if (root / LATEST).exists():
        latest = read_json(root / LATEST, what="Checkpoint", fix=_fix(root))
        name = latest.get("checkpoint")
        if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
            raise ValueError(f"Checkpoint file {root / LATEST} names no checkpoint ({name!r}). {_fix(root)}")
        if not (root / name).is_dir():
            raise ValueError(
                f"Checkpoint file {root / LATEST} names {name}, which is missing from {root}. {_fix(root)}"
            )
        return root / name, latest.get("state")
    if (root / STATE).exists():
        return root, None
    partial = sorted(p.name for p in root.glob(".step-*.tmp")) if root.is_dir() else []
    hint = f" (only the unfinished {partial[0]}: the run stopped during its first checkpoint)" if partial else ""
    raise ValueError(
        f"{root} holds no tp_loraprune checkpoint (no {LATEST}){hint}; start without resuming, or pass the "
        "checkpoint directory of the run to continue."
    )


def checkpoint_state(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """state.json of the latest checkpoint in `path`; `verify`: its files checked against their size and sha256."""
    where, state_sha256 = _latest(Path(path))
    fix = _fix(Path(path))
    if verify and state_sha256 is not None and (where / STATE).is_file():
        if file_record(where / STATE)["sha256"] != state_sha256:
            raise ValueError(
                f"Checkpoint file {where / STATE} is corrupt (its sha256 differs from the one in {LATEST}). {fix}"
            )
    state = read_json(where / STATE, what="Checkpoint", fix=fix)
    for key in ("pruner", "optimizer"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"Checkpoint file {where / STATE} has no {key!r} section. {fix}")
    if verify and "files" in state:
        verify_records(where, state["files"], what="Checkpoint", fix=fix, source=STATE)
    return state


def _load_tensors(file: Path, fix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise ValueError(f"Checkpoint file {file} is missing. {fix}") from None
    except Exception as e:  # safetensors raises its own SafetensorError on a bad header
        raise ValueError(f"Checkpoint file {file} is unreadable ({type(e).__name__}: {e}). {fix}") from None


def fingerprint_differences(saved: dict | None, current: dict | None, prefix: str = "") -> list[str]:
    """'key: checkpoint X, this run Y' for every entry of two fingerprints that differs."""
    if not saved or not current:
        return []
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {_short(a)}, this run {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text[:40] + "…" if len(text) > 40 else text


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pruner: LoRAPruner,
    scheduler=None,
    *,
    fingerprint: dict | None = None,
) -> dict:
    """Resume into freshly built (unpruned) model / optimizer / pruner; returns the `extra` dict.

    With `fingerprint`, a checkpoint written with another fingerprint (another base model, other data or
    other settings) is refused, saying what differs. Every unreadable file is named in the error.
    """
    from safetensors.torch import load_model

    root = Path(path)
    fix = _fix(root)
    state = checkpoint_state(root)
    where = checkpoint_dir(root)
    filled = upgrade_state(state)
    if fingerprint is not None and state.get("fingerprint"):
        saved, current = state["fingerprint"], json.loads(json.dumps(fingerprint))
    else:  # a checkpoint (or a resume) without fingerprint: the pruner settings must still match
        saved = {"config": state["pruner"].get("config")}
        current = {"config": json.loads(json.dumps(pruner.config.to_dict()))}
    differences = fingerprint_differences(saved, current)
    if differences:
        older = [d for d in differences if d.split(":")[0] in filled]
        note = (
            " It was written before " + ", ".join(f"`{d.split(':')[0].split('.')[1]}`" for d in older) + " existed; "
            "the values shown are the ones it ran with. Resume with them (CLI: leave those flags out, --resume takes "
            "the checkpoint's values),"
            if older
            else " Resume with the same model, data and settings,"
        )
        raise ValueError(
            f"Checkpoint {where} belongs to another run: " + "; ".join(differences) + "." + note + " or start over "
            "with another checkpoint directory (or without resuming)."
        )
    scores = _load_tensors(where / IMPORTANCE, fix)
    pruner.load_state_dict(dict(state["pruner"], importance=scores))  # replays removals: checkpoint shapes
    device = next(model.parameters()).device
    try:
        load_model(model, str(where / MODEL), strict=True, device=str(device))
    except FileNotFoundError:
        raise ValueError(f"Checkpoint file {where / MODEL} is missing. {fix}") from None
    except Exception as e:
        raise ValueError(
            f"Checkpoint file {where / MODEL} does not fit this model ({type(e).__name__}: {str(e)[:300]}). {fix}"
        ) from None
    if pruner.optimizer is not optimizer:
        raise ValueError(
            "Pass the pruner's own optimizer (LoRAPruner(..., optimizer=optimizer)) so it follows the replay."
        )
    opt = _unflatten_optimizer(_load_tensors(where / OPTIMIZER, fix), state["optimizer"])
    try:
        optimizer.load_state_dict(opt)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"Checkpoint file {where / OPTIMIZER} does not fit this optimizer ({e}). {fix}") from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    return state.get("extra", {})
