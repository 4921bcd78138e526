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
