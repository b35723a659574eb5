"""LoRAPrune on bitsandbytes 8-bit and 4-bit frozen bases (CPU; bitsandbytes >= 0.45 runs both on the CPU).

References: the dequantized weights before pruning (row/column slices of them), the explicit Eq. 10 formula
on the dequantized weight, and the same removals replayed on a float model holding the dequantized weights.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import ALL_PROJECTIONS, batch, build_llama, logits, reference_channel_scores, train_step
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'tp_loraprune[quant]')")

from tp_loraprune import LoRAPruneConfig, LoRAPruner  # noqa: E402
from tp_loraprune.importance import LoRAGuidedImportance  # noqa: E402
from tp_loraprune.lora import base_layer, base_weight, lora_layers  # noqa: E402
from tp_loraprune.quant import (  # noqa: E402
    FourBitLinearPruner,
    Int8LinearPruner,
    bnb_config,
    dequantized_weight,
    quantization,
)


def half_step(quant_type: str) -> float:
    """Half the largest gap between neighbouring 4-bit codes, as a fraction of the block absmax: rounding a
    value to the grid of a block moves it by at most this much (nf4: 0.152, fp4: 0.167)."""
    codes = bnb.functional.get_4bit_type(quant_type, device="cpu").sort().values
    return float((codes / codes.abs().max()).diff().max() / 2)


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        warnings.filterwarnings("ignore", message=".*kernels.*")
        yield


def _int8_linear(out_features=8, in_features=128, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=True, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(
        torch.randn(out_features, in_features), requires_grad=False, has_fp16_weights=False
    )
    layer.bias.data.normal_()
    return layer.to("cpu")  # quantizes


def _4bit_linear(quant_type="nf4", out_features=8, in_features=128, seed=0, double_quant=False) -> nn.Module:
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, quant_type=quant_type, compress_statistics=double_quant, compute_dtype=torch.float32
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, in_features),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    layer.bias.data.normal_()
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False  # compare the plain 4-bit kernel before and after pruning
    return layer


# ------------------------------------------------------------------------------------------ single layers
def test_int8_rows_and_columns_are_sliced_exactly():
    layer = _int8_linear()
    W = dequantized_weight(layer)
    x = torch.randn(3, 128)
    y = layer(x)
    rows, cols = [1, 4, 6], [0, 5, 64, 127]
    keep_rows = [i for i in range(8) if i not in rows]
    keep_cols = [j for j in range(128) if j not in cols]

    Int8LinearPruner().prune_out_channels(layer, rows)
    assert layer.out_features == 5 and tuple(layer.bias.shape) == (5,)
    assert torch.equal(dequantized_weight(layer), W[keep_rows])
    torch.testing.assert_close(layer(x), y[:, keep_rows], atol=1e-5, rtol=1e-5)  # same rows, same activations

    Int8LinearPruner().prune_in_channels(layer, cols)
    assert layer.in_features == 124
    assert torch.equal(dequantized_weight(layer), W[keep_rows][:, keep_cols])
    x_masked = x.clone()
    x_masked[:, cols] = 0
    expected = _int8_linear()(x_masked)[:, keep_rows]
    # the activation's row absmax may change with the removed columns: one int8 step of x times |W| row sums
    torch.testing.assert_close(layer(x[:, keep_cols]), expected, atol=0.05 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_rows_are_kept_and_columns_within_one_step(quant_type, double_quant):
    layer = _4bit_linear(quant_type, double_quant=double_quant)
    W = dequantized_weight(layer)
    x = torch.randn(3, 128)
    y = layer(x)
    rows, cols = [0, 3], [2, 9, 70]
    keep_rows = [i for i in range(8) if i not in rows]
    keep_cols = [j for j in range(128) if j not in cols]

    FourBitLinearPruner().prune_out_channels(layer, rows)  # in_features = 2 blocks: blocks are kept whole
    assert (layer.out_features, layer.weight.quant_type) == (6, quant_type)
    if double_quant:  # the block absmaxes are quantized again (8 bits, 256 per block): a tiny rounding
        torch.testing.assert_close(dequantized_weight(layer), W[keep_rows], atol=0.01 * W.abs().max().item(), rtol=0)
    else:  # every kept block reproduces exactly
        assert torch.equal(dequantized_weight(layer), W[keep_rows])
        torch.testing.assert_close(layer(x), y[:, keep_rows], atol=1e-5, rtol=1e-5)

    FourBitLinearPruner().prune_in_channels(layer, cols)  # the blocks regroup: one more rounding per weight
    assert layer.in_features == 125
    error = (dequantized_weight(layer) - W[keep_rows][:, keep_cols]).abs()
    assert error.max() <= half_step(quant_type) * W.abs().max() + 1e-6
    assert error.mean() < 0.05 * W.abs().mean()


# ------------------------------------------------------------------------------------------ whole models
def _quantized_llama(tmp_path, kind: str, *, quant_type="nf4", lora=True, device="cpu"):
    """A tiny LLaMA (hidden 64: whole 4-bit blocks per row) loaded through transformers' bitsandbytes path,
    with LoRA (B non-zero) on every projection unless `lora=False`."""
    import peft
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    build_llama(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2).save_pretrained(tmp_path)
    config = bnb_config(kind, torch.float32, quant_type)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map=device)
    for m in model.modules():
        if quantization(m) == "4bit":
            m.support_avx512bf16_for_cpu = False
    if not lora:
        return model
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=ALL_PROJECTIONS, init_lora_weights=False, lora_dropout=0)
    return peft.get_peft_model(model, config).train()


def _float_copy(quantized, tmp_path, device="cpu"):
    """The same PEFT model with float base layers holding the dequantized weights (the reference)."""
    import peft

    model = build_llama(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2).to(device)
    reference = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=5, target_modules=ALL_PROJECTIONS, init_lora_weights=False)
    )
    float_state = reference.state_dict()
    q_layers = lora_layers(quantized)
    with torch.no_grad():
        for name, layer in lora_layers(reference).items():
            source = q_layers[name]
            base_layer(layer).weight.copy_(dequantized_weight(base_layer(source)))
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)["default"].weight.copy_(getattr(source, part)["default"].weight)
        q_state = quantized.state_dict()
        for key, value in float_state.items():  # embeddings, norms, head
            if "lora_" not in key and "proj" not in key:
                value.copy_(q_state[key])
    return reference.train()


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_scores_on_a_quantized_base_follow_eq10_on_the_dequantized_weight(tmp_path, kind):
    model = _quantized_llama(tmp_path, kind)
    train_step(model)
    imp = LoRAGuidedImportance(ema=0.0, gradient="eq10")
    imp.accumulate(model)
    layer = lora_layers(model)["base_model.model.model.layers.1.mlp.down_proj"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    from peft.utils.integrations import dequantize_bnb_weight

    W = dequantize_bnb_weight(layer.base_layer.weight, getattr(layer.base_layer, "state", None)).float()
    rows, cols = reference_channel_scores(A, B, A.grad, B.grad, W, layer.scaling["default"], "square")
    torch.testing.assert_close(imp.channel_scores(layer.base_layer, "out").double(), rows, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(imp.channel_scores(layer.base_layer, "in").double(), cols, rtol=1e-4, atol=1e-12)


# bitsandbytes' CPU kernels in CI; its CUDA kernels on a GPU machine (opt-in: pytest -m gpu)
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_pruning_a_quantized_model_equals_the_same_removals_in_float(tmp_path, kind, device):
    model = _quantized_llama(tmp_path, kind, device=device)
    reference = _float_copy(model, tmp_path, device)
    config = LoRAPruneConfig(ratio=0.4, total_steps=4, prune_every=2, skip_first=0, skip_last=0, warmup=0, cooldown=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pruner = LoRAPruner(model, config, optimizer=optimizer)
    initial = pruner.parameters
    for step in range(4):
        train_step(model, batch(seed=step).to(device), optimizer)
        pruner.step()
    assert len(pruner.events) == 2
    assert pruner.parameters < 0.75 * initial
    assert all(quantization(base_layer(m)) == kind for m in lora_layers(model).values())  # still quantized

    LoRAPruner(reference, config).replay(pruner.events)
    float_layers = lora_layers(reference)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            base, ref = base_layer(layer), base_layer(float_layers[name])
            assert (base.out_features, base.in_features) == tuple(ref.weight.shape), name
            for part in ("lora_A", "lora_B"):  # the factors were trained in between: take them over
                trained, copy_to = getattr(layer, part)["default"].weight, getattr(float_layers[name], part)["default"]
                assert trained.shape == copy_to.weight.shape, name
                copy_to.weight.copy_(trained)
            W, W_ref = dequantized_weight(base), ref.weight
            if kind == "8bit" or not name.endswith(("o_proj", "down_proj")):
                assert torch.equal(W, W_ref), name  # rows kept whole: exact
            else:  # input channels removed from a 4-bit layer: re-quantized in new blocks at each of 2 events
                assert (W - W_ref).abs().max() <= 2 * half_step("nf4") * W_ref.abs().max() + 1e-6, name
                ref.weight.copy_(W)  # the forward below then checks the layer computes with these weights
    ids = batch(seed=123, size=2, length=10).to(device)
    expected = logits(reference, ids)
    # 8-bit: LLM.int8 also quantizes activations, so agreement is to its matmul's precision
    tolerance = 0.05 if kind == "8bit" else 1e-4
    torch.testing.assert_close(logits(model, ids), expected, atol=tolerance * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_lora_metapruner_on_a_quantized_base_removes_what_loraprune_removes(tmp_path, kind):
    """Torch-Pruning's pruner API (`LoRAMetaPruner`) on a bitsandbytes base: its customized pruners are set."""
    from tp_loraprune import LoRAMetaPruner

    model, twin = _quantized_llama(tmp_path / "a", kind), _quantized_llama(tmp_path / "b", kind)
    train_step(model)
    train_step(twin)
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    pruner = LoRAMetaPruner(model, importance=imp, pruning_ratio=0.25, prune_num_heads=True, head_pruning_ratio=0.5)
    event = pruner.step()
    reference = LoRAPruner(
        twin, LoRAPruneConfig(head_ratio=0.5, channel_ratio=0.25, layers=[0, 1], gradient=imp.gradient)
    )
    reference.importance.accumulate(twin)
    assert event["removed"] == reference.prune(1.0)["removed"]
    assert all(quantization(base_layer(m)) == kind for m in lora_layers(model).values())  # still quantized
    torch.testing.assert_close(logits(model), logits(twin), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_merged_dequantized_model_saves_and_reloads(tmp_path, kind):
    from tp_loraprune import load_pruned, save_pruned
    from tp_loraprune.export import merge_lora

    model = _quantized_llama(tmp_path / "src", kind)
    config = LoRAPruneConfig(ratio=0.3, total_steps=2, prune_every=2, skip_first=0, skip_last=0, warmup=0, cooldown=0)
    pruner = LoRAPruner(model, config)
    for step in range(2):
        train_step(model, batch(seed=step))
        pruner.step()
    unmerged = logits(model)
    expected = {n: base_weight(m) + m.get_delta_weight("default") for n, m in lora_layers(model).items()}
    merged = merge_lora(model, dtype=torch.float32)
    assert not any(quantization(m) for m in merged.modules())
    assert not lora_layers(merged) and getattr(merged.config, "quantization_config", None) is None
    modules = dict(merged.named_modules())
    for name, weight in expected.items():  # W' = dequantized W + s·B·A, in float
        layer = modules[name.removeprefix("base_model.model.")]
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight), name
    # the unmerged 8-bit forward also quantizes activations (LLM.int8): agreement to a few percent only
    tolerance = 0.1 if kind == "8bit" else 1e-4
    torch.testing.assert_close(logits(merged), unmerged, atol=tolerance * unmerged.abs().max().item(), rtol=0)

    out = save_pruned(merged, tmp_path / "pruned")
    torch.testing.assert_close(logits(load_pruned(out)), logits(merged), atol=0, rtol=0)


