"""Realism measures of a brain MR image against its tissue maps (used by benchmarks/demo_realism.py).

Pure numpy/scipy on arrays; every measure takes an image, tissue partial-volume (PV) maps on the same grid
and the voxel size, so that the demo images and real templates are measured alike:

- tissue contrast: the median intensity of the voxels of each class (PV above the class threshold: 0.9,
  deep GM 0.6 as it is thin) relative to WM's;
- noise sigma: Immerkaer's (1996) estimator extended to 3-D: the image convolved with the separable kernel
  [1, -2, 1] x [1, -2, 1] x [1, -2, 1] (zero for a constant and for a ramp along any axis), whose response to
  white noise of sigma s has sd s * sqrt(216); sigma = sqrt(pi / 2) * mean|response| / sqrt(216), over
  eroded WM (every voxel of each 3 x 3 x 3 neighbourhood in WM);
- SNR: mean eroded-WM signal / that sigma, on the grid measured and as the equivalent at 1 mm (noise
  averaged from 1 mm voxels to `v` mm ones falls by (v / 1 mm)^1.5);
- residual bias: the coefficient of variation over eroded WM of the WM-only image smoothed with a 10 mm
  Gaussian by normalised convolution, smooth(image * wm) / smooth(wm);
- HF noise: the sd over eroded WM of image - Gaussian(sigma = 1 voxel)(image), relative to the WM mean, the
  Gaussian taken over WM only (normalised convolution: GM and CSF next to WM do not leak in); the plain
  Gaussian's value is kept too (`hf_noise_plain`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi

from mhd_uad.errors import MhdUadError

# PV above which a voxel counts as that tissue (deep GM is thin: a lower bar keeps enough voxels).
PV_THRESHOLDS: dict[str, float] = {"gm": 0.9, "wm": 0.9, "csf": 0.9, "dgm": 0.6}
BIAS_SIGMA_MM = 10.0
HF_SIGMA_VOX = 1.0
MIN_VOXELS = 20  # fewer voxels than this in a class (or in eroded WM): the measure is NaN
_LAPLACE = np.array([1.0, -2.0, 1.0])


def _check_same_shape(image: np.ndarray, *others: np.ndarray) -> None:
    for other in others:
        if other.shape != image.shape:
            raise MhdUadError(f"realism: image {image.shape} and map {other.shape} are not on one grid")


def tissue_masks(
    pv: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float] = PV_THRESHOLDS,
    exclude: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Boolean mask of each class in `pv` whose PV exceeds its threshold, minus `exclude` (e.g. lesions)."""
    masks = {}
    for name, fraction in pv.items():
        mask = np.asarray(fraction) > thresholds.get(name, 0.9)
        if exclude is not None:
            mask &= ~np.asarray(exclude, dtype=bool)
        masks[name] = mask
    return masks


def tissue_ratios_measured(
    image: np.ndarray,
    pv: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float] = PV_THRESHOLDS,
    exclude: np.ndarray | None = None,
) -> dict[str, float]:
    """Median intensity of each class relative to WM's (WM itself 1.0); NaN where a class has too few voxels."""
    if "wm" not in pv:
        raise MhdUadError("realism: the tissue maps have no 'wm' class")
    _check_same_shape(image, *pv.values())
    masks = tissue_masks(pv, thresholds, exclude)
    medians = {k: float(np.median(image[m])) if m.sum() >= MIN_VOXELS else np.nan for k, m in masks.items()}
    wm = medians["wm"]
    if not np.isfinite(wm) or wm <= 0:
        return {k: np.nan for k in medians}
    return {k: v / wm for k, v in medians.items()}


