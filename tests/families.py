"""Every causal-LM family of the installed transformers, built tiny from its default config.

`tiny_config(model_type)` takes the family's default config and shrinks it generically: the hidden size, head
counts, head size, layer count, FFN width, vocabulary, experts and the widths of MLA / SSM blocks are set to a
few units by attribute name (`SIZES`), wherever the config has that attribute (also inside sub-configs such as
`text_config`). A per-layer pattern (`layer_types` and the like) keeps one layer of every kind it had, so a
hybrid model stays hybrid. `FAMILY_OVERRIDES` holds the few settings the generic rules cannot guess.
"""

from __future__ import annotations

import contextlib
import random
import re
import warnings
from dataclasses import dataclass

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 32, 4, 2, 8, 48, 2, 128
INIT_RANGE = 0.1
MAX_LAYERS = 8  # a layer pattern longer than this before every kind of layer appears is cut here

# attribute name → tiny value (ints) for every attribute a default config has
SIZES: dict[str, int] = {
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "n_embed", "dim", "embed_dim", "hidden_dim"], HIDDEN),
    **dict.fromkeys(
        [
            "num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "decoder_attention_heads",
            "encoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
            "swa_num_attention_heads",
        ],
        HEADS,
    ),
    **dict.fromkeys(
        ["head_dim", "swa_head_dim", "kv_channels", "attention_head_dim", "attention_head_size", "d_head", "dim_head"],
        HEAD_DIM,
    ),
    **dict.fromkeys(
        [
            "intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size", "d_ff",
            "dim_ff", "dff", "d_inner", "feed_forward_size", "intermediate_size_mlp", "dense_intermediate_size",
        ],
        FFN,
    ),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"], 2),
    **dict.fromkeys(
        [
            "moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
            "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size", "expert_ffn_hidden_size",
        ],
        16,
    ),
    **dict.fromkeys(["n_group", "num_expert_group", "topk_group", "first_k_dense_replace"], 1),
    # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...)
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "qk_head_dim": 8, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4,
    "hidden_size_per_layer_input": 8,  # Gemma 3n / Gemma 4 per-layer embeddings
    # state-space and linear-attention blocks
    **dict.fromkeys(["mamba_d_state", "state_size", "ssm_state_size"], 8),
    **dict.fromkeys(["mamba_n_heads", "n_mamba_heads", "mamba_num_heads", "linear_num_heads"], 4),
    **dict.fromkeys(["mamba_d_head", "mamba_head_dim", "mamba_headdim"], 16),
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_head_dim": 8,
    # layer patterns: every second layer of the other kind
    **dict.fromkeys(
        ["attn_layer_period", "expert_layer_period", "no_rope_layer_interval", "global_attn_every_n_layers",
         "sliding_window_pattern"],
        2,
    ),
    **dict.fromkeys(["attn_layer_offset", "expert_layer_offset"], 1),
}  # fmt: skip
HEAD_DIM_ATTRIBUTES = ("head_dim",)  # set even where the default leaves them None (derived later)
LAYER_ATTRIBUTES = (
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers", "num_decoder_layers",
    "num_encoder_layers",
)  # fmt: skip
# key/value head counts: 2 where the default has grouped-query attention, 1 for multi-query, else the heads
KV_HEAD_ATTRIBUTES = (
    "num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "num_query_groups", "multi_query_group_num",
)  # fmt: skip
LENGTH_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx")  # shrunk to 128
VOCAB_ATTRIBUTES = ("vocab_size", "vocab_size_per_layer_input")

