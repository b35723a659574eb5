"""Per-architecture facts read from the model itself: where the attention projections are, head sizes,
and the attributes that must follow the weights after heads or channels are removed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from .conv1d import features, is_linear_like
from .fused import DECLARED_FFN, FUSED_ATTENTION, FUSED_REFUSED, FusedQKV, fused_attention_spec, set_layer_heads
from .head_parameters import HeadExtras, head_extras
from .lora import base_layer
from .mla import mla_modules
from .moe import MoELayout, moe_layouts, sync_moe_config
from .quant import quantization

# (query, key, value, output) child names of an attention module, by family.
ATTENTION_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # LLaMA, Mistral, Qwen2/3, Gemma, OPT uses out_proj below
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT
    ("q_proj", "k_proj", "v_proj", "dense"),  # Phi
    ("q_proj", "k_proj", "v_proj", "Wo"),  # ModernBERT decoder
)

# Dotted paths relative to the attention module, for layouts that split q/k/v and o into sub-modules.
ATTENTION_PATHS: tuple[tuple[str, str, str, str], ...] = (
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT / RoBERTa-style encoders (BertAttention)
    ("attention.query", "attention.key", "attention.value", "output.dense"),  # ViT on transformers 4.x
)

# Child names of fused projections: one linear holds several heads' q, k and v rows (or an FFN's gate and up
# rows). Only the classes in `tp_loraprune.fused` have a known row layout; other owners are refused.
FUSED_QKV_NAMES: tuple[str, ...] = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack")
FUSED_FFN_NAMES: tuple[str, ...] = ("gate_up_proj", "Wi")

# (up, down) projections of an FFN relative to its owner, and the config attributes holding its width.
FFN_PATHS: tuple[tuple[str, str], ...] = (
    ("up_proj", "down_proj"),  # LLaMA-style gated MLP
    ("fc1", "fc2"),  # OPT decoder layer
    ("intermediate.dense", "output.dense"),  # BERT layer
    ("gate_up_proj", "down_proj"),  # Phi-3 (gate and up rows fused)
    ("Wi", "Wo"),  # ModernBERT decoder (input and gate rows fused)
    ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX
    ("c_fc", "c_proj"),  # GPT-2 (Conv1D)
)
FFN_WIDTH_ATTRIBUTES: tuple[str, ...] = ("intermediate_size", "ffn_dim", "n_inner")

# Families known to derive head_dim from hidden_size / num_attention_heads, ignoring config.head_dim (any other
# family is probed once, `honours_head_dim`): their config can describe pruned heads only while heads · head_dim
# still equals hidden_size.
HEAD_DIM_FROM_HIDDEN = ("bert", "roberta", "xlm-roberta", "opt", "gpt2", "gpt_neox")
_HONOURS_HEAD_DIM: dict[type, bool] = {}


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
    fused: FusedQKV | None = None  # q, k and v are one module (`q is k is v`) with this row layout

    @property
    def num_heads(self) -> int:
        if self.fused is not None:  # the output projection's input holds exactly the query heads
            return features(base_layer(self.o))[1] // self.head_dim
        return features(base_layer(self.q))[0] // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        if self.fused is not None:  # rows = (heads + 2 · kv heads) · head_dim
            return (features(base_layer(self.q))[0] // self.head_dim - self.num_heads) // 2
        return features(base_layer(self.k))[0] // self.head_dim

    def rows(self, heads: list[int], kv_heads: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Output-channel indices, in `q`, `k` and `v` respectively, of some query heads and KV heads."""
        d = self.head_dim
        if self.fused is not None:
            return self.fused.rows(heads, kv_heads, self.num_heads, self.num_kv_heads, d)
        q = [h * d + j for h in heads for j in range(d)]
        kv = [g * d + j for g in kv_heads for j in range(d)]
        return q, kv, list(kv)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def extras(self) -> HeadExtras:
        """The block's parameters outside its projections, by how they follow removed heads."""
        owner = self.head_owner or self.module
        return head_extras(owner, (self.q, self.k, self.v, self.o), self.num_heads, self.num_kv_heads, self.head_dim)

    def inconsistency(self) -> str | None:
        """Why the projections do not describe whole heads of size `head_dim` (None when they do)."""
        odd = [
            type(base_layer(m)).__name__ for m in (self.q, self.k, self.v, self.o) if not is_linear_like(base_layer(m))
        ]
        if odd:
            return f"has projections that are not linear layers ({', '.join(sorted(set(odd)))})"
        d = self.head_dim
        q_rows, o_cols = features(base_layer(self.q))[0], features(base_layer(self.o))[1]
        if self.fused is None:
            k_rows, v_rows = features(base_layer(self.k))[0], features(base_layer(self.v))[0]
            if q_rows != o_cols or k_rows != v_rows or q_rows % d or k_rows % d or k_rows == 0:
                return (
                    f"has q/k/v projections of {q_rows}/{k_rows}/{v_rows} output rows and an output projection of "
                    f"{o_cols} input columns, which are not whole heads of size {d} (q rows = output columns, "
                    "k rows = v rows)"
                )
        elif o_cols % d or (q_rows - o_cols) % (2 * d) or q_rows <= o_cols:
            return f"has a fused projection of {q_rows} rows and an output projection of {o_cols} columns (head {d})"
        if self.num_heads % self.num_kv_heads:
            return f"has {self.num_heads} query heads, not a multiple of its {self.num_kv_heads} KV heads"
        return None


