"""Many processes on the CPU: DDP training on 2 processes (gloo) writes what one process writes, resumes
after an interruption and logs the val loss averaged over the ranks; evaluation under torchrun with 2
processes writes exactly what one process writes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, SHRUNK, copy_project
from mhd_uad.models.checkpoint import (
    CDDPM_FORMAT,
    ENCODER_FORMAT,
    cddpm_path,
    encoder_path,
    load_cddpm,
    load_checkpoint,
)

pytestmark = pytest.mark.slow

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def _env(root) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}  # the launchers pick free ports
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def _run(args, root, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout)


def _add_last_scan(root, source: str, dest: str, move: bool = True) -> int:
    """Add the last scan of one split list to another (moved, or copied: lists are used as given), so that
    each of 2 ranks gets scans of its own; returns the scans `dest` now lists."""
    folder = root / "artifacts" / "splits"
    rows, extra = (folder / source).read_text().splitlines(), (folder / dest).read_text().splitlines()
    if move:
        (folder / source).write_text("\n".join(rows[:-1]) + "\n")
    (folder / dest).write_text("\n".join([*extra, rows[-1]]) + "\n")
    return len(extra)


def _csv(path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _layout(payload) -> dict:
    return {"keys": sorted(payload), "meta": sorted(payload["meta"]), "format": payload["format"],
            "tensors": {k: (tuple(v.shape), v.dtype) for k, v in payload["state_dict"].items()}}


def test_ddp_on_two_cpu_processes_resumes_and_writes_what_one_process_writes(tiny_model, tmp_path):
    root = copy_project(tiny_model.root, tmp_path / "work")
    shutil.rmtree(root / "models" / "t2")
    assert _add_last_scan(root, "IXI_train_fold0.csv", "IXI_val_fold0.csv") == 2
    records = tmp_path / "records"
    # pretrain, then train stopped as by Ctrl-C after 2 of its 4 steps, by a script Lightning's launcher reruns
    first = _run([sys.executable, str(REPO / "tests" / "ddp_train.py"), str(root), str(records), "--pretrain",
                  "--interrupt-at", "2", *DDP], root)
    assert first.returncode == 130, first.stderr[-4000:]
    resume = root / "artifacts" / "resume" / "train_t2-fold0"
    assert (resume / "checkpoints" / "last.ckpt").is_file() and not cddpm_path(root, "t2", 0).exists()
    # the resume point of the run's first epoch (the next is due 10 minutes later)
    assert torch.load(resume / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 1
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["train_batches_per_epoch"] == 1
    logged = {}
    for mine, theirs in zip(ranks[0]["validations"], ranks[1]["validations"], strict=True):
        own = [sum(loss * n for loss, n in v["own"]) / sum(n for _, n in v["own"]) for v in (mine, theirs)]
        assert abs(own[0] - own[1]) > 1e-4  # each rank validated its own volume
        assert mine["logged"] == theirs["logged"] == pytest.approx((own[0] + own[1]) / 2, rel=1e-6)
        logged[mine["step"]] = mine["logged"]
    assert sorted(logged) == [1, 2]

    second = _run([sys.executable, "-m", "mhd_uad.cli", "train", "--modality", "t2", "--fold", "0", *SHRUNK, *DDP],
                  root)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "train@t2-fold0: resuming from" in second.stderr
    assert not resume.exists()
    # one row per step and validation: rank 0 alone wrote the curves, the resumed fit went on from step 1 (step 2,
    # run again, has the row of its second run)
    val = _csv(root / "plots" / "train" / "t2-fold0" / "val.csv")
    assert [r["step"] for r in val] == ["1", "2", "3", "4"]
    assert [r["step"] for r in _csv(root / "plots" / "train" / "t2-fold0" / "train.csv")] == ["1", "2", "3", "4"]
    assert val[0]["loss"] == f"{logged[1]:.6g}"

    for path, fmt in ((encoder_path, ENCODER_FORMAT), (lambda r, m: cddpm_path(r, m, 0), CDDPM_FORMAT)):
        one, two = (load_checkpoint(path(r, "t2"), fmt) for r in (tiny_model.root, root))
        assert _layout(two) == _layout(one)
        assert two["meta"]["spec"] == one["meta"]["spec"]
        assert two["meta"]["global_step"] == one["meta"]["global_step"]
    _, meta = load_cddpm(tiny_model.params, cddpm_path(root, "t2", 0), "t2")
    files = [sorted(str(p.relative_to(r)) for p in (r / "models" / "t2").rglob("*")) for r in (tiny_model.root, root)]
    assert files[0] == files[1]
    # the best checkpoint is the lowest rank-averaged val loss
    assert meta["best_val_loss"] == pytest.approx(min(float(r["loss"]) for r in val), rel=1e-5)
    db = sqlite3.connect(root / "mlflow.db")
    assert sorted(db.execute("select name, status from runs").fetchall()) == [
        ("pretrain@t2", "FINISHED"), ("train@t2-fold0", "FINISHED")]


EVAL = ["evaluate.scorers=[mhd,single,nocov,l1_mean_postproc]"]  # a component-filtered scorer among them
OUTPUTS = ["metrics/MSLUB.json", "metrics/MSLUB_per_volume.csv", "artifacts/healthy/t2/fold0/thresholds.json",
           "metrics/healthy/t2_fold0.json", "reports/gallery/MSLUB.png"]


def test_scoring_in_two_processes_writes_what_one_process_writes(tiny_model, tmp_path,
                                                                                     monkeypatch):
    from conftest import shrunk_params
    from mhd_uad.evaluation import evaluate, healthy

    one = copy_project(tiny_model.root, tmp_path / "one")
    assert _add_last_scan(one, "IXI_train_fold0.csv", "IXI_val_fold0.csv") == 2  # healthy scans
    assert _add_last_scan(one, "MSLUB_test.csv", "MSLUB_val.csv", move=False) == 2  # 2 val and 2 test scans
    two = copy_project(one, tmp_path / "two")
    monkeypatch.chdir(one)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{one / 'mlflow.db'}")
    params = shrunk_params(*EVAL)
    healthy.run_score_healthy(params, "t2", 0, one)
    evaluate.run_evaluate(params, "MSLUB", one)

    # score-healthy under torchrun by hand; evaluate starting its own 2 processes (evaluate.devices=2)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "mhd_uad.cli"]
    for command in ([*launch, "score-healthy", "--modality", "t2", "--fold", "0", *SHRUNK, *EVAL],
                    [sys.executable, "-m", "mhd_uad.cli", "evaluate", "--dataset", "MSLUB", *SHRUNK, *EVAL,
                     "evaluate.devices=2"]):
        done = _run(command, two)
        assert done.returncode == 0, done.stderr[-4000:]
    assert "scoring with 2 processes" in done.stderr
    for name in OUTPUTS:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    for folder in ("plots/MSLUB", "artifacts/maps/MSLUB"):
        files = sorted(p.name for p in (one / folder).iterdir())
        assert files and files == sorted(p.name for p in (two / folder).iterdir())
        for name in files:
            assert (two / folder / name).read_bytes() == (one / folder / name).read_bytes(), name
    rows = _csv(two / "metrics" / "MSLUB_per_volume.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["mhd_auprc"])) for r in rows)
    assert not (two / "artifacts" / "eval" / "MSLUB").exists()  # every rank's scratch files removed, then it
    assert not (one / "artifacts" / "eval").exists()  # a single process shares no work folder
    assert not (two / "artifacts" / "eval" / "IXI_t2-fold0").exists()
    db = sqlite3.connect(two / "mlflow.db")  # rank 0 alone logged
    assert sorted(db.execute("select name from runs").fetchall()) == [("evaluate@MSLUB",), ("score-healthy@t2-0",)]
