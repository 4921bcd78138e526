"""The `paper` profile end to end on a few demo scans, through the CLI: every shape, dtype and file format.

Demo data prepared on the paper grid (2 mm, 96×96×50); the full paper networks (44.07 M UNet, ResNet-50
encoder, SparK decoder); SparK pretraining for 1 step; cDDPM training for 3 steps, stopped after the first or second by
SIGTERM (what a preempting scheduler sends) and resumed from last.ckpt; the score-healthy and evaluate stages
on one test set (one val and one test scan) with N = 2; `mhd-uad score` of one scan. Only step counts, batch
sizes, N, folds, modalities and test sets are shrunk (`SMOKE`); grid, networks, optimisers, scorers, data
loading and checkpoints are the profile's.

Precision on a CPU: `trainer.precision: 16-mixed` and `mhd.precision: 16-mixed` stay; Lightning falls back to
bf16-mixed for the fits (checked), and models.inference does the same for the UNet passes.

Evaluation on a CPU: one pass of the paper UNet costs 149 GFLOP per 96×96 slice (0.84 s on one core in
bf16), and the four scans scored here need 850 of them (50 slices × (N = 2 + the cddpm scorer's 3 levels)
for the healthy, val and test scan, 50 × 2 for `score`): about 12 minutes. So on a CPU the evaluation-time
UNet runs the real network on the first image of each chunk only (`CLI`); with a GPU, or with
MHD_UAD_PAPER_SMOKE_FULL=1, every pass is real. Training and pretraining are always real.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO
from mhd_uad.config import compose
from mhd_uad.models import count_parameters
from mhd_uad.models.checkpoint import (
    CDDPM_FORMAT,
    ENCODER_FORMAT,
    cddpm_path,
    encoder_path,
    load_cddpm,
    load_checkpoint,
    load_encoder_for,
)
from mhd_uad.models.factory import encoder_spec, model_spec

pytestmark = pytest.mark.slow

FULL = torch.cuda.is_available() or os.environ.get("MHD_UAD_PAPER_SMOKE_FULL") == "1"  # every UNet pass real
SMOKE = ["profile=paper", "splits.num_folds=1", "train.folds=[0]", "train.modalities=[t2]",
         "~datasets.Brats21", "~datasets.ATLAS_v2", "~datasets.WMH",
         "pretrain.max_steps=1", "pretrain.batch_size=2", "train.max_steps=3", "train.batch_size=2",
         "mhd.num_reconstructions=2"]
SCORERS = ("mhd", "single", "mean", "dmhd", "nocov", "l1_mean_postproc", "cddpm")

# Runs `mhd-uad ARGS` and reports the process's peak memory (its own and its children's) on the last line of
# stderr. With PAPER_SMOKE_CHEAP_UNET=1 the UNet computes the first image of each chunk only; the others get
# that output plus their own noised input, so the N reconstructions still differ and every shape and dtype
# downstream is the real one.
CLI = """
import os, resource, sys
if os.environ.get("PAPER_SMOKE_CHEAP_UNET") == "1":
    from mhd_uad.models.unet import UNet
    full_forward = UNet.forward
    def first_image_forward(self, x, timesteps, cond=None):
        head = full_forward(self, x[:1], timesteps[:1], None if cond is None else cond[:1])
        return (head + 0.05 * (x - x[:1])).to(head.dtype)
    UNet.forward = first_image_forward
