"""tp_loraprune.kernels: the fused Triton kernel against the torch reference (scores.channel_scores).

On a CPU machine the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors); the tests that
need Triton are skipped, with the reason shown by -rs, where it is not installed. The CUDA test is opt-in:
pytest -m gpu tests/test_kernels.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tp_loraprune import kernels, scores

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)


@pytest.fixture
def interpreter(monkeypatch):
    """Run the kernel in Triton's interpreter: triton.jit reads TRITON_INTERPRET when the kernel is built."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _layer(out, inp, r, w_dtype=torch.float32, factor_dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g)
    B = torch.randn(out, r, generator=g)
    dA = torch.randn(r, inp, generator=g) * 0.1
    dB = torch.randn(out, r, generator=g) * 0.1
    W = torch.randn(out, inp, generator=g)
    return tuple(t.to(device=device, dtype=factor_dtype) for t in (A, B, dA, dB)) + (W.to(device, w_dtype),)


def _assert_matches_reference(layer, scaling, kind, rtol=1e-4):
    rows, cols = kernels.fused_channel_scores(*layer, scaling, kind)
    ref_rows, ref_cols = scores.channel_scores(*layer, scaling, kind)
    assert rows.dtype == cols.dtype == torch.float32
    assert rows.shape == ref_rows.shape and cols.shape == ref_cols.shape
    for got, ref in ((rows, ref_rows), (cols, ref_cols)):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()) * 1e-2)


@needs_triton
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["W_fp32", "W_bf16"])
@pytest.mark.parametrize("kind", ["square", "abs"])
@pytest.mark.parametrize("r", [1, 3, 8, 16])
def test_fused_matches_reference_on_odd_shapes(interpreter, r, kind, w_dtype):
    _assert_matches_reference(_layer(37, 83, r, w_dtype), scaling=2.5, kind=kind)


@needs_triton
@pytest.mark.parametrize(
    "out,inp,r", [(1, 1, 1), (130, 300, 5), (300, 70, 40)], ids=["1x1", "several_tiles", "rank_40_K_128"]
)
def test_fused_matches_reference_across_tiles_and_ranks(interpreter, out, inp, r):
    _assert_matches_reference(_layer(out, inp, r, torch.bfloat16, seed=1), scaling=0.5, kind="square")


@needs_triton
def test_fused_deterministic_mode_matches_and_repeats(interpreter):
    layer = _layer(70, 300, 4, torch.bfloat16, seed=2)
    torch.use_deterministic_algorithms(True)
    try:
        first = kernels.fused_channel_scores(*layer, 2.0, "square")
        second = kernels.fused_channel_scores(*layer, 2.0, "square")
        _assert_matches_reference(layer, 2.0, "square")
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@needs_triton
def test_fused_accepts_non_contiguous_and_low_precision_factors(interpreter):
    A, B, dA, dB, W = _layer(37, 83, 3, torch.bfloat16, factor_dtype=torch.bfloat16, seed=3)
    # the same values through transposed views
    A_t, dA_t, W_t = A.t().contiguous().t(), dA.t().contiguous().t(), W.t().contiguous().t()
    assert not (A_t.is_contiguous() or dA_t.is_contiguous() or W_t.is_contiguous())
    rows, cols = kernels.fused_channel_scores(A_t, B, dA_t, dB, W_t, 2.0, "abs")
    ref_rows, ref_cols = scores.channel_scores(A, B, dA, dB, W, 2.0, "abs")
    torch.testing.assert_close(rows, ref_rows, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cols, ref_cols, rtol=1e-4, atol=1e-6)


def test_fused_rejects_bad_inputs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    A, B, dA, dB, W = _layer(5, 7, 2)
    with pytest.raises(ValueError, match=r"^`kind` must be 'square' or 'abs', got 'cube'\.$"):
        kernels.fused_channel_scores(A, B, dA, dB, W, 1.0, "cube")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Shapes do not form W' = W \+ s·B·A: W \(5, 7\), A \(2, 6\)"):
        kernels.fused_channel_scores(A[:, :6], B, dA[:, :6], dB, W, 1.0)
    with pytest.raises(ValueError, match=r"Gradients must have their factor's shape"):
        kernels.fused_channel_scores(A, B, dA[:1], dB, W, 1.0)
    with pytest.raises(TypeError, match=r"^W must be a floating-point tensor, got torch.int64\.$"):
        kernels.fused_channel_scores(A, B, dA, dB, W.long(), 1.0)
    with pytest.raises(ValueError, match=r"fused_channel_scores runs on CUDA tensors, got W on cpu"):
        kernels.fused_channel_scores(A, B, dA, dB, W, 1.0)


