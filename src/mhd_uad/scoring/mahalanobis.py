"""Pixel-wise Mahalanobis distance of a scan to its own N stochastic reconstructions (method.md §4.2-4.3).

Per axial slice s, with Ω = {mask > 0} of that slice and P = |Ω|:

    d = x[Ω] − μ[Ω]                      μ = mean of the N reconstructions
    C = [r_n[Ω] − μ[Ω]]_n                N×P, centred reconstructions
    Σ = CᵀC/(N−1) + λ·I_P                full P×P pixel covariance plus ridge λ
    q = d ⊙ (Σ⁻¹ d)                      per-pixel contribution, Σ_i q_i = dᵀΣ⁻¹d
    m = sqrt(q) on Ω (q < 0 or non-finite -> 0), m = 0 outside Ω

`pixelwise_mahalanobis` never forms Σ. Σ has rank-(N−1) structure over a ridge, so by the Woodbury identity

    Σ⁻¹ d = (1/λ)·[d − Cᵀ (λ(N−1)·I_N + CCᵀ)⁻¹ C d]

and each slice costs one N×N system (CCᵀ and Cd accumulated and solved in float64) plus O(N·P) float32
products. All slices are solved in one batch. Pixels outside Ω are handled by zeroing d and C there rather than gathering Ω: with zero rows and
columns the full-grid Σ is block-diagonal (the Ω block is the Ω covariance, the rest is λ·I), so the Ω part
of Σ⁻¹d is exactly the Ω-only result and the rest is 0.

With a `diagnostics` dict, `pixelwise_mahalanobis` also puts the residual's share in the span of C into it,
from the CCᵀ and Cd of its solve (scoring.diagnostics; only then is it computed).

`dense_pixelwise_mahalanobis` is the literal reference (forms and inverts Σ per slice, as the original code
does); it is O(P³) per slice and exists only for tests and the benchmark. `diagonal_mahalanobis` is the
dMHD ablation (§4.3): |d_i| / sqrt(var_i + λ), var over the N reconstructions with N−1.

Array conventions: image [H,W] or [S,H,W] (S axial slices), reconstructions [N,H,W] or [N,S,H,W], mask
like image or None (every pixel). numpy in -> numpy out, torch in -> torch out (same device).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.diagnostics import share_in_span

__all__ = [
    "pixelwise_mahalanobis",
    "dense_pixelwise_mahalanobis",
    "diagonal_mahalanobis",
]


def _as_tensor(name: str, value: Any, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if not array.flags.writeable:  # a memmap slice: torch would warn, and nothing here may write into it
            array = array.copy()
        t = torch.from_numpy(array)
    else:
        raise MhdUadError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if not (
        t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    ):
        raise MhdUadError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if device is not None:
        t = t.to(device)
    return t


def _prepare(
    image: Any, reconstructions: Any, mask: Any, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool]:
    """Validate and bring inputs to [S,H,W] / [N,S,H,W] float32 tensors.

    Returns (x, recos, omega, squeeze_slices, as_numpy); omega is a float32 0/1 tensor (mask > 0).
    """
    as_numpy = not isinstance(image, torch.Tensor)
    x = _as_tensor("image", image)
    device = x.device
    r = _as_tensor("reconstructions", reconstructions, device)

    if x.ndim not in (2, 3):
        raise MhdUadError(f"image must be [H,W] or [S,H,W], got shape {tuple(x.shape)}")
    squeeze = x.ndim == 2
    if r.ndim != x.ndim + 1:
        raise MhdUadError(
            f"reconstructions must be [N,{'H,W' if squeeze else 'S,H,W'}] for an image of shape "
            f"{tuple(x.shape)}, got shape {tuple(r.shape)}"
        )
    if tuple(r.shape[1:]) != tuple(x.shape):
        raise MhdUadError(
            f"reconstructions {tuple(r.shape)} do not match image {tuple(x.shape)}: expected [N, *image.shape]"
        )
    n = r.shape[0]
    if n < 2:
        raise MhdUadError(f"need at least N=2 reconstructions for a covariance, got N={n}")
    if (
        not isinstance(ridge, numbers.Real)
        or isinstance(ridge, bool)
        or not math.isfinite(ridge)
        or ridge <= 0
    ):
        raise MhdUadError(f"ridge must be a finite number > 0, got {ridge!r}")

    if mask is None:
        m = torch.ones(x.shape, dtype=torch.float32, device=device)
    else:
        m = _as_tensor("mask", mask, device)
        if tuple(m.shape) != tuple(x.shape):
            raise MhdUadError(f"mask shape {tuple(m.shape)} does not match image shape {tuple(x.shape)}")
        if m.is_floating_point() and not bool(torch.isfinite(m).all()):
            raise MhdUadError("mask contains NaN or infinite values")
        m = (m > 0).to(torch.float32)

    x = x.to(torch.float32)
    r = r.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise MhdUadError("image contains NaN or infinite values")
    if not bool(torch.isfinite(r).all()):
        raise MhdUadError("reconstructions contain NaN or infinite values")

    if squeeze:
        x, r, m = x.unsqueeze(0), r.unsqueeze(1), m.unsqueeze(0)
    return x, r, m, squeeze, as_numpy


def _finish(m: torch.Tensor, squeeze: bool, as_numpy: bool) -> Any:
    if squeeze:
        m = m[0]
    return m.cpu().numpy() if as_numpy else m


def _sqrt_contribution(q: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """m = sqrt(q) on Ω; q < 0 (NaN in the original) and ±inf become 0; 0 outside Ω."""
    q = torch.where(torch.isfinite(q) & (q > 0), q, torch.zeros_like(q))
    return torch.sqrt(q) * omega


def pixelwise_mahalanobis(image: Any, reconstructions: Any, mask: Any = None, ridge: float = 1e-2,
                          diagnostics: dict | None = None) -> Any:
    """Per-pixel Mahalanobis contribution m_i = sqrt(d_i (Σ⁻¹d)_i) per slice, exact via Woodbury (§4.3).

    Args:
        image: the scan x, [H,W] or [S,H,W] (S independent axial slices).
        reconstructions: the N ≥ 2 reconstructions, [N,H,W] or [N,S,H,W].
        mask: brain mask like image (Ω = mask > 0), or None for every pixel.
        ridge: λ > 0 added to the covariance diagonal (method.md: 1e-2).
        diagnostics: a dict to put "residual_share_in_span" into (scoring.diagnostics), or None.

    Returns:
        float32 map with image's shape, zero outside the mask; numpy or torch like ``image``.
    """
    x, r, omega, squeeze, as_numpy = _prepare(image, reconstructions, mask, ridge)
    n, s = r.shape[0], r.shape[1]
    p = x.shape[-2] * x.shape[-1]

    mu = r.mean(dim=0)  # [S,H,W]
    w = omega.reshape(s, p)
    d = (x - mu).reshape(s, p) * w  # [S,P]
    c = (r - mu).reshape(n, s, p).permute(1, 0, 2) * w.unsqueeze(1)  # [S,N,P]

    # The N×N system is formed and solved in float64: CCᵀ and Cd sum P products, and accumulating them in
    # float32 costs up to ~5e-4 relative error on small m_i when Σ is ill-conditioned (tests); the
    # P-sized products around it stay float32.
    c64, d64 = c.to(torch.float64), d.to(torch.float64)
    gram = torch.bmm(c64, c64.transpose(1, 2))  # [S,N,N] = CCᵀ
    cd = torch.bmm(c64, d64.unsqueeze(-1))  # [S,N,1] = Cd
    if diagnostics is not None:
        diagnostics["residual_share_in_span"] = share_in_span(gram.cpu().numpy(), cd[..., 0].cpu().numpy(),
                                                              float(torch.sum(d64 * d64)))
    del c64, d64
    eye = torch.eye(n, dtype=torch.float64, device=x.device)
    y = torch.linalg.solve(gram + (ridge * (n - 1)) * eye, cd).to(torch.float32)  # [S,N,1]
    sigma_inv_d = (d - torch.bmm(c.transpose(1, 2), y).squeeze(-1)) / ridge  # [S,P]

    q = (d * sigma_inv_d).reshape(x.shape)
    return _finish(_sqrt_contribution(q, omega), squeeze, as_numpy)


def dense_pixelwise_mahalanobis(
    image: Any,
    reconstructions: Any,
    mask: Any = None,
    ridge: float = 1e-2,
    dtype: torch.dtype = torch.float64,
    method: str = "inv",
) -> Any:
    """Reference: form Σ (P×P over Ω) per slice and invert it. O(P³) per slice; tests and benchmark only.

    Args:
        dtype: precision of Σ, the inverse and the products (float64 for tests; float32 mirrors the original).
        method: "inv" (explicit inverse, as the original's torch.inverse) or "solve" (LU solve of Σ·z = d).

    Same arguments, semantics and return as `pixelwise_mahalanobis`; Ω pixels are gathered, not zeroed.
    """
    if method not in ("inv", "solve"):
        raise MhdUadError(f"method must be 'inv' or 'solve', got {method!r}")
    x, r, omega, squeeze, as_numpy = _prepare(image, reconstructions, mask, ridge)
    n, s = r.shape[0], r.shape[1]
    mu = r.mean(dim=0)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(s):
        sel = omega[k] > 0
        if not bool(sel.any()):
            continue
        d = (x[k] - mu[k])[sel].to(dtype)  # [P]
        c = (r[:, k] - mu[k])[:, sel].to(dtype)  # [N,P]
        sigma = c.T @ c / (n - 1)
        sigma.diagonal().add_(ridge)
        if method == "inv":
            sigma_inv_d = torch.linalg.inv(sigma) @ d
        else:
            sigma_inv_d = torch.linalg.solve(sigma, d)
        del sigma
        q = (d * sigma_inv_d).to(torch.float32)
        out[k][sel] = q
    return _finish(_sqrt_contribution(out, omega), squeeze, as_numpy)


def diagonal_mahalanobis(image: Any, reconstructions: Any, mask: Any = None, ridge: float = 1e-2) -> Any:
    """dMHD ablation (method.md §4.3): m_i = |x_i − μ_i| / sqrt(var_i + λ), var over N with N−1; 0 outside mask.

    Same arguments and return conventions as `pixelwise_mahalanobis`.
    """
    x, r, omega, squeeze, as_numpy = _prepare(image, reconstructions, mask, ridge)
    mu = r.mean(dim=0)
    var = (r - mu).square().sum(dim=0) / (r.shape[0] - 1)  # unbiased, N − 1
    m = (x - mu).abs() / torch.sqrt(var + ridge)
    return _finish(m * omega, squeeze, as_numpy)
