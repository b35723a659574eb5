"""What LoRAPruner prunes, what it keeps whole and what it refuses, and the words it says it with.

Refusals are ValueErrors raised before anything is traced or changed, naming the model's class, the module at
fault and what is unsupported:

* mixture-of-experts blocks of an unknown layout (`tp_loraprune.moe.check_moe_supported`);
* fused q/k/v or gate/up projections whose row layout is not declared, and ALiBi attention (`tp_loraprune.fused`);
* attention blocks holding parts that cannot be paired with heads (`tp_loraprune.head_parameters`), projections
  that are not whole heads, or heads that are not independent (`ENTANGLED_HEADS`, block-sparse attention);
* models without a list of repeated blocks that each hold exactly one known attention block and no other token
  mixer (`unsupported_layers_message`, `check_blocks`): multi-head latent attention, hybrid attention /
  state-space or recurrent stacks, cross-attention, attention layouts of unknown names;
* models with nothing that can be removed exactly in the selected layers (`nothing_prunable_message`).

Kept whole, with a warning: attention blocks whose q/k norm spans all heads (`prunable_head_layouts`, OLMo 2) and
FFNs whose channels are normalised or thresholded together (`normalised_channels`, BitNet, Gemma 3n).
"""

from __future__ import annotations

import re
from typing import Any, cast

from torch import nn

PEFT_PREFIX = "base_model.model."
DOCS = "See docs/architectures.md for the supported families."
# projections that mark multi-head latent attention (keys and values from one shared low-rank projection)
MLA_NAMES = ("kv_a_proj_with_mqa", "kv_b_proj", "kv_a_proj")
# words (of a class name split at its capitals, or of a module name split at "_") that name a token mixer other
# than attention: state-space, recurrent or convolution layers (GPT-2's `Conv1D` is a linear layer, not one)
MIXER_WORDS = ("mamba", "mixer", "ssm", "recurrent", "rnn", "lstm", "rwkv", "retention", "shortconv", "deltanet")


def shown(name: str) -> str:
    """A module name as the user's model knows it (without PEFT's wrapper prefix)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def model_class_name(model: nn.Module) -> str:
    """The class of the model under a PEFT wrapper (e.g. "MixtralForCausalLM", not "PeftModelForCausalLM")."""
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__


# attention classes whose heads are not independent, by what ties them together
ENTANGLED_HEADS: dict[str, str] = {
    "DiffLlamaAttention": "differential attention subtracts attention maps computed with the two halves of the "
    "KV heads, so heads are used in pairs",
}


def check_supported(model: nn.Module) -> None:
    """Raise a ValueError, before any tracing or weight change, for what LoRAPruner cannot prune correctly."""
    from .models import TOWER_WORDS, attention_layouts, check_fused, language_model

    check_fused(model)
    inside = set(language_model(model).modules())
    sparse = getattr(getattr(model, "config", None), "attention_type", "") == "block_sparse"
    for a in attention_layouts(model):
        if a.module not in inside or any(word in a.name.lower() for word in TOWER_WORDS):
            continue  # the towers of other modalities are never pruned
        where = f"{shown(a.name)!r} ({type(a.module).__name__})"
        entangled = ENTANGLED_HEADS.get(type(a.module).__name__)
        if getattr(a.module, "attention_type", None) == "block_sparse" or (
            hasattr(a.module, "set_attention_type") and sparse
        ):
            entangled = (
                "its block-sparse attention is rebuilt from the config (original head counts) whenever the input is "
                "shorter than its blocks; use attention_type='original_full'"
            )
        if entangled:
            raise ValueError(
                f"{model_class_name(model)}: the attention block {where} cannot lose single heads: {entangled}. {DOCS}"
            )
        problem = a.inconsistency()
        if problem:
            raise ValueError(f"{model_class_name(model)}: the attention block {where} {problem}. {DOCS}")
        extras = a.extras()
        if extras.unexplained:
            parts = ", ".join(extras.unexplained[:3]) + (" ..." if len(extras.unexplained) > 3 else "")
            raise ValueError(
                f"{model_class_name(model)}: the attention block {where} holds parts outside its q/k/v/output "
                f"projections that tp_loraprune cannot pair with heads: {parts}. Removing a head would leave them "
                f"misaligned, so the model is refused. {DOCS}"
            )


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList of modules with parameters in the model's language model (its repeated blocks), by
    qualified name."""
    from .models import TOWER_WORDS, language_model

    inside = set(language_model(model).modules())
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if m not in inside or any(word in name.lower() for word in TOWER_WORDS):
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 1 and all(any(True for _ in b.parameters()) for b in m):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    return best


