"""Finding PEFT LoRA layers and reading the tensors the criterion needs from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .conv1d import features, is_conv1d, is_linear_like

NO_LORA_HELP = (
    "Wrap the model with peft first, e.g. `model = peft.get_peft_model(model, peft.LoraConfig(r=8, "
    "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']))`: "
    "LoRAPrune scores a weight only through the LoRA factors attached to its layer."
)


def _lora_layer_type():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer that wraps a linear-like base layer (`lora_A`/`lora_B` ModuleDicts)."""
    return isinstance(module, _lora_layer_type()) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All PEFT LoRA layers of `model` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if is_lora_layer(m)}


def base_layer(module: nn.Module) -> nn.Module:
    """The frozen layer under a LoRA wrapper (the module itself when it is not wrapped)."""
    return cast(nn.Module, cast(Any, module).get_base_layer()) if is_lora_layer(module) else module


def active_adapter(layer: nn.Module) -> str:
    """The single active adapter of a LoRA layer; several active adapters are ambiguous for scoring."""
    names = [a for a in cast(Any, layer).active_adapters if a in cast(Any, layer).lora_A]
    if len(names) != 1:
        raise ValueError(
            f"LoRAPrune needs exactly one active LoRA adapter per layer, found {names} on "
            f"{type(layer).__name__}. Call `model.set_adapter(name)` to activate one."
        )
    if getattr(layer, "use_dora", {}).get(names[0], False):
        raise ValueError(
            "DoRA adapters (use_dora=True) are not supported: the LoRAPrune criterion is defined for "
            "W + s·B·A. Create the adapter with `LoraConfig(use_dora=False)`."
        )
    return names[0]


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen base weight as a dense (out, in) tensor (dequantized for bitsandbytes layers; GPT-2's Conv1D
    stores it as (in, out))."""
    from .quant import dequantized_weight, quantization

    base = base_layer(layer)
    if quantization(base) is not None:
        return dequantized_weight(base)
    get_param = getattr(layer, "get_param", None)  # PEFT's ParamWrapper: a parameter, e.g. an MoE router's weight
    weight = cast(torch.Tensor, get_param() if get_param is not None else base.weight)
    if weight.dim() != 2:
        raise TypeError(f"Expected a 2-D linear weight under {type(layer).__name__}, got shape {tuple(weight.shape)}.")
    return weight.detach().t() if is_conv1d(base) else weight.detach()


@dataclass(frozen=True)
class LoRAGradients:
    """The factors of one LoRA layer's active adapter, their gradients and the scaling: no base weight."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    dA: torch.Tensor  # (r, in)
    dB: torch.Tensor  # (out, r)
    scaling: float


@dataclass(frozen=True)
class LoRAFactors(LoRAGradients):
    """What Eq. 10 reads from one LoRA layer: factors, their gradients, the scaling and the base weight."""

    W: torch.Tensor  # (out, in)


def lora_gradients(layer: nn.Module) -> LoRAGradients | None:
    """The active adapter's factors (detached), their gradients and the scaling, or None when the layer has no
    gradient yet. No base weight is read, so nothing is dequantized."""
    name = active_adapter(layer)
    A, B = cast(Any, layer).lora_A[name].weight, cast(Any, layer).lora_B[name].weight
    if A.grad is None or B.grad is None:
        return None
    return LoRAGradients(A.detach(), B.detach(), A.grad, B.grad, float(cast(Any, layer).scaling[name]))


def lora_factors(layer: nn.Module) -> LoRAFactors | None:
    """The factors and gradients of the active adapter, or None when the layer has no gradient yet."""
    g = lora_gradients(layer)
    return None if g is None else LoRAFactors(g.A, g.B, g.dA, g.dB, g.scaling, base_weight(layer))


def lora_b_is_zero(model: nn.Module) -> bool:
    """Whether every LoRA layer's B factor is still all zeros (PEFT's default init, before any update)."""
    return all(not cast(Any, layer).lora_B[active_adapter(layer)].weight.any() for layer in lora_layers(model).values())


def sync_lora_features(model: nn.Module) -> None:
    """Copy the base layers' shapes into PEFT's cached `in_features` / `out_features`."""
    for layer in lora_layers(model).values():
        base = base_layer(layer)
        if is_linear_like(base):
            cast(Any, layer).out_features, cast(Any, layer).in_features = features(base)
