"""LoRAPrune inside Hugging Face `Trainer` (and TRL's trainers, which subclass it).

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[LoRAPruneCallback(LoRAPruneConfig(ratio=0.2))])
    trainer.train()
    save_pruned(trainer.model, "pruned/", tokenizer)

The pruner steps in `on_optimizer_step`: after `optimizer.step()`, before the gradients are zeroed,
exactly where a hand-written loop calls `pruner.step()`. The optimizer Trainer built (unwrapped from
accelerate) is handed to the pruner, so its AdamW moments follow every physical removal.
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback

from . import distributed
from .config import LoRAPruneConfig
from .pruner import LoRAPruner


class LoRAPruneCallback(TrainerCallback):
    """Prunes during `Trainer.train()`; `config.total_steps` is taken from the trainer's max_steps."""

    def __init__(self, config: LoRAPruneConfig | None = None, example_inputs=None):
        self.config = config or LoRAPruneConfig()
        self.example_inputs = example_inputs
        self.pruner: LoRAPruner | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.pruner is not None:
            return
        if distributed.is_distributed():
            raise ValueError(
                f"LoRAPruneCallback does not support multi-process training (world size "
                f"{distributed.world_size()}): Trainer keeps the DistributedDataParallel wrapper it built, which "
                "breaks once a prune event replaces parameters. Use tp_loraprune.prune, or a loop with "
                "tp_loraprune.distributed.rewrap_ddp (docs/distributed.md)."
            )
        config = self.config
        if state.max_steps and state.max_steps != config.total_steps:
            config = dataclasses.replace(config, total_steps=state.max_steps)
        self.pruner = LoRAPruner(model, config, optimizer=_unwrap(optimizer), example_inputs=self.example_inputs)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.pruner is None:
            raise RuntimeError("LoRAPruneCallback.on_optimizer_step ran before on_train_begin.")
        self.pruner.optimizer = _unwrap(optimizer) or self.pruner.optimizer
        self.pruner.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is not None and self.pruner.progress < 1.0:
            self.pruner.prune(1.0)


def _unwrap(optimizer):
    """The torch optimizer under accelerate's AcceleratedOptimizer (which shares its param_groups)."""
    return getattr(optimizer, "optimizer", optimizer)
