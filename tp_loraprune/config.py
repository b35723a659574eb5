"""LoRAPruneConfig: every knob of the method in one checked dataclass."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Literal


def _check_ratio(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}. It is the fraction removed; 0.2 keeps 80%.")


@dataclass
class LoRAPruneConfig:
    """How much to prune, where, when and by which score.

    Size target (pick one):
        ratio: fraction of the parameters of the pruned layers to remove (heads and FFN channels).
        head_ratio / channel_ratio: explicit fractions of attention heads and FFN channels to remove in every
            pruned layer. When either is set, `ratio` and `allocation` are ignored.

    Allocation (how `ratio` is split between heads and FFN channels, and across layers):
        allocation: "auto" (default) lets the scores decide: at every prune event the units of removal of every
            pruned layer (a query head per KV group, a KV group, `round_to` FFN channels) are taken by score per
            removed parameter, lowest first, across kinds and layers (`tp_loraprune.allocation`). "fixed" removes
            heads at `ratio` in every layer and FFN channels take the rest; "ffn_only" removes FFN channels only.
            For "fixed" and "ffn_only", `ranking` says how channels are spread over layers.
        uniform: under "auto", every pruned layer keeps the same head counts and FFN width (default; a layout a
            plain `from_pretrained` or a serving engine can load, and on SmolLM2-135M as good as or better than
            per-layer widths at 20% and 50%, docs/benchmarks.md); "auto" then decides heads versus channels only.
            False lets the scores also decide how much each layer loses.
        min_heads_per_group: query heads each KV group keeps (per_group mode) under "auto".
        min_kv_heads: KV groups (heads, for multi-head attention) each layer keeps under "auto".
        min_ffn_width: FFN channels each layer keeps under "auto" (rounded up to `round_to`).
        max_layer_ratio: at most this fraction of any pruned layer's parameters is removed under "auto".
        target: what `ratio` is a fraction of, under "auto": "parameters" of the pruned layers, or "latency": their
            time, measured once on the model's device (`tp_loraprune.latency`) for a prefill of `latency_tokens`
            tokens (`latency_phase="prefill"`) or one decode step against a cache that long ("decode"); the
            allocation then removes what saves the most time per unit of score.
        latency_table: a JSON file of those timings from an earlier run on the same device, model and pruned layers
            (`LoRAPruner.latency_table.save(path)`; the CLI writes `latency_table.json` next to the model), used
            instead of measuring again, so that every run sees the same costs; checked against the model first.

    Heads:
        head_mode: "per_group" removes the same number of query heads from every KV group (KV heads stay);
            "kv_groups" removes whole KV groups (a KV head with all its query heads). For multi-head
            attention both remove whole heads.

        heads_across_norms: also remove heads of attention blocks whose q/k norm spans all heads (OLMo 2 / OLMo 3
            `q_norm`/`k_norm` over the whole projection). The remaining heads are then normalised over fewer
            channels, so the result is not exact (measured in docs/architectures.md). False (default): such blocks
            keep their heads, with a warning, and only their FFN channels are pruned.

    Where:
        skip_first: fraction of the first decoder layers left unpruned (LoRAPrune: 10%).
        skip_last: number of last decoder layers left unpruned (LoRAPrune: 1).
        layers: explicit indices of decoder layers to prune (overrides skip_first / skip_last).
        servable: prune every decoder layer (sets skip_first=0, skip_last=0) with the same widths, so the saved
            model is a plain checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` and llama.cpp
            (GGUF architecture "llama") load. Cannot be combined with `layers`, another skip_first / skip_last,
            uniform=False or ranking="global", which all give layers different widths.
        ranking: "local" removes the same fraction in every pruned layer; "global" removes the same total
            number of FFN channels, picked by raw score across layers (each keeps >= `round_to`); heads
            stay local so every layer keeps the same head layout.

    When:
        total_steps: optimizer steps of the fine-tune the pruning is spread over.
        prune_every: prune every this many optimizer steps (paper: 10).
        schedule, warmup, cooldown: ratio schedule (cubic as the official code, or linear); no pruning
            in the first `warmup` fraction of steps, the target is reached before the last `cooldown`.

    Score (see LoRAGuidedImportance):
        ema, score, normalize.
        gradient: the estimate of the weight gradient in the score. "projected" (default): the gradient projected
            onto what LoRA can see (`scores.projected_weight_gradient`), on one scale for heads and channels
            whatever the factors' magnitudes, which "auto" needs to compare them: on all-MiniLM-L6-v2 it lifted
            the defaults from BoolQ retrieval 82.1 / 75.3 to 85.5 / 81.8 at 30% / 50%, and on SmolLM2-135M it
            tied Eq. 10 within the seed spread (docs/benchmarks.md). "eq10": the paper's Ĝ.

    Hardware:
        round_to: keep FFN widths at multiples of this. None (default) picks the largest of 64 and 8 that leaves
            every pruned FFN at least 32 steps of width (64 at LLaMA-7B, 8 at SmolLM2-135M), else 1: at the
            LLaMA-7B shape on an H200, unaligned widths made a 20% model prefill slower than the dense one (0.083
            vs 0.060 s) while 64, 128 and 256 were within 1% of each other (0.049 s). On 8-bit bitsandbytes bases
            the pruner uses lcm(round_to, 4): their int8 matmul needs multiples of 4.
    """

    ratio: float = 0.5
    head_ratio: float | None = None
    channel_ratio: float | None = None
    head_mode: Literal["per_group", "kv_groups"] = "per_group"
    heads_across_norms: bool = False
    skip_first: float = 0.1
    skip_last: int = 1
    layers: list[int] | None = None
    servable: bool = False
    ranking: Literal["local", "global"] = "local"
    allocation: Literal["auto", "fixed", "ffn_only"] = "auto"
    uniform: bool = True
    min_heads_per_group: int = 1
    min_kv_heads: int = 1
    min_ffn_width: int = 1
    max_layer_ratio: float = 1.0
    target: Literal["parameters", "latency"] = "parameters"
    latency_tokens: int = 2048
    latency_phase: Literal["prefill", "decode"] = "prefill"
    latency_table: str | None = None
    total_steps: int = 200
    prune_every: int = 10
    schedule: Literal["cubic", "linear"] = "cubic"
    warmup: float = 0.1
    cooldown: float = 0.1
    ema: float = 0.9
    score: Literal["square", "abs"] = "square"
    normalize: bool = False
    gradient: Literal["eq10", "projected"] = "projected"
    round_to: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_ratio("ratio", self.ratio)
        _check_ratio("head_ratio", self.head_ratio)
        _check_ratio("channel_ratio", self.channel_ratio)
        choices = {
            "head_mode": ("per_group", "kv_groups"),
            "ranking": ("local", "global"),
            "allocation": ("auto", "fixed", "ffn_only"),
            "target": ("parameters", "latency"),
            "latency_phase": ("prefill", "decode"),
            "schedule": ("cubic", "linear"),
            "score": ("square", "abs"),
            "gradient": ("eq10", "projected"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.skip_first < 1.0:
            raise ValueError(f"`skip_first` is a fraction of layers in [0, 1), got {self.skip_first}.")
        if self.skip_last < 0:
            raise ValueError(f"`skip_last` is a number of layers >= 0, got {self.skip_last}.")
        if self.servable:
            self._make_servable()
        if self.layers is not None and len(self.layers) == 0:
            raise ValueError("`layers` is empty: it selects no layer to prune. Pass None to use skip_first/skip_last.")
        if self.total_steps < 1:
            raise ValueError(f"`total_steps` must be >= 1, got {self.total_steps}.")
        if self.prune_every < 1:
            raise ValueError(f"`prune_every` must be >= 1, got {self.prune_every}.")
        if not (0.0 <= self.warmup < 1.0 and 0.0 <= self.cooldown < 1.0 and self.warmup + self.cooldown < 1.0):
            raise ValueError(
                f"`warmup` ({self.warmup}) and `cooldown` ({self.cooldown}) are fractions of the run whose sum "
                "must stay below 1, leaving steps to prune in."
            )
        ramp_steps = (1.0 - self.warmup - self.cooldown) * self.total_steps
        if self.prune_every > max(ramp_steps, 1):
            raise ValueError(
                f"`prune_every` ({self.prune_every}) is larger than the pruning ramp ({ramp_steps:.0f} of "
                f"{self.total_steps} steps), so the target would be reached in one jump or never. Lower "
                "`prune_every` or raise `total_steps`."
            )
        for name in ("min_heads_per_group", "min_kv_heads", "min_ffn_width"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"`{name}` must be an integer >= 1 (a pruned model keeps some), got {getattr(self, name)!r}."
                )
        if not 0.0 < self.max_layer_ratio <= 1.0:
            raise ValueError(
                f"`max_layer_ratio` is a fraction of a layer's parameters in (0, 1], got {self.max_layer_ratio}."
            )
        if self.target == "latency" and (self.allocation != "auto" or self.explicit_ratios):
            raise ValueError(
                f"target='latency' is decided by the allocation: it needs allocation='auto' and no explicit "
                f"head_ratio / channel_ratio (got allocation={self.allocation!r}, head_ratio={self.head_ratio}, "
                f"channel_ratio={self.channel_ratio})."
            )
        if self.latency_tokens < 1:
            raise ValueError(f"`latency_tokens` must be >= 1, got {self.latency_tokens}.")
        if self.latency_table is not None:
            self.latency_table = os.fspath(self.latency_table)  # a Path too; stored as text (saved in JSON)
            if self.target != "latency":
                raise ValueError(
                    f"latency_table={self.latency_table!r} is read only under target='latency' (got target="
                    f"{self.target!r}). Pass target='latency', or leave latency_table=None."
                )
            if not os.path.isfile(self.latency_table):
                raise ValueError(
                    f"latency_table={self.latency_table!r} is not a file. Pass the latency_table.json an earlier run "
                    "wrote, or None to measure the table."
                )
        if self.allocation == "auto" and self.normalize and not self.explicit_ratios:
            raise ValueError(
                "allocation='auto' compares head and channel scores across layers, which normalize=True puts on "
                "per-layer scales. Use normalize=False with 'auto', or allocation='fixed'."
            )
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"`round_to` must be >= 1, got {self.round_to}.")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"`ema` must be in [0, 1), got {self.ema}.")

    def _make_servable(self) -> None:
        conflicts = []
        if self.layers is not None:
            conflicts.append(f"layers={self.layers}")
        if (self.skip_first, self.skip_last) not in ((0.1, 1), (0.0, 0)):  # the defaults, or already servable
            conflicts.append(f"skip_first={self.skip_first}, skip_last={self.skip_last}")
        if not self.uniform:
            conflicts.append("uniform=False")
        if self.ranking == "global":
            conflicts.append("ranking='global'")
        if conflicts:
            raise ValueError(
                f"servable=True prunes every decoder layer to the same widths, which {'; '.join(conflicts)} "
                "would not give. Drop those options, or pass servable=False (the model is then loaded with "
                "tp_loraprune.load_pruned)."
            )
        self.skip_first, self.skip_last = 0.0, 0

    @property
    def explicit_ratios(self) -> bool:
        return self.head_ratio is not None or self.channel_ratio is not None

    def to_dict(self) -> dict:
        return asdict(self)
