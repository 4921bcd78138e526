"""Training stages on the tiny layout: the shared tiny model's fits, resume, checkpoint checks, MLflow records."""

import shutil
import sqlite3

import lightning.pytorch as pl
import pytest
import torch

from conftest import REPO, copy_project, shrunk_params
from mhd_uad.config import compose
from mhd_uad.errors import ConfigError, InputFileError
from mhd_uad.models.checkpoint import (
    CDDPM_FORMAT,
    ENCODER_FORMAT,
    cddpm_path,
    encoder_path,
    load_cddpm,
    load_checkpoint,
    load_encoder_for,
)
from mhd_uad.training import run_pretrain, run_train

pytestmark = pytest.mark.slow


@pytest.fixture()
def private_copy(tiny_model, tmp_path, monkeypatch):
    """A copy of the tiny model's project to change at will, as the working directory, with its own MLflow."""
    root = copy_project(tiny_model.root, tmp_path / "work")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root


def test_pretrain_then_train_write_checked_checkpoints_and_mlflow_runs(tiny_model):
    root, params = tiny_model.root, tiny_model.params
    payload = load_checkpoint(encoder_path(root, "t1"), ENCODER_FORMAT)
    assert payload["meta"]["pretrained"] and payload["meta"]["global_step"] == 3
    assert not any(k.startswith("fc.") for k in payload["state_dict"])
    model, meta = load_cddpm(params, cddpm_path(root, "t1", 0), "t1")
    assert meta["global_step"] == 4 and meta["fold"] == 0 and meta["best_val_loss"] > 0
    assert not model.training
    # the pretrained encoder weights were the starting point of the cDDPM's encoder, and training moved them
    fresh = load_encoder_for(params, "t1", root)
    assert torch.equal(fresh.conv1.weight, payload["state_dict"]["conv1.weight"])
    assert not torch.equal(model.encoder.conv1.weight, fresh.conv1.weight)
    assert not (root / "artifacts" / "resume" / "train_t1-fold0").exists()
    curves = (root / "plots" / "train" / "t1-fold0" / "train.csv").read_text().splitlines()
    assert curves[0] == "step,loss" and len(curves) >= 3
    db = sqlite3.connect(root / "mlflow.db")
    runs = dict(db.execute("select name, status from runs").fetchall())
    assert runs == {name: "FINISHED" for name in ("pretrain@t1", "pretrain@t2", "train@t1-fold0", "train@t2-fold0")}
    tags = dict(db.execute("select key, value from tags where key in ('stage', 'checkpoint')"
                           " and run_uuid = (select run_uuid from runs where name = 'train@t1-fold0')").fetchall())
    assert tags["stage"] == "train@t1-fold0" and tags["checkpoint"].endswith("models/t1/fold0/cddpm.ckpt")
    assert db.execute("select count(*) from metrics where key = 'train/loss' and run_uuid = (select run_uuid "
                      "from runs where name = 'train@t1-fold0')").fetchone()[0] >= 4
    assert db.execute("select count(*) from params where key = 'model.unet.model_channels'").fetchone()[0] == 4


