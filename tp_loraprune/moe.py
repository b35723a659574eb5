"""Mixture-of-experts blocks: where routed experts, their router and shared experts live, the LoRAPrune scores of
expert weights, and removing whole experts or expert FFN channels.

transformers 5 keeps the routed experts of a layer as 3-D parameters of one `*Experts` module. The layout and the
routing are properties of each block's forward code, so blocks are declared per class (`MOE_BLOCKS`, verified
against transformers 5.24):

* Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3: `gate_up_proj` (E, 2I, H) holds expert e's gate rows 0…I−1
  and up rows I…2I−1, `down_proj` (E, H, I); the forward is act(gate)·up, then down.
* gpt-oss: transposed and interleaved: `gate_up_proj` (E, H, 2I) with gate in even and up in odd columns (channel c
  owns columns 2c and 2c+1), `gate_up_proj_bias` (E, 2I), `down_proj` (E, I, H), `down_proj_bias` (E, H); the
  clamp and the (up + 1)·glu act per channel.
* The router holds `weight` (E, H) (gpt-oss: and `bias` (E,); DeepSeek-V3: the buffer `e_score_correction_bias`
  (E,)). Mixtral/Qwen/OLMoE take the top-k of a softmax over all experts (renormalised or not), gpt-oss a softmax
  over the top-k logits, DeepSeek-V3 the top-k of sigmoid scores plus the correction within the `topk_group` best
  of `n_group` equal groups. In every case a removed expert routes exactly like an expert that is never chosen
  (its logit, or its choice score, at −inf before the top-k), as long as at least `top_k` experts remain (DeepSeek-V3:
  the same number in every group, at least 2 per group and `topk_group` groups' worth of at least `top_k`).
* Shared experts (Qwen2-MoE `shared_expert` with its sigmoid `shared_expert_gate`, DeepSeek-V3 `shared_experts`)
  are ordinary MLPs: their channels are found and pruned like any dense FFN.

Expert FFN channels are removed per expert (each keeps its own best channels) at one common width per layer, since
the 3-D layout needs it. Other classes holding experts are refused (`check_moe_supported`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .lora import active_adapter, base_layer, is_lora_layer

# The routed-expert parameters: fused gate/up projection and down projection of every expert (what PEFT's
# `target_parameters` names to put LoRA on them).
GATE_UP, DOWN = "gate_up_proj", "down_proj"
EXPERT_PARAMETERS = (GATE_UP, DOWN)

# Expert FFN widths stay multiples of this: transformers' default experts kernel (`grouped_mm`) needs 16-byte
# strides, so a width that is not a multiple of 4 fails in fp32 ("strides should be multiple of 16 bytes"), and
# one that is not a multiple of 8 in bf16 / fp16.
EXPERT_WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class MoESpec:
    """What one MoE block class holds, by child and config attribute name.

    router: child holding `weight` (E, H) and the routing (`top_k`; `num_group`/`topk_group` when `grouped`).
    count / width: config attributes of the number of routed experts and of an expert's FFN width.
    shared: child holding the shared-expert MLP (None: no shared expert).
    shared_width: config attribute of the shared expert's width; None with `shared_multiplier`: the config
        derives it as `width · shared_multiplier` (DeepSeek-V3: moe_intermediate_size · n_shared_experts).
    grouped: the router first picks `topk_group` of `n_group` equal groups of experts (DeepSeek-V3).
    """

    router: str
    count: str
    width: str
    shared: str | None = None
    shared_width: str | None = None
    shared_multiplier: str | None = None
    grouped: bool = False


MOE_BLOCKS: dict[str, MoESpec] = {
    "MixtralSparseMoeBlock": MoESpec("gate", "num_local_experts", "intermediate_size"),
    "Qwen2MoeSparseMoeBlock": MoESpec(
        "gate", "num_experts", "moe_intermediate_size", "shared_expert", "shared_expert_intermediate_size"
    ),
    "Qwen3MoeSparseMoeBlock": MoESpec("gate", "num_experts", "moe_intermediate_size"),
    "OlmoeSparseMoeBlock": MoESpec("gate", "num_experts", "intermediate_size"),
    "GptOssMLP": MoESpec("router", "num_local_experts", "intermediate_size"),
    "DeepseekV3MoE": MoESpec(
        "gate",
        "n_routed_experts",
        "moe_intermediate_size",
        "shared_experts",
        shared_multiplier="n_shared_experts",
        grouped=True,
    ),
}


@dataclass(frozen=True)
class MoELayout:
    """One MoE block of a model: its experts module, router and shared expert (unwrapped from LoRA)."""

    name: str  # qualified name of the block
    block: nn.Module
    spec: MoESpec
    experts: nn.Module
    router: nn.Module
    shared: nn.Module | None
    experts_name: str  # qualified name of the experts module (the key of its channels)
    router_name: str  # qualified name of the router (the key of whole experts)

    @property
    def transposed(self) -> bool:
        """gate_up_proj is (E, H, 2I) and down_proj (E, I, H) (gpt-oss), instead of (E, 2I, H) and (E, H, I)."""
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def interleaved(self) -> bool:
        """Channel c owns gate/up positions 2c and 2c+1 (gpt-oss) instead of c and I + c."""
        return not getattr(self.experts, "is_concatenated", True)

    @property
    def num_experts(self) -> int:
        return int(self.down.shape[0])

    @property
    def width(self) -> int:
        return int(self.down.shape[1] if self.transposed else self.down.shape[2])

    @property
    def hidden(self) -> int:
        return int(cast(torch.Tensor, self.router.weight).shape[1])

    @property
    def gate_up(self) -> nn.Parameter:
        return cast(nn.Parameter, getattr(self.experts, GATE_UP))

    @property
    def down(self) -> nn.Parameter:
        return cast(nn.Parameter, getattr(self.experts, DOWN))

    @property
    def top_k(self) -> int:
        return int(cast(Any, self.router).top_k)

    @property
    def groups(self) -> tuple[int, int]:
        """(n_group, topk_group) of a grouped router; (1, 1) otherwise."""
        if not self.spec.grouped:
            return 1, 1
        return int(cast(Any, self.router).num_group), int(cast(Any, self.router).topk_group)

    @property
    def min_per_group(self) -> int:
        """Experts each routing group must keep: top_k overall (at least 2 per group and enough in the top
        `topk_group` groups for a grouped router, whose group score is the sum of its two best experts)."""
        groups, topk_group = self.groups
        if not self.spec.grouped:
            return self.top_k
        return max(2, -(-self.top_k // topk_group))

    @property
    def channel_cost(self) -> int:
        """Base parameters one expert FFN channel holds: two gate/up rows (and biases) and one down column."""
        biases = 2 if getattr(self.experts, "gate_up_proj_bias", None) is not None else 0
        return 3 * self.hidden + biases

    @property
    def expert_cost(self) -> int:
        """Base parameters of one expert besides its channels: its router row (and bias), its down bias."""
        cost = self.hidden + (1 if getattr(self.router, "bias", None) is not None else 0)
        down_bias = getattr(self.experts, "down_proj_bias", None)
        return cost + (int(down_bias.shape[1]) if down_bias is not None else 0)

    def wrappers(self, model: nn.Module, lora: list[nn.Module] | None = None) -> dict[str, nn.Module]:
        """The LoRA ParamWrappers on this block's parameters: keys "gate_up_proj", "down_proj", "router" (`lora`:
        the model's LoRA layers, when the caller has them)."""
        found = {}
        for layer in lora_modules(model) if lora is None else lora:
            target, name = base_layer(layer), getattr(layer, "parameter_name", None)
            if target is self.experts and name in (GATE_UP, DOWN):
                found[name] = layer
            elif target is self.router and name == "weight":
                found["router"] = layer
        return found


