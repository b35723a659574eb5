"""Per-architecture facts read from the model itself: where the attention projections are, head sizes,
and the attributes that must follow the weights after heads or channels are removed."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .lora import base_layer

# (query, key, value, output) child names of an attention module, by family.
ATTENTION_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # LLaMA, Mistral, Qwen2/3, Gemma, OPT uses out_proj below
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT
)


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

    @property
    def num_heads(self) -> int:
        return base_layer(self.q).out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return base_layer(self.k).out_features // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads


def _head_dim(module: nn.Module, config) -> int:
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    if not head_dim:
        head_dim = config.hidden_size // config.num_attention_heads
    return int(head_dim)


def attention_layouts(model: nn.Module) -> list[AttentionLayout]:
    """Every attention block of a Hugging Face model whose q/k/v/o projections are separate modules."""
    config = getattr(model, "config", None)
    layouts = []
    for name, module in model.named_modules():
        for q, k, v, o in ATTENTION_NAMES:
            if all(isinstance(getattr(module, n, None), nn.Module) for n in (q, k, v, o)):
                layouts.append(
                    AttentionLayout(
                        name, module, getattr(module, q), getattr(module, k), getattr(module, v),
                        getattr(module, o), _head_dim(module, config),
                    )
                )
                break
    return layouts


def sync_attention_attributes(model: nn.Module) -> None:
    """Make every attention module's head bookkeeping match its (possibly pruned) projections."""
    for a in attention_layouts(model):
        if hasattr(a.module, "num_key_value_groups"):
            a.module.num_key_value_groups = a.group_size
        for attr, value in (("num_heads", a.num_heads), ("num_key_value_heads", a.num_kv_heads)):
            if hasattr(a.module, attr):
                setattr(a.module, attr, value)


def mlp_widths(model: nn.Module) -> list[int]:
    """Intermediate width of each decoder MLP that has gate/up/down or fc1/fc2-style projections."""
    widths = []
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        if isinstance(down, nn.Module) and hasattr(module, "up_proj"):
            widths.append(base_layer(down).in_features)
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
            (h, kv), = heads
            saved = (getattr(config, "head_dim", None), config.num_attention_heads, config.num_key_value_heads)
            if saved[0] is None:
                config.head_dim = layouts[0].head_dim
            config.num_attention_heads, config.num_key_value_heads = h, kv
            if not config_validates(config):  # e.g. hidden_size no longer a multiple of the head count
                config.head_dim, config.num_attention_heads, config.num_key_value_heads = saved
                uniform = False
        else:
            uniform = False
    widths = set(mlp_widths(model))
    if len(widths) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths.pop()
        for module in model.modules():
            if hasattr(module, "down_proj") and hasattr(module, "intermediate_size"):
                module.intermediate_size = config.intermediate_size
    elif len(widths) > 1:
        uniform = False
    return uniform


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model: the longest ModuleList whose every entry holds one attention block."""
    attention_modules = {a.module for a in attention_layouts(model)}
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if all(sum(m in attention_modules for m in block.modules()) == 1 for block in module):
                best = list(module)
    return best


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model itself, without LoRA factors (what remains after merging)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
