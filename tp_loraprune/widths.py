"""What each decoder layer kept: read off the model, printed as a table, drawn as a plot.

The CLI prints the table at the end of a run, writes the plot next to the saved model and records the list in
the saved model's JSON, so the allocation a run chose (heads versus FFN channels, per layer) can be seen.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .conv1d import features, is_linear_like
from .lora import base_layer, lora_layers
from .models import attention_layouts, decoder_layers
from .moe import moe_layouts


def layer_widths(model: nn.Module) -> list[dict[str, int | None]]:
    """Per decoder layer: query heads, KV heads and FFN width (the input width of the layer's projection back
    into the residual stream; None when the layer has no FFN outside attention). Models with MoE layers also
    get their routed experts per layer and those experts' FFN width ("experts", "expert_ffn"; None elsewhere)."""
    layouts = attention_layouts(model)
    moe = moe_layouts(model)
    lora_parts = {
        m for layer in lora_layers(model).values() for m in layer.modules() if m not in (layer, base_layer(layer))
    }
    rows: list[dict[str, int | None]] = []
    for i, layer in enumerate(decoder_layers(model)):
        inside = set(layer.modules())
        attention = next((a for a in layouts if a.module in inside), None)
        attention_parts: set[nn.Module] = set()
        if attention is not None:
            for m in (attention.q, attention.k, attention.v, attention.o):
                attention_parts.update(m.modules())
        hidden = features(base_layer(attention.o))[0] if attention is not None else None
        ffn = [
            features(m)[1]
            for m in layer.modules()
            if is_linear_like(m) and m not in attention_parts | lora_parts and features(m)[0] == hidden
        ]
        rows.append(
            {
                "layer": i,
                "heads": attention.num_heads if attention is not None else None,
                "kv_heads": attention.num_kv_heads if attention is not None else None,
                "ffn": max(ffn) if ffn else None,
            }
        )
        if moe:
            block = next((b for b in moe if b.block in inside), None)
            rows[-1]["experts"] = block.num_experts if block is not None else None
            rows[-1]["expert_ffn"] = block.width if block is not None else None
    return rows


def format_table(before: list[dict], after: list[dict]) -> str:
    """A plain-text table of heads and FFN width per layer, before → after."""
    experts = any("experts" in a for a in after)
    lines = ["layer  heads (kv)      ffn" + ("        experts (ffn)" if experts else "")]
    for b, a in zip(before, after, strict=True):
        heads = (
            f"{b['heads']}->{a['heads']} ({a['kv_heads']})"
            if b["heads"] != a["heads"]
            else f"{a['heads']} ({a['kv_heads']})"
        )
        ffn = f"{b['ffn']}->{a['ffn']}" if b["ffn"] != a["ffn"] else f"{a['ffn']}"
        line = f"{a['layer']:>5}  {heads:<14}  {ffn}"
        if experts and a.get("experts") is not None:
            count = f"{b['experts']}->{a['experts']}" if b["experts"] != a["experts"] else f"{a['experts']}"
            width = (
                f"{b['expert_ffn']}->{a['expert_ffn']}" if b["expert_ffn"] != a["expert_ffn"] else f"{a['expert_ffn']}"
            )
            line = f"{line:<33}  {count} ({width})"
        lines.append(line)
    return "\n".join(lines)


def plot_widths(before: list[dict], after: list[dict], path: str | Path) -> bool:
    """Bars of kept heads and FFN width per layer (fraction of the original), saved to `path` as PNG.

    Returns False, writing nothing, when matplotlib is not installed (`pip install 'tp_loraprune[plot]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = [a["layer"] for a in after]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.3), 4.5), sharex=True)
    for ax, key, label in ((axes[0], "heads", "query heads"), (axes[1], "ffn", "FFN width")):
        kept = [a[key] or 0 for a in after]
        full = [b[key] or 0 for b in before]
        ax.bar(layers, full, color="#dddddd", label="original")
        ax.bar(layers, kept, color="#3b7dd8", label="kept")
        ax.set_ylabel(label)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].set_xlabel("decoder layer")
    fig.suptitle("What each layer kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
