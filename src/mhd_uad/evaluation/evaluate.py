"""The `evaluate@<dataset>` stage: every fold's cDDPM scores the set's val and test scans (method.md §5-6).

Named steps, in order:
1. `EvaluationSet.open`: the prepared set and the positions of its val and test scans.
2. Per fold: `val_thresholds` (each scorer's Dice threshold from the pooled val voxels, 10-step interval
   search), then `test_metrics` (per-volume AUPRC, AUROC, Dice on the test split; the fold-mean mhd map,
   and for the first fold the PR histograms and the gallery's reconstructions, kept as it goes).
3. `summarise`: mean and std over volumes (averaged over folds) and the std of the fold means, through
   evaluation.metrics; scans with no lesion voxel on the model grid are counted, named in one warning and
   left out of AP/AUROC (their Dice counts, their voxels join the val pool), as in the original; each
   baseline scorer's `versus_mhd`: mhd − baseline AUPRC over the paired test volumes, with its 95 % bootstrap
   interval and permutation p (evaluation.significance).
   `other_conventions` then adds the field's other conventions to each scorer's block: `auprc_pooled`,
   `auroc_pooled` (over all test voxels of the set at once, counted as the per-volume metrics count them:
   the whole grid, as the original's per-volume AUPRC; `metrics.ScoreCounts`, exact; mean over folds),
   `dice_oracle` (each test volume at its own best threshold: the original's BestDicePerVol, the same
   interval search on that volume alone; nan without a lesion voxel), `dice_fpr01/05/10` (Dice at the
   thresholds with 1/5/10 % voxel FPR on the fold's healthy IXI val scans, read from the
   `score-healthy@<M>-<fold>` stage's files, evaluation.healthy); the Dice are means over volumes and folds.
   `mhd_diagnostics`: the residual's share inside the span of the centred reconstructions and the mhd-nocov
   map correlation, means over test volumes and folds (scoring.diagnostics).
4. Outputs: metrics/<set>.json and metrics/<set>_per_volume.csv (every scan, fold and scorer), PR curves
   (plots/<set>/), the gallery PNG (best, median, worst scan by the first fold's mhd AUPRC, from the first
   fold's own reconstructions: no second scoring pass), each test scan's fold-mean mhd map as NIfTI in its
   source scan's space, and the MLflow run's metrics and files. The run spans the stage: opened before step 1,
   ended FINISHED after the outputs, FAILED when the stage fails (tracking.stage_run).

In a single process the stage's scratch volumes (`MapStore`) live in a private temporary folder in artifacts/,
removed at the end (`work_folder`).

Lesion = segmentation label > 0 (the original), except labels listed in `datasets.<set>.ignore_labels`,
whose voxels count neither as lesion nor as background (as the WMH challenge evaluates label 2).

Under `torchrun --nproc_per_node K` the scans are shared out (evaluation.sharding): rank r scores the val and
test scans r, r + K, ... of each fold; rank 0 searches the thresholds on the pooled val voxels of all ranks
(read back from the work folder, artifacts/eval/<set>, shared by the ranks and removed at the end) and sends
them round, gathers the test results back into the list's order, and writes the outputs; each rank writes its
own scans' NIfTI maps. The outputs equal a single process's.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mhd_uad.config import to_plain
from mhd_uad.data.geometry import to_source_space
from mhd_uad.data.prepared import PreparedSet, prepared_name
from mhd_uad.data.splits import read_split_csv
from mhd_uad.errors import ConfigError
from mhd_uad.evaluation.curves import ScoreHistogram, write_pr_curves
from mhd_uad.evaluation.gallery import GalleryRow, pick_gallery_scans, write_gallery
from mhd_uad.evaluation.healthy import FPR_LEVELS, read_thresholds, thresholds_path
from mhd_uad.evaluation.metrics import (
    ScoreCounts,
    aggregate_folds,
    dice,
    find_best_threshold,
    mean_std,
)
from mhd_uad.evaluation.overlap import evaluation_workers, overlapped
from mhd_uad.evaluation.sharding import SINGLE, Shard, drop, process_shard, shared_folder, unstash
from mhd_uad.evaluation.significance import paired_comparison
from mhd_uad.io import atomic_path, atomic_write_text, json_safe, save_nifti
from mhd_uad.models.checkpoint import cddpm_path, load_cddpm
from mhd_uad.models.inference import MhdSettings, cpu_part, device_part, release_device_memory, select_device
from mhd_uad.scoring.anomaly_maps import CONNECTED_COMPONENT_SCORERS, connected_component_filter
from mhd_uad.scoring.diagnostics import map_correlation
from mhd_uad.tracking import stage_run

log = logging.getLogger(__name__)

LABELS = "lesion"  # the key of the val scans' counted labels beside their scorers' maps


@dataclass
class EvaluationSet:
    """A test set as the stage sees it: its prepared volumes and where its val and test scans sit in them."""

    dataset: str
    modality: str
    prepared: PreparedSet
    val_pos: list[int]
    test_pos: list[int]
    ignore_labels: tuple[int, ...] = ()  # their voxels count neither as lesion nor as background

    @classmethod
    def open(cls, params, dataset: str) -> EvaluationSet:
        if dataset not in params.datasets:
            raise ConfigError(f"unknown dataset {dataset!r}; params list {sorted(params.datasets)}", "params.yaml")
        modality = str(params.datasets[dataset].modality)
        ps = PreparedSet.open(Path(params.paths.artifacts) / "prepared" / prepared_name(dataset, modality))
        positions = {}
        for part in ("val", "test"):
            csv_path = Path(params.paths.artifacts) / "splits" / f"{dataset}_{part}.csv"
            positions[part] = ps.positions(read_split_csv(csv_path, params.paths.data, modality), csv_path)
        ignore = tuple(int(v) for v in params.datasets[dataset].get("ignore_labels", []))
        return cls(dataset, modality, ps, positions["val"], positions["test"], ignore)

    def volume(self, pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, brain mask, segmentation label codes) of the scan at a position of the prepared set."""
        ps = self.prepared
        return np.asarray(ps.images[pos]), np.asarray(ps.masks[pos]), np.asarray(ps.segs[pos])

    def truth(self, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(lesion = label > 0 and not ignored, voxels that count in the metrics or None for all of them)."""
        if not self.ignore_labels:
            return seg > 0, None
        valid = ~np.isin(seg, self.ignore_labels)
        return (seg > 0) & valid, valid

    def lesion_voxels(self, pos: int) -> int:
        return int(self.truth(np.asarray(self.prepared.segs[pos]))[0].sum())

    @cached_property
    def without_lesion(self) -> list[str]:
        """Test scans with no lesion voxel on the model grid (e.g. an infratentorial stroke below the crop),
        read once per set."""
        return [self.prepared.names[p] for p in self.test_pos if self.lesion_voxels(p) == 0]


def _counted(volume: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The voxels of a volume that count in the metrics (all of them unless labels are ignored)."""
    return volume if valid is None else volume[valid]


@dataclass
class ScorerFold:
    """One scorer on one fold: the val threshold and the per-volume test metrics."""

    threshold: float = float("nan")
    val_dice: float = float("nan")
    auprc: list[float] = field(default_factory=list)
    auroc: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    # the field's other conventions (`volume_conventions`, `other_conventions`)
    fpr_thresholds: dict[str, float] = field(default_factory=dict)  # {"fpr01": t, ...} from healthy scans
    dice_fpr: dict[str, list[float]] = field(default_factory=dict)  # per test volume at each of them
    dice_oracle: list[float] = field(default_factory=list)
    auprc_pooled: float = float("nan")
    auroc_pooled: float = float("nan")


class MapStore:
    """Memory-mapped per-test-scan volumes the stage fills as it goes, for this rank's test scans: the fold-mean
    mhd map, and the first fold's mhd map and mean reconstruction (for the gallery). Removed by rank 0 when
    the stage is done."""

    NAMES = ("mhd_fold_mean", "first_fold_mhd", "first_fold_reconstruction")

    def __init__(self, folder: Path, shard: Shard, n_scans: int, volume_shape: tuple[int, ...]):
        self.folder, self.shard = folder, shard
        mine = len(shard.mine(range(n_scans)))
        self.fold_mean, self.first_mhd, self.first_reco = (
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(mine, *volume_shape))
            for path in self.files(shard.rank))

    def files(self, rank: int) -> list[Path]:
        return [self.folder / f"rank{rank}_{name}.npy" for name in self.NAMES]

    def first_fold(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(mhd map, mean reconstruction) of test scan `index` on the first fold, from the rank that scored it."""
        owner, slot = self.shard.owner(index), self.shard.slot(index)
        if owner == self.shard.rank:
            return np.asarray(self.first_mhd[slot]), np.asarray(self.first_reco[slot])
        mhd, reco = (np.load(path, mmap_mode="r") for path in self.files(owner)[1:])
        return np.array(mhd[slot]), np.array(reco[slot])

    def flush(self) -> None:
        for array in (self.fold_mean, self.first_mhd, self.first_reco):
            array.flush()

    def close(self) -> None:
        """Release this rank's maps; rank 0 also removes every rank's files (the others are done with them)."""
        self.flush()
        del self.fold_mean, self.first_mhd, self.first_reco
        if self.shard.main:
            for rank in range(self.shard.world):
                for path in self.files(rank):
                    path.unlink(missing_ok=True)


def scored_scans(model, ev: EvaluationSet, items: list[tuple[int, int]], settings: MhdSettings, device,
                 cpu_step, workers: int = 0, desc: str = "", diagnostics: bool = False) -> Iterator:
    """cpu_step(i, pos, image, mask, seg, made) for each (i, pos) of `items`, in their order: the device
    makes each scan in turn (`device_part`: the reconstructions, and the maps when evaluate.maps_on puts them
    there) while `workers` CPU threads run the CPU steps of the scans before it (evaluation.overlap; inline
    with 0 workers)."""

    def device_step(item):
        i, pos = item
        image, mask, seg = ev.volume(pos)
        return image, mask, seg, device_part(model, image, mask, settings, ev.prepared.names[pos], device,
                                             diagnostics=diagnostics)

    def finish(item, made):
        return cpu_step(*item, *made)

    return tqdm(overlapped(items, device_step, finish, workers, device), total=len(items), desc=desc, unit="scan")


def val_thresholds(model, ev: EvaluationSet, settings: MhdSettings, device, steps: int, fold: int,
                   shard: Shard = SINGLE, work: Path | None = None, workers: int = 0) -> dict[str, ScorerFold]:
    """Each scorer's Dice-optimal threshold on the pooled voxels of the val split (method.md §6); under
    torchrun each rank scores its share of the scans, and rank 0 searches on all of them in the list's order."""

    def counted_voxels(i, pos, image, mask, seg, made):
        lesion, valid = ev.truth(seg)
        maps, _ = cpu_part(image, mask, made, settings)
        counted = {s: _counted(maps[s], valid).ravel() for s in settings.scorers}
        counted[LABELS] = _counted(lesion, valid).ravel()
        return i, shard.stash(Path(work or ".") / f"val_fold{fold}_{i:06d}.npz", counted)

    mine = list(scored_scans(model, ev, shard.mine(ev.val_pos), settings, device, counted_voxels, workers,
                             f"{ev.dataset} fold {fold} val"))
    scans = shard.gather_in_order(mine)
    found = None
    if shard.main:
        labels = np.concatenate([unstash(scan, LABELS) for scan in scans])
        found = {}
        for s in settings.scorers:  # one scorer's pooled voxels in memory at a time
            search = find_best_threshold(np.concatenate([unstash(scan, s) for scan in scans]), labels, steps=steps)
            found[s] = (search.threshold, search.dice)
        drop(scans)
    return {s: ScorerFold(threshold=t, val_dice=d) for s, (t, d) in shard.broadcast(found).items()}


def _predict(scorer: str, amap: np.ndarray, threshold: float) -> np.ndarray:
    """`map > threshold`, connected components filtered for the scorers whose Dice does that (§4.6)."""
    pred = amap > threshold
    return connected_component_filter(pred) if scorer in CONNECTED_COMPONENT_SCORERS else pred


@dataclass
class VolumeScores:
    """One scorer on one test volume: what the fold's results and pooled counts take of it."""

    auprc: float
    auroc: float
    dice: float
    dice_oracle: float
    dice_fpr: dict[str, float]
    table: tuple[np.ndarray, np.ndarray, np.ndarray]  # ScoreCounts.table of its counted voxels
    histogram: tuple[np.ndarray, np.ndarray] | None = None  # ScoreHistogram.counts, when kept


def conventions(r: ScorerFold, scorer: str, amap: np.ndarray, valid: np.ndarray | None, truth: np.ndarray,
                steps: int) -> tuple[float, dict[str, float], tuple]:
    """One test volume's part in the field's other conventions: its oracle Dice (the interval search on this
    volume alone; nan without a lesion voxel), its Dice at each healthy-FPR threshold of `r` (predicted as for
    the val threshold) and the table of its counted voxels (the whole grid, as for the per-volume metrics)
    for the pooled counts."""
    scores = _counted(amap, valid)
    oracle = find_best_threshold(scores, truth, steps=steps).dice if truth.any() else np.nan
    fpr = {key: dice(_counted(_predict(scorer, amap, t), valid), truth) for key, t in r.fpr_thresholds.items()}
    return oracle, fpr, ScoreCounts.table(scores, truth)


def _record_conventions(r: ScorerFold, counts: ScoreCounts, oracle: float, fpr: dict[str, float], table) -> None:
    counts.add_counts(*table)
    r.dice_oracle.append(oracle)
    for key, value in fpr.items():
        r.dice_fpr.setdefault(key, []).append(value)


def volume_conventions(r: ScorerFold, scorer: str, amap: np.ndarray, valid: np.ndarray | None, truth: np.ndarray,
                       counts: ScoreCounts, steps: int) -> None:
    """`conventions` of one test volume, appended to `r` and pooled into `counts`."""
    _record_conventions(r, counts, *conventions(r, scorer, amap, valid, truth, steps))


def volume_scores(r: ScorerFold, scorer: str, amap: np.ndarray, valid: np.ndarray | None, truth: np.ndarray,
                  steps: int, histogram: bool) -> VolumeScores:
    """Everything one scorer's map of one test volume adds to its fold's results (reads `r`'s thresholds,
    changes nothing: safe in a CPU thread beside others)."""
    scores = _counted(amap, valid)
    oracle, fpr, table = conventions(r, scorer, amap, valid, truth, steps)
    # AP and AUROC of the volume from its table (scikit-learn's, from the one sort the table took; tested);
    # a lesion outside the grid: AP/AUROC undefined (left out of the means), Dice still counted
    own = ScoreCounts.of_table(table)
    auprc, auroc = (own.auprc(), own.auroc()) if truth.any() else (np.nan, np.nan)
    hist = ScoreHistogram.counts(scores, truth) if histogram else None
    return VolumeScores(auprc, auroc, dice(_counted(_predict(scorer, amap, r.threshold), valid), truth), oracle,
                        fpr, table, hist)


@dataclass
class ScannedVolume:
    """A test scan's results, made in a CPU thread, recorded in the list's order."""

    index: int
    row: dict
    scores: dict[str, VolumeScores]
    mhd: np.ndarray
    reconstruction: np.ndarray
    diagnostics: dict | None


def test_metrics(model, ev: EvaluationSet, settings: MhdSettings, device, fold: int, results: dict[str, ScorerFold],
                 store: MapStore, n_folds: int, histograms: dict[str, ScoreHistogram] | None,
                 threshold_steps: int = 10, diagnostics: list[dict] | None = None, work: Path | None = None,
                 workers: int = 0) -> list[dict]:
    """Per-volume metrics of every scorer on the test split (appended to `results`); returns the CSV rows.

    The mhd map adds to the fold mean; with `histograms` (the first fold) the PR histograms and the
    gallery's maps and reconstructions are kept too. The fold's pooled AUPRC/AUROC are set at the end. With
    `diagnostics`, each volume's covariance diagnostics are appended (scoring.diagnostics). Under torchrun
    each rank scores its share and rank 0 ends with every scan's results in the list's order
    (`merge_test_fold`; the other ranks return no rows). With `workers`, the maps and metrics of a scan are
    made in CPU threads while the device reconstructs the next (evaluation.overlap); they are recorded here
    in the list's order, so the results are those of one thread."""
    shard = store.shard
    rows, indices, diags = [], [], [] if diagnostics is not None else None
    counts = {s: ScoreCounts() for s in settings.scorers}
    hist = histograms  # under torchrun: this rank's, summed into `histograms` on rank 0
    if histograms is not None and shard.world > 1:
        hist = {s: ScoreHistogram() for s in histograms}

    def scan(i, pos, image, mask, seg, made) -> ScannedVolume:
        lesion, valid = ev.truth(seg)
        truth = _counted(lesion, valid)
        diag = {} if diags is not None else None
        maps, reco_mean = cpu_part(image, mask, made, settings, diagnostics=diag)
        if diag is not None and "nocov" in maps:
            diag["corr_mhd_nocov"] = map_correlation(maps["mhd"], maps["nocov"], mask)
        scores = {s: volume_scores(results[s], s, maps[s], valid, truth, threshold_steps, hist is not None)
                  for s in settings.scorers}
        row = {"fold": fold, "scan": ev.prepared.names[pos], "lesion_voxels": int(truth.sum())}
        for s, v in scores.items():
            row[f"{s}_auprc"], row[f"{s}_auroc"], row[f"{s}_dice"] = v.auprc, v.auroc, v.dice
        return ScannedVolume(i, row, scores, maps["mhd"], reco_mean, diag)

    for done in scored_scans(model, ev, shard.mine(ev.test_pos), settings, device, scan, workers,
                             f"{ev.dataset} fold {fold} test", diagnostics=diags is not None):
        if diags is not None:
            diags.append(done.diagnostics)
        slot = shard.slot(done.index)
        store.fold_mean[slot] += done.mhd / n_folds
        if hist is not None:
            store.first_mhd[slot], store.first_reco[slot] = done.mhd, done.reconstruction
        for s, v in done.scores.items():
            r = results[s]
            r.auprc.append(v.auprc)
            r.auroc.append(v.auroc)
            r.dice.append(v.dice)
            _record_conventions(r, counts[s], v.dice_oracle, v.dice_fpr, v.table)
            if hist is not None:
                hist[s].add_counts(*v.histogram)
        rows.append(done.row)
        indices.append(done.index)
    if shard.world > 1:
        store.flush()  # the gallery's maps, for rank 0 to read (also across nodes on a shared file system)
        rows, diags = merge_test_fold(shard, Path(work or "."), fold, indices, results, rows, diags, counts,
                                      hist, histograms)
    else:
        for s in settings.scorers:
            results[s].auprc_pooled, results[s].auroc_pooled = counts[s].auprc(), counts[s].auroc()
    if diagnostics is not None:
        diagnostics.extend(diags)
    return rows


PER_VOLUME = ("auprc", "auroc", "dice", "dice_oracle")


def merge_test_fold(shard: Shard, work: Path, fold: int, indices: list[int], results: dict[str, ScorerFold],
                    rows: list[dict], diags: list[dict] | None, counts: dict[str, ScoreCounts],
                    hist: dict[str, ScoreHistogram] | None, histograms: dict[str, ScoreHistogram] | None
                    ) -> tuple[list[dict], list[dict]]:
    """Every rank's share of a fold's test scans, on rank 0, as one process would have them: per-volume values
    in the test list's order, pooled counts merged per distinct score, histogram counts summed (all exact).
    Returns the rows and diagnostics in that order on rank 0, nothing elsewhere."""
    tables = {s: shard.stash(work / f"counts_fold{fold}_rank{shard.rank}_{s}.npz",
                             dict(zip(("values", "pos", "neg"), counts[s].counts(), strict=True)))
              for s in results}
    part = {"indices": indices, "rows": rows, "diags": diags, "counts": tables,
            "values": {s: {k: getattr(r, k) for k in PER_VOLUME} | {"fpr": r.dice_fpr} for s, r in results.items()},
            "hist": None if hist is None else {s: (h.pos, h.neg) for s, h in hist.items()}}
    parts = shard.gather(part)
    if not shard.main:
        return [], []
    order = sorted((i, p, k) for p, part in enumerate(parts) for k, i in enumerate(part["indices"]))

    def merged(get) -> list:
        return [get(parts[p])[k] for _, p, k in order]

    for s, r in results.items():
        for key in PER_VOLUME:
            setattr(r, key, merged(lambda part, s=s, key=key: part["values"][s][key]))
        fpr_keys = dict.fromkeys(k for part in parts for k in part["values"][s]["fpr"])
        r.dice_fpr = {key: merged(lambda part, s=s, key=key: part["values"][s]["fpr"][key]) for key in fpr_keys}
        pooled = ScoreCounts()
        for part in parts:
            pooled.add_counts(*(unstash(part["counts"][s], k) for k in ("values", "pos", "neg")))
        r.auprc_pooled, r.auroc_pooled = pooled.auprc(), pooled.auroc()
        drop(part["counts"][s] for part in parts)
        if histograms is not None:
            for part in parts:
                histograms[s].pos += part["hist"][s][0]
                histograms[s].neg += part["hist"][s][1]
    return merged(lambda part: part["rows"]), None if diags is None else merged(lambda part: part["diags"])


def summarise(per_fold: list[dict[str, ScorerFold]], ev: EvaluationSet, scorers: tuple[str, ...]) -> dict:
    """metrics/<set>.json: one block per scorer (mean/std over volumes and folds) and the volume counts."""
    metrics: dict = {}
    for s in scorers:
        folds = [f[s] for f in per_fold]
        auprc, auprc_std, auprc_fold_std = aggregate_folds([f.auprc for f in folds])
        auroc, auroc_std, _ = aggregate_folds([f.auroc for f in folds])
        dsc, dsc_std, dsc_fold_std = aggregate_folds([f.dice for f in folds])
        metrics[s] = {
            "auprc": auprc, "auprc_std": auprc_std, "auprc_fold_std": auprc_fold_std,
            "auroc": auroc, "auroc_std": auroc_std,
            "dice": dsc, "dice_std": dsc_std, "dice_fold_std": dsc_fold_std,
            "threshold": float(np.mean([f.threshold for f in folds])),
            "val_dice": float(np.mean([f.val_dice for f in folds])),
            "n_volumes": int(np.sum(np.isfinite(folds[0].auprc))),
        }
    wins = {}
    for other in ("single", "nocov"):
        if other in scorers:
            count = sum(int(a > b) for f in per_fold for a, b in zip(f["mhd"].auprc, f[other].auprc, strict=True)
                        if np.isfinite(a))
            wins[f"mhd_beats_{other}"] = count / len(per_fold)
    if "mhd" in scorers:
        for s in scorers:
            if s != "mhd":
                metrics[s]["versus_mhd"] = versus_mhd(per_fold, s)
    metrics["volumes"] = {"n_test": len(ev.test_pos), "n_val": len(ev.val_pos), "n_folds": len(per_fold),
                          "n_without_lesion": len(ev.without_lesion), **wins}
    return metrics


def versus_mhd(per_fold: list[dict[str, ScorerFold]], baseline: str) -> dict:
    """mhd − `baseline` on the per-volume test AUPRC, paired by scan and fold: the mean difference, its 95 %
    bootstrap interval and the two-sided permutation p (evaluation.significance; 10,000 rounds, seeded). A scan
    scored by several folds is one resampled unit (its folds' differences averaged), not several."""
    mhd = [v for f in per_fold for v in f["mhd"].auprc]
    other = [v for f in per_fold for v in f[baseline].auprc]
    scans = [i for f in per_fold for i in range(len(f["mhd"].auprc))]  # each fold lists the test scans in order
    c = paired_comparison(mhd, other, scans)
    return {"delta_auprc": c.delta, "ci95": list(c.ci), "p_value": c.p_value, "n_scans": c.n}


def other_conventions(per_fold: list[dict[str, ScorerFold]], scorers: tuple[str, ...]) -> dict[str, dict]:
    """Each scorer's keys for the field's other conventions (added to its block of metrics/<set>.json):
    pooled AUPRC/AUROC (mean over folds), oracle Dice and Dice at 1/5/10 % healthy FPR (mean over folds of
    the volume means, nan skipped as for `dice`)."""
    out = {}
    for s in scorers:
        folds = [f[s] for f in per_fold]
        block = {"auprc_pooled": mean_std([f.auprc_pooled for f in folds])[0],
                 "auroc_pooled": mean_std([f.auroc_pooled for f in folds])[0],
                 "dice_oracle": aggregate_folds([f.dice_oracle for f in folds])[0]}
        for key in FPR_LEVELS:
            block[f"dice_{key}"] = aggregate_folds([f.dice_fpr.get(key, []) for f in folds])[0]
        out[s] = block
    return out


def mhd_diagnostics(per_volume: list[dict]) -> dict:
    """metrics/<set>.json `mhd_diagnostics`: the means over test volumes and folds of the residual's share
    inside the span of the centred reconstructions (what Σ⁻¹ can change at all) and of the mhd-nocov map
    correlation: near 0 and near 1 say the full covariance hardly matters on these data."""
    out = {"n_volumes": len(per_volume)}
    for key in ("residual_share_in_span", "corr_mhd_nocov"):
        values = [d[key] for d in per_volume if key in d and np.isfinite(d[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def write_per_volume_csv(path: Path, rows: list[dict]) -> None:
    """metrics/<set>_per_volume.csv: scan, fold, lesion voxels and every scorer's AUPRC, AUROC and Dice
    (6 significant digits; nan where undefined), small and git-tracked so a PR diff shows which scans moved."""
    def text(value):
        return f"{value:.6g}" if isinstance(value, float) else value

    with atomic_path(path) as tmp, Path(tmp).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: text(v) for k, v in row.items()} for row in rows])


def gallery_rows(ev: EvaluationSet, first_fold: dict[str, ScorerFold], store: MapStore) -> list[GalleryRow]:
    rows = []
    for label, i in pick_gallery_scans(first_fold["mhd"].auprc):
        pos = ev.test_pos[i]
        image, _, seg = ev.volume(pos)
        mhd, reco = store.first_fold(i)
        rows.append(GalleryRow(label, ev.prepared.names[pos], float(first_fold["mhd"].auprc[i]), image, reco, mhd,
                               ev.truth(seg)[0].astype(np.uint8)))
    return rows


def write_source_space_maps(folder: Path, ev: EvaluationSet, store: MapStore) -> None:
    """Each of this rank's test scans' fold-mean mhd map in its source scan's grid and affine, zero outside its
    brain, into `folder` (the maps folder that rank 0 puts in place)."""
    ps = ev.prepared
    for i, pos in store.shard.mine(ev.test_pos):
        geometry = ps.geometry(pos)
        amap = to_source_space(np.asarray(store.fold_mean[store.shard.slot(i)]), geometry, ps.source_mask(pos))
        save_nifti(folder / f"{ps.names[pos]}_mhd.nii.gz", amap, geometry.source_affine, dtype=np.float32)


def score_folds(params, ev: EvaluationSet, settings: MhdSettings, store: MapStore, root: Path, work: Path,
                healthy: dict, histograms: dict[str, ScoreHistogram]) -> tuple[list, list[dict], list[dict]]:
    """Every fold's thresholds and test metrics: (per fold {scorer: ScorerFold}, CSV rows, diagnostics); complete
    on rank 0 (the others hold their own share)."""
    folds = [int(f) for f in params.train.folds]
    device, steps = store.shard.device(select_device(params)), int(params.evaluate.threshold_steps)
    workers = evaluation_workers(params.evaluate.get("workers", "auto"), device)
    per_fold, per_volume, diagnostics = [], [], []
    for k, fold in enumerate(folds):
        model, _ = load_cddpm(params, cddpm_path(root, ev.modality, fold), ev.modality)
        model.to(device)
        results = val_thresholds(model, ev, settings, device, steps, fold, store.shard, work, workers)
        for s in settings.scorers:
            results[s].fpr_thresholds = healthy[fold][s]
        per_volume += test_metrics(model, ev, settings, device, fold, results, store, len(folds),
                                   histograms if k == 0 else None, steps, diagnostics, work, workers)
        per_fold.append(results)
        del model
        release_device_memory()
    return per_fold, per_volume, diagnostics


@contextlib.contextmanager
def work_folder(shard: Shard, root: Path, dataset: str) -> Iterator[Path]:
    """The stage's scratch folder (the MapStore's volumes; under torchrun also what the ranks hand rank 0):
    artifacts/eval/<set>, shared by every rank, under torchrun, a private temporary folder in artifacts/
    otherwise; gone when the stage ends."""
    if shard.world == 1:
        (root / "artifacts").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".eval-{dataset}.", dir=root / "artifacts") as tmp:
            yield Path(tmp)
        return
    path = root / "artifacts" / "eval" / dataset
    with shared_folder(shard, path) as work:
        yield work
    if shard.main:
        path.rmdir()  # emptied by MapStore.close and the merges


