"""`mhd-uad report --base REV` on a scratch git repository with two commits."""

import json
import subprocess
import sys

import pytest

from mhd_uad.errors import MhdUadError
from mhd_uad.evaluation.compare import MARKER, build_report, regressions


def _block(auprc, dice=0.3, auroc=0.9, n=10):
    return {"auprc": auprc, "auprc_std": 0.01, "auroc": auroc, "dice": dice, "dice_std": 0.02, "n_volumes": n}


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _write(repo, metrics: dict, params: str):
    (repo / "metrics").mkdir(exist_ok=True)
    for p in (repo / "metrics").glob("*.json"):
        p.unlink()
    for name, blocks in metrics.items():
        (repo / "metrics" / f"{name}.json").write_text(json.dumps(blocks))
    (repo / "metrics" / "summary.json").write_text("{}")
    (repo / "params.yaml").write_text(params)


@pytest.fixture()
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.org")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "README.md").write_text("x")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "no metrics yet")
    _write(tmp_path, {"Brats21": {"mhd": _block(0.50), "single": _block(0.40)},
                      "MSLUB": {"mhd": _block(0.10), "single": _block(0.08)},
                      "WMH": {"mhd": _block(0.05)}}, "mhd:\n  ridge: 0.01\n  num_reconstructions: 10\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "base metrics")
    # the workspace: Brats21 up, MSLUB unchanged, WMH removed, ATLAS_v2 added, a param changed
    _write(tmp_path, {"Brats21": {"mhd": _block(0.55), "single": _block(0.40)},
                      "MSLUB": {"mhd": _block(0.10), "single": _block(0.08)},
                      "ATLAS_v2": {"mhd": _block(0.07)}}, "mhd:\n  ridge: 0.1\n  num_reconstructions: 10\n")
    return tmp_path


def test_changed_unchanged_added_and_removed_datasets(repo):
    text, result = build_report("HEAD", repo)
    assert text.startswith(MARKER)
    brats = result["datasets"]["Brats21"]["mhd"]
    assert brats["change"] == "up" and brats["auprc"]["delta"] == pytest.approx(0.05)
    assert brats["auprc"]["relative"] == pytest.approx(0.1)
    assert result["datasets"]["MSLUB"]["mhd"]["change"] == "same"
    assert result["added"] == ["ATLAS_v2"] and result["removed"] == ["WMH"]
    assert "50.00 → 55.00 ▲" in text and "+10.0%" in text
    assert "Datasets added: `ATLAS_v2`" in text and "Datasets removed: `WMH`" in text
    assert "| `mhd.ridge` | 0.01 | 0.1 |" in text and "Params changed (1)" in text
    assert "summary" not in result["datasets"]


def test_a_regression_is_marked_and_fails_on_request(repo):
    _write(repo, {"Brats21": {"mhd": _block(0.45), "single": _block(0.40)}}, "mhd:\n  ridge: 0.01\n")
    text, result = build_report("HEAD", repo)
    assert "50.00 → 45.00 ▼" in text
    assert regressions(result, 0.01) == ["Brats21/mhd: AUPRC -5.00 points"]
    assert regressions(result, 0.1) == []
    cli = subprocess.run([sys.executable, "-m", "mhd_uad.cli", "report", "--base", "HEAD", "--format", "json",
                          "--fail-on-regression", "0.01"], cwd=repo, capture_output=True, text=True)
    assert cli.returncode == 2 and "AUPRC regressed" in cli.stderr
    assert json.loads(cli.stdout)["datasets"]["Brats21"]["mhd"]["change"] == "down"


def test_unchanged_workspace_reports_no_change(repo):
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "new")
    text, result = build_report("HEAD", repo)
    assert all(r["change"] == "same" for rows in result["datasets"].values() for r in rows.values())
    assert " ▲ |" not in text and " ▼ |" not in text and "No params changed." in text


def test_a_base_without_metrics_and_an_unknown_revision(repo):
    text, result = build_report("HEAD~1", repo)
    assert not result["base_has_metrics"] and "has no metrics" in text
    assert result["datasets"]["Brats21"]["mhd"]["auprc"]["base"] is None
    with pytest.raises(MhdUadError, match="unknown git revision"):
        build_report("no-such-rev", repo)


def _write_per_volume(repo, name: str, columns: dict[str, list[float]]):
    """metrics/<name>_per_volume.csv with one fold; the scans are scan00, scan01, ..."""
    n = len(next(iter(columns.values())))
    header = ["fold", "scan", "lesion_voxels", *(f"{s}_auprc" for s in columns)]
    rows = [",".join(header)] + [",".join(["0", f"scan{i:02d}", "100", *(f"{columns[s][i]:.6g}" for s in columns)])
                                 for i in range(n)]
    (repo / "metrics" / f"{name}_per_volume.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture()
def paired_repo(tmp_path):
    """Base commit with Brats21 metrics and per-volume CSV (12 scans); the workspace moves mhd's mean by +5
    points with a noisy per-volume change (interval holds 0) and single's by +5 points on every scan."""
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.org")
    _git(tmp_path, "config", "user.name", "t")
    mhd = [0.3 + 0.01 * i for i in range(12)]
    single = [0.2 + 0.01 * i for i in range(12)]
    _write(tmp_path, {"Brats21": {"mhd": _block(0.355), "single": _block(0.255)}}, "a: 1\n")
    _write_per_volume(tmp_path, "Brats21", {"mhd": mhd, "single": single})
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "base")
    noisy = [0.35 if i % 2 else -0.25 for i in range(12)]  # mean +0.05, half the scans down
    _write(tmp_path, {"Brats21": {"mhd": _block(0.405), "single": _block(0.305)}}, "a: 1\n")
    _write_per_volume(tmp_path, "Brats21", {"mhd": [m + d for m, d in zip(mhd, noisy, strict=True)],
                                            "single": [s + 0.05 + 0.001 * (i % 3) for i, s in enumerate(single)]})
    return tmp_path


