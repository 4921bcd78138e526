"""The base anatomy on the working grid, and the warped subject made from it.

`load_base_anatomy` reads a named base (`bases`: MNI152, SRI24, OASIS-30) or a user T1 with GM/WM/CSF
probability maps, scales it to one adult brain volume, puts it in RAS order on a `voxel_size` mm grid and
derives the maps the lesion recipes need (T1 texture, depth below the surface, ventricles, deep GM);
`SubjectAnatomy` is one subject's warped copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from mhd_uad.data.demo.base_anatomy import BaseAnatomy
from mhd_uad.data.demo.warps import warp_volumes
from mhd_uad.data.geometry import voxel_spacing
from mhd_uad.data.preprocess import to_canonical
from mhd_uad.errors import InputFileError, MhdUadError
from mhd_uad.io import load_nifti

# Channels of BaseAnatomy.channels, warped together for every subject. GM includes deep GM (DGM is its deep
# part), so that the lesion recipes can keep treating GM as all grey matter.
T1, GM, WM, CSF, MASK, TEXTURE, DEPTH, D_VENT, VENT, DGM = range(10)
_N_CHANNELS = 10
# Order of the rendered tissue classes (tissue_pv): cortical GM, WM, CSF, deep GM.
RENDERED_TISSUES = ("gm", "wm", "csf", "dgm")


def split_grey_matter(gm: np.ndarray, dgm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cortical GM, deep GM) as the demo renders them: the deep part at most GM, the cortical GM the rest."""
    deep = np.minimum(dgm, gm)
    return gm - deep, deep


def tissue_pv(channels: np.ndarray) -> np.ndarray:
    """(4, X, Y, Z) partial volumes of the rendered classes: cortical GM, WM, CSF, deep GM."""
    cortical, deep = split_grey_matter(channels[GM], channels[DGM])
    return np.stack([cortical, channels[WM], channels[CSF], deep])