def text_config(config):
    """The config describing the text decoder: the config itself, or a multimodal config's text part."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else None
    return text if text is not None else config


def _head_dim(module: nn.Module, config) -> int:
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or getattr(module, "head_size", None)
        or getattr(config, "head_dim", None)
    )
    if not head_dim:
        config = text_config(config)
        head_dim = config.hidden_size // config.num_attention_heads
    return int(head_dim)


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    """The registered sub-module at a dotted path, or None (a dict lookup per part: this runs for every module
    of the model and every known path at each prune event, where `getattr` with a miss costs an exception)."""
    current = module
    for part in path.split("."):
        child = current._modules.get(part)
        if child is None:
            return None
        current = child
    return current


def _owner(module: nn.Module, path: str) -> nn.Module:
    """The module holding the child named by the last part of `path` (relative to `module`)."""
    parent = path.rpartition(".")[0]
    return (_submodule(module, parent) if parent else None) or module


def attention_layouts(model: nn.Module) -> list[AttentionLayout]:
    """Every attention block of a Hugging Face model: separate q/k/v/o projections, or a known fused layout."""
    config = getattr(model, "config", None)
    layouts = []
    for name, module in model.named_modules():
        spec = fused_attention_spec(module)
        if spec is not None:
            qkv, o = getattr(module, spec.qkv), getattr(module, spec.o)
            layouts.append(AttentionLayout(name, module, qkv, qkv, qkv, o, _head_dim(module, config), module, spec))
            continue
        for q, k, v, o in ATTENTION_NAMES + ATTENTION_PATHS:
            qm, km, vm, om = (_submodule(module, n) for n in (q, k, v, o))
            if qm is not None and km is not None and vm is not None and om is not None:
                owner = _owner(module, q)
                layouts.append(AttentionLayout(name, module, qm, km, vm, om, _head_dim(owner, config), owner))
                break
    return layouts


def unsupported_fused_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(qualified name, owner class) of fused projections whose owner has no declared row layout, in the language
    model (the towers of other modalities are never pruned)."""
    found = []
    inside = set(language_model(model).modules())
    for name, module in model.named_modules():
        if module not in inside or any(word in name.lower() for word in TOWER_WORDS):
            continue
        known = fused_attention_spec(module) is not None or type(module).__name__ in DECLARED_FFN
        for child in FUSED_QKV_NAMES + FUSED_FFN_NAMES:
            if not known and isinstance(getattr(module, child, None), nn.Module):
                found.append((f"{name}.{child}" if name else child, type(module).__name__))
    return found


def check_supported(model: nn.Module) -> None:
    """Raise a ValueError for what LoRAPruner cannot prune correctly (`tp_loraprune.support.check_supported`)."""
    from .support import check_supported as check

    check(model)


