"""NIfTI arrays and affines (RAS, nibabel) <-> SimpleITK images (LPS), reorienting and resampling.

Arrays are (X, Y, Z) as nibabel reads them; SimpleITK holds (Z, Y, X) with spacing, direction and origin in
LPS world coordinates. Every step here keeps world coordinates, so a scan, its mask and its segmentation
stay aligned whatever grid each is on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mhd_uad.errors import InputFileError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def _sitk():
    import SimpleITK as sitk

    return sitk


def grid_of(affine: np.ndarray, *, what: str = "image", path: str | Path | None = None):
    """(spacing, direction 3x3, origin) in LPS of a NIfTI affine; a sheared affine is an InputFileError."""
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    cols = lps[:3, :3]
    spacing = np.sqrt((cols ** 2).sum(axis=0))
    if np.any(spacing <= 0):
        raise InputFileError(f"{what} affine has a zero voxel size", path)
    direction = cols / spacing
    u, _, vt = np.linalg.svd(direction)
    rotation = u @ vt  # the nearest orthonormal frame, which ITK requires
    if np.abs(direction - rotation).max() > 1e-3:
        raise InputFileError(f"{what} affine is sheared (non-orthogonal axes), which ITK cannot represent", path)
    return spacing, rotation, lps[:3, 3]


def to_sitk(array_xyz: np.ndarray, affine: np.ndarray, *, what: str = "image", path: str | Path | None = None):
    sitk = _sitk()
    spacing, direction, origin = grid_of(affine, what=what, path=path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in origin])
    return image


def empty_grid(shape: tuple[int, ...], affine: np.ndarray, *, what: str = "image", path=None):
    """A float32 image of zeros on a NIfTI grid: the reference grid of a resampling."""
    return to_sitk(np.zeros(tuple(int(s) for s in shape), dtype=np.float32), affine, what=what, path=path)


def affine_of(image) -> np.ndarray:
    """The RAS NIfTI affine of a SimpleITK image."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    return LPS_FROM_RAS @ lps


def from_sitk(image) -> tuple[np.ndarray, np.ndarray]:
    """(array (X, Y, Z) float32, RAS affine) of a SimpleITK image."""
    sitk = _sitk()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32, copy=False)
    return np.ascontiguousarray(array), affine_of(image)


def reorient_array(array_xyz: np.ndarray, affine: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip voxel axes (no interpolation) so they point along `orientation` (e.g. "LPS")."""
    import nibabel as nib

    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(tuple(orientation.upper()))
    transform = nib.orientations.ornt_transform(current, target)
    out = nib.orientations.apply_orientation(array_xyz, transform)
    new_affine = np.asarray(affine) @ nib.orientations.inv_ornt_aff(transform, array_xyz.shape)
    return np.ascontiguousarray(out), new_affine


def reorient_resample(image, spacing_mm: float, orientation: str, interpolator=None):
    """Reorient (axis permutation, exact) and resample to isotropic `spacing_mm` (default B-spline, as the
    original's `ants.resample_image(..., interp=4)`); an image already at that spacing is not interpolated."""
    sitk = _sitk()
    oriented = sitk.DICOMOrient(image, orientation.upper())
    old_spacing = np.asarray(oriented.GetSpacing(), dtype=np.float64)
    if np.allclose(old_spacing, spacing_mm, rtol=1e-3, atol=0):
        return sitk.Cast(oriented, sitk.sitkFloat32)
    size = np.maximum(1, np.round(np.asarray(oriented.GetSize()) * old_spacing / spacing_mm)).astype(int)
    return sitk.Resample(sitk.Cast(oriented, sitk.sitkFloat32), [int(s) for s in size], sitk.Transform(),
                         sitk.sitkBSpline if interpolator is None else interpolator, oriented.GetOrigin(),
                         [float(spacing_mm)] * 3, oriented.GetDirection(), 0.0, sitk.sitkFloat32)


def resample_onto(image, reference, transform=None, *, linear: bool = True):
    """`image` on `reference`'s grid through `transform` (reference point -> image point; identity when None)."""
    sitk = _sitk()
    return sitk.Resample(image, reference, transform if transform is not None else sitk.Transform(),
                         sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)


def affine_to_ras_matrix(transform) -> np.ndarray:
    """A SimpleITK affine transform (LPS points) as a 4x4 matrix acting on RAS points."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    return LPS_FROM_RAS @ lps @ LPS_FROM_RAS


def affine_transform_from_ras(matrix_ras: np.ndarray):
    """The inverse of `affine_to_ras_matrix`: a SimpleITK AffineTransform from a 4x4 RAS matrix."""
    sitk = _sitk()
    lps = LPS_FROM_RAS @ np.asarray(matrix_ras, dtype=np.float64) @ LPS_FROM_RAS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in lps[:3, 3]])
    return transform
