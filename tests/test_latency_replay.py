"""The latency table's replay of a model's own attention and FFN blocks: the cut copy computes what the block
computes with the removed heads or channels masked, the captured arguments hold no cache, and the model is left as
it was."""

import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tp_loraprune.latency import fastest_seconds, interpolate
from tp_loraprune.latency_replay import (
    attention_seconds,
    block_inputs,
    cut_copy,
    cut_ffn_copy,
    ffn_replayable,
    ffn_seconds,
    replayable,
)
from tp_loraprune.lora import base_layer
from tp_loraprune.models import attention_layouts

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),  # no biases
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # q / k / v biases
}


def _tiny(family: str, targets, kv_heads: int = 2, intermediate: int = 48):
    """A seeded 2-layer model of `family` (hidden 32, 4 heads of 8) in eval mode with LoRA on `targets`."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
    )
    lora = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model_cls(config).eval(), lora)


def _model(family: str, kv_heads: int):
    return _tiny(family, ["q_proj", "k_proj", "v_proj", "o_proj"], kv_heads)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads, heads, kept_kv", [(2, 2, 2), (2, 2, 1), (4, 2, 2)])
def test_cut_copy_equals_the_block_with_the_removed_heads_masked(family, kv_heads, heads, kept_kv):
    model = _model(family, kv_heads)
    layout = next(a for a in attention_layouts(model) if a.name.endswith("layers.1.self_attn"))
    assert replayable(layout)
    before = copy.deepcopy(model.state_dict())
    args, kwargs = block_inputs(model, layout.module, tokens=6)
    assert all(kwargs.get(name) in (None, False) for name in ("past_key_values", "use_cache"))
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())

    cut = cut_copy(layout, heads, kept_kv)
    size = 4 // kv_heads
    kept = [g * size + j for g in range(kept_kv) for j in range(heads // kept_kv)]
    with torch.no_grad(), model.disable_adapter():  # the cut copy has no LoRA
        reference = copy.deepcopy(layout.module)
        o = reference.o_proj.base_layer
        for h in set(range(4)) - set(kept):
            o.weight[:, h * 8 : (h + 1) * 8] = 0.0
        expected = reference(*args, **kwargs)[0]
        got = cut(*args, **kwargs)[0]
    assert cut.q_proj.out_features == heads * 8 and cut.k_proj.out_features == kept_kv * 8
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_attention_seconds_times_the_cut_block():
    model = _model("llama", 2)
    layout = attention_layouts(model)[0]
    inputs = block_inputs(model, layout.module, tokens=8)
    seconds = attention_seconds(layout, inputs, 2, 2, lambda fn: fastest_seconds(fn, torch.device("cpu"), 2))
    assert seconds > 0
    assert attention_seconds(layout, inputs, 0, 0, lambda fn: 1.0) == 0.0


def test_a_block_that_cannot_be_replayed_is_timed_synthetic_with_a_warning(flop_timer):
    """OPT's learned positions stop at 16: a latency table for 64 tokens cannot run the model's forward, so the
    pruner warns and times synthetic blocks instead of failing."""
    from transformers import OPTConfig, OPTForCausalLM

    from tp_loraprune import LoRAPruneConfig, LoRAPruner

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        word_embed_proj_dim=32,
    )
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    model = peft.get_peft_model(OPTForCausalLM(config), peft.LoraConfig(r=4, target_modules=targets))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="could not be replayed for the latency table"):
        pruner = LoRAPruner(
            model, LoRAPruneConfig(ratio=0.2, layers=[0, 1], target="latency", latency_tokens=64, uniform=False)
        )
    assert all(t > 0 for times in pruner.latency_table.attention.values() for state, t in times.items() if state[0])
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def _ffn_model(family: str):
    """A tiny model of `family` with LoRA on every linear; its FFN block at layer 1 and the block's width."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if family == "gpt_neox":  # biases on both projections, GELU, no gate
        config = GPTNeoXConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
        )
        model, name = GPTNeoXForCausalLM(config), "gpt_neox.layers.1.mlp"
        lora = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = peft.get_peft_model(model.eval(), lora)
    else:
        model, name = _tiny(family, "all-linear"), "model.layers.1.mlp"
    return model, model.get_submodule(f"base_model.model.{name}"), 48


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("keep", [48, 17, 1])
def test_cut_ffn_copy_equals_the_block_with_the_removed_channels_masked(family, keep):
    model, block, width = _ffn_model(family)
    assert ffn_replayable(block, width, 32)
    before = copy.deepcopy(model.state_dict())
    args, kwargs = block_inputs(model, block, tokens=6)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())

    cut = cut_ffn_copy(block, width, keep)
    with torch.no_grad(), model.disable_adapter():  # the cut copy has no LoRA
        reference = copy.deepcopy(block)
        down = base_layer(reference.down_proj if family != "gpt_neox" else reference.dense_4h_to_h)
        down.weight[:, keep:] = 0.0  # a removed channel contributes nothing to the output
        expected, got = reference(*args, **kwargs), cut(*args, **kwargs)
    assert sorted({m.in_features for m in cut.children() if isinstance(m, torch.nn.Linear)} - {32}) == [keep]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert ffn_seconds(block, (args, kwargs), width, keep, lambda fn: fastest_seconds(fn, torch.device("cpu"), 2)) > 0
    assert ffn_seconds(block, (args, kwargs), width, 0, lambda fn: 1.0) == 0.0


