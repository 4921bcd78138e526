"""Thin Lightning wrappers around the pure-torch cDDPM and SparK modules: steps, logging, optimisers.

The losses are logged with `sync_dist`: under DDP the logged values, and the val loss the best checkpoint is
chosen by, are means over the ranks (a no-op in a single process). Parameters that no loss reaches (the EMA
copy, SparK's unused FC head) take no gradient, so plain `ddp` needs no unused-parameter search.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

VAL_SEED = 20240101  # val batches draw t and noise from a fixed generator: epochs compare like with like


class _SliceModule(pl.LightningModule):
    def _val_generator(self, batch_idx: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(VAL_SEED + batch_idx)


class CDDPMModule(_SliceModule):
    """x0-prediction L1 training of the cDDPM (method.md §3.1, §3.5); the encoder trains jointly."""

    def __init__(self, model, optimizer: str = "adam", lr: float = 1e-4, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 ema_decay: float = 0.0, compile: bool | None = False, channels_last: bool = False):
        super().__init__()
        self.model = model
        # torch.compile of the UNet and the encoder: True, False, or None for auto (on CUDA only: 1.46x the
        # paper step on an H200; on a CPU it gained nothing and cost a minute of compiling)
        self.compile_setting, self.channels_last = compile, channels_last
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.lr_schedule, self.warmup_steps, self.total_steps = lr_schedule, warmup_steps, total_steps
        # An exponential moving average of the weights (off in the paper profile: the original has none);
        # when on, validation and the exported checkpoint use the averaged weights.
        self.ema = None
        if ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)

    def compiles(self) -> bool:
        """Whether the fit compiles the networks (train.compile; auto: on CUDA)."""
        return self.device.type == "cuda" if self.compile_setting is None else bool(self.compile_setting)

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compiles():
            # in place (nn.Module.compile): the state dict keeps its keys, so checkpoints are unchanged
            for net in (self.model.unet, self.model.encoder):
                if net is not None:
                    net.compile()

    @property
    def exported_prefix(self) -> str:
        """State-dict prefix of the weights that the stage exports (the EMA copy when there is one)."""
        return "ema.module." if self.ema is not None else "model."

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def training_step(self, batch, batch_idx):
        loss, _ = self.model.training_loss(batch["image"])
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        model = self.ema.module if self.ema is not None else self.model
        loss, _ = model.training_loss(batch["image"], generator=self._val_generator(batch_idx))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return loss

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        opt = cls(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return opt
        warm, total = max(0, self.warmup_steps), max(1, self.total_steps or 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if self.lr_schedule == "cosine":
                progress = min(1.0, (step - warm) / max(1, total - warm))
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SparKModule(_SliceModule):
    """SparK masked pretraining of the encoder (method.md §3.6): AdamW 1e-4, wd 0.05, betas (0.9, 0.95)."""

    def __init__(self, pretrainer, lr: float = 1e-4, weight_decay: float = 0.05, betas=(0.9, 0.95)):
        super().__init__()
        self.pretrainer = pretrainer
        pretrainer.encoder.fc.requires_grad_(False)  # not among spark's pretraining parameters: no loss reaches it
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)

    exported_prefix = "pretrainer.encoder."  # the stage exports the encoder alone

    def training_step(self, batch, batch_idx):
        loss, _, _ = self.pretrainer(batch["image"])
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _, _ = self.pretrainer(batch["image"], generator=self._val_generator(batch_idx))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return loss

    def configure_optimizers(self):
        from mhd_uad.models.spark import spark_optimizer

        return spark_optimizer(self.pretrainer.pretraining_parameters(), lr=self.lr,
                               weight_decay=self.weight_decay, betas=self.betas)
