"""Latency of one attention block and one FFN at every width they can be pruned to, measured on the device.

`target="latency"` (LoRAPruneConfig) makes the allocation remove what saves the most time per unit of score
instead of the most parameters. The time of a block is measured once, on the model's own device and dtype, with
the shapes it would have after pruning. For prefill the pruner replays the model's own blocks where it can
(`latency_replay`); the synthetic blocks here cover the rest (decode steps, fused and expert projections): the
projections as dense matmuls and attention as PyTorch's scaled-dot-product attention, for a prefill of `tokens`
tokens or one decode step against a cache of `tokens` positions. Widths between the measured ones are
interpolated linearly.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


def fastest_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` calls of `fn` after one warm-up call (the minimum: other work on the machine only
    ever adds time)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass(frozen=True)
class Shape:
    """What the timing of a block depends on."""

    hidden: int
    tokens: int  # prefill length, or the cache length of a decode step
    decode: bool
    dtype: torch.dtype
    device: torch.device
    repeats: int = 10


@lru_cache(maxsize=4096)
def ffn_seconds(shape: Shape, width: int, rows_per_channel: int = 2) -> float:
    """One FFN forward: `rows_per_channel` projections hidden → width (gate and up: 2), then width → hidden."""
    if width == 0:
        return 0.0
    m = 1 if shape.decode else shape.tokens
    x = torch.randn(m, shape.hidden, device=shape.device, dtype=shape.dtype)
    w_in = torch.randn(shape.hidden, rows_per_channel * width, device=shape.device, dtype=shape.dtype)
    w_out = torch.randn(width, shape.hidden, device=shape.device, dtype=shape.dtype)
    return fastest_seconds(lambda: (x @ w_in)[:, :width] @ w_out, shape.device, shape.repeats)


@lru_cache(maxsize=4096)
def attention_seconds(shape: Shape, heads: int, kv_heads: int, head_dim: int) -> float:
    """One attention forward: q/k/v projection, causal SDPA (a decode step attends to `tokens` positions), o."""
    if heads == 0:
        return 0.0
    q_len = 1 if shape.decode else shape.tokens
    device, dtype = shape.device, shape.dtype
    x = torch.randn(q_len, shape.hidden, device=device, dtype=dtype)
    w_qkv = torch.randn(shape.hidden, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    w_o = torch.randn(heads * head_dim, shape.hidden, device=device, dtype=dtype)
    k = torch.randn(1, heads, shape.tokens, head_dim, device=device, dtype=dtype)  # K/V repeated to the query heads

    def forward():
        qkv = x @ w_qkv
        q = qkv[:, : heads * head_dim].view(1, q_len, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, k, is_causal=not shape.decode)
        return out.transpose(1, 2).reshape(q_len, heads * head_dim) @ w_o

    return fastest_seconds(forward, shape.device, shape.repeats)


def monotone(values: dict[int, float]) -> dict[int, float]:
    """The running minimum from the widest key down: a narrower block is never taken to be slower than a wider
    one. A measurement that says so is noise, and timing noise only ever adds time, so the wider block's faster
    time is the better estimate (a running maximum from below let one slow outlier at a narrow width flatten
    every width above it)."""
    out, low = {}, float("inf")
    for k in sorted(values, reverse=True):
        low = min(low, values[k])
        out[k] = low
    return dict(sorted(out.items()))


def measured_widths(measure: Callable[[int], float], full: int, step: int, points: int = 17) -> dict[int, float]:
    """`measure` at up to `points` widths that are multiples of `step` (0 and `full` included), and at `step`,
    made monotone. A block with any width left pays its fixed costs (launches, reading its input), so the time
    jumps between 0 and the smallest width; measuring `step` keeps that jump out of the interpolation."""
    spread = (min(full, round(full * i / (points - 1) / step) * step) for i in range(points))
    grid = sorted({0, min(step, full), full, *spread})
    return monotone({w: measure(w) for w in grid})


def interpolate(values: dict[int, float], width: int) -> float:
    """The time at `width` from times measured at some widths (0 and the full width among them): exact at a
    measured width, linear between the two around it."""
    if width in values:
        return values[width]
    grid = sorted(values)
    k = bisect.bisect(grid, width)  # grid[k - 1] < width < grid[k]
    if k == 0 or k == len(grid):
        raise ValueError(f"width {width} is outside the measured widths {grid[0]}..{grid[-1]}.")
    lo, hi = grid[k - 1], grid[k]
    return values[lo] + (values[hi] - values[lo]) * (width - lo) / (hi - lo)