def eroded(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """The mask eroded by `iterations` voxels with the full 3 x 3 x 3 neighbourhood (outside counts as out)."""
    structure = np.ones((3,) * np.ndim(mask), dtype=bool)
    return ndi.binary_erosion(np.asarray(mask, dtype=bool), structure, iterations=iterations, border_value=0)


def immerkaer_sigma(image: np.ndarray, region: np.ndarray) -> float:
    """Noise sigma by the 3-D Immerkaer estimator, averaged over the voxels of `region` whose whole
    3 x 3 x 3 neighbourhood lies in `region` (so no edge of it enters the response)."""
    _check_same_shape(image, region)
    response = np.asarray(image, dtype=np.float64)
    for axis in range(response.ndim):
        response = ndi.correlate1d(response, _LAPLACE, axis=axis, mode="reflect")
    inner = eroded(region)
    if inner.sum() < MIN_VOXELS:
        return np.nan
    norm = np.sqrt(float(np.sum(_LAPLACE**2)) ** response.ndim)
    return float(np.sqrt(np.pi / 2.0) * np.mean(np.abs(response[inner])) / norm)


def snr_equivalent(snr: float, voxel_mm: float, at_mm: float = 1.0) -> float:
    """SNR of white noise averaged over `voxel_mm` voxels, expressed at `at_mm` voxels: x (at / v)^1.5."""
    return float(snr * (at_mm / voxel_mm) ** 1.5)


def residual_bias_cv(
    image: np.ndarray, wm: np.ndarray, voxel_mm: float, sigma_mm: float = BIAS_SIGMA_MM
) -> float:
    """CV (sd / mean) over eroded WM of the WM-only image smoothed by normalised convolution."""
    _check_same_shape(image, wm)
    weight = np.asarray(wm, dtype=np.float64)
    sigma = sigma_mm / voxel_mm
    num = ndi.gaussian_filter(np.asarray(image, dtype=np.float64) * weight, sigma, mode="constant")
    den = ndi.gaussian_filter(weight, sigma, mode="constant")
    inner = eroded(wm)
    if inner.sum() < MIN_VOXELS:
        return np.nan
    smooth = num[inner] / np.maximum(den[inner], 1e-12)
    return float(np.std(smooth) / np.mean(smooth))


def hf_noise(
    image: np.ndarray, wm: np.ndarray, sigma_vox: float = HF_SIGMA_VOX, *, within_wm: bool = True
) -> float:
    """sd over eroded WM of image - Gaussian(sigma_vox)(image), relative to the mean eroded-WM signal.

    `within_wm`: smooth by normalised convolution over WM only, smooth(image * wm) / smooth(wm), so that the
    neighbouring GM and CSF do not leak into the residual near the WM edge (the plain Gaussian otherwise).
    """
    _check_same_shape(image, wm)
    image = np.asarray(image, dtype=np.float64)
    if within_wm:
        weight = np.asarray(wm, dtype=np.float64)
        num = ndi.gaussian_filter(image * weight, sigma_vox, mode="constant")
        smooth = num / np.maximum(ndi.gaussian_filter(weight, sigma_vox, mode="constant"), 1e-12)
    else:
        smooth = ndi.gaussian_filter(image, sigma_vox, mode="nearest")
    inner = eroded(wm)
    if inner.sum() < MIN_VOXELS:
        return np.nan
    return float(np.std((image - smooth)[inner]) / np.mean(image[inner]))


def hf_noise_factor(sigma_vox: float = HF_SIGMA_VOX) -> float:
    """sd of image - Gaussian(sigma_vox)(image) for unit white noise in 3-D: hf_noise = factor / SNR."""
    impulse = np.zeros((17, 17, 17))
    impulse[8, 8, 8] = 1.0
    kernel = impulse - ndi.gaussian_filter(impulse, sigma_vox, mode="constant")
    return float(np.sqrt(np.sum(kernel**2)))


def block_average(array: np.ndarray, k: int) -> np.ndarray:
    """Average k x k x k blocks (the array cropped to a multiple of k): a 1 mm image seen on a k mm grid."""
    if k <= 1:
        return np.asarray(array, dtype=np.float64)
    x, y, z = (s // k for s in array.shape)
    if min(x, y, z) == 0:
        raise MhdUadError(f"realism: array {array.shape} is smaller than one {k}-voxel block")
    cropped = np.asarray(array, dtype=np.float64)[: x * k, : y * k, : z * k]
    return cropped.reshape(x, k, y, k, z, k).mean(axis=(1, 3, 5))


def brain_window(
    image: np.ndarray, brain: np.ndarray, lo: float = 1.0, hi: float = 99.5
) -> tuple[float, float]:
    """Display window: the [lo, hi] percentiles of the brain's intensities."""
    values = np.asarray(image)[np.asarray(brain, dtype=bool)]
    if values.size == 0:
        raise MhdUadError("realism: empty brain mask")
    low, high = np.percentile(values, [lo, hi])
    return float(low), float(max(high, low + 1e-12))


def measure_noise_and_bias(
    image: np.ndarray,
    wm_pv: np.ndarray,
    brain: np.ndarray,
    voxel_mm: float,
    exclude: np.ndarray | None = None,
) -> dict[str, float]:
    """SNR (measured grid and 1 mm equivalent), p90(brain) / sigma at 1 mm, residual bias CV and HF noise."""
    _check_same_shape(image, wm_pv, brain)
    wm = np.asarray(wm_pv) > PV_THRESHOLDS["wm"]
    if exclude is not None:
        wm &= ~np.asarray(exclude, dtype=bool)
    image = np.asarray(image, dtype=np.float64)
    inner = eroded(wm)
    sigma = immerkaer_sigma(image, wm)
    wm_mean = float(np.mean(image[inner])) if inner.sum() >= MIN_VOXELS else np.nan
    snr = wm_mean / sigma if sigma > 0 else np.nan
    p90 = float(np.percentile(image[np.asarray(brain, dtype=bool)], 90))
    sigma_1mm = sigma * (voxel_mm / 1.0) ** 1.5
    return {
        "wm_mean": wm_mean,
        "sigma": sigma,
        "snr": snr,
        "snr_1mm": snr_equivalent(snr, voxel_mm),
        "p90_over_sigma_1mm": p90 / sigma_1mm if sigma_1mm > 0 else np.nan,
        "wm_over_p90": wm_mean / p90 if p90 > 0 else np.nan,
        "bias_cv": residual_bias_cv(image, wm, voxel_mm),
        "hf_noise": hf_noise(image, wm),
        "hf_noise_plain": hf_noise(image, wm, within_wm=False),
        "n_wm_eroded": int(inner.sum()),
    }
