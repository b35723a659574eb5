"""The LoRAPrune criterion as pure tensor math (paper Eq. 10 and the official code's variant).

For a LoRA layer with frozen weight W (out, in), factors A (r, in), B (out, r) and scaling s, the
merged weight is W' = W + s·B·A. LoRAPrune estimates the gradient of W' from the LoRA factors and
their gradients only:

    Ĝ = ∂L/∂B · A + B · ∂L/∂A − ∂L/∂B · ∂L/∂A                          (Eq. 10)

and scores every weight element by  I = (Ĝ ∘ W')²  (the paper), or  |Ĝ ∘ W'|  (the official code).
A structure (output channel, input channel, attention head) is scored by summing its elements.

`gradient="projected"` replaces Ĝ by the projection of the weight gradient onto what LoRA can see
(`projected_weight_gradient`), which does not grow with the factors' magnitudes (the default of
`LoRAGuidedImportance` and `LoRAPruneConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch

ScoreKind = Literal["square", "abs"]
GradientEstimate = Literal["eq10", "projected"]
LeftFactors = tuple[torch.Tensor, torch.Tensor]  # (L₁, L₂): a projected gradient is L₁·(A − dA) + L₂·dA


def lora_weight_gradient(A: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor) -> torch.Tensor:
    """Ĝ = dB·A + B·dA − dB·dA, shape (out, in), computed as one rank-2r product.

    dB·A + B·dA − dB·dA = dB·(A − dA) + B·dA = [dB, B] @ [[A − dA], [dA]].
    """
    left = torch.cat([dB, B], dim=1)  # (out, 2r)
    right = torch.cat([A - dA, dA], dim=0)  # (2r, in)
    return left @ right


def _left_factors(
    B: torch.Tensor, dB: torch.Tensor, pinv_a: torch.Tensor, pinv_b: torch.Tensor, scaling: float | torch.Tensor
) -> LeftFactors:
    """(L₁, L₂) from B, dB and the pseudo-inverses (AAᵀ)⁺, (BᵀB)⁺; batched over leading dimensions alike."""
    row_part = dB @ pinv_a  # (out, r): G·Aᵀ(AAᵀ)⁺ · s
    col_part = B @ pinv_b  # (out, r): B(BᵀB)⁺
    on_a = (row_part - col_part @ (B.mT @ row_part)) / scaling  # G·P_A − P_B·G·P_A = on_a · A
    return on_a, on_a + col_part / scaling  # X·A + C·dA = X·(A − dA) + (X + C)·dA


def projected_left_factors(A: torch.Tensor, B: torch.Tensor, dB: torch.Tensor, scaling: float) -> LeftFactors:
    """(L₁, L₂), both (out, r), with the projected weight gradient = L₁·(A − dA) + L₂·dA: Eq. 10's form
    [dB, B] @ [A − dA; dA] with other left factors, so the fused kernel computes either. Needs the r×r
    pseudo-inverses (AAᵀ)⁺ and (BᵀB)⁺ (Gram matrices: symmetric, PSD; B = 0 gives (BᵀB)⁺ = 0)."""
    pinv_a = torch.linalg.pinv(A @ A.T, hermitian=True)
    pinv_b = torch.linalg.pinv(B.T @ B, hermitian=True)
    return _left_factors(B, dB, pinv_a, pinv_b, scaling)


def batched_projected_left_factors(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]],
) -> list[LeftFactors]:
    """`projected_left_factors` of many layers (A, B, dB, scaling) at once, in at least float32: layers of one
    shape, device and dtype are stacked and computed by batched matrix products, with one pseudo-inverse call for
    all their Gram matrices. Per layer, the ten small kernels and two solver calls (each a host sync on CUDA) cost
    more than the fused score itself."""
    groups: dict[tuple, list[int]] = {}
    for i, (A, B, _, _) in enumerate(layers):
        dtype = torch.promote_types(A.dtype, torch.float32)
        groups.setdefault((tuple(A.shape), tuple(B.shape), A.device, dtype), []).append(i)
    out: list[LeftFactors | None] = [None] * len(layers)
    for (_, _, device, dtype), members in groups.items():
        A, B, dB = (torch.stack([cast(torch.Tensor, layers[i][k]).to(dtype) for i in members]) for k in range(3))
        scaling = torch.tensor([layers[i][3] for i in members], device=device, dtype=dtype).view(-1, 1, 1)
        pinv_a, pinv_b = torch.linalg.pinv(torch.cat([A @ A.mT, B.mT @ B]), hermitian=True).chunk(2)
        first, second = _left_factors(B, dB, pinv_a, pinv_b, scaling)
        for k, i in enumerate(members):
            out[i] = (first[k], second[k])
    return out  # type: ignore[return-value]


def projected_weight_gradient(
    A: torch.Tensor,
    B: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    scaling: float,
    left: LeftFactors | None = None,
) -> torch.Tensor:
    """The weight gradient G projected onto the tangent space of the rank-r matrices at B·A, shape (out, in).

    The factor gradients are dB = s·G·Aᵀ and dA = s·Bᵀ·G, so with P_A = Aᵀ(AAᵀ)⁺A and P_B = B(BᵀB)⁺Bᵀ

        G·P_A + P_B·G − P_B·G·P_A = (dB·(AAᵀ)⁺·A + B·(BᵀB)⁺·dA − B·(BᵀB)⁺·Bᵀ·dB·(AAᵀ)⁺·A) / s

    from r×r pseudo-inverses only. Eq. 10's Ĝ is, to first order, G·AᵀA·s + s·BBᵀ·G: it grows with the
    factors' magnitudes, which under PiSSA are the weight's top singular values, so layers with different
    spectra get scores on different scales. The projection is the same for any rescaling of A and B (B = 0
    leaves only the G·P_A term). `left`: its left factors, if already computed (`batched_projected_left_factors`)."""
    first, second = left if left is not None else projected_left_factors(A, B, dB, scaling)
    return torch.cat([first, second], dim=1) @ torch.cat([A - dA, dA], dim=0)


def element_importance(
    G: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, kind: ScoreKind
) -> torch.Tensor:
    """Per-element importance of the merged weight W' = W + s·B·A: (Ĝ ∘ W')² or |Ĝ ∘ W'|."""
    merged = torch.addmm(W, B, A, alpha=scaling)  # (out, in)
    saliency = G.mul_(merged)
    return saliency.square_() if kind == "square" else saliency.abs_()


def channel_scores(
    A: torch.Tensor,
    B: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    W: torch.Tensor,
    scaling: float,
    kind: ScoreKind = "square",
    gradient: GradientEstimate = "eq10",
    left: LeftFactors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of one LoRA layer reduced to channels: (per output channel, per input channel).

    Holds at most two (out, in) temporaries, and only while this layer is scored. Everything is
    computed in float32 whatever the dtype of the inputs. `left`: see `projected_weight_gradient`.
    """
    A, B, dA, dB, W = (t.float() for t in (A, B, dA, dB, W))
    if gradient == "eq10":
        G = lora_weight_gradient(A, B, dA, dB)
    else:
        G = projected_weight_gradient(A, B, dA, dB, scaling, left)
    S = element_importance(G, W, A, B, scaling, kind)
    return S.sum(dim=1), S.sum(dim=0)


def l2_normalized(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The official code's per-module normalization: v / (‖v‖₂ + eps)."""
    return v / (torch.linalg.vector_norm(v) + eps)
