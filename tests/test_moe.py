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


def _stacked_experts_supported() -> bool:
    """transformers 5 stacks experts as 3-D parameters; PEFT puts LoRA on them through `target_parameters`."""
    import dataclasses

    import peft
    import transformers

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    return int(transformers.__version__.split(".")[0]) >= 5 and "target_parameters" in fields


pytestmark = pytest.mark.skipif(
    not _stacked_experts_supported(), reason="needs transformers >= 5 and peft with target_parameters (>= 0.17)"
)

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
        MixtralConfig(
            **_common(head_dim=HEAD_DIM, intermediate_size=WIDTH, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
        )
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
            **_common(
                head_dim=HEAD_DIM,
                moe_intermediate_size=WIDTH,
                num_experts=EXPERTS,
                num_experts_per_tok=TOP_K,
                norm_topk_prob=True,
            )
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
            **_common(
                head_dim=HEAD_DIM,
                intermediate_size=WIDTH,
                num_local_experts=EXPERTS,
                num_experts_per_tok=TOP_K,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
                swiglu_limit=1.0,
            )
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
    routers = {layout.router_name for layout in moe.values()}  # whole experts: masked in the routing below
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
        elif key not in routers:  # dense or shared-expert FFN channels (keyed by gate_proj): down_proj columns
            mlp = ref.get_submodule(key.removesuffix(".base_layer").removesuffix(".gate_proj"))
            base_layer(mlp.down_proj).weight[:, ids] = 0
            if hasattr(mlp.down_proj, "lora_A"):
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
    assert {"experts", "expert_channels"} & _kinds(pruner, removed), removed.keys()
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


def _chosen_removals(pruner, heads: bool) -> dict[str, list[int]]:
    """Every kind of structure, picked by hand: in the first MoE layer two experts (one per routing group when the
    router has groups) and, of each kept expert, 8 channels of its own; in the other MoE layers 8 channels per
    expert; one query head per KV group; 5 channels of every dense and shared-expert FFN."""
    removed: dict[str, list[int]] = {}
    for i, layout in enumerate(moe_layouts(pruner.model)):
        E, width = layout.num_experts, layout.width
        groups, _ = layout.groups
        gone = [1, E // groups + 1] if groups > 1 else [1, 4]
        if i == 0:
            removed[layout.router_name] = gone
        removed[layout.experts_name] = [
            e * width + (3 * e + 5 * j) % width for e in range(E) if i or e not in gone for j in range(8)
        ]
    for key, h in pruner._heads.items() if heads else ():
        size = h.initial_group_size
        removed[key] = [g * size + (g % size) for g in range(h.initial_kv)]
    for key, ch in pruner._channels.items():
        removed[key] = [0, 3, 7, 11, ch.initial - 1]
    return removed


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_kind_of_removal_is_exact(name):
    """Experts, per-expert channels, heads (gpt-oss: with their sinks), dense and shared-expert channels, removed by
    one replayed event: the pruned model equals the masked original and its merged self."""
    model = build(name)
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(ratio=0.2, layers=_layers(model), uniform=False))
    pruner.importance.accumulate(model)
    before = copy.deepcopy(model)
    removed = _chosen_removals(pruner, FAMILIES[name].heads)
    assert _kinds(pruner, removed) >= {"experts", "expert_channels"} | ({"heads"} if FAMILIES[name].heads else set())
    pruner.replay([{"step": 0, "removed": removed}])
    first = moe_layouts(model)[0]
    assert (first.num_experts, first.width) == (moe_layouts(before)[0].num_experts - 2, WIDTH - 8)
    if name == "gpt_oss":
        assert all(a.module.sinks.shape == (a.num_heads,) == (HEADS - KV,) for a in attention_layouts(model))
    want = outputs(model)
    torch.testing.assert_close(want, masked_outputs(before, removed), rtol=0, atol=1e-5)
    assert (outputs(before) - want).abs().max() > 1e-3
    torch.testing.assert_close(outputs(copy.deepcopy(model).merge_and_unload()), want, rtol=0, atol=1e-5)


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
    if name != "deepseek_v3":  # (it has no load-balancing loss) the loss counts the experts that are left
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
        assert torch.isfinite(model(input_ids=ids, labels=ids, output_router_logits=True).aux_loss)
    want = outputs(model)
    path = save_pruned(model, tmp_path / "pruned")
    assert json.loads((path / "tp_loraprune.json").read_text())["layout"] == (
        "per_layer" if name == "deepseek_v3" else "uniform"
    )
    if name != "deepseek_v3":  # its config derives the shared width from the experts' width, which moved
        loaded = AutoModelForCausalLM.from_pretrained(path)
        torch.testing.assert_close(outputs(loaded), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs(load_pruned(path)), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- scores
def test_all_linear_wraps_experts_and_accumulates_per_expert_scores():
    """PEFT's `all-linear` on Mixtral wraps the experts (and router) in ParamWrappers; the importance scores every
    expert like a linear layer of its own (this used to fail: 'MixtralExperts' object has no attribute 'weight')."""
    import peft

    from tp_loraprune import LoRAGuidedImportance

    _seed(0)
    model = peft.get_peft_model(
        _mixtral(), peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    )
    _backward(model)
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    layout = moe_layouts(model)[0]
    wrappers = layout.wrappers(model)
    assert set(wrappers) == {"gate_up_proj", "down_proj", "router"}
    up, down = imp.channel_scores(wrappers["gate_up_proj"], "out"), imp.channel_scores(wrappers["down_proj"], "in")
    assert up.shape == (EXPERTS, 2 * WIDTH) and down.shape == (EXPERTS, WIDTH)
    assert imp.channel_scores(wrappers["router"], "out").shape == (EXPERTS,)

    # expert e's scores are those of the linear layer W_e + s·B_e·A_e (PEFT's per-expert factor layout)
    from tp_loraprune.scores import channel_scores

    w = wrappers["down_proj"]
    A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
    e, r = 4, A.shape[0] // EXPERTS
    A_e, B_e = A[e * r : (e + 1) * r], B[:, [j * EXPERTS + e for j in range(r)]]
    dA_e, dB_e = A.grad[e * r : (e + 1) * r], B.grad[:, [j * EXPERTS + e for j in range(r)]]
    _, want = channel_scores(A_e, B_e, dA_e, dB_e, layout.down[e], w.scaling["default"])
    torch.testing.assert_close(down[e], (1 - imp.ema) * want)

    projected = LoRAGuidedImportance(gradient="projected")  # the projection works expert by expert the same way
    projected.accumulate(model)
    _, want = channel_scores(A_e, B_e, dA_e, dB_e, layout.down[e], w.scaling["default"], gradient="projected")
    torch.testing.assert_close(projected.channel_scores(w, "in")[e], (1 - projected.ema) * want)


def test_an_expert_no_token_picks_scores_zero_and_goes_first():
    """Scores are router-weighted by construction: gradients reach an expert only through the tokens routed to it,
    times their routing weight. gpt-oss with expert 3's router bias at -1e4: it scores exactly 0 and is the first
    removed."""
    model = build("gpt_oss")
    for layout in moe_layouts(model):
        with torch.no_grad():
            layout.router.bias[3] = -1e4
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(ratio=0.15, layers=_layers(model), uniform=False))
    pruner.importance.accumulate(model)
    for b in pruner._experts.blocks.values():
        channels, experts = pruner._experts.scores(b, pruner.importance)
        assert (channels[3] == 0).all() and experts[3] == 0 and (experts[[0, 1, 2, 4, 5]] > 0).all()
    event = pruner.prune(1.0)
    expert_keys = [layout.router_name for layout in moe_layouts(model)]
    assert [event["removed"].get(k) for k in expert_keys if k in event["removed"]][0] == [3]


# ---------------------------------------------------------------------------------------------- fixed rules, events
def test_fixed_ratio_spreads_channels_over_experts_and_shared_expert():
    """allocation="fixed": the channel ratio is solved over dense, shared-expert and routed-expert channels alike,
    so the shared expert is not the only FFN that pays for the target (it was, before experts were counted)."""
    model, before, pruner, event = _prune(
        "qwen2_moe", LoRAPruneConfig(ratio=0.3, allocation="fixed", layers=[0, 1, 2], uniform=False)
    )
    assert 0 < pruner.channel_ratio < 0.5
    shared = [k for k in pruner._channels if "shared_expert" in k]
    assert shared and all(pruner._channels[k].initial - len(pruner._channels[k].alive) <= 0.5 * 24 for k in shared)
    assert all(layout.width < WIDTH for layout in moe_layouts(model))  # experts narrowed too
    assert {layout.num_experts for layout in moe_layouts(model)} == {EXPERTS}  # whole experts: "auto" only
    torch.testing.assert_close(outputs(model), masked_outputs(before, event["removed"]), rtol=0, atol=1e-5)


def test_two_events_with_an_optimizer_stay_exact():
    """Half the target, then the rest: original ids still mask correctly, stored scores follow the gathered
    experts, and the optimizer holds the new LoRA tensors with their moments gathered the same way."""
    model = build("mixtral")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    _backward(model)
    optimizer.step()  # lr 0: moments exist, weights unchanged, so one masked copy stays the reference
    pruner = LoRAPruner(model, LoRAPruneConfig(ratio=0.4, layers=[0, 1], uniform=False), optimizer=optimizer)
    pruner.importance.accumulate(model)
    before = copy.deepcopy(model)
    router_b = moe_layouts(model)[1]
    wrapper = router_b.wrappers(model)["router"].lora_B["default"].weight
    moment = optimizer.state[wrapper]["exp_avg"].clone()
    first = pruner.prune(0.5)
    _backward(model, seed=1)
    pruner.importance.accumulate(model)
    second = pruner.prune(1.0)
    assert first is not None and second is not None
    removed = {
        k: sorted(set(first["removed"].get(k, [])) | set(second["removed"].get(k, [])))
        for k in {*first["removed"], *second["removed"]}
    }
    torch.testing.assert_close(outputs(model), masked_outputs(before, removed), rtol=0, atol=1e-5)

    assert trainable_parameters_match(optimizer, model)
    assert all(s["exp_avg"].shape == p.shape for p, s in optimizer.state.items())
    kept = pruner._experts.blocks[router_b.experts_name].alive
    new = router_b.wrappers(model)["router"].lora_B["default"].weight
    torch.testing.assert_close(optimizer.state[new]["exp_avg"], moment[kept])
    optimizer.step()


def test_checkpoint_replays_to_the_same_model():
    """A pruner's state_dict replayed on a fresh copy rebuilds the pruned experts and channels exactly."""
    model, _, pruner, _ = _prune("deepseek_v3")
    fresh = build("deepseek_v3")
    _backward(fresh)
    resumed = LoRAPruner(fresh, pruner.config)
    resumed.load_state_dict(pruner.state_dict())
    assert resumed.summary()["experts"] == pruner.summary()["experts"]
    torch.testing.assert_close(outputs(fresh), outputs(model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- refusals
def _unchanged(model, snapshot):
    return all(torch.equal(t, snapshot[n]) for n, t in model.state_dict().items())


def test_unknown_moe_block_is_refused_before_any_change():
    """PhiMoE's router (sparsemixer) and block are not declared: refused with the module and class named."""
    import peft
    from transformers import PhimoeConfig, PhimoeForCausalLM

    _seed(0)
    base = PhimoeForCausalLM(
        PhimoeConfig(**_common(intermediate_size=WIDTH, num_local_experts=4, num_experts_per_tok=2))
    )
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=ATTENTION, init_lora_weights=False, lora_dropout=0.0)
    )
    _backward(model)
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError,
        match=r"PhimoeForCausalLM has routed experts at .*layers\.0\.mlp\.experts.* "
        r"\(PhimoeExperts\).*Known MoE blocks: MixtralSparseMoeBlock",
    ):
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2, layers=[0, 1]))
    assert _unchanged(model, snapshot)


