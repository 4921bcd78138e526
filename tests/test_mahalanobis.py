"""Pixel-wise Mahalanobis distance: low-rank (Woodbury) path against the dense P×P reference (method.md §4.2-4.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.mahalanobis import (
    dense_pixelwise_mahalanobis,
    diagonal_mahalanobis,
    pixelwise_mahalanobis,
)

N = 10
RIDGE = 1e-2


def _structured_case(rng: np.random.Generator, s: int = 5, h: int = 9, w: int = 11, n: int = N):
    """Reconstructions varying along a few spatial modes (so Σ⁻¹ is far from 1/λ) plus pixel noise."""
    x = rng.random((s, h, w)).astype(np.float32)
    modes = rng.standard_normal((4, s, h, w))
    coeffs = 0.3 * rng.standard_normal((n, 4))
    recos = (
        x[None] - 0.05 + np.einsum("nk,kshw->nshw", coeffs, modes) + 0.03 * rng.standard_normal((n, s, h, w))
    )
    return x, recos.astype(np.float32)


def _masks(rng: np.random.Generator, s: int, h: int, w: int) -> np.ndarray:
    mask = rng.random((s, h, w)) > 0.4  # slice 0: random
    mask[1] = False  # empty slice
    mask[2] = True  # full slice
    mask[3] = False
    mask[3].flat[rng.choice(h * w, size=5, replace=False)] = True  # P = 5 < N = 10
    return mask  # slice 4: random


def _max_rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_low_rank_matches_dense_reference_with_masks():
    rng = np.random.default_rng(0)
    x, recos = _structured_case(rng)
    mask = _masks(rng, *x.shape)
    fast = pixelwise_mahalanobis(x, recos, mask, ridge=RIDGE)
    ref = dense_pixelwise_mahalanobis(x, recos, mask, ridge=RIDGE)
    assert fast.shape == x.shape and fast.dtype == np.float32
    assert ref[2].max() > 0 and ref[3].max() > 0  # the full and the P < N slices are non-trivial
    assert _max_rel_diff(fast, ref) < 1e-5
    # element-wise too, wherever the reference is not tiny
    big = ref > 1e-2 * ref.max()
    np.testing.assert_allclose(fast[big], ref[big], rtol=1e-4)
    np.testing.assert_array_equal(fast[1], 0.0)  # empty-mask slice -> zeros
    np.testing.assert_array_equal(fast[~mask], 0.0)


def test_matches_independent_quadratic_form_and_contributions_sum():
    """Against a from-scratch numpy float64 computation of q = d ⊙ Σ⁻¹d, and Σ_i q_i = dᵀΣ⁻¹d."""
    rng = np.random.default_rng(1)
    x, recos = _structured_case(rng, s=1, h=8, w=8)
    d = (x - recos.mean(0)).reshape(-1).astype(np.float64)
    c = (recos - recos.mean(0)).reshape(N, -1).astype(np.float64)
    sigma = c.T @ c / (N - 1) + RIDGE * np.eye(d.size)
    q = d * np.linalg.solve(sigma, d)
    assert (q < 0).sum() > 0  # the case does exercise negative contributions
    expected = np.sqrt(np.where(q > 0, q, 0.0)).reshape(x.shape)
    got = pixelwise_mahalanobis(x, recos, ridge=RIDGE)
    assert _max_rel_diff(got, expected) < 1e-4
    np.testing.assert_allclose(q.sum(), d @ np.linalg.solve(sigma, d), rtol=1e-10)
    # negative contributions become 0, never NaN
    assert np.all(got.reshape(-1)[q < 0] == 0.0)
    assert np.isfinite(got).all() and (got >= 0).all()


def test_hand_worked_single_pixel():
    """P = 1, N = 2: r = μ ± a, Σ = 2a²/(N−1) + λ, m = |d| / sqrt(Σ)."""
    x = np.array([[1.0]], dtype=np.float32)
    recos = np.array([[[0.6]], [[0.4]]], dtype=np.float32)  # μ = 0.5, a = 0.1, d = 0.5, Σ = 0.02 + 0.01
    expected = 0.5 / np.sqrt(0.03)
    np.testing.assert_allclose(pixelwise_mahalanobis(x, recos, ridge=0.01), [[expected]], rtol=1e-5)
    np.testing.assert_allclose(dense_pixelwise_mahalanobis(x, recos, ridge=0.01), [[expected]], rtol=1e-6)
    np.testing.assert_allclose(diagonal_mahalanobis(x, recos, ridge=0.01), [[expected]], rtol=1e-5)


def test_masked_pixels_decouple_exactly():
    """The claim behind zeroing d and C outside Ω: the full-grid Σ is then block-diagonal, so its solve
    restricted to Ω equals the Ω-only solve and is 0 elsewhere."""
    rng = np.random.default_rng(2)
    x, recos = _structured_case(rng, s=1, h=7, w=7)
    omega = (rng.random(x.shape) > 0.5).reshape(-1)
    d = (x - recos.mean(0)).reshape(-1).astype(np.float64)
    c = (recos - recos.mean(0)).reshape(N, -1).astype(np.float64)
    d_zero, c_zero = d * omega, c * omega
    full = np.linalg.solve(c_zero.T @ c_zero / (N - 1) + RIDGE * np.eye(d.size), d_zero)
    c_o = c[:, omega]
    only = np.linalg.solve(c_o.T @ c_o / (N - 1) + RIDGE * np.eye(omega.sum()), d[omega])
    np.testing.assert_allclose(full[omega], only, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(full[~omega], 0.0)


def test_values_outside_mask_do_not_matter():
    rng = np.random.default_rng(3)
    x, recos = _structured_case(rng)
    mask = _masks(rng, *x.shape)
    base = pixelwise_mahalanobis(x, recos, mask)
    x2, recos2 = x.copy(), recos.copy()
    x2[~mask] = rng.random((~mask).sum()) * 5
    recos2[:, ~mask] = rng.standard_normal((N, (~mask).sum())) * 3
    np.testing.assert_allclose(pixelwise_mahalanobis(x2, recos2, mask), base, rtol=1e-5, atol=1e-6)
    # while a change inside the mask does change it
    x2[mask] += 0.2
    assert np.abs(pixelwise_mahalanobis(x2, recos2, mask) - base).max() > 1e-2


def test_two_d_and_three_d_forms_agree():
    rng = np.random.default_rng(4)
    x, recos = _structured_case(rng)
    mask = _masks(rng, *x.shape)
    vol = pixelwise_mahalanobis(x, recos, mask)
    for k in range(x.shape[0]):
        one = pixelwise_mahalanobis(x[k], recos[:, k], mask[k])
        assert one.shape == x.shape[1:]
        np.testing.assert_allclose(one, vol[k], rtol=1e-5, atol=1e-6)


def test_numpy_and_torch_inputs():
    rng = np.random.default_rng(5)
    x, recos = _structured_case(rng)
    mask = _masks(rng, *x.shape)
    as_np = pixelwise_mahalanobis(x, recos, mask)
    as_torch = pixelwise_mahalanobis(torch.from_numpy(x), torch.from_numpy(recos), torch.from_numpy(mask))
    assert isinstance(as_np, np.ndarray) and isinstance(as_torch, torch.Tensor)
    assert as_torch.dtype == torch.float32
    np.testing.assert_allclose(as_torch.numpy(), as_np, rtol=1e-6, atol=1e-7)
    diag_t = diagonal_mahalanobis(torch.from_numpy(x), torch.from_numpy(recos), torch.from_numpy(mask))
    assert isinstance(diag_t, torch.Tensor)
    dense_t = dense_pixelwise_mahalanobis(
        torch.from_numpy(x), torch.from_numpy(recos), torch.from_numpy(mask)
    )
    assert isinstance(dense_t, torch.Tensor)


def test_read_only_inputs_such_as_memmap_slices_are_neither_written_nor_warned_about(tmp_path):
    import warnings

    rng = np.random.default_rng(6)
    x, recos = _structured_case(rng)
    mask = _masks(rng, *x.shape)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")  # read-only, as the prepared sets are opened
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable" would fail here
        out = pixelwise_mahalanobis(mapped, recos, mask)
    np.testing.assert_array_equal(out, pixelwise_mahalanobis(x, recos, mask))
    np.testing.assert_array_equal(np.asarray(mapped), x)


def test_mask_none_means_every_pixel():
    rng = np.random.default_rng(6)
    x, recos = _structured_case(rng, s=2)
    np.testing.assert_array_equal(
        pixelwise_mahalanobis(x, recos), pixelwise_mahalanobis(x, recos, np.ones(x.shape, dtype=bool))
    )
    assert (pixelwise_mahalanobis(x, recos) > 0).mean() > 0.5


def test_diagonal_variant_formula():
    rng = np.random.default_rng(7)
    x, recos = _structured_case(rng)
    mask = _masks(rng, *x.shape)
    got = diagonal_mahalanobis(x, recos, mask, ridge=0.05)
    r64 = recos.astype(np.float64)
    expected = np.abs(x - r64.mean(0)) / np.sqrt(r64.var(0, ddof=1) + 0.05) * mask
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_float32_dense_inverse_agrees_on_realistic_variation():
    """The original's fp32 explicit inverse agrees with the low-rank path to 1e-4 relative when the
    reconstructions vary as real ones do (a few hundredths of intensity)."""
    rng = np.random.default_rng(8)
    x = rng.random((2, 24, 24)).astype(np.float32)
    modes = rng.standard_normal((3, 2, 24, 24))
    recos = x[None] + 0.02 * np.einsum("nk,kshw->nshw", rng.standard_normal((N, 3)), modes)
    recos = (recos + 0.01 * rng.standard_normal(recos.shape)).astype(np.float32)
    ref32 = dense_pixelwise_mahalanobis(x, recos, ridge=RIDGE, dtype=torch.float32, method="inv")
    assert _max_rel_diff(pixelwise_mahalanobis(x, recos, ridge=RIDGE), ref32) < 1e-4


def test_low_rank_is_closer_to_exact_than_float32_inverse_when_ill_conditioned():
    """Large reconstruction variation makes Σ ill-conditioned: the low-rank path stays within 1e-5 of the
    float64 reference, closer than the original's float32 inverse."""
    rng = np.random.default_rng(11)
    x, recos = _structured_case(rng, s=2, h=24, w=24)
    exact = dense_pixelwise_mahalanobis(x, recos, ridge=RIDGE)
    inv32 = dense_pixelwise_mahalanobis(x, recos, ridge=RIDGE, dtype=torch.float32, method="solve")
    fast_err = _max_rel_diff(pixelwise_mahalanobis(x, recos, ridge=RIDGE), exact)
    assert fast_err < 1e-5
    assert fast_err < _max_rel_diff(inv32, exact)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, r, m: (x, r[:1], m), "at least N=2"),
        (lambda x, r, m: (x, r[:, :, :-1], m), "do not match"),
        (lambda x, r, m: (x, r[0], m), "reconstructions must be"),
        (lambda x, r, m: (x[None], r[None], m), "image must be"),
        (lambda x, r, m: (x, r, m[:, :-1]), "mask shape"),
        (lambda x, r, m: (np.where(m, np.nan, x), r, m), "image contains NaN"),
        (lambda x, r, m: (x, np.full_like(r, np.inf), m), "reconstructions contain NaN"),
        (lambda x, r, m: ("x", r, m), "numpy array or a torch tensor"),
    ],
)
def test_bad_inputs_raise(make, message):
    rng = np.random.default_rng(9)
    x, recos = _structured_case(rng, s=2)
    mask = np.ones(x.shape, dtype=bool)
    with pytest.raises(MhdUadError, match=message):
        pixelwise_mahalanobis(*make(x, recos, mask))


@pytest.mark.parametrize("ridge", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_ridge_raises(ridge):
    rng = np.random.default_rng(10)
    x, recos = _structured_case(rng, s=1)
    with pytest.raises(MhdUadError, match="ridge"):
        pixelwise_mahalanobis(x, recos, ridge=ridge)