def test_arrows_need_the_interval_of_the_change_to_exclude_zero(paired_repo):
    text, result = build_report("HEAD", paired_repo)
    mhd, single = (result["datasets"]["Brats21"][s] for s in ("mhd", "single"))
    assert mhd["auprc"]["delta"] == pytest.approx(0.05) and mhd["change"] == "same"  # the mean moved, no arrow
    lo, hi = mhd["auprc"]["interval"]["ci95"]
    assert lo < 0 < hi and mhd["auprc"]["interval"]["n_scans"] == 12
    assert single["change"] == "up" and single["auprc"]["interval"]["ci95"][0] > 0.04
    assert single["auprc"]["interval"]["excludes_zero"]
    assert "35.50 → 40.50 |" in text and "25.50 → 30.50 ▲" in text
    assert "| +5.00 [+" in text and "No interval" not in text and result["no_interval"] == {}
    json.loads(build_report("HEAD", paired_repo, fmt="json")[0])


def test_a_drop_counts_as_a_regression_only_when_its_interval_lies_below_zero(paired_repo):
    _git(paired_repo, "add", "-A")
    _git(paired_repo, "commit", "-qm", "up")
    mhd = [0.3 + 0.01 * i + (0.35 if i % 2 else -0.25) for i in range(12)]  # the committed workspace's
    single = [0.25 + 0.01 * i + 0.001 * (i % 3) for i in range(12)]
    _write(paired_repo, {"Brats21": {"mhd": _block(0.355), "single": _block(0.255)}}, "a: 1\n")
    _write_per_volume(paired_repo, "Brats21", {"mhd": [m + (-0.35 if i % 2 else 0.25) for i, m in enumerate(mhd)],
                                               "single": [s - 0.05 for s in single]})
    text, result = build_report("HEAD", paired_repo)
    assert result["datasets"]["Brats21"]["mhd"]["change"] == "same" and "40.50 → 35.50 |" in text
    assert result["datasets"]["Brats21"]["single"]["change"] == "down" and "30.50 → 25.50 ▼" in text
    assert regressions(result, 0.01) == ["Brats21/single: AUPRC -5.00 points"]  # mhd's drop: interval holds 0


def test_without_the_base_per_volume_csv_the_tolerance_alone_marks_changes(repo):
    _write_per_volume(repo, "Brats21", {"mhd": [0.5] * 4, "single": [0.4] * 4})
    text, result = build_report("HEAD", repo)
    assert result["no_interval"] == {"Brats21": "no per-volume CSV at the base", "MSLUB": "no per-volume CSV at "
                                     "the base"}
    assert result["datasets"]["Brats21"]["mhd"]["change"] == "up" and "50.00 → 55.00 ▲" in text
    assert result["datasets"]["Brats21"]["mhd"]["auprc"]["interval"] is None
    assert "No interval for `Brats21` (no per-volume CSV at the base)" in text and "| +5.00 |" in text


def test_the_comment_gives_this_changes_mhd_deltas_with_interval_and_p(repo):
    versus = {"delta_auprc": 0.031, "ci95": [0.012, 0.05], "p_value": 0.004, "n_scans": 11}
    _write(repo, {"Brats21": {"mhd": _block(0.55), "single": {**_block(0.40), "versus_mhd": versus}}}, "a: 1\n")
    text, _ = build_report("HEAD", repo)
    assert "MHD − baseline, AUPRC [95 % CI], this change: single reconstruction +3.1 [+1.2, +5.0] pp, p = 0.004" \
        in text


def test_the_report_sets_each_models_fidelity_on_healthy_scans_beside_the_base(repo):
    healthy = repo / "metrics" / "healthy"
    healthy.mkdir()

    def fidelity(name, l1, bright, contrast):
        (healthy / f"{name}.json").write_text(json.dumps({"modality": name[:2], "fold": 0, "reconstruction": {
            "brain_l1": l1, "bias_bright": bright, "bias_dark": 0.01, "contrast": contrast}}))

    fidelity("t2_fold0", 0.075, -0.188, 0.70)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "fidelity at the base")
    fidelity("t2_fold0", 0.045, -0.084, 0.88)
    fidelity("t1_fold0", 0.053, None, 0.92)  # new in this change, with a figure that had no voxels (null)
    text, result = build_report("HEAD", repo)
    t2 = result["fidelity"]["t2_fold0"]
    assert t2["brain_l1"]["delta"] == pytest.approx(-0.030) and t2["contrast"]["delta"] == pytest.approx(0.18)
    assert result["fidelity"]["t1_fold0"]["brain_l1"] == {"base": None, "new": 0.053, "delta": None}
    assert "### Reconstruction fidelity on the healthy val scans" in text
    assert "| t2_fold0 | 0.0750 → 0.0450 (-0.0300) | -0.188 → -0.084 (+0.104) |" in text
    assert "| t1_fold0 | – → 0.0530 | – → – |" in text


def test_a_report_without_fidelity_files_has_no_such_section(repo):
    text, result = build_report("HEAD", repo)
    assert result["fidelity"] == {} and "Reconstruction fidelity" not in text


def test_a_fidelity_file_without_its_figures_is_named(repo):
    healthy = repo / "metrics" / "healthy"
    healthy.mkdir()
    (healthy / "t2_fold0.json").write_text(json.dumps({"modality": "t2"}))
    with pytest.raises(MhdUadError, match=r"metrics/healthy/t2_fold0.json at the workspace has no `reconstruction`"):
        build_report("HEAD", repo)
