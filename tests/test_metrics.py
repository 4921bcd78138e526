"""Per-volume AUPRC/AUROC, Dice, the Zimmerer threshold search and FPR thresholds (method.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, roc_auc_score, roc_curve

from mhd_uad.errors import MhdUadError
from mhd_uad.evaluation.metrics import (
    ScoreCounts,
    dice,
    find_best_threshold,
    mean_std,
    per_volume_auprc,
    per_volume_auroc,
    pool_voxels,
    summarize,
    threshold_at_fpr,
)

# ---------------------------------------------------------------- AUPRC / AUROC


def test_auprc_hand_worked_example():
    # ranked: 0.8 (+), 0.4 (−), 0.35 (+), 0.1 (−): AP = 0.5·1 + 0.5·(2/3)
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    assert per_volume_auprc(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # AUROC: of the 4 (positive, negative) pairs, 3 are ordered correctly
    assert per_volume_auroc(scores, labels) == pytest.approx(0.75)


def test_auprc_perfect_and_inverted_scores():
    labels = np.zeros((4, 5, 6))
    labels[1:3, 2:4, 1:5] = 1
    assert per_volume_auprc(labels * 0.9 + 0.05, labels) == pytest.approx(1.0)
    assert per_volume_auroc(labels * 0.9 + 0.05, labels) == pytest.approx(1.0)
    assert per_volume_auroc(1 - labels, labels) == pytest.approx(0.0)
    assert per_volume_auprc(1 - labels, labels) < 0.2


def test_auprc_auroc_match_sklearn_over_all_voxels():
    rng = np.random.default_rng(0)
    seg = (rng.random((6, 8, 9)) > 0.9).astype(np.float32) * 0.7  # interpolated label values: > 0 counts
    scores = rng.random(seg.shape) + 0.5 * (seg > 0)
    scores[:, :2] = 0.0  # background voxels at score 0 are included
    truth = (seg > 0).ravel()
    assert per_volume_auprc(scores, seg) == pytest.approx(
        average_precision_score(truth, scores.ravel()), abs=1e-12
    )
    fpr, tpr, _ = roc_curve(truth, scores.ravel())
    assert per_volume_auroc(scores, seg) == pytest.approx(auc(fpr, tpr), abs=1e-12)
    assert per_volume_auprc(torch.from_numpy(scores), torch.from_numpy(seg)) == per_volume_auprc(scores, seg)


def test_no_positive_voxel_gives_nan():
    scores = np.random.default_rng(1).random((3, 4, 5))
    assert math.isnan(per_volume_auprc(scores, np.zeros(scores.shape)))
    assert math.isnan(per_volume_auroc(scores, np.zeros(scores.shape)))
    assert math.isnan(per_volume_auroc(scores, np.ones(scores.shape)))


def test_metric_inputs_validated():
    with pytest.raises(MhdUadError, match="differ in size"):
        per_volume_auprc(np.zeros(5), np.zeros(6))
    with pytest.raises(MhdUadError, match="NaN"):
        per_volume_auprc(np.array([0.1, np.nan]), np.array([0, 1]))


# ---------------------------------------------------------------- Dice


def test_dice_hand_cases():
    assert dice([1, 1, 0, 0], [0, 1, 1, 0]) == pytest.approx(0.5)  # 2·1/(2+2)
    assert dice([1, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(0.5)  # 2·1/(3+1)
    assert dice([1, 0, 1], [1, 0, 1]) == 1.0
    assert dice([1, 0, 0], [0, 0, 1]) == 0.0
    assert dice([1, 0, 0], [0, 0, 0]) == 0.0  # predicted but nothing there
    assert dice([0, 0, 0], [0, 1, 0]) == 0.0  # missed
    assert math.isnan(dice([0, 0], [0, 0]))  # both empty: 0/0, skipped by nanmean
    assert dice([0, 0], [0, 0], empty=1.0) == 1.0
    assert dice(np.array([[0.2, 0.0]]), np.array([[0.6, 0.0]])) == 1.0  # > 0 binarises both


# ---------------------------------------------------------------- threshold search


def test_threshold_search_hand_traced_two_steps():
    """scores 0, .2, .4, .6, .8 with the last two positive.
    step 1 on [0, .8]: Dice(>.2) = 2·2/(3+2) = .8, Dice(>.6) = 2·1/(1+2) = .667 -> keep [0, .4], best .2
    step 2 on [0, .4]: Dice(>.1) = 2·2/(4+2) = .667, Dice(>.3) = .8 -> keep [.2, .4];
                      .8 ≥ best .8, so .3 replaces .2 (equal Dice: the later point wins)."""
    scores = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
    labels = np.array([0, 0, 0, 1, 1])
    result = find_best_threshold(scores, labels, steps=2)
    assert result.threshold == pytest.approx(0.3)
    assert result.dice == pytest.approx(0.8)
    (lo1, hi1, t25a, d25a, t75a, d75a), (lo2, hi2, t25b, d25b, t75b, d75b) = result.steps
    assert (lo1, hi1) == pytest.approx((0.0, 0.8)) and (t25a, t75a) == pytest.approx((0.2, 0.6))
    assert (d25a, d75a) == pytest.approx((0.8, 2 / 3))
    assert (lo2, hi2) == pytest.approx((0.0, 0.4)) and (t25b, t75b) == pytest.approx((0.1, 0.3))
    assert (d25b, d75b) == pytest.approx((2 / 3, 0.8))
    # one step stops at the first winner
    assert find_best_threshold(scores, labels, steps=1).threshold == pytest.approx(0.2)


def test_threshold_search_ties_go_to_the_lower_half():
    # every threshold in (0, 1) gives Dice 0: each step ties and keeps the lower half
    result = find_best_threshold(np.array([0.0, 1.0]), np.array([1, 0]), steps=3)
    assert [s[:2] for s in result.steps] == [(0.0, 1.0), (0.0, 0.5), (0.0, 0.25)]
    assert result.threshold == pytest.approx(0.0625)  # the last tied winner replaced the best (≥)
    assert result.dice == 0.0


def test_threshold_search_widens_a_degenerate_interval():
    result = find_best_threshold(np.zeros(10), np.r_[np.ones(3), np.zeros(7)], steps=2)
    assert result.steps[0][:2] == (0.0, 1.0)  # [0, 0] widened to [0, 1]
    assert result.steps[1][:2] == (0.0, 0.5)


def test_threshold_search_finds_a_known_optimum():
    # negatives on [0, .45], positives on [.55, 1]: Dice = 1 exactly for thresholds in [.45, .55)
    negatives = np.linspace(0.0, 0.45, 1000)
    positives = np.linspace(0.55, 1.0, 1000)
    scores = np.r_[negatives, positives]
    labels = np.r_[np.zeros(1000), np.ones(1000)]
    result = find_best_threshold(scores, labels)  # 10 steps
    assert len(result.steps) == 10
    assert 0.45 <= result.threshold < 0.55
    assert result.dice == 1.0
    assert dice(scores > result.threshold, labels) == 1.0


def test_threshold_search_ten_steps_follow_the_rule():
    """On random pooled data, every recorded step obeys §6 and the result is the last ≥ winner."""
    rng = np.random.default_rng(3)
    labels = rng.random(20000) > 0.9
    scores = rng.gamma(2.0, 0.1, size=labels.size) + 0.3 * labels * rng.random(labels.size)
    result = find_best_threshold(
        pool_voxels([scores[:5000], scores[5000:]]), pool_voxels([labels[:5000], labels[5000:]])
    )
    assert len(result.steps) == 10
    low, high = 0.0, scores.max()
    best_t, best_d = 0.0, 0.0
    for lo, hi, t25, d25, t75, d75 in result.steps:
        assert (lo, hi) == pytest.approx((low, high), abs=0, rel=1e-15)
        assert t25 == pytest.approx(lo + 0.25 * (hi - lo)) and t75 == pytest.approx(lo + 0.75 * (hi - lo))
        assert d25 == pytest.approx(dice(scores > t25, labels))  # strict > in the prediction
        assert d75 == pytest.approx(dice(scores > t75, labels))
        mid = lo + 0.5 * (hi - lo)
        winner = (t25, d25) if d25 >= d75 else (t75, d75)
        low, high = (lo, mid) if d25 >= d75 else (mid, hi)
        if winner[1] >= best_d:
            best_t, best_d = winner
    assert (result.threshold, result.dice) == (best_t, best_d)
    # the search went both ways at least once on this data, so the rule was exercised
    assert {d25 >= d75 for _, _, _, d25, _, d75 in result.steps} == {True, False}


def test_threshold_search_validates():
    with pytest.raises(MhdUadError, match="steps"):
        find_best_threshold(np.zeros(3), np.zeros(3), steps=0)


# ---------------------------------------------------------------- FPR thresholds and aggregation


def test_threshold_at_fpr_on_healthy_brain_voxels():
    rng = np.random.default_rng(4)
    scores = rng.random((10, 30, 30))
    brain = np.zeros(scores.shape, dtype=bool)
    brain[:, 5:25, 5:25] = True
    scores[~brain] = 100.0  # outside the brain: must not count
    thresholds = threshold_at_fpr(scores, [0.01, 0.05, 0.10], brain_mask=brain)
    n = brain.sum()
    for rate, thr in zip([0.01, 0.05, 0.10], thresholds, strict=True):
        realised = np.count_nonzero(scores[brain] > thr) / n
        assert abs(realised - rate) <= 1.0 / n
        assert thr < 1.0
    single = threshold_at_fpr(scores[brain], 0.05)
    assert isinstance(single, float) and single == pytest.approx(thresholds[1])
    with pytest.raises(MhdUadError, match="fpr"):
        threshold_at_fpr(scores, 1.5, brain_mask=brain)


def test_aggregation_helpers():
    mean, std = mean_std([1.0, 3.0, float("nan")])
    assert (mean, std) == (2.0, 1.0)  # population std (numpy default), nan skipped
    assert mean_std([1.0, 3.0], ddof=1)[1] == pytest.approx(math.sqrt(2.0))
    assert summarize([0.2, float("nan"), 0.4]) == pytest.approx({"mean": 0.3, "std": 0.1, "n": 2})
    nan_mean, nan_std = mean_std([float("nan")])
    assert math.isnan(nan_mean) and math.isnan(nan_std)


# ---------------------------------------------------------------- pooled over a whole set


@pytest.mark.parametrize("merge_every", [1, 50, 1 << 22])
def test_pooled_auprc_auroc_equal_sklearn_on_the_concatenated_voxels(merge_every):
    rng = np.random.default_rng(7)
    counts, scores, labels = ScoreCounts(merge_every=merge_every), [], []
    for shape in [(3, 6, 7), (2, 9, 5), (4, 4, 4), (1, 5, 5)]:
        seg = rng.random(shape) < 0.15
        s = np.round(rng.random(shape) + 0.4 * seg, 2).astype(np.float32)  # ties within and across volumes
        s[:, :1] = 0.0  # a block of zeros, as outside a brain
        counts.add(s, seg)
        scores.append(s.ravel())
        labels.append(seg.ravel())
    counts.add(np.full(10, 0.5, dtype=np.float32), np.zeros(10))  # a volume without lesion counts as background
    scores.append(np.full(10, 0.5, dtype=np.float32))
    labels.append(np.zeros(10, dtype=bool))
    s, g = np.concatenate(scores), np.concatenate(labels)
    assert counts.auprc() == pytest.approx(average_precision_score(g, s), rel=1e-12)
    assert counts.auroc() == pytest.approx(roc_auc_score(g, s), rel=1e-12)
    values, pos, neg = counts.counts()
    assert np.all(np.diff(values) > 0) and pos.sum() == g.sum() and neg.sum() == (~g).sum()
    # per-volume AP is not pooled AP: the pool ranks voxels of different volumes against each other
    assert counts.auprc() != pytest.approx(np.nanmean([per_volume_auprc(a, b) for a, b in zip(scores, labels,
                                                                                               strict=True)]))


def test_pooled_hand_case_and_undefined_cases():
    counts = ScoreCounts()
    counts.add(np.array([0.8, 0.1]), np.array([1, 0]))
    counts.add(np.array([0.4, 0.35]), np.array([0, 1]))
    assert counts.auprc() == pytest.approx(0.5 + 0.5 * 2 / 3)  # the per-volume hand example, split over 2 volumes
    assert counts.auroc() == pytest.approx(0.75)
    empty, background = ScoreCounts(), ScoreCounts()
    background.add(np.array([0.1, 0.2]), np.array([0, 0]))
    assert math.isnan(empty.auprc()) and math.isnan(empty.auroc())
    assert math.isnan(background.auprc()) and math.isnan(background.auroc())
    with pytest.raises(MhdUadError, match="NaN"):
        counts.add(np.array([np.nan]), np.array([1]))


@pytest.mark.parametrize("merge_every", [1, 1 << 22])
def test_pools_of_several_processes_merge_into_exactly_the_one_pool(merge_every):
    rng = np.random.default_rng(11)
    volumes = []
    for shape in [(3, 6, 7), (2, 9, 5), (4, 4, 4), (1, 5, 5), (2, 3, 3)]:
        seg = rng.random(shape) < 0.2
        volumes.append((np.round(rng.random(shape) + 0.3 * seg, 2).astype(np.float32), seg))  # ties across volumes
    one = ScoreCounts(merge_every=merge_every)
    ranks = [ScoreCounts(merge_every=merge_every) for _ in range(2)]
    for i, (s, seg) in enumerate(volumes):
        one.add(s, seg)
        ranks[i % 2].add(s, seg)  # rank r pools volumes r, r + 2, ...
    merged = ScoreCounts(merge_every=merge_every)
    for rank in reversed(ranks):  # in any order
        merged.add_counts(*rank.counts())
    for a, b in zip(one.counts(), merged.counts(), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert merged.auprc() == one.auprc() and merged.auroc() == one.auroc()  # bit for bit
    assert ranks[0].auprc() != one.auprc()


def test_a_volumes_table_gives_sklearns_ap_and_auroc_ties_included():
    """evaluate takes each volume's AUPRC/AUROC from the table of its distinct scores (one sort, shared with the
    pooled counts): the same numbers as scikit-learn's on the voxels."""
    rng = np.random.default_rng(7)
    for trial in range(6):
        scores = rng.random(5000).astype(np.float32)
        scores[rng.random(5000) < 0.5] = 0.0  # outside the brain: one big tie
        if trial % 2:
            scores = np.round(scores, 2).astype(np.float32)  # many small ties
        labels = rng.random(5000) < 0.03
        scores[labels] += np.float32(0.2)
        own = ScoreCounts.of_table(ScoreCounts.table(scores, labels))
        assert own.auprc() == pytest.approx(per_volume_auprc(scores, labels), abs=1e-12)
        assert own.auroc() == pytest.approx(per_volume_auroc(scores, labels), abs=1e-12)
