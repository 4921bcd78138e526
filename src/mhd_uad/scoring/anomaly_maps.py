"""Anomaly-map assembly for one test volume: MHD (method.md §4.2) and the baselines (§4.3, §4.5, §4.6).

Axis convention: every volume here is [S,H,W] with S the axial slices first (a [X,Y,Z] NIfTI-order
volume becomes [Z,X,Y] with `data.geometry.to_slices`); reconstructions are [N,S,H,W]. The Mahalanobis
covariance is per axial slice (over H×W), the mask erosion of the L1 scorers is per axial slice with
iterations W//25 (W = last axis, 96 -> 3 as in the original); SSIM, the Gaussian smoothing and the median
filter are isotropic 3-D operations, so their result does not depend on the axis order.

Scorers (all return float32 [S,H,W], zero outside the brain mask; the L1 scorers are not re-masked after
their median filter, as in the original, so they are zero outside the mask unless a voxel's 5³
neighbourhood is mostly eroded brain, which a 3-pixel erosion rules out for ordinary brain masks):
    mhd    S·M·G·M with G = gauss_σ1(minmax(pixel-wise Mahalanobis)), S = 1 − SSIM3D(μ, x)
    dmhd   the mhd pipeline with the diagonal-covariance distance |d|/sqrt(var + λ)
    nocov  the mhd pipeline with |x − μ|·[M > 0] in place of the Mahalanobis distance
    mean   (1 − SSIM3D(μ, x))·M
    single (1 − SSIM3D(r_1, x))·M, the first reconstruction alone
    l1_mean_postproc  median_5³(|x − μ| · erode_slicewise(M > 0)), the cDDPM post-processing of §4.6
           applied to x̂ = μ, the mean of the N reconstructions at one t
    cddpm  the original cDDPM scoring (§4.6): the same steps with x̂ = mean of the ENS reconstructions,
           one at each of t = 250, 500, 750 (passed as `ensemble`, [L,S,H,W])
The Dice of the scorers in CONNECTED_COMPONENT_SCORERS uses `connected_component_filter` on the
thresholded map, their AUPRC the map itself (§4.6 step 4).
M is the mask as given (its raw values multiply the map, as in the original); Ω = M > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.mahalanobis import diagonal_mahalanobis, pixelwise_mahalanobis
from mhd_uad.scoring.ssim import ssim_map_3d

__all__ = [
    "SCORERS",
    "CONNECTED_COMPONENT_SCORERS",
    "anomaly_maps",
    "normalise_min_max",
    "smooth_volume",
    "distance_to_anomaly_map",
    "eroded_brain_mask",
    "l1_anomaly_map",
    "connected_component_filter",
]

SCORERS: tuple[str, ...] = ("mhd", "single", "mean", "dmhd", "nocov", "l1_mean_postproc", "cddpm")
# Scorers whose Dice is taken after removing connected components of < 8 voxels (§4.6 step 4).
CONNECTED_COMPONENT_SCORERS: tuple[str, ...] = ("l1_mean_postproc", "cddpm")

_MEDIAN_SIZE = 5  # §4.6: 3-D median filter 5×5×5
_EROSION_DIVISOR = 25  # §4.6: iterations = W // 25


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def normalise_min_max(volume: np.ndarray) -> np.ndarray:
    """(v − min)/(max − min) over the whole volume (float64); a constant volume maps to zeros (not 0/0)."""
    v = np.asarray(volume, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros_like(v)
    return (v - lo) / (hi - lo)


def smooth_volume(volume: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """3-D Gaussian smoothing as the original: scipy gaussian_filter, σ in voxels, mode 'reflect', truncate 4."""
    return ndimage.gaussian_filter(
        np.asarray(volume, dtype=np.float64), sigma=sigma, mode="reflect", truncate=4.0
    )


def distance_to_anomaly_map(distance: np.ndarray, ssim_residual: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The MHD assembly of §4.2: A = S · M · gauss_σ1(minmax(distance)) · M (float32)."""
    g = smooth_volume(normalise_min_max(distance))
    m = np.asarray(mask, dtype=np.float64)
    return (np.asarray(ssim_residual, dtype=np.float64) * m * g * m).astype(np.float32)


