"""The `evaluate@<dataset>` stage: every fold's cDDPM scores the set's val and test scans (method.md §5-6).

Per fold: the Dice threshold of each scorer comes from the pooled voxels of the val split (10-step
interval search); per-volume AUPRC, AUROC and Dice on the test split. Reported: mean over volumes and
std over volumes (averaged over folds), and the std of the fold means. Scans with no lesion voxel on the
model grid are counted and left out of AP/AUROC. Also written: PR curves (pooled test voxels, from
histograms so no voxel list is kept), a PNG gallery (best, median, worst scan by mhd AUPRC), and each test
scan's fold-mean mhd map as NIfTI in its source scan's space.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mhd_uad.config import to_plain
from mhd_uad.data.prepared import PreparedSet, prepared_name
from mhd_uad.data.splits import read_split_csv
from mhd_uad.errors import ConfigError
from mhd_uad.evaluation.metrics import dice, find_best_threshold, per_volume_auprc, per_volume_auroc
from mhd_uad.io import atomic_path, atomic_write_text, replace_dir
from mhd_uad.scoring.anomaly_maps import connected_component_filter
from mhd_uad.scoring.pipeline import MhdSettings, score_volume

log = logging.getLogger(__name__)

HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-6, 4.0, 3999)])  # PR curves from score histograms


@dataclass
class ScorerResults:
    auprc: list[float] = field(default_factory=list)
    auroc: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    threshold: float = float("nan")
    val_dice: float = float("nan")
    hist_pos: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES), dtype=np.int64))
    hist_neg: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES), dtype=np.int64))

    def add_histogram(self, scores: np.ndarray, labels: np.ndarray) -> None:
        idx = np.clip(np.searchsorted(HIST_EDGES, scores.ravel(), side="right") - 1, 0, len(HIST_EDGES) - 1)
        lab = labels.ravel()
        self.hist_pos += np.bincount(idx[lab], minlength=len(HIST_EDGES))
        self.hist_neg += np.bincount(idx[~lab], minlength=len(HIST_EDGES))


def pr_curve_from_histograms(pos: np.ndarray, neg: np.ndarray, points: int) -> list[tuple[float, float, float]]:
    """(threshold, recall, precision) at histogram edges, thinned to at most `points` rows."""
    tp = np.cumsum(pos[::-1])[::-1].astype(np.float64)  # voxels with score >= edge
    fp = np.cumsum(neg[::-1])[::-1].astype(np.float64)
    total_pos = max(1.0, float(pos.sum()))
    keep = (tp + fp) > 0
    edges, tp, fp = HIST_EDGES[keep], tp[keep], fp[keep]
    recall, precision = tp / total_pos, tp / (tp + fp)
    rows = sorted({round(float(r), 4): (float(e), float(r), float(p)) for e, r, p in zip(edges, recall, precision,
                                                                                        strict=True)}.values())
    if len(rows) > points:
        pick = np.unique(np.linspace(0, len(rows) - 1, points).round().astype(int))
        rows = [rows[i] for i in pick]
    return rows


def _device(params):
    import torch

    accel = str(params.trainer.accelerator)
    if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _split(ps: PreparedSet, params, dataset: str, part: str, modality: str):
    """The split's rows and their positions in the prepared set."""
    csv_path = Path(params.paths.artifacts) / "splits" / f"{dataset}_{part}.csv"
    frame = read_split_csv(csv_path, params.paths.data, modality)
    return frame, ps.positions(frame, csv_path)


def _lesion_slice(seg: np.ndarray) -> int:
    areas = seg.reshape(seg.shape[0], -1).sum(axis=1)
    return int(np.argmax(areas))


