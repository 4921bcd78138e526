"""Precision-recall curves of a whole test set, from score histograms (no voxel list is ever kept).

Every scorer's map values fall into fixed log-spaced bins; the curve at each bin edge counts the lesion
and background voxels scoring at least that much. The CSVs (threshold, recall, precision) are small and
git-tracked, for `dvc plots` and `mhd-uad plots`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mhd_uad.io import replace_dir

HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-6, 4.0, 3999)])


class ScoreHistogram:
    """Counts of lesion (pos) and background (neg) voxels per score bin."""

    def __init__(self) -> None:
        self.pos = np.zeros(len(HIST_EDGES), dtype=np.int64)
        self.neg = np.zeros(len(HIST_EDGES), dtype=np.int64)

    @staticmethod
    def counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One volume's (lesion, background) counts per bin, as `add` adds them."""
        idx = np.clip(np.searchsorted(HIST_EDGES, scores.ravel(), side="right") - 1, 0, len(HIST_EDGES) - 1)
        lab = labels.ravel()
        return np.bincount(idx[lab], minlength=len(HIST_EDGES)), np.bincount(idx[~lab], minlength=len(HIST_EDGES))

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.add_counts(*self.counts(scores, labels))

    def add_counts(self, pos: np.ndarray, neg: np.ndarray) -> None:
        self.pos += pos
        self.neg += neg


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


def write_pr_curves(folder: Path, histograms: dict[str, ScoreHistogram], points: int) -> None:
    """plots/<dataset>/pr_<scorer>.csv for every scorer, the folder replaced whole."""
    with replace_dir(folder) as tmp:
        for scorer, hist in histograms.items():
            rows = pr_curve_from_histograms(hist.pos, hist.neg, points)
            with (tmp / f"pr_{scorer}.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["threshold", "recall", "precision"])
                writer.writerows([(f"{t:.6g}", f"{r:.6g}", f"{p:.6g}") for t, r, p in rows])
