"""Torch-Pruning's own pruner API on PEFT models: `LoRAMetaPruner` (a `tp.pruner.MetaPruner`) with
`LoRAGuidedImportance`.

On LLaMA (GQA, both head modes), Mistral, Qwen3, GPT-2 (Conv1D, fused c_attn) and Phi-3 (fused qkv_proj and
gate_up_proj), one `step()` must make the same removals as `LoRAPruner` one-shot with the same scores and
equal the masked original (removed heads' output-projection columns and removed FFN channels'
down-projection columns zeroed) within 1e-5 in fp32. Global pruning, iterative steps with `accumulate()`
in between and head ratios must land on their targets. Misuse, through LoRAMetaPruner's arguments or
through plain `tp.pruner.MetaPruner`, must raise a ValueError before any weight changes. The Torch-Pruning
snippet of docs/api.md runs verbatim.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from conftest import build_llama, wrap_peft
from test_architectures import ARCHS, _backward, build, mask, outputs

from tp_loraprune import LoRAGuidedImportance, LoRAMetaPruner, LoRAPruneConfig, LoRAPruner
from tp_loraprune.graph import traceable
from tp_loraprune.models import attention_layouts, mlp_widths

ADAPTER = "default"
API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _model(name: str, **llama):
    """A PEFT model of one family, with LoRA gradients from one backward; "llama" is conftest's tiny GQA LLaMA."""
    model = wrap_peft(build_llama(**llama)) if name == "llama" else build(name)
    _backward(model)
    return model


def _arch(name: str):
    return ARCHS["mistral" if name == "llama" else name]  # LLaMA's FFN is Mistral's (gate/up/down_proj)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, state) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _layers(model) -> int:
    return len({a.name for a in attention_layouts(model)})


# ---------------------------------------------------------------------------------------------- exactness
CASES = [
    ("llama", "per_group"),
    ("llama", "kv_groups"),
    ("mistral", "per_group"),
    ("mistral", "kv_groups"),
    ("qwen3", "per_group"),
    ("gpt2", "per_group"),
    ("phi3", "per_group"),
    ("phi3", "kv_groups"),
]


