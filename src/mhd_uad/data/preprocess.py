"""Online preprocessing of method.md §2.3, written once per scan by the `prepare` stage.

Per scan, in the original's order (after bringing the voxels to RAS+ order): CurvatureFlow smoothing (image only) -> centred CropOrPad to the
field of view -> clip to [p1, p99] of brain voxels and scale to [0, 1] -> resample to the model spacing
(B-spline for the image, nearest for mask and segmentation) -> the profile's grid. Volumes are kept as
[S, H, W] with S axial slices (the third voxel axis of an atlas-space scan). The brain mask keeps its
values (soft at the border of registered masks; the maps are weighted by them, method.md §11) and is
binarised (> 0) only where the method does; segmentations keep their labels (`segmentation_labels`).

One deliberate difference: the original discards the affine and treats every scan as 1 mm. Here the
voxel size comes from the header, so the crop is the same field of view in mm whatever the source
resolution (identical on the 1 mm data the paper used), and each scan's affine and shape are kept so
anomaly maps can be written back in its own space.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhd_uad.config import as_int_list, require
from mhd_uad.data.geometry import ScanGeometry, to_slices, voxel_spacing
from mhd_uad.errors import InputFileError
from mhd_uad.io import check_same_geometry, load_nifti


@dataclass(frozen=True)
class PrepareSettings:
    grid: tuple[int, int, int]  # (X, Y, Z) voxels of the model grid
    spacing_mm: float
    curvature_flow_time_step: float
    curvature_flow_iterations: int
    percentiles: tuple[float, float]
    antialias: bool = False  # Gaussian smoothing before downsampling (torchio, Cardoso et al. 2015); see conf/

    @classmethod
    def from_params(cls, params) -> PrepareSettings:
        p = params.prepare
        grid = tuple(as_int_list(p.grid, "prepare.grid", 3))
        require(all(g >= 8 for g in grid), f"prepare.grid must be at least 8 voxels per axis, got {list(grid)}")
        spacing = float(p.spacing_mm)
        require(spacing > 0, f"prepare.spacing_mm must be positive, got {spacing}")
        lo, hi = (float(v) for v in p.percentiles)
        require(0 <= lo < hi <= 100, f"prepare.percentiles must satisfy 0 <= p_lo < p_hi <= 100, got {[lo, hi]}")
        iters = int(p.curvature_flow_iterations)
        require(iters >= 0, "prepare.curvature_flow_iterations must be >= 0")
        antialias = p.get("antialias", False)
        require(isinstance(antialias, bool), f"prepare.antialias must be true or false, got {antialias!r}")
        return cls(grid, spacing, float(p.curvature_flow_time_step), iters, (lo, hi), antialias)

    @property
    def field_of_view_mm(self) -> np.ndarray:
        return np.asarray(self.grid, dtype=np.float64) * self.spacing_mm

    def as_dict(self) -> dict:
        return {"grid": list(self.grid), "spacing_mm": self.spacing_mm,
                "curvature_flow_time_step": self.curvature_flow_time_step,
                "curvature_flow_iterations": self.curvature_flow_iterations,
                "percentiles": list(self.percentiles), "antialias": self.antialias}


@dataclass
class PreparedScan:
    image: np.ndarray  # float32 [S, H, W], [0, 1] (B-spline may over/undershoot slightly)
    mask: np.ndarray  # float32 [S, H, W], brain mask with its own values (soft at the border after registration)
    seg: np.ndarray  # uint8 [S, H, W], segmentation label codes (segmentation_labels); zeros for healthy scans
    geometry: ScanGeometry  # the model grid and the source scan's own grid
    source_brain: np.ndarray  # bool, the source scan's brain mask (> 0) in its own grid


def curvature_flow(image: np.ndarray, spacing: np.ndarray, time_step: float, iterations: int) -> np.ndarray:
    """SimpleITK CurvatureFlow (edge-preserving smoothing) on an (X, Y, Z) array with its voxel size."""
    import SimpleITK as sitk

    if iterations == 0:
        return image
    itk = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0), dtype=np.float32))
    itk.SetSpacing([float(s) for s in spacing])
    out = sitk.CurvatureFlow(itk, timeStep=time_step, numberOfIterations=iterations)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(np.float32, copy=False)


def to_canonical(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels in RAS+ order (nibabel's closest canonical): axis 2 runs inferior -> superior, so
    axial slices are axis 2 whatever order the file was stored in (ingest writes the original's LPS)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return volume, affine
    out = np.ascontiguousarray(nib.orientations.apply_orientation(volume, ornt))
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)


def segmentation_labels(seg: np.ndarray) -> np.ndarray:
    """uint8 label codes of a segmentation: 0 where seg <= 0, else its value rounded, at least 1 (at most 255).

    Registered segmentations are interpolated (method.md §2.2), so values are not strictly integer: every
    voxel > 0 stays lesion (the original binarises with > 0), and a voxel belongs to label L when its value
    rounds to L (the metrics' `ignore_labels` use that)."""
    codes = np.clip(np.rint(seg), 1, 255)
    return np.where(seg > 0, codes, 0).astype(np.uint8)


def preprocess_scan(
    image_path: str | Path,
    mask_path: str | Path,
    seg_path: str | Path | None,
    settings: PrepareSettings,
) -> PreparedScan:
    """Load one scan (image, brain mask, optional segmentation), validate it, and preprocess it."""
    import torch
    import torchio as tio

    image, affine = load_nifti(image_path, what="image")
    mask, mask_affine = load_nifti(mask_path, what="brain mask")
    check_same_geometry(image_path, image.shape, affine, mask_path, mask.shape, mask_affine, what="brain mask")
    brain = mask > 0
    if not brain.any():
        raise InputFileError("brain mask is empty", mask_path)
    if float(mask.min()) < 0 or float(mask.max()) > 1:
        raise InputFileError(f"brain mask values must lie in [0, 1] (binary, or soft at the border), found "
                             f"[{float(mask.min()):g}, {float(mask.max()):g}]", mask_path)
    if seg_path:
        seg, seg_affine = load_nifti(seg_path, what="segmentation")
        check_same_geometry(image_path, image.shape, affine, seg_path, seg.shape, seg_affine, what="segmentation")
        labels = segmentation_labels(seg)
    else:
        labels = np.zeros(image.shape, dtype=np.uint8)
    values = image[brain]
    if float(values.max() - values.min()) <= 0:
        raise InputFileError("image is constant inside the brain mask", image_path)
    source_shape, source_affine = tuple(int(s) for s in image.shape), affine
    # one voxel order for every scan, so training and scoring see the same anatomy; maps go back to the
    # file's own order through world coordinates (the original uses the stored order, the same up to flips)
    image, canonical_affine = to_canonical(image, affine)
    mask, labels = to_canonical(mask, affine)[0], to_canonical(labels, affine)[0]
    affine = canonical_affine

    spacing = voxel_spacing(affine)
    image = curvature_flow(image, spacing, settings.curvature_flow_time_step, settings.curvature_flow_iterations)
    crop_shape = tuple(int(v) for v in np.maximum(1, np.round(settings.field_of_view_mm / spacing)))

    subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(image)[None], affine=affine),
        # the mask keeps its values: soft borders weight the maps as in the original (method.md §11)
        mask=tio.LabelMap(tensor=torch.from_numpy(mask.astype(np.float32))[None], affine=affine),
        seg=tio.LabelMap(tensor=torch.from_numpy(labels)[None], affine=affine),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchio warns about tensors without a path; nothing to act on
        subject = tio.CropOrPad(crop_shape, padding_mode=0)(subject)
        if not subject["mask"].data.any():
            raise InputFileError(f"no brain voxel left inside the {settings.field_of_view_mm.tolist()} mm field of "
                                 "view (is the scan centred on the brain?)", mask_path)
        subject = tio.RescaleIntensity(out_min_max=(0, 1), percentiles=settings.percentiles,
                                       masking_method="mask", include=["image"])(subject)
        subject = tio.Resample(settings.spacing_mm, image_interpolation="bspline",
                               label_interpolation="nearest", antialias=settings.antialias)(subject)
        subject = tio.CropOrPad(settings.grid, padding_mode=0)(subject)

    out_image = subject["image"].data[0].numpy().astype(np.float32)
    out_mask = subject["mask"].data[0].numpy().astype(np.float32)
    out_seg = subject["seg"].data[0].numpy().astype(np.uint8)
    if not out_mask.any():
        raise InputFileError("brain mask is empty after resampling to the model grid", mask_path)
    geometry = ScanGeometry(grid_shape=tuple(int(s) for s in out_image.shape),
                            grid_affine=np.asarray(subject["image"].affine, dtype=np.float64),
                            source_shape=source_shape, source_affine=source_affine)
    return PreparedScan(image=to_slices(out_image), mask=to_slices(out_mask), seg=to_slices(out_seg),
                        geometry=geometry, source_brain=brain)
