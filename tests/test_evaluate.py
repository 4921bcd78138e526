"""The evaluate stage and the score command on the tiny layout with the shared tiny T2 model."""

import csv
import json
import shutil
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SHRUNK, copy_project, shrunk_params, write_scan
from mhd_uad.data.prepared import PreparedSet
from mhd_uad.errors import InputFileError
from mhd_uad.evaluation import evaluate, healthy
from mhd_uad.io import load_nifti, save_nifti
from mhd_uad.scoring.anomaly_maps import SCORERS

pytestmark = pytest.mark.slow


def _published_quirks(root, params) -> dict:
    """Give the copy's MSLUB test scans two quirks of the published data, and prepare MSLUB again: the first
    test scan's lesion moves below the model grid's z field of view (as infratentorial strokes in ATLAS v2),
    half of the second's lesion becomes label 2 (as WMH's "other pathology"), ignored by the params."""
    from mhd_uad.data.prepared import build_prepare_stage
    from mhd_uad.data.preprocess import PrepareSettings
    from mhd_uad.data.splits import SplitSettings, read_split_csv

    test = read_split_csv(root / "artifacts" / "splits" / "MSLUB_test.csv", root / "data", "t2")
    below, labelled = test["seg_path"][0], test["seg_path"][1]
    seg, affine = load_nifti(below)
    brain = load_nifti(test["mask_path"][0])[0] > 0
    moved = np.zeros(seg.shape, dtype=np.uint8)
    moved[18:22, 20:24, 4:6] = 1  # 48-56 mm below the centre: brain, but outside the 96 mm z field of view
    save_nifti(below, moved * brain, affine)
    seg, affine = load_nifti(labelled)
    two = (seg > 0) & (np.arange(seg.shape[0])[:, None, None] < np.argwhere(seg > 0)[:, 0].mean())
    save_nifti(labelled, np.where(two, 2, seg).astype(np.uint8), affine)
    build_prepare_stage(root / "artifacts" / "splits", root / "data", root / "artifacts" / "prepared",
                        SplitSettings.from_params(params), PrepareSettings.from_params(params), only=["MSLUB_t2"])
    return {"below": test["img_name"][0], "labelled": test["img_name"][1],
            "label1_voxels": int(((seg > 0) & ~two).sum()), "label2_voxels": int(two.sum())}


@pytest.fixture(scope="module")
def evaluated(tiny_model, tmp_path_factory):
    """evaluate@MSLUB run once on a copy of the tiny model's project (with two published-data quirks),
    counting every scan scored (and noting when the first one began: quirks["first_scan_at"])."""
    root = copy_project(tiny_model.root, tmp_path_factory.mktemp("evaluate") / "work")
    params = shrunk_params("datasets.MSLUB.ignore_labels=[2]")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    try:  # the score-healthy@t2-0 stage, before the quirks' prepare keeps only MSLUB_t2
        thresholds = healthy.run_score_healthy(params, "t2", 0, root)
    except BaseException:
        mp.undo()
        raise
    quirks = _published_quirks(root, params)
    scored = []
    original = evaluate.device_part

    def counting(model, image, mask, settings, scan, *args, **kwargs):
        quirks.setdefault("first_scan_at", time.time())
        scored.append(scan)
        return original(model, image, mask, settings, scan, *args, **kwargs)

    mp.setattr(evaluate, "device_part", counting)
    try:
        out = evaluate.run_evaluate(params, "MSLUB", root)
    finally:
        mp.undo()
    quirks["thresholds"] = json.loads(thresholds.read_text())
    return root, json.loads(out.read_text()), scored, quirks


def test_evaluate_writes_metrics_plots_gallery_and_maps_in_source_space(evaluated):
    root, metrics, _, _ = evaluated
    assert set(metrics) == {*SCORERS, "volumes", "mhd_diagnostics"}
    volumes = metrics["volumes"]
    diag = metrics["mhd_diagnostics"]
    assert diag["n_volumes"] == volumes["n_test"] * volumes["n_folds"]
    assert 0 < diag["residual_share_in_span"] < 1 and -1 <= diag["corr_mhd_nocov"] <= 1
    for block in SCORERS:
        assert 0 <= metrics[block]["auprc"] <= 1 and 0 <= metrics[block]["auroc"] <= 1
        assert metrics[block]["n_volumes"] == volumes["n_test"] - volumes["n_without_lesion"]
        assert all(isinstance(v, int | float) or v is None for k, v in metrics[block].items() if k != "versus_mhd")
        versus = metrics[block].get("versus_mhd")
        assert (versus is None) == (block == "mhd")
        assert versus is None or (set(versus) == {"delta_auprc", "ci95", "p_value", "n_scans"}
                                  and versus["n_scans"] == metrics[block]["n_volumes"])
    rows = (root / "plots" / "MSLUB" / "pr_mhd.csv").read_text().splitlines()
    assert rows[0] == "threshold,recall,precision" and 2 <= len(rows) <= 201
    assert (root / "reports" / "gallery" / "MSLUB.png").read_bytes()[:4] == b"\x89PNG"
    maps = sorted((root / "artifacts" / "maps" / "MSLUB").glob("*_mhd.nii.gz"))
    assert len(maps) == volumes["n_test"]
    for path in maps:
        name = path.name.removesuffix("_mhd.nii.gz")
        amap, affine = load_nifti(path)
        src, src_affine = load_nifti(root / "data" / "Test" / "MSLUB" / "t2" / f"{name}_t2.nii.gz")
        brain = load_nifti(root / "data" / "Test" / "MSLUB" / "mask" / f"{name}_mask.nii.gz")[0] > 0
        assert amap.shape == src.shape
        np.testing.assert_allclose(affine, src_affine)
        assert amap.max() > 0 and not amap[~brain].any()


