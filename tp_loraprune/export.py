"""Merging LoRA into the pruned model, saving it, and loading it back.

Two on-disk formats, both safetensors plus JSON:

* uniform: every pruned layer has the same shape, so the HF config can describe it. The directory is a
  normal `save_pretrained` directory that `AutoModelForCausalLM.from_pretrained` loads.
* per-layer: layers differ (the default, since the first and last layers are left unpruned). HF configs
  have one width per attribute, so the directory holds the original config, `model.safetensors`, and
  `tp_loraprune.json` with the shape of every linear layer that differs from the config (and of every other
  pruned tensor: expert stacks, routers, attention sinks).
  `tp_loraprune.load_pruned(path)` builds the model from the config, reshapes those layers and loads
  the weights (strict). It never unpickles anything and never enables `trust_remote_code`.

A save is complete only when `tp_loraprune.complete.json` exists: it is written last and records every
file's size and sha256. The directory is written as `<path>.partial` beside `path`, fsynced and renamed,
so `path` appears only complete; `load_pruned` refuses a directory without the marker and says what is
missing or changed. Directories of format_version 1 (saved before the marker existed) still load.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .conv1d import features, is_conv1d, is_linear_like
from .integrity import check_finite, fsync_path, read_json, records, remove_tree, verify_records, write_errors
from .lora import active_adapter, base_layer, base_weight, lora_layers
from .models import config_validates, sync_attention_attributes, sync_config
from .quant import dequantize_model, has_quantized_layers, quantization
from .shapes import changed_tensor_shapes, reshape_tensors

MANIFEST = "tp_loraprune.json"
WEIGHTS = "model.safetensors"
COMPLETE = "tp_loraprune.complete.json"  # written last: the directory is complete only with it
FORMAT_VERSION = 2
_LEGACY_VERSIONS = (1,)  # no completion marker yet
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FLOAT16_MAX = 65504.0


def merge_lora(model: nn.Module, *, dequantize: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every LoRA adapter into its (pruned) base weight and return the plain model.

    Quantized (bitsandbytes) bases are dequantized first and each adapter is added in float,
    W' = W + s·B·A, giving plain `nn.Linear` layers of `dtype` (default: the embedding dtype).
    `dequantize=False` keeps 4-bit bases quantized: PEFT then re-quantizes W' (one more rounding of every
    weight; see docs/quantized.md for what it costs). 8-bit bases are always dequantized: the model PEFT
    re-quantizes after pruning failed in cuBLASLt's int8 matmul on an H200 at a pruned width of 1254.
    """
    if not dequantize and any(quantization(base_layer(m)) == "8bit" for m in lora_layers(model).values()):
        raise ValueError(
            "merge_lora(dequantize=False) cannot keep a pruned 8-bit base quantized: the re-quantized model failed "
            "in bitsandbytes' CUDA int8 matmul (cuBLASLt) at pruned widths in our benchmark. Merge with "
            "dequantize=True (the default) and quantize the result again when loading it, if needed."
        )
    if dequantize and has_quantized_layers(model):
        dtype = dtype or _float_dtype(model)
        for name, layer in lora_layers(model).items():
            base = base_layer(layer)
            if quantization(base) is not None:
                _set_module(model, name, _merged_linear(layer, base, dtype))
        dequantize_model(model, dtype)
    if lora_layers(model) and hasattr(model, "merge_and_unload"):
        model = cast(Any, model).merge_and_unload()
    elif hasattr(model, "peft_config") and hasattr(model, "unload"):
        model = cast(Any, model).unload()
    sync_config(model)
    return model


