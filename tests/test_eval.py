"""Tests for tp_loraprune.eval: perplexity protocol, paper test texts, lm-eval zero-shot (CPU)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tp_loraprune.data import builtin_text_documents  # noqa: E402
from tp_loraprune.eval import evaluate, find_data_dir, perplexity, perplexity_text, zero_shot  # noqa: E402

try:
    from tiny_tokenizer import tiny_tokenizer
except ImportError:  # tests/ imported as a package
    from tests.tiny_tokenizer import tiny_tokenizer

DATA_DIR = find_data_dir()
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="evaluation data dir (shared/data) not found")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def test_perplexity_matches_reference(tiny_llama, tok):
    text = "\n\n".join(builtin_text_documents()[:3])
    seq_len, max_windows = 16, 7
    ids = tok(text, return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        tiny_llama.eval()
        for w in range(max_windows):
            window = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
            logits = tiny_llama(window).logits[0]
            nll += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
            count += seq_len - 1
    expected = math.exp(nll / count)

    tiny_llama.train()
    got = perplexity(tiny_llama, tok, text, seq_len=seq_len, batch_size=3, max_windows=max_windows)
    assert got == pytest.approx(expected, rel=1e-5)
    assert tiny_llama.training, "perplexity must restore the model's train mode"
    # a random model over a 512-token vocab: perplexity is near the vocab size
    assert 100 < got < 2000


def test_perplexity_errors(tiny_llama, tok):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama, tok, "short text", seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(tiny_llama, tok, "short text", seq_len=1)


def test_find_data_dir(tmp_path, monkeypatch):
    assert find_data_dir(tmp_path) == tmp_path.resolve()
    assert find_data_dir(tmp_path / "absent") is None
    monkeypatch.setenv("TP_LORAPRUNE_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path.resolve()
    monkeypatch.delenv("TP_LORAPRUNE_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert find_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_perplexity_text_errors(tmp_path):
    with pytest.raises(ValueError, match="TP_LORAPRUNE_DATA"):
        perplexity_text("wikitext2", data_dir=tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown perplexity dataset"):
        perplexity_text("c4", data_dir=tmp_path)
    with pytest.raises(ValueError, match="test file missing"):
        perplexity_text("ptb", data_dir=tmp_path)


@needs_data
def test_perplexity_text_real_data():
    wiki = perplexity_text("wikitext2")
    assert len(wiki) == 1_294_336  # stated in shared/data/README.md
    assert " = Robert Boulter = " in wiki[:100]
    ptb = perplexity_text("ptb", data_dir=DATA_DIR)
    # README: ptb_text_only "sentence" = the line of the Mikolov ptb.test.txt, stripped (3,761 lines)
    lines = (DATA_DIR / "ptb" / "ptb.test.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3761 and ptb == " ".join(line.strip() for line in lines)


@needs_data
def test_evaluate_ppl_only(tiny_llama, tok):
    report = evaluate(tiny_llama, tok, seq_len=64, max_windows=2)
    assert set(report) == {"wikitext2_ppl", "ptb_ppl", "seq_len"}
    assert report["seq_len"] == 64 and all(report[k] > 1 for k in ("wikitext2_ppl", "ptb_ppl"))


@needs_data
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_zero_shot_tiny_model(tiny_llama, tok):
    cwd = os.getcwd()
    scores = zero_shot(tiny_llama, tok, tasks=["piqa_local", "arc_easy_local"], limit=4, batch_size=4)
    assert os.getcwd() == cwd
    assert set(scores) == {"piqa_local", "arc_easy_local", "mean"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores["mean"] == pytest.approx((scores["piqa_local"] + scores["arc_easy_local"]) / 2)


def test_zero_shot_missing_data(tiny_llama, tok, tmp_path):
    with pytest.raises(ValueError, match="TP_LORAPRUNE_DATA"):
        zero_shot(tiny_llama, tok, tasks=["piqa_local"], data_dir=tmp_path / "absent")


def test_import_is_lazy():
    code = (
        "import sys, tp_loraprune.eval, tp_loraprune.data; "
        "print(sorted(m for m in ('lm_eval', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
