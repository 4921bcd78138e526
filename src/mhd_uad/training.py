"""The `pretrain` and `train` stages: Lightning fits with resume, MLflow tracking and lean checkpoints.

Only the fits live here; the checkpoint format and loading are models.checkpoint's, inference is
models.inference's, so evaluation never imports the training stage.

DVC deletes a stage's outs before running it, so the resume state lives outside them, in
`artifacts/resume/<stage>/` (the last resume point `last.ckpt`, the loss curves so far, the MLflow run id,
and a fingerprint of everything the fit depends on). A re-run with the same fingerprint continues from
`last.ckpt` (written at an epoch end, every 10 minutes: `resume.ResumePoints`), its loss curves cut back to
that step; a different fingerprint starts over. On success the best weights (lowest val loss, as the
original; kept in memory, `resume.BestWeights`) are written as a lean file of tensors and plain metadata
that loads with `torch.load(weights_only=True)`, and the resume state is removed.

Under DDP (`trainer.devices=2 trainer.strategy=ddp`, torchrun, srun) every process runs the stage; only rank 0
touches the resume state, the MLflow run, the curves and the outputs, so the files are those of a
single-process fit. Lightning shards the volumes across ranks (DistributedSampler), the losses are averaged
over ranks before they are logged and before the best checkpoint is chosen, and an interrupted DDP fit
resumes from the same `last.ckpt`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from mhd_uad.config import auto_switch, to_plain
from mhd_uad.devices import is_main_process
from mhd_uad.errors import ConfigError
from mhd_uad.io import atomic_write_text
from mhd_uad.models.checkpoint import (
    CDDPM_FORMAT,
    ENCODER_FORMAT,
    cddpm_path,
    encoder_path,
    load_encoder_for,
    save_checkpoint,
)
from mhd_uad.resume import BestWeights, ResumePoints

log = logging.getLogger(__name__)

# ---- shared fit machinery ------------------------------------------------------------------------------

RESUME_FORMAT = 2  # in the fingerprint: a resume state written before the best weights were in it starts over


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LossCurves(pl.Callback):
    """Train loss per logged step and val loss per validation, appended to CSVs for `dvc plots`; a resumed
    fit first drops the rows written after its resume point (those steps run again)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_start(self, trainer, module):
        if not trainer.is_global_zero:
            return
        for path in self.folder.glob("*.csv"):
            with path.open(newline="") as fh:
                rows = list(csv.reader(fh))
            kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= trainer.global_step]
            if len(kept) < len(rows):
                text = io.StringIO()
                csv.writer(text).writerows(kept)
                atomic_write_text(path, text.getvalue())

    def _append(self, name: str, step: int, value: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "loss"])
            writer.writerow([step, f"{value:.6g}"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.is_global_zero and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            value = trainer.callback_metrics.get("train/loss")
            if value is not None:
                self._append("train", trainer.global_step, float(value))

    def on_validation_epoch_end(self, trainer, module):
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not trainer.sanity_checking and trainer.is_global_zero:
            self._append("val", trainer.global_step, float(value))


class StepTimes(pl.Callback):
    """Seconds of the first training step (compiling, when the fit compiles, happens there) and the median
    of the next `window`; logged once (MLflow metrics train/first_step_s, train/step_s, train/compile_s =
    their difference) and to the log, so the cost of train.compile is on record."""

    def __init__(self, window: int = 20):
        self.window, self.times, self._start, self.done = window, [], 0.0, False

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if not self.done:
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.done:
            return
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self.times.append(time.perf_counter() - self._start)
        if len(self.times) > self.window:
            self.report(trainer, module)

    def on_train_end(self, trainer, module):  # a fit shorter than the window
        if not self.done:
            self.report(trainer, module)

    def report(self, trainer, module) -> None:
        self.done = True
        if len(self.times) < 2:
            return
        first, typical = self.times[0], statistics.median(self.times[1:])
        figures = {"train/first_step_s": first, "train/step_s": typical, "train/compile_s": max(0.0, first - typical)}
        compiled = getattr(module, "compiles", lambda: False)()
        log.info("first training step %.1f s, then %.3f s per step%s", first, typical,
                 f" (compiling took about {first - typical:.0f} s)" if compiled else "")
        if trainer.is_global_zero and trainer.logger:
            trainer.logger.log_metrics(figures, step=trainer.global_step)


class RankStreams(pl.Callback):
    """Under DDP every rank starts from the same seed: give each rank its own torch stream, so the ranks'
    augmentations, slices, timesteps and noise differ (the sampler already gives them different volumes)."""

    def setup(self, trainer, module, stage):
        if trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * (trainer.global_rank + 1))


def _trainer_kwargs(params, max_steps: int, max_epochs: int) -> dict:
    t = params.trainer
    return {
        "accelerator": str(t.accelerator), "devices": t.devices, "num_nodes": int(t.num_nodes),
        "strategy": str(t.strategy), "precision": str(t.precision), "deterministic": bool(t.deterministic),
        "benchmark": bool(t.benchmark), "log_every_n_steps": int(t.log_every_n_steps),
        "max_steps": int(max_steps), "max_epochs": int(max_epochs) if int(max_epochs) > 0 else -1,
        "check_val_every_n_epoch": int(params.train.val_every_n_epochs),
        "num_sanity_val_steps": 0, "enable_model_summary": False, "enable_checkpointing": False,  # resume.py
        "gradient_clip_val": float(params.train.gradient_clip_val) or None,
    }


def fit(stage: str, module, datamodule, params, *, root: Path, plots_dir: Path, max_steps: int,
        max_epochs: int, depends_on: list, callbacks=()) -> tuple[dict, dict] | None:
    """Fit with resume; returns the best weights (the module's `exported_prefix` stripped, on the CPU) and a
    summary of the fit (None on the ranks other than 0 of a distributed fit: rank 0 alone writes)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from mhd_uad.data.datamodule import PrepareAhead
    from mhd_uad.tracking import lightning_logger

    main = is_main_process()  # under torchrun all ranks start at once: only rank 0 changes the resume state
    resume = root / "artifacts" / "resume" / stage.replace("@", "_")
    key = fingerprint(to_plain(params), depends_on, RESUME_FORMAT)
    state_file = resume / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    last = resume / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if state.get("fingerprint") == key and last.is_file() else None
    if state.get("fingerprint") != key:
        if resume.exists() and main:
            log.info("%s: params or inputs changed since the interrupted run: starting over", stage)
            shutil.rmtree(resume, ignore_errors=True)
        state = {"fingerprint": key}
    if ckpt_path:
        log.info("%s: resuming from %s", stage, last)
    logger = False
    if main:
        last.parent.mkdir(parents=True, exist_ok=True)
        logger = lightning_logger(stage, to_plain(params), run_id=state.get("mlflow_run_id"))
        state["mlflow_run_id"] = logger.run_id
        atomic_write_text(state_file, json.dumps(state))
    best = BestWeights("val/loss")
    # the bar refreshes when the loss is logged: reading the loss for it waits for the device
    bar = TQDMProgressBar(refresh_rate=max(1, int(params.trainer.log_every_n_steps)))
    trainer = pl.Trainer(logger=logger, default_root_dir=str(resume),
                         callbacks=[bar, best, LossCurves(resume / "curves"), RankStreams(), PrepareAhead(), *callbacks,
                                    ResumePoints(last)],
                         **_trainer_kwargs(params, max_steps, max_epochs))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit:  # Lightning turns Ctrl-C into SystemExit after its graceful shutdown
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    if not trainer.is_global_zero:
        return None
    if best.weights is None:
        raise ConfigError(f"{stage}: no validation ran, so there is no best checkpoint (check max_steps/max_epochs "
                          "and train.val_every_n_epochs)")
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val"):
        src = resume / "curves" / f"{name}.csv"
        if src.is_file():
            shutil.copyfile(src, plots_dir / f"{name}.csv")
    summary = {"best_val_loss": best.score,
               "global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
               "mlflow_run_id": logger.run_id}
    return best.exported(), summary


def finish(stage: str, root: Path, logger_run_id: str, out: Path) -> None:
    """Record the output in MLflow and drop the resume state (the stage is complete)."""
    from mhd_uad.tracking import record_checkpoint

    record_checkpoint(logger_run_id, out)
    shutil.rmtree(root / "artifacts" / "resume" / stage.replace("@", "_"), ignore_errors=True)


def _after_rank_zero_wrote() -> None:
    """Under DDP, every rank returns only once rank 0 has written the stage's outputs (a next stage in the
    same processes reads them)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _checkpoint_facts(summary: dict) -> dict:
    """What a checkpoint records of its fit: not the MLflow run id, which differs on every run (the run
    records the checkpoint instead), so the same commit, data and seed give the same checkpoint bytes."""
    return {k: v for k, v in summary.items() if k != "mlflow_run_id"}


