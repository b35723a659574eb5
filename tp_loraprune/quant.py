"""bitsandbytes base layers: their dequantized weight for scoring, and pruning them in place.

LoRAPrune needs only LoRA gradients, so the frozen base may be an 8-bit (`Linear8bitLt`, LLM.int8) or
4-bit (`Linear4bit`, nf4/fp4) bitsandbytes layer. This module holds everything that depends on how
those layers store their weight:

* `dequantized_weight`: one layer's weight as a dense float (out, in) tensor, for the criterion.
* `Int8LinearPruner`: 8-bit weights are quantized per row (int8 codes `CB` and one absmax `SCB` per
  output row), so removing rows slices codes and scales, and removing columns slices codes. Both are
  exact: the kept weights dequantize to the same values as before.
* `FourBitLinearPruner`: 4-bit weights are quantized in blocks of the flattened weight (absmax per
  `blocksize` values, optionally quantized again). The pruner dequantizes the layer, slices it and
  quantizes it again with the same settings. Removing rows keeps every block of the kept rows when
  `in_features` is a multiple of the block size, and re-quantizing such a block reproduces it (its
  absmax element maps to the code ±1); removing columns regroups the blocks and adds at most one
  quantization step of error per weight.

Both pruners are Torch-Pruning customized pruners (`customized_pruners(model)` gives the mapping for
`DependencyGraph.build_dependency`). Importing this module does not import bitsandbytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import nn

INT8 = "Linear8bitLt"
FOUR_BIT = "Linear4bit"
SUPPORTED_4BIT_TYPES = ("nf4", "fp4")


def quantization(module: nn.Module) -> str | None:
    """ "8bit", "4bit" or None: the bitsandbytes storage of a linear layer's weight."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    names = {cls.__name__ for cls in type(module).__mro__}
    if INT8 in names:
        return "8bit"
    if FOUR_BIT in names:
        return "4bit"
    return None


def has_quantized_layers(model: nn.Module) -> bool:
    return any(quantization(m) for m in model.modules())


def _int8_codes_and_scales(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (out, in), row absmax (out,)) of a quantized Linear8bitLt, wherever bitsandbytes keeps them."""
    weight, state = cast(Any, layer).weight, cast(Any, layer).state
    if state.has_fp16_weights or weight.dtype != torch.int8:
        raise TypeError(
            f"Linear8bitLt with has_fp16_weights=True (dtype {weight.dtype}) is a float layer trained in 8 bits, "
            "not a quantized frozen base. Load the model with `BitsAndBytesConfig(load_in_8bit=True)`."
        )
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
    if scales is None:
        raise ValueError(
            "This Linear8bitLt holds int8 codes without row scales (SCB); move it to its device once "
            "(`layer.to(device)`) so bitsandbytes quantizes it, or load the model with BitsAndBytesConfig."
        )
    return weight.data, scales


def _4bit_data_and_state(weight) -> tuple[torch.Tensor, Any]:
    """The packed 4-bit data and its quant state, undoing bitsandbytes' CPU inference packing if present."""
    data, state = weight.data, weight.quant_state
    if state is None:
        raise ValueError(
            "This Linear4bit has no quant_state: it was never quantized. Load the model with "
            "`BitsAndBytesConfig(load_in_4bit=True)` or move the layer to its device once."
        )
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return data, state


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes layer as a dense float (out, in) tensor (a new tensor: one layer at a time)."""
    kind = quantization(layer)
    if kind == "8bit":
        codes, scales = _int8_codes_and_scales(layer)
        return codes.float() * (scales.float() / 127.0).unsqueeze(1)
    if kind == "4bit":
        import bitsandbytes.functional as F

        data, state = _4bit_data_and_state(cast(Any, layer).weight)
        return F.dequantize_4bit(data, state).float()
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes 8-bit or 4-bit linear layer.")


def _kept(n: int, removed: Sequence[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)


def _slice_bias(layer: nn.Module, keep: torch.Tensor) -> None:
    bias = cast(Any, layer).bias
    if bias is not None:
        layer.bias = nn.Parameter(bias.data[keep.to(bias.device)].clone(), requires_grad=bias.requires_grad)


def _set_int8_weight(layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Give a Linear8bitLt new int8 codes (out, in) and row scales (out,)."""
    from bitsandbytes.nn import Int8Params

    codes, scales = codes.contiguous(), scales.contiguous()
    layer.weight = Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    state = cast(Any, layer).state
    state.CB, state.SCB = None, None  # forward moves the new codes and scales into the state
    cast(Any, layer).out_features, cast(Any, layer).in_features = codes.shape


