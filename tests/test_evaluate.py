"""The evaluate stage and the score command on the tiny layout with a briefly trained T2 model."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_workdir, run_data_stages, write_scan
from mhd_uad.config import compose
from mhd_uad.evaluation.evaluate import run_evaluate
from mhd_uad.io import load_nifti
from mhd_uad.training import run_pretrain, run_train

pytestmark = pytest.mark.slow  # real fits and evaluations: run by `make test`, not `make test-fast`

FAST = ["pretrain.max_steps=2", "train.max_steps=3", "train.warmup_steps=1", "data.slices_per_volume=2",
        "pretrain.batch_size=4", "train.batch_size=4", "mhd.num_reconstructions=3",
        "evaluate.scorers=[mhd,single,nocov,l1]", "train.val_every_n_epochs=1"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("eval") / "work", tiny_data)
    params = compose(FAST, REPO)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    run_data_stages(root / "data", root / "artifacts", params, only=["IXI_t2", "MSLUB_t2"])
    run_pretrain(params, "t2")
    run_train(params, "t2", 0)
    yield root, params
    mp.undo()


def test_evaluate_writes_metrics_plots_gallery_and_maps_in_source_space(trained):
    root, params = trained
    out = run_evaluate(params, "MSLUB", root)
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"mhd", "single", "nocov", "l1", "volumes"}
    for block in ("mhd", "single", "nocov", "l1"):
        assert 0 <= metrics[block]["auprc"] <= 1 and 0 <= metrics[block]["auroc"] <= 1
        assert metrics[block]["n_volumes"] == metrics["volumes"]["n_test"]
        assert all(isinstance(v, int | float) or v is None for v in metrics[block].values())
    assert 0 <= metrics["volumes"]["mhd_beats_single"] <= metrics["volumes"]["n_test"]
    rows = (root / "plots" / "MSLUB" / "pr_mhd.csv").read_text().splitlines()
    assert rows[0] == "threshold,recall,precision" and 2 <= len(rows) <= 201
    assert (root / "reports" / "gallery" / "MSLUB.png").read_bytes()[:4] == b"\x89PNG"
    maps = sorted((root / "artifacts" / "maps" / "MSLUB").glob("*_mhd.nii.gz"))
    assert len(maps) == metrics["volumes"]["n_test"]
    for path in maps:
        name = path.name.removesuffix("_mhd.nii.gz")
        amap, affine = load_nifti(path)
        src, src_affine = load_nifti(root / "data" / "Test" / "MSLUB" / "t2" / f"{name}_t2.nii.gz")
        assert amap.shape == src.shape
        np.testing.assert_allclose(affine, src_affine)
        assert amap.max() > 0


def _score(root, *args):
    return subprocess.run([sys.executable, "-m", "mhd_uad.cli", "score", *args, *FAST], cwd=root,
                          capture_output=True, text=True)


def test_score_a_new_scan_of_another_shape_and_affine(trained, tmp_path):
    root, _ = trained
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    rng = np.random.default_rng(3)
    write_scan(tmp_path, "new", "scan", "t2", rng, (70, 66, 54), 2.5, lesion=True, origin=(-80.0, -90.0, -60.0))
    scan, mask = tmp_path / "new/t2/scan_t2.nii.gz", tmp_path / "new/mask/scan_mask.nii.gz"
    out, lesion = tmp_path / "map.nii.gz", tmp_path / "lesion.nii.gz"
    done = _score(root, str(scan), "--mask", str(mask), "--modality", "t2", "--out", str(out),
                  "--threshold", "0.2", "--out-mask", str(lesion))
    assert done.returncode == 0, done.stderr
    amap, affine = load_nifti(out)
    src, src_affine = load_nifti(scan)
    assert amap.shape == src.shape == load_nifti(lesion)[0].shape
    np.testing.assert_allclose(affine, src_affine)
    assert np.all(amap[load_nifti(mask)[0] == 0] == 0) and amap.max() > 0

    wrong = _score(root, str(scan), "--mask", str(mask), "--modality", "t1", "--out", str(tmp_path / "x.nii.gz"),
                   "--checkpoint", "models/t2/fold0/cddpm.ckpt")
    assert wrong.returncode == 2 and "trained on 't2', not 't1'" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "x.nii.gz").exists()
    data, aff = load_nifti(mask)
    from mhd_uad.io import save_nifti

    save_nifti(tmp_path / "small_mask.nii.gz", data[:-3], aff)
    bad = _score(root, str(scan), "--mask", str(tmp_path / "small_mask.nii.gz"), "--modality", "t2",
                 "--out", str(tmp_path / "y.nii.gz"))
    assert bad.returncode == 2 and "small_mask.nii.gz" in bad.stderr and "does not match" in bad.stderr
    assert not (tmp_path / "y.nii.gz").exists()
