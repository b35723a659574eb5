"""Fused projections: where each attention head's q/k/v rows and each FFN channel's rows live in one layer.

A fused layer holds several logical projections in one weight, so a head or an FFN channel owns rows
scattered through it. The row layout is a property of the model's forward code, not of the module tree,
so it is declared per attention / MLP class (verified against transformers 5.24):

* `Phi3Attention.qkv_proj`: rows [q of all heads | k of all KV heads | v of all KV heads]; the forward
  slices q with `config.num_attention_heads`, so a layer with its own head count gets a `LayerConfig`.
* `GPT2Attention.c_attn` (a Conv1D): output columns [q | k | v], split with `split_size`.
* `GPTNeoXAttention.query_key_value`: rows interleaved per head, head h owns [q_h | k_h | v_h] =
  rows [3·d·h, 3·d·(h+1)) (the forward views the output as (..., heads, 3·d) and chunks the last dim);
  `PersimmonAttention` (and Fuyu's language model) the same.
* `FalconAttention.query_key_value`: [q | k | v] blocks with multi-query (one KV head), interleaved per head
  without it, and per KV group ([q of the group's heads | k | v]) with `new_decoder_architecture`; refused with
  ALiBi. `GPTBigCodeAttention.c_attn` (StarCoder): blocks with multi-query, per head without.
* `Phi3MLP.gate_up_proj` (and GLM's `GlmMLP` / `Glm4MLP`, the same code): rows [gate | up] (chunked in two),
  so FFN channel c owns rows c and I + c.
* `GPT2MLP.c_fc` → `c_proj`: plain Conv1D FFN, declared because the graph discovery only walks nn.Linear.

Any other class with a fused child (Bloom and MPT, whose ALiBi biases follow the head index, CodeGen, Baichuan
`W_pack`, ...) is refused by `tp_loraprune.models.check_supported`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from torch import nn

from .conv1d import features
from .lora import base_layer


@dataclass(frozen=True)
class FusedQKV:
    """How one attention class packs q, k and v into a single projection.

    order: "blocks" = [q of all heads | k of all KV heads | v of all KV heads]; "per_head" = for each head,
        its q, k and v rows next to each other (multi-head attention only); "per_group" = for each KV group, the
        q rows of its query heads, then its k and v rows (Falcon's new decoder architecture).
    config_heads: the forward reads `self.config.num_attention_heads` (Phi-3), so a pruned layer needs a
        config of its own (`LayerConfig`).
    """

    qkv: str  # child name of the fused projection
    o: str  # child name of the output projection
    order: Literal["blocks", "per_head", "per_group"]
    config_heads: bool = False

    def rows(
        self, heads: list[int], kv_heads: list[int], num_heads: int, num_kv_heads: int, d: int
    ) -> tuple[list[int], list[int], list[int]]:
        """Row (output-channel) indices of the given query heads' q rows and KV heads' k and v rows."""
        if self.order == "per_head":
            q = [3 * d * h + j for h in heads for j in range(d)]
            k = [3 * d * g + d + j for g in kv_heads for j in range(d)]
            v = [3 * d * g + 2 * d + j for g in kv_heads for j in range(d)]
            return q, k, v
        if self.order == "per_group":
            size = num_heads // num_kv_heads  # query heads per group; a group holds size + 2 head-sized blocks
            block = (size + 2) * d
            q = [block * (h // size) + (h % size) * d + j for h in heads for j in range(d)]
            k = [block * g + size * d + j for g in kv_heads for j in range(d)]
            v = [block * g + (size + 1) * d + j for g in kv_heads for j in range(d)]
            return q, k, v
        k_start, v_start = num_heads * d, (num_heads + num_kv_heads) * d
        q = [h * d + j for h in heads for j in range(d)]
        k = [k_start + g * d + j for g in kv_heads for j in range(d)]
        v = [v_start + g * d + j for g in kv_heads for j in range(d)]
        return q, k, v


def _falcon(module: nn.Module) -> FusedQKV | None:
    """Falcon packs q/k/v three ways (`FalconAttention._split_heads`); with ALiBi, whose per-head slopes follow
    the head index and count, no head can be removed exactly."""
    if getattr(getattr(module, "config", None), "alibi", False):
        return None
    if getattr(module, "new_decoder_architecture", False):
        return FusedQKV("query_key_value", "dense", "per_group")
    return FusedQKV("query_key_value", "dense", "blocks" if getattr(module, "multi_query", False) else "per_head")


def _gpt_bigcode(module: nn.Module) -> FusedQKV:
    """GPTBigCode (StarCoder): multi-query packs [q | k | v] in blocks, multi-head interleaves per head."""
    return FusedQKV("c_attn", "c_proj", "blocks" if getattr(module, "multi_query", False) else "per_head")


# attention class name → its fused layout, or a function of the module giving it (None: no known layout)
FUSED_ATTENTION: dict[str, FusedQKV | Callable[[nn.Module], FusedQKV | None]] = {
    "Phi3Attention": FusedQKV("qkv_proj", "o_proj", "blocks", config_heads=True),
    "GPT2Attention": FusedQKV("c_attn", "c_proj", "blocks"),
    "GPTNeoXAttention": FusedQKV("query_key_value", "dense", "per_head"),
    "PersimmonAttention": FusedQKV("query_key_value", "dense", "per_head"),  # also Fuyu's language model
    "Phi4MultimodalAttention": FusedQKV("qkv_proj", "o_proj", "blocks", config_heads=True),  # Phi-3's code
    "FalconAttention": _falcon,
    "GPTBigCodeAttention": _gpt_bigcode,
}
# fused attention classes refused for another reason than their row layout
FUSED_REFUSED: dict[str, str] = {
    "FalconAttention": "with alibi=True, ALiBi position biases are computed per head from the head index and count",
    "BloomAttention": "ALiBi position biases are computed per head from the head index and the head count",
    "MptAttention": "ALiBi position biases are computed per head from the head index and the head count",
}

# MLP class name → (up projection, down projection, number of stacked row blocks in the up projection)
DECLARED_FFN: dict[str, tuple[str, str, int]] = {
    "Phi3MLP": ("gate_up_proj", "down_proj", 2),
    "Phi4MultimodalMLP": ("gate_up_proj", "down_proj", 2),
    "ModernBertDecoderMLP": ("Wi", "Wo", 2),  # [input | gate], chunked in two
    "GlmMLP": ("gate_up_proj", "down_proj", 2),
    "Glm4MLP": ("gate_up_proj", "down_proj", 2),
    "GPT2MLP": ("c_fc", "c_proj", 1),
}


def fused_attention_spec(module: nn.Module) -> FusedQKV | None:
    """The fused layout of an attention module, or None when its class is not a known fused layout."""
    spec = FUSED_ATTENTION.get(type(module).__name__)
    if spec is not None and not isinstance(spec, FusedQKV):
        spec = spec(module)
    if spec is None or getattr(module, "q_attn", None) is not None:  # GPT-2 cross-attention: c_attn is k|v only
        return None
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in (spec.qkv, spec.o)):
        return None
    return spec


@dataclass(frozen=True)
class DeclaredFFN:
    """An FFN whose channel coupling is declared: channel c is up-projection rows c + p·width for each
    of its `parts` row blocks, and down-projection input column c."""

    name: str  # qualified name of the up projection's base layer: the channel-group key
    up: nn.Module
    down: nn.Module
    parts: int

    @property
    def width(self) -> int:
        return features(base_layer(self.down))[1]

    def up_rows(self, channels: list[int]) -> list[int]:
        return [p * self.width + c for p in range(self.parts) for c in channels]

    def items(self, channels: list[int]) -> list[tuple[nn.Module, str, list[int], list[int]]]:
        """`declared_group` items removing `channels`; the down projection comes first (one index per root)."""
        rows = self.up_rows(channels)
        return projection_items(self.down, "in", channels, channels) + projection_items(
            self.up, "out", rows, channels * self.parts
        )


def declared_ffns(model: nn.Module) -> list[DeclaredFFN]:
    """Every FFN of `model` whose class is in DECLARED_FFN, keyed by its up projection's base layer."""
    names = {m: n for n, m in model.named_modules()}
    found = []
    for module in model.modules():
        spec = DECLARED_FFN.get(type(module).__name__)
        if spec is None:
            continue
        up, down = getattr(module, spec[0], None), getattr(module, spec[1], None)
        if isinstance(up, nn.Module) and isinstance(down, nn.Module):
            found.append(DeclaredFFN(names[base_layer(up)], up, down, spec[2]))
    return found


def projection_items(proj: nn.Module, direction: str, idxs: list[int], roots: list) -> list:
    """`declared_group` items for one projection: its base layer and, for a LoRA wrapper, the factors that
    follow it (`lora_B` rows for output channels, `lora_A` columns for input channels)."""
    parts = [base_layer(proj)]
    if proj is not parts[0]:
        parts += list((cast(Any, proj).lora_B if direction == "out" else cast(Any, proj).lora_A).values())
    return [(m, direction, list(idxs), list(roots)) for m in parts]


class LayerConfig:
    """A per-layer view of a shared Hugging Face config: `overrides` win, everything else (reads and writes)
    goes to the shared config, so attention-implementation or cache switches still reach every layer."""

    def __init__(self, base, **overrides):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_overrides")
        return overrides[name] if name in overrides else getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self._base).__name__}, overrides={self._overrides})"


def set_layer_heads(module: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Give `module` a config whose head counts are its own (the shared config stays the model's)."""
    config = cast(Any, module).config
    shared = config._base if isinstance(config, LayerConfig) else config
    if (shared.num_attention_heads, getattr(shared, "num_key_value_heads", None)) == (num_heads, num_kv_heads):
        cast(Any, module).config = shared
    else:
        cast(Any, module).config = LayerConfig(shared, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