def _set_4bit_weight(layer: nn.Module, dense: torch.Tensor, quant_type: str, blocksize: int, nested: bool) -> None:
    """Quantize a dense (out, in) weight into a Linear4bit (on the weight's device)."""
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Params4bit

    storage = getattr(cast(Any, layer).weight, "quant_storage", torch.uint8)
    packed, state = F.quantize_4bit(
        dense.contiguous(),
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )
    layer.weight = Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
        module=cast(Any, layer),
        bnb_quantized=True,
    )
    cast(Any, layer).quant_state = state
    cast(Any, layer).out_features, cast(Any, layer).in_features = dense.shape


class Int8LinearPruner(tp.pruner.function.BasePruningFunc):
    """Removes rows / columns of a quantized `Linear8bitLt` by slicing its int8 codes and row scales."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        codes, scales = _int8_codes_and_scales(layer)
        keep = _kept(codes.shape[0], idxs).to(codes.device)
        _set_int8_weight(layer, codes[keep], scales[keep])
        _slice_bias(layer, keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        codes, scales = _int8_codes_and_scales(layer)
        keep = _kept(codes.shape[1], idxs).to(codes.device)
        _set_int8_weight(layer, codes[:, keep], scales)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return cast(int, layer.out_features)

    def get_in_channels(self, layer: nn.Module) -> int:
        return cast(int, layer.in_features)


class FourBitLinearPruner(tp.pruner.function.BasePruningFunc):
    """Removes rows / columns of a `Linear4bit` by dequantizing, slicing and quantizing with the same settings."""

    def _requantize(self, layer: nn.Module, dense: torch.Tensor) -> None:
        old = cast(Any, layer).weight
        _, state = _4bit_data_and_state(old)
        _set_4bit_weight(layer, dense.to(state.dtype), old.quant_type, old.blocksize, old.compress_statistics)
        # bitsandbytes' optional CPU inference repacking assumes widths in multiples of its tiles (32 rows,
        # whole blocks per row); pruned widths need not be, so pruned layers use the plain 4-bit kernel.
        cast(Any, layer).support_avx512bf16_for_cpu = False

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dense = dequantized_weight(layer)
        keep = _kept(dense.shape[0], idxs).to(dense.device)
        self._requantize(layer, dense[keep])
        _slice_bias(layer, keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dense = dequantized_weight(layer)
        keep = _kept(dense.shape[1], idxs).to(dense.device)
        self._requantize(layer, dense[:, keep])
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return cast(int, layer.out_features)

    def get_in_channels(self, layer: nn.Module) -> int:
        return cast(int, layer.in_features)


def check_quantized(model: nn.Module) -> None:
    """Refuse quantized layers that cannot be scored or pruned, before any work is done."""
    for name, m in model.named_modules():
        kind = quantization(m)
        if kind == "8bit":
            _int8_codes_and_scales(m)
        elif kind == "4bit":
            quant_type = getattr(cast(Any, m).weight, "quant_type", None)
            if quant_type not in SUPPORTED_4BIT_TYPES:
                raise ValueError(
                    f"{name}: 4-bit quant_type {quant_type!r} is not supported; use one of {SUPPORTED_4BIT_TYPES}."
                )
            _4bit_data_and_state(cast(Any, m).weight)


# cuBLASLt's int8 matmul (LLM.int8's forward and backward) needs the inner dimension to be a multiple of 4: an
# 8-bit down_proj with 17755 input channels fails there ("cublasLt ran into an error").
INT8_WIDTH_MULTIPLE = 4


def width_multiple(model: nn.Module) -> int:
    """The multiple every pruned width must stay at for the model's quantized layers to run (1: any width)."""
    return INT8_WIDTH_MULTIPLE if any(quantization(m) == "8bit" for m in model.modules()) else 1


def customized_pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """Torch-Pruning pruners for the bitsandbytes layer types present in `model` (empty when there are none)."""
    pruners: dict[type, tp.pruner.function.BasePruningFunc] = {}
    for m in model.modules():
        kind = quantization(m)
        if kind is not None and type(m) not in pruners:
            pruners[type(m)] = Int8LinearPruner() if kind == "8bit" else FourBitLinearPruner()
    return pruners


