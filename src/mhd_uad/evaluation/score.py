"""`mhd-uad score`: one new scan through the trained model, the map written back in the scan's own space.

No DVC stage runs this module: editing it re-runs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mhd_uad.data.geometry import to_source_space
from mhd_uad.data.preprocess import PrepareSettings, preprocess_scan
from mhd_uad.errors import ConfigError, MhdUadError
from mhd_uad.evaluation.guard import guard_scan
from mhd_uad.io import load_nifti, save_nifti
from mhd_uad.models.checkpoint import cddpm_path, checkpoint_modality, load_cddpm
from mhd_uad.models.inference import MhdSettings, release_device_memory, score_volume, select_device

log = logging.getLogger(__name__)


def field_of_view(prepared) -> np.ndarray:
    """Bool mask on the source scan's grid of the voxels the model scores: the footprint of the prepared grid
    (the profile's centred field of view, e.g. 192 x 192 x 96 mm for the demo). Maps are 0 outside it, and
    the evaluate stage's metrics cover only it, as the original's do (its 192 x 192 x 100 mm crop)."""
    return to_source_space(np.ones(prepared.image.shape, dtype=np.float32), prepared.geometry) > 0.5


def _checkpoints_and_modality(params, modality: str | None, checkpoints, root: Path) -> tuple[list[Path], str]:
    if checkpoints:
        found = {checkpoint_modality(c) for c in checkpoints}
        if modality is None and len(found) == 1:
            modality = found.pop()
    if modality not in ("t1", "t2"):
        raise ConfigError("say which model scores the scan: --modality t1|t2 (or --checkpoint)")
    if not checkpoints:
        checkpoints = [cddpm_path(root, modality, f) for f in params.train.folds]
        missing = [str(c) for c in checkpoints if not Path(c).is_file()]
        if missing:
            raise MhdUadError(f"no trained {modality.upper()} model: {missing[0]} is missing (run `dvc repro` or pass "
                              "--checkpoint)", missing[0])
    return [Path(c) for c in checkpoints], modality


def score_scan(params, scan: str | Path, mask: str | Path, out: str | Path, *, modality: str | None = None,
               checkpoints: list[str | Path] | None = None, threshold: float | None = None,
               out_mask: str | Path | None = None, out_reconstruction: str | Path | None = None,
               force: bool = False, raw_source: str | Path | None = None, root: str | Path = ".") -> dict:
    """Preprocess like the training data, check that the scan looks like the training scans (`guard`; with
    `force` a failed check is only a warning), score with every given checkpoint (default: the repository's
    folds for the modality), average the mhd maps, and write the map (and optionally a thresholded lesion mask,
    and the mean of the reconstructions on the model's [0, 1] scale) with the input's own shape and affine.
    `raw_source`: the raw scan `score_raw_scan` ingested into `scan` (named in the guard's messages)."""
    if (threshold is None) != (out_mask is None):
        raise MhdUadError("--threshold and --out-mask go together")
    checkpoints, modality = _checkpoints_and_modality(params, modality, checkpoints, Path(root))
    settings = MhdSettings.from_params(params)
    prepare = PrepareSettings.from_params(params)
    prepared = preprocess_scan(scan, mask, None, prepare)
    guard = guard_scan(params, prepared, modality, scan, root=root, force=force, raw_source=raw_source)
    device = select_device(params)
    total = np.zeros(prepared.image.shape, dtype=np.float32)
    reco = np.zeros(prepared.image.shape, dtype=np.float32)
    for ckpt in checkpoints:
        model, _ = load_cddpm(params, ckpt, modality)
        maps, reco_mean = score_volume(model.to(device), prepared.image, prepared.mask, settings, Path(scan).name,
                                       device, scorers=("mhd",))
        total += maps["mhd"] / len(checkpoints)
        reco += reco_mean / len(checkpoints)
        del model
        release_device_memory()
    amap = to_source_space(total, prepared.geometry, prepared.source_brain)
    save_nifti(out, amap, prepared.geometry.source_affine, dtype=np.float32)
    brain = prepared.source_brain
    outside = 100.0 * float((brain & ~field_of_view(prepared)).sum()) / max(int(brain.sum()), 1)
    if outside >= 1.0:
        fov = " x ".join(f"{v:g}" for v in prepare.field_of_view_mm)
        log.warning("%.0f %% of the brain of %s lies outside the model's %s mm field of view: not scored "
                    "(the map is 0 there)", outside, Path(raw_source or scan).name, fov)
    result = {"map": str(out), "modality": modality, "checkpoints": [str(c) for c in checkpoints],
              "max_score": float(amap.max()), "brain_outside_field_of_view_percent": round(outside, 1),
              "guard_failed": guard}
    if out_reconstruction is not None:
        # the same way back as the map: trilinear onto the scan's grid, 0 outside its brain and the field of view
        mean = to_source_space(reco, prepared.geometry, prepared.source_brain)
        save_nifti(out_reconstruction, mean, prepared.geometry.source_affine, dtype=np.float32)
        result["reconstruction"] = str(out_reconstruction)
    if out_mask is not None:
        lesion = (amap > float(threshold)).astype(np.uint8)
        save_nifti(out_mask, lesion, prepared.geometry.source_affine, dtype=np.uint8)
        result.update(out_mask=str(out_mask), lesion_voxels=int(lesion.sum()))
    return result


def score_raw_scan(params, scan: str | Path, out: str | Path, *, mask: str | Path | None = None,
                   modality: str | None = None, template: str | None = None,
                   checkpoints: list[str | Path] | None = None, threshold: float | None = None,
                   out_mask: str | Path | None = None, out_reconstruction: str | Path | None = None,
                   force: bool = False, root: str | Path = ".") -> dict:
    """A scan as the scanner wrote it (any orientation and voxel size, skull, bias field): ingested like the
    training data (`mhd_uad.ingest`: resample, skull strip with `mask` or HD-BET, register to the template,
    crop, N4), scored by `score_scan` in template space (its guard checks the ingested scan), and the map (and
    the mean reconstruction) brought back through the inverse of the registration onto the raw scan's own grid
    and affine (zero outside its brain mask)."""
    import tempfile

    from mhd_uad.ingest.manifest import ScanSpec, nifti_stem
    from mhd_uad.ingest.scan import ingest_subject, to_raw_space
    from mhd_uad.ingest.settings import IngestSettings
    from mhd_uad.ingest.template import load_template

    if (threshold is None) != (out_mask is None):
        raise MhdUadError("--threshold and --out-mask go together")
    checkpoints, modality = _checkpoints_and_modality(params, modality, checkpoints, Path(root))
    settings = IngestSettings.from_params(params).with_template(template)
    scan = Path(scan)
    spec = ScanSpec("raw", modality, nifti_stem(scan) or scan.name, scan, Path(mask) if mask else None)
    atlas = load_template(settings.template, settings.orientation)
    subject = ingest_subject([spec], atlas, settings)
    item = subject.modalities[modality]
    with tempfile.TemporaryDirectory(prefix="mhd-uad-raw-") as tmp:
        image_path, mask_path, map_path, reco_path = (Path(tmp) / f"{n}.nii.gz"
                                                      for n in ("image", "mask", "map", "reconstruction"))
        save_nifti(image_path, item.image, subject.affine, dtype=np.float32)
        save_nifti(mask_path, subject.mask, subject.affine, dtype=np.float32)
        result = score_scan(params, image_path, mask_path, map_path, modality=modality, checkpoints=checkpoints,
                            out_reconstruction=reco_path if out_reconstruction is not None else None,
                            force=force, raw_source=scan, root=root)
        amap, map_affine = load_nifti(map_path, what="anomaly map")
        reco = None if out_reconstruction is None else load_nifti(reco_path, what="reconstruction")[0]
    raw_map = to_raw_space(amap, map_affine, item.template_to_raw, item.raw_shape, item.raw_affine)
    raw_map = np.clip(raw_map, 0.0, None) * item.raw_brain
    save_nifti(out, raw_map, item.raw_affine, dtype=np.float32)
    if reco is not None:
        raw_reco = to_raw_space(reco, map_affine, item.template_to_raw, item.raw_shape, item.raw_affine)
        save_nifti(out_reconstruction, raw_reco * item.raw_brain, item.raw_affine, dtype=np.float32)
        result["reconstruction"] = str(out_reconstruction)
    result.update(map=str(out), max_score=float(raw_map.max()), skull_strip=item.skull_strip,
                  template=str(atlas.path),
                  ingest_seconds={k: round(v, 2) for k, v in subject.timings.items()})
    if out_mask is not None:
        lesion = (raw_map > float(threshold)).astype(np.uint8)
        save_nifti(out_mask, lesion, item.raw_affine, dtype=np.uint8)
        result.update(out_mask=str(out_mask), lesion_voxels=int(lesion.sum()))
    return result
