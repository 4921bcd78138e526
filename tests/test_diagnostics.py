"""scoring.diagnostics: the residual's share in the span of the reconstructions, and map correlation."""

from __future__ import annotations

import numpy as np
import pytest

from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.diagnostics import map_correlation, residual_share_in_span


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
