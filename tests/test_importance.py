"""LoRAGuidedImportance on real Torch-Pruning groups of a tiny PEFT LLaMA, against plain-Python references."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from conftest import reference_channel_scores

from tp_loraprune import LoRAGuidedImportance, LoRAPruneConfig
from tp_loraprune.graph import build_graph, traceable
from tp_loraprune.models import attention_layouts
from tp_loraprune.surgery import head_group

ADAPTER = "default"


# ---------------------------------------------------------------------------------------------- references
def _ref_layer_scores(layer, kind="square"):
    """(per output row, per input column) of one PEFT LoRA layer, element by element in Python floats."""
    A = layer.lora_A[ADAPTER].weight.detach().double().tolist()
    B = layer.lora_B[ADAPTER].weight.detach().double().tolist()
    dA = layer.lora_A[ADAPTER].weight.grad.double().tolist()
    dB = layer.lora_B[ADAPTER].weight.grad.double().tolist()
    W = layer.base_layer.weight.detach().double().tolist()
    s = float(layer.scaling[ADAPTER])
    return reference_channel_scores(*(torch.tensor(t) for t in (A, B, dA, dB, W)), s, kind)


def _ref_mlp(mlp, kind="square"):
    gate, _ = _ref_layer_scores(mlp.gate_proj, kind)
    up, _ = _ref_layer_scores(mlp.up_proj, kind)
    _, down = _ref_layer_scores(mlp.down_proj, kind)
    return gate + up + down


def _ref_attention(attn, include_kv, kind="square"):
    total = _ref_layer_scores(attn.q_proj, kind)[0] + _ref_layer_scores(attn.o_proj, kind)[1]
    if include_kv:
        total = total + _ref_layer_scores(attn.k_proj, kind)[0] + _ref_layer_scores(attn.v_proj, kind)[0]
    return total


def _mlp_group(graph, mlp):
    up = getattr(mlp.up_proj, "base_layer", mlp.up_proj)
    return graph.get_pruning_group(up, tp.prune_linear_out_channels, list(range(up.out_features)))


def _traced_attention_group(graph, attn):
    o = getattr(attn.o_proj, "base_layer", attn.o_proj)
    return graph.get_pruning_group(o, tp.prune_linear_in_channels, list(range(o.in_features)))


def _attention_group(graph, attn):
    """Every head of a block as LoRAPruner scores it: a declared group (traced attention groups are refused)."""
    (a,) = [a for a in attention_layouts(attn) if a.module is attn]
    return head_group(graph, a, list(range(a.num_heads)), list(range(a.num_kv_heads)) if a.group_size == 1 else [])


def _layers(model):
    return model.base_model.model.model.layers


def _close(got, ref, rtol=1e-4):
    assert got is not None
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=1e-9 + rtol * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------- group scores
@pytest.mark.parametrize("kind", ["square", "abs"])
def test_mlp_group_score_matches_reference(peft_gqa, step, kind):
    step(peft_gqa)
    imp = LoRAGuidedImportance(score=kind, gradient="eq10")
    imp.accumulate(peft_gqa)
    graph = build_graph(peft_gqa)
    for layer in _layers(peft_gqa):
        got = imp(_mlp_group(graph, layer.mlp))
        assert got.shape == (48,)
        # one step of an EMA that starts at zero: (1 - ema) * S
        _close(got, (1 - imp.ema) * _ref_mlp(layer.mlp, kind))


def test_mha_attention_group_sums_q_k_v_rows_and_o_columns(peft_mha, step):
    step(peft_mha)
    imp = LoRAGuidedImportance(gradient="eq10")
    imp.accumulate(peft_mha)
    graph = build_graph(peft_mha)
    for layer in _layers(peft_mha):
        got = imp(_attention_group(graph, layer.self_attn))
        assert got.shape == (24,)
        _close(got, 0.1 * _ref_attention(layer.self_attn, include_kv=True))


def test_gqa_attention_group_sums_q_rows_and_o_columns_only(peft_gqa, step):
    """Under GQA, k/v items are reached without root indices and are (documented) not summed."""
    step(peft_gqa)
    imp = LoRAGuidedImportance(gradient="eq10")
    imp.accumulate(peft_gqa)
    graph = build_graph(peft_gqa)
    for layer in _layers(peft_gqa):
        attn = layer.self_attn
        got = imp(_attention_group(graph, attn))
        assert got.shape == (24,)
        _close(got, 0.1 * _ref_attention(attn, include_kv=False))
        # the traced group does reach k/v, but through the GQA expand mapping, without root indices
        traced = _traced_attention_group(graph, attn)
        kv = {attn.k_proj.base_layer, attn.v_proj.base_layer}
        kv_items = [item for item in traced if item.dep.target.module in kv]
        assert len(kv_items) == 2
        assert all(all(r is None for r in item.root_idxs) for item in kv_items)
        # and scoring it for Torch-Pruning's own head pruning is refused
        with pytest.raises(ValueError, match="LoRAMetaPruner"):
            imp(traced)


def test_ema_over_two_steps(peft_gqa, step, make_batch):
    lam = 0.7
    imp = LoRAGuidedImportance(ema=lam, gradient="eq10")
    mlp = _layers(peft_gqa)[1].mlp
    step(peft_gqa, make_batch(seed=1))
    imp.accumulate(peft_gqa)
    s1 = _ref_mlp(mlp)
    step(peft_gqa, make_batch(seed=2))
    imp.accumulate(peft_gqa)
    s2 = _ref_mlp(mlp)
    assert not torch.allclose(s1, s2, rtol=1e-2)
    assert imp.steps == 2
    got = imp(_mlp_group(build_graph(peft_gqa), mlp))
    _close(got, lam * (1 - lam) * s1 + (1 - lam) * s2)


def test_ema_zero_keeps_last_step_only(peft_gqa, step, make_batch):
    imp = LoRAGuidedImportance(ema=0.0, gradient="eq10")
    mlp = _layers(peft_gqa)[0].mlp
    step(peft_gqa, make_batch(seed=1))
    imp.accumulate(peft_gqa)
    step(peft_gqa, make_batch(seed=2))
    imp.accumulate(peft_gqa)
    _close(imp(_mlp_group(build_graph(peft_gqa), mlp)), _ref_mlp(mlp))


def test_normalize_divides_each_module_by_its_l2_norm(peft_gqa, step):
    step(peft_gqa)
    imp = LoRAGuidedImportance(normalize=True, gradient="eq10")
    imp.accumulate(peft_gqa)
    mlp = _layers(peft_gqa)[2].mlp
    unit = lambda v: v / v.norm()  # noqa: E731  (the (1 - ema) factor cancels)
    ref = (
        unit(_ref_layer_scores(mlp.gate_proj)[0])
        + unit(_ref_layer_scores(mlp.up_proj)[0])
        + unit(_ref_layer_scores(mlp.down_proj)[1])
    )
    got = imp(_mlp_group(build_graph(peft_gqa), mlp))
    _close(got, ref)
    v = imp.channel_scores(mlp.gate_proj.base_layer, "out")
    assert v.norm().item() == pytest.approx(1.0, rel=1e-3)  # v / (||v|| + 1e-8)


def test_channel_scores_lookup_by_wrapper_or_base_layer(peft_gqa, step):
    step(peft_gqa)
    imp = LoRAGuidedImportance()
    imp.accumulate(peft_gqa)
    down = _layers(peft_gqa)[0].mlp.down_proj
    a = imp.channel_scores(down, "in")
    b = imp.channel_scores(down.base_layer, "in")
    assert a is not None and torch.equal(a, b) and a.shape == (48,)
    assert imp.channel_scores(down.lora_A[ADAPTER], "in") is None


# ---------------------------------------------------------------------------------------------- edge cases
def test_group_without_lora_returns_none(make_llama, peft_wrap, step):
    model = peft_wrap(make_llama(), targets=["q_proj", "v_proj"])
    step(model)
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    graph = build_graph(model)
    assert imp(_mlp_group(graph, _layers(model)[0].mlp)) is None
    # the attention group still has LoRA (q rows) and gets scores
    assert imp(_attention_group(graph, _layers(model)[0].self_attn)) is not None


def test_model_without_lora_raises(tiny_llama_gqa, step):
    step(tiny_llama_gqa)
    with pytest.raises(ValueError, match="get_peft_model"):
        LoRAGuidedImportance().accumulate(tiny_llama_gqa)


def test_call_before_accumulate_raises(peft_gqa):
    graph = build_graph(peft_gqa)
    with pytest.raises(ValueError, match="accumulate"):
        LoRAGuidedImportance()(_mlp_group(graph, _layers(peft_gqa)[0].mlp))


def test_accumulate_without_gradients_raises(peft_gqa):
    imp = LoRAGuidedImportance()
    with pytest.raises(ValueError, match="backward"):
        imp.accumulate(peft_gqa)
    assert imp.steps == 0


@pytest.mark.parametrize("ema", [1.0, -0.1, 1.5])
def test_bad_ema_raises(ema):
    with pytest.raises(ValueError, match="ema"):
        LoRAGuidedImportance(ema=ema)


def test_unknown_score_raises():
    with pytest.raises(ValueError, match="l2"):
        LoRAGuidedImportance(score="l2")


def test_state_dict_round_trip(peft_gqa, step, make_batch, tmp_path):
    from safetensors.torch import load_file, save_file

    step(peft_gqa)
    imp = LoRAGuidedImportance(ema=0.8)
    imp.accumulate(peft_gqa)
    path = tmp_path / "scores.safetensors"
    save_file(imp.state_dict(), str(path))

    restored = LoRAGuidedImportance(ema=0.8)
    restored.load_state_dict(load_file(str(path)), model=peft_gqa)
    assert restored.steps == imp.steps == 1
    graph = build_graph(peft_gqa)
    mlp, attn = _layers(peft_gqa)[1].mlp, _layers(peft_gqa)[1].self_attn
    for group in (_mlp_group(graph, mlp), _attention_group(graph, attn)):
        torch.testing.assert_close(restored(group), imp(group), rtol=0, atol=0)

    # both continue the same moving average
    step(peft_gqa, make_batch(seed=5))
    imp.accumulate(peft_gqa)
    restored.accumulate(peft_gqa)
    torch.testing.assert_close(restored(_mlp_group(graph, mlp)), imp(_mlp_group(graph, mlp)), rtol=0, atol=0)


def test_load_state_dict_without_model_then_accumulate(peft_gqa, step, make_batch):
    step(peft_gqa)
    imp = LoRAGuidedImportance()
    imp.accumulate(peft_gqa)
    restored = LoRAGuidedImportance()
    restored.load_state_dict({k: v.clone() for k, v in imp.state_dict().items()})
    step(peft_gqa, make_batch(seed=9))
    imp.accumulate(peft_gqa)
    restored.accumulate(peft_gqa)
    assert restored.steps == 2
    group = _mlp_group(build_graph(peft_gqa), _layers(peft_gqa)[0].mlp)
    torch.testing.assert_close(restored(group), imp(group), rtol=0, atol=0)


def test_accumulate_never_touches_base_weight_gradients(peft_gqa, step):
    base = [p for n, p in peft_gqa.named_parameters() if "lora_" not in n]
    assert base and all(not p.requires_grad for p in base)
    step(peft_gqa)
    imp = LoRAGuidedImportance()
    imp.accumulate(peft_gqa)
    imp(_mlp_group(build_graph(peft_gqa), _layers(peft_gqa)[0].mlp))
    for p in base:
        assert p.grad is None
        assert not p.requires_grad


# ---------------------------------------------------------------------------------------------- stock Torch-Pruning
def _stock_pruner(model, imp, example_inputs, *, attention: bool):
    """tp.pruner.MetaPruner on a PEFT model, traced right; attention kept out unless `attention`."""
    inner = model.base_model.model
    ignored = [inner.lm_head, inner.model.embed_tokens]
    ignored += [m.lora_A[ADAPTER] for m in model.modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
    num_heads = {}
    for layer in _layers(model):
        a = layer.self_attn
        if not attention:
            ignored.append(a)
        for proj in (a.q_proj, a.k_proj, a.v_proj):
            num_heads[proj.base_layer] = num_heads[proj.lora_B[ADAPTER]] = 6
    with traceable(model):
        return tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=imp,
            pruning_ratio=0.25,
            ignored_layers=ignored,
            output_transform=lambda o: o.logits,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=0.5,
        )


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_stock_metapruner_prunes_ffn_channels_by_score(peft_mha, step, make_batch):
    model = peft_mha
    step(model)
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    pruner = _stock_pruner(model, imp, make_batch(seed=3, size=1, length=8), attention=False)

    mlp = _layers(model)[0].mlp
    scores = imp(_mlp_group(pruner.DG, mlp))
    expected_keep = sorted(torch.argsort(scores, descending=True)[:36].tolist())
    old_up = mlp.up_proj.base_layer.weight.detach().clone()
    old_down = mlp.down_proj.base_layer.weight.detach().clone()

    pruner.step()

    for layer in _layers(model):
        assert layer.mlp.up_proj.base_layer.weight.shape == (36, 24)
        assert layer.mlp.gate_proj.lora_B[ADAPTER].weight.shape == (36, 2)
        assert layer.mlp.down_proj.lora_A[ADAPTER].weight.shape == (2, 36)
        assert layer.self_attn.q_proj.base_layer.weight.shape == (24, 24)  # attention ignored
    # the removed channels are the lowest-scoring ones
    torch.testing.assert_close(mlp.up_proj.base_layer.weight.detach(), old_up[expected_keep], rtol=0, atol=0)
    torch.testing.assert_close(mlp.down_proj.base_layer.weight.detach(), old_down[:, expected_keep], rtol=0, atol=0)
    # the stock pruner does not tell the importance what it removed: the next accumulate says so
    step(model)
    with pytest.raises(ValueError, match="on_pruned"):
        imp.accumulate(model)


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_stock_metapruner_on_attention_is_refused_before_any_change(peft_mha, step, make_batch):
    step(peft_mha)
    imp = LoRAGuidedImportance()
    imp.accumulate(peft_mha)
    pruner = _stock_pruner(peft_mha, imp, make_batch(seed=3, size=1, length=8), attention=True)
    before = {k: v.clone() for k, v in peft_mha.state_dict().items()}
    with pytest.raises(ValueError, match="LoRAMetaPruner"):
        pruner.step()
    after = peft_mha.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_group_item_indices_skip_members_without_a_root_channel():
    from tp_loraprune.importance import _index_pairs

    rows, roots = _index_pairs([3, 4, 5], [0, 1, 2])
    assert rows.tolist() == [3, 4, 5] and roots.tolist() == [0, 1, 2]
    rows, roots = _index_pairs([3, 4, 5], [0, None, 2])
    assert rows.tolist() == [3, 5] and roots.tolist() == [0, 2]
    assert _index_pairs([3, 4], [None, None]) is None
    assert _index_pairs([], []) is None
    with pytest.raises(ValueError, match="3 indices but 2 root indices"):
        _index_pairs([3, 4, 5], [0, 1])


# ---------------------------------------------------------------------------------------------- gradient estimate
def test_projected_gradient_scores_every_layer_with_the_projection(peft_gqa, step):
    from tp_loraprune.lora import lora_factors, lora_layers
    from tp_loraprune.scores import channel_scores

    step(peft_gqa)
    imp = LoRAGuidedImportance(ema=0.0, gradient="projected")
    imp.accumulate(peft_gqa)
    eq10 = LoRAGuidedImportance(ema=0.0, gradient="eq10")
    eq10.accumulate(peft_gqa)
    for name, layer in lora_layers(peft_gqa).items():
        f = lora_factors(layer)
        rows, cols = channel_scores(f.A, f.B, f.dA, f.dB, f.W, f.scaling, "square", gradient="projected")
        torch.testing.assert_close(imp.channel_scores(layer, "out"), rows)
        torch.testing.assert_close(imp.channel_scores(layer, "in"), cols)
        assert not torch.allclose(eq10.channel_scores(layer, "out"), rows), name


def test_the_projected_gradient_is_the_default_and_an_unknown_estimate_is_refused():
    assert LoRAGuidedImportance().gradient == LoRAPruneConfig().gradient == "projected"
    with pytest.raises(ValueError, match="'projected'.*'eq10'.*got 'exact'"):
        LoRAGuidedImportance(gradient="exact")


def test_the_config_gradient_reaches_the_pruners_importance(peft_gqa, step):
    from tp_loraprune import LoRAPruneConfig, LoRAPruner

    pruner = LoRAPruner(peft_gqa, LoRAPruneConfig(ratio=0.3, gradient="projected"))
    assert pruner.importance.gradient == "projected"
    step(peft_gqa)
    pruner.importance.accumulate(peft_gqa)
    reference = LoRAGuidedImportance(gradient="projected")
    reference.accumulate(peft_gqa)
    for layer in list(pruner.importance._name_of)[:4]:
        torch.testing.assert_close(
            pruner.importance.channel_scores(layer, "out"), reference.channel_scores(layer, "out")
        )
