"""scoring.diagnostics: the residual's share in the span of the reconstructions, and map correlation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhd_uad.errors import MhdUadError
from mhd_uad.models.inference import DeviceScan, MhdSettings, cpu_part
from mhd_uad.scoring.diagnostics import map_correlation, residual_share_in_span
from mhd_uad.scoring.mahalanobis import pixelwise_mahalanobis


def _dense_share(x, r, mask):
    inside = total = 0.0
    for s in range(x.shape[0]):
        om = mask[s] > 0
        mu = r[:, s].mean(0)
        d = (x[s] - mu)[om]
        c = (r[:, s] - mu)[:, om]
        proj = c.T @ np.linalg.pinv(c @ c.T) @ c  # P x P projector onto the row span of C
        inside += d @ proj @ d
        total += d @ d
    return inside / total


def test_share_matches_a_dense_projector_and_its_limits():
    rng = np.random.default_rng(0)
    x = rng.random((3, 6, 5))
    r = rng.random((4, 3, 6, 5))
    mask = (rng.random(x.shape) > 0.3).astype(np.float32)
    share = residual_share_in_span(x, r, mask)
    assert share == pytest.approx(_dense_share(x, r, mask), rel=1e-9)
    assert 0.0 < share < 1.0
    # A residual that is a combination of the centred reconstructions lies wholly inside the span.
    mu = r.mean(0)
    inside = mu + 0.7 * (r[0] - mu) - 0.2 * (r[2] - mu)
    assert residual_share_in_span(inside, r, None) == pytest.approx(1.0, rel=1e-9)
    # Reconstructions that only differ outside the mask leave nothing to span on it.
    r2 = np.repeat(x[None] * 0.5, 3, axis=0)
    r2[:, :, 0, :] += rng.random((3, 3, 5))
    m2 = np.ones_like(x)
    m2[:, 0, :] = 0
    assert residual_share_in_span(x, r2, m2) == pytest.approx(0.0, abs=1e-12)


def test_the_mahalanobis_solve_reports_the_share_of_the_float64_reference():
    """pixelwise_mahalanobis(..., diagnostics=) takes the share from the CCᵀ and Cd of its own solve (centred in
    float32, so equal to the float64 reference to 1e-6, not to the bit) and returns the same map as without."""
    rng = np.random.default_rng(3)
    x = rng.random((4, 12, 10)).astype(np.float32)
    cases = {"independent": rng.random((5, *x.shape)).astype(np.float32),
             "close": (x + 0.05 * rng.standard_normal((6, *x.shape))).astype(np.float32)}
    mask = (rng.random(x.shape) > 0.4).astype(np.float32)
    mask[1] = 0  # a slice without brain
    for name, r in cases.items():
        for m in (None, mask):
            diag = {}
            got = pixelwise_mahalanobis(x, r, m, ridge=1e-2, diagnostics=diag)
            np.testing.assert_array_equal(got, pixelwise_mahalanobis(x, r, m, ridge=1e-2))
            expected = residual_share_in_span(x, r, m)
            assert 0.01 < expected < 0.99, name
            assert diag["residual_share_in_span"] == pytest.approx(expected, abs=1e-6), (name, m is None)
    # a single slice [H,W], as torch tensors
    diag = {}
    pixelwise_mahalanobis(torch.from_numpy(x[0]), torch.from_numpy(r[:, 0]), torch.from_numpy(mask[0]),
                          diagnostics=diag)
    assert diag["residual_share_in_span"] == pytest.approx(residual_share_in_span(x[0], r[:, 0], mask[0]),
                                                           abs=1e-6)


def test_cpu_part_takes_the_share_from_the_mhd_solve_or_makes_its_own():
    rng = np.random.default_rng(4)
    image = rng.random((6, 12, 12)).astype(np.float32)
    recos = (image + 0.05 * rng.standard_normal((4, *image.shape))).astype(np.float32)
    mask = np.zeros(image.shape, dtype=np.float32)
    mask[:, 2:10, 3:11] = 1.0
    settings = MhdSettings(num_reconstructions=4, t_index=499, ridge=1e-2, seed=0, max_batch=4, precision="32",
                           scorers=("mhd", "nocov"))
    shares = []
    for scorers in (("mhd", "nocov"), ("nocov",)):
        diag = {}
        cpu_part(image, mask, DeviceScan(recos=recos), settings, scorers, diagnostics=diag)
        shares.append(diag["residual_share_in_span"])
    assert shares[0] == shares[1] == pytest.approx(residual_share_in_span(image, recos, mask), abs=1e-6)


def test_bad_shapes_and_correlation():
    with pytest.raises(MhdUadError, match="do not match"):
        residual_share_in_span(np.zeros((2, 3, 3)), np.zeros((1, 2, 3, 3)), None)
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 4, 4)), rng.random((2, 4, 4))
    mask = np.ones((2, 4, 4))
    mask[0] = 0
    assert map_correlation(a, b, mask) == pytest.approx(np.corrcoef(a[1].ravel(), b[1].ravel())[0, 1])
    assert map_correlation(a, 2 * a + 1, None) == pytest.approx(1.0)
    assert np.isnan(map_correlation(a, np.ones_like(a), None))
