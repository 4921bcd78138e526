"""`mhd-uad score`'s guard: does a scan look like the scans the models were trained on?

A raw head (skull on, another orientation and voxel size, off the template) given to `score` without `--raw`
is preprocessed and scored like any other scan, and its map is noise. So before scoring, `guard_scan` compares
the scan, preprocessed as `score` preprocesses it, with the healthy IXI scans of the prepared set
(<artifacts>/prepared/IXI_<modality>, made by the same `preprocess_scan`). Each check accepts the range seen
in those scans widened by a stated margin:

- voxel order: the file's voxel axes (e.g. RAS) are an order seen in training or the one `mhd-uad ingest`
  writes (`ingest.orientation`; both are template space), and no more oblique than training's + 1 degree;
- voxel size: no axis coarser than training's coarsest x 1.25 (finer is fine: the scan is smoothed and
  resampled to the model's spacing), none finer than training's finest / 4 (a header in the wrong units);
- brain on the model grid: the brain mask's centre (from the grid's centre) and bounding-box extent along
  each axis of the model grid within training's range +- 15 mm;
- field of view: the share of the brain mask outside the model's field of view at most training's largest
  + 5 percentage points;
- skull stripped: voxels of the model grid more than 2 voxels outside the brain mask and brighter than 0.1
  (of the [0, 1] scale), as a share of the brain's voxels, at most training's largest + 5 percentage points;
- intensities: the distribution inside the brain on the model's [0, 1] scale, as the mean absolute
  difference of its 2nd..98th percentiles from the median of the training scans' (a 1-D Wasserstein
  distance), at most 2 x the largest of the training scans' own distances.

The training side is summarised from the prepared set on disk (arrays, index.json with each scan's source
geometry, source brain masks; nothing is recorded by a stage for the guard), once: the summary is cached as a
small JSON under <artifacts>/score_guard/, keyed by the prepared set's index.json and the sizes and times of
its arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mhd_uad.data.geometry import ScanGeometry, from_slices, voxel_spacing
from mhd_uad.errors import MhdUadError
from mhd_uad.io import atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_FOLDER = "score_guard"
PERCENTILES = np.arange(2.0, 99.0, 2.0)  # of the brain's intensities on the [0, 1] scale
MAX_POINTS = 200_000  # brain voxels sampled for the share outside the field of view
BRIGHT = 0.1  # [0, 1] scale: a voxel this bright more than SKULL_GAP voxels outside the brain is not background
SKULL_GAP = 2  # voxels of the model grid
# the margins around the training range (module docstring)
OBLIQUE_MARGIN_DEG = 1.0
COARSER_FACTOR = 1.25
FINER_FACTOR = 4.0
GRID_MARGIN_MM = 15.0
OUTSIDE_MARGIN_POINTS = 5.0
SKULL_MARGIN_POINTS = 5.0
INTENSITY_FACTOR = 2.0
# the model grid's axes: (X, Y, Z) of the scan in RAS+ voxel order (preprocess.to_canonical)
AXES = ("left-right", "back-front", "bottom-top")


class ScanGuardError(MhdUadError):
    """A scan that does not look like the training scans (`--force` scores it anyway)."""


@dataclass
class ScanFeatures:
    """What the guard compares, for one scan."""

    axcodes: str  # voxel order of the file, e.g. "RAS"
    oblique_deg: float  # largest angle between a voxel axis and the world axis it runs along
    spacing_mm: list[float]  # voxel size of the file, per voxel axis
    centre_mm: list[float]  # brain mask's centre on the model grid from the grid's centre, (X, Y, Z) RAS+
    extent_mm: list[float]  # brain mask's bounding box on the model grid, (X, Y, Z)
    outside_percent: float  # share of the brain mask (source grid) outside the model's field of view
    skull_percent: float  # bright voxels well outside the brain mask (model grid), % of the brain's voxels
    percentiles: list[float]  # PERCENTILES of the image inside the brain, model grid, [0, 1] scale


def header_features(affine: np.ndarray) -> tuple[str, float, list[float]]:
    """Voxel order, obliqueness (degrees) and voxel size of a file's affine."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(affine)
    directions = affine[:3, :3] / np.maximum(spacing, 1e-12)
    cosines = np.clip(np.abs(directions).max(axis=0), 0.0, 1.0)
    return "".join(nib.aff2axcodes(affine)), float(np.degrees(np.arccos(cosines)).max()), [float(s) for s in spacing]


def grid_features(mask_shw: np.ndarray, spacing_mm: float) -> tuple[list[float], list[float]]:
    """Centre (from the grid's centre) and bounding-box extent in mm of a brain mask ([S, H, W], >= 0.5)."""
    brain = from_slices(np.asarray(mask_shw)) >= 0.5
    if not brain.any():
        return [0.0] * 3, [0.0] * 3
    idx = np.argwhere(brain)
    centre = (idx.mean(axis=0) - (np.asarray(brain.shape) - 1) / 2.0) * spacing_mm
    extent = (idx.max(axis=0) - idx.min(axis=0) + 1) * spacing_mm
    return [float(v) for v in centre], [float(v) for v in extent]