def test_a_declared_block_in_another_layout_is_refused():
    """A Mixtral block whose experts are separate MLP modules (transformers 4's layout) is refused, not pruned as
    unrelated FFNs and a router of unknown coupling."""
    import peft
    from torch import nn

    _seed(0)
    base = _mixtral()
    for layer in base.model.layers:
        layer.mlp.experts = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(EXPERTS))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=ATTENTION, init_lora_weights=False, lora_dropout=0.0)
    )
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError,
        match=r"MixtralForCausalLM has a MixtralSparseMoeBlock at .*layers\.0\.mlp.* without "
        r"transformers 5's stacked experts",
    ):
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2, layers=[0, 1]))
    assert _unchanged(model, snapshot)


def test_mla_heads_are_refused_and_experts_without_lora_are_named():
    model = build("deepseek_v3")
    _backward(model)
    with pytest.raises(ValueError, match=r"DeepseekV3Attention at .*self_attn' is multi-head latent attention"):
        LoRAPruner(model, LoRAPruneConfig(head_ratio=0.5, channel_ratio=0.5, layers=[0, 1, 2]))
    with pytest.raises(ValueError, match="multi-head latent attention"):
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2, allocation="fixed", layers=[0, 1, 2]))
    with pytest.raises(ValueError, match="does not time mixture-of-experts"):
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2, target="latency", layers=[0, 1, 2]))

    import peft

    _seed(0)
    heads_only = peft.get_peft_model(
        _mixtral(), peft.LoraConfig(r=2, target_modules=ATTENTION, init_lora_weights=False, lora_dropout=0.0)
    )
    _backward(heads_only)
    with pytest.raises(
        ValueError,
        match=r"largest reachable ratio is 0\.\d+.*routed experts of 2 MoE layers .* carry "
        r"no LoRA.*target_parameters",
    ):
        LoRAPruner(heads_only, LoRAPruneConfig(ratio=0.4, layers=[0, 1]))
    with pytest.raises(ValueError, match="no FFN channel can be pruned.*carry no LoRA"):
        LoRAPruner(heads_only, LoRAPruneConfig(ratio=0.4, allocation="fixed", layers=[0, 1]))


