"""Models placed by accelerate (`device_map` / `dispatch_model`): prune events run through accelerate's hooks,
and offloaded (meta) weights are refused with a clear error. The CPU can only show one device; with two GPUs
(opt-in: pytest -m gpu) a base spread over both prunes exactly like the whole model on one GPU, and every
tensor stays on its own layer's device."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, build_llama, logits, train_step, wrap_peft

from tp_loraprune import LoRAPruneConfig, LoRAPruner

accelerate = pytest.importorskip("accelerate")

CONFIG = LoRAPruneConfig(head_ratio=0.34, channel_ratio=0.25, layers=[0, 1, 2])


def _device_map(layer2: str) -> dict[str, str]:
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    return {**dict.fromkeys(names, "cpu"), "model.layers.2": layer2}


def test_prune_event_through_accelerate_hooks():
    model = accelerate.dispatch_model(build_llama(), device_map=_device_map("cpu"), main_device="cpu")
    peft_model = wrap_peft(model)
    train_step(peft_model)
    pruner = LoRAPruner(peft_model, CONFIG)
    pruner.importance.accumulate(peft_model)
    event = pruner.prune(1.0)
    assert event["parameters"] < pruner.initial_parameters
    train_step(peft_model)  # the pruned model still trains through the hooks
    assert torch.isfinite(logits(peft_model)).all()


def test_offloaded_weights_are_refused(tmp_path):
    model = accelerate.dispatch_model(
        build_llama(), device_map=_device_map("disk"), main_device="cpu", offload_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="cannot prune weights that are offloaded to the meta device"):
        LoRAPruner(wrap_peft(model), CONFIG)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (opt-in: pytest -m gpu)")
def test_base_spread_over_two_gpus_prunes_like_one_gpu():
    """Layers 0 on cuda:0, layers 1-2 and the head on cuda:1 (accelerate hooks move the activations): the same
    seed and batch remove the same heads and channels as the whole model on cuda:0, every weight stays on its
    layer's GPU, and the pruned models agree in their logits and still train."""
    single = wrap_peft(build_llama().to("cuda:0"))
    spread_map = {
        "model.embed_tokens": "cuda:0",
        "model.rotary_emb": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:1",
        "model.layers.2": "cuda:1",
        "model.norm": "cuda:1",
        "lm_head": "cuda:1",
    }
    spread = wrap_peft(accelerate.dispatch_model(build_llama(), device_map=spread_map, main_device="cuda:0"))
    ids = batch().to("cuda:0")
    results = []
    for model in (single, spread):
        train_step(model, ids)
        pruner = LoRAPruner(model, CONFIG)
        pruner.importance.accumulate(model)
        results.append(pruner.prune(1.0))
    assert results[0]["removed"] == results[1]["removed"]
    assert results[0]["parameters"] == results[1]["parameters"] < pruner.initial_parameters
    for name, param in spread.named_parameters():
        layer = next((k for k in spread_map if f"{k}." in name), None)
        assert layer is not None and param.device == torch.device(spread_map[layer]), name
    probe = batch(seed=123, size=2, length=10).to("cuda:0")
    torch.testing.assert_close(logits(spread, probe).cpu(), logits(single, probe).cpu(), atol=1e-5, rtol=1e-5)
    train_step(spread, ids)  # the pruned spread model still trains through the hooks
    assert torch.isfinite(logits(spread, probe)).all()
