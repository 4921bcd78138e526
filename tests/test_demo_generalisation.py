"""benchmarks/demo_generalisation.py: the held-out anatomy benchmark of the demo-trained models.

The fast tests cover what can fail without trained models (the measures on maps with known answers, the twin
rendering on a coarse grid, the score command line, the report and exit codes, the missing-model error); the
slow test runs the whole benchmark against the repository's models (`make demo`) and skips without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import load_benchmark
from mhd_uad.errors import MhdUadError

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
COARSE_MM = 3.0  # the held-out base on a 3 mm grid renders a subject in about a second


bench = load_benchmark("demo_generalisation")


@pytest.fixture(scope="module")
def coarse_base():
    from mhd_uad.data.demo.anatomy import load_base_anatomy
    from mhd_uad.data.demo.bases import HELD_OUT_BASE

    return load_base_anatomy(voxel_size=COARSE_MM, name=HELD_OUT_BASE)


# --- measures -------------------------------------------------------------------------------------------------


def _cube(n=10, lesion=slice(2, 4)):
    mask = np.zeros((n + 2, n + 2, n + 2), dtype=np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    seg = np.zeros_like(mask)
    seg[lesion, 1:-1, 1:-1] = 1  # 2 of the 10 brain planes: 20 % of the brain
    return mask, seg


def test_measure_perfect_map():
    mask, seg = _cube()
    lesioned = np.where(seg > 0, 3.0, 1.0) * mask
    lesioned[0] = 100.0  # outside the brain: ignored
    healthy = np.full(mask.shape, 0.5)
    m = bench.measure(lesioned, healthy, seg, mask)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["ap_percent"] == pytest.approx(100.0)
    assert m["ratio"] == pytest.approx(6.0)
    assert bench.passes(m)


def test_measure_uninformative_and_inverted_maps():
    mask, seg = _cube()
    flat = bench.measure(np.ones(mask.shape), np.ones(mask.shape), seg, mask)
    assert flat["auroc"] == pytest.approx(0.5)
    assert flat["ap_percent"] == pytest.approx(20.0)  # a constant score: AP is the prevalence
    assert flat["ratio"] == pytest.approx(1.0)
    assert not bench.passes(flat)
    inverted = bench.measure(np.where(seg > 0, 0.1, 1.0), np.ones(mask.shape), seg, mask)
    assert inverted["auroc"] == pytest.approx(0.0)
    assert inverted["ratio"] == pytest.approx(0.1)


def test_measure_half_detected_lesion():
    mask, seg = _cube()
    lesioned = np.ones(mask.shape)
    lesioned[2, 1:-1, 1:-1] = 5.0  # one of the two lesion planes stands out, the other looks healthy
    m = bench.measure(lesioned, np.ones(mask.shape), seg, mask)
    # positives: 100 scored above every negative, 100 tied with the 800 negatives -> (100 + 0.5 * 100) / 200
    assert m["auroc"] == pytest.approx(0.75)
    assert m["ratio"] == pytest.approx(3.0)


def test_measure_within_the_field_of_view():
    mask, seg = _cube()
    lesioned = np.where(seg > 0, 3.0, 1.0) * mask
    fov = np.ones(mask.shape, dtype=bool)
    fov[:3] = False  # the first brain plane of the lesion lies outside the scored view: its map is 0 there
    lesioned[~fov] = 0.0
    m = bench.measure(lesioned, np.ones(mask.shape), seg, mask, fov)
    assert m["auroc"] == pytest.approx(1.0) and m["ratio"] == pytest.approx(3.0)
    assert m["lesion_in_fov_percent"] == pytest.approx(50.0)
    # Over the whole brain the unscored lesion plane ties with the 100 unscored healthy voxels at 0, below the
    # other 700: (100 * 800 + 100 * 0.5 * 100) / (200 * 800).
    assert m["auroc_whole_brain"] == pytest.approx((100 * 800 + 100 * 0.5 * 100) / (200 * 800))
    assert bench.measure(lesioned, np.ones(mask.shape), seg, mask)["auroc"] == pytest.approx(m["auroc_whole_brain"])


def test_measure_needs_a_lesion_inside_the_brain():
    mask, _ = _cube()
    with pytest.raises(MhdUadError, match="lesion"):
        bench.measure(np.ones(mask.shape), np.ones(mask.shape), np.zeros_like(mask), mask)


# --- twin rendering (coarse grid) -----------------------------------------------------------------------------


def test_lacunar_stroke_twins_are_identical_outside_the_lesion(coarse_base):
    """A lacunar stroke moves no tissue: lesioned and healthy twin differ only at and next to the lesion."""
    from mhd_uad.data.demo.acquisition import simulate_subject

    for index in range(12):
        lesioned = simulate_subject(coarse_base, "ATLAS_v2", index, 0, contrasts=bench.CONTRASTS, warp=False)
        if lesioned.info["lacunar"]:
            break
    else:
        pytest.fail("no lacunar stroke among the first 12 subjects")
    healthy = simulate_subject(
        coarse_base, "ATLAS_v2", index, 0, contrasts=bench.CONTRASTS, warp=False, lesion=False
    )
    assert healthy.seg is None
    np.testing.assert_array_equal(lesioned.mask, healthy.mask)
    lesion = lesioned.seg > 0
    near = ndi.binary_dilation(lesion, iterations=3)  # the soft lesion edge and its fade: 9 mm
    for c in bench.CONTRASTS:
        diff = np.abs(lesioned.images[c] - healthy.images[c])
        # Only the per-scan p99 normalisation (5-digit rounding) may differ away from the lesion.
        assert diff[~near].max() <= 1e-3, c
        assert diff[lesion].mean() > 0.05, c


# How much more the twins differ inside the lesion than beyond 6 mm of it (mean |lesioned - healthy|, seed 0:
# stroke about 30x, its ex-vacuo ventricle aside; tumour about 4x, as its mass effect moves a whole hemisphere).
@pytest.mark.parametrize(("case", "factor"), [("stroke", 10.0), ("tumour", 2.0)])
def test_render_pair_shares_one_grid_and_differs_at_the_lesion(coarse_base, case, factor):
    pair = bench.render_pair(coarse_base, case, seed=0)
    dataset, (lo, hi) = bench.CASES[case]
    assert pair.dataset == dataset and lo <= pair.lesion_ml <= hi
    voxel_ml = COARSE_MM**3 / 1000.0
    assert pair.lesion_ml == pytest.approx((pair.lesioned.seg > 0).sum() * voxel_ml)
    # Both masks (and the lesion) lie inside the shared crop box; the affine is the box's.
    for scan in (pair.lesioned, pair.healthy):
        assert scan.mask[pair.box].sum() == scan.mask.sum()
    np.testing.assert_allclose(np.diag(pair.affine)[:3], COARSE_MM)
    starts = np.array([s.start for s in pair.box])
    np.testing.assert_allclose(pair.affine[:3, 3], coarse_base.origin_mm + starts * COARSE_MM)
    lesion = pair.lesioned.seg > 0
    brain = (pair.lesioned.mask > 0) & (pair.healthy.mask > 0)
    outside = brain & ~ndi.binary_dilation(lesion, iterations=2)
    for c in bench.CONTRASTS:
        diff = np.abs(pair.lesioned.images[c] - pair.healthy.images[c])
        assert diff[lesion].mean() > factor * diff[outside].mean(), c


def test_write_pair_writes_both_twins_on_one_grid(coarse_base, tmp_path):
    from mhd_uad.io import load_nifti

    pair = bench.render_pair(coarse_base, "stroke", seed=0)
    files = bench.write_pair(pair, tmp_path)
    assert set(files["lesioned"]) == {"t1", "t2", "mask", "seg"} and set(files["healthy"]) == {
        "t1",
        "t2",
        "mask",
    }
    shapes, affines = set(), []
    for twin in files.values():
        for path in twin.values():
            array, affine = load_nifti(path)
            shapes.add(array.shape)
            affines.append(affine)
    assert len(shapes) == 1
    for affine in affines:
        np.testing.assert_allclose(affine, pair.affine)


def test_reconstruction_bias_reads_contrast_shrinkage_on_the_model_grid(coarse_base, tmp_path):
    """A stand-in mean reconstruction that halves contrast about 0.5, written in the scan's space as `score
    --out-reconstruction` writes it: bright voxels (>= 0.9) come back darker by half their distance from 0.5 (at
    least 0.2), dark ones (< 0.3) brighter by at least 0.1; read back on the model grid, the bias is the one
    measured on the grid itself (the grid's voxel centres are voxel centres of the scan)."""
    from mhd_uad.data.geometry import to_source_space
    from mhd_uad.io import save_nifti

    pair = bench.render_pair(coarse_base, "stroke", seed=0)
    files = bench.write_pair(pair, tmp_path)
    scan, mask = files["healthy"]["t1"], files["healthy"]["mask"]
    prepared = bench.prepare_as_score(scan, mask, None, None)  # as the benchmark prepares it
    shrunk = (0.5 + 0.5 * (prepared.image - 0.5)).astype(np.float32)
    reco = save_nifti(bench.reconstruction_file(tmp_path, "t1"),
                      to_source_space(shrunk, prepared.geometry, prepared.source_brain),
                      prepared.geometry.source_affine, dtype=np.float32)
    out = bench.reconstruction_bias(prepared, reco)
    assert -0.25 <= out["bias_bright"] <= -0.2 and 0.1 <= out["bias_dark"] <= 0.25
    image, brain = prepared.image, prepared.mask > 0.5
    diff = shrunk.astype(np.float64) - image
    assert out["bias_bright"] == pytest.approx(diff[brain & (image >= 0.9)].mean(), abs=1e-5)
    assert out["bias_dark"] == pytest.approx(diff[brain & (image < 0.3)].mean(), abs=1e-5)


@pytest.mark.parametrize(("share", "expected"), [(1.0, 1.0), (0.0, 0.0), (0.5, 0.5)])
def test_lesion_restored_is_the_share_of_the_lesions_contrast_the_reconstruction_takes_out(
        coarse_base, tmp_path, share, expected):
    """A stand-in reconstruction of the lesioned scan: the scan with `share` of the way to the healthy twin
    taken inside the lesion (1: the healthy tissue; 0: the lesion as it is), written as `score
    --out-reconstruction` writes it; read back on the model grid, the measure gives that share back."""
    from mhd_uad.data.geometry import to_source_space
    from mhd_uad.io import save_nifti

    pair = bench.render_pair(coarse_base, "tumour", seed=0)
    files = bench.write_pair(pair, tmp_path)
    lesioned = bench.prepare_as_score(files["lesioned"]["t2"], files["lesioned"]["mask"], files["lesioned"]["seg"], None)
    healthy = bench.prepare_as_score(files["healthy"]["t2"], files["healthy"]["mask"], None, None)
    reco = lesioned.image + share * (healthy.image - lesioned.image) * (lesioned.seg > 0)
    path = save_nifti(bench.reconstruction_file(tmp_path, "t2", "lesioned"),
                      to_source_space(reco.astype(np.float32), lesioned.geometry, lesioned.source_brain),
                      lesioned.geometry.source_affine, dtype=np.float32)
    out = bench.lesion_restored(lesioned, healthy, path)
    assert out["lesion_restored"] == pytest.approx(expected, abs=1e-4)
    assert out["lesion_contrast"] > 0.05  # the tumour is brighter than the tissue it replaced on T2
    assert bench.restored_percent(out) == f"{100 * expected:.0f}"
    assert bench.restored_percent({**out, "lesion_contrast": 0.01}) == "–"  # too faint for the ratio


# --- the score command, the report, exit codes ----------------------------------------------------------------


def test_score_command_is_what_the_cli_parses(tmp_path):
    from mhd_uad.cli import build_parser

    ckpts = [tmp_path / "t2/fold0/cddpm.ckpt", tmp_path / "t2/fold1/cddpm.ckpt"]
    cmd = bench.score_command(
        Path("scan.nii.gz"),
        Path("mask.nii.gz"),
        "t2",
        Path("map.nii.gz"),
        ckpts,
        ["mhd.num_reconstructions=3"],
    )
    assert cmd[:3] == [sys.executable, "-m", "mhd_uad.cli"]
    args, extra = build_parser().parse_known_args(cmd[3:])
    assert (args.command, args.scan, args.mask, args.modality, args.out) == (
        "score",
        "scan.nii.gz",
        "mask.nii.gz",
        "t2",
        "map.nii.gz",
    )
    assert args.checkpoint == [str(c) for c in ckpts]
    assert [*args.overrides, *extra] == ["mhd.num_reconstructions=3"]
    assert args.out_reconstruction is None
    default = bench.score_command(Path("s"), Path("m"), "t1", Path("o"))
    assert "--checkpoint" not in default
    healthy = bench.score_command(Path("s"), Path("m"), "t1", Path("o"), reconstruction=Path("r.nii.gz"))
    assert build_parser().parse_known_args(healthy[3:])[0].out_reconstruction == "r.nii.gz"


def _results(auroc=0.95, ratio=3.0):
    contrast = {"auroc": auroc, "ap_percent": 40.0, "ratio": ratio, "pass": auroc >= 0.9 and ratio >= 2,
                "auroc_whole_brain": auroc - 0.05, "lesion_in_fov_percent": 90.0, "bias_bright": -0.125,
                "bias_dark": 0.05, "lesion_restored": 0.4,
                "lesion_contrast": 0.12}
    case = {
        "dataset": "ATLAS_v2",
        "index": 0,
        "lesion_ml": 7.4,
        "contrasts": {"t1": contrast, "t2": contrast},
    }
    return {
        "seed": 0,
        "base": "oasis30",
        "targets": bench.TARGETS,
        "cases": {"stroke": case},
        "seconds": {"render": 1.0, "score": 2.0},
        "all_pass": contrast["pass"],
    }


@pytest.mark.parametrize(("auroc", "check", "code"), [(0.95, True, 0), (0.5, False, 0), (0.5, True, 1)])
def test_exit_code_and_report(monkeypatch, capsys, tmp_path, auroc, check, code):
    results = _results(auroc=auroc)

    def fake(seed, out_dir, work, checkpoint_dir, overrides):
        bench.write_reports(results, out_dir)
        return results

    monkeypatch.setattr(bench, "run_benchmark", fake)
    assert bench.main(["--out-dir", str(tmp_path), *(["--check"] if check else [])]) == code
    out = capsys.readouterr().out
    assert ("| case | contrast | lesion mL | lesion in view % | AUROC | AP % | ratio | AUROC whole brain "
            "| reco − scan, bright / dark | lesion − twin | restored % | result |") in out
    assert "| -0.125 / +0.050 | +0.120 | 40 |" in out
    assert ("FAIL" in out) == (auroc < 0.9)
    assert ("TARGETS FAILED: stroke T1, stroke T2" in out) == (auroc < 0.9)
    assert json.loads((tmp_path / "demo_generalisation.json").read_text())["cases"]["stroke"]["index"] == 0
    from mhd_uad.evaluation.report import markdown_body

    assert markdown_body(tmp_path / "demo_generalisation.md") == bench.markdown(results).strip()


def test_missing_models_is_a_clear_error(tmp_path):
    (tmp_path / "models" / "t1" / "fold0").mkdir(parents=True)
    (tmp_path / "models" / "t1" / "fold0" / "cddpm.ckpt").write_bytes(b"")  # T1 only: T2 is missing
    with pytest.raises(MhdUadError, match=r"no trained T2 model.*train the demo models first \(make demo\)"):
        bench.find_checkpoints(tmp_path / "models")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "demo_generalisation.py"),
            "--checkpoint-dir",
            str(tmp_path / "nothing"),
            "--out-dir",
            str(tmp_path / "reports"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "train the demo models first (make demo)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "reports").exists()


# --- the benchmark itself -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xfail(
    reason="open work: the models make demo trains do not yet reach AUROC >= 0.9 and ratio >= 2 on the "
    "held-out anatomy (README, 'How real the demo data are')",
    strict=False,
)
def test_demo_models_find_lesions_in_the_held_out_anatomy(tmp_path):
    missing = [
        f"models/{m}/fold0/cddpm.ckpt"
        for m in bench.CONTRASTS
        if not (MODELS / m / "fold0" / "cddpm.ckpt").is_file()
    ]
    if missing:
        pytest.skip(f"no trained demo models ({', '.join(missing)} absent): run `make demo` first")
    results = bench.run_benchmark(
        seed=0, out_dir=tmp_path / "reports", work=tmp_path / "work", checkpoint_dir=MODELS
    )
    assert (tmp_path / "reports" / "demo_generalisation.json").is_file()
    assert set(results["cases"]) == {"stroke", "tumour"}
    for case, entry in results["cases"].items():
        for contrast, r in entry["contrasts"].items():
            where = (
                f"{case} {contrast.upper()} ({entry['dataset']} #{entry['index']}, {entry['lesion_ml']} mL)"
            )
            assert r["auroc"] >= bench.TARGETS["auroc"], f"{where}: AUROC {r['auroc']:.3f}"
            assert r["ratio"] >= bench.TARGETS["ratio"], f"{where}: ratio {r['ratio']:.2f}"
