"""Shared fixtures for the LoRAPrune tests: tiny LLaMA models (GQA and MHA) built in code, wrapped with PEFT
LoRA (B initialised non-zero), and a training-step helper that leaves LoRA gradients in place.

Everything is fp32 on CPU, seeded, and small enough that a test runs in well under a second or two.
"""

from __future__ import annotations

import copy
import os
import random
import warnings

import pytest
import torch

# Tiny matmuls: intra-op threads only add synchronisation cost (seconds per step on a busy 2-core box).
torch.set_num_threads(1)

# Without CUDA, Triton kernels can only run in Triton's interpreter, and triton.language's own helpers are
# built in that mode only if TRITON_INTERPRET is set before the first `import triton` (which bitsandbytes
# may do), so it is set for the whole session here. tests/test_kernels.py runs the scoring kernel that way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _deterministic():
    """Seed every test, force fp32 matmuls (no TF32) and keep noisy library warnings out of the output."""
    _seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def build_llama(*, hidden=24, heads=6, kv_heads=2, head_dim=4, intermediate=48, layers=3, seed=0, init_range=0.1):
    """A tiny LlamaForCausalLM in fp32 (train mode, the HF default attention implementation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        initializer_range=init_range,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float()
    model.train()
    return model


def save_tiny_hf(path, *, max_position_embeddings=64):
    """A tiny LLaMA with the vocabulary of the tiny tokenizer, saved with it as a local Hugging Face directory
    (what a hub id or `--model` path stands for in tests). Returns `path`."""
    from tiny_tokenizer import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    _seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def wrap_peft(model, targets=None, r=2, seed=0):
    """PEFT LoRA on `targets` (all seven projections by default) with non-zero B (init_lora_weights=False)."""
    import peft

    _seed(seed)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r + 1,
        target_modules=list(targets or ALL_PROJECTIONS),
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    return peft.get_peft_model(model, config)


def batch(seed=0, size=2, length=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (size, length), generator=g)


def train_step(model, input_ids=None, optimizer=None, *, zero_grad=True):
    """One forward/backward (LM loss); optionally `optimizer.step()`. Leaves the gradients in place."""
    if input_ids is None:
        input_ids = batch()
    if zero_grad:
        model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


@torch.no_grad()
def logits(model, input_ids=None):
    """Eval-mode logits; the model's train/eval mode is restored afterwards."""
    if input_ids is None:
        input_ids = batch(seed=123, size=2, length=10)
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=input_ids).logits.float().clone()
    finally:
        model.train(was_training)


def peft_layers(model):
    """The decoder layers of a PEFT-wrapped LLaMA."""
    return model.base_model.model.model.layers


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def tiny_llama_gqa():
    """6 query heads, 2 KV heads (3 query heads per KV group), head_dim 4, FFN 48, 3 layers."""
    return build_llama(kv_heads=2)


@pytest.fixture
def tiny_llama_mha():
    """6 heads, 6 KV heads, head_dim 4, FFN 48, 3 layers."""
    return build_llama(kv_heads=6)


@pytest.fixture
def make_llama():
    return build_llama


@pytest.fixture
def peft_wrap():
    return wrap_peft


@pytest.fixture
def peft_gqa(tiny_llama_gqa):
    return wrap_peft(tiny_llama_gqa)


@pytest.fixture
def peft_mha(tiny_llama_mha):
    return wrap_peft(tiny_llama_mha)


@pytest.fixture
def step():
    """`step(model, input_ids=None, optimizer=None)`: forward + backward (+ optimizer.step)."""
    return train_step


@pytest.fixture
def make_batch():
    return batch


@pytest.fixture
def get_logits():
    return logits


@pytest.fixture
def clone_model():
    return copy.deepcopy


@pytest.fixture
def flop_timer(monkeypatch):
    """The latency table timed by FLOPs (plus a fixed microsecond per call) instead of the wall clock: a tiny
    model's wall time is launch noise, and tests of what the pruner does with a table need one that is the same
    on every machine. Tests of the timing itself call `latency.fastest_seconds` unpatched."""
    from torch.utils.flop_counter import FlopCounterMode

    import tp_loraprune.latency as latency

    def flop_seconds(fn, device, repeats):
        with FlopCounterMode(display=False) as flops:
            fn()
        return 1e-6 + flops.get_total_flops() * 1e-12

    monkeypatch.setattr(latency, "fastest_seconds", flop_seconds)


def reference_channel_scores(A, B, dA, dB, W, s, kind):
    """The per-element formula written out with Python floats (double precision), then reduced."""
    A, B, dA, dB, W = (t.double().tolist() for t in (A, B, dA, dB, W))
    n_out, n_in, r = len(W), len(W[0]), len(A)
    rows = [0.0] * n_out
    cols = [0.0] * n_in
    for i in range(n_out):
        for j in range(n_in):
            g = sum(dB[i][k] * A[k][j] + B[i][k] * dA[k][j] - dB[i][k] * dA[k][j] for k in range(r))
            w = W[i][j] + s * sum(B[i][k] * A[k][j] for k in range(r))
            e = (g * w) ** 2 if kind == "square" else abs(g * w)
            rows[i] += e
            cols[j] += e
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(cols, dtype=torch.float64)
