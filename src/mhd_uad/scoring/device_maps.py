"""The anomaly maps of `anomaly_maps.py`, in torch, computed on the device the input tensors are on.

Evaluation on a GPU computes the maps there instead of copying the volumes to the CPU for numpy and scipy.
`anomaly_maps_torch` takes the arguments of `anomaly_maps` as tensors (image [S,H,W], reconstructions
[N,S,H,W], mask [S,H,W] or None, ensemble [L,S,H,W]; axial slices first, see anomaly_maps.py) and returns
the same scorers as float32 [S,H,W] tensors on that device, equal to the numpy path to 1e-5 (max abs
difference; tests/test_device_maps.py). Each step has a torch twin of its numpy/scipy counterpart:

    ssim_map_3d_torch       ssim.ssim_map_3d (float64, 'mirror' padding of 4, separable 9-tap Gaussian)
    smooth_volume_torch     anomaly_maps.smooth_volume = scipy gaussian_filter, mode 'reflect', truncate 4
    normalise_min_max_torch, distance_to_anomaly_map_torch, eroded_brain_mask_torch, l1_anomaly_map_torch
    median_filter_torch     scipy.ndimage.median_filter(size, mode='reflect'), exact (odd window)

The Mahalanobis distances reuse `pixelwise_mahalanobis` and `diagonal_mahalanobis`, which already run on
the input's device. Everything is batched over the volume; the only Python loops are over filter taps,
erosion iterations and the median's chunks of axial slices (which bound its window memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.anomaly_maps import SCORERS, MapMath, assemble_maps, check_counts, requested_scorers
from mhd_uad.scoring.filters import gaussian_taps, scipy_reflect
from mhd_uad.scoring.mahalanobis import diagonal_mahalanobis, pixelwise_mahalanobis
from mhd_uad.scoring.ssim import SSIM_K1, SSIM_K2, SSIM_SIGMA, gaussian_window_1d

__all__ = [
    "anomaly_maps_torch",
    "ssim_map_3d_torch",
    "smooth_volume_torch",
    "normalise_min_max_torch",
    "distance_to_anomaly_map_torch",
    "eroded_brain_mask_torch",
    "median_filter_torch",
    "l1_anomaly_map_torch",
]

_MEDIAN_SIZE = 5  # §4.6: 3-D median filter 5×5×5 (as anomaly_maps.py)
_EROSION_DIVISOR = 25  # §4.6: iterations = W // 25 (as anomaly_maps.py)
_MEDIAN_CHUNK_ELEMENTS = 1 << 24  # window values held at once by the median (64 MiB in float32)


# ---------------------------------------------------------------- padding and separable filtering


def _extension_index(n: int, pad: int, mirror: bool, device: torch.device) -> Tensor:
    """Source index of each of the n + 2·pad positions of an axis extended by `pad` on both sides.

    mirror: scipy 'mirror' = torch 'reflect' (d c b | a b c d | c b a); else scipy 'reflect', half-sample
    symmetric (c d | d c b a | a b c d | d c b a). Both are periodic, so any pad width works, as in scipy.
    """
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    if not mirror:
        return scipy_reflect(i, n)
    i = i.remainder(2 * n - 2)
    return torch.where(i >= n, 2 * n - 2 - i, i)


def _pad_axis(v: Tensor, dim: int, pad: int, mirror: bool) -> Tensor:
    return v.index_select(dim, _extension_index(v.shape[dim], pad, mirror, v.device))


def _correlate_axes(v: Tensor, taps: np.ndarray, dims: Iterable[int], mirror: bool) -> Tensor:
    """Separable 'same'-size correlation with odd-length taps along each of dims (scipy correlate1d)."""
    half = (taps.size - 1) // 2
    for dim in dims:
        n = v.shape[dim]
        padded = _pad_axis(v, dim, half, mirror)
        # a sum of shifted copies, one per tap, rather than scipy's per-line loop
        out = padded.narrow(dim, 0, n) * float(taps[0])
        for k in range(1, taps.size):
            out.add_(padded.narrow(dim, k, n), alpha=float(taps[k]))
        v = out
    return v


# ---------------------------------------------------------------- SSIM, smoothing, normalisation


def ssim_map_3d_torch(
    preds: Tensor,
    target: Tensor,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
    data_range: float | None = None,
) -> Tensor:
    """Full-size 3-D SSIM map of preds against target, as `ssim.ssim_map_3d` (float32, on their device).

    Computed in float64 like the numpy path (float32 loses ~3e-5 in blur(a²) − μ²). data_range None ->
    max(range(preds), range(target)), 1.0 when both volumes are constant.
    """
    for name, t in (("preds", preds), ("target", target)):
        _require_tensor(name, t)
        if t.ndim != 3:
            raise MhdUadError(f"{name} must be a 3-D volume [S,H,W], got shape {tuple(t.shape)}")
        _require_real_finite(name, t)
    if preds.shape != target.shape:
        raise MhdUadError(f"preds shape {tuple(preds.shape)} does not match target shape {tuple(target.shape)}")
    if preds.device != target.device:
        raise MhdUadError(f"preds is on {preds.device}, target on {target.device}: they must share a device")
    taps = gaussian_window_1d(sigma)
    half = (taps.size - 1) // 2
    if min(preds.shape) <= half:
        raise MhdUadError(
            f"volume shape {tuple(preds.shape)} too small for a {taps.size}-tap window: every axis needs > {half}"
        )
    a = preds.to(torch.float64)
    b = target.to(torch.float64)
    if data_range is None:
        # a 0-d tensor, not a Python float, so nothing waits for the device here
        dr = torch.maximum(a.amax() - a.amin(), b.amax() - b.amin())
        dr = torch.where(dr > 0, dr, torch.ones_like(dr))
    elif not math.isfinite(data_range) or data_range <= 0:
        raise MhdUadError(f"data_range must be a finite number > 0, got {data_range!r}")
    else:
        dr = torch.tensor(float(data_range), dtype=torch.float64, device=a.device)
    c1 = (k1 * dr) ** 2
    c2 = (k2 * dr) ** 2

    # the five moments blurred in one batch ('mirror' = reflect without repeating the edge voxel)
    mu_a, mu_b, e_aa, e_bb, e_ab = _correlate_axes(
        torch.stack([a, b, a * a, b * b, a * b]), taps, dims=(1, 2, 3), mirror=True
    )
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = (e_aa - mu_aa).clamp_min(0.0)
    var_b = (e_bb - mu_bb).clamp_min(0.0)
    cov_ab = e_ab - mu_ab
    ssim = ((2 * mu_ab + c1) * (2 * cov_ab + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
    return ssim.to(torch.float32)


def smooth_volume_torch(v: Tensor, sigma: float = 1.0) -> Tensor:
    """3-D Gaussian smoothing as `anomaly_maps.smooth_volume` (scipy gaussian_filter, mode 'reflect',
    truncate 4, σ in voxels), float64, separable; σ = 0 returns the volume unchanged, as scipy does."""
    _require_tensor("volume", v)
    if not math.isfinite(sigma) or sigma < 0:
        raise MhdUadError(f"sigma must be a finite number >= 0, got {sigma!r}")
    v = v.to(torch.float64)
    if sigma == 0:
        return v.clone()
    taps, _ = gaussian_taps(np.array([sigma]))
    return _correlate_axes(v, taps[0], dims=range(v.ndim), mirror=False)


def normalise_min_max_torch(v: Tensor) -> Tensor:
    """(v − min)/(max − min) over the whole volume (float64); a constant volume maps to zeros."""
    v = v.to(torch.float64)
    lo, hi = v.amin(), v.amax()
    span = hi - lo
    # no host sync: a constant volume has v − lo = 0 everywhere, so dividing by 1 there gives the zeros
    return (v - lo) / torch.where(span > 0, span, torch.ones_like(span))


def distance_to_anomaly_map_torch(distance: Tensor, ssim_residual: Tensor, mask: Tensor) -> Tensor:
    """The MHD assembly of §4.2: A = S · M · gauss_σ1(minmax(distance)) · M (float32)."""
    g = smooth_volume_torch(normalise_min_max_torch(distance))
    m = mask.to(torch.float64)
    return (ssim_residual.to(torch.float64) * m * g * m).to(torch.float32)


# ---------------------------------------------------------------- erosion, median, L1 scorers


def eroded_brain_mask_torch(mask: Tensor, iterations: int | None = None) -> Tensor:
    """Binary (mask > 0) eroded per axial slice with the 2-D cross, `iterations` times (default W//25).

    As `anomaly_maps.eroded_brain_mask`: pixels beyond the slice border count as outside (scipy's
    border_value 0); 0 iterations means no erosion. Returns a bool tensor [S,H,W].
    """
    _require_tensor("mask", mask)
    if mask.ndim != 3:
        raise MhdUadError(f"mask must be a volume [S,H,W], got shape {tuple(mask.shape)}")
    m = mask > 0
    if iterations is None:
        iterations = m.shape[-1] // _EROSION_DIVISOR
    if iterations < 0:
        raise MhdUadError(f"erosion iterations must be >= 0, got {iterations}")
    s, h, w = m.shape
    padded = torch.zeros((s, h + 2, w + 2), dtype=torch.bool, device=m.device)
    for _ in range(iterations):
        padded[:, 1:-1, 1:-1] = m
        # the cross: a pixel survives when it and its 4 in-slice neighbours are all inside
        m = (
            padded[:, 1:-1, 1:-1]
            & padded[:, :-2, 1:-1]
            & padded[:, 2:, 1:-1]
            & padded[:, 1:-1, :-2]
            & padded[:, 1:-1, 2:]
        )
    return m


def median_filter_torch(v: Tensor, size: int = _MEDIAN_SIZE) -> Tensor:
    """3-D median over size³ windows, exactly scipy.ndimage.median_filter(v, size, mode='reflect').

    Pads each axis by size//2 with scipy's 'reflect' (half-sample symmetric) and takes the median of every
    window (odd size, so the middle value is exact, ties included); windows are unfolded a few axial
    slices at a time so at most ~2^24 values are held. Same dtype and device as v.
    """
    _require_tensor("volume", v)
    if v.ndim != 3:
        raise MhdUadError(f"volume must be 3-D [S,H,W], got shape {tuple(v.shape)}")
    if size < 1 or size % 2 == 0:
        raise MhdUadError(f"median size must be odd and >= 1, got {size}")
    half = size // 2
    padded = v
    for dim in range(3):
        padded = _pad_axis(padded, dim, half, mirror=False)
    s, h, w = v.shape
    out = torch.empty_like(v)
    step = max(1, _MEDIAN_CHUNK_ELEMENTS // (h * w * size**3))
    for s0 in range(0, s, step):
        s1 = min(s, s0 + step)
        windows = padded[s0 : s1 + 2 * half].unfold(0, size, 1).unfold(1, size, 1).unfold(2, size, 1)
        out[s0:s1] = windows.reshape(s1 - s0, h, w, size**3).median(dim=-1).values
    return out


def l1_anomaly_map_torch(
    image: Tensor, reconstruction: Tensor, mask: Tensor, erosion_iterations: int | None = None
) -> Tensor:
    """cDDPM scoring (§4.6) as `anomaly_maps.l1_anomaly_map`: |x − x̂| × slice-wise eroded brain mask,
    then the 5×5×5 median (float32; the original's order: erosion, then median)."""
    residual = (image.to(torch.float32) - reconstruction.to(torch.float32)).abs()
    residual = residual * eroded_brain_mask_torch(mask, erosion_iterations)
    return median_filter_torch(residual, _MEDIAN_SIZE)


# ---------------------------------------------------------------- validation and assembly


def _require_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise MhdUadError(f"{name} must be a torch tensor, got {type(value).__name__}")


def _require_real_finite(name: str, t: Tensor) -> None:
    if t.is_complex():
        raise MhdUadError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise MhdUadError(f"{name} contains NaN or infinite values")


def _check_inputs(image: Tensor, recos: Tensor, mask: Tensor | None, ensemble: Tensor | None) -> None:
    """anomaly_maps' checks (same messages), plus: tensors only, all on the image's device."""
    stacks = [("reconstructions", recos)] + ([] if ensemble is None else [("ensemble", ensemble)])
    named = [("image", image), *stacks] + ([] if mask is None else [("mask", mask)])
    for name, t in named:
        _require_tensor(name, t)
        if t.device != image.device:
            raise MhdUadError(f"{name} is on {t.device}, image on {image.device}: all inputs must share a device")
    if image.ndim != 3:
        raise MhdUadError(f"image must be a volume [S,H,W], got shape {tuple(image.shape)}")
    shape = tuple(image.shape)
    for name, stack in stacks:
        if stack.ndim != 4 or tuple(stack.shape[1:]) != shape:
            raise MhdUadError(f"{name} must be [N,S,H,W] = [N,*{shape}], got shape {tuple(stack.shape)}")
        if stack.shape[0] < 1:
            raise MhdUadError(f"need at least one reconstruction in {name}")
    if mask is not None and tuple(mask.shape) != shape:
        raise MhdUadError(f"mask shape {tuple(mask.shape)} does not match image shape {shape}")
    for name, t in named:
        _require_real_finite(name, t)


def anomaly_maps_torch(
    image: Tensor,
    reconstructions: Tensor,
    mask: Tensor | None,
    ridge: float = 1e-2,
    scorers: Iterable[str] = SCORERS,
    ensemble: Tensor | None = None,
    diagnostics: dict | None = None,
) -> dict[str, Tensor]:
    """All requested anomaly maps of one volume on its device; `anomaly_maps` in torch (same arguments).

    Args:
        image: the scan x, [S,H,W] (axial slices first).
        reconstructions: its N reconstructions, [N,S,H,W] (N ≥ 2 for mhd/dmhd).
        mask: brain mask [S,H,W] (raw values multiply the maps; mask > 0 defines the brain), or None.
        ridge: λ of the covariance (method.md: 1e-2).
        scorers: any of SCORERS.
        ensemble: the cddpm scorer's reconstructions, [L,S,H,W]; needed only, and only read, for cddpm.
        diagnostics: a dict the mhd map's Mahalanobis solve puts "residual_share_in_span" into, or None.

    Returns:
        {scorer: float32 [S,H,W] tensor on the image's device} in the order requested.
    """
    names = requested_scorers(scorers)
    ens = ensemble if "cddpm" in names else None
    _check_inputs(image, reconstructions, mask, ens)
    check_counts(names, reconstructions.shape[0], ens is not None)
    x = image.detach().to(torch.float32)
    m_values = torch.ones_like(x) if mask is None else mask.detach().to(torch.float32)
    math = MapMath(
        ssim=ssim_map_3d_torch,
        to_map=distance_to_anomaly_map_torch,
        l1=l1_anomaly_map_torch,
        mahalanobis=lambda x, r, brain: pixelwise_mahalanobis(x, r, brain, ridge=ridge, diagnostics=diagnostics),
        diagonal=lambda x, r, brain: diagonal_mahalanobis(x, r, brain, ridge=ridge),
        absolute=torch.abs,
        float32=lambda v: v.to(torch.float32),
        mean=lambda v: v.mean(dim=0),
    )
    ens = None if ens is None else ens.detach().to(torch.float32)
    return assemble_maps(names, x, reconstructions.detach().to(torch.float32), m_values, ens, math)
