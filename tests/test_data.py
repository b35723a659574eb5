"""Tests for tp_loraprune.data: reading documents and cutting token blocks (CPU, no downloads)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from tp_loraprune.data import (
    builtin_text_documents,
    read_text_documents,
    split_holdout,
    token_blocks,
)

try:
    from tiny_tokenizer import tiny_tokenizer
except ImportError:  # tests/ imported as a package
    from tests.tiny_tokenizer import tiny_tokenizer


def _write_jsonl(path, rows, *, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def test_builtin_documents_are_real_text():
    docs = builtin_text_documents()
    assert len(docs) > 50
    assert all(isinstance(d, str) and d for d in docs)
    assert read_text_documents("builtin") == docs
    assert read_text_documents("builtin", max_documents=3) == docs[:3]


def test_read_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nline two\n\n\nsecond doc\n   \nthird\n", encoding="utf-8")
    assert read_text_documents(path) == ["first doc\nline two", "second doc", "third"]
    assert read_text_documents(str(path), max_documents=2) == ["first doc\nline two", "second doc"]


@pytest.mark.parametrize("gz", [False, True])
def test_read_jsonl_text_and_sentence(tmp_path, gz):
    name = "rows.jsonl.gz" if gz else "rows.jsonl"
    path = _write_jsonl(tmp_path / name, [{"text": "alpha"}, {"text": "  "}, {"sentence": "beta"}], gz=gz)
    assert read_text_documents(path) == ["alpha", "beta"]


def test_read_jsonl_alpaca_rows(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    docs = read_text_documents(_write_jsonl(tmp_path / "alpaca.jsonl.gz", rows, gz=True))
    assert docs == [
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
        "### Instruction:\nSay hi.\n\n### Response:\nHi!",
    ]


def test_read_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_text_documents(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="does not exist"):
        read_text_documents(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        read_text_documents(empty)
    with pytest.raises(ValueError, match="is a directory"):
        read_text_documents(tmp_path)
    with pytest.raises(ValueError, match="no text field"):
        read_text_documents(_write_jsonl(tmp_path / "bad.jsonl", [{"title": "x"}]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_text_documents(broken)
    other = tmp_path / "data.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_text_documents(other)


def test_token_blocks_are_the_concatenated_stream():
    tok = tiny_tokenizer()
    docs = builtin_text_documents()[:5]
    blocks = token_blocks(docs, tok, block_size=32)
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(tok.eos_token_id)
        stream += tok(doc, add_special_tokens=False)["input_ids"]
    n = len(stream) // 32
    assert blocks.dtype == torch.long and blocks.shape == (n, 32)
    assert blocks.flatten().tolist() == stream[: n * 32]

    few = token_blocks(docs, tok, block_size=32, max_blocks=3)
    assert torch.equal(few, blocks[:3])


def test_token_blocks_too_little_text():
    with pytest.raises(ValueError, match="only 2 tokens"):
        token_blocks(["ab"], tiny_tokenizer(), block_size=64)
    with pytest.raises(ValueError, match="block_size"):
        token_blocks(["ab"], tiny_tokenizer(), block_size=0)


def test_split_holdout():
    blocks = torch.arange(20).view(5, 4)
    train, held = split_holdout(blocks, 2)
    assert torch.equal(train, blocks[:3]) and torch.equal(held, blocks[3:])
    train, held = split_holdout(blocks, 0)
    assert len(train) == 5 and len(held) == 0
    with pytest.raises(ValueError, match="cannot hold out 5 of 5"):
        split_holdout(blocks, 5)
    with pytest.raises(ValueError, match=">= 0"):
        split_holdout(blocks, -1)
