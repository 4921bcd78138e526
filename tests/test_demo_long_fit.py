"""benchmarks/demo_long_fit.py: the gpu recipe's fits on the CPU. Its hour-long run is a benchmark; the tests
cover its params, its report and its refusal to start without the demo's models."""

import pytest

from conftest import REPO, load_benchmark
from mhd_uad.config import compose
from mhd_uad.evaluation.healthy import fidelity_path
from mhd_uad.models.factory import model_spec


def _load():
    return load_benchmark("demo_long_fit")


def test_the_probe_fits_the_gpu_recipe_with_the_cpus_device_settings():
    probe = _load()
    params, base = compose([f"recipe={probe.RECIPE}", *probe.CPU_SETTINGS], REPO), compose([], REPO)
    assert params.train.max_steps == compose(["recipe=gpu"], REPO).train.max_steps >= 10 * base.train.max_steps
    assert (params.trainer.accelerator, params.trainer.precision) == (base.trainer.accelerator, base.trainer.precision)
    assert (params.mhd.precision, params.mhd.max_batch) == (base.mhd.precision, base.mhd.max_batch)
    assert model_spec(params) == model_spec(base)


def test_the_report_sets_the_long_fits_beside_the_demo():
    probe = _load()
    row = {"auroc": 0.95, "ratio": 2.5, "bias_bright": -0.05, "bias_dark": 0.04, "pass": True}
    old = {"auroc": 0.742, "ratio": 2.99, "bias_bright": -0.109, "bias_dark": 0.066}
    report = {"steps": 5600, "cpu_steps": 560, "batch_size": 16, "machine": "a CPU (2 cores)", "parallel": True,
              "seconds": {"fit": {"t1": 3600.0, "t2": 3660.0}},
              "auprc": {"demo": {"Brats21": {"mhd": 0.42, "single": 0.3, "cddpm": 0.2}},
                        "long_fit": {"Brats21": {"mhd": 0.5, "single": 0.35, "cddpm": 0.25}}},
              "held_out": {"cases": {"tumour": {"contrasts": {"t1": row, "t2": {**row, "auroc": 0.5, "pass": False}}}}},
              "fits": {"t1": {"best_val_loss": 0.1, "global_step": 5600}, "t2": {"best_val_loss": 0.2, "global_step": 5600}}}
    text = probe.markdown(report, {"cases": {"tumour": {"contrasts": {"t1": old}}}})
    assert "| Brats21 | 42.0 | 50.0 | 30.0 | 35.0 | 20.0 | 25.0 |" in text
    assert "| tumour | T1 | 0.742 | 0.950 | 2.99 | 2.50 | -0.109 / +0.066 | -0.050 / +0.040 | – / – | pass |" in text
    assert "| tumour | T2 | – | 0.500 |" in text and "FAIL" in text
    assert "5600 steps" in text and "T1 60 min, T2 61 min (side by side)" in text
    assert "In distribution" not in text  # a report without the fidelity files
    fid = {"brain_l1": 0.0451, "bias_bright": -0.084, "bias_dark": 0.006, "contrast": 0.878}
    report["in_distribution"] = {"t2": {"demo": None, "long_fit": fid}}
    text = probe.markdown(report, None)
    assert "| IXI T2 | – | – | – | 0.0451 | -0.084 / +0.006 | 0.88 |" in text


def test_the_probe_reads_each_models_in_distribution_fidelity(tmp_path):
    probe = _load()
    root, repo = tmp_path / "root", tmp_path / "repo"
    path = fidelity_path(repo, "t2", 0)
    path.parent.mkdir(parents=True)
    path.write_text('{"reconstruction": {"brain_l1": 0.05}}')
    assert probe.in_distribution(root, repo, ["t2"]) == {"t2": {"demo": None, "long_fit": {"brain_l1": 0.05}}}


def test_the_probe_needs_the_demos_models_first(tmp_path):
    probe = _load()
    (tmp_path / "conf").symlink_to(REPO / "conf")
    with pytest.raises(SystemExit, match="run `make demo` first"):
        probe.main(["--root", str(tmp_path), "--work", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()
