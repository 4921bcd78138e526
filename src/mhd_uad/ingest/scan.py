"""One subject through the original's offline preprocessing, in memory (method.md §2.2).

Per modality: read and check the raw image (and its mask and segmentation) -> reorient and resample to
`spacing_mm` with B-splines -> skull strip -> affine registration of the stripped scan to the template; the
scan, its mask and its segmentation are then resampled into the template grid through that one transform
with linear interpolation (the mask and segmentation straight from their own grid, so soft edges in (0, 1)
as the original's). Per subject: crop every volume to the bounding box of the reference (first) modality's
mask (`arr[lo:hi]` with hi the last non-zero index, excluded, as the original's cut.py), then N4 each image
weighted by that mask.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mhd_uad.errors import InputFileError
from mhd_uad.ingest.bias import n4_bias_correction
from mhd_uad.ingest.manifest import ScanSpec
from mhd_uad.ingest.register import register_affine, warp
from mhd_uad.ingest.settings import IngestSettings
from mhd_uad.ingest.skullstrip import choose_backend, hdbet_mask
from mhd_uad.ingest.spatial import (
    affine_to_ras_matrix,
    affine_transform_from_ras,
    empty_grid,
    reorient_resample,
    resample_onto,
    to_sitk,
)
from mhd_uad.ingest.template import Template
from mhd_uad.io import check_same_geometry, load_nifti


@dataclass
class IngestedModality:
    spec: ScanSpec
    image: np.ndarray  # (X, Y, Z) float32 on the cropped template grid, bias-corrected
    template_to_raw: np.ndarray  # 4x4 on RAS points: template world -> raw scan world (ITK's fixed -> moving)
    raw_shape: tuple[int, int, int]
    raw_affine: np.ndarray
    raw_brain: np.ndarray  # bool, the brain mask on the raw grid (given, or HD-BET's brought back)
    skull_strip: str  # "mask" or "hdbet"


@dataclass
class IngestedSubject:
    name: str
    modalities: dict[str, IngestedModality]  # in manifest order; the first is the reference
    mask: np.ndarray  # soft brain mask in [0, 1] on the cropped grid
    seg: np.ndarray | None  # linearly interpolated labels on the cropped grid (evaluation binarises > 0)
    affine: np.ndarray  # RAS affine of the cropped grid
    crop: tuple[list[int], list[int]]  # [lo, hi) voxel box in the reoriented template grid
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Warped:
    image: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None
    result: IngestedModality


def _read(spec: ScanSpec):
    image, affine = load_nifti(spec.image, what="image")
    if float(image.max() - image.min()) <= 0:
        raise InputFileError("image is constant", spec.image)
    mask = seg = None
    if spec.mask is not None:
        mask, mask_affine = load_nifti(spec.mask, what="brain mask")
        check_same_geometry(spec.image, image.shape, affine, spec.mask, mask.shape, mask_affine, what="brain mask")
        mask = mask > 0
        if not mask.any():
            raise InputFileError("brain mask is empty", spec.mask)
        if float(np.ptp(image[mask])) <= 0:
            raise InputFileError("image is constant inside the brain mask", spec.image)
    if spec.seg is not None:
        seg, seg_affine = load_nifti(spec.seg, what="segmentation")
        check_same_geometry(spec.image, image.shape, affine, spec.seg, seg.shape, seg_affine, what="segmentation")
    return image, affine, mask, seg


def _modality(spec: ScanSpec, fixed, settings: IngestSettings, timings) -> _Warped:
    import SimpleITK as sitk

    clock = time.perf_counter()
    image, affine, raw_mask, raw_seg = _read(spec)
    backend = choose_backend(settings.skull_strip, raw_mask is not None, spec.image)
    raw = to_sitk(image, affine, what="image", path=spec.image)
    if backend == "mask":  # only the brain is registered: resample its box (+ the B-spline's reach), not the head
        box, box_affine = _around(raw_mask, affine, margin=8)
        raw_box = to_sitk(image[box], box_affine, what="image", path=spec.image)
    timings["load"] += time.perf_counter() - clock

    clock = time.perf_counter()
    resampled = reorient_resample(raw_box if backend == "mask" else raw, settings.spacing_mm, settings.orientation)
    timings["reorient_resample"] += time.perf_counter() - clock

    clock = time.perf_counter()
    if backend == "mask":
        mask_source = to_sitk(raw_mask[box].astype(np.float32), box_affine, what="brain mask", path=spec.mask)
        mask_resampled = sitk.Cast(resample_onto(mask_source, resampled) > 0.5, sitk.sitkFloat32)
        raw_brain = raw_mask
    else:
        mask_source = mask_resampled = hdbet_mask(resampled, spec.image)
        raw_brain = sitk.GetArrayFromImage(resample_onto(mask_resampled, raw, linear=False)).transpose(2, 1, 0) > 0
    stripped = resampled * mask_resampled
    if not sitk.GetArrayViewFromImage(stripped).any():
        raise InputFileError("the brain mask leaves no non-zero voxel of the image", spec.mask or spec.image)
    timings["skull_strip"] += time.perf_counter() - clock

    clock = time.perf_counter()
    transform = register_affine(fixed, stripped, settings.registration, spec.image)
    timings["registration"] += time.perf_counter() - clock

    clock = time.perf_counter()
    warped = warp(stripped, fixed, transform)
    mask = np.clip(warp(mask_source, fixed, transform), 0.0, 1.0)
    seg = None
    if raw_seg is not None:
        seg = warp(to_sitk(raw_seg, affine, what="segmentation", path=spec.seg), fixed, transform)
    timings["warp"] += time.perf_counter() - clock
    result = IngestedModality(spec, warped, affine_to_ras_matrix(transform), tuple(int(s) for s in image.shape),
                              np.asarray(affine, dtype=np.float64), np.asarray(raw_brain, dtype=bool), backend)
    return _Warped(warped, mask, seg, result)


def _around(mask: np.ndarray, affine: np.ndarray, margin: int):
    """The voxel box of `mask` grown by `margin` voxels (clipped to the grid), and the affine of that box."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    box_affine = np.asarray(affine, dtype=np.float64).copy()
    box_affine[:3, 3] = box_affine[:3, :3] @ lo + box_affine[:3, 3]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)), box_affine