def test_merging_into_the_quantized_base_keeps_it_quantized(tmp_path):
    from tp_loraprune.export import merge_lora

    model = _quantized_llama(tmp_path, "4bit")
    expected = {
        name: base_weight(layer) + layer.get_delta_weight("default") for name, layer in lora_layers(model).items()
    }
    merged = merge_lora(model, dequantize=False)
    assert not lora_layers(merged)
    modules = dict(merged.named_modules())
    for name, weight in expected.items():  # W + s·B·A rounded to 4 bits again: within one quantization step
        layer = modules[name.removeprefix("base_model.model.")]
        assert quantization(layer) == "4bit", name
        assert (dequantized_weight(layer) - weight).abs().max() <= half_step("nf4") * weight.abs().max() + 1e-6, name


def test_keeping_a_pruned_8bit_base_quantized_is_refused(tmp_path):
    from tp_loraprune.export import merge_lora

    model = _quantized_llama(tmp_path, "8bit")
    with pytest.raises(ValueError, match="dequantize=True"):
        merge_lora(model, dequantize=False)
    assert lora_layers(model)  # nothing was merged


def test_one_call_driver_on_a_quantized_base_returns_a_plain_model(tmp_path):
    from tp_loraprune.train import TrainConfig, prune

    model = _quantized_llama(tmp_path, "8bit", lora=False)  # the driver adds LoRA
    blocks = torch.randint(0, 64, (8, 16))
    config = LoRAPruneConfig(ratio=0.2, total_steps=4, prune_every=2, skip_first=0, skip_last=0)
    train = TrainConfig(batch_size=2, block_size=16, lora_r=2, progress=False, target_modules=ALL_PROJECTIONS)
    result = prune(model, None, blocks, config, train)
    assert result.events and not any(quantization(m) for m in result.model.modules())
    assert result.summary["parameters"] < result.summary["initial_parameters"]


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantize_model_in_memory_matches_transformers_loading(tmp_path, kind):
    import peft

    from tp_loraprune.quant import quantize_model

    loaded = _quantized_llama(tmp_path, kind, lora=False)
    float_model = build_llama(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2)
    in_memory = quantize_model(float_model, kind)
    loaded_layers = dict(loaded.named_modules())
    quantized = [(n, m) for n, m in in_memory.named_modules() if quantization(m)]
    assert len(quantized) == 14 and quantization(in_memory.lm_head) is None
    for name, layer in quantized:
        assert torch.equal(dequantized_weight(layer), dequantized_weight(loaded_layers[name])), name
    wrapped = peft.get_peft_model(in_memory, peft.LoraConfig(r=2, target_modules=ALL_PROJECTIONS))
    assert all(type(m).__module__ == "peft.tuners.lora.bnb" for m in lora_layers(wrapped).values())


