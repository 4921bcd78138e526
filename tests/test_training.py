"""Training stages on the tiny layout: one real fit per module, resume, checkpoint checks, MLflow records."""

import shutil
import sqlite3

import lightning.pytorch as pl
import pytest
import torch

from conftest import REPO, make_workdir, run_data_stages
from mhd_uad.config import compose
from mhd_uad.errors import ConfigError, InputFileError
from mhd_uad.training import (
    CDDPM_FORMAT,
    load_cddpm,
    load_checkpoint,
    load_encoder_for,
    run_pretrain,
    run_train,
)

pytestmark = pytest.mark.slow  # real fits and evaluations: run by `make test`, not `make test-fast`

FAST = ["pretrain.max_steps=3", "train.max_steps=4", "train.warmup_steps=1", "data.slices_per_volume=2",
        "pretrain.batch_size=4", "train.batch_size=4", "trainer.log_every_n_steps=1",
        "train.val_every_n_epochs=1"]


@pytest.fixture(scope="module")
def workdir(tiny_data, tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("train") / "work", tiny_data)
    run_data_stages(root / "data", root / "artifacts", compose(FAST, REPO), only=["IXI_t1", "IXI_t2"])
    return root


@pytest.fixture()
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    return workdir


def _params(*extra):
    params = compose([*FAST, *extra], REPO)
    params.paths.data = "data"
    return params


def test_pretrain_then_train_write_checked_checkpoints_and_mlflow_runs(in_workdir):
    params = _params()
    enc = run_pretrain(params, "t1")
    payload = load_checkpoint(enc, "mhd-uad/encoder")
    assert payload["meta"]["pretrained"] and payload["meta"]["global_step"] == 3
    assert not any(k.startswith("fc.") for k in payload["state_dict"])
    ckpt = run_train(params, "t1", 0)
    model, meta = load_cddpm(params, ckpt, "t1")
    assert meta["global_step"] == 4 and meta["fold"] == 0 and meta["best_val_loss"] > 0
    # the pretrained encoder weights were the starting point of the cDDPM's encoder
    fresh = load_encoder_for(params, "t1", in_workdir)
    assert torch.equal(fresh.conv1.weight, payload["state_dict"]["conv1.weight"])
    assert not (in_workdir / "artifacts" / "resume" / "train_t1-fold0").exists()
    curves = (in_workdir / "plots" / "train" / "t1-fold0" / "train.csv").read_text().splitlines()
    assert curves[0] == "step,loss" and len(curves) >= 3
    db = sqlite3.connect(in_workdir / "mlflow.db")
    runs = dict(db.execute("select name, status from runs").fetchall())
    assert runs == {"pretrain@t1": "FINISHED", "train@t1-fold0": "FINISHED"}
    tags = dict(db.execute("select key, value from tags where key in ('stage', 'checkpoint')"
                           " and run_uuid = (select run_uuid from runs where name = 'train@t1-fold0')").fetchall())
    assert tags["stage"] == "train@t1-fold0" and tags["checkpoint"].endswith("models/t1/fold0/cddpm.ckpt")
    assert db.execute("select count(*) from metrics where key = 'train/loss'").fetchone()[0] >= 4
    assert db.execute("select count(*) from params where key = 'model.unet.model_channels'").fetchone()[0] == 2


def test_an_interrupted_training_resumes_from_its_last_checkpoint(in_workdir):
    params = _params("train.max_steps=6")
    run_pretrain(_params(), "t2")

    class Interrupt(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(params, "t2", 0, callbacks=[Interrupt()])
    resume = in_workdir / "artifacts" / "resume" / "train_t2-fold0"
    assert (resume / "checkpoints" / "last.ckpt").is_file()
    assert not (in_workdir / "models" / "t2" / "fold0" / "cddpm.ckpt").exists()
    step_before = torch.load(resume / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step_before < 6
    ckpt = run_train(params, "t2", 0)
    meta = load_checkpoint(ckpt, CDDPM_FORMAT)["meta"]
    assert meta["global_step"] == 6
    db = sqlite3.connect(in_workdir / "mlflow.db")
    assert db.execute("select count(*) from runs where name = 'train@t2-fold0'").fetchone()[0] == 1


def test_mismatched_checkpoints_are_refused_before_training(in_workdir):
    params = _params()
    run_pretrain(params, "t1") if not (in_workdir / "models/t1/encoder.pt").exists() else None
    with pytest.raises(ConfigError, match="trained on 't1', not 't2'"):
        shutil.copy(in_workdir / "models/t1/encoder.pt", in_workdir / "encoder_t1.pt")
        (in_workdir / "models/t2").mkdir(parents=True, exist_ok=True)
        shutil.copy(in_workdir / "encoder_t1.pt", in_workdir / "models/t2/encoder.pt")
        run_train(params, "t2", 0)
    other = _params("model.encoder.base_width=8")
    with pytest.raises(ConfigError, match="encoder differ"):
        run_train(other, "t1", 0)
    paper = compose(["profile=paper"], REPO)
    with pytest.raises(ConfigError, match="profile 'demo'"):
        load_encoder_for(paper, "t1", in_workdir)
    (in_workdir / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputFileError, match="unreadable"):
        load_checkpoint(in_workdir / "garbage.ckpt", CDDPM_FORMAT)
    torch.save({"format": "something-else"}, in_workdir / "other.ckpt")
    with pytest.raises(InputFileError, match="not an mhd-uad"):
        load_checkpoint(in_workdir / "other.ckpt", CDDPM_FORMAT)


def test_pickled_objects_in_checkpoints_are_refused(in_workdir):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"format": CDDPM_FORMAT, "meta": Evil()}, in_workdir / "evil.ckpt")
    with pytest.raises(InputFileError, match="unreadable"):
        load_checkpoint(in_workdir / "evil.ckpt", CDDPM_FORMAT)


def test_impossible_sizes_fail_before_any_training():
    from mhd_uad.models.factory import validate_model_params

    with pytest.raises(ConfigError, match="image_size|divisible"):
        validate_model_params(compose(["prepare.grid=[72,72,32]"], REPO))
    with pytest.raises(ConfigError, match="square"):
        validate_model_params(compose(["prepare.grid=[64,96,32]"], REPO))
    with pytest.raises(ConfigError, match="multiple of data.slices_per_volume"):
        validate_model_params(compose(["train.batch_size=6"], REPO))
