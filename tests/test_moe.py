"""Mixture-of-experts models: routed experts (3-D parameters, LoRA through PEFT's `target_parameters`), whole
experts, expert FFN channels, shared experts, attention heads and gpt-oss sinks, on tiny models built from Hugging
Face configs (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V3).

The reference is the unpruned model masked at what was removed: a removed expert never routes (its router logit,
and DeepSeek-V3's choice correction, at −inf before the top-k), a removed expert channel has its down-projection
column zeroed in that expert (base weight and the expert's LoRA A column), a removed head its o_proj input columns,
a removed dense or shared-expert channel its down_proj input column. The pruned model must equal it, and equal
itself merged and saved/loaded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tp_loraprune import LoRAPruneConfig, LoRAPruner, load_pruned, save_pruned
from tp_loraprune.lora import base_layer
from tp_loraprune.models import attention_layouts, count_parameters
from tp_loraprune.moe import moe_layouts
from tp_loraprune.optim_state import trainable_parameters_match

VOCAB, HIDDEN, HEADS, KV, HEAD_DIM, EXPERTS, TOP_K, WIDTH = 64, 32, 4, 2, 8, 6, 2, 24
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMETERS = ["gate_up_proj", "down_proj"]


def _seed(seed=0):
    random.seed(seed)
    torch.manual_seed(seed)


def _common(layers=2, kv=KV, **kw):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(**_common(head_dim=HEAD_DIM, intermediate_size=WIDTH, num_local_experts=EXPERTS,
                                num_experts_per_tok=TOP_K))
    )


def _qwen2_moe():  # a shared expert with a sigmoid gate; layer 1 a dense MLP
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **_common(
                layers=3,
                intermediate_size=40,
                moe_intermediate_size=WIDTH,
                shared_expert_intermediate_size=24,
                num_experts=EXPERTS,
                num_experts_per_tok=TOP_K,
                mlp_only_layers=[1],
            )
        )
    )


def _qwen3_moe():  # per-head q/k norms, renormalised top-k
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **_common(head_dim=HEAD_DIM, moe_intermediate_size=WIDTH, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                      norm_topk_prob=True)
        )
    )


def _olmoe():  # q/k norms over the whole projection: heads are left to the dense rules, experts pruned here
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(
        OlmoeConfig(**_common(intermediate_size=WIDTH, num_experts=EXPERTS, num_experts_per_tok=TOP_K))
    )


def _gpt_oss():  # attention sinks, router bias, transposed interleaved experts with biases and a clamp
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM(
        GptOssConfig(
            **_common(head_dim=HEAD_DIM, intermediate_size=WIDTH, num_local_experts=EXPERTS,
                      num_experts_per_tok=TOP_K, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                      swiglu_limit=1.0)
        )
    )


def _deepseek_v3():  # MLA attention, a dense first layer, grouped sigmoid routing with a correction, shared experts
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(
        DeepseekV3Config(
            **_common(
                layers=3,
                kv=HEADS,
                intermediate_size=40,
                moe_intermediate_size=WIDTH,
                n_routed_experts=8,
                n_shared_experts=1,
                n_group=2,
                topk_group=1,
                num_experts_per_tok=TOP_K,
                first_k_dense_replace=1,
                q_lora_rank=None,
                kv_lora_rank=16,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=HEAD_DIM,
            )
        )
    )


@dataclass
class Family:
    build: Callable
    modules: list[str]  # LoRA target_modules
    router: str  # the router's weight, for target_parameters
    heads: bool = True  # attention heads prunable here


FAMILIES = {
    "mixtral": Family(_mixtral, ATTENTION, "gate.weight"),
    "qwen2_moe": Family(_qwen2_moe, ATTENTION + MLP, "gate.weight"),
    "qwen3_moe": Family(_qwen3_moe, ATTENTION, "gate.weight"),
    "olmoe": Family(_olmoe, [], "gate.weight", heads=False),
    "gpt_oss": Family(_gpt_oss, ATTENTION, "router.weight"),
    # PEFT 0.21 turns gate_proj / up_proj / down_proj targets of DeepSeek-V3 into the experts' parameters, so its
    # dense and shared MLPs carry no LoRA (docs/architectures.md); MLA heads are not pruned
    "deepseek_v3": Family(_deepseek_v3, ["q_proj", "o_proj"], "gate.weight", heads=False),
}


def build(name: str, seed: int = 0, router: bool = True):
    import peft

    family = FAMILIES[name]
    _seed(seed)
    model = family.build().float()
    model.train()
    _seed(seed)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=family.modules or None,
        target_parameters=EXPERT_PARAMETERS + ([family.router] if router else []),
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    return peft.get_peft_model(model, config)


def _backward(model, seed=0):
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


@torch.no_grad()
def outputs(model, seed=123):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids).logits.float().clone()
    finally:
        model.train(was)


def _layers(model) -> list[int]:
    return list(range(model.get_base_model().config.num_hidden_layers))


# ---------------------------------------------------------------------------------------------- the reference
@contextlib.contextmanager
def _removed_experts_never_route(model, removed: dict):
    """While active, every router of `model` with removed experts (original ids, the unpruned model) adds −inf to
    their logits, and DeepSeek-V3's choice correction is −inf for them, before the top-k."""
    linear = torch.nn.functional.linear
    hooks, masks = [], {}
    for layout in moe_layouts(model):
        ids = removed.get(layout.router_name, [])
        if not ids:
            continue
        mask = torch.zeros(layout.num_experts)
        mask[ids] = float("-inf")
        masks[layout.router] = mask
        correction = getattr(layout.router, "e_score_correction_bias", None)
        if correction is not None:
            correction[ids] = float("-inf")

    def masked_linear(mask):
        return lambda x, w, b=None: linear(x, w, b) + mask.to(x.dtype)

    def enter(module, args):
        torch.nn.functional.linear = masked_linear(masks[module])

    def leave(module, args, out):
        torch.nn.functional.linear = linear

    try:
        for router in masks:
            hooks += [router.register_forward_pre_hook(enter), router.register_forward_hook(leave)]
        yield
    finally:
        torch.nn.functional.linear = linear
        for h in hooks:
            h.remove()


