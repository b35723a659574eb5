"""Every Python snippet of README.md and docs/*.md runs, as written, on a tiny model.

Each ```python block is extracted from its page and executed in a namespace that provides the names the page
leaves to the reader (`base_model`, `loader`, `tokenizer`, ...: a tiny LLaMA, a few batches, a real tokenizer).
What a CPU cannot do is replaced by plain text substitution, listed per snippet below ("cuda" → "cpu", a hub id →
a tiny model saved on disk); every other character runs. A snippet added to the docs without an entry here fails
`test_every_snippet_is_covered`, so a documented snippet can never again be silently wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import build_llama, save_tiny_hf, wrap_peft
from test_moe import _mixtral as tiny_mixtral
from test_moe import _stacked_experts_supported
from tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def _tiny_dir(tmp_path: Path) -> str:
    """A tiny LLaMA (and its tokenizer) saved as a Hugging Face directory, standing in for a hub id."""
    return str(save_tiny_hf(tmp_path / "tiny-hf", max_position_embeddings=256))


def _tiny_model(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_tiny_dir(tmp_path))


def _loader(n: int, vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _text_file(tmp_path: Path) -> str:
    from tp_loraprune.data import builtin_text_documents

    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(builtin_text_documents()[:20]))
    return str(path)


# (page, index among its python blocks) → (text substitutions, namespace builder(tmp_path) -> dict)
CASES = {
    ("api.md", 0): (
        [
            ("load_model_and_tokenizer()", "load_model_and_tokenizer(TINY)"),
            ("total_steps=40, prune_every=4", "total_steps=8, prune_every=2"),
            ("block_size=256", "block_size=32"),
        ],
        lambda tmp: {"TINY": _tiny_dir(tmp)},
    ),
    ("api.md", 1): ([], lambda tmp: {"peft_model": wrap_peft(build_llama()), "loader": _loader(30)}),
    ("api.md", 2): (  # also checked in depth by test_metapruner.py
        [],
        lambda tmp: {"model": wrap_peft(build_llama()), "batches": [b["input_ids"] for b in _loader(3)]},
    ),
    ("api.md", 3): (
        [("seq_len=512", "seq_len=64"), ("block_size=256", "block_size=32")],
        lambda tmp: {"model": _tiny_model(tmp), "tokenizer": tiny_tokenizer()},
    ),
    ("quickstart.md", 1): (
        [],
        lambda tmp: {"base_model": _tiny_model(tmp), "loader": _loader(40), "tokenizer": tiny_tokenizer()},
    ),
    ("quickstart.md", 0): (  # reloads a pruned model: here the one the training snippet saves
        [('"runs/smollm2-pruned"', '"pruned-model"')],
        lambda tmp: _saved_pruned(tmp),
    ),
    ("quantized.md", 0): (
        [
            ('"path/or/hub-id"', "TINY"),
            ('device="cuda"', 'device="cpu"'),
            ('precision="bf16"', 'precision="fp32"'),
            ("dtype=torch.bfloat16", "dtype=torch.float32"),
            ('"../shared/data/calibration/c4_demo.jsonl"', "TEXT"),
            ("total_steps=200", "total_steps=20"),
        ],
        lambda tmp: {"TINY": _tiny_dir(tmp), "TEXT": _text_file(tmp)},
    ),
    ("distributed.md", 0): (
        [('init_from_env("cuda")', 'init_from_env("cpu")')],
        lambda tmp: {"torch": torch, "peft_model": wrap_peft(build_llama()), "loader": _loader(30)},
    ),
    ("distributed.md", 1): (
        [("torch.bfloat16", "torch.float32")],
        lambda tmp: {"path": _tiny_dir(tmp)},
    ),
    ("architectures.md", 0): (
        [],
        lambda tmp: {"moe_model": tiny_mixtral(), "loader": _loader(40), "tokenizer": tiny_tokenizer()},
    ),
}


ONLY_SETUP = {("distributed.md", 1)}  # builds the pruner; its loop is a comment


def _saved_pruned(tmp: Path) -> dict:
    """Run quickstart's training snippet first: it saves "pruned-model", which the loading snippet reads."""
    code, namespace = _prepared("quickstart.md", 1, tmp)
    exec(compile(code, "quickstart.md[1]", "exec"), namespace)
    return {}


def _prepared(page_name: str, index: int, tmp: Path) -> tuple[str, dict]:
    page = next(p for p in PAGES if p.name == page_name)
    code = snippets(page)[index]
    substitutions, namespace = CASES[(page_name, index)]
    for old, new in substitutions:
        if old not in code:
            raise AssertionError(f"{page_name} snippet {index} no longer contains {old!r}; update CASES.")
        code = code.replace(old, new)
    return code, namespace(tmp)


# snippets that another test module runs as written
ELSEWHERE = {("README.md", 0): "tests/test_docs.py"}


def test_every_snippet_is_covered():
    found = {(p.name, i) for p in PAGES for i in range(len(snippets(p)))}
    covered = set(CASES) | set(ELSEWHERE)
    assert found == covered, f"snippets without a test: {sorted(found - covered)}"
    assert all((ROOT / path).is_file() for path in ELSEWHERE.values())


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: f"{c[0]}[{c[1]}]")
def test_snippet_runs(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if case == ("quantized.md", 0):
        pytest.importorskip("bitsandbytes", reason="the quantized-base snippet needs the quant extra")
    if case == ("architectures.md", 0) and not _stacked_experts_supported():
        pytest.skip("the MoE snippet needs transformers >= 5 and peft with target_parameters (>= 0.17)")
    if case == ("distributed.md", 0):  # a one-rank gloo group: the snippet's DDP calls need a process group
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        monkeypatch.setenv("WORLD_SIZE", "1")
    try:
        code, namespace = _prepared(*case, tmp_path)
        exec(compile(code, f"{case[0]}[{case[1]}]", "exec"), namespace)
    finally:
        if case == ("distributed.md", 0):
            import torch.distributed as dist

            dist.destroy_process_group()
    if "pruner" in namespace and case not in ONLY_SETUP:
        assert namespace["pruner"].events, "the snippet's pruner never pruned"
