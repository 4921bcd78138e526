"""The `score-healthy@<M>-<fold>` stage: each scorer's thresholds at 1, 5 and 10 % voxel false-positive rate
on healthy scans, the field's fixed-FPR operating points (method.md §5 logs them on IXI).

The fold's cDDPM scores the fold's IXI val scans (healthy, never trained on), once per modality and fold, not
once per test set; a scorer's threshold at rate r is the (1 − r) quantile of its map over their pooled brain
voxels (mask > 0; `metrics.threshold_at_fpr`), so `map > threshold` flags a fraction r of them. A scan
the split lists twice is scored and counted once. The `evaluate@<set>` stages of the modality read the
file back (`read_thresholds`) for each scorer's Dice at these thresholds (`dice_fpr01`, `dice_fpr05`,
`dice_fpr10` in metrics/<set>.json).

Under `torchrun --nproc_per_node K` rank r scores the scans r, r + K, ... and leaves their brain voxels in a
work folder (artifacts/eval/IXI_<M>-fold<K>, removed at the end); rank 0 pools them in the list's order and
writes the file, the same as a single process's (evaluation.sharding).

The same pass measures how faithfully the fold's model keeps these healthy scans (scoring.fidelity: brain L1
of the mean reconstruction, reco − scan on bright and dark voxels, the share of contrast kept), the
in-distribution check of a model before any lesion is looked at. It goes to metrics/healthy/<M>_fold<K>.json
(a DVC metric, so `dvc exp show` compares it across experiments), pooled over the scans and per scan.

artifacts/healthy/<M>/fold<K>/thresholds.json (written atomically):
    {"modality": "t2", "fold": 0, "n_scans": .., "n_voxels": .. (pooled brain voxels), "scans": [names],
     "fpr": {"fpr01": 0.01, "fpr05": 0.05, "fpr10": 0.1},
     "thresholds": {scorer: {"fpr01": .., "fpr05": .., "fpr10": ..}}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mhd_uad.config import to_plain
from mhd_uad.data.prepared import PreparedSet, prepared_name
from mhd_uad.data.splits import IXI, read_split_csv
from mhd_uad.errors import InputFileError
from mhd_uad.evaluation.metrics import threshold_at_fpr
from mhd_uad.evaluation.overlap import evaluation_workers, overlapped
from mhd_uad.evaluation.sharding import SINGLE, Shard, drop, process_shard, shared_folder, unstash
from mhd_uad.io import atomic_write_text, json_safe
from mhd_uad.models.checkpoint import cddpm_path, load_cddpm
from mhd_uad.models.inference import MhdSettings, cpu_part, device_part, release_device_memory, select_device
from mhd_uad.scoring.fidelity import FidelitySums, fidelity_sums
from mhd_uad.tracking import log_evaluation

log = logging.getLogger(__name__)

FPR_LEVELS: dict[str, float] = {"fpr01": 0.01, "fpr05": 0.05, "fpr10": 0.10}
FIDELITY_KEY = "_fidelity"  # beside the scorers' names in a scan's stash


def thresholds_path(root: str | Path, modality: str, fold: int) -> Path:
    return Path(root) / "artifacts" / "healthy" / modality / f"fold{int(fold)}" / "thresholds.json"


def fidelity_path(root: str | Path, modality: str, fold: int) -> Path:
    return Path(root) / "metrics" / "healthy" / f"{modality}_fold{int(fold)}.json"


def fidelity_report(modality: str, fold: int, names: list[str], sums: list[FidelitySums]) -> dict:
    """The metrics/healthy/<M>_fold<K>.json payload: the pooled figures (voxel-weighted) and each scan's."""
    total = sum(sums, FidelitySums())
    return json_safe({"modality": modality, "fold": int(fold), "n_scans": len(names),
                      "reconstruction": total.summary(),
                      "per_scan": {name: s.summary() for name, s in zip(names, sums, strict=True)}})


