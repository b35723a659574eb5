"""Per-architecture facts read from the model itself: where the attention projections are, head sizes,
and the attributes that must follow the weights after heads or channels are removed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from torch import nn

from .lora import base_layer
from .quant import quantization

# (query, key, value, output) child names of an attention module, by family.
ATTENTION_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # LLaMA, Mistral, Qwen2/3, Gemma, OPT uses out_proj below
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT
)

# Dotted paths relative to the attention module, for layouts that split q/k/v and o into sub-modules.
ATTENTION_PATHS: tuple[tuple[str, str, str, str], ...] = (
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT / RoBERTa-style encoders (BertAttention)
)

# Child names of fused q/k/v projections: one linear holds every head's q, k and v rows, so removing a head
# would need per-slice handling of that layer. Such models are refused instead of being pruned wrongly.
FUSED_QKV_NAMES: tuple[str, ...] = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack")

# (up, down) projections of an FFN relative to its owner, and the config attributes holding its width.
FFN_PATHS: tuple[tuple[str, str], ...] = (
    ("up_proj", "down_proj"),  # LLaMA-style gated MLP
    ("fc1", "fc2"),  # OPT decoder layer
    ("intermediate.dense", "output.dense"),  # BERT layer
)
FFN_WIDTH_ATTRIBUTES: tuple[str, ...] = ("intermediate_size", "ffn_dim")

# Families whose attention derives head_dim from hidden_size / num_attention_heads, ignoring config.head_dim:
# their config can describe pruned heads only while heads · head_dim still equals hidden_size.
HEAD_DIM_FROM_HIDDEN = ("bert", "roberta", "xlm-roberta", "opt")


@dataclass(frozen=True)
class AttentionLayout:
    """One attention block: its projections (LoRA wrappers or plain linears) and its head size."""

    name: str
    module: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    head_dim: int
    head_owner: nn.Module | None = None  # the module keeping head counts (BERT: `.self`), default `module`

    @property
    def num_heads(self) -> int:
        return cast(int, base_layer(self.q).out_features) // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return cast(int, base_layer(self.k).out_features) // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads


def _head_dim(module: nn.Module, config) -> int:
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or getattr(config, "head_dim", None)
    )
    if not head_dim:
        head_dim = config.hidden_size // config.num_attention_heads
    return int(head_dim)


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    current: object = module
    for part in path.split("."):
        current = getattr(current, part, None)
        if not isinstance(current, nn.Module):
            return None
    return current if isinstance(current, nn.Module) else None


def _owner(module: nn.Module, path: str) -> nn.Module:
    """The module holding the child named by the last part of `path` (relative to `module`)."""
    parent = path.rpartition(".")[0]
    return (_submodule(module, parent) if parent else None) or module


def attention_layouts(model: nn.Module) -> list[AttentionLayout]:
    """Every attention block of a Hugging Face model whose q/k/v/o projections are separate modules."""
    config = getattr(model, "config", None)
    layouts = []
    for name, module in model.named_modules():
        for q, k, v, o in ATTENTION_NAMES + ATTENTION_PATHS:
            qm, km, vm, om = (_submodule(module, n) for n in (q, k, v, o))
            if qm is not None and km is not None and vm is not None and om is not None:
                owner = _owner(module, q)
                layouts.append(AttentionLayout(name, module, qm, km, vm, om, _head_dim(owner, config), owner))
                break
    return layouts


def fused_qkv_modules(model: nn.Module) -> list[str]:
    """Qualified names of fused q/k/v projections (GPT-2 `c_attn`, Phi-3 `qkv_proj`, GPT-NeoX `query_key_value`)."""
    found = []
    for name, module in model.named_modules():
        for child in FUSED_QKV_NAMES:
            if isinstance(getattr(module, child, None), nn.Module):
                found.append(f"{name}.{child}" if name else child)
    return found


def check_supported(model: nn.Module) -> None:
    """Raise a ValueError for layouts that would be pruned wrongly (fused q/k/v projections)."""
    fused = fused_qkv_modules(model)
    if fused:
        more = f" (and {len(fused) - 1} more)" if len(fused) > 1 else ""
        raise ValueError(
            f"{type(model).__name__} has a fused q/k/v projection at {fused[0]!r}{more}: one linear layer holds the "
            "query, key and value rows of every head, so removing a head would need per-slice handling of that "
            "layer, which tp_loraprune does not do yet. Architectures with separate q/k/v projections (LLaMA, "
            "Mistral, Qwen2/3, Gemma, OPT, BERT) are supported; see docs/architectures.md."
        )


def sync_attention_attributes(model: nn.Module) -> None:
    """Make every attention module's head bookkeeping match its (possibly pruned) projections."""
    for a in attention_layouts(model):
        for module in {a.module, a.head_owner or a.module}:
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = a.group_size  # type: ignore[assignment]
            for attr, value in (
                ("num_heads", a.num_heads),
                ("num_key_value_heads", a.num_kv_heads),
                ("num_attention_heads", a.num_heads),  # BERT self-attention
                ("all_head_size", a.num_heads * a.head_dim),
            ):
                if hasattr(module, attr):
                    setattr(module, attr, value)