def test_an_interrupted_training_resumes_from_its_last_checkpoint(private_copy):
    params = shrunk_params("train.max_steps=6")
    shutil.rmtree(private_copy / "models" / "t2" / "fold0")

    class Interrupt(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(params, "t2", 0, callbacks=[Interrupt()])
    resume = private_copy / "artifacts" / "resume" / "train_t2-fold0"
    assert (resume / "checkpoints" / "last.ckpt").is_file()
    assert not cddpm_path(private_copy, "t2", 0).exists()
    step_before = torch.load(resume / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step_before < 6
    ckpt = run_train(params, "t2", 0)
    meta = load_checkpoint(ckpt, CDDPM_FORMAT)["meta"]
    assert meta["global_step"] == 6
    # the steps after the resume point ran again: their first rows were dropped, so each step has one row
    curves = private_copy / "plots" / "train" / "t2-fold0"
    steps = {name: [int(row.split(",")[0]) for row in (curves / f"{name}.csv").read_text().splitlines()[1:]]
             for name in ("train", "val")}
    assert steps == {"train": [1, 2, 3, 4, 5, 6], "val": [2, 4, 6]}  # a row per step, a validation per epoch
    best = min(float(row.split(",")[1]) for row in (curves / "val.csv").read_text().splitlines()[1:])
    assert meta["best_val_loss"] == pytest.approx(best, rel=1e-5)  # the best before the interruption counts
    db = sqlite3.connect(private_copy / "mlflow.db")
    assert db.execute("select count(*) from runs where name = 'train@t2-fold0'").fetchone()[0] == 1


@pytest.mark.parametrize("ahead", [True, False], ids=["batches-made-ahead", "batches-made-at-each-step"])
def test_the_same_seed_and_data_give_bit_identical_checkpoints(tiny_model, private_copy, ahead):
    """Re-fitting in another folder, process state and temp file names reproduces the shared fits byte for byte
    (the encoder's fresh FC head drew from an unseeded RNG, and the zip records carried the temp file's name);
    and so does fitting without making each next batch ahead during the backward (PrepareAhead): the draws keep
    their place in the RNG's stream."""
    import hashlib

    from mhd_uad.data.datamodule import IXISliceDataModule

    params = shrunk_params()
    shutil.rmtree(private_copy / "models" / "t1")
    made = []
    original = IXISliceDataModule.prepare_ahead

    def spy(self):
        made.append(original(self) if ahead else False)
        return made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(IXISliceDataModule, "prepare_ahead", spy)
        torch.seed()  # a random global RNG state before each fit (each DVC stage is a fresh process)
        run_pretrain(params, "t1")
        torch.seed()
        run_train(params, "t1", 0)
    assert made and any(made) == ahead, made  # a step per call; the epochs' last steps make none
    for path in (encoder_path, lambda root, m: cddpm_path(root, m, 0)):
        mine, shared = path(private_copy, "t1"), path(tiny_model.root, "t1")
        assert hashlib.sha256(mine.read_bytes()).hexdigest() == hashlib.sha256(shared.read_bytes()).hexdigest(), mine


def test_mismatched_checkpoints_are_refused_before_training(private_copy):
    params = shrunk_params()
    shutil.copy(encoder_path(private_copy, "t1"), encoder_path(private_copy, "t2"))
    with pytest.raises(ConfigError, match="trained on 't1', not 't2'"):
        run_train(params, "t2", 0)
    with pytest.raises(ConfigError, match="encoder differ"):
        run_train(shrunk_params("model.encoder.base_width=8"), "t1", 0)
    with pytest.raises(ConfigError, match="profile 'demo'"):
        load_encoder_for(compose(["profile=paper"], REPO), "t1", private_copy)
    with pytest.raises(ConfigError, match="unet differ"):
        load_cddpm(shrunk_params("model.unet.model_channels=16"), cddpm_path(private_copy, "t1", 0), "t1")
    (private_copy / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputFileError, match="unreadable"):
        load_checkpoint(private_copy / "garbage.ckpt", CDDPM_FORMAT)
    torch.save({"format": "something-else"}, private_copy / "other.ckpt")
    with pytest.raises(InputFileError, match="not an mhd-uad"):
        load_checkpoint(private_copy / "other.ckpt", CDDPM_FORMAT)


def test_pickled_objects_in_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"format": CDDPM_FORMAT, "meta": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(InputFileError, match="unreadable"):
        load_checkpoint(tmp_path / "evil.ckpt", CDDPM_FORMAT)


def test_impossible_sizes_fail_before_any_training():
    from mhd_uad.models.factory import validate_model_params

    with pytest.raises(ConfigError, match="image_size|divisible"):
        validate_model_params(compose(["prepare.grid=[72,72,32]"], REPO))
    with pytest.raises(ConfigError, match="square"):
        validate_model_params(compose(["prepare.grid=[64,96,32]"], REPO))
    with pytest.raises(ConfigError, match="multiple of data.slices_per_volume"):
        validate_model_params(compose(["train.batch_size=6"], REPO))


def test_the_compile_path_fits_and_exports_the_same_checkpoint_layout(private_copy):
    """train.compile=true on the CPU (the path CUDA takes by default): the networks are compiled in place, so the
    exported checkpoint has the uncompiled model's keys and loads; the first step's time is on record. Dynamo
    traces the networks here with its eager backend: inductor's C++ code generation of the same graphs takes
    minutes on 2 cores. Inductor on CUDA runs in the GPU check: its paper smoke test trains with train.compile
    auto (on there), and benchmarks/paper_profile.py's fp16+compile variant measures the gain."""
    params = shrunk_params("train.compile=true", "train.max_steps=2")
    shutil.rmtree(private_copy / "models" / "t1" / "fold0")
    compiled = []
    original = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, *args, **{**kwargs, "backend": "eager"})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "compile", spy)
        run_train(params, "t1", 0)
    assert len(compiled) == 2, compiled  # the UNet and the encoder
    model, meta = load_cddpm(params, cddpm_path(private_copy, "t1", 0), "t1")
    assert meta["global_step"] == 2 and not any("_orig_mod" in k for k in model.state_dict())
    with sqlite3.connect(private_copy / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"train/first_step_s", "train/step_s", "train/compile_s"} <= keys


def test_a_fit_loads_each_next_pass_while_the_last_one_is_used(private_copy):
    """In a Lightning fit (which knows each pass's length and never asks past its last batch) the loaders'
    workers start every train pass after the first, and every val pass after the first, before Lightning asks."""
    from mhd_uad.data import datamodule

    params = shrunk_params("train.max_steps=6", "data.num_workers=1")
    shutil.rmtree(private_copy / "models" / "t1" / "fold0")
    prestarts, asked = [], []
    original_prestart, original_iter = datamodule.PrestartingLoader._prestart, datamodule.PrestartingLoader.__iter__

    def prestart(self):
        prestarts.append(self.sampler is not None and isinstance(self.sampler, torch.utils.data.RandomSampler))
        return original_prestart(self)

    def ask(self):
        asked.append(self._prestarted)
        return original_iter(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datamodule.PrestartingLoader, "_prestart", prestart)
        mp.setattr(datamodule.PrestartingLoader, "__iter__", ask)
        run_train(params, "t1", 0)
    assert len(asked) >= 4 and asked.count(True) == len(asked) - 2, asked  # all but each loader's first pass
    assert True in prestarts and False in prestarts  # train (random order) and val passes


def test_bad_compile_and_memory_format_switches_are_refused(private_copy):
    for override, key in (("train.compile=maybe", "train.compile"), ("train.channels_last=3", "train.channels_last")):
        with pytest.raises(ConfigError, match=key):
            run_train(shrunk_params(override), "t1", 0)