def check_fused(model: nn.Module) -> None:
    """Raise a ValueError for fused projections whose row layout is unknown (they would be pruned wrongly)."""
    fused = unsupported_fused_modules(model)
    if fused:
        (where, owner), more = fused[0], f" (and {len(fused) - 1} more)" if len(fused) > 1 else ""
        known = ", ".join(f"{c}.{v.qkv}" if isinstance(v, FusedQKV) else c for c, v in FUSED_ATTENTION.items())
        known_ffn = ", ".join(f"{cls}.{up}" for cls, (up, _, _) in DECLARED_FFN.items())
        from .support import model_class_name, shown

        if owner in FUSED_REFUSED:
            raise ValueError(
                f"{model_class_name(model)}: the attention block {owner} at {shown(where.rpartition('.')[0])!r} "
                f"cannot lose heads exactly: {FUSED_REFUSED[owner]}. See docs/architectures.md."
            )
        raise ValueError(
            f"{model_class_name(model)} has a fused q/k/v projection at {shown(where)!r}{more} in {owner}, whose row "
            "layout tp_loraprune does not know: one linear layer holds several heads' rows, and removing a head needs "
            f"per-slice handling with the exact layout. Known fused layouts: {known} (FFN: {known_ffn}); "
            "architectures with separate q/k/v projections are supported too. See docs/architectures.md."
        )


def sync_attention_attributes(model: nn.Module, layouts: list[AttentionLayout] | None = None) -> None:
    """Make every attention module's head bookkeeping match its (possibly pruned) projections (`layouts`: the
    model's attention layouts when the caller has them already)."""
    for a in attention_layouts(model) if layouts is None else layouts:
        if a.fused is not None and a.fused.config_heads:
            set_layer_heads(a.module, a.num_heads, a.num_kv_heads)
        for module in {a.module, a.head_owner or a.module}:
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = a.group_size  # type: ignore[assignment]
            for attr, value in (
                ("num_heads", a.num_heads),
                ("num_key_value_heads", a.num_kv_heads),
                ("num_attention_heads", a.num_heads),  # BERT self-attention
                ("all_head_size", a.num_heads * a.head_dim),
                ("split_size", a.num_heads * a.head_dim),  # GPT-2: c_attn's output is split in three of this width
                ("embed_dim", a.num_heads * a.head_dim),  # XGLM: the attention output is reshaped to this width
                ("hidden_size", a.num_heads * a.head_dim),  # the same in transformers 4 (StableLM, Open-LLaMA)
                ("num_kv_heads", a.num_kv_heads),  # Falcon
            ):
                if hasattr(module, attr):
                    setattr(module, attr, value)


def ffn_down_projections(model: nn.Module, skip: set[nn.Module] | None = None) -> list[nn.Module]:
    """The down projection of each FFN (`FFN_PATHS`), leaving out the modules in `skip`."""
    downs = []
    for module in model.modules():
        if skip and module in skip:
            continue
        for up, down in FFN_PATHS:
            up_m, down_m = _submodule(module, up), _submodule(module, down)
            if up_m is not None and down_m is not None and is_linear_like(base_layer(down_m)):
                downs.append(down_m)
                break
    return downs


def mlp_widths(model: nn.Module, skip: set[nn.Module] | None = None) -> list[int]:
    """Intermediate width of each FFN (the input width of its down projection), leaving out the modules in
    `skip`."""
    return [features(base_layer(d))[1] for d in ffn_down_projections(model, skip)]


@dataclass(frozen=True)
class Structure:
    """Where `sync_config` finds a model's heads and widths. Found once by `model_structure`; it stays valid while
    pruning, which replaces parameters but never modules (the layouts read their head counts from the weights)."""

    attention: list[AttentionLayout]  # every attention block
    moe: list[MoELayout]  # every declared MoE block
    moe_modules: set[nn.Module]  # the modules inside them
    ffn_downs: list[nn.Module]  # the down projection of every FFN of the language model outside the MoE blocks


def model_structure(model: nn.Module) -> Structure:
    moe = moe_layouts(model)
    inside = {m for layout in moe for m in layout.block.modules()}
    return Structure(attention_layouts(model), moe, inside, ffn_down_projections(language_model(model), inside))