def healthy_scans(params, modality: str, fold: int) -> tuple[PreparedSet, list[int]]:
    """The prepared IXI set of the modality and the positions of the fold's val scans in it (each once)."""
    artifacts = Path(params.paths.artifacts)
    ps = PreparedSet.open(artifacts / "prepared" / prepared_name(IXI, modality))
    csv_path = artifacts / "splits" / f"{IXI}_val_fold{int(fold)}.csv"
    positions = ps.positions(read_split_csv(csv_path, params.paths.data, modality), csv_path)
    return ps, list(dict.fromkeys(positions))


def pooled_brain_scores(model, ps: PreparedSet, positions: list[int], settings: MhdSettings, device,
                        desc: str = "healthy", shard: Shard = SINGLE, work: Path | None = None, workers: int = 0
                        ) -> tuple[dict[str, np.ndarray], int, list[FidelitySums]]:
    """Every scorer's map values over the brain voxels (mask > 0) of the scans, pooled; their number; and each
    scan's reconstruction-fidelity sums (scoring.fidelity), in the scans' order. Under torchrun each rank
    scores its share; rank 0 returns the pool of all of them, the others ({}, 0, []).
    With `workers`, the maps of a scan are made in CPU threads while the device reconstructs the next
    (evaluation.overlap)."""
    def device_step(item):
        _, pos = item
        image, mask = np.asarray(ps.images[pos]), np.asarray(ps.masks[pos])
        return image, mask, device_part(model, image, mask, settings, ps.names[pos], device)

    def brain_scores(item, made):
        (i, _), (image, mask, scanned) = item, made
        maps, reco_mean = cpu_part(image, mask, scanned, settings)
        brain = mask > 0
        arrays = {s: maps[s][brain] for s in settings.scorers}
        arrays[FIDELITY_KEY] = fidelity_sums(image, reco_mean, mask).to_array()
        return i, shard.stash(Path(work or ".") / f"healthy_{i:06d}.npz", arrays)

    items = shard.mine(positions)
    mine = list(tqdm(overlapped(items, device_step, brain_scores, workers, device), total=len(items), desc=desc,
                     unit="scan"))
    scans = shard.gather_in_order(mine)
    if not shard.main:
        return {}, 0, []
    pooled = {s: np.concatenate([unstash(scan, s) for scan in scans]) for s in settings.scorers}
    fidelity = [FidelitySums.from_array(unstash(scan, FIDELITY_KEY)) for scan in scans]
    drop(scans)
    return pooled, int(pooled[settings.scorers[0]].size), fidelity


