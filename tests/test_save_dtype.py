"""Saving in a chosen dtype: `save_pruned(dtype=...)` and the CLI's `--save-dtype` (auto: the dtype the base model
is stored in, bfloat16 for a quantized GGUF). The saved file holds that dtype at its size, `load_pruned` and
`from_pretrained` load it in that dtype, and its logits equal the float32 model's within the dtype's rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import logits, wrap_peft
from test_serving import PROMPT, pruned, tiny_llama
from tiny_tokenizer import tiny_tokenizer

from tp_loraprune import LoRAPruneConfig, load_pruned, save_pruned
from tp_loraprune.export import MANIFEST, WEIGHTS, merge_lora

# max |Δlogit| / max |logit| of a tiny LLaMA whose weights are rounded to the dtype (8 and 11 bits of mantissa)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _file_dtypes(path: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def _ids() -> torch.Tensor:
    return torch.tensor([tiny_tokenizer().encode(PROMPT)])


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    error = (got.float() - want).abs().max() / want.abs().max()
    assert 0 < error < TOLERANCE[dtype], f"relative logit error {error:.2e} at {dtype}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_layer_save_in_half_precision_is_half_the_size_and_loads_in_it(tmp_path, dtype):
    model = merge_lora(pruned(LoRAPruneConfig(ratio=0.3, layers=[1])))  # layers differ: the per-layer layout
    reference, fp32 = logits(model, _ids()), {k: v.clone() for k, v in model.state_dict().items()}
    full = save_pruned(model, tmp_path / "fp32")
    half = save_pruned(model, tmp_path / "half", dtype=str(dtype).removeprefix("torch."))
    assert json.loads((half / MANIFEST).read_text())["layout"] == "per_layer"
    assert _file_dtypes(full / WEIGHTS) == {torch.float32} and _file_dtypes(half / WEIGHTS) == {dtype}
    ratio = (half / WEIGHTS).stat().st_size / (full / WEIGHTS).stat().st_size
    assert 0.49 < ratio < 0.52, ratio  # the header is the only part that does not halve
    loaded = load_pruned(half)
    assert {p.dtype for p in loaded.parameters()} == {dtype} and loaded.config.dtype == dtype
    for name, tensor in loaded.state_dict().items():  # exactly the float32 weights rounded once
        assert torch.equal(tensor, fp32[name].to(dtype)), name
    _close(logits(load_pruned(half, dtype=torch.float32), _ids()), reference, dtype)
    assert {p.dtype for p in load_pruned(full).parameters()} == {torch.float32}  # None: the saved dtype


def test_servable_save_in_bfloat16_loads_with_from_pretrained_in_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    model = merge_lora(pruned(LoRAPruneConfig(ratio=0.3, servable=True)))
    reference = logits(model, _ids())
    out = save_pruned(model, tmp_path / "m", tiny_tokenizer(), dtype=torch.bfloat16)
    assert json.loads((out / MANIFEST).read_text())["layout"] == "uniform"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _file_dtypes(out / "model.safetensors") == {torch.bfloat16}
    served = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert served.dtype == torch.bfloat16
    _close(logits(served.float(), _ids()), reference, torch.bfloat16)
    assert load_pruned(out).dtype == torch.bfloat16


def test_bad_dtypes_are_refused_before_the_model_changes(tmp_path):
    model = wrap_peft(tiny_llama())
    with pytest.raises(ValueError, match=r"`dtype` must be one of \['bfloat16', 'float16', 'float32'\]"):
        save_pruned(model, tmp_path / "m", dtype="int8")
    assert any("lora_A" in n for n, _ in model.named_parameters()) and not (tmp_path / "m").exists()
    merged = merge_lora(model)
    with torch.no_grad():
        merged.model.layers[0].mlp.down_proj.weight[0, 0] = 1e5  # beyond float16's range
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight holds 1e\+05, beyond float16's range"):
        save_pruned(merged, tmp_path / "m", dtype=torch.float16)
    assert {p.dtype for p in merged.parameters()} == {torch.float32} and not (tmp_path / "m").exists()
    save_pruned(merged, tmp_path / "m", dtype=torch.bfloat16)  # bfloat16 has float32's range
    assert load_pruned(tmp_path / "m").model.layers[0].mlp.down_proj.weight[0, 0] == 1e5


def _gguf(path: Path, matrix_type: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    weight = np.random.default_rng(0).standard_normal((4, 32)).astype("float32")
    if matrix_type == "Q8_0":
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(weight, kind), raw_dtype=kind)
    else:
        writer.add_tensor("blk.0.ffn_up.weight", weight.astype({"F16": "float16", "F32": "float32"}[matrix_type]))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(32, dtype="float32"))  # 1-D tensors stay F32 in any GGUF
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "matrix_type, expected", [("Q8_0", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)]
)
def test_auto_is_the_stored_dtype_and_bfloat16_for_a_quantized_gguf(tmp_path, matrix_type, expected):
    pytest.importorskip("gguf")
    from tp_loraprune.loading import stored_dtype

    assert stored_dtype(_gguf(tmp_path / f"m-{matrix_type}.gguf", matrix_type)) == expected
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    assert stored_dtype(folder) == torch.bfloat16
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert stored_dtype(folder) is None  # unknown: the CLI then saves in the dtype the model was trained in


DIRS = ("auto", "fp32")


def test_cli_saves_in_the_stored_dtype_and_reports_the_weights_as_saved(tmp_path, monkeypatch, capsys):
    from test_cli import _tiny_model_and_tokenizer

    from tp_loraprune import cli

    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _tiny_model_and_tokenizer)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    argv = ["prune", "--model", str(source), "--steps", "8", "--prune-every", "2", "--block-size", "32"]
    argv += ["--max-blocks", "16", "--heldout", "2", "--eval-windows", "0", "--prompt", ""]
    assert cli.main([*argv, "--out", str(tmp_path / "auto")]) == 0
    assert "weights saved in bfloat16 (--save-dtype auto)" in capsys.readouterr().out
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["saved_dtype"] == "bfloat16" and _file_dtypes(tmp_path / "auto" / WEIGHTS) == {torch.bfloat16}
    assert "| Weights | bfloat16 safetensors |" in (tmp_path / "auto" / "README.md").read_text()
    assert cli.main([*argv, "--out", str(tmp_path / "fp32"), "--save-dtype", "float32"]) == 0
    assert _file_dtypes(tmp_path / "fp32" / WEIGHTS) == {torch.float32}
    # the same run and data: the reported perplexity after is that of the saved (rounded) weights
    after = {
        d: json.loads((tmp_path / d / "report.json").read_text())["heldout_perplexity_after"] for d in ("auto", "fp32")
    }
    assert after["auto"] != after["fp32"] and after["auto"] == pytest.approx(after["fp32"], rel=2e-2)


def test_eval_computes_in_float32_unless_asked_for_the_saved_dtype(tmp_path, capsys):
    from test_cli import _data_dir

    from tp_loraprune import cli

    model = merge_lora(pruned(LoRAPruneConfig(ratio=0.3, layers=[1])))
    out = save_pruned(model, tmp_path / "m", tiny_tokenizer(), dtype="bfloat16")
    argv = ["eval", "--model", str(out), "--data-dir", str(_data_dir(tmp_path)), "--ppl", "wikitext2"]
    argv += ["--seq-len", "32", "--max-windows", "2"]
    results = {}
    for dtype in ("float32", "auto"):
        assert cli.main([*argv, "--dtype", dtype, "--output", str(tmp_path / f"{dtype}.json")]) == 0
        results[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())
    assert results["float32"]["dtype"] == "float32" and results["auto"]["dtype"] == "bfloat16"
    assert "weights in bfloat16" in capsys.readouterr().out
    ppl = {d: r["wikitext2_ppl"] for d, r in results.items()}  # the same weights, computed in another precision
    assert ppl["auto"] == pytest.approx(ppl["float32"], rel=2e-2)