def test_win_counts_and_means_agree_with_the_per_volume_results(evaluated):
    root, metrics, _, _ = evaluated
    with (root / "metrics" / "MSLUB_per_volume.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["volumes"]["n_test"] * metrics["volumes"]["n_folds"]
    mhd, single = (np.array([float(r[f"{s}_auprc"]) for r in rows]) for s in ("mhd", "single"))
    assert metrics["volumes"]["mhd_beats_single"] == int(np.sum(mhd[np.isfinite(mhd)] > single[np.isfinite(mhd)]))
    assert metrics["mhd"]["auprc"] == pytest.approx(np.nanmean(mhd), abs=1e-6)  # the CSV holds 6 digits
    assert metrics["single"]["versus_mhd"]["delta_auprc"] == pytest.approx(np.nanmean(mhd - single), abs=1e-6)
    assert metrics["single"]["auprc_std"] == pytest.approx(np.nanstd(single), abs=1e-6)
    assert {"scan", "fold", "lesion_voxels", "mhd_auroc", "l1_mean_postproc_dice", "cddpm_dice"} <= set(rows[0])
    assert metrics["mhd"]["auroc"] == pytest.approx(np.nanmean([float(r["mhd_auroc"]) for r in rows]), abs=1e-6)
    # the stage's scratch volumes are gone, and a single process made no shared work folder
    assert not (root / "artifacts" / "eval").exists() and not list((root / "artifacts").glob(".eval-*"))


def test_other_conventions_pooled_oracle_and_healthy_fpr_dice(evaluated, monkeypatch):
    root, metrics, _, quirks = evaluated
    thresholds = quirks["thresholds"]
    assert thresholds["n_scans"] >= 1 and thresholds["n_voxels"] > 0 and thresholds["modality"] == "t2"
    for block in SCORERS:
        m, t = metrics[block], thresholds["thresholds"][block]
        assert t["fpr01"] >= t["fpr05"] >= t["fpr10"]
        assert 0 <= m["auprc_pooled"] <= 1 and 0 <= m["auroc_pooled"] <= 1
        assert 0 <= m["dice_oracle"] <= 1
        for key in ("dice_fpr01", "dice_fpr05", "dice_fpr10"):
            assert m[key] is None or 0 <= m[key] <= 1, (block, key)
    # evaluate refuses to start without its modality's thresholds
    (root / "artifacts" / "healthy" / "t2" / "fold0" / "thresholds.json").unlink()
    monkeypatch.chdir(root)
    with pytest.raises(InputFileError, match="score-healthy@t2-0"):
        evaluate.run_evaluate(shrunk_params("datasets.MSLUB.ignore_labels=[2]"), "MSLUB", root)


def _evaluate_runs(root) -> list[tuple]:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("select status, start_time, end_time from runs where name = 'evaluate@MSLUB'").fetchall()


def test_the_mlflow_run_spans_the_evaluation(evaluated):
    """The stage's run opens before the first scan is scored and ends FINISHED once the metrics are written."""
    root, _, _, quirks = evaluated
    finished = [run for run in _evaluate_runs(root) if run[0] == "FINISHED"]
    assert len(finished) == 1
    _, start, end = finished[0]
    assert start <= 1000 * quirks["first_scan_at"]
    assert end >= int(1000 * (root / "metrics" / "MSLUB.json").stat().st_mtime)


def test_a_failed_evaluation_leaves_a_failed_mlflow_run_and_no_scratch(evaluated, tmp_path, monkeypatch):
    root = copy_project(evaluated[0], tmp_path / "failing")
    healthy.write_thresholds(healthy.thresholds_path(root, "t2", 0), evaluated[3]["thresholds"])
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")

    def lost(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(evaluate, "device_part", lost)
    with pytest.raises(RuntimeError, match="device lost"):
        evaluate.run_evaluate(shrunk_params("datasets.MSLUB.ignore_labels=[2]"), "MSLUB", root)
    (status, start, end), = _evaluate_runs(root)
    assert status == "FAILED" and start <= end
    assert not (root / "artifacts" / "eval").exists() and not list((root / "artifacts").glob(".eval-*"))


def test_each_scan_is_scored_once_per_fold_and_the_gallery_needs_no_second_pass(evaluated):
    _, metrics, scored, _ = evaluated
    volumes = metrics["volumes"]
    assert len(scored) == (volumes["n_val"] + volumes["n_test"]) * volumes["n_folds"]


def test_cpu_threads_beside_the_device_write_what_one_thread_writes(evaluated, tmp_path, monkeypatch):
    """evaluate.workers = 2: maps and metrics in CPU threads while the next scan is reconstructed
    (evaluation.overlap), recorded in the list's order: the same files, byte for byte."""
    root = copy_project(evaluated[0], tmp_path / "threads")
    healthy.write_thresholds(healthy.thresholds_path(root, "t2", 0), evaluated[3]["thresholds"])  # as evaluated
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    seen = []
    original = evaluate.overlapped

    def spy(items, device_step, cpu_step, workers, device=None):
        seen.append(workers)
        return original(items, device_step, cpu_step, workers, device)

    monkeypatch.setattr(evaluate, "overlapped", spy)
    evaluate.run_evaluate(shrunk_params("datasets.MSLUB.ignore_labels=[2]", "evaluate.workers=2"), "MSLUB", root)
    assert seen and set(seen) == {2}
    for name in ("metrics/MSLUB.json", "metrics/MSLUB_per_volume.csv", "plots/MSLUB/pr_mhd.csv"):
        assert (root / name).read_bytes() == (evaluated[0] / name).read_bytes(), name
    for path in sorted((evaluated[0] / "artifacts" / "maps" / "MSLUB").glob("*.nii.gz")):
        np.testing.assert_array_equal(load_nifti(root / "artifacts" / "maps" / "MSLUB" / path.name)[0],
                                      load_nifti(path)[0])


def test_maps_made_on_the_device_give_the_same_metrics(evaluated, tmp_path, monkeypatch):
    """evaluate.maps_on=device (the default on a GPU; here the device is the CPU): the maps in torch equal the
    numpy maps to 1e-5, so every metric agrees closely and every scan's source-space map too."""
    root = copy_project(evaluated[0], tmp_path / "device")
    healthy.write_thresholds(healthy.thresholds_path(root, "t2", 0), evaluated[3]["thresholds"])
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    out = evaluate.run_evaluate(shrunk_params("datasets.MSLUB.ignore_labels=[2]", "evaluate.maps_on=device"), "MSLUB",
                                root)
    got, expected = json.loads(out.read_text()), evaluated[1]
    for scorer in SCORERS:
        for key in ("auprc", "auroc", "auprc_pooled", "dice_oracle"):
            assert got[scorer][key] == pytest.approx(expected[scorer][key], abs=1e-3), (scorer, key)
    for path in sorted((evaluated[0] / "artifacts" / "maps" / "MSLUB").glob("*.nii.gz")):
        np.testing.assert_allclose(load_nifti(root / "artifacts" / "maps" / "MSLUB" / path.name)[0],
                                   load_nifti(path)[0], atol=1e-5)


def test_a_lesion_outside_the_grid_is_counted_and_ignored_labels_count_nowhere(evaluated):
    root, metrics, _, quirks = evaluated
    volumes = metrics["volumes"]
    assert volumes["n_without_lesion"] == 1 and metrics["mhd"]["n_volumes"] == volumes["n_test"] - 1
    with (root / "metrics" / "MSLUB_per_volume.csv").open() as fh:
        rows = {r["scan"]: r for r in csv.DictReader(fh)}
    below = rows[quirks["below"]]
    assert below["lesion_voxels"] == "0" and below["mhd_auprc"] == "nan"
    assert below["mhd_dice"] in ("0", "nan")  # 0 as soon as anything is predicted, as the original
    ps = PreparedSet.open(root / "artifacts" / "prepared" / "MSLUB_t2")
    pos = ps.names.index(quirks["labelled"])
    labels = np.asarray(ps.segs[pos])
    assert (labels == 2).any() and int(rows[quirks["labelled"]]["lesion_voxels"]) == int((labels == 1).sum()) > 0
    assert np.isfinite(float(rows[quirks["labelled"]]["mhd_auprc"]))


def _score(root, *args):
    return subprocess.run([sys.executable, "-m", "mhd_uad.cli", "score", *args, *SHRUNK], cwd=root,
                          capture_output=True, text=True)


def test_score_a_new_scan_of_another_shape_and_affine(tiny_model, tmp_path):
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    (root / "conf").symlink_to(REPO / "conf")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(tiny_model.root / "models" / "t2", root / "models" / "t2")
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
    missing = _score(root, str(scan), "--mask", str(mask), "--modality", "t1", "--out", str(tmp_path / "z.nii.gz"))
    assert missing.returncode == 2 and "no trained T1 model" in missing.stderr
    data, aff = load_nifti(mask)
    save_nifti(tmp_path / "small_mask.nii.gz", data[:-3], aff)
    bad = _score(root, str(scan), "--mask", str(tmp_path / "small_mask.nii.gz"), "--modality", "t2",
                 "--out", str(tmp_path / "y.nii.gz"))
    assert bad.returncode == 2 and "small_mask.nii.gz" in bad.stderr and "does not match" in bad.stderr
    assert not (tmp_path / "y.nii.gz").exists()