def _seed(params, offset: int) -> None:
    pl.seed_everything(int(params.seed) + offset, workers=True, verbose=False)


def _datamodule(params, modality: str, fold: int, batch_size: int, augment: bool):
    from mhd_uad.data.datamodule import AugmentSettings, IXISliceDataModule

    artifacts = Path(params.paths.artifacts)
    return IXISliceDataModule(
        artifacts / "prepared", artifacts / "splits", params.paths.data, modality, fold, batch_size,
        int(params.data.slices_per_volume), params.data.num_workers,
        AugmentSettings.from_params(params) if augment else None, seed=int(params.seed),
    )


# ---- stages --------------------------------------------------------------------------------------------

def run_pretrain(params, modality: str, root: str | Path = ".", callbacks=()) -> Path:
    """SparK-pretrain the encoder on IXI fold 0 (no augmentation) -> models/<modality>/encoder.pt.

    With `pretrain.enabled: false` the file records that the cDDPM trains its encoder from scratch.
    """
    from mhd_uad.models.factory import build_spark, encoder_spec
    from mhd_uad.models.lightning import SparKModule

    root = Path(root)
    out = encoder_path(root, modality)
    meta = {"modality": modality, "spec": encoder_spec(params), "pretrained": bool(params.pretrain.enabled)}
    if not params.pretrain.enabled:
        return save_checkpoint(out, ENCODER_FORMAT, meta, None) if is_main_process() else out
    _seed(params, 0)
    p = params.pretrain
    module = SparKModule(build_spark(params), lr=float(p.lr), weight_decay=float(p.weight_decay), betas=list(p.betas))
    stage = f"pretrain@{modality}"
    fitted = fit(stage, module, _datamodule(params, modality, 0, int(p.batch_size), augment=False), params,
                 root=root, plots_dir=root / "plots" / "pretrain" / modality,
                 max_steps=int(p.max_steps), max_epochs=int(p.max_epochs), depends_on=[modality], callbacks=callbacks)
    if fitted is not None:  # rank 0 (or the only process)
        state, summary = fitted
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the FC head is not transferred
        save_checkpoint(out, ENCODER_FORMAT, {**meta, **_checkpoint_facts(summary)}, state)
        finish(stage, root, summary["mlflow_run_id"], out)
    _after_rank_zero_wrote()
    return out