# ------------------------------------------------------------------------------------------ bad input
def test_float_weight_8bit_layers_and_unquantized_4bit_layers_are_refused(tmp_path):
    model = _quantized_llama(tmp_path, "8bit")
    target = base_layer(lora_layers(model)["base_model.model.model.layers.0.mlp.up_proj"])
    target.state.has_fp16_weights = True
    with pytest.raises(TypeError, match="has_fp16_weights=True"):
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2))

    model = _quantized_llama(tmp_path / "4", "4bit")
    target = base_layer(lora_layers(model)["base_model.model.model.layers.0.mlp.up_proj"])
    target.weight.quant_state = None
    with pytest.raises(ValueError, match="never quantized"):
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2))


def test_bad_quantization_settings_and_devices_are_refused(tmp_path):
    from tp_loraprune.train import TrainConfig, prepare_lora_model

    with pytest.raises(ValueError, match="quantize must be one of"):
        bnb_config("3bit")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        bnb_config("4bit", quant_type="int4")
    model = _quantized_llama(tmp_path, "8bit")
    with pytest.raises(ValueError, match="device_map='cuda'"):
        prepare_lora_model(model, TrainConfig(device="cuda"))
    plain = _quantized_llama(tmp_path / "plain", "8bit", lora=False)
    with pytest.raises(ValueError, match="lora_init='pissa'.*residual"):
        prepare_lora_model(plain, TrainConfig(lora_init="pissa"))
    auto = prepare_lora_model(plain, TrainConfig(lora_init="auto"))  # PEFT's default init: B = 0
    assert all(not layer.lora_B["default"].weight.any() for layer in lora_layers(auto).values())


@pytest.mark.parametrize("ranking", ["local", "global"])
def test_pruned_8bit_bases_keep_ffn_widths_at_multiples_of_4(tmp_path, ranking):
    """cuBLASLt's int8 matmul fails on inner dimensions that are not multiples of 4 (seen on an H200 at width
    17755), so 8-bit bases round FFN widths to multiples of 4 even with round_to=1; a float base does not."""
    config = LoRAPruneConfig(ratio=0.33, ranking=ranking, skip_first=0, skip_last=0)  # 128 -> 85.75 channels
    widths = {}
    for kind in ("8bit", "float"):
        model = _quantized_llama(tmp_path, "8bit")
        model = model if kind == "8bit" else _float_copy(model, tmp_path)
        pruner = LoRAPruner(model, config)
        assert pruner.channel_multiple == (4 if kind == "8bit" else 1)
        train_step(model)
        pruner.importance.accumulate(model)
        pruner.prune(1.0)
        widths[kind] = [base_layer(m).in_features for n, m in lora_layers(model).items() if n.endswith("down_proj")]
    assert all(w % 4 == 0 and w < 128 for w in widths["8bit"]), widths
    assert any(w % 4 for w in widths["float"]), widths  # the same target would give the int8 matmul a bad width