def mlp_widths(model: nn.Module) -> list[int]:
    """Intermediate width of each FFN: up/down (LLaMA), fc1/fc2 (OPT) or intermediate/output (BERT) projections."""
    widths = []
    for module in model.modules():
        for up, down in FFN_PATHS:
            up_m, down_m = _submodule(module, up), _submodule(module, down)
            width = getattr(base_layer(down_m), "in_features", None) if down_m is not None else None
            if up_m is not None and isinstance(width, int):
                widths.append(width)
                break
    return widths


def config_validates(config) -> bool:
    """Whether a HF config survives its own validation (as `save_pretrained` / `from_pretrained` run it)."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception:  # noqa: BLE001 - any validation failure means the config cannot describe the model
        return False
    return True


def sync_config(model: nn.Module) -> bool:
    """Write uniform head counts and FFN width into the HF config; returns False if layers differ.

    A config can describe only one width per attribute. When layers differ, the config keeps the
    original values and the model must be saved with `tp_loraprune.save_pruned`.
    """
    config = getattr(model, "config", None)
    if config is None:
        return True
    sync_attention_attributes(model)
    layouts = attention_layouts(model)
    uniform = True
    if layouts:
        heads = {(a.num_heads, a.num_kv_heads) for a in layouts}
        if len(heads) == 1:
            ((h, kv),) = heads
            d = layouts[0].head_dim
            if getattr(config, "model_type", None) in HEAD_DIM_FROM_HIDDEN:
                # head_dim is hidden_size / heads there: the config holds pruned heads only if that still holds
                if h * d != config.hidden_size:
                    uniform = False
            else:
                has_kv = hasattr(config, "num_key_value_heads")
                saved = (
                    getattr(config, "head_dim", None),
                    config.num_attention_heads,
                    config.num_key_value_heads if has_kv else None,
                )
                if saved[0] is None:
                    config.head_dim = d
                config.num_attention_heads = h
                if has_kv:
                    config.num_key_value_heads = kv
                if not config_validates(config):  # e.g. hidden_size no longer a multiple of the head count
                    config.head_dim, config.num_attention_heads = saved[:2]
                    if has_kv:
                        config.num_key_value_heads = saved[2]
                    uniform = False
        else:
            uniform = False
    widths = set(mlp_widths(model))
    width_attr = next((a for a in FFN_WIDTH_ATTRIBUTES if hasattr(config, a)), None)
    if len(widths) == 1 and width_attr is not None:
        setattr(config, width_attr, widths.pop())
        for module in model.modules():
            if hasattr(module, "down_proj") and hasattr(module, "intermediate_size"):
                module.intermediate_size = config.intermediate_size
    elif len(widths) > 1:
        uniform = False
    return uniform


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model: the longest ModuleList whose every entry holds one attention block.

    Raises ValueError for models with fused q/k/v projections (see `check_supported`).
    """
    check_supported(model)
    attention_modules = {a.module for a in attention_layouts(model)}
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if all(sum(m in attention_modules for m in block.modules()) == 1 for block in module):
                best = list(module)
    return best


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model itself, without LoRA factors (what remains after merging).

    A quantized weight counts its logical (out × in) elements, not its packed storage.
    """
    packed: dict[int, int] = {
        id(m.weight): cast(int, m.in_features) * cast(int, m.out_features)
        for m in model.modules()
        if quantization(m) is not None
    }
    return sum(packed.get(id(p), p.numel()) for name, p in model.named_parameters() if "lora_" not in name)