@pytest.mark.parametrize("name,head_mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_one_step_equals_loraprune_and_the_masked_model(name, head_mode):
    model = _model(name)
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    before = copy.deepcopy(model)
    pruner = LoRAMetaPruner(
        model,
        importance=imp,
        pruning_ratio=0.5,
        prune_num_heads=True,
        head_pruning_ratio=0.5,
        head_mode=head_mode,
    )
    assert isinstance(pruner, tp.pruner.MetaPruner)
    event = pruner.step()

    twin = _model(name)
    config = LoRAPruneConfig(
        head_ratio=0.5, channel_ratio=0.5, head_mode=head_mode, layers=list(range(_layers(twin))), gradient=imp.gradient
    )
    reference = LoRAPruner(twin, config)  # LoRAGuidedImportance() is the paper's Eq. 10; LoRAPruner's default projects
    reference.importance.accumulate(twin)
    assert event is not None and event["removed"] == reference.prune(1.0)["removed"]
    assert pruner.events == [event]
    layouts = {a.name for a in attention_layouts(model)}
    assert sum(key in layouts for key in event["removed"]) == len(layouts)  # heads removed in every block
    assert len(event["removed"]) == 2 * len(layouts)  # and FFN channels

    torch.testing.assert_close(outputs(model), outputs(mask(before, event["removed"], _arch(name))), rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs(model), outputs(twin), rtol=0, atol=0)
    # repaired: the model still trains, base weights stay frozen, the config describes the pruned widths
    assert torch.isfinite(_backward(model))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    imp.accumulate(model)


def test_global_pruning_ranks_channels_across_layers_like_loraprune():
    model = _model("llama")
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    before = copy.deepcopy(model)
    event = LoRAMetaPruner(model, importance=imp, pruning_ratio=0.25, global_pruning=True).step()

    twin = _model("llama")
    reference = LoRAPruner(
        twin,
        LoRAPruneConfig(head_ratio=0.0, channel_ratio=0.25, ranking="global", layers=[0, 1, 2], gradient=imp.gradient),
    )
    reference.importance.accumulate(twin)
    assert event["removed"] == reference.prune(1.0)["removed"]
    assert sum(mlp_widths(model)) == 3 * 36
    torch.testing.assert_close(
        outputs(model), outputs(mask(before, event["removed"], _arch("llama"))), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("kv_heads", [8, 4], ids=["mha", "gqa"])
def test_iterative_steps_reach_the_target_heads_and_widths(kv_heads):
    """Two steps with `accumulate()` in between. Ratios are cumulative and relative to the initial model:
    8 heads at 0.5 end at 4 (Torch-Pruning 1.6.1 compounds the head ratio: 8 → 6 → 3). 12 query heads on 4 KV
    heads at 0.67 end at one query head per KV group (a group 1.6.1 silently skips)."""
    heads, ratio, want = (8, 0.5, [6, 4]) if kv_heads == 8 else (12, 0.67, [8, 4])
    model = _model("llama", hidden=48, heads=heads, kv_heads=kv_heads, head_dim=4, layers=2)
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    before = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    pruner = LoRAMetaPruner(
        model,
        importance=imp,
        optimizer=optimizer,
        pruning_ratio=0.5,
        prune_num_heads=True,
        head_pruning_ratio=ratio,
        iterative_steps=2,
    )
    removed: dict[str, list[int]] = {}
    for step, heads_left in enumerate(want):
        event = pruner.step()
        for key, ids in event["removed"].items():
            removed.setdefault(key, []).extend(ids)
        assert {a.num_heads for a in attention_layouts(model)} == {heads_left}
        assert {a.num_kv_heads for a in attention_layouts(model)} == {heads_left if kv_heads == heads else kv_heads}
        assert mlp_widths(model) == [48 - 12 * (step + 1)] * 2
        _backward(model, seed=step + 1)  # the scores follow the pruned model
        imp.accumulate(model)
        optimizer.step()  # lr 0: the optimizer holds the pruned parameters, the weights stay as masked
    assert model.config.num_attention_heads == want[-1]
    with pytest.warns(UserWarning, match="exceed the maximum iterative steps"):
        assert pruner.step() is None
    torch.testing.assert_close(outputs(model), outputs(mask(before, removed, _arch("llama"))), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- misuse
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prune_head_dims=True), ValueError, "inside attention heads"),
        (dict(head_pruning_ratio=0.5), ValueError, "prune_num_heads=True"),
        (dict(num_heads={}), ValueError, "does not take `num_heads`"),
        (dict(pruning_ratio_dict={}), ValueError, "does not take `pruning_ratio_dict`"),
        (dict(pruning_ratio=1.0), ValueError, "`pruning_ratio` must be in"),
        (dict(iterative_steps=0), ValueError, "`iterative_steps`"),
        (dict(no_such_argument=1), TypeError, "no_such_argument"),
    ],
)
def test_bad_arguments_are_refused_before_any_change(kwargs, error, match):
    model = _model("llama")
    state = _state(model)
    with pytest.raises(error, match=match):
        LoRAMetaPruner(model, importance=LoRAGuidedImportance(), **kwargs)
    assert _unchanged(model, state)