@torch.no_grad()
def masked_outputs(before, removed: dict):
    """Outputs of `before` (a copy of the unpruned model) masked at `removed` (original ids)."""
    ref = copy.deepcopy(before)
    layouts = {a.name: a for a in attention_layouts(ref)}
    moe = {layout.experts_name: layout for layout in moe_layouts(ref)}
    wrappers = {layout.experts_name: layout.wrappers(ref) for layout in moe.values()}
    for key, ids in removed.items():
        if key in layouts:  # heads: o_proj input columns
            a = layouts[key]
            cols = [h * a.head_dim + j for h in ids for j in range(a.head_dim)]
            base_layer(a.o).weight[:, cols] = 0
            a.o.lora_A["default"].weight[:, cols] = 0
        elif key in moe:  # expert channels: that expert's down column, base and LoRA A
            layout = moe[key]
            down = layout.down
            A = wrappers[key]["down_proj"].lora_A["default"].weight.view(layout.num_experts, -1, layout.width)
            for i in ids:
                e, c = divmod(i, layout.width)
                if layout.transposed:
                    down[e, c, :] = 0
                else:
                    down[e, :, c] = 0
                A[e, :, c] = 0
        elif key.endswith("gate_proj.base_layer"):  # dense or shared-expert FFN channels: down_proj columns
            mlp = ref.get_submodule(key.removesuffix(".gate_proj.base_layer"))
            base_layer(mlp.down_proj).weight[:, ids] = 0
            mlp.down_proj.lora_A["default"].weight[:, ids] = 0
    with _removed_experts_never_route(ref, removed):
        return outputs(ref)


def _quiet():
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", message=".*cannot be scored.*")
    warnings.filterwarnings("ignore", message=".*multi-head latent attention.*")
    return context


@pytest.fixture(autouse=True)
def _no_scoring_warnings():
    context = _quiet()
    yield
    context.__exit__(None, None, None)


