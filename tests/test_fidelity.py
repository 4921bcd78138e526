"""scoring.fidelity: how faithfully a mean reconstruction keeps a healthy scan (figures that could fail)."""

import json

import numpy as np
import pytest

from mhd_uad.errors import MhdUadError
from mhd_uad.io import json_safe
from mhd_uad.scoring.fidelity import BRIGHT, DARK, FidelitySums, fidelity_sums, reconstruction_fidelity


def _scan(seed=0, shape=(4, 16, 16)):
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    mask = np.zeros(shape, dtype=np.float32)
    mask[:, 2:14, 2:14] = 1.0
    return image, mask


def test_a_perfect_reconstruction_has_no_error_and_keeps_all_contrast():
    image, mask = _scan()
    f = reconstruction_fidelity(image, image, mask)
    assert (f["brain_l1"], f["bias_bright"], f["bias_dark"]) == (0.0, 0.0, 0.0)
    assert f["contrast"] == pytest.approx(1.0) and f["n_voxels"] == int(mask.sum())


def test_contrast_pulled_to_the_mean_shows_as_bright_negative_dark_positive_and_a_slope_below_one():
    image, mask = _scan(1)
    brain = image[mask > 0].astype(np.float64)
    centre = brain.mean()
    reco = centre + 0.75 * (image - centre) + np.where(mask > 0, 0.0, 5.0)  # outside the brain: ignored
    f = reconstruction_fidelity(image, reco, mask)
    assert f["contrast"] == pytest.approx(0.75, abs=1e-6)
    bright, dark = brain[brain >= BRIGHT], brain[brain < DARK]
    assert f["bias_bright"] == pytest.approx(np.mean(-0.25 * (bright - centre)), abs=1e-6) and f["bias_bright"] < 0
    assert f["bias_dark"] == pytest.approx(np.mean(-0.25 * (dark - centre)), abs=1e-6) and f["bias_dark"] > 0
    assert f["brain_l1"] == pytest.approx(np.mean(np.abs(0.25 * (brain - centre))), abs=1e-6)
    assert f["bright_share"] == pytest.approx(bright.size / brain.size)


def test_sums_pool_scans_exactly_as_their_voxels_taken_together():
    (a, ma), (b, mb) = _scan(2), _scan(3, shape=(3, 16, 16))
    ra, rb = 0.9 * a + 0.05, a[:3] * 0.0 + 0.5 * b
    pooled = (fidelity_sums(a, ra, ma) + fidelity_sums(b, rb, mb)).summary()
    together = reconstruction_fidelity(np.concatenate([a, b]), np.concatenate([ra, rb]), np.concatenate([ma, mb]))
    assert pooled.keys() == together.keys()
    for key, value in together.items():
        assert pooled[key] == pytest.approx(value, rel=1e-12), key
    s = fidelity_sums(a, ra, ma)
    assert FidelitySums.from_array(s.to_array()) == s


def test_no_bright_voxel_gives_null_in_the_json_not_a_crash():
    image, mask = _scan(4)
    image = 0.5 * image  # nothing >= 0.9
    f = reconstruction_fidelity(image, image, mask)
    assert np.isnan(f["bias_bright"]) and json.loads(json.dumps(json_safe(f)))["bias_bright"] is None
    assert np.isnan(FidelitySums().summary()["contrast"])


@pytest.mark.parametrize("case, message", [("shape", "does not match the scan"), ("mask", "mask"),
                                           ("nan", "not finite")])
def test_bad_inputs_are_refused_clearly(case, message):
    image, mask = _scan(5)
    reco = image.copy()
    if case == "shape":
        reco = reco[:-1]
    elif case == "mask":
        mask = mask[:-1]
    else:
        reco[1, 5, 5] = np.nan
    with pytest.raises(MhdUadError, match=message):
        fidelity_sums(image, reco, mask)


def test_the_report_tables_each_models_fidelity_as_the_mean_over_its_folds(tmp_path):
    from mhd_uad.errors import InputFileError
    from mhd_uad.evaluation.report import fidelity_markdown, load_fidelity

    folder = tmp_path / "healthy"
    folder.mkdir()
    for fold, (l1, bright) in enumerate([(0.04, -0.10), (0.06, None)]):
        (folder / f"t2_fold{fold}.json").write_text(json.dumps({
            "modality": "t2", "fold": fold, "n_scans": 3,
            "reconstruction": {"brain_l1": l1, "bias_bright": bright, "bias_dark": 0.01, "contrast": 0.9}}))
    fidelity = load_fidelity(tmp_path)
    assert list(fidelity) == ["t2"] and [f["fold"] for f in fidelity["t2"]] == [0, 1]
    row = fidelity_markdown(fidelity)[-1]
    assert row == "| IXI T2 | 2 | 6 | 0.0500 | -0.100 | +0.010 | 0.90 |"  # a null figure leaves its fold out
    assert load_fidelity(tmp_path / "absent") == {} and fidelity_markdown({}) == []
    (folder / "t1_fold0.json").write_text("{}")
    with pytest.raises(InputFileError, match="reconstruction"):
        load_fidelity(tmp_path)