def write_gallery(path: Path, dataset: str, rows: list[tuple[str, str, float, np.ndarray, np.ndarray, np.ndarray,
                                                                   np.ndarray]]) -> None:
    """Input, mean reconstruction, MHD map and ground-truth outline for the best, median and worst scans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for r, (label, name, ap, image, reco, amap, seg) in enumerate(rows):
        s = _lesion_slice(seg)
        panels = ((image[s], "input", "gray"), (reco[s], "mean reconstruction", "gray"), (amap[s], "MHD map", "hot"))
        for c, (arr, title, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.rot90(arr), cmap=cmap, vmin=0, vmax=max(1e-6, float(arr.max())) if c == 2 else 1)
            ax.contour(np.rot90(seg[s]), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title}" if r else f"{title}", fontsize=8)
        axes[r, 0].set_ylabel(f"{label}\n{name}\nAP {100 * ap:.1f}%", fontsize=8)
    fig.suptitle(f"{dataset}: ground truth outlined in cyan", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)


def _summary_block(per_fold: list[ScorerResults]) -> dict:
    def agg(values_per_fold):
        means = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in map(np.asarray, values_per_fold)]
        stds = [np.nanstd(v) if np.isfinite(v).any() else np.nan for v in map(np.asarray, values_per_fold)]
        return float(np.nanmean(means)), float(np.nanmean(stds)), float(np.nanstd(means))

    auprc, auprc_std, auprc_fold_std = agg([f.auprc for f in per_fold])
    auroc, auroc_std, _ = agg([f.auroc for f in per_fold])
    dsc, dsc_std, dsc_fold_std = agg([f.dice for f in per_fold])
    return {
        "auprc": auprc, "auprc_std": auprc_std, "auprc_fold_std": auprc_fold_std,
        "auroc": auroc, "auroc_std": auroc_std,
        "dice": dsc, "dice_std": dsc_std, "dice_fold_std": dsc_fold_std,
        "threshold": float(np.mean([f.threshold for f in per_fold])),
        "val_dice": float(np.mean([f.val_dice for f in per_fold])),
        "n_volumes": int(np.sum(np.isfinite(per_fold[0].auprc))),
    }


def _finite_or_null(tree):
    """NaN (e.g. Dice of a fold without a single prediction) becomes null: the file stays strict JSON."""
    if isinstance(tree, dict):
        return {k: _finite_or_null(v) for k, v in tree.items()}
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


def run_evaluate(params, dataset: str, root: str | Path = ".") -> Path:
    """Evaluate every fold on `dataset`; returns the metrics file."""
    import torch

    from mhd_uad.data.preprocess import to_source_space
    from mhd_uad.io import load_nifti, save_nifti
    from mhd_uad.tracking import flatten, run_tags, tracking_uri
    from mhd_uad.training import load_cddpm

    root = Path(root)
    if dataset not in params.datasets:
        raise ConfigError(f"unknown dataset {dataset!r}; params list {sorted(params.datasets)}", "params.yaml")
    settings = MhdSettings.from_params(params)
    modality = str(params.datasets[dataset].modality)
    folds = [int(f) for f in params.train.folds]
    ps = PreparedSet.open(Path(params.paths.artifacts) / "prepared" / prepared_name(dataset, modality))
    _, val_pos = _split(ps, params, dataset, "val", modality)
    test_frame, test_pos = _split(ps, params, dataset, "test", modality)
    device = _device(params)
    scorers = settings.scorers
    e = params.evaluate

    results: dict[str, list[ScorerResults]] = {s: [] for s in scorers}
    wins = {"mhd_beats_single": 0, "mhd_beats_nocov": 0}
    per_volume_rows = []
    maps_dir = root / "artifacts" / "maps" / dataset
    with replace_dir(root / "artifacts" / "eval" / dataset) as work:
        fold_mean = np.lib.format.open_memmap(work / "mhd_fold_mean.npy", mode="w+", dtype=np.float32,
                                              shape=(len(test_pos), *ps.images.shape[1:]))
        for k, fold in enumerate(folds):
            model, _ = load_cddpm(params, root / "models" / modality / f"fold{fold}" / "cddpm.ckpt", modality)
            model.to(device)
            fold_res = {s: ScorerResults() for s in scorers}
            pooled = {s: [] for s in scorers}
            labels = []
            for pos in tqdm(val_pos, desc=f"{dataset} fold {fold} val", unit="scan"):
                maps, _ = score_volume(model, np.asarray(ps.images[pos]), np.asarray(ps.masks[pos]), settings,
                                       ps.names[pos], device)
                for s in scorers:
                    pooled[s].append(maps[s].ravel())
                labels.append(np.asarray(ps.segs[pos]).ravel() > 0)
            labels = np.concatenate(labels)
            for s in scorers:
                search = find_best_threshold(np.concatenate(pooled[s]), labels, steps=int(e.threshold_steps))
                fold_res[s].threshold, fold_res[s].val_dice = search.threshold, search.dice
            del pooled, labels
            for i, pos in enumerate(tqdm(test_pos, desc=f"{dataset} fold {fold} test", unit="scan")):
                seg = np.asarray(ps.segs[pos]) > 0
                maps, _ = score_volume(model, np.asarray(ps.images[pos]), np.asarray(ps.masks[pos]), settings,
                                       ps.names[pos], device)
                fold_mean[i] += maps["mhd"] / len(folds)
                row = {"fold": fold, "scan": ps.names[pos], "lesion_voxels": int(seg.sum())}
                for s in scorers:
                    r = fold_res[s]
                    has_lesion = bool(seg.any())
                    r.auprc.append(per_volume_auprc(maps[s], seg) if has_lesion else np.nan)
                    r.auroc.append(per_volume_auroc(maps[s], seg) if has_lesion else np.nan)
                    pred = maps[s] > r.threshold
                    if s == "l1":
                        pred = connected_component_filter(pred)
                    r.dice.append(dice(pred, seg))
                    if k == 0:
                        r.add_histogram(maps[s], seg)
                    row[f"{s}_auprc"], row[f"{s}_dice"] = r.auprc[-1], r.dice[-1]
                for other in ("single", "nocov"):
                    if other in fold_res and np.isfinite(fold_res["mhd"].auprc[-1]):
                        wins[f"mhd_beats_{other}"] += int(fold_res["mhd"].auprc[-1] > fold_res[other].auprc[-1])
                per_volume_rows.append(row)
            for s in scorers:
                results[s].append(fold_res[s])
        fold_mean.flush()

        metrics = {s: _summary_block(results[s]) for s in scorers}
        metrics["volumes"] = {"n_test": len(test_pos), "n_val": len(val_pos), "n_folds": len(folds),
                              "n_without_lesion": int(sum(not ps.segs[p].any() for p in test_pos)),
                              **{k: v / len(folds) for k, v in wins.items()}}

        with (work / "per_volume.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(per_volume_rows[0]))
            writer.writeheader()
            writer.writerows(per_volume_rows)

        # PR curves (fold of the first model), as small CSVs for `dvc plots`
        with replace_dir(root / "plots" / dataset) as plots_tmp:
            for s in scorers:
                rows = pr_curve_from_histograms(results[s][0].hist_pos, results[s][0].hist_neg,
                                                int(e.pr_curve_points))
                with (plots_tmp / f"pr_{s}.csv").open("w", newline="") as fh:
                    writer = csv.writer(fh)
                    writer.writerow(["threshold", "recall", "precision"])
                    writer.writerows([(f"{t:.6g}", f"{r:.6g}", f"{p:.6g}") for t, r, p in rows])

        if e.gallery:
            mhd_ap = np.asarray(results["mhd"][0].auprc)
            order = [i for i in np.argsort(-np.nan_to_num(mhd_ap, nan=-1.0)) if np.isfinite(mhd_ap[i])]
            if order:
                picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
                model, _ = load_cddpm(params, root / "models" / modality / f"fold{folds[0]}" / "cddpm.ckpt", modality)
                model.to(device)
                rows = []
                for label, i in picks:
                    pos = test_pos[i]
                    maps, reco = score_volume(model, np.asarray(ps.images[pos]), np.asarray(ps.masks[pos]), settings,
                                              ps.names[pos], device, scorers=("mhd",))
                    rows.append((label, ps.names[pos], float(mhd_ap[i]), np.asarray(ps.images[pos]), reco,
                                 maps["mhd"], np.asarray(ps.segs[pos])))
                write_gallery(root / "reports" / "gallery" / f"{dataset}.png", dataset, rows)

        if e.write_maps:
            with replace_dir(maps_dir) as maps_tmp:
                for i, (pos, mask_path) in enumerate(zip(test_pos, test_frame["mask_path"], strict=True)):
                    scan = ps.index["scans"][pos]
                    amap = to_source_space(np.asarray(fold_mean[i]), scan["grid_affine"], scan["source_shape"],
                                           scan["source_affine"], load_nifti(mask_path, what="brain mask")[0])
                    save_nifti(maps_tmp / f"{ps.names[pos]}_mhd.nii.gz", amap, scan["source_affine"],
                               dtype=np.float32)
        del fold_mean

    out = root / "metrics" / f"{dataset}.json"
    atomic_write_text(out, json.dumps(_finite_or_null(metrics), indent=2) + "\n")
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment("mhd-uad")
        with mlflow.start_run(run_name=f"evaluate@{dataset}", tags=run_tags(f"evaluate@{dataset}")):
            flat = flatten(to_plain(params))
            for start in range(0, len(flat), 90):
                mlflow.log_params(dict(list(flat.items())[start:start + 90]))
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in flatten(metrics).items()
                                if isinstance(v, int | float) and np.isfinite(v)})
            mlflow.log_artifact(str(out))
            gallery = root / "reports" / "gallery" / f"{dataset}.png"
            if gallery.is_file():
                mlflow.log_artifact(str(gallery))
    except Exception as exc:  # tracking must not lose a finished evaluation
        log.warning("MLflow logging of evaluate@%s failed: %s", dataset, exc)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out