def test_dispatcher_uses_torch_path_off_cuda(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fused kernel must not run for CPU tensors")

    monkeypatch.setattr(kernels, "fused_channel_scores", fail)
    layer = _layer(6, 9, 2)
    got = kernels.channel_scores(*layer, 2.0, "square")
    ref = scores.channel_scores(*layer, 2.0, "square")
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_use_fused_needs_cuda_triton_and_no_opt_out(monkeypatch):
    on_gpu = SimpleNamespace(is_cuda=True)  # stands in for a CUDA tensor: use_fused reads only .is_cuda
    monkeypatch.setattr(kernels, "_triton_installed", lambda: True)
    monkeypatch.delenv(kernels.FUSED_ENV, raising=False)
    assert kernels.use_fused(on_gpu)  # type: ignore[arg-type]
    assert not kernels.use_fused(torch.zeros(1))
    monkeypatch.setenv(kernels.FUSED_ENV, "0")
    assert not kernels.use_fused(on_gpu)  # type: ignore[arg-type]
    monkeypatch.setenv(kernels.FUSED_ENV, "1")
    monkeypatch.setattr(kernels, "_triton_installed", lambda: False)
    assert not kernels.use_fused(on_gpu)  # type: ignore[arg-type]


def test_importance_scores_through_the_dispatcher():
    from tp_loraprune import importance

    assert importance.channel_scores is kernels.channel_scores


def test_importing_the_kernels_module_does_not_import_triton():
    code = "import sys, tp_loraprune.kernels, tp_loraprune.importance; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["square", "abs"])
@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096)], ids=["down_proj", "gate_proj"])
def test_dispatcher_runs_kernel_on_cuda_at_llama_sizes(monkeypatch, shape, kind):
    monkeypatch.delenv(kernels.FUSED_ENV, raising=False)
    calls = []
    fused = kernels.fused_channel_scores
    monkeypatch.setattr(kernels, "fused_channel_scores", lambda *a: calls.append(1) or fused(*a))
    out, inp = shape
    A, B, dA, dB, W = _layer(out, inp, 8, torch.bfloat16, device="cuda")
    A = A * inp**-0.5
    dA, dB = dA * 1e-3, dB * 1e-3
    layer = (A, B, dA, dB, W)
    assert kernels.use_fused(W)
    rows, cols = kernels.channel_scores(*layer, 2.0, kind)
    assert calls == [1]
    ref_rows, ref_cols = scores.channel_scores(*layer, 2.0, kind)
    for got, ref in ((rows, ref_rows), (cols, ref_cols)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@needs_triton
@pytest.mark.parametrize("kind", ["square", "abs"])
@pytest.mark.parametrize("r", [1, 3, 8])
def test_fused_projected_gradient_matches_reference(interpreter, monkeypatch, r, kind):
    """The projected gradient through the kernel (its two left factors as dB and second_left) equals the torch
    reference, also through the dispatcher with batched left factors."""
    A, B, dA, dB, W = _layer(45, 70, r, torch.bfloat16, seed=r)
    ref_rows, ref_cols = scores.channel_scores(A, B, dA, dB, W, 2.0, kind, "projected")
    first, second = scores.projected_left_factors(A, B, dB, 2.0)
    rows, cols = kernels.fused_channel_scores(A, B, dA, first, W, 2.0, kind, second_left=second)
    monkeypatch.setattr(kernels, "use_fused", lambda W: True)
    (left,) = scores.batched_projected_left_factors([(A, B, dB, 2.0)])
    via_dispatcher = kernels.channel_scores(A, B, dA, dB, W, 2.0, kind, "projected", left)
    for got, ref in ((rows, ref_rows), (cols, ref_cols), *zip(via_dispatcher, (ref_rows, ref_cols), strict=True)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) * 1e-2)
    with pytest.raises(ValueError, match="second_left must have B's shape"):
        kernels.fused_channel_scores(A, B, dA, first, W, 2.0, kind, second_left=second[:-1])