QWEN4_INDEXER = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                 "indexer_compress_ratio": 2}  # fmt: skip
# model_type → settings on top of the generic rules (checked against transformers 5.24)
FAMILY_OVERRIDES: dict[str, dict] = {
    "bamba": {"attn_layer_indices": [1]},
    "codegen": {"rotary_dim": 4},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots3_note": {"vision_config": {"adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN},
                   "audio_config": {"adapter_input_size": HIDDEN, "adapter_out_dim": HIDDEN}},
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "falcon_h1": {"mamba_d_ssm": 64},
    # sliding and indexed (sparse, K/V-sharing) attention layers; the validators want NVFP4-sized heads
    "kolibri1_1": {"num_hidden_layers": 3, "layer_types": ["sliding_attention"] * 2 + ["indexed_attention"],
                   "kv_source_layers": [0, 1, 2], "index_layers": [2], "mlp_only_layers": [0], "head_dim": 16,
                   "index_num_heads": 1},
    "gemma3n_text": {"num_kv_shared_layers": 0, "laurel_rank": 4},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "gptj": {"rotary_dim": 4},
    "jamba": {"use_mamba_kernels": False},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "mamba2": {"head_dim": 16, "n_groups": 1},
    "nemotron": {"num_key_value_heads": KV_HEADS},
    "nemotron_h": {"n_groups": 1},
    **{
        name: {"text_config": QWEN4_INDEXER} if name == "qwen4_exp" else QWEN4_INDEXER
        for name in ("qwen4_exp", "qwen4_exp_text")
    },
    "recurrent_gemma": {"num_hidden_layers": 3, "lru_width": HIDDEN},
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
              "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 16, "use_mamba_kernels": False},
    "zamba2": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
               "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 16, "hybrid_layer_ids": [1, 3]},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},
}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One causal-LM class of a model type, optionally with config settings on top of its tiny config."""

    model_type: str
    class_name: str
    settings: tuple[tuple[str, object], ...] = ()
    pruning: tuple[tuple[str, object], ...] = ()  # LoRAPruneConfig fields instead of the walk's

    @property
    def name(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.settings)
        extra += "; " * bool(extra and self.pruning) + ", ".join(f"pruned with {k}={v}" for k, v in self.pruning)
        return f"{self.model_type} ({extra})" if extra else self.model_type


def causal_lm_families() -> list[Family]:
    """Every (model_type, class) of transformers' causal-LM auto mapping, sorted by model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [Family(t, c) for t, c in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())]