def _float_dtype(model: nn.Module) -> torch.dtype:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None:
        return embeddings.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _merged_linear(layer: nn.Module, base: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """An `nn.Linear` holding the dequantized base weight plus the active adapter's s·B·A."""
    weight = base_weight(layer) + cast(Any, layer).get_delta_weight(active_adapter(layer)).float()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(cast(torch.Tensor, base.bias).detach().to(dtype), requires_grad=False)
    return linear


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _auto_class_name(model: nn.Module) -> str:
    arch = type(model).__name__
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "AutoModelForCausalLM"
    if arch.endswith("ForImageClassification"):
        return "AutoModelForImageClassification"
    return "AutoModel"


def _linear_shapes(model: nn.Module) -> dict[str, list[int]]:
    """[out_features, in_features] of every nn.Linear and Conv1D (GPT-2) of `model`."""
    return {name: list(features(m)) for name, m in model.named_modules() if is_linear_like(m)}


def _model_class(manifest: dict):
    """The transformers class a saved model is rebuilt with: its own class when transformers has it (a class
    such as Emu3ForCausalLM is not what the auto class maps its config to), else the recorded auto class."""
    import transformers

    own = getattr(transformers, manifest.get("model_class", ""), None)
    if isinstance(own, type) and issubclass(own, transformers.PreTrainedModel):
        return own
    return getattr(transformers, manifest["auto_class"])


def _reference_model(config, auto_class: str, model_class: str = "") -> nn.Module:
    """The model `config` describes, built on the meta device (on the CPU for classes whose construction reads
    tensor values, e.g. Apertus' XIELU activation on transformers 4)."""
    cls = _model_class({"auto_class": auto_class, "model_class": model_class})
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    try:
        with torch.device("meta"):
            return build(config)
    except NotImplementedError:  # "Cannot copy out of meta tensor"
        return build(config)


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    merge: bool = True,
    overwrite: bool = False,
    metadata: dict | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Merge LoRA (unless `merge=False`) and save to `path`; returns the directory.

    `dtype` (torch.float32 / float16 / bfloat16, or their names) is the dtype the floating-point weights are
    saved in; None keeps the model's own. The model is cast in place, as merging changes it in place (modules
    the model class keeps in float32 stay float32, as `from_pretrained` keeps them). float16 is refused when a
    weight exceeds its range (65504); bfloat16 has float32's range at half the size.

    Refuses to write into an existing non-empty directory unless `overwrite=True`, and refuses
    (NonFiniteError) a model with inf/NaN weights. `extra_files` (name → text, or bytes such as a PNG) are
    written into the directory before the completion marker, which records them too. Files go to
    `<path>.partial` first and are renamed into place once complete; if writing fails, the partial directory
    is removed and `path` is untouched.
    """
    path = Path(path)
    save_dtype = resolve_save_dtype(dtype)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ValueError(f"Output directory {path} exists and is not empty; choose a new path or pass overwrite=True.")
    if merge:
        model = merge_lora(model, dtype=save_dtype)
    elif lora_layers(model):
        raise ValueError(
            "save_pruned(merge=False) got a model with LoRA layers; merge first or save the adapter with peft."
        )
    if save_dtype is not None:
        cast_weights(model, save_dtype)
    check_finite(
        model.state_dict().items(),
        what="The model to save",
        fix="Fine-tune again with a lower `lr` (CLI --lr), or in fp32/bf16 instead of fp16.",
    )
    staging = path.with_name(path.name + ".partial")
    remove_tree(staging)  # what an interrupted save left
    staging.mkdir(parents=True)
    try:
        _write_model(model, staging, tokenizer, metadata, extra_files or {})
        _write_marker(staging)
        fsync_path(staging)
        _move_into_place(staging, path)
    except BaseException as e:
        remove_tree(staging)  # gives a full disk its space back; `path` is untouched
        if isinstance(e, write_errors()):
            raise OSError(
                getattr(e, "errno", None) or errno.EIO, f"Saving to {path} failed ({e}); {path} is untouched"
            ) from e
        raise
    return path


def resolve_save_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The torch dtype `save_pruned(dtype=...)` names (None: keep the model's), or a ValueError listing the choices."""
    if dtype is None or dtype in SAVE_DTYPES.values():
        return cast(Any, dtype)
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in SAVE_DTYPES:
        return SAVE_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"`dtype` must be one of {sorted(SAVE_DTYPES)} (or the torch dtype), or None to keep the model's; got "
        f"{dtype!r}."
    )