from mhd_uad.cli import main
code = main(sys.argv[1:])
peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(f"peak-rss-kb {peak}", file=sys.stderr)
sys.exit(code)
"""


class Pipeline:
    def __init__(self, root: Path):
        self.root = root
        self.seconds: dict[str, float] = {}
        self.peak_kb: dict[str, int] = {}
        self.logs: dict[str, str] = {}
        self.stopped_at_step: int | None = None
        self.env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", DVC_NO_ANALYTICS="1")

    def _record(self, name: str, started: float, stderr: str) -> None:
        self.seconds[name] = time.perf_counter() - started
        self.logs[name] = stderr
        lines = [line for line in stderr.splitlines() if line.startswith("peak-rss-kb ")]
        if lines:
            self.peak_kb[name] = int(lines[-1].split()[1])

    def start(self, *args: str, cheap_unet: bool = False) -> subprocess.Popen:
        env = dict(self.env, PAPER_SMOKE_CHEAP_UNET="1" if cheap_unet else "0")
        return subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=self.root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, name: str, *args: str, cheap_unet: bool = False) -> str:
        started = time.perf_counter()
        proc = self.start(*args, cheap_unet=cheap_unet)
        _, err = proc.communicate(timeout=900)
        self._record(name, started, err)
        assert proc.returncode == 0, f"mhd-uad {' '.join(args)} exited {proc.returncode}:\n{err[-4000:]}"
        return err

    def preempt_after_first_epoch(self, name: str, *args: str) -> str:
        """Start a fit and send it SIGTERM, as a preempting scheduler does, once Lightning has written last.ckpt
        after epoch 0 (= step 1); Lightning stops at the end of that epoch. Returns stderr."""
        last = self.root / "artifacts" / "resume" / "train_t2-fold0" / "checkpoints" / "last.ckpt"
        started = time.perf_counter()
        proc = self.start(*args)
        while not last.is_file() and proc.poll() is None and time.perf_counter() - started < 900:
            time.sleep(0.05)
        assert proc.poll() is None, f"the fit ended before it could be stopped:\n{proc.communicate()[1][-4000:]}"
        # SIGTERM, not SIGINT: Lightning acts on it between batches, whereas a KeyboardInterrupt raised while
        # a checkpoint is being written can be lost in a destructor
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
        self._record(name, started, err)
        assert proc.returncode == 130, f"the stopped fit exited {proc.returncode}:\n{err[-4000:]}"
        self.stopped_at_step = torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        return err


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp("paper_profile")
    (root / "conf").symlink_to(REPO / "conf")
    p = Pipeline(root)
    # 4 healthy subjects: 1 IXI test, 1 val, 2 train (one batch of 2 = one step per epoch); 2 scans per test set
    p.run("demo-data", "demo-data", "--out", "data", "--seed", "5", "--n-healthy", "4", "--n-per-test-set", "2",
          "--voxel-size", "2", "--workers", "1", "--quiet")
    p.run("splits", "splits", *SMOKE)
    p.run("prepare", "prepare", *SMOKE)
    p.run("pretrain", "pretrain", "--modality", "t2", *SMOKE)
    train = ("train", "--modality", "t2", "--fold", "0", *SMOKE)
    p.preempt_after_first_epoch("train (stopped)", *train)
    p.run("train (resumed)", *train)
    cheap = not FULL
    p.run("score-healthy", "score-healthy", "--modality", "t2", "--fold", "0", *SMOKE, cheap_unet=cheap)
    p.run("evaluate", "evaluate", "--dataset", "MSLUB", *SMOKE, cheap_unet=cheap)
    scan, mask = _a_test_scan(root)
    p.run("score", "score", str(scan), "--mask", str(mask), "--out", "scored/map.nii.gz", "--modality", "t2",
          "--threshold", "0.5", "--out-mask", "scored/lesion.nii.gz", *SMOKE, cheap_unet=cheap)
    peak = max(p.peak_kb, key=p.peak_kb.get)
    print(f"\npaper-profile smoke ({'every UNet pass real' if FULL else 'one real UNet image per evaluation chunk'}):"
          f" {sum(p.seconds.values()):.0f} s; peak memory {p.peak_kb[peak] / 2**20:.2f} GiB in {peak} (ru_maxrss "
          "of each stage process and its children); " + ", ".join(f"{k} {v:.0f} s" for k, v in p.seconds.items()))
    return p


def _a_test_scan(root: Path) -> tuple[Path, Path]:
    scan = sorted((root / "data" / "Test" / "MSLUB" / "t2").glob("*_t2.nii.gz"))[0]
    return scan, root / "data" / "Test" / "MSLUB" / "mask" / scan.name.replace("_t2.", "_mask.")


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"{path} holds {token}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_prepared_arrays_are_on_the_paper_grid(paper):
    for name, n in (("IXI_t2", 4), ("IXI_t1", 4), ("MSLUB_t2", 2)):
        folder = paper.root / "artifacts" / "prepared" / name
        for array, dtype in (("images", np.float32), ("masks", np.float32), ("segs", np.uint8)):
            arr = np.load(folder / f"{array}.npy", mmap_mode="r")
            assert arr.shape == (n, 50, 96, 96) and arr.dtype == dtype, (name, array, arr.shape, arr.dtype)
    assert not (paper.root / "artifacts" / "prepared" / "Brats21_t2").exists()


def test_checkpoints_hold_the_paper_networks_with_the_paper_spec(paper):
    params, reference = compose(SMOKE, REPO), compose(["profile=paper"], REPO)
    encoder_file = encoder_path(paper.root, "t2")
    enc = load_checkpoint(encoder_file, ENCODER_FORMAT)
    assert enc["meta"]["spec"] == encoder_spec(reference) and enc["meta"]["spec"]["encoder"]["depth"] == 50
    assert enc["meta"]["pretrained"] and enc["meta"]["global_step"] == 1
    assert not any(k.startswith("fc.") for k in enc["state_dict"])
    encoder = load_encoder_for(params, "t2", paper.root)
    assert torch.equal(encoder.conv1.weight, enc["state_dict"]["conv1.weight"])

    ckpt = cddpm_path(paper.root, "t2", 0)
    payload = load_checkpoint(ckpt, CDDPM_FORMAT)
    assert payload["meta"]["spec"] == model_spec(reference)
    assert payload["meta"]["spec"]["image_size"] == 96 and payload["meta"]["spec"]["cond_dim"] == 512
    assert {v.dtype for v in payload["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    model, meta = load_cddpm(params, ckpt, "t2")
    unet, encoder = count_parameters(model.unet), count_parameters(model.encoder)
    assert (unet, encoder) == (44_068_481, 24_550_848) and f"{unet / 1e6:.2f} M" == "44.07 M"
    assert meta["global_step"] == 3 and meta["best_val_loss"] > 0


def test_the_stopped_training_resumed_from_last_ckpt(paper):
    assert "Received SIGTERM" in paper.logs["train (stopped)"] and "interrupted" in paper.logs["train (stopped)"]
    # SIGTERM is sent once last.ckpt holds step 1; Lightning acts on it after the step under way, which is step 2
    # when the next batch was already there (the loader only reads volumes): either way steps remain to resume
    assert paper.stopped_at_step in (1, 2)
    assert "resuming from" in paper.logs["train (resumed)"] and "last.ckpt" in paper.logs["train (resumed)"]
    assert not (paper.root / "artifacts" / "resume" / "train_t2-fold0").exists()
    import sqlite3

    db = sqlite3.connect(paper.root / "mlflow.db")
    runs = db.execute("select status from runs where name = 'train@t2-fold0'").fetchall()
    assert runs == [("FINISHED",)]  # the resumed fit continued the interrupted fit's MLflow run


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is the CPU's")
def test_fp16_amp_of_the_profile_falls_back_to_bf16_on_a_cpu(paper):
    for stage in ("pretrain", "train (resumed)"):
        assert "Using `precision='bf16-mixed'` instead" in paper.logs[stage], stage


def test_evaluation_writes_every_metric_and_the_maps_in_source_space(paper):
    root = paper.root
    healthy = _strict_json(root / "artifacts" / "healthy" / "t2" / "fold0" / "thresholds.json")
    assert healthy["n_scans"] == 1 and set(healthy["thresholds"]) == set(SCORERS)
    metrics = _strict_json(root / "metrics" / "MSLUB.json")
    assert set(metrics) == {*SCORERS, "volumes", "mhd_diagnostics"}
    assert metrics["volumes"] == {"n_test": 1, "n_val": 1, "n_folds": 1, "n_without_lesion": 0,
                                  "mhd_beats_single": metrics["volumes"]["mhd_beats_single"],
                                  "mhd_beats_nocov": metrics["volumes"]["mhd_beats_nocov"]}
    keys = {"auprc", "auprc_std", "auprc_fold_std", "auroc", "auroc_std", "dice", "dice_std", "dice_fold_std",
            "threshold", "val_dice", "n_volumes", "auprc_pooled", "auroc_pooled", "dice_oracle",
            "dice_fpr01", "dice_fpr05", "dice_fpr10"}
    for scorer in SCORERS:
        block = metrics[scorer]
        assert set(block) == keys | ({"versus_mhd"} if scorer != "mhd" else set()), scorer
        assert 0.0 <= block["auprc"] <= 1.0 and block["n_volumes"] == 1, scorer
    assert set(metrics["mhd_diagnostics"]) == {"n_volumes", "residual_share_in_span", "corr_mhd_nocov"}
    rows = (root / "metrics" / "MSLUB_per_volume.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("fold,scan,lesion_voxels,mhd_auprc")
    assert (root / "plots" / "MSLUB" / "pr_mhd.csv").read_text().startswith("threshold,recall,precision")
    assert (root / "reports" / "gallery" / "MSLUB.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    maps = sorted((root / "artifacts" / "maps" / "MSLUB").glob("*_mhd.nii.gz"))
    assert len(maps) == 1
    name = maps[0].name.removesuffix("_mhd.nii.gz")
    source = nib.load(root / "data" / "Test" / "MSLUB" / "t2" / f"{name}_t2.nii.gz")
    brain = np.asarray(nib.load(root / "data" / "Test" / "MSLUB" / "mask" / f"{name}_mask.nii.gz").dataobj) > 0
    amap = nib.load(maps[0])
    data = np.asarray(amap.dataobj)
    assert data.shape == source.shape != (96, 96, 50) and np.allclose(amap.affine, source.affine)
    assert data.dtype == np.float32 and np.isfinite(data).all() and data.min() >= 0
    assert data[~brain].max() == 0 and data[brain].max() > 0


def test_the_score_command_writes_the_map_and_lesion_mask_in_the_scans_space(paper):
    scan, _ = _a_test_scan(paper.root)
    source = nib.load(scan)
    amap, lesion = (nib.load(paper.root / "scored" / f) for f in ("map.nii.gz", "lesion.nii.gz"))
    assert amap.shape == lesion.shape == source.shape and np.allclose(amap.affine, source.affine)
    assert amap.get_data_dtype() == np.float32 and lesion.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(lesion.dataobj))) <= {0, 1}
    assert "anomaly map written to scored/map.nii.gz" in paper.logs["score"]