def eroded_brain_mask(mask: np.ndarray, iterations: int | None = None) -> np.ndarray:
    """Binary (mask > 0) eroded per axial slice with the 2-D cross, `iterations` times (default W//25).

    mask is [S,H,W]; pixels at the slice border count as outside (scipy's border_value 0). iterations 0
    means no erosion (scipy would read 0 as "erode until nothing changes").
    """
    m = np.asarray(mask) > 0
    if m.ndim != 3:
        raise MhdUadError(f"mask must be a volume [S,H,W], got shape {m.shape}")
    if iterations is None:
        iterations = m.shape[-1] // _EROSION_DIVISOR
    if iterations < 0:
        raise MhdUadError(f"erosion iterations must be >= 0, got {iterations}")
    if iterations == 0:
        return m
    # a (1,3,3) cross has no extent along S, so this 3-D erosion is exactly the per-slice 2-D erosion
    cross = ndimage.generate_binary_structure(2, 1)[np.newaxis]
    return ndimage.binary_erosion(m, structure=cross, iterations=iterations)


def l1_anomaly_map(
    image: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray, erosion_iterations: int | None = None
) -> np.ndarray:
    """cDDPM scoring (§4.6): |x − x̂| × slice-wise eroded brain mask, then a 5×5×5 median filter (float32).

    The original's code order (erosion, then median); its paper text names the median first.
    """
    x = np.asarray(image, dtype=np.float32)
    residual = np.abs(x - np.asarray(reconstruction, dtype=np.float32))
    residual *= eroded_brain_mask(mask, erosion_iterations)
    return ndimage.median_filter(residual, size=_MEDIAN_SIZE, mode="reflect").astype(np.float32)


def connected_component_filter(binary: np.ndarray, min_size: int = 8) -> np.ndarray:
    """Keep the connected components (26-connectivity in 3-D, full connectivity in any ndim) of ≥ min_size voxels.

    The original removes components with skimage `filled_area ≤ 7`; skimage fills holes with a fully
    connected structure, so a component needs ≥ 26 voxels to enclose one and, for components this small,
    filled area = voxel count.
    """
    b = np.asarray(binary) > 0
    if min_size < 1:
        raise MhdUadError(f"min_size must be >= 1, got {min_size}")
    labels, count = ndimage.label(b, structure=np.ones((3,) * b.ndim, dtype=bool))
    if count == 0:
        return b
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def _check_inputs(image: np.ndarray, recos: np.ndarray, mask: np.ndarray, ensemble: np.ndarray | None = None
                  ) -> None:
    if image.ndim != 3:
        raise MhdUadError(f"image must be a volume [S,H,W], got shape {image.shape}")
    stacks = [("reconstructions", recos)] + ([] if ensemble is None else [("ensemble", ensemble)])
    for name, stack in stacks:
        if stack.ndim != 4 or stack.shape[1:] != image.shape:
            raise MhdUadError(f"{name} must be [N,S,H,W] = [N,*{image.shape}], got shape {stack.shape}")
        if stack.shape[0] < 1:
            raise MhdUadError(f"need at least one reconstruction in {name}")
    if mask.shape != image.shape:
        raise MhdUadError(f"mask shape {mask.shape} does not match image shape {image.shape}")
    for name, arr in (("image", image), *stacks, ("mask", mask)):
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
            raise MhdUadError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise MhdUadError(f"{name} contains NaN or infinite values")


def anomaly_maps(
    image: Any,
    reconstructions: Any,
    mask: Any,
    ridge: float = 1e-2,
    scorers: Iterable[str] = SCORERS,
    ensemble: Any = None,
    diagnostics: dict | None = None,
) -> dict[str, np.ndarray]:
    """All requested anomaly maps of one volume, sharing μ, SSIM(μ, x) and |x − μ| between scorers.

    Args:
        image: the scan x, [S,H,W] (axial slices first), numpy or torch.
        reconstructions: its N reconstructions, [N,S,H,W] (N ≥ 2 for mhd/dmhd); torch inputs are brought to
            the CPU (scoring.device_maps makes the same maps on their device).
        mask: brain mask [S,H,W] (raw values multiply the maps; mask > 0 defines the brain), or None.
        ridge: λ of the covariance (method.md: 1e-2).
        scorers: any of SCORERS.
        ensemble: the cddpm scorer's reconstructions, [L,S,H,W], one per noise level (§4.6 ENS: t = 250,
            500, 750); needed only, and only read, when cddpm is requested.
        diagnostics: a dict that the mhd map's Mahalanobis solve puts "residual_share_in_span" into
            (`pixelwise_mahalanobis`), or None; untouched without mhd among the scorers.

    Returns:
        {scorer: float32 [S,H,W] map} in the order requested.
    """
    names = requested_scorers(scorers)
    x = _to_numpy(image)
    r = _to_numpy(reconstructions)
    m = np.ones(x.shape, dtype=np.float32) if mask is None else _to_numpy(mask)
    ens = _to_numpy(ensemble) if "cddpm" in names and ensemble is not None else None
    _check_inputs(x, r, m, ens)
    check_counts(names, r.shape[0], ens is not None)
    x = np.asarray(x, dtype=np.float32)
    m_values = np.asarray(m, dtype=np.float32)
    math = MapMath(
        ssim=ssim_map_3d,
        to_map=distance_to_anomaly_map,
        l1=l1_anomaly_map,
        mahalanobis=lambda x, r, brain: _to_numpy(pixelwise_mahalanobis(x, r, brain, ridge=ridge,
                                                                         diagnostics=diagnostics)),
        diagonal=lambda x, r, brain: diagonal_mahalanobis(x, r, brain, ridge=ridge),
        absolute=np.abs,
        float32=lambda v: v.astype(np.float32),
        mean=lambda v: v.mean(axis=0),
    )
    ens = None if ens is None else np.asarray(ens, dtype=np.float32)
    return assemble_maps(names, x, np.asarray(r, dtype=np.float32), m_values, ens, math)


