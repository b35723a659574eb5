"""The LoRAPrune criterion as pure tensor math (paper Eq. 10 and the official code's variant).

For a LoRA layer with frozen weight W (out, in), factors A (r, in), B (out, r) and scaling s, the
merged weight is W' = W + s·B·A. LoRAPrune estimates the gradient of W' from the LoRA factors and
their gradients only:

    Ĝ = ∂L/∂B · A + B · ∂L/∂A − ∂L/∂B · ∂L/∂A                          (Eq. 10)

and scores every weight element by  I = (Ĝ ∘ W')²  (the paper), or  |Ĝ ∘ W'|  (the official code).
A structure (output channel, input channel, attention head) is scored by summing its elements.

`gradient="projected"` replaces Ĝ by the projection of the weight gradient onto what LoRA can see
(`projected_weight_gradient`), which does not grow with the factors' magnitudes (experimental).
"""

from __future__ import annotations

from typing import Literal

import torch

ScoreKind = Literal["square", "abs"]
GradientEstimate = Literal["eq10", "projected"]


def lora_weight_gradient(A: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor) -> torch.Tensor:
    """Ĝ = dB·A + B·dA − dB·dA, shape (out, in), computed as one rank-2r product.

    dB·A + B·dA − dB·dA = dB·(A − dA) + B·dA = [dB, B] @ [[A − dA], [dA]].
    """
    left = torch.cat([dB, B], dim=1)  # (out, 2r)
    right = torch.cat([A - dA, dA], dim=0)  # (2r, in)
    return left @ right


def projected_weight_gradient(
    A: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The weight gradient G projected onto the tangent space of the rank-r matrices at B·A, shape (out, in).

    The factor gradients are dB = s·G·Aᵀ and dA = s·Bᵀ·G, so with P_A = Aᵀ(AAᵀ)⁺A and P_B = B(BᵀB)⁺Bᵀ

        G·P_A + P_B·G − P_B·G·P_A = (dB·(AAᵀ)⁺·A + B·(BᵀB)⁺·dA − B·(BᵀB)⁺·Bᵀ·dB·(AAᵀ)⁺·A) / s

    from r×r pseudo-inverses only. Eq. 10's Ĝ is, to first order, G·AᵀA·s + s·BBᵀ·G: it grows with the
    factors' magnitudes, which under PiSSA are the weight's top singular values, so layers with different
    spectra get scores on different scales. The projection is the same for any rescaling of A and B (B = 0
    leaves only the G·P_A term)."""
    gram_a = torch.linalg.pinv(A @ A.T)  # (r, r)
    gram_b = torch.linalg.pinv(B.T @ B)  # (r, r)
    row_part = dB @ gram_a  # (out, r): G·Aᵀ(AAᵀ)⁺ · s
    col_part = B @ gram_b  # (out, r): B(BᵀB)⁺
    left = torch.cat([row_part - col_part @ (B.T @ row_part), col_part], dim=1)  # (out, 2r)
    right = torch.cat([A, dA], dim=0)  # (2r, in)
    return (left @ right) / scaling


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of one LoRA layer reduced to channels: (per output channel, per input channel).

    Holds at most two (out, in) temporaries, and only while this layer is scored. Everything is
    computed in float32 whatever the dtype of the inputs.
    """
    A, B, dA, dB, W = (t.float() for t in (A, B, dA, dB, W))
    G = lora_weight_gradient(A, B, dA, dB) if gradient == "eq10" else projected_weight_gradient(A, B, dA, dB, scaling)
    S = element_importance(G, W, A, B, scaling, kind)
    return S.sum(dim=1), S.sum(dim=0)


def l2_normalized(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The official code's per-module normalization: v / (‖v‖₂ + eps)."""
    return v / (torch.linalg.vector_norm(v) + eps)
