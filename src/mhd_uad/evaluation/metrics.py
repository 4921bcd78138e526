"""Voxel-level metrics of method.md §6: per-volume AUPRC/AUROC, Dice, the Zimmerer threshold search,
healthy-scan FPR thresholds, and aggregation over volumes and folds; and AUPRC/AUROC pooled over a whole
set's voxels (`ScoreCounts`, exact), the field's other convention.

Labels are binarised with > 0 everywhere (segmentations and masks may be interpolated, §2.2).
Predictions from a threshold are `score > threshold` (strict), as in the original.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from mhd_uad.errors import MhdUadError

__all__ = [
    "per_volume_auprc",
    "per_volume_auroc",
    "dice",
    "ThresholdSearch",
    "find_best_threshold",
    "threshold_at_fpr",
    "pool_voxels",
    "summarize",
    "mean_std",
    "aggregate_folds",
    "ScoreCounts",
]


def _flat_pair(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores).ravel()
    g = _to_numpy(labels)
    if g.size != s.size:
        raise MhdUadError(f"scores ({s.size} voxels) and labels ({g.size} voxels) differ in size")
    if not np.issubdtype(s.dtype, np.number) and s.dtype != bool:
        raise MhdUadError(f"scores must hold real numbers, got dtype {s.dtype}")
    if not np.isfinite(s).all():
        raise MhdUadError("scores contain NaN or infinite values")
    return s, g.ravel() > 0


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def per_volume_auprc(scores: Any, labels: Any) -> float:
    """Average precision (sklearn) over all voxels of one volume, background included; labels = labels > 0.

    Returns nan when the volume has no positive voxel (AP is undefined; aggregate with nanmean as §6).
    """
    s, g = _flat_pair(scores, labels)
    if not g.any():
        return float("nan")
    return float(average_precision_score(g, s))


def per_volume_auroc(scores: Any, labels: Any) -> float:
    """ROC AUC (sklearn) over all voxels of one volume; nan when it holds only one class."""
    s, g = _flat_pair(scores, labels)
    if g.all() or not g.any():
        return float("nan")
    return float(roc_auc_score(g, s))


def dice(prediction: Any, target: Any, empty: float = float("nan")) -> float:
    """Dice = 2|P∩G| / (|P| + |G|) of two masks (both binarised with > 0).

    When P and G are both empty the ratio is 0/0: returns `empty` (default nan, which is what the
    original's numpy division gives, so `nanmean` over volumes skips such volumes; pass 1.0 to count
    them as perfect agreement). A non-empty P against an empty G gives 0.
    """
    p = _to_numpy(prediction)
    t = _to_numpy(target)
    if p.size != t.size:
        raise MhdUadError(f"prediction ({p.size} voxels) and target ({t.size} voxels) differ in size")
    p = p.ravel() > 0
    t = t.ravel() > 0
    denominator = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if denominator == 0:
        return float(empty)
    return 2.0 * int(np.count_nonzero(p & t)) / denominator


@dataclass(frozen=True)
class ThresholdSearch:
    """Result of `find_best_threshold`: the returned threshold, its Dice, and every step's evaluation."""

    threshold: float
    dice: float
    # per step: (interval low, interval high, 25 % point, its Dice, 75 % point, its Dice)
    steps: tuple[tuple[float, float, float, float, float, float], ...]


