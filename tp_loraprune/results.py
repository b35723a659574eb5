"""The quality table of evaluated models, in the columns and number formats of docs/benchmarks.md.

`tp-loraprune eval` prints it for one model and benchmarks/report.py builds the benchmark tables from the same
columns: parameters (M), GMACs per token, perplexity per set (one decimal), zero-shot accuracy per task in %
(no decimal) and their mean (one decimal); "–" marks what was not measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

PPL_LABELS = {"wikitext2": "WikiText-2 ppl", "ptb": "PTB ppl"}
MISSING = "–"


def fmt(x: float | None, digits: int = 1) -> str:
    return MISSING if x is None else f"{x:.{digits}f}"


def task_label(task: str) -> str:
    """The column name of an lm-eval task: piqa_local → piqa, arc_easy_local → arc-easy, winogrande → wino."""
    return task.replace("_local", "").replace("arc_", "arc-").replace("winogrande", "wino")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def quality_header(ppl_sets: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """Perplexity columns, then one column per zero-shot task and their mean (none without tasks)."""
    head = [PPL_LABELS.get(name, f"{name} ppl") for name in ppl_sets]
    return head + [task_label(t) for t in tasks] + (["zero-shot mean"] if tasks else [])


def quality_cells(result: dict, ppl_sets: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """The cells of `quality_header` for one result (`tp_loraprune.eval.evaluate`'s keys: "<set>_ppl",
    "zero_shot": {task: accuracy in [0, 1], "mean": ...})."""
    zero_shot = result.get("zero_shot") or {}
    cells = [fmt(result.get(f"{name}_ppl")) for name in ppl_sets]
    cells += [fmt(100 * zero_shot[t], 0) if t in zero_shot else MISSING for t in tasks]
    if tasks:
        cells.append(fmt(100 * zero_shot["mean"], 1) if "mean" in zero_shot else MISSING)
    return cells


def size_cells(parameters: int | None, macs_per_token: int | None) -> list[str]:
    """params (M) and GMACs/token."""
    return [
        fmt(None if parameters is None else parameters / 1e6, 1),
        fmt(None if macs_per_token is None else macs_per_token / 1e9, 3),
    ]


SIZE_HEADER = ["params (M)", "GMACs/token"]


def macs_per_token(model: nn.Module, seq_len: int) -> int:
    """Multiply-accumulates per token of a causal LM at `seq_len`: every linear layer (in × out) plus attention's
    two matmuls (q·k and p·v, heads × head_dim per attended position, (seq_len + 1) / 2 positions on average)."""
    from .conv1d import features, is_linear_like
    from .models import attention_layouts

    linear = 0
    for m in model.modules():
        if is_linear_like(m):
            out_features, in_features = features(m)
            linear += in_features * out_features
    attention = sum(2 * a.num_heads * a.head_dim * (seq_len + 1) // 2 for a in attention_layouts(model))
    return linear + attention
