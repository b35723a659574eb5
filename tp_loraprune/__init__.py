"""tp_loraprune: LoRAPrune (arXiv 2305.18403) for Torch-Pruning.

Structured pruning of LLMs (attention heads, FFN channels) inside a LoRA fine-tune, scored from the LoRA
factors and their gradients only. Public names are imported lazily so `import tp_loraprune` stays cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tp_loraprune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_EXPORTS = {
    "LoRAGuidedImportance": "importance",
    "LoRAPruneConfig": "config",
    "LoRAPruner": "pruner",
    "LoRAMetaPruner": "metapruner",
    "build_graph": "graph",
    "count_parameters": "models",
    "prune": "train",
    "TrainConfig": "train",
    "save_pruned": "export",
    "load_pruned": "export",
    "merge_lora": "export",
    "LoRAPruneCallback": "callback",
    "load_model_and_tokenizer": "loading",
    "quantize_model": "quant",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