def requested_scorers(scorers: Iterable[str]) -> tuple[str, ...]:
    """The scorers asked for, checked: each known, none twice."""
    names = tuple(scorers)
    unknown = [s for s in names if s not in SCORERS]
    if unknown:
        raise MhdUadError(f"unknown scorer(s) {unknown}; known: {list(SCORERS)}")
    if len(set(names)) != len(names):
        raise MhdUadError(f"scorers listed twice: {list(names)}")
    return names


def check_counts(names: tuple[str, ...], n_reconstructions: int, has_ensemble: bool) -> None:
    """cddpm needs its ensemble, mhd and dmhd at least two reconstructions."""
    if "cddpm" in names and not has_ensemble:
        raise MhdUadError("the cddpm scorer needs its ensemble reconstructions (one per noise level, [L,S,H,W])")
    if n_reconstructions < 2 and {"mhd", "dmhd"} & set(names):
        raise MhdUadError(f"mhd and dmhd need N >= 2 reconstructions, got N={n_reconstructions}")


@dataclass(frozen=True)
class MapMath:
    """The operations the scorers are assembled from, for one array library (numpy here; torch on the device
    in scoring.device_maps): the same assembly, `assemble_maps`, serves both."""

    ssim: Callable  # (a, b) -> SSIM map
    to_map: Callable  # (distance, 1 − SSIM, mask values) -> S·M·G·M
    l1: Callable  # (x, x̂, brain) -> the cDDPM post-processed L1 map
    mahalanobis: Callable  # (x, recos, brain) -> pixel-wise Mahalanobis distance
    diagonal: Callable  # (x, recos, brain) -> the diagonal-covariance distance
    absolute: Callable
    float32: Callable
    mean: Callable  # mean over the first axis


def assemble_maps(names: tuple[str, ...], x, r, m_values, ens, math: MapMath) -> dict:
    """Every requested scorer's map from float32 x [S,H,W], reconstructions r [N,S,H,W], mask values and the
    ensemble (cddpm only), sharing μ, SSIM(μ, x) and |x − μ| between scorers."""
    brain = m_values > 0
    mu = math.mean(r)
    cache: dict = {}

    def mean_ssim_residual():
        if "s_mean" not in cache:
            cache["s_mean"] = 1.0 - math.ssim(mu, x)
        return cache["s_mean"]

    def abs_residual():
        if "abs" not in cache:
            cache["abs"] = math.absolute(x - mu)
        return cache["abs"]

    out: dict = {}
    for name in names:
        if name == "mhd":
            out[name] = math.to_map(math.mahalanobis(x, r, brain), mean_ssim_residual(), m_values)
        elif name == "dmhd":
            out[name] = math.to_map(math.diagonal(x, r, brain), mean_ssim_residual(), m_values)
        elif name == "nocov":
            out[name] = math.to_map(abs_residual() * brain, mean_ssim_residual(), m_values)
        elif name == "mean":
            out[name] = math.float32(mean_ssim_residual() * m_values)
        elif name == "single":
            out[name] = math.float32((1.0 - math.ssim(r[0], x)) * m_values)
        elif name == "l1_mean_postproc":
            out[name] = math.l1(x, mu, brain)
        elif name == "cddpm":
            # §4.6: x̂ = the average of the ENS reconstructions, then the same residual and post-processing
            out[name] = math.l1(x, math.mean(ens), brain)
    return out
