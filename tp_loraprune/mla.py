"""Multi-head latent attention (DeepSeek-V3): found as the attention of its decoder layers, never pruned.

MLA projects keys and values through a shared low-rank latent (`kv_a_proj_with_mqa` → `kv_a_layernorm` →
`kv_b_proj`, and the same for queries when `q_lora_rank` is set), so it has no separate k/v projections to remove
heads from. `tp_loraprune` recognises it by class (verified against transformers 5.24) so that its decoder layers
are found, its FFNs and experts can be pruned, and its latent projections are never taken for an FFN (a channel of
the latent is normalised together with all the others, so removing one is not exact). Its heads stay: an explicit
head target on a layer with MLA is refused.

Torch-Pruning 1.6.1 cannot trace MLA (its index mapping fails on the split of the latent, "list index out of
range"), so while the graph is traced an MLA block passes its input through (`opaque_while_tracing`): the graph
then holds the residual stream around it and nothing inside it, which is all the pruner needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

MLA_ATTENTION: tuple[str, ...] = ("DeepseekV3Attention",)


def mla_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every multi-head latent attention block of `model`."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in MLA_ATTENTION]


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states * 1.0, None


@contextlib.contextmanager
def opaque_while_tracing(model: nn.Module) -> Iterator[None]:
    """Every MLA block of `model` returns its input (and no attention weights) until the context exits."""
    blocks = [m for _, m in mla_modules(model)]
    try:
        for m in blocks:
            m.forward = _pass_through  # an instance attribute: the class's forward comes back with `del`
        yield
    finally:
        for m in blocks:
            if "forward" in vars(m):
                del m.forward