QUANTIZE_CHOICES = ("8bit", "4bit")


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    kind: str,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    threshold: float = 6.0,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Turn the `nn.Linear` layers of an in-memory model into bitsandbytes layers, in place, on their device.

    What `from_pretrained(..., quantization_config=bnb_config(kind))` does at load time (same defaults: LLM.int8
    outlier threshold 6.0, nf4 without double quantization, the output head left in float), for a model that
    is already in memory. One layer at a time, so the float model is never held twice.
    """
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {kind!r}.")
    if quant_type not in SUPPORTED_4BIT_TYPES:
        raise ValueError(f"4-bit quant_type must be one of {SUPPORTED_4BIT_TYPES}, got {quant_type!r}.")
    device = next((p.device for p in model.parameters()), None)
    bnb = require_bitsandbytes(kind, device)
    import bitsandbytes.functional as F

    for name, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear or name.split(".")[-1] in skip:
            continue
        weight = linear.weight.detach()
        bias = linear.bias is not None
        if kind == "8bit":
            layer: nn.Module = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=bias,
                has_fp16_weights=False,
                threshold=threshold,
                device="meta",
            )
            codes, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
            _set_int8_weight(layer, codes, scales)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias,
                compute_dtype=compute_dtype or weight.dtype,
                quant_type=quant_type,
                compress_statistics=double_quant,
                device="meta",
            )
            _set_4bit_weight(layer, weight, quant_type, 64, double_quant)
        if bias:
            layer.bias = nn.Parameter(cast(torch.Tensor, linear.bias).detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    flag = "is_loaded_in_8bit" if kind == "8bit" else "is_loaded_in_4bit"
    setattr(model, flag, True)  # how PEFT picks its bitsandbytes LoRA layers
    return model


BNB_MIN_VERSION = (0, 50)  # the first release whose 8-bit and 4-bit layers run forwards on the CPU too


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def require_bitsandbytes(kind: str, device: str | torch.device | None = None, *, loader: bool = False):
    """bitsandbytes, imported and checked to work for a `kind` ("8bit" / "4bit") base on `device`.

    Raises ImportError in one line, with the fix, when it is not installed, fails to import on this platform,
    is older than 0.50, or has no backend for the device type; `loader=True` (loading through transformers'
    `BitsAndBytesConfig`) also needs accelerate."""
    import importlib.util

    what = f"quantize={kind!r} (a bitsandbytes {kind} base)"
    fix = "pip install 'tp_loraprune[quant]'"
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {fix}.") from None
    except Exception as e:  # e.g. a build for another platform or CUDA version raising while it loads its library
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ImportError(
            f"{what}: bitsandbytes is installed but fails to import here ({type(e).__name__}: {first}); reinstall "
            f"it for this platform ({fix}, or pip install --force-reinstall 'bitsandbytes>=0.50'), or run without "
            "quantize."
        ) from None
    version = str(getattr(bnb, "__version__", "0"))
    if _version_tuple(version) < BNB_MIN_VERSION:
        raise ImportError(
            f"{what} needs bitsandbytes >= {'.'.join(map(str, BNB_MIN_VERSION))} (installed: {version}; older "
            "releases have no CPU kernels and other layer internals): pip install -U 'bitsandbytes>=0.50'."
        )
    if device is not None:
        device_type = torch.device(device).type
        supported = getattr(bnb, "supported_torch_devices", {"cuda"})
        if device_type not in supported:
            raise ImportError(
                f"{what}: bitsandbytes {version} has no backend for {device_type!r} devices (it supports "
                f"{', '.join(sorted(supported))}); use one of those devices, or run without quantize."
            )
    if loader and importlib.util.find_spec("accelerate") is None:
        raise ImportError(
            f"{what}: loading a model quantized goes through transformers' bitsandbytes loader, which needs "
            f"accelerate: {fix} (or pip install accelerate)."
        )
    return bnb


def bnb_config(
    kind: str,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
    *,
    device: str | torch.device | None = None,
):
    """A transformers `BitsAndBytesConfig` for an 8-bit (LLM.int8) or 4-bit (nf4/fp4) frozen base.

    Checks first that bitsandbytes (and accelerate, which transformers' loader needs) can serve it on `device`
    (`require_bitsandbytes`: a one-line ImportError with the fix otherwise)."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {kind!r}.")
    if quant_type not in SUPPORTED_4BIT_TYPES:
        raise ValueError(f"4-bit quant_type must be one of {SUPPORTED_4BIT_TYPES}, got {quant_type!r}.")
    require_bitsandbytes(kind, device, loader=True)
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every bitsandbytes linear (also under LoRA wrappers) by an `nn.Linear` of `dtype`, in place.

    Returns the model. Use it before merging LoRA to get a plain pruned model that saves and reloads
    like any other; the HF config's `quantization_config` is removed.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if quantization(child) is None:
                continue
            dense = dequantized_weight(child)
            linear = nn.Linear(dense.shape[1], dense.shape[0], bias=child.bias is not None, device=dense.device)
            linear.weight = nn.Parameter(dense.to(dtype), requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(cast(torch.Tensor, child.bias).data.to(dtype), requires_grad=False)
            setattr(parent, child_name, linear)
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized"):
            if getattr(m, flag, False) is True:
                try:
                    setattr(m, flag, False)
                except AttributeError:  # a read-only property derived from the config
                    pass
        if getattr(m, "hf_quantizer", None) is not None:
            cast(Any, m).hf_quantizer = None
    return model