def find_best_threshold(
    scores: Any, labels: Any, steps: int = 10, upper: float | None = None
) -> ThresholdSearch:
    """Zimmerer interval search for the Dice-optimal threshold (method.md §6), on pooled voxels.

    Start from [0, max(scores)] (or [0, upper]); at each of `steps` steps:
      - a degenerate interval [a, a] is first widened to [a, 1];
      - Dice of `scores > t` is evaluated at t25 = a + (b−a)/4 and t75 = a + 3(b−a)/4;
      - if Dice(t25) ≥ Dice(t75) the winner is t25 and the interval becomes [a, mid] (ties go low),
        otherwise the winner is t75 and the interval becomes [mid, b];
      - the winner replaces the best so far when its Dice is ≥ the best Dice (so a later equal one wins).
    The best so far starts at (threshold 0, Dice 0); after the last step it is returned.

    Args:
        scores, labels: voxels of all validation volumes, flattened or pooled with `pool_voxels`.
    """
    if steps < 1:
        raise MhdUadError(f"steps must be >= 1, got {steps}")
    s, g = _flat_pair(scores, labels)
    if s.size == 0:
        raise MhdUadError("threshold search needs at least one voxel")
    n_target = int(np.count_nonzero(g))
    target_scores = s[g]

    def dice_at(threshold: float) -> float:
        n_pred = int(np.count_nonzero(s > threshold))
        denominator = n_pred + n_target
        if denominator == 0:
            return float("nan")
        return 2.0 * int(np.count_nonzero(target_scores > threshold)) / denominator

    low, high = 0.0, float(s.max()) if upper is None else float(upper)
    best_threshold, best_dice = 0.0, 0.0
    trace = []
    for _ in range(steps):
        if low == high:
            high = 1.0
        mid = low + (high - low) * 0.5
        t25 = low + (high - low) * 0.25
        t75 = low + (high - low) * 0.75
        d25, d75 = dice_at(t25), dice_at(t75)
        trace.append((low, high, t25, d25, t75, d75))
        if d25 >= d75:
            winner, winner_dice, high = t25, d25, mid
        else:
            winner, winner_dice, low = t75, d75, mid
        if winner_dice >= best_dice:
            best_threshold, best_dice = winner, winner_dice
    return ThresholdSearch(threshold=best_threshold, dice=best_dice, steps=tuple(trace))


def threshold_at_fpr(healthy_scores: Any, fpr: float | Sequence[float], brain_mask: Any = None) -> Any:
    """Threshold whose voxel false-positive rate on healthy scans is `fpr` (e.g. 0.01, 0.05, 0.10).

    The voxels are the brain voxels (brain_mask > 0) of the healthy scans; pass brain_mask=None when
    healthy_scores already holds only brain voxels. The threshold is the (1 − fpr) quantile (numpy's
    linear interpolation), so `score > threshold` flags about a fraction fpr of them.

    Returns a float for a scalar fpr, an array for a sequence.
    """
    s = _to_numpy(healthy_scores)
    if brain_mask is not None:
        m = _to_numpy(brain_mask)
        if m.shape != s.shape:
            raise MhdUadError(f"brain_mask shape {m.shape} does not match scores shape {s.shape}")
        s = s[m > 0]
    s = s.ravel().astype(np.float64)
    if s.size == 0:
        raise MhdUadError("no healthy brain voxels to set an FPR threshold on")
    if not np.isfinite(s).all():
        raise MhdUadError("healthy scores contain NaN or infinite values")
    rates = np.asarray(fpr, dtype=np.float64)
    if np.any((rates <= 0) | (rates >= 1)):
        raise MhdUadError(f"fpr must lie in (0, 1), got {fpr!r}")
    thresholds = np.quantile(s, 1.0 - rates)
    return float(thresholds) if rates.ndim == 0 else thresholds


def pool_voxels(volumes: Iterable[Any]) -> np.ndarray:
    """Concatenate the flattened voxels of several volumes (the pooled input of the threshold search)."""
    arrays = [_to_numpy(v).ravel() for v in volumes]
    if not arrays:
        raise MhdUadError("no volumes to pool")
    return np.concatenate(arrays)


def mean_std(values: Iterable[float], ddof: int = 0) -> tuple[float, float]:
    """nan-ignoring mean and std (numpy's nanmean/nanstd, population std by default); (nan, nan) if none."""
    v = np.asarray(list(values), dtype=np.float64)
    finite = v[~np.isnan(v)]
    if finite.size == 0:
        return float("nan"), float("nan")
    std = float(np.std(finite, ddof=ddof)) if finite.size > ddof else float("nan")
    return float(np.mean(finite)), std


def summarize(values: Iterable[float], ddof: int = 0) -> dict[str, float]:
    """{"mean", "std", "n"} over volumes (or over folds' means): nan entries are skipped and not counted."""
    v = np.asarray(list(values), dtype=np.float64)
    mean, std = mean_std(v, ddof=ddof)
    return {"mean": mean, "std": std, "n": int(np.count_nonzero(~np.isnan(v)))}


def aggregate_folds(values_per_fold: Sequence[Iterable[float]]) -> tuple[float, float, float]:
    """Per-volume values of each fold -> (mean over folds of the volume means, mean over folds of the volume
    stds, std of the fold means): the paper's mean ± std over volumes and the spread across folds (§6).
    nan entries (volumes without a lesion, Dice 0/0) are skipped, as the original's nanmean."""
    per_fold = [mean_std(values) for values in values_per_fold]
    fold_means = [m for m, _ in per_fold]
    mean, fold_std = mean_std(fold_means)
    volume_std, _ = mean_std([s for _, s in per_fold])
    return mean, volume_std, fold_std