def test_only_ffns_of_plain_linears_into_and_out_of_the_channels_are_replayable():
    _, block, width = _ffn_model("llama")
    assert not ffn_replayable(block, width, width)  # hidden == width: which side is which is ambiguous
    assert not ffn_replayable(block, 40, 32)  # not this block's width
    block.add_module("norm", torch.nn.LayerNorm(48))  # a parameterized module that is not a projection
    assert not ffn_replayable(block, width, 32)


def test_the_pruner_replays_llama_ffns_and_times_the_others_synthetic(monkeypatch, flop_timer):
    """LLaMA's MLP is replayed (the synthetic FFN timer is never called for it); OPT's FFN lives in the decoder
    layer beside its attention, so it is timed synthetic."""
    import tp_loraprune.latency as latency
    from tp_loraprune import LoRAPruneConfig, LoRAPruner

    synthetic = []
    original = latency.ffn_seconds.__wrapped__
    monkeypatch.setattr(latency, "ffn_seconds", lambda *a, **k: synthetic.append(a) or original(*a, **k))
    model = _model("llama", 2)
    config = LoRAPruneConfig(ratio=0.02, layers=[0, 1], target="latency", latency_tokens=16)
    with pytest.warns(UserWarning, match="experimental"):
        pruner = LoRAPruner(model, config)
    assert synthetic == [] and len(pruner.latency_table.ffn) == 2
    times = next(iter(pruner.latency_table.ffn.values()))
    assert interpolate(times, 48) >= interpolate(times, 24) >= interpolate(times, 0) == 0.0


def test_a_synthetic_ffn_is_timed_at_the_model_width_with_both_input_projections(monkeypatch, flop_timer):
    """An FFN as wide as the model cannot be replayed (which side is which is ambiguous) and is timed synthetic:
    at the model's hidden width (not the FFN's) with gate and up as its two input projections."""
    import tp_loraprune.latency as latency
    from tp_loraprune import LoRAPruneConfig, LoRAPruner

    calls = []
    original = latency.ffn_seconds.__wrapped__
    monkeypatch.setattr(latency, "ffn_seconds", lambda *a, **k: calls.append((a, k)) or original(*a, **k))
    model = _tiny("llama", "all-linear", intermediate=32)
    with pytest.warns(UserWarning, match="experimental"):
        LoRAPruner(model, LoRAPruneConfig(ratio=0.02, layers=[0, 1], target="latency", latency_tokens=16))
    assert calls and all(a[0].hidden == 32 and k["rows_per_channel"] == 2 for a, k in calls)
