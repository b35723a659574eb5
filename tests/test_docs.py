"""The README's own-loop snippet runs as written (on a tiny LLaMA standing in for the packaged model)."""

from __future__ import annotations

import re
from pathlib import Path

from tp_loraprune import count_parameters, load_pruned

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def test_readme_own_loop_snippet_runs_verbatim(tmp_path, monkeypatch):
    from test_cli import _tiny_model_and_tokenizer

    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _tiny_model_and_tokenizer)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet("## Use it in your own loop"), str(README), "exec"), namespace)
    assert len(namespace["loader"]) == 200
    dense = count_parameters(_tiny_model_and_tokenizer()[0])
    pruned = load_pruned(tmp_path / "pruned")
    assert count_parameters(pruned) < dense
    assert namespace["pruner"].step_count == 200
