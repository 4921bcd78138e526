"""Covariance diagnostics: how much the full covariance of the N reconstructions can matter (demo-profile.md).

Per axial slice, with Ω = {mask > 0}, d = x[Ω] − μ[Ω] and C the N×P centred reconstructions (as in
scoring.mahalanobis): the Mahalanobis map differs from |x − μ|/√λ only through the part of d inside the row
span of C (Woodbury: Σ⁻¹d = (d − Cᵀ(λ(N−1)I + CCᵀ)⁻¹Cd)/λ). The residual's share in the span is that part's
share of the volume's residual energy, Σ_s ‖P_s d_s‖² / Σ_s ‖d_s‖² (P_s the projector onto the span of slice
s): near 0, Σ⁻¹ can hardly change the map. `share_in_span` computes it from the CCᵀ and Cd that the
Mahalanobis solve forms anyway (`pixelwise_mahalanobis(..., diagnostics=...)` reports it so);
`residual_share_in_span` is the same in float64 from the arrays, the reference for tests. `map_correlation` is
the Pearson correlation of two maps over the brain (the mhd and nocov maps on the demo correlate about 0.98).
"""

from __future__ import annotations

import numpy as np

from mhd_uad.errors import MhdUadError


def residual_share_in_span(image: np.ndarray, reconstructions: np.ndarray, mask: np.ndarray | None) -> float:
    """Share of ‖x − μ‖² (over the brain, all slices) inside the span of the centred reconstructions, in float64
    from the arrays (`pixelwise_mahalanobis` reports it from its own solve, to about 1e-8)."""
    x = np.asarray(image, dtype=np.float64)
    r = np.asarray(reconstructions, dtype=np.float64)
    if r.ndim != x.ndim + 1 or r.shape[1:] != x.shape or r.shape[0] < 2:
        raise MhdUadError(f"reconstructions {r.shape} do not match the image {x.shape} with N >= 2")
    omega = np.ones(x.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    if x.ndim == 2:
        x, r, omega = x[None], r[:, None], omega[None]
    mu = r.mean(axis=0)
    d = np.where(omega, x - mu, 0.0).reshape(x.shape[0], -1)  # [S, P]
    c = np.where(omega, r - mu, 0.0).reshape(r.shape[0], x.shape[0], -1).transpose(1, 0, 2)  # [S, N, P]
    gram = c @ c.transpose(0, 2, 1)  # [S, N, N]
    cd = (c @ d[..., None])[..., 0]  # [S, N]
    return share_in_span(gram, cd, float(np.sum(d * d)))


def share_in_span(gram: np.ndarray, cd: np.ndarray, total: float) -> float:
    """Σ_s ‖P_s d_s‖² / total from each slice's CCᵀ [S, N, N] and Cd [S, N] (float64), total = Σ_s ‖d_s‖²;
    nan for a zero residual.

    Centred reconstructions sum to zero, so C and Cd have nothing along the all-ones direction of the N
    reconstructions; both are projected off it (J = I − 11ᵀ/N): C centred in float32, as the Mahalanobis solve
    centres it, sums to rounding noise whose spread can pass the cutoff below and add a spurious direction."""
    if total == 0:
        return float("nan")
    centring = np.eye(gram.shape[-1]) - 1.0 / gram.shape[-1]
    gram, cd = centring @ gram @ centring, cd @ centring
    inside = 0.0
    for g, v in zip(gram, cd, strict=True):
        # ‖P d‖² = (Cd)ᵀ (CCᵀ)⁺ (Cd); directions whose spread is rounding noise (relative to the residual's own
        # energy) span nothing.
        w, vecs = np.linalg.eigh(g)
        keep = w > 1e-12 * max(float(w.max(initial=0.0)), total)
        inside += float(np.sum((vecs[:, keep].T @ v) ** 2 / w[keep]))
    return inside / total


def map_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> float:
    """Pearson correlation of two maps over mask > 0 (nan when either is constant there)."""
    omega = np.ones(np.shape(a), dtype=bool) if mask is None else np.asarray(mask) > 0
    u, v = np.asarray(a, dtype=np.float64)[omega], np.asarray(b, dtype=np.float64)[omega]
    if u.size < 2 or u.std() == 0 or v.std() == 0:
        return float("nan")
    return float(np.corrcoef(u, v)[0, 1])