def _attention_like(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Sub-modules of a block (or the block itself, name "") named or typed as attention and holding projections,
    outermost only."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in block.named_modules():
        words = f"{name.rsplit('.', 1)[-1]} {type(m).__name__}".lower()
        if "norm" in type(m).__name__.lower():
            continue
        if ("attn" in words or "attention" in words) and not any(f == "" or name.startswith(f + ".") for f, _ in found):
            if any(_is_projection(c) for c in m.modules() if c is not m):
                found.append((name, m))
    return found


def _words(name: str) -> set[str]:
    """The words of a class name ("FalconH1Mixer" → falcon, h1, mixer; "Lfm2ShortConv" adds shortconv) or module
    name ("linear_attn" → linear, attn)."""
    parts = [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z][a-z0-9]*|[a-z0-9]+", name)]
    return set(parts) | {a + b for a, b in zip(parts, parts[1:], strict=False)}


def _is_mixer(name: str, module: nn.Module) -> bool:
    """A module that mixes tokens without attention, by its class or child name (norms named after one are not)."""
    cls = type(module).__name__
    return "norm" not in cls.lower() and bool((_words(cls) | _words(name.rsplit(".", 1)[-1])) & set(MIXER_WORDS))


def _mixers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Sub-modules of a block that mix tokens without attention (Mamba, SSM, recurrent, short convolution, ...)."""
    return [(name, m) for name, m in block.named_modules() if name and _is_mixer(name, m)]


def check_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Refuse decoder blocks that mix tokens with something besides their attention block (Falcon-H1 runs Mamba
    beside attention in every layer): its channels are neither heads nor FFN channels."""
    names = {m: n for n, m in model.named_modules()}
    for block in blocks:
        mixers = _mixers(block)
        if mixers:
            name, m = mixers[0]
            raise ValueError(
                f"{model_class_name(model)}: the block {shown(names[block])!r} ({type(block).__name__}) runs "
                f"{type(m).__name__} at {shown(f'{names[block]}.{name}')!r} beside its attention: layers that mix "
                f"tokens with a state-space, recurrent or convolution module (hybrid models) are not supported. {DOCS}"
            )


def _linear_children(module: nn.Module) -> str:
    from .lora import lora_layers

    lora = lora_layers(module)
    parts = {m for layer in lora.values() for m in layer.modules() if m is not layer}
    names = [n for n, m in module.named_modules() if n and m not in parts and _is_projection(m)]
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "none"


def _is_projection(m: nn.Module) -> bool:
    from .conv1d import is_linear_like
    from .lora import is_lora_layer

    return is_lora_layer(m) or is_linear_like(m)


def unsupported_layers_message(model: nn.Module, layouts: list) -> str:
    """Why no list of blocks with one known attention block each was found: the family, the module, the reason."""
    cls = model_class_name(model)
    found = _blocks(model)
    if found is None:
        return f"{cls} has no ModuleList of repeated blocks (decoder layers), which LoRAPruner prunes. {DOCS}"
    list_name, blocks = found
    known = {a.module for a in layouts}
    for i, block in enumerate(blocks):
        where = f"{shown(f'{list_name}.{i}')!r} ({type(block).__name__})"
        inside = [m for m in block.modules() if m in known]
        if len(inside) > 1:
            names = [shown(a.name) for a in layouts if a.module in inside]
            return (
                f"{cls}: the block {where} holds {len(inside)} attention blocks ({', '.join(names)}); several "
                f"attention modules per layer (cross-attention, encoder-decoder layers) are not supported. {DOCS}"
            )
        if inside:
            continue
        attention = _attention_like(block)
        for name, m in attention:
            mla = [n for n in MLA_NAMES if isinstance(getattr(m, n, None), nn.Module)]
            if mla:
                at = shown(f"{list_name}.{i}.{name}" if name else f"{list_name}.{i}")
                return (
                    f"{cls}: {type(m).__name__} at {at!r} is multi-head latent attention "
                    f"(MLA: keys and values come from one shared low-rank projection, {mla[0]}), which tp_loraprune "
                    f"cannot prune by heads; MLA models are not supported. {DOCS}"
                )
        bare = [
            (n, m)
            for n, m in block.named_modules()
            if n and _words(n.rsplit(".", 1)[-1]) & {"attn", "attention"} and "norm" not in type(m).__name__.lower()
        ]
        if not attention and bare:
            name, m = bare[0]
            return (
                f"{cls}: the attention block {type(m).__name__} at {shown(f'{list_name}.{i}.{name}')!r} holds its "
                "projections as bare parameters, not linear layers, so its heads cannot be pruned. " + DOCS
            )
        if attention:
            name, m = attention[0]
            at = shown(f"{list_name}.{i}.{name}" if name else f"{list_name}.{i}")
            return (
                f"{cls}: the attention block {type(m).__name__} at {at!r} has "
                f"projections ({_linear_children(m)}) that are neither separate q/k/v/output projections of a known "
                f"name (q_proj/k_proj/v_proj with o_proj, out_proj or dense) nor a declared fused layout, so its "
                f"heads cannot be found. {DOCS}"
            )
        mixers = [f"{type(m).__name__} at {shown(f'{list_name}.{i}.{n}')!r}" for n, m in _mixers(block)]
        what = mixers[0] if mixers else f"children {', '.join(n for n, _ in block.named_children())}"
        return (
            f"{cls}: the block {where} has no attention block ({what}): models whose layers mix tokens without "
            f"attention (state-space, recurrent, convolution or linear-attention layers, alone or in a hybrid "
            f"stack) are not supported. {DOCS}"
        )
    return f"{cls}: no list of blocks with one attention block each was found (checked {shown(list_name)!r}). {DOCS}"


def prunable_head_layouts(layouts: list, across_norms: bool) -> list:
    """The attention blocks (AttentionLayouts) whose heads are pruned: not those where a norm spans all heads
    (removing a head would renormalise the others), unless `across_norms`; one warning names the ones kept."""
    import warnings

    kept = [a for a in layouts if a.extras().spanning and not across_norms]
    if kept:
        a = kept[0]
        names = " and ".join(e.name for e in a.extras().spanning)
        more = f" and {len(kept) - 1} more blocks" if len(kept) > 1 else ""
        warnings.warn(
            f"{shown(a.name)} ({type(a.module).__name__}){more}: {names} normalise all heads together, so removing a "
            "head is not exact; these blocks keep their heads and only FFN channels are pruned there. Pass "
            "heads_across_norms=True to prune them anyway (the error this costs is measured in "
            "docs/architectures.md).",
            stacklevel=3,
        )
    return [a for a in layouts if a not in kept]


def normalised_channels(group, model: nn.Module) -> list[str]:
    """What makes removing a channel group's channels inexact: a norm inside the group (BitNet's `ffn_sub_norm` over
    the FFN's intermediate channels changes its statistic when channels go), or an FFN whose activation depends on
    statistics over all its channels (Gemma 3n's `activation_sparsity`, a cutoff from their mean and std)."""
    parents: dict[nn.Module, nn.Module] = {c: m for m in model.modules() for c in m.children()}
    sparse = set()
    for dep, _ in group:
        owner = parents.get(dep.target.module)  # the MLP, or a LoRA wrapper inside it
        for m in (owner, parents.get(owner) if owner is not None else None):
            if getattr(m, "activation_sparsity", 0):
                sparse.add(f"{type(m).__name__}.activation_sparsity")
    owners = {
        id(p): (f"{n}.{a}" if n else a, m)
        for n, m in model.named_modules()
        for a, p in m.named_parameters(recurse=False)
    }
    found = []
    for dep, _ in group:
        target = dep.target.module
        name, owner = owners.get(id(target), ("", target)) if isinstance(target, nn.Parameter) else ("", target)
        if isinstance(owner, nn.Module) and "norm" in type(owner).__name__.lower():
            found.append(shown(name) or type(owner).__name__)
    return found + sorted(sparse)


def warn_normalised_ffns(kept: list[tuple[str, list[str]]]) -> None:
    """One warning for the FFNs left whole (root name, what spans their channels: `normalised_channels`)."""
    import warnings

    if kept:
        (root, reasons), more = kept[0], f" and {len(kept) - 1} more" if len(kept) > 1 else ""
        warnings.warn(
            f"{shown(root)}{more}: {', '.join(reasons)} act on all of this FFN's intermediate channels together, so "
            "removing channels is not exact; these FFNs keep their width.",
            stacklevel=4,
        )


def nothing_prunable_message(model: nn.Module, layers: list[nn.Module]) -> str:
    """The refusal for a model whose selected layers hold no head and no FFN channel that can be removed exactly."""
    names = {m: n for n, m in model.named_modules()}
    first = shown(names[layers[0]]) if layers else "?"
    return (
        f"{model_class_name(model)}: nothing in the {len(layers)} selected decoder layers (from {first!r}, "
        f"{type(layers[0]).__name__ if layers else '?'}) can be removed exactly: no attention block whose heads can "
        "go and no FFN whose channels can (see the warnings above for the blocks kept whole). "
        f"{DOCS}"
    )


def writes_residual(graph, group, residual: set[int], lora_parts: set[nn.Module]) -> bool:
    """Whether every layer (LoRA factors aside) that takes a channel group's channels as input writes a width of the
    residual stream: an FFN's down projection does; Gemma 3n's AltUp router feeds a small coefficient layer."""
    from .conv1d import features, is_linear_like

    return all(
        features(m)[0] in residual
        for dep, _ in group
        if isinstance(m := dep.target.module, nn.Module)
        and is_linear_like(m)
        and m not in lora_parts
        and graph.is_in_channel_pruning_fn(dep.handler)
    )
