"""Paired permutation test and bootstrap interval (evaluation.significance), and `versus_mhd` in summarise."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mhd_uad.evaluation.evaluate import EvaluationSet, ScorerFold, summarise
from mhd_uad.evaluation.significance import (
    paired_bootstrap_ci,
    paired_comparison,
    paired_permutation_test,
)
from mhd_uad.io import json_safe


def _certain(n, seed=1):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.1, 0.5, n)
    return b + 0.1 + rng.normal(0, 0.01, n), b


@pytest.mark.parametrize("n", [12, 40])  # 2^12 ≤ 10,000: exact enumeration; 2^40: 10,000 random sign flips
def test_a_certain_difference_is_significant_and_its_interval_excludes_zero(n):
    a, b = _certain(n)
    p = paired_permutation_test(a, b)
    lo, hi = paired_bootstrap_ci(a, b)
    assert p < 0.05 and 0 < lo < np.mean(a - b) < hi
    assert p == pytest.approx(2 / 2 ** 12 if n == 12 else 1 / 10_001)  # only the all-plus and all-minus patterns
    assert paired_permutation_test(b, a) == p and paired_bootstrap_ci(b, a)[1] < 0


def test_identical_inputs_give_p_one_and_a_zero_interval():
    a = np.random.default_rng(0).uniform(0, 1, 30)
    assert paired_permutation_test(a, a) == 1.0
    assert paired_bootstrap_ci(a, a) == [0.0, 0.0]
    a, b = np.zeros(5), np.zeros(5)
    assert paired_permutation_test(a, b) == 1.0 and paired_bootstrap_ci(a, b) == [0.0, 0.0]


def test_exact_enumeration_worked_example_and_ties_count_as_extreme():
    # d = 1, 2, 3: the 8 sign patterns give sums ±6, ±4, ±2, 0, 0; |sum| ≥ 6 twice -> p = 2/8
    assert paired_permutation_test([1, 2, 3], [0, 0, 0]) == 0.25
    # d = 1, 1: sums 2, 0, 0, -2; |sum| ≥ 2 twice -> 1/2 (the ties with the observed value count)
    assert paired_permutation_test([0.3, 0.4], [0.2, 0.3]) == 0.5
    # a noisy difference centred on 0 is not significant and its interval holds 0
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, 40)
    b = a + rng.normal(0, 0.05, 40)
    b -= np.mean(b - a)
    lo, hi = paired_bootstrap_ci(a, b)
    assert paired_permutation_test(a, b) > 0.5 and lo < 0 < hi


def test_monte_carlo_p_agrees_with_exact_enumeration():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.02, 0.05, 14), np.zeros(14)
    exact = paired_permutation_test(a, b, rounds=2 ** 14)
    assert paired_permutation_test(a, b, rounds=20_000) == pytest.approx(exact, abs=0.02)


def test_results_are_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    a, b = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)
    assert paired_permutation_test(a, b, seed=11) == paired_permutation_test(a, b, seed=11)
    assert paired_bootstrap_ci(a, b, seed=11) == paired_bootstrap_ci(a, b, seed=11)
    assert paired_bootstrap_ci(a, b, seed=11) != paired_bootstrap_ci(a, b, seed=12)


def test_nans_are_dropped_pairwise_and_fewer_than_two_pairs_give_nan():
    a, b = _certain(12)
    a_nan, b_nan = np.append(a, [np.nan, 0.5]), np.append(b, [0.2, np.nan])
    assert paired_permutation_test(a_nan, b_nan) == paired_permutation_test(a, b)
    assert paired_bootstrap_ci(a_nan, b_nan) == paired_bootstrap_ci(a, b)
    for x, y in (([0.5, np.nan], [0.1, 0.2]), ([0.5], [0.1]), ([], [])):
        assert np.isnan(paired_permutation_test(x, y))
        assert all(np.isnan(paired_bootstrap_ci(x, y)))
    with pytest.raises(ValueError, match="differ in length"):
        paired_permutation_test([1, 2], [1, 2, 3])


def test_a_scan_scored_by_several_folds_is_one_unit():
    a, b = _certain(12)
    folds = paired_comparison(np.tile(a, 3), np.tile(b, 3), units=list(range(12)) * 3)
    once = paired_comparison(a, b)
    assert folds.n == 12 and folds.delta == pytest.approx(once.delta)
    assert folds.ci == pytest.approx(once.ci) and folds.p_value == once.p_value and folds.excludes_zero


def _evaluation_set(n_test: int) -> EvaluationSet:
    segs = np.ones((n_test + 2, 2, 2, 2), dtype=np.uint8)
    segs[0] = 0  # the first test scan has no lesion on the grid
    prepared = SimpleNamespace(names=[f"scan{i}" for i in range(n_test + 2)], segs=segs)
    return EvaluationSet("Demo", "t2", prepared, val_pos=[n_test, n_test + 1], test_pos=list(range(n_test)))


def test_summarise_adds_versus_mhd_to_every_baseline():
    rng = np.random.default_rng(2)
    n = 12
    base = rng.uniform(0.1, 0.4, n)
    base[0] = np.nan  # no lesion: no AUPRC

    def fold(shift):
        mhd = base + 0.05 + rng.normal(0, 0.005, n)
        return {"mhd": ScorerFold(0.5, 0.3, list(mhd), list(mhd), list(mhd)),
                "single": ScorerFold(0.5, 0.2, list(base + shift), list(base), list(base)),
                "nocov": ScorerFold(0.5, 0.2, list(mhd + rng.normal(0, 0.01, n)), list(base), list(base)),
                "dmhd": ScorerFold(0.5, 0.2, [np.nan] * n, list(base), list(base))}

    per_fold = [fold(0.0), fold(0.01)]
    metrics = summarise(per_fold, _evaluation_set(n), ("mhd", "single", "nocov", "dmhd"))
    assert "versus_mhd" not in metrics["mhd"]
    single = metrics["single"]["versus_mhd"]
    diffs = [m - s for f in per_fold for m, s in zip(f["mhd"].auprc, f["single"].auprc, strict=True)]
    assert single["delta_auprc"] == pytest.approx(np.nanmean(diffs))
    assert single["delta_auprc"] == pytest.approx(metrics["mhd"]["auprc"] - metrics["single"]["auprc"])
    assert single["n_scans"] == n - 1 and single["p_value"] < 0.05
    assert 0 < single["ci95"][0] < single["delta_auprc"] < single["ci95"][1]
    nocov = metrics["nocov"]["versus_mhd"]
    assert nocov["ci95"][0] < nocov["delta_auprc"] < nocov["ci95"][1] and 0 < nocov["p_value"] <= 1
    dmhd = metrics["dmhd"]["versus_mhd"]  # no AUPRC at all: undefined, written as null
    assert np.isnan(dmhd["delta_auprc"]) and np.isnan(dmhd["p_value"])
    written = json.loads(json.dumps(json_safe(metrics), allow_nan=False))
    assert written["dmhd"]["versus_mhd"] == {"delta_auprc": None, "ci95": [None, None], "p_value": None,
                                             "n_scans": 0}
    assert written["volumes"]["n_without_lesion"] == 1


def test_report_gives_each_mhd_delta_its_interval_and_p_and_nothing_without_them():
    from mhd_uad.evaluation.report import format_delta, summary, summary_markdown

    def blocks(versus):
        single = {"auprc": 0.4, "auprc_std": 0.1, "dice": 0.3, "dice_std": 0.1}
        return {"mhd": {"auprc": 0.431, "auprc_std": 0.1, "dice": 0.3, "dice_std": 0.1},
                "single": {**single, "versus_mhd": versus} if versus else single, "volumes": {"n_folds": 1}}

    versus = {"delta_auprc": 0.031, "ci95": [0.012, 0.05], "p_value": 0.004, "n_scans": 11}
    text = summary_markdown({"Brats21": blocks(versus), "WMH": blocks(None)}, "demo")
    assert "| MHD − | Brats21 | WMH |" in text
    assert "| single reconstruction | +3.1 [+1.2, +5.0], p = 0.004 | – |" in text
    assert "MHD − " not in summary_markdown({"Brats21": blocks(None)}, "demo")  # the README's current block
    assert summary({"Brats21": blocks(versus)})["Brats21"]["single"]["versus_mhd"] == versus
    assert format_delta(-0.02, [None, None], float("nan"), " pp") == "-2.0 [–] pp, p –"
    assert format_delta(0.2, [0.1, 0.3], 0.00009) == "+20.0 [+10.0, +30.0], p < 0.001"


def test_other_conventions_sit_in_a_collapsed_section_after_the_paper_tables():
    from mhd_uad.evaluation.report import summary_markdown

    metrics = {
        "Brats21": {"mhd": {"auprc": 0.2, "auprc_std": 0.1, "dice": 0.3, "auprc_pooled": 0.25, "dice_fpr05": 0.4},
                    "volumes": {"n_folds": 1}},
        "WMH": {"mhd": {"auprc": 0.05, "auprc_std": 0.02, "dice": 0.1}, "volumes": {"n_folds": 1}},
    }
    text = summary_markdown(metrics, "demo")
    first_table = text.index("| MHD (full covariance) | **20.0 ± 10.0** | **5.0 ± 2.0** |")
    details = text.index("<details>")
    assert first_table < details < text.index("</details>")
    collapsed = text[details:text.index("</details>")]
    assert "`auprc_pooled`" in collapsed and "| MHD (full covariance) | **25.0** | **–** |" in collapsed
    assert "`dice_fpr05`" in collapsed and "`dice_oracle`" not in collapsed  # only the keys present
    assert "<details>" not in summary_markdown({"A": {"mhd": {"auprc": 0.1}, "volumes": {}}}, "demo")


def test_json_safe_gives_strict_json_of_non_finite_numbers_numpy_scalars_and_tuples():
    tree = {"a": [1.0, float("nan"), (np.float32(0.5), np.int64(3))], "b": -np.inf, "c": "x", "d": True}
    text = json.dumps(json_safe(tree), allow_nan=False)
    assert json.loads(text) == {"a": [1.0, None, [0.5, 3]], "b": None, "c": "x", "d": True}