def lora_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_lora_layer(m)]


def is_expert_wrapper(layer: nn.Module) -> bool:
    """A PEFT ParamWrapper on a 3-D (experts, ·, ·) parameter."""
    get_param = getattr(layer, "get_param", None)
    return get_param is not None and get_param().dim() == 3


def moe_layouts(model: nn.Module) -> list[MoELayout]:
    """Every declared MoE block of `model` (`MOE_BLOCKS`) in the layout it was declared with."""
    return _declared_blocks(model)[0]


def _declared_blocks(model: nn.Module) -> tuple[list[MoELayout], list[tuple[str, str]]]:
    """(layouts of the declared MoE blocks, (name, class) of blocks of a declared class in another layout, e.g. the
    per-expert modules of transformers 4)."""
    names = {m: n for n, m in model.named_modules()}
    layouts, other = [], []
    for name, block in model.named_modules():
        spec = MOE_BLOCKS.get(type(block).__name__)
        if spec is None:
            continue
        experts = base_layer(getattr(block, "experts", nn.Module()))
        router = base_layer(getattr(block, spec.router, nn.Module()))
        stacked = all(isinstance(getattr(experts, p, None), nn.Parameter) for p in EXPERT_PARAMETERS)
        if not stacked or getattr(experts, GATE_UP).dim() != 3 or getattr(router, "weight", torch.ones(1)).dim() != 2:
            other.append((name, type(block).__name__))
            continue
        shared = getattr(block, spec.shared) if spec.shared else None
        layouts.append(MoELayout(name, block, spec, experts, router, shared, names[experts], names[router]))
    return layouts, other