def _collapse(values: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per distinct value (ascending), its lesion and background counts summed."""
    if values.size == 0:
        return values, pos, neg
    order = np.argsort(values, kind="stable")
    v = values[order]
    starts = np.flatnonzero(np.concatenate([[True], v[1:] != v[:-1]]))
    return v[starts], np.add.reduceat(pos[order], starts), np.add.reduceat(neg[order], starts)


class ScoreCounts:
    """Voxels of many volumes pooled exactly, without keeping them: per distinct score, how many lesion and
    background voxels have it. AP and AUROC depend on nothing else, so `auprc`/`auroc` equal scikit-learn's
    average_precision_score / roc_auc_score on the concatenated voxels (up to float rounding), ties included.

    Memory is 20 bytes per distinct score (float32 maps: at most the number of voxels, far fewer when values
    repeat, e.g. the zeros outside a brain); a volume's table joins the pool every `merge_every` rows."""

    def __init__(self, merge_every: int = 1 << 22) -> None:
        self.merge_every = merge_every
        self.values = np.zeros(0, dtype=np.float32)
        self.pos = np.zeros(0, dtype=np.int64)
        self.neg = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    @staticmethod
    def table(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One volume's table, as `add` pools it: (distinct scores ascending, lesion and background voxels at
        each). For `add_counts` elsewhere, e.g. in the thread that scored the volume."""
        s, g = _flat_pair(scores, labels)
        values, inverse = np.unique(s, return_inverse=True)
        inverse = inverse.ravel()
        pos = np.bincount(inverse[g], minlength=values.size).astype(np.int64)
        neg = np.bincount(inverse[~g], minlength=values.size).astype(np.int64)
        return values, pos, neg

    @classmethod
    def of_table(cls, table: tuple[np.ndarray, np.ndarray, np.ndarray]) -> ScoreCounts:
        """The pool of one volume's `table` (its `auprc`/`auroc` are the volume's: scikit-learn's
        average_precision_score/roc_auc_score on its voxels, from the one sort the table took)."""
        counts = cls()
        counts.values, counts.pos, counts.neg = table
        return counts

    def add(self, scores: Any, labels: Any) -> None:
        """Pool the voxels of one volume (scores and labels of the same size; labels binarised > 0)."""
        self._append(self.table(scores, labels))

    def _append(self, table: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self._pending.append(table)
        self._pending_rows += table[0].size
        if self._pending_rows >= self.merge_every:
            self._merge()

    def add_counts(self, values: Any, pos: Any, neg: Any) -> None:
        """Pool another pool's table (its `counts()`, e.g. from another process): distinct scores with their
        lesion and background counts. Exact, in any order: the merged table is the one pool's table."""
        self._append((np.asarray(values, dtype=np.float32), np.asarray(pos, dtype=np.int64),
                      np.asarray(neg, dtype=np.int64)))

    def _merge(self) -> None:
        if self._pending:
            parts = [(self.values, self.pos, self.neg), *self._pending]
            self.values, self.pos, self.neg = _collapse(*(np.concatenate(p) for p in zip(*parts, strict=True)))
            self._pending, self._pending_rows = [], 0

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct scores ascending, lesion voxels at each, background voxels at each)."""
        self._merge()
        return self.values, self.pos, self.neg

    def _descending(self) -> tuple[np.ndarray, np.ndarray]:
        """Lesion and background voxels scoring at least each distinct value, highest value first."""
        _, pos, neg = self.counts()
        return np.cumsum(pos[::-1]).astype(np.float64), np.cumsum(neg[::-1]).astype(np.float64)

    def auprc(self) -> float:
        """Average precision over every pooled voxel: Σ (R_k − R_{k−1}) P_k over the distinct scores, highest
        first (scikit-learn's definition); nan without a lesion voxel."""
        tps, fps = self._descending()
        if tps.size == 0 or tps[-1] == 0:
            return float("nan")
        recall = tps / tps[-1]
        return float(np.sum(np.diff(recall, prepend=0.0) * (tps / (tps + fps))))

    def auroc(self) -> float:
        """ROC AUC over every pooled voxel (the trapezoid through every distinct score; ties count half);
        nan unless both lesion and background voxels are pooled."""
        tps, fps = self._descending()
        if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
            return float("nan")
        tpr = np.concatenate([[0.0], tps / tps[-1]])
        fpr = np.concatenate([[0.0], fps / fps[-1]])
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