def run_evaluate(params, dataset: str, root: str | Path = ".") -> Path:
    """Evaluate every fold on `dataset`; returns the metrics file (written by rank 0 under torchrun)."""
    root = Path(root)
    e = params.evaluate
    out, gallery = root / "metrics" / f"{dataset}.json", root / "reports" / "gallery" / f"{dataset}.png"
    with process_shard() as shard, stage_run(f"evaluate@{dataset}", to_plain(params), shard.main) as run:
        settings = MhdSettings.from_params(params)
        ev = EvaluationSet.open(params, dataset)
        healthy = {fold: read_thresholds(thresholds_path(root, ev.modality, fold), settings.scorers,
                                         ev.modality, fold)
                   for fold in (int(f) for f in params.train.folds)}  # checked before any scoring
        if shard.main and (missing := ev.without_lesion):
            log.warning("%s: %d test scans have no lesion voxel on the model grid (AP/AUROC left out, Dice "
                        "counted): %s", dataset, len(missing), ", ".join(missing))
        histograms = {s: ScoreHistogram() for s in settings.scorers}
        with work_folder(shard, root, dataset) as work:
            store = MapStore(work, shard, len(ev.test_pos), ev.prepared.images.shape[1:])
            per_fold, per_volume, diagnostics = score_folds(params, ev, settings, store, root, work, healthy,
                                                            histograms)
            if e.write_maps:
                with shared_folder(shard, root / "artifacts" / "maps" / dataset) as maps:
                    write_source_space_maps(maps, ev, store)
            if shard.main:
                metrics = summarise(per_fold, ev, settings.scorers)
                for s, block in other_conventions(per_fold, settings.scorers).items():
                    metrics[s].update(block)
                metrics["mhd_diagnostics"] = mhd_diagnostics(diagnostics)
                write_per_volume_csv(root / "metrics" / f"{dataset}_per_volume.csv", per_volume)
                write_pr_curves(root / "plots" / dataset, histograms, int(e.pr_curve_points))
                if e.gallery and (rows := gallery_rows(ev, per_fold[0], store)):
                    write_gallery(gallery, dataset, rows)
            store.close()
        if shard.main:
            atomic_write_text(out, json.dumps(json_safe(metrics), indent=2) + "\n")
            run.record(metrics, [out, gallery])
    return out