def brain_box(mask: np.ndarray, source: Path) -> tuple[list[int], list[int]]:
    """[lo, hi) of `mask != 0` per axis, hi being the last non-zero index (excluded, as the original's cut.py)."""
    idx = np.argwhere(mask != 0)
    if idx.size == 0 or (mask > 0.5).sum() == 0:
        raise InputFileError("the brain mask is empty after registration to the template (did the registration "
                             "fail, or is the template's field of view too small?)", source)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    if np.any(hi - lo < 2):
        raise InputFileError(f"the registered brain mask spans {list(hi - lo + 1)} voxels: too thin to crop", source)
    return [int(v) for v in lo], [int(v) for v in hi]


def ingest_subject(specs: list[ScanSpec], template: Template, settings: IngestSettings) -> IngestedSubject:
    """Every modality of one subject registered to `template`, cropped to the reference mask, N4-corrected."""
    timings: dict[str, float] = defaultdict(float)
    fixed = template.image()
    warped = {spec.modality: _modality(spec, fixed, settings, timings) for spec in specs}
    reference = warped[specs[0].modality]
    lo, hi = brain_box(reference.mask, specs[0].mask or specs[0].image)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    mask = np.ascontiguousarray(reference.mask[box], dtype=np.float32)
    affine = template.affine.copy()
    affine[:3, 3] = template.affine[:3, :3] @ np.asarray(lo, dtype=np.float64) + template.affine[:3, 3]
    spacing = np.sqrt((template.affine[:3, :3] ** 2).sum(axis=0))

    clock = time.perf_counter()
    modalities = {}
    for modality, item in warped.items():
        item.result.image = n4_bias_correction(item.image[box], mask, spacing, settings.n4)
        modalities[modality] = item.result
    timings["n4"] += time.perf_counter() - clock
    seg = next((np.ascontiguousarray(w.seg[box], dtype=np.float32) for w in warped.values() if w.seg is not None),
               None)
    return IngestedSubject(specs[0].name, modalities, mask, seg, affine, (lo, hi), dict(timings))


def to_raw_space(volume: np.ndarray, volume_affine: np.ndarray, template_to_raw: np.ndarray,
                 raw_shape: tuple[int, ...], raw_affine: np.ndarray, *, linear: bool = True) -> np.ndarray:
    """A volume on the (cropped) template grid resampled onto the raw scan's own grid, through the inverse
    of the registration (each raw voxel looks up its template point): how maps go back to native space."""
    import SimpleITK as sitk

    transform = affine_transform_from_ras(template_to_raw).GetInverse()
    out = resample_onto(to_sitk(volume, volume_affine), empty_grid(raw_shape, raw_affine), transform, linear=linear)
    return np.ascontiguousarray(sitk.GetArrayFromImage(out).transpose(2, 1, 0), dtype=np.float32)