# settings that change how heads are laid out or normalised, walked besides each family's default config
VARIANT_SETTINGS: dict[str, list[dict]] = {
    "cohere": [{"use_qk_norm": True}],  # per-head q/k norm weights (heads, head_dim)
    "stablelm": [{"qk_layernorm": True}],  # a list of per-head LayerNorms
    "phi": [{"qk_layernorm": True}],  # q/k LayerNorm over head_dim, shared by every head
    "olmo2": [{"num_key_value_heads": KV_HEADS}],  # q_norm over all heads, k_norm over all KV heads
    "falcon": [
        {"new_decoder_architecture": True, "num_kv_heads": KV_HEADS},  # q/k/v packed per KV group
        {"multi_query": False},  # q/k/v interleaved per head
        {"alibi": True},
    ],
    "gpt_bigcode": [{"multi_query": False}],
    "lfm2": [{"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2}],  # convolution + attention
    "big_bird": [{"attention_type": "original_full"}],
}


# pruner settings a family is walked with besides the walk's own (its refusal of those is in the table too)
VARIANT_PRUNING: dict[str, list[dict]] = {
    "deepseek_v3": [{"head_ratio": 0.0}],  # MLA heads are never pruned: its FFNs and experts are
}


def walked_families() -> list[Family]:
    """`causal_lm_families` with the VARIANT_SETTINGS and VARIANT_PRUNING of each (of installed model types)."""
    out = []
    for f in causal_lm_families():
        out.append(f)
        out += [
            Family(f.model_type, f.class_name, tuple(sorted(v.items()))) for v in VARIANT_SETTINGS.get(f.model_type, [])
        ]
        out += [
            Family(f.model_type, f.class_name, pruning=tuple(sorted(v.items())))
            for v in VARIANT_PRUNING.get(f.model_type, [])
        ]
    return out


def _config_fields(config) -> dict:
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def _kept_layers(config, default_layers: int | None) -> list[int]:
    """Indices of the layers to keep: the first LAYERS, plus the first layer of every kind a per-layer list
    (`layer_types`, `mlp_layer_types`, ...) names, at most MAX_LAYERS (a list of more than four distinct values
    holds layer indices, not kinds)."""
    if not default_layers:
        return list(range(LAYERS))
    keep = set(range(min(LAYERS, default_layers)))
    for value in _config_fields(config).values():
        if isinstance(value, (list, tuple)) and len(value) == default_layers > 1:
            first: dict = {}
            for i, kind in enumerate(value):
                try:
                    first.setdefault(kind, i)
                except TypeError:  # unhashable entries (per-layer dicts)
                    break
            if len(first) <= 4:  # a few kinds of layers, not a list of layer indices
                keep.update(first.values())
    return sorted(keep)[:MAX_LAYERS]


def _shrunk(config, n_layers: int | None = None) -> dict:
    """Keyword overrides that make `config` (a default config instance) tiny; sub-configs recursively.
    `n_layers`: the layer count to use (default: LAYERS, or what a per-layer pattern needs)."""
    fields = _config_fields(config)
    over: dict = {}
    layers_attr = next((a for a in LAYER_ATTRIBUTES if isinstance(fields.get(a), int)), None)
    default_layers = fields.get(layers_attr) if layers_attr else None
    kept = _kept_layers(config, default_layers) if n_layers is None else list(range(n_layers))
    n_layers = len(kept)
    heads_default = next((fields[a] for a in ("num_attention_heads", "n_head", "n_heads") if a in fields), None)
    for name, value in fields.items():
        if isinstance(value, bool):
            continue
        if hasattr(value, "to_dict") and hasattr(type(value), "model_type"):  # a sub-config
            over[name] = _shrunk(value)
        elif name in SIZES and (isinstance(value, int) or (value is None and name in HEAD_DIM_ATTRIBUTES)):
            over[name] = SIZES[name]
        elif name in SIZES and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            over[name] = [SIZES[name]] * n_layers  # per-layer widths (Gemma 3n's intermediate_size)
        elif name in LAYER_ATTRIBUTES and isinstance(value, int):
            over[name] = n_layers
        elif name in KV_HEAD_ATTRIBUTES and isinstance(value, int):
            over[name] = 1 if value == 1 else HEADS if value == heads_default else KV_HEADS
        elif name in LENGTH_ATTRIBUTES and isinstance(value, int) and value > 128:
            over[name] = 128
        elif name in VOCAB_ATTRIBUTES and isinstance(value, int):
            over[name] = VOCAB
        elif name == "initializer_range" and isinstance(value, float):
            over[name] = INIT_RANGE  # weights large enough that a removed head visibly changes the logits
        elif isinstance(value, (list, tuple)) and default_layers and len(value) == default_layers:
            over[name] = type(value)(value[i] for i in kept)
    if "qk_rope_head_dim" in fields and "head_dim" in fields:  # MLA: rotary acts on the qk_rope part only
        over["head_dim"] = SIZES["qk_rope_head_dim"]
    for name, value in fields.items():  # special token ids inside the new vocabulary
        if name.endswith(("_token_id", "_token_index", "_token_ids")) and "vocab_size" in over:
            ids = value if isinstance(value, list) else [value]
            if any(isinstance(i, int) and i >= VOCAB for i in ids):
                fixed = [VOCAB - 1 - k if isinstance(i, int) and i >= VOCAB else i for k, i in enumerate(ids)]
                over[name] = fixed if isinstance(value, list) else fixed[0]
    return over


def _merged(base: dict, over: dict) -> dict:
    """`base` updated by `over`, sub-config dicts merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_config(model_type: str, settings: dict | None = None):
    """The family's default config made tiny, plus `settings` (raises what the config class raises when it cannot
    be)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    family = {**FAMILY_OVERRIDES.get(model_type, {}), **(settings or {})}
    n_layers = next((family[a] for a in LAYER_ATTRIBUTES if a in family), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            default = cls()
        except Exception:  # noqa: BLE001 - a default the config class itself rejects: start from the overrides
            default = cls(**family)
        config = cls(**_merged(_shrunk(default, n_layers), family))
    config._attn_implementation = "eager"
    return config


def build_tiny(family: Family, seed: int = 0):
    """The family's causal-LM class on its tiny config, fp32, in train mode."""
    import transformers

    config = tiny_config(family.model_type, dict(family.settings))
    cls = getattr(transformers, family.class_name)
    sub = [v for v in vars(config).values() if isinstance(v, cls.config_class)]
    if not isinstance(config, cls.config_class) and sub:  # e.g. Emu3ForCausalLM takes the text sub-config
        config = sub[0]
        config._attn_implementation = "eager"
    random.seed(seed)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    if family.model_type in AFTER_BUILD:
        AFTER_BUILD[family.model_type](model)
    return model.float().train()


# model_type → why it cannot be built tiny on this machine (the walk records these as skipped)
CANNOT_BUILD: dict[str, str] = {
    "blt": "sizes live in four per-component configs (patcher, encoder, global, decoder) the generic shrink "
    "does not reach",
    "gemma3n": "its vision tower needs the `timm` package",
    "gemma4_assistant": "a draft model: its forward needs the target model's shared KV states",
    "gemma4_unified_assistant": "a draft model: its forward needs the target model's shared KV states",
    "deepseek_v4": "its compressed attention keeps sizes (8192-wide index blocks) the generic shrink does not reach",
    "musicgen": "MusicgenForCausalLM takes the decoder sub-config and codebook-interleaved ids",
    "musicgen_melody": "MusicgenMelodyForCausalLM takes the decoder sub-config and codebook-interleaved ids",
    "reformer": "its reversible layers recompute activations in a custom backward that gives LoRA no gradient",
    "xlstm": "its recurrent kernels reject the shrunk head sizes",
}
# model_type → a call that makes the built model runnable
AFTER_BUILD = {"xmod": lambda model: model.set_default_language("en_XX")}


# ---------------------------------------------------------------------------------------------- classification
LENGTH = 8  # tokens per sequence
MERGE_TOLERANCE = 10  # W + s·B·A folded into one weight rounds differently: looser than ATOL in deep stacks
ATOL = 1e-5  # fp32: pruned vs masked, and saved vs loaded, relative to the largest logit when above 1


@dataclass(frozen=True)
class Outcome:
    """What the walk found for one family: "exact" (detail: what was pruned), "refused" (detail: the refusal)
    or "skipped" (detail: why it cannot be built tiny)."""

    kind: str
    detail: str


class CannotBuild(Exception):
    """The walk could not build, wrap or run the family tiny (before the pruner is involved): a family to add to
    CANNOT_BUILD with its reason, or a transformers version whose configs the shrink rules do not fit."""


class Misclassified(AssertionError):
    """A family that is neither exact nor refused cleanly: a crash, a wrong result, or a refusal after the
    model was changed."""


def randomize_norms_and_biases(model, seed: int = 0) -> None:
    """Perturb every parameter that is not a linear or embedding weight (norm weights, biases, per-head scales):
    a norm left at 1 or a bias left at 0 would hide a parameter that pruning pairs with the wrong head."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            plain = isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D))
            for name, p in module.named_parameters(recurse=False):
                if (plain and name == "weight") or not p.is_floating_point():
                    continue
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def with_lora(model, seed: int = 0):
    """PEFT LoRA (r=2, B non-zero) on every linear layer but the LM head, and on the stacked experts of declared
    mixture-of-experts blocks (PEFT's `target_parameters`, as `tp_loraprune.train.add_lora` does)."""
    import peft

    random.seed(seed)
    torch.manual_seed(seed)
    from tp_loraprune.moe import EXPERT_PARAMETERS, moe_layouts

    experts = {"target_parameters": list(EXPERT_PARAMETERS)} if moe_layouts(model) else {}  # stacked 3-D experts
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=linear_names(model), init_lora_weights=False, lora_dropout=0.0, **experts
    )
    return peft.get_peft_model(model, config)


def linear_names(model) -> list[str]:
    """What PEFT's "all-linear" targets, without what LoRA cannot wrap: every nn.Linear / Conv1D but the LM head and
    MoE routers (Llama 4's router is a Linear that returns a tuple), and not the out_proj / conv1d of Mamba-based
    models, which PEFT refuses (peft.tuners.tuners_utils)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    mamba = getattr(model.config, "model_type", None) in PEFT_MAMBA_TYPES
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D))
        and "router" not in type(m).__name__.lower()
        and m is not head
        and not (mamba and name.rsplit(".", 1)[-1] in ("out_proj", "conv1d"))
    ]


PEFT_MAMBA_TYPES = ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")


def token_ids(seed: int, size: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, LENGTH), generator=torch.Generator().manual_seed(seed))


def backward(model, seed: int) -> None:
    """Next-token cross-entropy on random ids (computed here: some families' own losses need more inputs)."""
    model.zero_grad(set_to_none=True)
    ids = token_ids(seed)
    out = model(input_ids=ids).logits.float()
    torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


@torch.no_grad()
def logits(model, seed: int = 123) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(input_ids=token_ids(seed)).logits.float().clone()
    finally:
        model.train(was)


def _copy(family: Family, model):
    """An independent copy of `model` (built again and loaded when a family's modules cannot be deep-copied)."""
    import copy

    try:
        return copy.deepcopy(model)
    except RuntimeError:  # e.g. tensors cached by the forward that are not graph leaves
        twin = with_lora(build_tiny(family))
        twin.load_state_dict(model.state_dict())
        return twin


def _kinds(pruner, events: list[dict]) -> set[str]:
    """What the events removed: heads, (dense or shared-expert) FFN channels, expert channels, whole experts."""
    from tp_loraprune.moe import moe_layouts

    experts = {layout.experts_name for layout in moe_layouts(pruner.model)}
    routers = {layout.router_name for layout in moe_layouts(pruner.model)}
    kinds = set()
    for key in (k for e in events for k in e["removed"]):
        kinds.add(
            "heads"
            if key in pruner._heads
            else "expert channels"
            if key in experts
            else "experts"
            if key in routers
            else "FFN channels"
        )
    return kinds


def _from_pruner(w: warnings.WarningMessage) -> bool:
    """A warning of tp_loraprune (raised inside the package, or pointing at its caller here)."""
    import os

    import tp_loraprune

    return issubclass(w.category, UserWarning) and (
        w.filename.startswith(os.path.dirname(tp_loraprune.__file__)) or w.filename == __file__
    )


def _first_sentence(text: str) -> str:
    head, sep, _ = text.partition(". ")
    return head + ("." if sep else "")


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, state: dict[str, torch.Tensor]) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == state.keys() and all(
        now[n].shape == t.shape and torch.equal(now[n].detach(), t) for n, t in state.items()
    )


def names_class_and_module(message: str, model) -> bool:
    """Whether a refusal names a class of the model (the model's or one of its modules') and one of its modules
    by qualified name (with or without PEFT's `base_model.model.` prefix)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = {type(m).__name__ for m in base.modules()} - {"ModuleList", "ModuleDict", "Linear", "Embedding"}
    names = {n for n, _ in base.named_modules() if "." in n}
    return any(c in message for c in classes) and any(f"{n}" in message for n in names)


def _removed(events: list[dict]) -> dict[str, list[int]]:
    removed: dict[str, list[int]] = {}
    for event in events:
        for key, ids in event["removed"].items():
            removed.setdefault(key, []).extend(ids)
    return removed


def _masked(before, pruned, events: list[dict]):
    """`before` with every removed head's output-projection input columns and every removed FFN channel's
    down-projection input columns zeroed (base weight and lora_A), and every removed expert channel's column of its
    expert's down projection: the slow reference of a pruned model (removed whole experts are masked in the
    routing, `masked_logits`).

    The dense consumers are found physically: every linear whose input shrank. A head key names an attention block
    (its output projection); any other shrunk input belongs to the channel group of the same block (the longest
    common name prefix)."""
    from tp_loraprune.conv1d import features, is_conv1d, is_linear_like
    from tp_loraprune.lora import base_layer, lora_layers
    from tp_loraprune.models import attention_layouts
    from tp_loraprune.moe import moe_layouts

    removed = _removed(events)
    layouts = {a.name: a for a in attention_layouts(before)}
    moe = {layout.experts_name: layout for layout in moe_layouts(before)}
    routers = {layout.router_name for layout in moe.values()}
    wrappers_before, wrappers_after = lora_layers(before), lora_layers(pruned)
    channel_keys = [k for k in removed if k not in layouts and k not in moe and k not in routers]
    with torch.no_grad():
        for key, layout in moe.items():  # expert channels: that expert's down column, base and LoRA A
            A = layout.wrappers(before)["down_proj"].lora_A["default"].weight.view(layout.num_experts, -1, layout.width)
            for i in removed.get(key, []):
                e, c = divmod(i, layout.width)
                if layout.transposed:
                    layout.down[e, c, :] = 0
                else:
                    layout.down[e, :, c] = 0
                A[e, :, c] = 0
        for name, wrapper in wrappers_before.items():
            base = base_layer(wrapper)
            if not is_linear_like(base):  # stacked experts (PEFT's ParamWrapper): masked above
                continue
            cut = features(base)[1] - features(base_layer(wrappers_after[name]))[1]
            if cut == 0:
                continue
            head_key = next((k for k in removed if k in layouts and name.startswith(k + ".")), None)
            if head_key is not None and base_layer(layouts[head_key].o) is base:
                d = layouts[head_key].head_dim
                cols = [h * d + j for h in removed[head_key] for j in range(d)]
            else:
                fits = [k for k in channel_keys if len(removed[k]) == cut] or channel_keys
                key = max(fits, key=lambda k: len(_common_prefix(k, name)), default=None)
                if key is None:
                    raise Misclassified(f"{name}: its input shrank by {cut} but no structure explains it")
                cols = sorted(removed[key])
            if len(cols) != cut:
                raise Misclassified(f"{name}: its input shrank by {cut}, the removed structures explain {len(cols)}")
            if is_conv1d(base):
                base.weight[cols, :] = 0
            else:
                base.weight[:, cols] = 0
            for a in wrapper.lora_A.values():
                a.weight[:, cols] = 0
    return before


@contextlib.contextmanager
def _removed_experts_never_route(model, removed: dict[str, list[int]]):
    """While active, every router of `model` with removed experts (original ids) adds −inf to their logits, and
    DeepSeek-V3's choice correction is −inf for them, before the top-k."""
    from tp_loraprune.moe import moe_layouts

    linear = torch.nn.functional.linear
    hooks, masks = [], {}
    for layout in moe_layouts(model):
        ids = removed.get(layout.router_name, [])
        if ids:
            masks[layout.router] = torch.zeros(layout.num_experts).index_fill_(0, torch.tensor(ids), float("-inf"))
            correction = getattr(layout.router, "e_score_correction_bias", None)
            if correction is not None:
                correction.data[ids] = float("-inf")

    def enter(module, args):
        mask = masks[module]
        torch.nn.functional.linear = lambda x, w, b=None: linear(x, w, b) + mask.to(x.dtype)

    def leave(module, args, out):
        torch.nn.functional.linear = linear

    try:
        for router in masks:
            hooks += [router.register_forward_pre_hook(enter), router.register_forward_hook(leave)]
        yield
    finally:
        torch.nn.functional.linear = linear
        for h in hooks:
            h.remove()


def masked_logits(before, pruned, events: list[dict]) -> torch.Tensor:
    """Logits of `before` (an unpruned copy) masked at what `events` removed from `pruned` (`_masked`), with removed
    experts never routed to."""
    reference = _masked(before, pruned, events)
    with _removed_experts_never_route(reference, _removed(events)):
        return logits(reference)


def _common_prefix(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


def classify(family: Family, tmp_dir, **settings) -> Outcome:
    """Build the family tiny, LoRA on every linear, one backward, two prune events at head_ratio = channel_ratio
    = 0.5 on every layer (`settings`: other LoRAPruneConfig fields), then: a ValueError before any weight changed
    is "refused"; otherwise the logits must equal the masked dense model's and survive save_pruned / load_pruned
    ("exact"). Anything else raises Misclassified."""
    from tp_loraprune import LoRAPruneConfig, LoRAPruner, load_pruned, save_pruned

    if family.model_type in CANNOT_BUILD:
        return Outcome("skipped", CANNOT_BUILD[family.model_type])
    try:
        base = build_tiny(family)
        randomize_norms_and_biases(base)
        model = with_lora(base)
        backward(model, seed=0)
        before, state = _copy(family, model), _state(model)
    except Exception as e:  # noqa: BLE001 - anything before the pruner runs is the walk's, not the pruner's
        raise CannotBuild(f"{family.name}: {type(e).__name__}: {_first_sentence(str(e))}") from e
    walk = {"head_ratio": 0.5, "channel_ratio": 0.5, "skip_first": 0.0, "skip_last": 0}
    config = LoRAPruneConfig(**{**walk, **dict(family.pruning), **settings})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pruner = LoRAPruner(model, config)
            pruner.importance.accumulate(model)
            first = pruner.prune(0.5)
            backward(model, seed=1)
            pruner.importance.accumulate(model)
            second = pruner.prune(1.0)
        except ValueError as e:
            if not _unchanged(model, state):
                raise Misclassified(f"{family.class_name} refused after changing the model: {e}") from e
            if not names_class_and_module(str(e), model):
                raise Misclassified(f"{family.class_name}: the refusal names no class and module: {e}") from e
            return Outcome("refused", str(e))
        except Exception as e:  # noqa: BLE001 - every other failure is a crash of the pruner
            raise Misclassified(f"{family.class_name} crashed while pruning: {type(e).__name__}: {e}") from e
    notes = sorted({_first_sentence(str(w.message)) for w in caught if _from_pruner(w)})
    events = [e for e in (first, second) if e is not None]
    if not events:
        raise Misclassified(f"{family.class_name}: the pruner accepted the model but removed nothing")
    try:
        pruned_logits, dense_logits = logits(model), logits(before)
        reference_logits = masked_logits(before, model, events)
        backward(model, seed=2)
    except Misclassified:
        raise
    except Exception as e:  # noqa: BLE001
        raise Misclassified(f"{family.class_name}: the pruned model fails: {type(e).__name__}: {e}") from e
    if not torch.isfinite(pruned_logits).all():
        raise Misclassified(f"{family.class_name}: non-finite logits after pruning")
    if (reference_logits - dense_logits).abs().max().item() <= 100 * ATOL:
        raise Misclassified(f"{family.class_name}: masking the removed structures does not change the logits")
    tolerance = ATOL * max(1.0, dense_logits.abs().max().item())
    diff = (pruned_logits - reference_logits).abs().max().item()
    if diff > tolerance:
        raise Misclassified(f"{family.class_name}: pruned logits differ from the masked dense model by {diff:.3g}")
    kinds = _kinds(pruner, events)  # before saving: it merges LoRA, which renames the experts
    detail = " + ".join(k for k in ("heads", "FFN channels", "expert channels", "experts") if k in kinds)
    try:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", family.name)
        path = save_pruned(model, tmp_dir / slug)  # merges LoRA into the model it was given
        merged_logits = logits(model.get_base_model())
        loaded = logits(load_pruned(path))
    except Exception as e:  # noqa: BLE001
        raise Misclassified(f"{family.class_name}: save_pruned / load_pruned fails: {type(e).__name__}: {e}") from e
    diff = (merged_logits - pruned_logits).abs().max().item()
    if diff > MERGE_TOLERANCE * tolerance:
        raise Misclassified(f"{family.class_name}: merging LoRA moves the logits by {diff:.3g}")
    diff = (loaded - merged_logits).abs().max().item()
    if diff > tolerance:
        raise Misclassified(f"{family.class_name}: load_pruned gives logits {diff:.3g} away from the saved model")
    return Outcome("exact", detail + "".join(f"; {n.rstrip('.')}" for n in notes))


# ---------------------------------------------------------------------------------------------- the docs table
TABLE_START = "<!-- family table: generated by benchmarks/family_table.py; do not edit by hand -->"
TABLE_END = "<!-- end of family table -->"
TABLE_HEADER = "| family | class | result | what is pruned / why not |\n|---|---|---|---|"


def table_row(family: Family, outcome: Outcome) -> str:
    """The docs table's row for one family: its name, class, outcome and detail (refusals: their first sentence)."""
    detail = outcome.detail if outcome.kind == "exact" else _first_sentence(outcome.detail)
    cells = [family.name, f"`{family.class_name}`", outcome.kind, detail.replace("|", "\\|").replace("\n", " ")]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[str]) -> str:
    import transformers

    return "\n".join(
        [TABLE_START, f"Classified with transformers {transformers.__version__}.", "", TABLE_HEADER, *rows, TABLE_END]
    )


def read_table(text: str) -> tuple[str, dict[str, str]]:
    """(transformers version, family name → row) of the table inside a document."""
    inside = text[text.index(TABLE_START) : text.index(TABLE_END)]
    version = re.search(r"Classified with transformers (\S+)\.", inside).group(1)
    rows = {}
    for line in inside.splitlines():
        if line.startswith("| ") and not line.startswith(("| family ", "|---")):
            rows[line[2:].split(" | ", 1)[0]] = line
    return version, rows


def replace_table(text: str, new_table: str) -> str:
    return text[: text.index(TABLE_START)] + new_table + text[text.index(TABLE_END) + len(TABLE_END) :]