@pytest.mark.parametrize(
    "name,removal,message",
    [
        ("mixtral", {"gate": [0, 1, 2, 3, 4]}, r"keep \[1\] experts per routing group.*top_k=2.*at least 2"),
        ("deepseek_v3", {"gate": [0, 1]}, r"keep \[2, 4\] experts per routing group.*same number in every group"),
        ("mixtral", {"experts": [0, 1, WIDTH + 5]}, "unequal or zero width"),
        ("mixtral", {"experts": [7 * WIDTH]}, "not alive"),
    ],
)
def test_invalid_expert_removals_are_refused_before_any_change(name, removal, message):
    model = build(name)
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(ratio=0.2, layers=_layers(model), uniform=False))
    layout = moe_layouts(model)[0]
    keys = {"gate": layout.router_name, "experts": layout.experts_name}
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        pruner.replay([{"step": 0, "removed": {keys[k]: v for k, v in removal.items()}}])
    assert _unchanged(model, snapshot)


# ---------------------------------------------------------------------------------------------- the training loop
def test_prune_runs_a_moe_model_end_to_end():
    """tp_loraprune.prune on a plain Mixtral: LoRA goes on the experts too (target_parameters), the run prunes
    experts inside the fine-tune and returns the merged model."""
    from tp_loraprune import TrainConfig, prune

    blocks = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    config = LoRAPruneConfig(ratio=0.3, layers=[0, 1], total_steps=8, prune_every=2, uniform=False)
    train = TrainConfig(lr=1e-2, batch_size=2, block_size=12, lora_r=2, lora_dropout=0.0, progress=False)
    _seed(0)
    dense = _mixtral()
    n = count_parameters(dense)
    result = prune(dense, None, blocks, config, train)
    assert any(".mlp.experts" in k or ".mlp.gate" in k for e in result.events for k in e["removed"])
    assert count_parameters(result.model) < 0.8 * n
    assert not any("lora_" in name for name, _ in result.model.named_parameters())

    with pytest.raises(ValueError, match=r"lora_dropout=0.05.*mixture-of-experts.*ParamWrapper"):
        prune(_mixtral(), None, blocks, config, TrainConfig(progress=False))