def _prune(name: str, config: LoRAPruneConfig | None = None, **kw):
    model = build(name, **kw)
    _backward(model)
    pruner = LoRAPruner(model, config or LoRAPruneConfig(ratio=0.4, layers=_layers(model), uniform=False))
    pruner.importance.accumulate(model)
    before = copy.deepcopy(model)
    event = pruner.prune(1.0)
    assert event is not None
    return model, before, pruner, event


def _kinds(pruner, removed: dict) -> set[str]:
    moe = {layout.experts_name: "expert_channels" for layout in moe_layouts(pruner.model)}
    moe.update({layout.router_name: "experts" for layout in moe_layouts(pruner.model)})
    return {moe.get(k, "heads" if k in pruner._heads else "channels") for k in removed}


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(FAMILIES))
def test_allocation_removes_experts_and_expert_channels_exactly(name):
    """ratio=0.4 under allocation="auto": whole experts and expert channels go (and heads where scored), the
    parameter target is met to within a unit, and the pruned model equals the masked original, merged too."""
    model, before, pruner, event = _prune(name)
    removed = event["removed"]
    assert {"experts", "expert_channels"} <= _kinds(pruner, removed), removed.keys()
    target = pruner.budget
    saved = count_parameters(before) - count_parameters(model)
    assert target - 4 * 3 * HIDDEN * 8 <= saved <= target  # short by less than one unit (8 channels of 4 experts)

    for layout in moe_layouts(model):  # the router keeps enough experts, every expert one common width
        groups, topk_group = layout.groups
        assert layout.num_experts >= TOP_K and layout.num_experts % groups == 0
        assert layout.num_experts // groups * topk_group >= TOP_K
        assert layout.width % 8 == 0 and layout.width < WIDTH or layout.width == WIDTH
        assert cast_int(layout.experts.num_experts) == cast_int(layout.router.num_experts) == layout.num_experts

    want = outputs(model)
    torch.testing.assert_close(want, masked_outputs(before, removed), rtol=0, atol=1e-5)
    assert (outputs(before) - want).abs().max() > 1e-3  # the masking is not a no-op

    loss = _backward(model, seed=3)  # forward and backward still work, LoRA gets gradients
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(outputs(merged), want, rtol=0, atol=1e-5)


def cast_int(v) -> int:
    return int(v)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_and_load_pruned_round_trip(name, tmp_path):
    """The first MoE layer pruned, merged, saved (per-layer format: MoE layers differ) and loaded back: identical
    logits."""
    first = next(i for i, layer in enumerate(build(name).get_base_model().model.layers) if moe_layouts(layer))
    model, _, _, event = _prune(name, LoRAPruneConfig(ratio=0.4, layers=[first], uniform=False))
    assert len({(layout.num_experts, layout.width) for layout in moe_layouts(model)}) == 2  # pruned and unpruned
    want = outputs(model)
    path = save_pruned(model, tmp_path / "pruned")
    assert json.loads((path / "tp_loraprune.json").read_text())["layout"] == "per_layer"
    torch.testing.assert_close(outputs(load_pruned(path)), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_uniform_pruning_saves_a_plain_checkpoint(name, tmp_path):
    """uniform=True: every MoE layer keeps the same expert count and width (shared experts one width of their own),
    which the config describes (num_experts, moe_intermediate_size, ...): `from_pretrained` loads the model."""
    from transformers import AutoModelForCausalLM

    model, _, pruner, _ = _prune(name, LoRAPruneConfig(ratio=0.4, layers=_layers(build(name))))
    layouts = moe_layouts(model)
    assert len({(layout.num_experts, layout.width) for layout in layouts}) == 1
    want = outputs(model)
    path = save_pruned(model, tmp_path / "pruned")
    assert json.loads((path / "tp_loraprune.json").read_text())["layout"] == ("per_layer" if name == "deepseek_v3"
                                                                              else "uniform")
    if name != "deepseek_v3":  # its config derives the shared width from the experts' width, which moved
        loaded = AutoModelForCausalLM.from_pretrained(path)
        torch.testing.assert_close(outputs(loaded), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs(load_pruned(path)), want, rtol=0, atol=1e-5)
