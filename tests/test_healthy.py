"""The field's other metric conventions: thresholds at a healthy voxel FPR (the score-healthy stage and its
file), Dice at them, the per-volume oracle Dice and AUPRC/AUROC pooled over a set (fast: no model)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mhd_uad.errors import InputFileError
from mhd_uad.evaluation import healthy
from mhd_uad.evaluation.evaluate import ScorerFold, other_conventions, volume_conventions
from mhd_uad.evaluation.healthy import (
    FPR_LEVELS,
    fidelity_path,
    fpr_thresholds,
    read_thresholds,
    thresholds_path,
    write_thresholds,
)
from mhd_uad.evaluation.metrics import ScoreCounts, threshold_at_fpr
from mhd_uad.scoring.anomaly_maps import CONNECTED_COMPONENT_SCORERS

SCORERS = ("mhd", "single")


def test_fpr_thresholds_of_healthy_scores_0_to_99_flag_1_5_and_10_of_them():
    scores = np.arange(100, dtype=np.float32)
    t = fpr_thresholds({"mhd": scores})["mhd"]
    # the (1 − r) quantile, linear interpolation: 0.99·99, 0.95·99, 0.90·99
    assert t == pytest.approx({"fpr01": 98.01, "fpr05": 94.05, "fpr10": 89.1})
    assert [int(np.sum(scores > t[k])) for k in FPR_LEVELS] == [1, 5, 10]


def _lesioned_volume():
    """One slice of 4 × 5 voxels: lesion scores 99, 96, 92, 50; background 97, 91 and 15 voxels at 10."""
    amap = np.full((1, 4, 5), 10.0, dtype=np.float32)
    truth = np.zeros(amap.shape, dtype=bool)
    for (y, x), v in zip([(0, 0), (0, 1), (0, 2), (0, 3)], [99, 96, 92, 50], strict=True):
        amap[0, y, x], truth[0, y, x] = v, True
    amap[0, 3, 3], amap[0, 3, 4] = 97, 91
    return amap, truth


def test_dice_at_the_healthy_fpr_thresholds_on_a_tiny_lesioned_volume():
    amap, truth = _lesioned_volume()
    r = ScorerFold(fpr_thresholds=fpr_thresholds({"mhd": np.arange(100.0)})["mhd"])
    volume_conventions(r, "mhd", amap, None, truth, ScoreCounts(), steps=10)
    # > 98.01: {99} -> 2·1/(1+4); > 94.05: {99, 96, 97} -> 2·2/(3+4); > 89.1: {99, 96, 92, 97, 91} -> 2·3/(5+4)
    assert r.dice_fpr["fpr01"] == [pytest.approx(2 / 5)]
    assert r.dice_fpr["fpr05"] == [pytest.approx(4 / 7)]
    assert r.dice_fpr["fpr10"] == [pytest.approx(2 / 3)]


def test_dice_at_an_fpr_threshold_filters_components_as_the_val_dice_does():
    cc = next(iter(CONNECTED_COMPONENT_SCORERS))
    amap = np.zeros((3, 6, 6), dtype=np.float32)
    amap[0:2, 0:2, 0:2] = 1.0  # 8 voxels: kept
    amap[2, 5, 5] = 1.0  # 1 voxel: removed
    truth = amap > 0
    for scorer, expected in ((cc, 2 * 8 / (8 + 9)), ("mhd", 1.0)):
        r = ScorerFold(fpr_thresholds={"fpr05": 0.5})
        volume_conventions(r, scorer, amap, None, truth, ScoreCounts(), steps=10)
        assert r.dice_fpr["fpr05"] == [pytest.approx(expected)]


def test_oracle_dice_is_the_interval_search_on_the_volume_alone_and_nan_without_lesion():
    amap = np.zeros((1, 3, 4), dtype=np.float32)
    truth = np.zeros(amap.shape, dtype=bool)
    amap[0, 0, :] = 0.8  # 4 lesion voxels at 0.8
    truth[0, 0, :] = True
    amap[0, 1, 0] = 0.8  # a background voxel tied with them: no threshold separates it
    r = ScorerFold()
    volume_conventions(r, "mhd", amap, None, truth, ScoreCounts(), steps=10)
    volume_conventions(r, "mhd", amap, None, np.zeros_like(truth), ScoreCounts(), steps=10)
    assert r.dice_oracle[0] == pytest.approx(2 * 4 / (5 + 4)) and math.isnan(r.dice_oracle[1])
    # the lesion scored apart from the background: the search finds a perfect threshold
    amap[0, 1, 0] = 0.3
    volume_conventions(r, "mhd", amap, None, truth, ScoreCounts(), steps=10)
    assert r.dice_oracle[2] == 1.0


def test_pooled_counts_take_the_voxels_that_count_and_match_sklearn():
    rng = np.random.default_rng(3)
    counts, r, kept_scores, kept_truth = ScoreCounts(), ScorerFold(), [], []
    for _ in range(3):
        amap = rng.random((2, 5, 6)).astype(np.float32)
        seg = (rng.random(amap.shape) < 0.2).astype(np.uint8) * rng.integers(1, 3, amap.shape).astype(np.uint8)
        mask = np.zeros(amap.shape, dtype=np.float32)
        mask[:, 1:4, 1:5] = 0.7
        valid = seg != 2  # label 2 ignored, as `ignore_labels`
        truth = (seg > 0)[valid]
        volume_conventions(r, "mhd", amap, valid, truth, counts, steps=10)
        kept = valid  # the whole grid but the ignored labels, as the per-volume metrics count
        kept_scores.append(amap[kept])
        kept_truth.append(seg[kept] > 0)
    s, g = np.concatenate(kept_scores), np.concatenate(kept_truth)
    assert counts.auprc() == pytest.approx(average_precision_score(g, s), rel=1e-12)
    assert counts.auroc() == pytest.approx(roc_auc_score(g, s), rel=1e-12)


def test_other_conventions_average_volumes_then_folds():
    def fold(pooled, oracle, fpr05):
        return {"mhd": ScorerFold(dice_oracle=oracle, dice_fpr={"fpr01": [0.1], "fpr05": fpr05, "fpr10": [0.3]},
                                  auprc_pooled=pooled, auroc_pooled=pooled + 0.5)}

    block = other_conventions([fold(0.2, [0.5, 0.7, float("nan")], [0.2, 0.4]), fold(0.4, [0.9], [0.6])],
                              ("mhd",))["mhd"]
    assert block == pytest.approx({"auprc_pooled": 0.3, "auroc_pooled": 0.8, "dice_oracle": (0.6 + 0.9) / 2,
                                   "dice_fpr01": 0.1, "dice_fpr05": (0.3 + 0.6) / 2, "dice_fpr10": 0.3})


# ---------------------------------------------------------------- the thresholds file


def _payload(**changes):
    payload = {"modality": "t2", "fold": 0, "n_scans": 3, "n_voxels": 300, "scans": ["a", "b", "c"],
               "fpr": dict(FPR_LEVELS), "thresholds": {s: {"fpr01": 0.9, "fpr05": 0.5, "fpr10": 0.3} for s in SCORERS}}
    payload.update(changes)
    return payload


def test_thresholds_file_round_trip_and_path(tmp_path):
    path = thresholds_path(tmp_path, "t2", 0)
    assert path == tmp_path / "artifacts" / "healthy" / "t2" / "fold0" / "thresholds.json"
    write_thresholds(path, _payload())
    assert read_thresholds(path, SCORERS, "t2", 0) == {s: {"fpr01": 0.9, "fpr05": 0.5, "fpr10": 0.3} for s in SCORERS}
    assert set(read_thresholds(path, ("mhd",))) == {"mhd"}


def test_thresholds_file_is_written_atomically(tmp_path, monkeypatch):
    path = thresholds_path(tmp_path, "t2", 0)
    write_thresholds(path, _payload())
    before = path.read_bytes()

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("mhd_uad.io.os.replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        write_thresholds(path, _payload(n_scans=4))
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["thresholds.json"]


def test_a_missing_thresholds_file_names_the_stage_to_run(tmp_path):
    with pytest.raises(InputFileError, match=r"not found \(run the stage: `dvc repro score-healthy@t1-2`\)"):
        read_thresholds(thresholds_path(tmp_path, "t1", 2), SCORERS, "t1", 2)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "unreadable"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps(_payload(modality="t1")), "modality 't1', not 't2'"),
    (json.dumps(_payload(fold=1)), "fold 1, not 0"),
    (json.dumps(_payload(fpr={"fpr05": 0.05})), "`fpr`"),
    (json.dumps(_payload(n_scans=0)), "n_scans"),
    (json.dumps(_payload(thresholds={"mhd": {"fpr01": 1, "fpr05": 0.5, "fpr10": 0.1}})), "scorer 'single'"),
    (json.dumps(_payload(thresholds={s: {"fpr01": 1, "fpr05": float("nan"), "fpr10": 0} for s in SCORERS})),
     r"thresholds.mhd.fpr05 is nan"),
    (json.dumps(_payload(thresholds={s: {"fpr01": 1, "fpr05": "0.5", "fpr10": 0} for s in SCORERS})),
     "expected a finite number"),
])
def test_a_malformed_thresholds_file_is_rejected_clearly(tmp_path, text, message):
    path = thresholds_path(tmp_path, "t2", 0)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(InputFileError, match=message) as info:
        read_thresholds(path, SCORERS, "t2", 0)
    assert str(path) in str(info.value) and "dvc repro score-healthy@t2-0" in str(info.value)


# ---------------------------------------------------------------- the stage, with a stand-in model


def test_healthy_scans_are_the_folds_ixi_val_scans_each_once(monkeypatch):
    seen = {}
    ps = SimpleNamespace(positions=lambda frame, source: [2, 0, 2, 1])  # a scan listed twice, as published lists
    monkeypatch.setattr(healthy.PreparedSet, "open", lambda folder: seen.setdefault("prepared", folder) and ps)
    monkeypatch.setattr(healthy, "read_split_csv", lambda path, data, modality: seen.update(csv=path, mod=modality))
    params = SimpleNamespace(paths=SimpleNamespace(artifacts="arts", data="data"))
    assert healthy.healthy_scans(params, "t1", 3) == (ps, [2, 0, 1])
    assert (str(seen["prepared"]), str(seen["csv"]), seen["mod"]) == \
        ("arts/prepared/IXI_t1", "arts/splits/IXI_val_fold3.csv", "t1")


def test_score_healthy_scores_the_val_scans_and_writes_every_scorers_thresholds(tmp_path, monkeypatch,
                                                                                     demo_params):
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 2, 6, 6), dtype=np.float32)
    masks[:, :, 1:5, 1:5] = 0.5
    ps = SimpleNamespace(images=rng.random(masks.shape).astype(np.float32), masks=masks,
                         names=["h0", "h1", "h2"], folder=tmp_path)
    monkeypatch.setattr(healthy, "healthy_scans", lambda params, modality, fold: (ps, [2, 0]))
    monkeypatch.setattr(healthy, "load_cddpm", lambda params, path, modality: (SimpleNamespace(to=lambda d: None), {}))
    monkeypatch.setattr(healthy, "log_evaluation", lambda *args: None)
    scored = []

    def fake_device(model, image, mask, settings, scan, device):
        scored.append(scan)
        return None

    def fake_maps(image, mask, made, settings):  # a mean reconstruction that keeps 0.8 of the contrast
        return {s: image * (k + 1) * (mask > 0) for k, s in enumerate(settings.scorers)}, 0.8 * image + 0.1

    monkeypatch.setattr(healthy, "device_part", fake_device)
    monkeypatch.setattr(healthy, "cpu_part", fake_maps)
    out = healthy.run_score_healthy(demo_params, "t2", 1, tmp_path)
    assert out == thresholds_path(tmp_path, "t2", 1) and scored == ["h2", "h0"]
    data = json.loads(out.read_text())
    brain = np.concatenate([ps.images[p][masks[p] > 0] for p in (2, 0)])
    assert (data["modality"], data["fold"], data["n_scans"], data["n_voxels"], data["scans"]) == \
        ("t2", 1, 2, brain.size, ["h2", "h0"])
    scorers = tuple(demo_params.evaluate.scorers)
    assert set(data["thresholds"]) == set(scorers)
    for k, s in enumerate(scorers):
        expected = threshold_at_fpr(brain * (k + 1), list(FPR_LEVELS.values()))
        assert [data["thresholds"][s][key] for key in FPR_LEVELS] == pytest.approx(list(expected))
    assert read_thresholds(out, scorers, "t2", 1)["mhd"] == data["thresholds"]["mhd"]
    # the same pass wrote the in-distribution fidelity of the mean reconstruction, pooled and per scan
    fidelity = json.loads(fidelity_path(tmp_path, "t2", 1).read_text())
    assert (fidelity["modality"], fidelity["fold"], fidelity["n_scans"], list(fidelity["per_scan"])) == \
        ("t2", 1, 2, ["h2", "h0"])
    pooled = fidelity["reconstruction"]
    assert pooled["contrast"] == pytest.approx(0.8) and pooled["n_voxels"] == brain.size
    assert pooled["brain_l1"] == pytest.approx(np.abs(-0.2 * brain + 0.1).mean())
    assert pooled["bias_dark"] == pytest.approx((-0.2 * brain[brain < 0.3] + 0.1).mean())
    assert fidelity["per_scan"]["h0"]["brain_l1"] == pytest.approx(np.abs(-0.2 * ps.images[0][masks[0] > 0] + 0.1).mean())