def run_train(params, modality: str, fold: int, root: str | Path = ".", callbacks=()) -> Path:
    """Train the cDDPM on IXI fold `fold` -> models/<modality>/fold<fold>/cddpm.ckpt (best val loss)."""
    from mhd_uad.models.factory import build_cddpm, model_spec
    from mhd_uad.models.lightning import CDDPMModule

    root = Path(root)
    if fold not in [int(f) for f in params.train.folds] or fold >= int(params.splits.num_folds):
        raise ConfigError(f"fold {fold} is not among train.folds {list(params.train.folds)} "
                          f"(splits.num_folds = {params.splits.num_folds})", "params.yaml")
    _seed(params, 1 + fold)  # before the encoder is built: its fresh FC head draws from the seeded RNG
    encoder = load_encoder_for(params, modality, root)
    t = params.train
    max_steps = int(t.max_steps)
    module = CDDPMModule(build_cddpm(params, encoder=encoder), optimizer=str(t.optimizer), lr=float(t.lr),
                         weight_decay=float(t.weight_decay), lr_schedule=str(t.lr_schedule),
                         warmup_steps=int(t.warmup_steps), total_steps=max_steps if max_steps > 0 else None,
                         ema_decay=float(t.ema_decay), compile=auto_switch(t.get("compile", False), "train.compile"),
                         channels_last=auto_switch(t.get("channels_last", False), "train.channels_last") is True)
    stage = f"train@{modality}-fold{fold}"
    encoder_file = encoder_path(root, modality)
    fitted = fit(stage, module, _datamodule(params, modality, fold, int(t.batch_size), augment=True),
                 params, root=root, plots_dir=root / "plots" / "train" / f"{modality}-fold{fold}",
                 max_steps=max_steps, max_epochs=int(t.max_epochs),
                 depends_on=[modality, fold, hashlib.sha256(encoder_file.read_bytes()).hexdigest()],
                 callbacks=[StepTimes(), *callbacks])
    out = cddpm_path(root, modality, fold)
    if fitted is not None:  # rank 0 (or the only process)
        state, summary = fitted
        meta = {"modality": modality, "fold": fold, "spec": model_spec(params), **_checkpoint_facts(summary)}
        save_checkpoint(out, CDDPM_FORMAT, meta, state)
        finish(stage, root, summary["mlflow_run_id"], out)
    _after_rank_zero_wrote()
    return out
