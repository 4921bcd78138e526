"""End to end: the whole `dvc repro` on a reduced demo, in a scratch copy of the repository.

Proves every stage still connects (data -> splits -> prepare -> pretrain -> train -> evaluate -> report),
that `dvc status` is clean and dvc.lock current afterwards, that an MHD param change re-runs only the
evaluation under `dvc exp run`, that `mhd-uad report --base` sees the change, and that data, models and
metrics survive a push/pull round trip through a local DVC remote into a fresh clone.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHRUNK

pytestmark = pytest.mark.slow

REDUCED = [*SHRUNK, "splits.num_folds=1"]
DATASETS = ("Brats21", "MSLUB", "ATLAS_v2", "WMH")


def _env(repo: Path) -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=repo, env=_env(repo), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args, check=check)


def mhd(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "mhd_uad.cli", *args, check=check)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in filter(None, tracked.stdout.split("\0")):
        src = REPO / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    for generated in ("metrics", "plots", "reports", "dvc.lock"):
        path = root / generated
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run(root, "git", "init", "-q")
    mhd(root, "params", *REDUCED)
    mhd(root, "demo-data", "--out", "data", "--seed", "5", "--n-healthy", "8", "--n-per-test-set", "3",
        "--voxel-size", "3", "--quiet")
    dvc(root, "add", "-q", "data")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "reduced demo")
    repro = dvc(root, "repro")
    assert "Running stage 'evaluate@WMH'" in repro.stdout
    return root


def test_repro_runs_every_stage_and_leaves_dvc_status_clean(repo):
    for dataset in DATASETS:
        metrics = json.loads((repo / "metrics" / f"{dataset}.json").read_text())
        for scorer in ("mhd", "single", "mean", "dmhd", "nocov", "l1_mean_postproc", "cddpm"):
            assert 0.0 <= metrics[scorer]["auprc"] <= 1.0, (dataset, scorer)
            assert 0.0 <= metrics[scorer]["auprc_pooled"] <= 1.0 and 0.0 <= metrics[scorer]["dice_oracle"] <= 1.0
            assert {"auroc_pooled", "dice_fpr01", "dice_fpr05", "dice_fpr10"} <= set(metrics[scorer])
        assert (repo / "plots" / dataset / "pr_mhd.csv").is_file()
        assert any((repo / "artifacts" / "maps" / dataset).glob("*_mhd.nii.gz"))
    summary = (repo / "reports" / "summary.md").read_text()
    assert "| MHD (full covariance) |" in summary and "WMH" in summary
    assert json.loads(dvc(repo, "status", "--json").stdout or "{}") == {}
    assert "matches" in mhd(repo, "check-lock").stderr
    db = sqlite3.connect(repo / "mlflow.db")
    names = {n for (n,) in db.execute("select name from runs where status = 'FINISHED'")}
    assert {"pretrain@t1", "pretrain@t2", "train@t1-fold0", "train@t2-fold0", "score-healthy@t2-0",
            "evaluate@WMH"} <= names
    assert (repo / "artifacts" / "healthy" / "t1" / "fold0" / "thresholds.json").is_file()


def test_experiment_with_an_mhd_param_reruns_only_evaluation_and_report_sees_it(repo):
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline outputs")
    # the scratch repo composes params from conf/ + REDUCED; pass them again so only N changes
    args = [a for r in REDUCED for a in ("-S", r)]
    out = dvc(repo, "exp", "run", "-n", "n4", *args, "-S", "mhd.num_reconstructions=4")
    assert "Running stage 'evaluate@Brats21'" in out.stdout
    assert "Running stage 'train@" not in out.stdout and "Running stage 'prepare'" not in out.stdout
    shown = dvc(repo, "exp", "show", "--md", "--only-changed").stdout
    assert "n4" in shown and "mhd.num_reconstructions" in shown
    report = mhd(repo, "report", "--base", "HEAD").stdout
    assert "mhd-uad-metrics-report" in report and "| `mhd.num_reconstructions` | 3 | 4 |" in report
    for dataset in DATASETS:
        assert f"### {dataset}" in report
    run(repo, "git", "checkout", "-q", "--", ".")
    dvc(repo, "checkout", "-q")


def _status_after_touching(repo: Path, rel: str) -> set[str]:
    path = repo / rel
    original = path.read_text()
    path.write_text(original + "\n# touched\n")
    try:
        return set(json.loads(dvc(repo, "status", "--json").stdout or "{}"))
    finally:
        path.write_text(original)


def test_touching_inference_code_reruns_only_evaluation_and_the_score_command_reruns_nothing(repo):
    assert _status_after_touching(repo, "src/mhd_uad/models/inference.py") == (
        {f"evaluate@{d}" for d in DATASETS} | {f"score-healthy@{m}-0" for m in ("t1", "t2")})
    # the healthy thresholds are scored once per modality and fold: evaluation code alone re-runs no scoring of them
    assert _status_after_touching(repo, "src/mhd_uad/evaluation/evaluate.py") == {f"evaluate@{d}" for d in DATASETS}
    assert _status_after_touching(repo, "src/mhd_uad/evaluation/score.py") == set()
    changed = _status_after_touching(repo, "src/mhd_uad/models/unet.py")
    assert {"train@t1-0", "evaluate@WMH"} <= changed and "prepare" not in changed


def test_a_param_change_without_repro_makes_check_lock_fail(repo):
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("ridge: 0.01", "ridge: 0.1"))
    try:
        stale = mhd(repo, "check-lock", check=False)
        assert stale.returncode == 2 and "evaluate@WMH: param mhd modified" in stale.stderr
    finally:
        (repo / "params.yaml").write_text(params)


def test_push_then_pull_into_a_fresh_clone_restores_everything(repo, tmp_path):
    store = tmp_path / "dvc-store"
    dvc(repo, "remote", "add", "-d", "--local", "store", str(store))
    dvc(repo, "push", "-q")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    dvc(clone, "remote", "add", "-d", "--local", "store", str(store))
    dvc(clone, "pull", "-q")
    for rel in ("models/t2/fold0/cddpm.ckpt", "artifacts/prepared/IXI_t1/images.npy", "metrics/WMH.json",
                "data/Train/ixi/t1"):
        assert (clone / rel).exists(), rel
    assert json.loads(dvc(clone, "status", "--json").stdout or "{}") == {}
    # the remote (and any credentials) went to the git-ignored config.local, not to the committed config
    assert str(store) not in (clone / ".dvc" / "config").read_text()
    assert run(clone, "git", "check-ignore", "-q", ".dvc/config.local", check=False).returncode == 0