def test_layer_widths_show_experts():
    from tp_loraprune.widths import format_table, layer_widths

    model = build("qwen2_moe")
    before = layer_widths(model)
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(ratio=0.2, layers=[0, 1, 2], uniform=False))
    pruner.importance.accumulate(model)
    pruner.replay([{"step": 0, "removed": _chosen_removals(pruner, heads=True)}])
    after = layer_widths(model)
    assert [(r["experts"], r["expert_ffn"]) for r in after] == [(EXPERTS - 2, WIDTH - 8), (None, None), (EXPERTS, 16)]
    table = format_table(before, after)
    assert "experts (ffn)" in table and f"{EXPERTS}->{EXPERTS - 2} ({WIDTH}->{WIDTH - 8})" in table


# ---------------------------------------------------------------------------------------------- units (pure)
def test_expert_channel_units_take_each_experts_own_lowest_channels():
    from tp_loraprune.allocation import expert_channel_units

    scores = torch.tensor([[5.0, 1.0, 4.0, 0.0, 9.0, 8.0], [0.0, 7.0, 1.0, 6.0, 2.0, 3.0]])
    block = expert_channel_units("e", 3, scores, cost=10, multiple=2, min_width=2)
    assert block.kind == "expert_channels" and len(block.units) == 2  # 6 → 4 → 2, every expert alike
    first, second = block.units
    assert first.removals == {"e": (1, 3, 6, 8)}  # expert 0: channels 3, 1; expert 1: channels 0, 2
    assert (first.score, first.cost, first.layer_costs) == (2.0, 40, {3: 40})
    assert second.removals == {"e": (0, 2, 10, 11)} and second.score == 14.0
    odd = expert_channel_units("e", 0, scores[:, :5], cost=1, multiple=2, min_width=1)
    assert [len(u.removals["e"]) for u in odd.units] == [2, 4]  # width 5 first drops to 4


