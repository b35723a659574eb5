"""tp_loraprune.scores: Eq. 10 and the per-channel reductions, checked against plain-Python references."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_channel_scores

from tp_loraprune.scores import channel_scores, l2_normalized, lora_weight_gradient, projected_weight_gradient


def _factors(out=5, inp=7, r=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g)
    B = torch.randn(out, r, generator=g)
    dA = torch.randn(r, inp, generator=g)
    dB = torch.randn(out, r, generator=g)
    W = torch.randn(out, inp, generator=g)
    return tuple(t.to(dtype) for t in (A, B, dA, dB, W))


def test_lora_weight_gradient_is_eq10():
    A, B, dA, dB, _ = _factors()
    expected = dB @ A + B @ dA - dB @ dA
    got = lora_weight_gradient(A, B, dA, dB)
    assert got.shape == (5, 7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_weight_gradient_elementwise():
    A, B, dA, dB, _ = _factors(out=3, inp=4, r=2, seed=1)
    got = lora_weight_gradient(A, B, dA, dB)
    for i in range(3):
        for j in range(4):
            ref = sum(float(dB[i, k] * A[k, j] + B[i, k] * dA[k, j] - dB[i, k] * dA[k, j]) for k in range(2))
            assert got[i, j].item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("kind", ["square", "abs"])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_channel_scores_match_double_loop(kind, scaling):
    A, B, dA, dB, W = _factors(seed=3)
    rows, cols = channel_scores(A, B, dA, dB, W, scaling, kind)
    ref_rows, ref_cols = reference_channel_scores(A, B, dA, dB, W, scaling, kind)
    assert rows.shape == (5,) and cols.shape == (7,)
    assert rows.dtype == torch.float32 and cols.dtype == torch.float32
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols.double(), ref_cols, rtol=1e-5, atol=1e-5)


def test_square_and_abs_differ():
    """The two kinds are not the same reduction (guards against a kind argument that is ignored)."""
    args = _factors(seed=4)
    sq, _ = channel_scores(*args, 1.0, "square")
    ab, _ = channel_scores(*args, 1.0, "abs")
    assert not torch.allclose(sq, ab)


def test_channel_scores_do_not_modify_inputs():
    args = _factors(seed=5)
    before = [t.clone() for t in args]
    channel_scores(*args, 2.0, "square")
    for t, b in zip(args, before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize("kind", ["square", "abs"])
def test_bf16_inputs_are_scored_in_fp32(kind):
    """bf16 factors are upcast first: the result equals the fp32 computation on the same (bf16) values."""
    # Large r and values that are awkward for bf16 make a bf16 computation visibly wrong.
    args16 = _factors(out=6, inp=9, r=16, seed=6, dtype=torch.bfloat16)
    args32 = tuple(t.float() for t in args16)
    rows16, cols16 = channel_scores(*args16, 1.7, kind)
    rows32, cols32 = channel_scores(*args32, 1.7, kind)
    assert rows16.dtype == torch.float32 and cols16.dtype == torch.float32
    torch.testing.assert_close(rows16, rows32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cols16, cols32, rtol=1e-6, atol=1e-6)
    ref_rows, ref_cols = reference_channel_scores(*args16, 1.7, kind)
    torch.testing.assert_close(rows16.double(), ref_rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cols16.double(), ref_cols, rtol=1e-5, atol=1e-4)


def test_l2_normalized():
    v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(l2_normalized(v), torch.tensor([0.6, 0.8]))
    assert torch.isfinite(l2_normalized(torch.zeros(3))).all()


# ---------------------------------------------------------------------------------------------- projected gradient
def _lora_layer_gradients(out=6, inp=5, r=2, s=1.5, seed=0):
    """A LoRA linear y = x·Wᵀ + s·x·Aᵀ·Bᵀ under a nonlinear loss: its factors, their gradients, and the true
    gradient of the (merged) weight from autograd, in float64."""
    g = torch.Generator().manual_seed(seed)
    W, A, B = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((out, inp), (r, inp), (out, r)))
    x = torch.randn(8, inp, generator=g, dtype=torch.float64)
    for t in (W, A, B):
        t.requires_grad_(True)
    (torch.tanh(x @ W.T + s * (x @ A.T) @ B.T) ** 2).sum().backward()
    return A.detach(), B.detach(), A.grad, B.grad, W.grad, s


def _explicit_projection(G, A, B):
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    return G @ P_A + P_B @ G - P_B @ G @ P_A


def test_projected_gradient_is_the_true_gradient_projected_onto_the_lora_tangent_space():
    A, B, dA, dB, G, s = _lora_layer_gradients()
    torch.testing.assert_close(projected_weight_gradient(A, B, dA, dB, s), _explicit_projection(G, A, B))


def test_projected_gradient_is_unchanged_by_rescaling_the_factors_where_eq10_is_not():
    """B·A is the same for (c·A, B/c); the factor gradients become (dA/c, c·dB). The projection stays, Ĝ moves."""
    A, B, dA, dB, _, s = _lora_layer_gradients(seed=1)
    c = 3.0
    torch.testing.assert_close(
        projected_weight_gradient(c * A, B / c, dA / c, c * dB, s), projected_weight_gradient(A, B, dA, dB, s)
    )
    assert not torch.allclose(lora_weight_gradient(c * A, B / c, dA / c, c * dB), lora_weight_gradient(A, B, dA, dB))


def test_projected_gradient_with_b_zero_keeps_the_row_space_part():
    """PEFT's default init (B = 0): only G·P_A is visible, and the pseudo-inverse does not blow up."""
    A, B, dA, dB, G, s = _lora_layer_gradients(seed=2)
    B = torch.zeros_like(B)
    dB = s * G @ A.T
    dA = s * B.T @ G
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(projected_weight_gradient(A, B, dA, dB, s), G @ P_A)


