"""A fused Triton kernel for the LoRAPrune channel scores, and the dispatcher that picks it.

`scores.channel_scores` computes Ĝ = [dB, B] @ [[A − dA], [dA]] and W' = W + s·B·A as fp32 (out, in) tensors
before it reduces S = (Ĝ ∘ W')² (or |Ĝ ∘ W'|) to channels: memory-bound work on temporaries 2 to 4 times the
size of W. The kernel reads W once and writes O(channels):

    K     = 2r padded with zeros to a power of two ≥ 16 (tl.dot's minimum)
    right = [A − dA; dA]                      (K × BN), loaded once per program
    for each of the program's ROW_TILES row tiles (BM × BN of W):
        left = [dB, B]                        (BM × K; [L₁, L₂] for the projected gradient)
        W'   = dot(s·[B, B], right) + W       ([B, B] @ [A − dA; dA] = B·A, so both products share `right`)
        Ĝ    = dot(left, right)
        S    = (Ĝ ∘ W')² or |Ĝ ∘ W'|
        row scores[tile rows] += S.sum(1);  column sums += S.sum(0) (in registers)
    col scores[program columns] += column sums

Factors are read in place in any float dtype and converted in registers; everything accumulates in fp32.
The `+=` into the output vectors are `tl.atomic_add` (one zero-fill and one launch per layer), whose order,
and so the last bits of a score, varies run to run. Under `torch.use_deterministic_algorithms(True)` each
program instead writes its partial sums to its own slot of a (programs, channels) buffer, summed afterwards
in a fixed order (two more small launches).

`channel_scores` is the dispatcher the importance calls: the kernel for CUDA tensors when Triton is
installed and `TP_LORAPRUNE_FUSED=0` is not set, `scores.channel_scores` (the reference) otherwise.
Triton is imported on the first kernel call, never by `import tp_loraprune`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any

import torch

from . import scores
from .scores import GradientEstimate, ScoreKind

# Environment variable that turns the kernel off ("0"); any other value, or none, leaves it on.
FUSED_ENV = "TP_LORAPRUNE_FUSED"

# (BM, BN, ROW_TILES, num_warps) per padded rank K: a program covers ROW_TILES·BM rows × BN columns of W.
# Hand-picked on an H200 with bf16 W at LLaMA-7B shapes (r = 8: 35 µs for 4096×4096, 92 µs for 11008×4096 of
# GPU time; r = 16 gains from reusing `right` over 4 row tiles). Larger K keeps tiles small so the factor
# tiles and the two fp32 (BM × BN) products stay in registers.
_TILES = {16: (32, 128, 1, 4), 32: (32, 128, 4, 4)}
_TILES_LARGE_K = (64, 64, 1, 4)

# Precision of the two fp32 tl.dot products on NVIDIA: "tf32x3" (three TF32 tensor-core passes, ~fp32
# accuracy: 3e-7 relative error in the channel scores at LLaMA shapes), "ieee" (fp32 FMAs, slower for r ≥ 16)
# or "tf32" (one pass, ~2e-3 relative error). Other backends use "ieee".
DOT_PRECISION = "tf32x3"


def _padded_rank(r: int) -> int:
    """K of the rank-2r products: 2r rounded up to a power of two, at least 16."""
    return max(16, 1 << (2 * r - 1).bit_length())


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_fused(W: torch.Tensor) -> bool:
    """Whether `channel_scores` runs the kernel for a layer with weight W."""
    return W.is_cuda and os.environ.get(FUSED_ENV) != "0" and _triton_installed()


def channel_scores(
    A: torch.Tensor,
    B: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    W: torch.Tensor,
    scaling: float,
    kind: ScoreKind = "square",
    gradient: GradientEstimate = "eq10",
    left: scores.LeftFactors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.channel_scores`, through the fused kernel where `use_fused(W)`, else the torch reference."""
    if not use_fused(W):
        return scores.channel_scores(A, B, dA, dB, W, scaling, kind, gradient, left)
    if gradient == "eq10":
        return fused_channel_scores(A, B, dA, dB, W, scaling, kind)
    if left is None:
        left = scores.projected_left_factors(A.float(), B.float(), dB.float(), scaling)
    first, second = left
    return fused_channel_scores(A, B, dA, first, W, scaling, kind, second_left=second)


