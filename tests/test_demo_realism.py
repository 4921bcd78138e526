"""The realism measures (data.demo.realism) on arrays with known answers, and the report script end to end
on one generated subject."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from conftest import load_benchmark
from mhd_uad.data.demo import realism
from mhd_uad.errors import MhdUadError


def _script():
    return load_benchmark("demo_realism")


def _box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(lo, hi) for _ in shape)] = True
    return mask


def test_immerkaer_sigma_recovers_white_noise_on_a_ramp():
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    x = np.arange(40.0)[:, None, None]
    image = 100.0 + 0.5 * x + 2.0 * rng.standard_normal(shape)  # the kernel cancels the ramp
    sigma = realism.immerkaer_sigma(image, _box(shape, 2, 38))
    assert sigma == pytest.approx(2.0, rel=0.05)
    # Only voxels whose whole neighbourhood is in the region count: a bright outside does not leak in.
    image[:2] = 1e4
    assert realism.immerkaer_sigma(image, _box(shape, 2, 38)) == pytest.approx(2.0, rel=0.05)


def test_snr_and_its_1mm_equivalent():
    rng = np.random.default_rng(1)
    shape = (40, 40, 40)
    wm = _box(shape, 4, 36).astype(float)
    image = (1.0 + 0.02 * rng.standard_normal(shape)) * (wm > 0)
    out = realism.measure_noise_and_bias(image, wm, wm > 0, voxel_mm=2.0)
    assert out["snr"] == pytest.approx(50.0, rel=0.1)
    assert out["snr_1mm"] == pytest.approx(50.0 / math.sqrt(8.0), rel=0.1)
    assert out["p90_over_sigma_1mm"] == pytest.approx(1.0 / (0.02 * math.sqrt(8.0)), rel=0.1)


def test_snr_of_noise_averaged_from_1mm_is_converted_back():
    rng = np.random.default_rng(2)
    shape = (64, 64, 64)
    wm = _box(shape, 4, 60).astype(float)
    fine = (1.0 + 0.1 * rng.standard_normal(shape)) * wm  # SNR 10 at 1 mm
    coarse = realism.block_average(fine, 2)
    out = realism.measure_noise_and_bias(coarse, realism.block_average(wm, 2), coarse > 0, voxel_mm=2.0)
    assert out["snr"] == pytest.approx(10.0 * math.sqrt(8.0), rel=0.1)
    assert out["snr_1mm"] == pytest.approx(10.0, rel=0.1)


def test_hf_noise_is_white_noise_times_its_factor_and_ignores_smooth_structure():
    factor = realism.hf_noise_factor()
    assert 0.9 < factor < 1.0  # 1 - 2 g0 + sum g^2 for a 1-voxel 3-D Gaussian, square-rooted
    rng = np.random.default_rng(3)
    shape = (40, 40, 40)
    wm = _box(shape, 4, 36)
    image = np.where(wm, 2.0 + 0.05 * rng.standard_normal(shape), 0.0)
    assert realism.hf_noise(image, wm) == pytest.approx(factor * 0.05 / 2.0, rel=0.1)
    # Bright CSF around the WM: the plain Gaussian lets it leak into the residual, the WM-only one does not.
    with_csf = np.where(wm, image, 6.0)
    assert realism.hf_noise(with_csf, wm) == pytest.approx(factor * 0.05 / 2.0, rel=0.1)
    assert realism.hf_noise(with_csf, wm, within_wm=False) > 2 * factor * 0.05 / 2.0
    x = np.arange(40.0)[:, None, None] * np.ones(shape)
    smooth = 2.0 + 0.2 * np.sin(2 * np.pi * x / 40.0)
    assert realism.hf_noise(smooth, wm) < 2e-3


def test_residual_bias_cv_recovers_a_smooth_multiplicative_field():
    shape = (70, 70, 70)
    voxel = 2.0
    wm = _box(shape, 5, 65)
    x_mm = np.arange(70.0)[:, None, None] * voxel * np.ones(shape)
    field = np.exp(0.1 * np.sin(2 * np.pi * x_mm / 400.0))
    image = 0.8 * field * wm
    inner = realism.eroded(wm)
    truth = field[inner].std() / field[inner].mean()
    cv = realism.residual_bias_cv(image, wm, voxel)
    assert 0.8 * truth < cv < 1.05 * truth
    assert truth > 0.02


def test_residual_bias_cv_is_zero_for_a_flat_wm_with_ragged_edges_and_small_for_noise():
    rng = np.random.default_rng(4)
    shape = (50, 50, 50)
    grid = np.indices(shape).astype(float)
    radius = np.sqrt(((grid - 25.0) ** 2).sum(0))
    wm = radius < 18 + 3 * np.sin(grid[0] / 3.0)  # normalised convolution: the edges do not darken it
    assert realism.residual_bias_cv(np.where(wm, 0.7, 0.0), wm, 2.0) < 1e-9
    noisy = np.where(wm, 0.7 + 0.02 * rng.standard_normal(shape), 0.0)
    assert realism.residual_bias_cv(noisy, wm, 2.0) < 3e-3


def test_tissue_ratios_use_pure_voxels_thresholds_and_exclusion():
    shape = (20, 20, 20)
    pv = {k: np.zeros(shape) for k in ("gm", "wm", "csf", "dgm")}
    image = np.zeros(shape)
    for i, (name, value, fraction) in enumerate(
        (("wm", 1.0, 1.0), ("gm", 0.7, 0.95), ("csf", 0.3, 1.0), ("dgm", 0.85, 0.7))
    ):
        pv[name][5 * i : 5 * i + 4] = fraction
        image[5 * i : 5 * i + 4] = value
    pv["gm"][5:9, :, :2] = 0.8  # mixed voxels below the 0.9 bar do not count
    image[5:9, :, :2] = 5.0
    lesion = np.zeros(shape, dtype=bool)
    lesion[0:4, :, 2:12] = True  # half the WM voxels with a lesion's intensity, left out
    image[lesion] = 9.0
    ratios = realism.tissue_ratios_measured(image, pv, exclude=lesion)
    assert ratios == pytest.approx({"wm": 1.0, "gm": 0.7, "csf": 0.3, "dgm": 0.85})
    # Without the exclusion the WM median is (1 + 9) / 2.
    assert realism.tissue_ratios_measured(image, pv)["gm"] == pytest.approx(0.7 / 5.0)
    pv["dgm"][:] = 0.5  # below deep GM's 0.6: no voxels, NaN
    assert math.isnan(realism.tissue_ratios_measured(image, pv)["dgm"])
    with pytest.raises(MhdUadError, match="one grid"):
        realism.tissue_ratios_measured(image[:10], pv)


def test_block_average_and_window():
    arr = np.arange(5 * 4 * 4, dtype=float).reshape(5, 4, 4)
    out = realism.block_average(arr, 2)
    assert out.shape == (2, 2, 2)
    assert out[0, 0, 0] == pytest.approx(arr[:2, :2, :2].mean())
    with pytest.raises(MhdUadError):
        realism.block_average(np.zeros((1, 4, 4)), 2)
    lo, hi = realism.brain_window(arr, arr > 10)
    assert 10 < lo < hi <= arr.max()


def test_script_rejects_bad_n_without_traceback(capsys):
    script = _script()
    assert script.main(["--n", "0", "--out-dir", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_one_generated_subject_end_to_end(tmp_path):
    from mhd_uad.data.demo.anatomy import load_base_anatomy

    script = _script()
    base = load_base_anatomy(voxel_size=2.0, name="mni152")
    demo, shown = script.measure_demo(base, ("ixi",), 1, 0)
    t1, t2 = demo["ixi"]["t1"][0], demo["ixi"]["t2"][0]
    assert 0.5 < t1["ratios"]["gm"] < 0.95 and t1["ratios"]["csf"] < t1["ratios"]["gm"]
    assert 1.0 < t2["ratios"]["gm"] < t2["ratios"]["csf"]
    for entry in (t1, t2):
        # The generator's noise: WM signal / sigma at 1 mm drawn in U(18, 32).
        assert 15.0 < entry["noise"]["snr_1mm"] < 37.0
        assert entry["noise"]["bias_cv"] < 0.08
    assert t1["noise"]["hf_noise"] < 0.04
    report = script.build_report(0, 1, demo, {})
    markdown = script.render_markdown(report)
    assert "| demo ixi | 1 |" in markdown and "| demo test sets | 0 | — |" in markdown
    assert "model / generator target" in markdown and "nan" not in markdown.lower()

    # A lesion (with its 4 mm margin) is left out of the measures and outlined in the figure.
    scan = shown["ixi"]
    seg = np.zeros_like(scan.mask)
    wm_voxels = np.argwhere(realism.eroded(scan.tissue[1] > 0.9))
    centre = tuple(int(c) for c in wm_voxels[len(wm_voxels) // 2])
    seg[tuple(slice(c - 3, c + 3) for c in centre)] = 1
    lesioned = dataclasses.replace(scan, seg=seg)
    assert script.measure_scan(lesioned, "t1")["noise"]["n_wm_eroded"] < t1["noise"]["n_wm_eroded"]
    # The figure, with the demo subject standing in for the real templates (no template loading here).
    pv = {k: scan.tissue[i] for i, k in enumerate(("gm", "wm", "csf"))}
    refs = [
        script.Reference(
            name, "t2" if name == "avg152T2" else "t1", scan.images["t1"], pv, scan.mask > 0, 2.0
        )
        for name in script.FIGURE_REFERENCES
    ]
    png = tmp_path / "figures" / "demo_realism.png"
    script.write_figure(png, {name: lesioned for name, _ in script.FIGURE_DEMO}, refs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["demo_realism.png"]  # no temporary file left