def test_ignoring_part_of_a_decoder_layer_is_refused_whole_layers_are_kept():
    model = _model("llama")
    layers = model.base_model.model.model.layers
    with pytest.raises(ValueError, match="whole decoder layers"):
        LoRAMetaPruner(model, ignored_layers=[layers[0].self_attn])
    inner = model.base_model.model
    lora_A = [m.lora_A[ADAPTER] for m in model.modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    # lm_head, embeddings and LoRA factors are never pruned: ignoring them (the Torch-Pruning habit) changes nothing
    ignored = [inner.lm_head, inner.model.embed_tokens, layers[0], *lora_A]
    pruner = LoRAMetaPruner(model, importance=imp, pruning_ratio=0.5, ignored_layers=ignored)
    pruner.step()
    assert mlp_widths(model) == [48, 24, 24]


def test_interactive_step_is_refused_before_anything_is_pruned():
    model = _model("llama")
    pruner = LoRAMetaPruner(model, pruning_ratio=0.5, iterative_steps=2)
    pruner.importance.accumulate(model)
    before = _state(model)
    with pytest.raises(ValueError, match=r"step\(interactive=True\) is not supported") as info:
        next(iter(pruner.step(interactive=True) or ()))  # as Torch-Pruning's interactive loop would call it
    message = str(info.value)
    assert "Call `pruner.step()`" in message and "pruner.engine.replay" in message and "Nothing was pruned" in message
    assert pruner.current_step == 0 and not pruner.events and _unchanged(model, before)
    pruner.step()  # the step it refused is still there to take
    assert pruner.current_step == 1 and mlp_widths(model) == [36, 36, 36]


def _num_heads(model, keyed_by: str) -> dict:
    num_heads = {}
    for layer in model.base_model.model.model.layers:
        a = layer.self_attn
        for proj, n in ((a.q_proj, 6), (a.k_proj, 2), (a.v_proj, 2)):
            keys = [proj] if keyed_by == "wrappers" else [proj.base_layer, proj.lora_B[ADAPTER]]
            num_heads.update(dict.fromkeys(keys, n))
    return num_heads


# The ways plain tp.pruner.MetaPruner was seen to prune a PEFT GQA model wrongly (issue 15), each refused.
STOCK = {
    "docs-snippet-before": (dict(), "k/v rows without their query heads"),
    "num-heads-by-wrappers": (dict(num_heads="wrappers"), "k/v rows without their query heads"),
    "num-heads-by-base-and-lora-b": (dict(num_heads="base"), "would prune this attention block.s head channels"),
    # transformers 5 SDPA hides the GQA coupling (refused as such); transformers 4's trace shows the head channels
    "sdpa-kept": (dict(num_heads="base", trace="sdpa"), "traced with SDPA|own pruner would prune"),
}


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
@pytest.mark.parametrize("case", list(STOCK))
def test_stock_metapruner_misuse_is_refused_before_any_change(case):
    settings, match = STOCK[case]
    model = _model("llama")
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    inner = model.base_model.model
    lora_A = [m.lora_A[ADAPTER] for m in model.modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
    kwargs = dict(
        importance=imp,
        pruning_ratio=0.25,
        ignored_layers=[inner.lm_head, inner.model.embed_tokens, *lora_A],
        output_transform=lambda o: o.logits,
    )
    if "num_heads" in settings:
        kwargs.update(
            num_heads=_num_heads(model, settings["num_heads"]),
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=0.34,
        )
    example = torch.arange(8).unsqueeze(0)
    state = _state(model)
    if settings.get("trace") == "sdpa":  # trainable and no cache, but the default (SDPA) attention
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(True)
        pruner = tp.pruner.MetaPruner(model, example, **kwargs)
    else:
        with traceable(model):
            pruner = tp.pruner.MetaPruner(model, example, **kwargs)
    with pytest.raises(ValueError, match=match):
        pruner.step()
    assert _unchanged(model, state)


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_group_traced_with_frozen_base_weights_is_refused():
    model = _model("llama")
    imp = LoRAGuidedImportance()
    imp.accumulate(model)
    model.config.use_cache = False
    model.config._attn_implementation = "eager"
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.arange(8).unsqueeze(0), output_transform=lambda o: o.logits
    )
    o = model.base_model.model.model.layers[0].self_attn.o_proj.base_layer
    group = graph.get_pruning_group(o, tp.prune_linear_in_channels, list(range(o.in_features)))
    with pytest.raises(ValueError, match="frozen"):
        imp(group)


# ---------------------------------------------------------------------------------------------- the docs
def test_api_doc_torch_pruning_snippet_runs_verbatim():
    """The docs/api.md block under "With Torch-Pruning's own pruner", executed as written on a tiny GQA LLaMA;
    it may use only `model` (a PEFT model) and `batches` (token-id tensors)."""
    text = API_DOC.read_text()
    section = text[text.index("With Torch-Pruning's own pruner") :]
    (snippet,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ")], flags=re.S)
    model = wrap_peft(build_llama())
    batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = copy.deepcopy(model)
    namespace = {"model": model, "batches": batches}
    exec(compile(snippet, str(API_DOC), "exec"), namespace)
    pruner = namespace["pruner"]
    assert isinstance(pruner, tp.pruner.MetaPruner)
    assert {a.num_heads for a in attention_layouts(model)} == {4}
    assert mlp_widths(model) == [24] * 3
    removed: dict[str, list[int]] = {}
    for event in pruner.events:
        for key, ids in event["removed"].items():
            removed.setdefault(key, []).extend(ids)
    assert removed
    # the snippet's optimizer keeps training the pruned LoRA parameters
    optimizer = namespace["optimizer"]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert outputs(model).shape == outputs(before).shape