def _check(A: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, W: torch.Tensor, kind: str) -> None:
    if kind not in ("square", "abs"):
        raise ValueError(f"`kind` must be 'square' or 'abs', got {kind!r}.")
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"Expected 2-D W (out, in), A (r, in), B (out, r); got W {tuple(W.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}."
        )
    out, in_ = W.shape
    r = A.shape[0]
    if r < 1 or A.shape[1] != in_ or tuple(B.shape) != (out, r):
        raise ValueError(
            f"Shapes do not form W' = W + s·B·A: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}; "
            f"expected A (r, {in_}) and B ({out}, r) with r ≥ 1."
        )
    if dA.shape != A.shape or dB.shape != B.shape:
        raise ValueError(
            f"Gradients must have their factor's shape: A {tuple(A.shape)} vs dA {tuple(dA.shape)}, "
            f"B {tuple(B.shape)} vs dB {tuple(dB.shape)}."
        )
    for name, t in (("A", A), ("B", B), ("dA", dA), ("dB", dB), ("W", W)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}.")
        if t.device != W.device:
            raise ValueError(f"All tensors must be on W's device ({W.device}); {name} is on {t.device}.")


def fused_channel_scores(
    A: torch.Tensor,
    B: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    W: torch.Tensor,
    scaling: float,
    kind: ScoreKind = "square",
    second_left: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.channel_scores` in one pass over W: (per output channel, per input channel) in float32.

    The gradient is [dB, L₂] @ [A − dA; dA] with L₂ = `second_left`, B by default (Eq. 10); the projected
    gradient passes its two left factors as dB and `second_left` (`scores.projected_left_factors`).
    Needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before the first call (Triton's
    interpreter, for tests).
    """
    _check(A, B, dA, dB, W, kind)
    if second_left is not None and (second_left.shape != B.shape or second_left.device != W.device):
        raise ValueError(
            f"second_left must have B's shape {tuple(B.shape)} on {W.device}, got {tuple(second_left.shape)} on "
            f"{second_left.device}."
        )
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not W.is_cuda and not interpret:
        raise ValueError(
            f"fused_channel_scores runs on CUDA tensors, got W on {W.device}; use tp_loraprune.kernels."
            "channel_scores (falls back to the torch path), or set TRITON_INTERPRET=1 to run Triton's interpreter."
        )
    try:
        import triton
    except ImportError as e:
        raise ValueError(
            f"fused_channel_scores needs Triton ({e}): pip install triton, or use tp_loraprune.kernels."
            "channel_scores, which falls back to the torch path."
        ) from e
    out, in_ = W.shape
    r = A.shape[0]
    K = _padded_rank(r)
    BM, BN, row_tiles, warps = _TILES.get(K, _TILES_LARGE_K)
    grid_n, grid_m = triton.cdiv(in_, BN), triton.cdiv(out, BM * row_tiles)
    # Grid dimension 0 (column blocks) may hold 2³¹ − 1 programs, dimension 1 (row blocks) 65535.
    if grid_m > 65535:
        raise ValueError(
            f"W has {out} output channels; the kernel handles at most {65535 * BM * row_tiles}. "
            "Use tp_loraprune.scores.channel_scores for this layer."
        )
    deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        row_part = torch.empty(grid_n, out, device=W.device, dtype=torch.float32)
        col_part = torch.empty(grid_m, in_, device=W.device, dtype=torch.float32)
    else:
        row_part = torch.zeros(out + in_, device=W.device, dtype=torch.float32)
        row_part, col_part = row_part[:out], row_part[out:]
    A, B, dA, dB, W = (t.contiguous() for t in (A, B, dA, dB, W))
    L2 = B if second_left is None else second_left.contiguous()
    on_other_gpu = W.is_cuda and W.device.index != torch.cuda.current_device()
    with torch.cuda.device(W.device) if on_other_gpu else contextlib.nullcontext():
        _kernel(interpret)[(grid_n, grid_m)](
            W,
            A,
            dA,
            B,
            dB,
            L2,
            row_part,
            col_part,
            out,
            in_,
            r,
            float(scaling),
            K=K,
            BM=BM,
            BN=BN,
            ROW_TILES=row_tiles,
            SQUARE=kind == "square",
            SEPARATE=second_left is not None,
            DETERMINISTIC=deterministic,
            PRECISION="ieee" if torch.version.hip else DOT_PRECISION,
            num_warps=warps,
        )
    if deterministic:
        return row_part.sum(0), col_part.sum(0)
    return row_part, col_part


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel; built on first use (Triton picks interpreter or compiler when a function is jitted)."""
    del interpret  # part of the cache key only: TRITON_INTERPRET is read by triton.jit
    import triton
    import triton.language as tl

    @triton.jit
    def channel_scores_kernel(
        W,  # (M, N) any float dtype, contiguous
        A,  # (R, N)
        dA,  # (R, N)
        B,  # (M, R)
        dB,  # (M, R)
        L2,  # (M, R): the left factor of the dA term when SEPARATE (else B is)
        row_out,  # (M,) fp32 zeros; DETERMINISTIC: (column programs, M) partial sums
        col_out,  # (N,) fp32 zeros; DETERMINISTIC: (row programs, N) partial sums
        M,
        N,
        R,
        scaling,
        K: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        ROW_TILES: tl.constexpr,
        SQUARE: tl.constexpr,
        SEPARATE: tl.constexpr,
        DETERMINISTIC: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < N
        cols64 = cols.to(tl.int64)
        ks = tl.arange(0, K)
        k_src = (ks % R).to(tl.int64)  # column of B / row of A that slot k of the padded factors reads

        # right factor (K, BN) = [A − dA; dA; 0], built from [A; 0] and [dA; dA]
        a = tl.load(A + k_src[:, None] * N + cols64[None, :], mask=(ks < R)[:, None] & col_ok[None, :], other=0.0)
        da = tl.load(dA + k_src[:, None] * N + cols64[None, :], mask=(ks < 2 * R)[:, None] & col_ok[None, :], other=0.0)
        a = a.to(tl.float32)
        da = da.to(tl.float32)
        right = tl.where((ks < R)[:, None], a - da, da)

        col_sum = tl.zeros((BN,), dtype=tl.float32)
        for t in range(ROW_TILES):
            rows = (pid_m * ROW_TILES + t) * BM + tl.arange(0, BM)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            # left factors (BM, K): bb = [B, B, 0], left = [dB, B, 0]; zero on rows outside W
            bb = tl.load(
                B + rows64[:, None] * R + k_src[None, :], mask=row_ok[:, None] & (ks < 2 * R)[None, :], other=0.0
            )
            db = tl.load(dB + rows64[:, None] * R + k_src[None, :], mask=row_ok[:, None] & (ks < R)[None, :], other=0.0)
            bb = bb.to(tl.float32)
            if SEPARATE:  # left = [dB, L2, 0]
                l2 = tl.load(
                    L2 + rows64[:, None] * R + k_src[None, :],
                    mask=row_ok[:, None] & ((ks >= R) & (ks < 2 * R))[None, :],
                    other=0.0,
                )
                left = tl.where((ks < R)[None, :], db.to(tl.float32), l2.to(tl.float32))
            else:
                left = tl.where((ks < R)[None, :], db.to(tl.float32), bb)

            w_mask = row_ok[:, None] & col_ok[None, :]
            w = tl.load(W + rows64[:, None] * N + cols64[None, :], mask=w_mask, other=0.0).to(tl.float32)
            merged = tl.dot(bb * scaling, right, acc=w, input_precision=PRECISION)  # W + s·B·A
            grad = tl.dot(left, right, input_precision=PRECISION)  # Ĝ; zero outside W (masked factors)
            saliency = grad * merged
            if SQUARE:
                s = saliency * saliency
            else:
                s = tl.abs(saliency)
            col_sum += tl.sum(s, axis=0)
            if DETERMINISTIC:
                tl.store(row_out + pid_n.to(tl.int64) * M + rows64, tl.sum(s, axis=1), mask=row_ok)
            else:
                tl.atomic_add(row_out + rows64, tl.sum(s, axis=1), mask=row_ok, sem="relaxed")
        if DETERMINISTIC:
            tl.store(col_out + pid_m.to(tl.int64) * N + cols64, col_sum, mask=col_ok)
        else:
            tl.atomic_add(col_out + cols64, col_sum, mask=col_ok, sem="relaxed")

    return channel_scores_kernel