def test_expert_units_remove_one_expert_per_routing_group():
    from tp_loraprune.allocation import expert_units

    scores = torch.tensor([[3.0, 0.0, 2.0, 1.0], [0.5, 4.0, 6.0, 5.0]])  # 2 groups of 4 experts
    block = expert_units("r", 1, scores, expert_cost=100, min_per_group=2)
    assert block.kind == "experts" and [u.removals["r"] for u in block.units] == [(1, 4), (3, 5)]
    assert [u.score for u in block.units] == [0.5, 5.0] and all(u.cost == 200 for u in block.units)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_lora_metapruner_prunes_expert_channels(name):
    """Torch-Pruning's MetaPruner interface: `pruning_ratio` narrows every expert like a dense FFN (DeepSeek-V3's
    MLA is passed through while Torch-Pruning traces), exactly."""
    from tp_loraprune import LoRAMetaPruner

    model = build(name)
    _backward(model)
    pruner = LoRAMetaPruner(model, pruning_ratio=0.5)
    pruner.importance.accumulate(model)
    before = copy.deepcopy(model)
    event = pruner.step()
    assert {layout.width for layout in moe_layouts(model)} == {WIDTH - 8}  # 24 · 0.5 rounded to multiples of 8
    torch.testing.assert_close(outputs(model), masked_outputs(before, event["removed"]), rtol=0, atol=1e-5)
