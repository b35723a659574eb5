"""Fine-tuning text: read documents, turn them into fixed-length token blocks.

Sources understood by :func:`read_text_documents`:

* ``"builtin"`` - the English reference text that ships with CPython
  (``pydoc_data.topics``), an offline default that needs no download;
* a ``.txt`` file - documents separated by blank lines;
* a ``.jsonl`` / ``.jsonl.gz`` file - one JSON object per line with a ``text`` field, a ``sentence``
  field, or Alpaca ``instruction`` / ``input`` / ``output`` fields (formatted as an Alpaca prompt);
* any other string that is not an existing path - a Hugging Face dataset name, loaded with
  ``datasets.load_dataset(name, split="train")`` (``datasets`` is imported only then).

This module is cheap to import: it needs only the standard library and torch.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["builtin_text_documents", "read_text_documents", "token_blocks", "split_holdout"]

_FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


def builtin_text_documents() -> list[str]:
    """Return the ~79 English help documents of CPython's ``pydoc_data.topics`` (always available)."""
    from pydoc_data.topics import topics

    return [text.strip() for _, text in sorted(topics.items()) if text.strip()]


def alpaca_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """Format one Alpaca instruction pair; the ``### Input:`` section is left out when ``input`` is empty."""
    parts = [f"### Instruction:\n{instruction.strip()}"]
    if input.strip():
        parts.append(f"### Input:\n{input.strip()}")
    parts.append(f"### Response:\n{output.strip()}")
    return "\n\n".join(parts)


def _row_text(row: Any, path: Path, line_no: int) -> str:
    if not isinstance(row, dict):
        raise ValueError(
            f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}; "
            'write one object per line, e.g. {"text": "..."}.'
        )
    if "text" in row:
        return str(row["text"])
    if "sentence" in row:
        return str(row["sentence"])
    if "instruction" in row and "output" in row:
        return alpaca_prompt(str(row["instruction"]), str(row.get("input") or ""), str(row["output"]))
    raise ValueError(
        f"{path}, line {line_no}: no text field (keys: {sorted(row)}); each row needs 'text', 'sentence', "
        "or Alpaca 'instruction'/'input'/'output'."
    )


def _read_jsonl(path: Path, max_documents: int | None) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    documents: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: not valid JSON ({e}); fix or remove that line.") from e
            text = _row_text(row, path, line_no).strip()
            if text:
                documents.append(text)
            if max_documents is not None and len(documents) >= max_documents:
                break
    return documents


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")  # what huggingface_hub counts as true


def hub_offline(variables: Iterable[str] = OFFLINE_VARIABLES) -> str | None:
    """'NAME=value' of the first Hugging Face offline variable set to a true value (1/on/yes/true), or None."""
    for name in variables:
        value = os.environ.get(name, "")
        if value.strip().upper() in _TRUE:
            return f"{name}={value}"
    return None


def _read_hub_dataset(name: str, max_documents: int | None) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"{name!r} is not an existing file, so it was taken as a Hugging Face dataset name, but the "
            "'datasets' package is not installed; pass a .txt/.jsonl/.jsonl.gz path or 'builtin', "
            "or install it (pip install datasets)."
        ) from e
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - the hub/loader raises many types; report them all the same way
        offline = hub_offline(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = f"{offline} forbids the hub and it is not cached" if offline else f"{type(e).__name__}: {e}"
        raise ValueError(
            f"{name!r} is not an existing file and could not be loaded as a Hugging Face dataset "
            f"({why}); pass an existing .txt/.jsonl/.jsonl.gz path or 'builtin'."
        ) from e
    if "text" not in dataset.column_names:
        raise ValueError(
            f"Hugging Face dataset {name!r} has no 'text' column (columns: {dataset.column_names}); "
            "export it to a .jsonl file with a 'text' field and pass that path instead."
        )
    if max_documents is not None:
        dataset = dataset.select(range(min(max_documents, len(dataset))))
    return [t.strip() for t in dataset["text"] if t and t.strip()]


def read_text_documents(source: str | os.PathLike[str], *, max_documents: int | None = None) -> list[str]:
    """Read fine-tuning documents from ``source`` (see the module docstring for what is accepted).

    Empty documents are dropped; ``max_documents`` keeps only the first ones.
    Raises ValueError when the source is missing, a directory, unreadable or yields no text.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1 or None, got {max_documents}.")
    if isinstance(source, str) and source == "builtin":
        documents = builtin_text_documents()
    else:
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; pass one .txt, .jsonl or .jsonl.gz file inside it instead.")
        if path.is_file():
            name = path.name.lower()
            try:
                if name.endswith(".txt"):
                    text = path.read_text(encoding="utf-8")
                    documents = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
                elif name.endswith((".jsonl", ".jsonl.gz")):
                    documents = _read_jsonl(path, max_documents)
                else:
                    raise ValueError(f"{path}: unsupported file type; use one of {', '.join(_FILE_SUFFIXES)}.")
            except (OSError, UnicodeDecodeError, EOFError) as e:
                raise ValueError(
                    f"{path} could not be read ({type(e).__name__}: {e}); check the file is UTF-8 text "
                    "(gzip-compressed for .gz) and readable."
                ) from e
        elif not isinstance(source, str) or source.lower().endswith(_FILE_SUFFIXES):
            raise ValueError(f"{path} does not exist; check the path (relative to {Path.cwd()}).")
        else:
            documents = _read_hub_dataset(source, max_documents)
    if not documents:
        raise ValueError(
            f"{source} contains no text (no non-empty documents); pass a source with at least one document."
        )
    return documents[:max_documents] if max_documents is not None else documents


def token_blocks(
    documents: Iterable[str], tokenizer: Any, *, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Tokenize documents into one stream (eos between documents) and cut it into blocks.

    Returns a LongTensor of shape ``(n, block_size)``: non-overlapping consecutive blocks of the
    stream, the incomplete remainder dropped, at most ``max_blocks`` of them (tokenizing stops early
    once enough tokens are there). Raises ValueError when not even one block results.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token_id, needed between documents; "
            "set tokenizer.eos_token first."
        )
    wanted = None if max_blocks is None else max_blocks * block_size
    stream: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            stream.append(eos)
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if wanted is not None and len(stream) >= wanted:
            break
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise ValueError(
            f"the documents give only {len(stream)} tokens, fewer than one block of {block_size}; "
            "use more text or a smaller block_size."
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def split_holdout(blocks: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split blocks into ``(train, heldout)``; the last ``holdout`` blocks are held out (deterministic)."""
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}.")
    if holdout >= len(blocks):
        raise ValueError(
            f"cannot hold out {holdout} of {len(blocks)} blocks and keep at least one for training; "
            "lower holdout or provide more text."
        )
    cut = len(blocks) - holdout
    return blocks[:cut], blocks[cut:]
