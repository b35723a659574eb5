"""tp_loraprune.graph: tracing preconditions (all params trainable, eager attention, no cache) are set
during the build and restored afterwards; the GQA structure (repeat_kv) is visible to Torch-Pruning."""

from __future__ import annotations

import pytest
import torch_pruning as tp

from tp_loraprune.graph import build_graph, traceable


def _configs(model):
    return {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}.values()


def _expand_nodes(graph):
    return [n for n in graph.module2node.values() if n.type == tp.ops.OPTYPE.EXPAND]


def test_default_attention_is_sdpa(peft_gqa):
    # the precondition these tests are about: transformers 5 picks SDPA, which hides repeat_kv
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("SDPA hides repeat_kv from the trace only on transformers >= 5")
    assert peft_gqa.config._attn_implementation == "sdpa"


def test_traceable_sets_and_restores_everything(peft_gqa):
    model = peft_gqa
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())  # LoRA trainable, base frozen
    model.train()
    model.config.use_cache = True
    attn = model.config._attn_implementation
    with traceable(model):
        assert all(p.requires_grad for p in model.parameters())
        for c in _configs(model):
            assert c.use_cache is False
            assert c._attn_implementation == "eager"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    for c in _configs(model):
        assert c.use_cache is True
        assert c._attn_implementation == attn


def test_build_graph_restores_state(peft_gqa):
    model = peft_gqa
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.config.use_cache = True
    model.train()
    attn = model.config._attn_implementation
    build_graph(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training, "Torch-Pruning's trace leaves eval mode; build_graph must restore train mode"
    assert model.config.use_cache is True
    assert model.config._attn_implementation == attn
    # and an eval-mode model stays in eval mode
    model.eval()
    build_graph(model)
    assert not model.training


def test_build_graph_restores_state_on_error(peft_gqa):
    model = peft_gqa
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attn = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), traceable(model):
        raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.config._attn_implementation == attn
    assert model.training


def test_frozen_layers_are_in_the_graph(peft_gqa):
    """Tracing with all params trainable makes frozen base layers, embeddings and norms visible."""
    graph = build_graph(peft_gqa)
    inner = peft_gqa.base_model.model
    assert inner.model.embed_tokens in graph.module2node
    layer0 = inner.model.layers[0]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(layer0.self_attn, proj).base_layer in graph.module2node
    assert layer0.input_layernorm.weight in graph.module2node


def test_gqa_graph_has_expand_nodes(peft_gqa):
    graph = build_graph(peft_gqa)
    assert len(_expand_nodes(graph)) >= len(peft_gqa.base_model.model.model.layers)


def test_gqa_attention_group_maps_kv_without_root_indices(peft_gqa):
    graph = build_graph(peft_gqa)
    attn = peft_gqa.base_model.model.model.layers[1].self_attn
    o = attn.o_proj.base_layer
    group = graph.get_pruning_group(o, tp.prune_linear_in_channels, list(range(o.in_features)))
    by_module = {}
    for item in group:
        by_module.setdefault(item.dep.target.module, []).append(item)
    for proj in (attn.k_proj, attn.v_proj):
        for m in (proj.base_layer, proj.lora_B["default"]):
            items = by_module[m]
            assert items and all(all(r is None for r in it.root_idxs) for it in items)
    q_items = by_module[attn.q_proj.base_layer]
    assert q_items[0].root_idxs == list(range(24))


def test_mha_attention_group_maps_kv_one_to_one(peft_mha):
    graph = build_graph(peft_mha)
    attn = peft_mha.base_model.model.model.layers[0].self_attn
    o = attn.o_proj.base_layer
    group = graph.get_pruning_group(o, tp.prune_linear_in_channels, list(range(o.in_features)))
    roots = {item.dep.target.module: item.root_idxs for item in group}
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert sorted(roots[proj.base_layer]) == list(range(24))