def _tissue_paths(base_tissues) -> dict[str, Path]:
    if isinstance(base_tissues, Mapping):
        unknown = set(base_tissues) - {"gm", "wm", "csf", "mask"}
        missing = {"gm", "wm", "csf"} - set(base_tissues)
        if unknown or missing:
            raise MhdUadError(
                "base_tissues must map 'gm', 'wm', 'csf' (and optionally 'mask') to NIfTI paths; "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        return {k: Path(v) for k, v in base_tissues.items()}
    if (
        isinstance(base_tissues, (str, Path))
        or not isinstance(base_tissues, Sequence)
        or len(base_tissues) != 3
    ):
        raise MhdUadError(
            "base_tissues must be a mapping {gm, wm, csf[, mask]} or a sequence of 3 paths (GM, WM, CSF)"
        )
    return {k: Path(v) for k, v in zip(("gm", "wm", "csf"), base_tissues, strict=True)}


def _load_custom_base(
    base_t1, base_tissues
) -> tuple[dict[str, np.ndarray], np.ndarray, str, tuple[str, ...]]:
    if base_t1 is None or base_tissues is None:
        raise MhdUadError(
            "a custom demo base needs both base_t1 and base_tissues (GM, WM and CSF probability maps)"
        )
    paths = {"t1": Path(base_t1), **_tissue_paths(base_tissues)}
    arrays: dict[str, np.ndarray] = {}
    ref_affine = None
    for key, path in paths.items():
        data, affine = load_nifti(path, what=f"base {key.upper()} map" if key != "t1" else "base T1")
        if ref_affine is None:
            ref_shape, ref_affine = data.shape, affine
        elif data.shape != ref_shape or not np.allclose(affine, ref_affine, atol=1e-3):
            raise InputFileError(
                f"base {key} map does not share the shape/affine of the base T1 {paths['t1']}", path
            )
        if key in ("gm", "wm", "csf") and (data.min() < -0.01 or data.max() > 1.01):
            raise InputFileError(
                f"base {key} map must hold probabilities in [0, 1], found [{data.min():.3g}, {data.max():.3g}]",
                path,
            )
        arrays[key] = data.astype(np.float64)
    if "mask" not in arrays:
        arrays["mask"] = ((arrays["gm"] + arrays["wm"] + arrays["csf"]) > 0.5).astype(np.float64)
    if (arrays["mask"] > 0.5).sum() < 1000:
        raise InputFileError(
            "the base brain mask (or GM+WM+CSF > 0.5) holds fewer than 1000 voxels", paths["t1"]
        )
    files = tuple(p.name for p in paths.values())
    return arrays, ref_affine, f"user-supplied template ({', '.join(files)})", files


def _resample_to_grid(arr: np.ndarray, spacing: np.ndarray, start_idx: np.ndarray, shape, voxel_size: float):
    """Sample a volume on a grid of `voxel_size` mm starting at base index `start_idx` (anti-aliased)."""
    sigma = np.sqrt(np.maximum(voxel_size**2 - spacing**2, 0.0)) / 2.355 / spacing  # FWHM of the new voxel
    smooth = ndi.gaussian_filter(arr, sigma, mode="constant") if np.any(sigma > 0.1) else arr
    step = voxel_size / spacing
    return ndi.affine_transform(
        smooth, step, offset=start_idx, output_shape=tuple(shape), order=1, mode="constant"
    )


# Every base is scaled to one adult brain volume (brain mask > 0.5): MNI152's mask is 1.88 L, larger than a
# typical adult brain and than SRI24 (1.40 L of GM+WM+CSF), the atlas the real data are registered to
# (method.md §2.2); 1.45 L is about SRI24's and OASIS-30's [approximate].
TARGET_BRAIN_LITRES = 1.45

_BASE_CACHE: dict[tuple, BaseAnatomy] = {}


def load_base_anatomy(
    base_t1=None, base_tissues=None, voxel_size: float = 2.0, name: str = "mni152"
) -> BaseAnatomy:
    """Load a named base anatomy (bases.BASE_NAMES) or a user T1 + tissue maps on a `voxel_size` mm grid."""
    custom = base_t1 is not None or base_tissues is not None
    key = (
        None if base_t1 is None else str(Path(base_t1).resolve()),
        None if base_tissues is None else repr(base_tissues),
        float(voxel_size),
        None if custom else name,
    )
    if key in _BASE_CACHE:
        return _BASE_CACHE[key]
    if custom:
        arrays, affine, description, files = _load_custom_base(base_t1, base_tissues)
        notice, source = "", base_t1
    else:
        from mhd_uad.data.demo.bases import load_base_arrays

        loaded = load_base_arrays(name)
        arrays, affine = dict(loaded.arrays), loaded.affine
        description, files, notice, source = (
            loaded.description,
            loaded.files,
            loaded.notice,
            f"the {name} base",
        )
    for k in list(arrays):
        arrays[k], ras_affine = to_canonical(arrays[k], affine)
    affine = ras_affine
    spacing = voxel_spacing(affine)
    mask1 = arrays["mask"] > 0.5
    scale = (TARGET_BRAIN_LITRES * 1e6 / (mask1.sum() * np.prod(spacing))) ** (1.0 / 3.0)
    idx = np.argwhere(mask1)
    # Brain bounding box with a 6 mm margin (demo-data.md §4.1), on the new grid.
    lo_mm = (idx.min(0) * spacing) - 6.0
    hi_mm = (idx.max(0) * spacing) + 6.0
    # The demo atlas space is the template scaled by `scale`; a grid voxel covers voxel_size / scale there.
    template_step = voxel_size / scale
    shape = np.ceil((hi_mm - lo_mm) / template_step).astype(int) + 1
    start_idx = lo_mm / spacing
    origin_mm = scale * (affine[:3, :3] @ start_idx + affine[:3, 3])
    channels = np.zeros((_N_CHANNELS, *shape), dtype=np.float64)
    for ch, key_ in ((T1, "t1"), (GM, "gm"), (WM, "wm"), (CSF, "csf"), (MASK, "mask"), (DGM, "dgm")):
        if key_ in arrays:
            src = mask1.astype(np.float64) if key_ == "mask" else arrays[key_]
            channels[ch] = _resample_to_grid(src, spacing, start_idx, shape, template_step)
    channels[GM:MASK] = np.clip(channels[GM:MASK], 0.0, 1.0)
    channels[MASK] = np.clip(channels[MASK], 0.0, 1.0)
    brain = channels[MASK] > 0.5
    # Keep tissue only inside the brain, and the PV sum at most 1.
    pv_sum = channels[GM:MASK].sum(0)
    channels[GM:MASK] *= np.where(pv_sum > 1.0, 1.0 / np.maximum(pv_sum, 1e-9), 1.0)
    channels[T1] = np.clip(channels[T1], 0.0, None) * channels[MASK]

    v = voxel_size
    vent = _add_depth_and_ventricles(channels, brain, v)
    if "dgm" not in arrays:
        _estimate_deep_gm(channels)
    channels[DGM] = np.clip(np.minimum(channels[DGM], channels[GM]), 0.0, 1.0)
    _add_texture(channels, brain, source)
    centre, vent_centre, lateral, midline = _landmarks(brain, vent, shape, v)
    base = BaseAnatomy(
        channels,
        float(v),
        origin_mm,
        centre,
        vent_centre,
        lateral,
        midline,
        description,
        files,
        "custom" if custom else name,
        notice,
    )
    _BASE_CACHE[key] = base
    return base


def _estimate_deep_gm(channels: np.ndarray) -> None:
    """Deep GM for bases that do not label it: GM at least ~25 mm below the surface within ~12 mm of the
    ventricles (caudate, putamen, pallidum and thalamus lie there; the cortical ribbon, insula included,
    does not): 57 mL on MNI152 and 75 mL on SRI24, against 46 mL labelled in OASIS-30 [approximate: a
    geometric stand-in for a subcortical atlas]."""
    deep = 1.0 / (1.0 + np.exp(-(channels[DEPTH] - 25.0) / 2.0))
    near = 1.0 / (1.0 + np.exp(-(12.0 - channels[D_VENT]) / 2.0))
    channels[DGM] = channels[GM] * deep * near


def _add_texture(channels: np.ndarray, brain: np.ndarray, source) -> None:
    """Fill the TEXTURE channel and scale T1 so that WM = 1 (in place)."""
    # T1 texture: relative deviation of the real T1 from its own PV model (demo-data.md §4.1.3).
    pv = tissue_pv(channels)
    mu, *_ = np.linalg.lstsq(pv[:, brain].T, channels[T1][brain], rcond=None)
    if not (mu[1] > mu[0] > mu[2] > 0):
        raise InputFileError(
            f"the base T1 does not look T1-weighted (mean WM {mu[1]:.3g}, GM {mu[0]:.3g}, CSF {mu[2]:.3g})",
            source,
        )
    model = np.tensordot(mu, pv, axes=1)
    channels[TEXTURE] = np.where(brain, np.clip(channels[T1] / np.maximum(model, 1e-6) - 1.0, -0.4, 0.4), 0.0)
    channels[T1] /= mu[1]  # WM = 1: keeps custom bases in the same units


def _add_depth_and_ventricles(channels: np.ndarray, brain: np.ndarray, v: float) -> np.ndarray:
    """Fill the DEPTH, VENT and D_VENT channels (in place); return the binary ventricle map."""
    channels[DEPTH] = ndi.distance_transform_edt(brain) * v
    # Ventricles: deep CSF (> 15 mm below the surface) in components of at least 2 mL.
    deep_csf = (channels[CSF] > 0.5) & (channels[DEPTH] > 15.0)
    labels, n = ndi.label(deep_csf)
    sizes = ndi.sum_labels(deep_csf, labels, np.arange(1, n + 1)) * v**3
    vent = np.isin(labels, 1 + np.flatnonzero(sizes >= 2000.0))
    if vent.sum() < 3:
        vent = deep_csf if deep_csf.any() else (channels[DEPTH] >= channels[DEPTH].max() - v)
    channels[VENT] = vent
    channels[D_VENT] = ndi.distance_transform_edt(~vent) * v
    return vent


def _landmarks(brain: np.ndarray, vent: np.ndarray, shape, v: float):
    """Brain centroid, ventricle centroid, left and right lateral-ventricle centroids, midline x (grid mm)."""
    grid_mm = [np.arange(s) * v for s in shape]
    centre = np.array(
        [
            np.average(g, weights=brain.sum(axis=tuple(j for j in range(3) if j != i)))
            for i, g in enumerate(grid_mm)
        ]
    )
    vent_idx = np.argwhere(vent) * v
    vent_centre = vent_idx.mean(0)
    midline = float(centre[0])
    left = vent_idx[vent_idx[:, 0] < midline]
    right = vent_idx[vent_idx[:, 0] >= midline]
    lateral = (
        left.mean(0) if len(left) else vent_centre - [12.0, 0, 0],
        right.mean(0) if len(right) else vent_centre + [12.0, 0, 0],
    )
    return centre, vent_centre, lateral, midline


# ---------------------------------------------------------------------------------------------------
# Subject state
# ---------------------------------------------------------------------------------------------------


@dataclass
class SubjectAnatomy:
    """A warped subject: channels as in BaseAnatomy plus the template position of every voxel."""

    channels: np.ndarray
    template_mm: np.ndarray  # (X, Y, Z, 3) template grid mm of each voxel
    base: BaseAnatomy

    @property
    def v(self) -> float:
        return self.base.voxel_size

    @property
    def shape(self):
        return self.channels.shape[1:]

    @property
    def brain(self) -> np.ndarray:
        return self.channels[MASK] > 0.5

    def relative_mm(self) -> np.ndarray:
        """Template position relative to the ventricle centroid (x relative to the midline)."""
        rel = self.template_mm - self.base.vent_centre_mm
        rel[..., 0] = self.template_mm[..., 0] - self.base.midline_mm
        return rel


def _warp_subject(base: BaseAnatomy, points_mm: np.ndarray) -> SubjectAnatomy:
    channels = warp_volumes(base.channels, points_mm, base.voxel_size)
    return SubjectAnatomy(channels, points_mm, base)


def _parenchyma_fraction(anat: SubjectAnatomy) -> np.ndarray:
    """Share of a voxel's tissue that is GM or WM: MS and WMH lesions do not grow into CSF."""
    ch = anat.channels
    return np.clip((ch[GM] + ch[WM]) / np.maximum(ch[GM] + ch[WM] + ch[CSF], 1e-6), 0.0, 1.0)
