"""N4 bias-field correction weighted by the brain mask (method.md §2.2 step 5), with SimpleITK's N4.

The original calls `ants.n4_bias_field_correction(img, convergence={'iters': [200]*4, 'tol': 5e-4},
weight_mask=smooth(mask, 1))`, i.e. ITK's N4 on the image shrunk by 4, a B-spline mesh every 200 mm, the
field then evaluated at full resolution. SimpleITK's N4 takes a binary mask, not ANTs' weight image: it
gets the smoothed mask's half level, restricted to voxels > 0 (ANTs' own mask also leaves out the zero
background).
"""

from __future__ import annotations

import numpy as np

from mhd_uad.ingest.settings import N4Settings


def n4_weight_mask(mask: np.ndarray, spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """The brain mask smoothed with a Gaussian of `sigma_mm` (the original's `ants.smooth_image(mask, 1)`)."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=np.float32)
    if sigma_mm <= 0:
        return mask
    return ndi.gaussian_filter(mask, sigma=sigma_mm / np.asarray(spacing, dtype=np.float64)).astype(np.float32)


def n4_bias_correction(image: np.ndarray, mask: np.ndarray, spacing: np.ndarray, settings: N4Settings) -> np.ndarray:
    """The bias-corrected image (X, Y, Z) of `image` with brain mask `mask` (soft or binary) on a grid of
    voxel size `spacing`; unchanged when N4 is disabled or there are too few brain voxels to fit a field."""
    import SimpleITK as sitk

    image = np.asarray(image, dtype=np.float32)
    if not settings.enabled:
        return image
    spacing = np.asarray(spacing, dtype=np.float64)
    fit = (n4_weight_mask(mask, spacing, settings.mask_sigma_mm) >= 0.5) & (image > 0)
    if fit.sum() < 1000:
        return image
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)))
    itk_image.SetSpacing([float(s) for s in spacing])
    itk_mask = sitk.GetImageFromArray(np.ascontiguousarray(fit.transpose(2, 1, 0).astype(np.uint8)))
    itk_mask.CopyInformation(itk_image)
    shrink = [max(1, min(int(settings.shrink_factor), int(s) // 4)) for s in itk_image.GetSize()]
    small_image, small_mask = sitk.Shrink(itk_image, shrink), sitk.Shrink(itk_mask, shrink)

    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in settings.iterations])
    corrector.SetConvergenceThreshold(float(settings.tolerance))
    extent = np.asarray(itk_image.GetSize()) * spacing
    spans = np.maximum(1, np.ceil(extent / float(settings.spline_distance_mm))).astype(int)
    corrector.SetNumberOfControlPoints([int(s) + 3 for s in spans])  # mesh spans + spline order 3, as ANTs
    corrector.Execute(small_image, small_mask)
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(itk_image)).transpose(2, 1, 0)
    return np.ascontiguousarray(image / np.exp(log_field), dtype=np.float32)