def _holds_experts(module: nn.Module) -> bool:
    """A module that looks like a stack of experts: 3-D parameters on a module named or counted as experts."""
    looks = "expert" in type(module).__name__.lower() or hasattr(module, "num_experts")
    return looks and any(p.dim() == 3 for p in module.parameters(recurse=False))


def unsupported_experts(model: nn.Module, within: set[nn.Module] | None = None) -> list[tuple[str, str]]:
    """(qualified name, class) of expert stacks outside a declared MoE block (only those in `within` if given)."""
    declared = {layout.experts for layout in moe_layouts(model)}
    found = []
    for name, m in model.named_modules():
        if is_lora_layer(m) or (within is not None and m not in within):
            continue
        if _holds_experts(m) and m not in declared:
            found.append((name, type(m).__name__))
    return found


def check_moe_supported(model: nn.Module, within: set[nn.Module] | None = None) -> None:
    """Raise a ValueError for expert stacks whose block is not declared (their layout or routing is unknown), and
    for a declared block whose routing cannot stay valid."""
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    other = [
        (name, cls) for name, cls in _declared_blocks(model)[1] if within is None or model.get_submodule(name) in within
    ]
    if other:
        (where, cls), more = other[0], f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise ValueError(
            f"{type(base).__name__} has a {cls} at {where!r}{more} without transformers 5's stacked experts (3-D "
            f"{GATE_UP} and {DOWN} parameters, a router weight): tp_loraprune prunes mixture-of-experts blocks in that "
            "layout only (transformers >= 5). Prune other layers with `layers=[...]`."
        )
    found = unsupported_experts(model, within)
    if found:
        (where, cls), more = found[0], f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ValueError(
            f"{type(base).__name__} has routed experts at {where!r}{more} ({cls}) in a mixture-of-experts block "
            f"that tp_loraprune does not know: removing experts or expert channels needs the block's weight layout "
            f"and routing. Known MoE blocks: {', '.join(MOE_BLOCKS)}. Prune other layers with `layers=[...]`. See "
            "docs/architectures.md (Mixture of experts)."
        )
    for layout in moe_layouts(model):
        if within is not None and layout.block not in within:
            continue
        groups, topk_group = layout.groups
        if layout.num_experts % groups or topk_group > groups:
            raise ValueError(
                f"{layout.name} ({type(layout.block).__name__}): {layout.num_experts} experts in n_group={groups} "
                f"groups with topk_group={topk_group} is not a valid grouped routing to prune."
            )


