"""tp_loraprune.scores: Eq. 10 and the per-channel reductions, checked against plain-Python references."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_channel_scores

from tp_loraprune.scores import channel_scores, l2_normalized, lora_weight_gradient


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
