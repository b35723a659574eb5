"""Writing files so that a crash never leaves a half-written artifact, and checking what was written.

Used by checkpoints (`checkpoint.py`) and saved models (`export.py`): files are written beside their
final place, fsynced, and moved in with a rename; a record of every file (bytes, sha256) is written last
and checked when reading back. Also the up-front checks of an output location (writable, enough room)
and the non-finite checks of what is about to be saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch


class NonFiniteError(ValueError, FloatingPointError):
    """A loss, gradient or weight became inf/NaN (a ValueError; also a FloatingPointError, as before)."""


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, and safetensors' own error (a full disk inside its Rust writer)."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory fsync makes a rename in it durable; not on Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if Path(path).is_dir():  # some platforms cannot open a directory; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, fsync and rename: old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def file_record(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def records(root: Path, names: Iterable[str]) -> dict[str, dict]:
    """fsync each file under `root` and return its record (names relative to `root`)."""
    out = {}
    for name in sorted(names):
        fsync_path(root / name)
        out[name] = file_record(root / name)
    return out


def verify_records(
    root: Path, files: dict[str, dict], *, what: str, fix: str, source: str, hashes: bool = True
) -> None:
    """Raise a ValueError naming the first file of `files` (read from `source`) that is missing or changed."""
    missing = sorted(name for name in files if not (root / name).is_file())
    if missing:
        raise ValueError(f"{what} {root} is incomplete: {', '.join(missing)} missing (listed in {source}). {fix}")
    for name, expected in files.items():
        size = (root / name).stat().st_size
        if size != expected["bytes"]:
            raise ValueError(
                f"{what} file {root / name} has {size} bytes, {expected['bytes']} were written (says {source}): it "
                f"is truncated or was changed. {fix}"
            )
        if hashes and file_record(root / name)["sha256"] != expected["sha256"]:
            raise ValueError(
                f"{what} file {root / name} is corrupt: its sha256 differs from the one written in {source}. {fix}"
            )


def read_json(path: Path, *, what: str, fix: str) -> dict:
    """json.loads of a file, with a ValueError naming the file when it is missing or not valid JSON."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} is missing. {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{what} file {path} is unreadable ({type(e).__name__}: {e}); it is truncated or corrupt. {fix}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} file {path} holds a JSON {type(value).__name__}, not an object. {fix}")
    return value


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------- non-finite values
def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding an inf or NaN, or None."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(named: Iterable[tuple[str, torch.Tensor]], *, what: str, fix: str) -> None:
    name = first_non_finite(named)
    if name is not None:
        raise NonFiniteError(f"{what}: {name} holds inf or NaN values, so nothing was saved. {fix}")


# ------------------------------------------------------------------------------------- output locations
def existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, *, option: str) -> None:
    """Raise a ValueError when `path` (or the directory it would be created in) cannot be written."""
    path = Path(path)
    base = existing_ancestor(path)
    if not base.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {base} is a file, not a directory; choose another path.")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".tp_loraprune-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"{option} {path} cannot be written ({type(e).__name__}: {e.strerror or e} in {base}); choose a "
            "writable directory."
        ) from None


def check_room(needs: dict[str, tuple[Path, int]]) -> None:
    """`needs`: option → (path, bytes). Paths on one file system add up; raise when one has too little room."""
    by_device: dict[int, list[tuple[str, Path, int]]] = {}
    for option, (path, size) in needs.items():
        base = existing_ancestor(path)
        by_device.setdefault(base.stat().st_dev, []).append((option, base, size))
    for entries in by_device.values():
        need = sum(size for _, _, size in entries)
        free = shutil.disk_usage(entries[0][1]).free
        if free < need:
            parts = " + ".join(f"{_gb(size)} for {option}" for option, _, size in entries)
            raise ValueError(
                f"{entries[0][1]} has {_gb(free)} free but this run needs about {_gb(need)} there ({parts}); "
                "free some space or choose another location, before any training is done."
            )


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
