"""Models placed by accelerate (`device_map` / `dispatch_model`): prune events run through accelerate's hooks,
and offloaded (meta) weights are refused with a clear error. The CPU can only show one device; on GPUs the
same code keeps every tensor on its own layer's device (scores are combined on the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_llama, logits, train_step, wrap_peft

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