def fpr_thresholds(pooled: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{scorer: {"fpr01": t, "fpr05": t, "fpr10": t}} from each scorer's pooled healthy brain voxels."""
    rates = list(FPR_LEVELS.values())
    return {s: {k: float(t) for k, t in zip(FPR_LEVELS, threshold_at_fpr(v, rates), strict=True)}
            for s, v in pooled.items()}


def write_thresholds(path: str | Path, payload: dict) -> Path:
    """The thresholds file, complete or not at all (atomic rename)."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return Path(path)


def _problem(data, scorers, modality: str | None, fold: int | None) -> str | None:
    """What is wrong with a parsed thresholds file, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    if modality is not None and data.get("modality") != modality:
        return f"made for modality {data.get('modality')!r}, not {modality!r}"
    if fold is not None and data.get("fold") != int(fold):
        return f"made for fold {data.get('fold')!r}, not {int(fold)}"
    if data.get("fpr") != FPR_LEVELS:
        return f"`fpr` is {data.get('fpr')!r}, expected {FPR_LEVELS}"
    n_scans = data.get("n_scans")
    if not isinstance(n_scans, int) or isinstance(n_scans, bool) or n_scans < 1:
        return f"`n_scans` is {n_scans!r}, expected a positive integer"
    table = data.get("thresholds")
    if not isinstance(table, dict):
        return "no `thresholds` object"
    for s in scorers:
        entry = table.get(s)
        if not isinstance(entry, dict):
            return f"no thresholds for scorer {s!r} (has {sorted(table)})"
        for key in FPR_LEVELS:
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return f"thresholds.{s}.{key} is {value!r}, expected a finite number"
    return None


def read_thresholds(path: str | Path, scorers, modality: str | None = None, fold: int | None = None
                    ) -> dict[str, dict[str, float]]:
    """{scorer: {"fpr01": t, "fpr05": t, "fpr10": t}} from a thresholds file, checked for every scorer named
    (and the modality and fold when given); a missing or malformed file is an InputFileError naming it."""
    path = Path(path)
    stage = f"score-healthy@{modality}-{fold}" if modality is not None and fold is not None else "score-healthy"
    if not path.is_file():
        raise InputFileError(f"healthy-scan FPR thresholds not found (run the stage: `dvc repro {stage}`)", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"unreadable healthy-scan FPR thresholds ({exc}); re-run `dvc repro {stage}`",
                             path) from None
    if problem := _problem(data, list(scorers), modality, fold):
        raise InputFileError(f"malformed healthy-scan FPR thresholds: {problem}; re-run `dvc repro {stage}`", path)
    return {s: {k: float(data["thresholds"][s][k]) for k in FPR_LEVELS} for s in scorers}


def run_score_healthy(params, modality: str, fold: int, root: str | Path = ".") -> Path:
    """Score the fold's healthy IXI val scans with its cDDPM; returns the thresholds file (written by rank 0
    under torchrun)."""
    root = Path(root)
    settings = MhdSettings.from_params(params)
    ps, positions = healthy_scans(params, modality, fold)
    out = thresholds_path(root, modality, fold)
    scratch = root / "artifacts" / "eval" / f"IXI_{modality}-fold{int(fold)}"
    with process_shard() as shard:
        device = shard.device(select_device(params))
        model, _ = load_cddpm(params, cddpm_path(root, modality, fold), modality)
        model.to(device)
        with shared_folder(shard, scratch) if shard.world > 1 else contextlib.nullcontext() as work:
            pooled, n_voxels, fidelity = pooled_brain_scores(model, ps, positions, settings, device,
                                                   f"IXI {modality} fold {fold}", shard, work,
                                                   evaluation_workers(params.evaluate.get("workers", "auto"), device))
        del model
        release_device_memory()
    if not shard.main:
        return out
    if shard.world > 1:
        scratch.rmdir()  # emptied by the pooling
    if n_voxels == 0:
        raise InputFileError(f"the healthy val scans of fold {fold} hold no brain voxel", ps.folder)
    thresholds = fpr_thresholds(pooled)
    names = [ps.names[p] for p in positions]
    payload = {"modality": modality, "fold": int(fold), "n_scans": len(positions), "n_voxels": n_voxels,
               "scans": names, "fpr": dict(FPR_LEVELS), "thresholds": thresholds}
    report = fidelity_report(modality, fold, names, fidelity)
    metrics = fidelity_path(root, modality, fold)
    atomic_write_text(metrics, json.dumps(report, indent=2) + "\n")
    write_thresholds(out, payload)
    r = report["reconstruction"]
    log.info("%s fold %d: FPR thresholds from %d healthy scans (%d brain voxels); mean reconstruction: brain L1 "
             "%.4f, reco - scan bright %+.3f / dark %+.3f, contrast kept %.2f", modality, fold, len(positions),
             n_voxels, *(float("nan") if r[k] is None else r[k] for k in ("brain_l1", "bias_bright", "bias_dark",
                                                                           "contrast")))
    log_evaluation(f"score-healthy@{modality}-{fold}", to_plain(params),
                   {"n_scans": len(positions), "n_voxels": n_voxels, "thresholds": thresholds,
                    "reconstruction": report["reconstruction"]}, [out, metrics])
    return out
