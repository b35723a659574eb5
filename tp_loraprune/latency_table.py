"""The latency table of `target="latency"` as a file: measured once on a device, reused by later runs.

The pruner times every pruned block at the widths the allocation can reach (`tp_loraprune.latency`) when it is
built. Timings on a busy machine vary from run to run, and so would the allocation; a table saved by one run
(`LoRAPruner.latency_table.save(path)`, or the CLI's `latency_table.json` next to the pruned model) and passed
to the next (`LoRAPruneConfig(latency_table=path)`, CLI `--latency-table`) makes every run on that device see
the same costs. The file is JSON: per FFN the seconds at the measured widths, per attention block the seconds at
each (query heads, KV heads) state, and what it was measured for (tokens, phase, device).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "tp_loraprune.latency_table/1"


def device_name(device: torch.device) -> str:
    """'cpu', or 'cuda: NVIDIA H200': the device a table was measured on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


@dataclass(frozen=True)
class LatencyTable:
    """Seconds of every pruned block: `ffn[key][width]` and `attention[key][(heads, kv_heads)]`, measured for a
    prefill of `tokens` tokens (or one decode step against a cache that long) on `device`."""

    tokens: int
    phase: str
    device: str
    ffn: dict[str, dict[int, float]] = field(default_factory=dict)
    attention: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "tokens": self.tokens,
            "phase": self.phase,
            "device": self.device,
            "torch": torch.__version__,
            "ffn": {key: {str(w): s for w, s in times.items()} for key, times in self.ffn.items()},
            "attention": {
                key: {f"{q},{kv}": s for (q, kv), s in times.items()} for key, times in self.attention.items()
            },
        }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"latency_table={str(path)!r} cannot be read as JSON ({e}).") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f'latency_table={str(path)!r} is not a latency table (no "format": {FORMAT!r}); pass a file that '
                "LoRAPruner.latency_table.save wrote (the CLI writes latency_table.json next to the model)."
            )
        try:
            ffn = {k: {int(w): float(s) for w, s in v.items()} for k, v in data["ffn"].items()}
            attention = {k: {_state(state): float(s) for state, s in v.items()} for k, v in data["attention"].items()}
            return cls(int(data["tokens"]), str(data["phase"]), str(data["device"]), ffn, attention)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"latency_table={str(path)!r} is malformed ({type(e).__name__}: {e}).") from None

    def check(
        self, tokens: int, phase: str, device: str, ffn_widths: dict[str, int], head_states: dict[str, list]
    ) -> None:
        """Raise a ValueError unless this table was measured for these settings and covers exactly these blocks:
        every FFN from 0 to its full width, every attention block at every state the allocation can reach."""
        if (self.tokens, self.phase) != (tokens, phase):
            raise ValueError(
                f"The latency table was measured for {self.phase} at {self.tokens} tokens, but latency_phase="
                f"{phase!r} and latency_tokens={tokens}. Pass the settings it was measured for, or measure a new "
                "table (latency_table=None)."
            )
        if self.device != device:
            raise ValueError(
                f"The latency table was measured on {self.device!r}, but the model is on {device!r}: timings of "
                "one device say nothing about another. Measure a new table there (latency_table=None)."
            )
        for kind, have, want in (
            ("FFN", set(self.ffn), set(ffn_widths)),
            ("attention", set(self.attention), set(head_states)),
        ):
            if have != want:
                missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
                raise ValueError(
                    f"The latency table's {kind} blocks are not this model's pruned blocks (missing: {missing}, not "
                    f"in this model: {extra}). A table is reused only for the same model and pruned layers; "
                    "measure a new one (latency_table=None)."
                )
        for key, full in ffn_widths.items():
            widths = sorted(self.ffn[key])
            if widths[0] != 0 or widths[-1] != full:
                raise ValueError(
                    f"The latency table times {key} at widths {widths[0]}..{widths[-1]}, but it is {full} wide now: "
                    "a table describes the unpruned model. Measure a new one (latency_table=None)."
                )
        for key, states in head_states.items():
            if set(self.attention[key]) != set(states):
                raise ValueError(
                    f"The latency table times {key} at {sorted(self.attention[key])} (query heads, KV heads), but "
                    f"the allocation can reach {sorted(states)} here (another head_mode, or a pruned model). "
                    "Measure a new table (latency_table=None)."
                )


def _state(text: str) -> tuple[int, int]:
    heads, kv = text.split(",")
    return int(heads), int(kv)