def test_channel_scores_with_the_projected_gradient_sum_its_elements():
    A, B, dA, dB, G, s = _lora_layer_gradients(seed=3)
    W = torch.randn(G.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows, cols = channel_scores(A, B, dA, dB, W, s, "square", gradient="projected")
    element = (_explicit_projection(G, A, B) * (W + s * B @ A)) ** 2
    torch.testing.assert_close(rows.double(), element.sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cols.double(), element.sum(0), rtol=1e-4, atol=1e-6)


def test_batched_left_factors_equal_one_layer_at_a_time():
    """Stacked by shape, one pseudo-inverse call per stacked group: the same left factors as one layer at a time, in at
    least float32, whatever mix of shapes, ranks, scalings, dtypes and B = 0 the model has."""
    from tp_loraprune.scores import batched_projected_left_factors, projected_left_factors

    g = torch.Generator().manual_seed(0)
    f64 = {"generator": g, "dtype": torch.float64}
    layers = [
        (torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g), 2.0),
        (torch.randn(2, 7, generator=g), torch.zeros(5, 2), torch.randn(5, 2, generator=g), 1.0),  # B = 0
        (torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g), 0.5),
        (torch.randn(4, 6, generator=g), torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g), 2.0),
        (torch.randn(3, 5, **f64), torch.randn(8, 3, **f64), torch.randn(8, 3, **f64), 4.0),
        (*(torch.randn(*shape, generator=g).bfloat16() for shape in ((4, 12), (10, 4), (10, 4))), 2.0),
    ]
    for (A, B, dB, s), got in zip(layers, batched_projected_left_factors(layers), strict=True):
        dtype = torch.promote_types(A.dtype, torch.float32)
        ref = projected_left_factors(A.to(dtype), B.to(dtype), dB.to(dtype), s)
        for mine, theirs in zip(got, ref, strict=True):
            assert mine.dtype == dtype and mine.shape == B.shape and mine.is_contiguous()
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert batched_projected_left_factors([]) == []