def _kept_in_float32(model: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Module names the model class keeps in float32 at `dtype` (transformers' `_keep_in_fp32_modules*`)."""
    names = list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        names += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(names)


def float16_overflow(model: nn.Module) -> str | None:
    """'<name> holds <value>' for the first floating-point weight beyond float16's range (±65504), else None."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() and t.dtype != torch.float16:
            largest = float(t.detach().abs().max())
            if largest > _FLOAT16_MAX:
                return f"{name} holds {largest:.4g}"
    return None


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and saved buffers of `model` to `dtype`, in place, and record it in the
    HF config. float16 is refused (ValueError, nothing cast) when a weight exceeds its range."""
    if dtype == torch.float16 and (overflow := float16_overflow(model)):
        raise ValueError(
            f"{overflow}, beyond float16's range (±{_FLOAT16_MAX:.0f}); save in bfloat16 (float32's range at the "
            "same size) or float32. Nothing was cast."
        )
    keep = _kept_in_float32(model, dtype)
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point() and t.dtype != dtype and not any(k in name.split(".") for k in keep):
            t.data = t.data.to(dtype)
    config = getattr(model, "config", None)
    if config is not None:
        config.dtype = dtype
    return model


def _weights_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def saved_layout(model: nn.Module) -> str:
    """The layout `save_pruned` gives a merged model: "uniform" (a plain `save_pretrained` checkpoint) when the
    HF config can describe every layer (a model built from it has every parameter shape of `model`), else
    "per_layer" (`load_pruned` only). Writes the widths into the config when they are uniform, as saving does."""
    if not (sync_config(model) and config_validates(cast(Any, model).config)):
        return "per_layer"
    reference = _reference_model(cast(Any, model).config, _auto_class_name(model), type(model).__name__)
    return "uniform" if _parameter_shapes(reference) == _parameter_shapes(model) else "per_layer"


def _parameter_shapes(model: nn.Module) -> dict[str, list[int]]:  # by qualified name
    return {name: list(p.shape) for name, p in model.named_parameters()}


def _list_lengths(model: nn.Module) -> dict[str, int]:  # ModuleList lengths by qualified name
    return {name: len(m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}


def _write_model(
    model: nn.Module, path: Path, tokenizer, metadata: dict | None, extra_files: dict[str, str | bytes]
) -> None:
    auto_class = _auto_class_name(model)
    uniform = saved_layout(model) == "uniform"
    dtype = _weights_dtype(model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "auto_class": auto_class,
        "model_class": type(model).__name__,
        "layout": "uniform" if uniform else "per_layer",
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "metadata": metadata or {},
    }
    if dtype is not None and getattr(model, "config", None) is not None:
        cast(Any, model).config.dtype = dtype  # what from_pretrained / from_config build the model in
    if uniform:
        cast(Any, model).save_pretrained(path, safe_serialization=True)
    else:
        from safetensors.torch import save_model

        built = _reference_model(model.config, auto_class, type(model).__name__)
        reference = _linear_shapes(built)
        manifest["linear_shapes"] = {n: s for n, s in _linear_shapes(model).items() if reference.get(n) != s}
        # tensors outside linears laid out by heads or experts (Cohere's per-head q/k norms, expert stacks, sinks)
        # and lists of per-head modules (StableLM's per-head norms) that differ from what the config builds
        manifest["tensor_shapes"] = changed_tensor_shapes(model, built)
        lengths = _list_lengths(built)
        manifest["list_lengths"] = {n: k for n, k in _list_lengths(model).items() if lengths.get(n, k) != k}
        cast(Any, model).config.save_pretrained(path)
        if getattr(model, "generation_config", None) is not None:
            cast(Any, model).generation_config.save_pretrained(path)
        save_model(model, str(path / WEIGHTS))
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    for name, content in extra_files.items():
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            (path / name).write_text(content)


def _write_marker(path: Path) -> None:
    """fsync every file, then write the completion marker with their sizes and sha256 (last)."""
    names = [str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()]
    marker = {"format_version": FORMAT_VERSION, "files": records(path, names)}
    (path / COMPLETE).write_text(json.dumps(marker, indent=1))
    fsync_path(path / COMPLETE)


def _move_into_place(staging: Path, path: Path) -> None:
    old = None
    if path.exists():
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        else:  # overwrite=True: the old directory stays whole until the new one is in place
            old = path.with_name(path.name + ".old")
            remove_tree(old)
            path.rename(old)
    staging.rename(path)
    fsync_path(path.parent)
    if old is not None:
        remove_tree(old)


def _resize_linear(linear: nn.Module, out_features: int, in_features: int) -> None:
    """Give an nn.Linear or a Conv1D (weight stored (in, out), widths in `nf`/`nx`) new, uninitialized weights."""
    m = cast(Any, linear)
    like = m.weight
    shape = (in_features, out_features) if is_conv1d(linear) else (out_features, in_features)
    m.weight = nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)
    if m.bias is not None:
        m.bias = nn.Parameter(torch.empty(out_features, dtype=like.dtype, device=like.device))
    if is_conv1d(linear):
        m.nf, m.nx = out_features, in_features
    else:
        m.out_features, m.in_features = out_features, in_features


def check_complete(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """The manifest of a directory saved by `save_pruned`, after checking that the save completed.

    Raises a ValueError saying what is missing or changed: no completion marker (an interrupted save),
    a recorded file missing or of another size, or (with `verify`) another sha256.
    """
    path = Path(path)
    fix = "Save the model again (CLI: the same command with --resume redoes only the merge and the save)."
    if not (path / MANIFEST).is_file():
        partial = path.with_name(path.name + ".partial")
        if partial.is_dir():
            raise ValueError(f"The save to {path} was interrupted: only {partial} (unfinished) exists. {fix}")
        raise ValueError(f"{path} has no {MANIFEST}; it was not saved by tp_loraprune.save_pruned.")
    manifest = read_json(path / MANIFEST, what="Saved model", fix=fix)
    version = manifest.get("format_version")
    if version in _LEGACY_VERSIONS:
        return manifest
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path / MANIFEST} has format_version {version}, expected {FORMAT_VERSION}; save it again with this "
            "version of tp_loraprune, or load it with the version that saved it."
        )
    if not (path / COMPLETE).is_file():
        present = sorted(f.name for f in path.iterdir())
        raise ValueError(
            f"{path} is incomplete: {COMPLETE}, which save_pruned writes last, is missing, so the save was "
            f"interrupted (files present: {', '.join(present)}). {fix}"
        )
    marker = read_json(path / COMPLETE, what="Saved model", fix=fix)
    if not isinstance(marker.get("files"), dict):
        raise ValueError(f"Saved model file {path / COMPLETE} lists no files. {fix}")
    verify_records(path, marker["files"], what="Saved model", fix=fix, source=COMPLETE, hashes=verify)
    return manifest


def load_pruned(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
):
    """Load a model saved by `save_pruned` (either format).

    `dtype` None gives the model in the dtype it was saved in (as `from_pretrained(dtype="auto")`); a torch
    dtype casts it. The directory must be complete (`check_complete`); `verify=False` skips the sha256 of
    every file (sizes are always checked), which saves reading the weights twice.
    """
    import transformers

    path = Path(path)
    manifest_file = path / MANIFEST
    manifest = check_complete(path, verify=verify)
    auto = _model_class(manifest)
    if manifest["layout"] == "uniform":
        return auto.from_pretrained(path, dtype=dtype or "auto", device_map=None).to(device)
    from safetensors.torch import load_model

    config = transformers.AutoConfig.from_pretrained(path)
    model = auto.from_config(config) if hasattr(auto, "from_config") else auto._from_config(config)  # saved dtype
    for name, length in manifest.get("list_lengths", {}).items():
        listed = dict(model.named_modules()).get(name)
        if not isinstance(listed, nn.ModuleList) or length > len(listed):
            raise ValueError(f"{manifest_file} shortens {name!r} to {length}, which is not a longer ModuleList.")
        del listed[length:]
    modules = dict(model.named_modules())
    for name, (out_features, in_features) in manifest["linear_shapes"].items():
        if not is_linear_like(modules.get(name, nn.Identity())):
            raise ValueError(
                f"{manifest_file} reshapes {name!r}, which is not a linear layer of {type(model).__name__}."
            )
        _resize_linear(modules[name], out_features, in_features)
    reshape_tensors(model, manifest.get("tensor_shapes", {}), str(manifest_file))
    sync_attention_attributes(model)
    sync_config(model)
    model = model.to(dtype or _saved_float_dtype(path / WEIGHTS))  # parameters built in another dtype would round
    load_model(model, str(path / WEIGHTS), strict=True)
    return model.to(device).eval()


def _saved_float_dtype(weights: Path) -> torch.dtype:
    """The floating dtype most of a safetensors file's tensors are stored in (read from its header)."""
    from collections import Counter

    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with safe_open(str(weights), framework="pt") as f:
        kinds = Counter(f.get_slice(k).get_dtype() for k in f.keys())
    floats = [(n, k) for k, n in kinds.items() if k in names]
    return names[max(floats)[1]] if floats else torch.float32