def moe_block_modules(model: nn.Module) -> set[nn.Module]:
    """Every module inside a declared MoE block (experts, router, shared experts, their LoRA layers)."""
    return {m for layout in moe_layouts(model) for m in layout.block.modules()}


def shared_expert_modules(model: nn.Module) -> set[nn.Module]:
    """Every module inside a shared expert of a declared MoE block."""
    return {m for layout in moe_layouts(model) if layout.shared is not None for m in layout.shared.modules()}


# ---------------------------------------------------------------------------------------------------- scores
def expert_factors(A: torch.Tensor, B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert views of a ParamWrapper's LoRA factors: A (r·E, in) → (E, r, in), B (out, r·E) → (E, out, r).

    PEFT's layout: expert e owns A's rows e·r … e·r + r − 1 and B's columns j·E + e (j < r)."""
    return A.view(num_experts, -1, A.shape[-1]), B.view(B.shape[0], -1, num_experts).permute(2, 0, 1)


def expert_weight(layer: nn.Module) -> torch.Tensor:
    """The experts' frozen weights as (E, out, in) (a view: (E, in, out) parameters are transposed)."""
    param = cast(Any, layer).get_param().detach()
    return param if cast(Any, layer)._did_swap_in_out_features else param.transpose(1, 2)


def expert_channel_scores(
    layer: nn.Module, kind: str, gradient: str = "eq10"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LoRAPrune scores of a ParamWrapper on experts, per expert: ((E, out), (E, in)), or None without gradients.

    Every expert is its own W + s·B_e·A_e, scored like a linear layer one expert at a time (so the temporaries are
    one expert's size, and CUDA tensors use the fused kernel where it applies)."""
    from .kernels import channel_scores

    name = active_adapter(layer)
    A, B = cast(Any, layer).lora_A[name].weight, cast(Any, layer).lora_B[name].weight
    if A.grad is None or B.grad is None:
        return None
    E = cast(Any, layer).num_experts
    (A3, B3), (dA3, dB3) = expert_factors(A.detach(), B.detach(), E), expert_factors(A.grad, B.grad, E)
    W3, scaling = expert_weight(layer), float(cast(Any, layer).scaling[name])
    per_expert = [
        channel_scores(
            A3[e], B3[e].contiguous(), dA3[e], dB3[e].contiguous(), W3[e], scaling, cast(Any, kind), cast(Any, gradient)
        )
        for e in range(E)
    ]
    return torch.stack([o for o, _ in per_expert]), torch.stack([i for _, i in per_expert])


def channel_rows(channels: torch.Tensor, width: int, interleaved: bool) -> torch.Tensor:
    """gate/up positions of FFN channels (..., n) → (..., 2n), in the layout's order ([gate | up] or interleaved)."""
    if interleaved:
        return torch.stack([2 * channels, 2 * channels + 1], dim=-1).flatten(-2)
    return torch.cat([channels, channels + width], dim=-1)


def routed_channel_scores(
    layout: MoELayout, up_scores: torch.Tensor | None, down_scores: torch.Tensor | None
) -> torch.Tensor | None:
    """One score per (expert, channel), (E, I): the output scores of its gate and up rows plus the input score of
    its down column (whichever projections carry LoRA), or None when neither does."""
    if up_scores is None and down_scores is None:
        return None
    E, width = layout.num_experts, layout.width
    total = torch.zeros(E, width)
    if up_scores is not None:
        up = up_scores.float().cpu()
        total += up.view(E, width, 2).sum(2) if layout.interleaved else up.view(E, 2, width).sum(1)
    if down_scores is not None:
        total += down_scores.float().cpu()
    return total


# ---------------------------------------------------------------------------------------------------- removal
@dataclass(frozen=True)
class Transformed:
    """A tensor replaced by a gathered copy; `transform` maps any tensor of the old shape (optimizer moments)
    the same way."""

    module: nn.Module
    attr: str
    old: torch.Tensor
    new: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScoreTransform:
    """How a LoRA layer's stored scores along one direction follow the removal."""

    module: nn.Module
    direction: str
    transform: Callable[[torch.Tensor], torch.Tensor]


def _replace(module: nn.Module, attr: str, transform, out: list[Transformed]) -> None:
    old = getattr(module, attr, None)
    if old is None:
        return
    new = transform(old.detach())
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, attr, new.contiguous())
    out.append(Transformed(module, attr, old, getattr(module, attr), transform))


def _gather(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """t.gather(dim, index) with `index` (E, n) broadcast over the other dimensions of t (E, ·, ·)."""
    shape = list(t.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0], 1, 1][: t.dim()]
    view[dim] = index.shape[1]
    return t.gather(dim, index.to(t.device).view(view).expand(shape))


def prune_routed(
    layout: MoELayout, wrappers: dict[str, nn.Module], kept_experts: torch.Tensor, kept_channels: torch.Tensor
) -> tuple[list[Transformed], list[ScoreTransform]]:
    """Keep experts `kept_experts` (current positions, (E',)) and, of expert `kept_experts[i]`, the channels
    `kept_channels[i]` (current positions, (E', I')): the experts' weights and biases, the router's rows (bias,
    correction) and the LoRA factors on them. Returns the replaced tensors and how stored scores follow."""
    E, experts, channels = layout.num_experts, kept_experts.long(), kept_channels.long()
    rows = channel_rows(channels, layout.width, layout.interleaved)  # (E', 2I') gate/up positions
    up_dim, down_dim = (2, 1) if layout.transposed else (1, 2)

    def select(t: torch.Tensor) -> torch.Tensor:  # (E, ...) → (E', ...)
        return t.index_select(0, experts.to(t.device))

    def columns(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:  # (E, n) → (E', n') per expert
        return lambda t: _gather(select(t), 1, index)

    def factor_a(index: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """A (r·E, in): the kept experts' rows and, per expert, the `index` input columns."""

        def transform(t: torch.Tensor) -> torch.Tensor:
            a = select(t.view(E, -1, t.shape[-1]))  # (E', r, in)
            a = a if index is None else _gather(a, 2, index)
            return a.reshape(-1, a.shape[-1])

        return transform

    def factor_b(index: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """B (out, r·E): the kept experts' columns and, per expert, the `index` output rows."""

        def transform(t: torch.Tensor) -> torch.Tensor:
            b = select(t.view(t.shape[0], -1, E).permute(2, 0, 1))  # (E', out, r)
            b = b if index is None else _gather(b, 1, index)
            return b.permute(1, 2, 0).reshape(b.shape[1], -1)

        return transform

    replaced: list[Transformed] = []
    _replace(layout.experts, GATE_UP, lambda t: _gather(select(t), up_dim, rows), replaced)
    _replace(layout.experts, "gate_up_proj_bias", columns(rows), replaced)
    _replace(layout.experts, DOWN, lambda t: _gather(select(t), down_dim, channels), replaced)
    _replace(layout.experts, "down_proj_bias", select, replaced)
    for attr in ("weight", "bias", "e_score_correction_bias"):
        _replace(layout.router, attr, select, replaced)
    scores: list[ScoreTransform] = []
    if GATE_UP in wrappers:
        _replace_factors(wrappers[GATE_UP], factor_a(None), factor_b(rows), replaced)
        scores += [
            ScoreTransform(wrappers[GATE_UP], "out", columns(rows)),
            ScoreTransform(wrappers[GATE_UP], "in", select),
        ]
    if DOWN in wrappers:
        _replace_factors(wrappers[DOWN], factor_a(channels), factor_b(None), replaced)
        scores += [
            ScoreTransform(wrappers[DOWN], "in", columns(channels)),
            ScoreTransform(wrappers[DOWN], "out", select),
        ]
    if "router" in wrappers:  # a 2-D ParamWrapper on the router weight (E, H): B's rows are the experts
        for b in cast(Any, wrappers["router"]).lora_B.values():
            _replace(b, "weight", select, replaced)
        scores.append(ScoreTransform(wrappers["router"], "out", select))
    sync_moe_attributes(layout, wrappers)
    return replaced, scores


def _replace_factors(layer: nn.Module, a, b, out: list[Transformed]) -> None:
    for adapter in cast(Any, layer).lora_A:
        _replace(cast(Any, layer).lora_A[adapter], "weight", a, out)
        _replace(cast(Any, layer).lora_B[adapter], "weight", b, out)


def sync_moe_attributes(layout: MoELayout, wrappers: dict[str, nn.Module] | None = None) -> None:
    """Make the block's bookkeeping (expert counts, widths; PEFT's cached shapes) match its tensors."""
    E, width = layout.num_experts, layout.width
    for module in (layout.experts, layout.router):
        cast(Any, module).num_experts = E
    for attr in ("intermediate_dim", "intermediate_size"):
        if hasattr(layout.experts, attr):
            setattr(layout.experts, attr, width)
    for name, layer in (wrappers or {}).items():
        w = cast(Any, layer)
        if name == "router":
            w.out_features = E
        else:
            w.num_experts = E
            if name == GATE_UP:
                w.out_features = 2 * width
            else:
                w.in_features = width
        for adapter in w.lora_A:
            for f in (w.lora_A[adapter], w.lora_B[adapter]):
                f.out_features, f.in_features = f.weight.shape


def sync_moe_config(model: nn.Module, layouts: list[MoELayout] | None = None) -> bool:
    """Write uniform expert counts and widths (and shared-expert widths) into the HF config and every block's
    bookkeeping; returns False when blocks differ or the config cannot describe them (the per-layer format).
    `layouts`: the model's `moe_layouts` when the caller has them already."""
    config = getattr(model, "config", None)
    layouts = moe_layouts(model) if layouts is None else layouts
    for layout in layouts:
        sync_moe_attributes(layout)
    if config is None or not layouts:
        return True
    uniform = True
    by_attr: dict[str, set[int]] = {}
    for layout in layouts:
        spec = layout.spec
        by_attr.setdefault(spec.count, set()).add(layout.num_experts)
        by_attr.setdefault(spec.width, set()).add(layout.width)
        if layout.shared is not None:
            shared = (
                int(cast(Any, layout.shared).down_proj.weight.shape[1]) if hasattr(layout.shared, "down_proj") else None
            )
            if spec.shared_width is not None and shared is not None:
                by_attr.setdefault(spec.shared_width, set()).add(shared)
            elif spec.shared_multiplier is not None and shared is not None:
                # the config derives the shared width from the experts' width: it must still hold
                multiplier = int(getattr(config, spec.shared_multiplier))
                uniform &= shared == layout.width * multiplier
    counts = {layout.num_experts for layout in layouts}
    if len(counts) == 1:  # the *ForCausalLM's load-balancing loss (output_router_logits=True) reads its own count
        inside = moe_block_modules(model)
        for m in model.modules():
            if m not in inside and hasattr(m, "num_experts") and hasattr(m, "num_experts_per_tok"):
                cast(Any, m).num_experts = next(iter(counts))
    saved = {attr: getattr(config, attr) for attr in by_attr}
    for attr, values in by_attr.items():
        if len(values) == 1:
            setattr(config, attr, next(iter(values)))
        else:
            uniform = False
    from .models import config_validates  # models imports this module

    if not config_validates(config):
        for attr, value in saved.items():
            setattr(config, attr, value)
        return False
    return uniform