def outside_percent(source_brain: np.ndarray, geometry: ScanGeometry) -> float:
    """Share (%) of the source brain mask's voxels whose centres fall outside the model grid's footprint (a
    sample of at most MAX_POINTS of them)."""
    idx = np.argwhere(np.asarray(source_brain))
    if len(idx) == 0:
        return 0.0
    idx = idx[:: max(1, -(-len(idx) // MAX_POINTS))]
    to_grid = np.linalg.inv(geometry.grid_affine) @ geometry.source_affine
    coords = idx @ to_grid[:3, :3].T + to_grid[:3, 3]
    inside = np.all((coords >= -0.5) & (coords <= np.asarray(geometry.grid_shape) - 0.5), axis=1)
    return 100.0 * float(1.0 - inside.mean())


def skull_percent(image_shw: np.ndarray, mask_shw: np.ndarray) -> float:
    """Voxels brighter than BRIGHT more than SKULL_GAP voxels outside the brain mask, as % of the brain's
    voxels: about 0 for a skull-stripped scan, tens of % with the skull on."""
    mask = np.asarray(mask_shw)
    far = ~ndi.binary_dilation(mask > 0, iterations=SKULL_GAP)
    return 100.0 * float((far & (np.asarray(image_shw) >= BRIGHT)).sum()) / max(int((mask >= 0.5).sum()), 1)


def intensity_percentiles(image_shw: np.ndarray, mask_shw: np.ndarray) -> list[float]:
    values = np.asarray(image_shw)[np.asarray(mask_shw) >= 0.5]
    if values.size == 0:
        return [0.0] * len(PERCENTILES)
    return [float(v) for v in np.percentile(values, PERCENTILES)]


def scan_features(image_shw, mask_shw, geometry: ScanGeometry, source_brain, spacing_mm: float) -> ScanFeatures:
    """The guard's features of a prepared scan: its model-grid image and mask, its geometry and its own brain
    mask on its source grid."""
    image, mask = np.asarray(image_shw), np.asarray(mask_shw)
    axcodes, oblique, spacing = header_features(geometry.source_affine)
    centre, extent = grid_features(mask, spacing_mm)
    return ScanFeatures(axcodes, oblique, spacing, centre, extent, outside_percent(source_brain, geometry),
                        skull_percent(image, mask), intensity_percentiles(image, mask))


# ----------------------------------------------------------------------------- the training side


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256((folder / "index.json").read_bytes())
    for name in ("images.npy", "masks.npy", "source_masks.npy"):
        path = folder / name
        stat = path.stat() if path.is_file() else None
        digest.update(f"{name}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def summarise_prepared(prepared) -> list[dict]:
    """The ScanFeatures (as dicts) of every scan of a prepared set (data.prepared.PreparedSet)."""
    spacing = float(prepared.index["settings"]["spacing_mm"])
    return [asdict(scan_features(prepared.images[i], prepared.masks[i], prepared.geometry(i),
                                 prepared.source_mask(i), spacing)) for i in range(len(prepared))]


def training_features(folder: str | Path, cache_dir: str | Path | None = None) -> list[dict] | None:
    """The features of the scans of the prepared set in `folder` (None when there is none), read from the
    cache in `cache_dir` when it is current, else computed (and cached there when it can be written)."""
    from mhd_uad.data.prepared import PreparedSet

    folder = Path(folder)
    if not (folder / "index.json").is_file():
        return None
    fingerprint = _fingerprint(folder)
    cache = None if cache_dir is None else Path(cache_dir) / f"{folder.name}.json"
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text(encoding="utf-8"))
            if cached.get("version") == CACHE_VERSION and cached.get("fingerprint") == fingerprint:
                return cached["scans"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # a stale or broken cache is recomputed
    scans = summarise_prepared(PreparedSet.open(folder))
    if not scans:
        return None
    if cache is not None:
        try:
            atomic_write_text(cache, json.dumps({"version": CACHE_VERSION, "prepared": str(folder),
                                                 "fingerprint": fingerprint, "scans": scans}) + "\n")
        except OSError as exc:
            log.debug("guard summary not cached at %s (%s)", cache, exc)
    return scans


# ----------------------------------------------------------------------------- the checks


def intensity_reference(training: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The median of the training scans' percentiles, and each training scan's distance to it."""
    percentiles = np.array([t["percentiles"] for t in training], dtype=np.float64)
    reference = np.median(percentiles, axis=0)
    return reference, np.abs(percentiles - reference).mean(axis=1)


def _values(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def check_scan(scan: ScanFeatures, training: list[dict], extra_axcodes: tuple[str, ...] = ()) -> list[str]:
    """Each check the scan fails against the training scans' features, as '<check>: <what>' (empty: the scan
    looks like the training scans). `extra_axcodes`: voxel orders accepted besides training's."""
    failed = []
    orders = sorted({t["axcodes"] for t in training} | {c.upper() for c in extra_axcodes})
    oblique = max(t["oblique_deg"] for t in training)
    if scan.axcodes not in orders:
        failed.append(f"voxel order: the voxel axes run {scan.axcodes}, the training scans' {' or '.join(orders)}")
    elif scan.oblique_deg > oblique + OBLIQUE_MARGIN_DEG:
        failed.append(f"voxel order: the voxel axes are {scan.oblique_deg:.1f} degrees oblique, the training "
                      f"scans' at most {oblique:.1f}")
    coarsest = max(max(t["spacing_mm"]) for t in training)
    finest = min(min(t["spacing_mm"]) for t in training)
    if max(scan.spacing_mm) > coarsest * COARSER_FACTOR or min(scan.spacing_mm) < finest / FINER_FACTOR:
        failed.append(f"voxel size: {_values(scan.spacing_mm)} mm, the training scans' {finest:.3g} to "
                      f"{coarsest:.3g} mm (accepted: {finest / FINER_FACTOR:.3g} to "
                      f"{coarsest * COARSER_FACTOR:.3g} mm)")
    for key, what in (("centre_mm", "centre (from the grid's centre)"), ("extent_mm", "extent")):
        values = np.array([t[key] for t in training])
        lo, hi = values.min(axis=0), values.max(axis=0)
        for axis, v in enumerate(getattr(scan, key)):
            if not lo[axis] - GRID_MARGIN_MM <= v <= hi[axis] + GRID_MARGIN_MM:
                failed.append(f"brain on the model grid: the brain mask's {what} along {AXES[axis]} is "
                              f"{v:.0f} mm, the training scans' {lo[axis]:.0f} to {hi[axis]:.0f} mm")
                break
    outside = max(t["outside_percent"] for t in training)
    if scan.outside_percent > outside + OUTSIDE_MARGIN_POINTS:
        failed.append(f"field of view: {scan.outside_percent:.0f} % of the brain mask lies outside the model's "
                      f"field of view, in the training scans at most {outside:.0f} %")
    skull = max(t["skull_percent"] for t in training)
    if scan.skull_percent > skull + SKULL_MARGIN_POINTS:
        failed.append(f"skull stripped: bright voxels outside the brain mask amount to {scan.skull_percent:.0f} % "
                      f"of the brain (skull on, or a mask that misses the brain?), in the training scans at most "
                      f"{skull:.0f} %")
    reference, distances = intensity_reference(training)
    distance = float(np.abs(np.asarray(scan.percentiles) - reference).mean())
    if distance > distances.max() * INTENSITY_FACTOR:
        failed.append(f"intensities: the histogram inside the brain lies {distance:.3f} from the training scans' "
                      f"median (mean percentile difference on the [0, 1] scale), theirs at most "
                      f"{distances.max():.3f} (another contrast?)")
    return failed


def reference_folder(params, modality: str, root: str | Path = ".") -> Path:
    """The prepared IXI set of the modality: the scans the folds were trained on."""
    from mhd_uad.data.prepared import prepared_name
    from mhd_uad.data.splits import IXI

    return Path(root) / str(params.paths.artifacts) / "prepared" / prepared_name(IXI, modality)


def guard_scan(params, prepared, modality: str, scan: str | Path, *, root: str | Path = ".",
               force: bool = False, raw_source: str | Path | None = None) -> list[str] | None:
    """Check a prepared scan (data.preprocess.PreparedScan of `scan`) against the training scans of the
    modality. A failed check raises ScanGuardError (one line: the file, each failed check, what to do), or
    with `force` is logged as a warning. `raw_source`: the raw scan `score --raw` ingested into `scan`.
    Returns the failed checks ([] when it passes), None when there are no training scans to compare with."""
    folder = reference_folder(params, modality, root)
    named = Path(raw_source) if raw_source is not None else Path(scan)
    try:
        training = training_features(folder, Path(root) / str(params.paths.artifacts) / CACHE_FOLDER)
    except MhdUadError as exc:  # an unreadable or outdated prepared set: scoring does not need it
        log.warning("%s was not checked against the training scans: %s", named.name, exc)
        return None
    if training is None:
        log.warning("%s was not checked against the training scans: no prepared set at %s (run `dvc repro "
                    "prepare` or `dvc pull`)", named.name, folder)
        return None
    spacing = float(params.prepare.spacing_mm)
    features = scan_features(prepared.image, prepared.mask, prepared.geometry, prepared.source_brain, spacing)
    ingest = params.get("ingest") or {}
    extra = (str(ingest["orientation"]),) if ingest.get("orientation") else ()
    failed = check_scan(features, training, extra)
    if not failed:
        return failed
    checks = "; ".join(failed)
    if force:
        log.warning("%s does not look like the training scans (%s); scored anyway (--force)", named.name, checks)
        return failed
    if raw_source is not None:
        raise ScanGuardError(f"after ingest the scan still does not look like the {modality.upper()} training "
                             f"scans ({checks}): check the brain mask and the registration (--template), or pass "
                             "--force to score it anyway", named)
    raise ScanGuardError(f"does not look like the {modality.upper()} training scans ({checks}): for a scan as the "
                         "scanner wrote it (skull on, any orientation and voxel size) pass --raw, or pass --force "
                         "to score it anyway", named)
