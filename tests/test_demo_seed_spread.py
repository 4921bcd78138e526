"""benchmarks/demo_seed_spread.py: its fits take half an hour (a benchmark); the tests cover its tables."""

import json

import pytest

from conftest import load_benchmark


def _load():
    return load_benchmark("demo_seed_spread")


def test_the_report_gives_each_figures_spread_over_the_seeds(tmp_path):
    spread = _load()
    runs = {"3141": {"Brats21": {"mhd": 0.40, "single": 0.14}}, "1": {"Brats21": {"mhd": 0.30, "single": 0.14}}}
    fidelity = {"3141": {"t2_fold0": {"brain_l1": 0.075, "contrast": 0.70}},
                "1": {"t2_fold0": {"brain_l1": 0.080, "contrast": 0.66}}}
    report = {**spread.summarise(runs), "fidelity_runs": fidelity, "fidelity_spread": spread.summarise_fidelity(fidelity)}
    assert report["spread"]["Brats21"]["mhd"]["mean"] == pytest.approx(0.35)
    assert report["fidelity_spread"]["t2_fold0"]["contrast"]["std"] == pytest.approx(0.0283, abs=1e-4)
    text = spread.markdown(report)
    assert "| Brats21 | mhd | 40.0 | 30.0 | 35.0 ± 7.1 | 10.0 |" in text
    assert "| t2_fold0 | contrast kept | 0.700 | 0.660 | 0.680 ± 0.0283 | 0.0400 |" in text
    assert "| t2_fold0 | brain L1 | 0.0750 | 0.0800 |" in text
    assert "Reconstruction fidelity" not in spread.markdown(spread.summarise(runs))  # an earlier report's layout


def test_fidelity_is_read_from_the_score_healthy_metrics(tmp_path):
    spread = _load()
    (tmp_path / "healthy").mkdir()
    (tmp_path / "healthy" / "t1_fold0.json").write_text(json.dumps(
        {"reconstruction": {"brain_l1": 0.05, "bias_bright": None, "bias_dark": 0.01, "contrast": 0.9, "n_voxels": 9}}))
    assert spread.read_fidelity(tmp_path) == {"t1_fold0": {"brain_l1": 0.05, "bias_dark": 0.01, "contrast": 0.9}}
    assert spread.read_fidelity(tmp_path / "none") == {}