def honours_head_dim(model: nn.Module) -> bool:
    """Whether the model's class sizes its heads by `config.head_dim` (rather than hidden_size / heads): a
    one-layer copy is built on the meta device with a head size that differs from hidden_size / heads, once
    per class."""
    import copy

    import torch

    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    cls, config = type(base), getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) in HEAD_DIM_FROM_HIDDEN:
        return False
    if cls not in _HONOURS_HEAD_DIM:
        honours = False
        try:
            probe = copy.deepcopy(config)
            text = text_config(probe)
            heads = text.num_attention_heads
            text.head_dim = 2 * (text.hidden_size // heads)  # even (rotary halves it), never hidden / heads
            text.num_hidden_layers = 1
            with torch.device("meta"):
                built = cls(probe)
            inside = set(language_model(built).modules())
            layouts = [a for a in attention_layouts(built) if a.module in inside]
            honours = bool(layouts) and features(base_layer(layouts[0].o))[1] == heads * text.head_dim
        except Exception:  # noqa: BLE001 - a class that cannot be built this way is treated as not honouring it
            honours = False
        _HONOURS_HEAD_DIM[cls] = honours
    return _HONOURS_HEAD_DIM[cls]


def config_validates(config) -> bool:
    """Whether a HF config survives its own validation (as `save_pretrained` / `from_pretrained` run it)."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception:  # noqa: BLE001 - any validation failure means the config cannot describe the model
        return False
    return True


def sync_config(model: nn.Module, structure: Structure | None = None) -> bool:
    """Write uniform head counts and FFN width into the HF config; returns False if layers differ.

    A config can describe only one width per attribute. When layers differ, the config keeps the
    original values and the model must be saved with `tp_loraprune.save_pruned`. `structure`: the model's
    `model_structure` when the caller has it already (the pruner, at every prune event).
    """
    config = getattr(model, "config", None)
    if config is None:
        return True
    config = text_config(config)
    structure = model_structure(model) if structure is None else structure
    every = structure.attention
    sync_attention_attributes(model, every)
    inside = set(language_model(model).modules())
    layouts = [a for a in every if a.module in inside]  # the text decoder's heads go into the (text) config
    uniform = True
    if layouts:
        heads = {(a.num_heads, a.num_kv_heads) for a in layouts}
        if len(heads) == 1:
            ((h, kv),) = heads
            d = layouts[0].head_dim
            # BERT-style self-attention modules (attention_head_size) also size heads as hidden_size / heads
            derived = any(hasattr(a.head_owner or a.module, "attention_head_size") for a in layouts)
            if derived or not honours_head_dim(model):
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
                if not config_validates(cast(Any, model).config):  # e.g. hidden_size no longer a multiple of heads
                    config.head_dim, config.num_attention_heads = saved[:2]
                    if has_kv:
                        config.num_key_value_heads = saved[2]
                    uniform = False
        else:
            uniform = False
    moe = structure.moe_modules  # MoE blocks (experts, routers, shared experts) have their own config attributes
    widths = {features(base_layer(d))[1] for d in structure.ffn_downs}
    width_attr = next((a for a in FFN_WIDTH_ATTRIBUTES if hasattr(config, a)), None)
    if len(widths) == 1 and width_attr is not None:
        setattr(config, width_attr, widths.pop())
        for module in model.modules():
            if hasattr(module, "down_proj") and hasattr(module, "intermediate_size") and module not in moe:
                module.intermediate_size = config.intermediate_size
    elif len(widths) > 1:
        uniform = False
    return sync_moe_config(model, structure.moe) and uniform


# words naming the encoders of other modalities in a multimodal model: their layers are never the decoder layers
TOWER_WORDS = ("vision", "image", "visual", "audio", "speech", "video")


def language_model(model: nn.Module) -> nn.Module:
    """The part of `model` that holds its text decoder layers: `get_decoder()` of a multimodal model's LM (its vision
    or audio towers have attention blocks too), else the model itself."""
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = cast(Any, base).get_decoder()
    except Exception:  # noqa: BLE001 - models without a decoder lookup (encoders, older transformers)
        return model
    inside = isinstance(decoder, nn.Module) and any(m is decoder for m in model.modules())
    return decoder if inside and any(isinstance(m, nn.ModuleList) for m in decoder.modules()) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model: the longest ModuleList of its language model (`language_model`) whose every
    entry holds one attention block.

    Raises ValueError for what LoRAPruner cannot prune (see `check_supported`).
    """
    check_supported(model)
    attention_modules = {a.module for a in attention_layouts(model)} | {m for _, m in mla_modules(model)}
    best: list[nn.Module] = []
    for name, module in language_model(model).named_modules():
        if any(word in name.lower() for word in TOWER_WORDS):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if all(sum(m in attention_modules for m in block.modules()) == 1 for block in module):
                best = list(module)
    if best:
        from .support import check_blocks

        check_blocks(model, best)
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
