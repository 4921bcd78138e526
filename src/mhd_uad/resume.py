"""What a fit keeps while it runs: the weights of its best validation, and resume points on a clock.

The original keeps Lightning's ModelCheckpoint (monitor the val loss, mode min, top 1) with `last.ckpt`
beside it. There every new lowest val loss writes two full checkpoints (weights, Adam's moments, loop
state): 824 MB each in the paper profile (68.6 M parameters), one to two seconds of writing, while an epoch
of the real IXI fold (12 steps) is about 1.5 s of an H200's training. Here the choice is the same and the
writes are not in the training's way:

- `BestWeights`: the lowest val loss so far, chosen as ModelCheckpoint chooses it (the first validation,
  then strictly lower, NaN counting as +inf), and a copy of the exported weights where the model is (on a
  GPU a device-to-device copy). The fit exports it at its end; it is also part of every resume point, so a
  resumed fit keeps the best of the epochs before the interruption.
- `ResumePoints`: `last.ckpt` (everything a resumed fit needs) written at the end of an epoch, after its
  validation: the first epoch of a run, then the first epoch that ends `every_s` seconds after the previous
  write. Written under a temporary name and renamed (io.atomic_path), so an interruption never leaves half a
  file.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from mhd_uad.errors import MhdUadError
from mhd_uad.io import atomic_path

log = logging.getLogger(__name__)

RESUME_EVERY_S = 600.0  # an interrupted fit loses at most 10 min and an epoch; a paper-size write costs 1-2 s


def exported_weights(module) -> dict[str, torch.Tensor]:
    """A copy of the weights the stage exports (the module's `exported_prefix`, stripped), where they are."""
    prefix = module.exported_prefix
    return {k[len(prefix):]: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


class BestWeights(pl.Callback):
    """The exported weights (the module's `exported_prefix`, stripped) at the lowest `monitor` so far."""

    def __init__(self, monitor: str = "val/loss"):
        self.monitor = monitor
        self.score: float | None = None
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.global_step == self.step:
            return  # as ModelCheckpoint: not in the sanity check, once per global step
        current = trainer.callback_metrics.get(self.monitor)
        if current is None:
            return
        current = float(current)  # one wait for the device per validation, as ModelCheckpoint's comparison
        current = math.inf if math.isnan(current) else current
        if self.score is not None and not current < self.score:
            return
        self.score, self.step = current, int(trainer.global_step)
        self.weights = exported_weights(module)

    def exported(self) -> dict[str, torch.Tensor]:
        """The best weights on the CPU (for the lean checkpoint)."""
        return {k: v.cpu() for k, v in (self.weights or {}).items()}

    def state_dict(self) -> dict:
        return {"score": self.score, "step": self.step, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.score, self.step, self.weights = state_dict["score"], state_dict["step"], state_dict["weights"]


class ResumePoints(pl.Callback):
    """`path` at the end of the first epoch of a run, then of the first epoch `every_s` seconds after the last
    write (and not after the fit's last step: the stage exports then). Under DDP every rank takes part in the
    write (Lightning's save is collective), rank 0 decides when and writes."""

    def __init__(self, path: Path, every_s: float = RESUME_EVERY_S):
        self.path, self.every_s = Path(path), float(every_s)
        self.written_at: float | None = None
        self.seconds: list[float] = []  # how long each write took

    def on_train_epoch_end(self, trainer, module):
        if 0 < trainer.max_steps <= trainer.global_step or (
                trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1):
            return
        started = time.monotonic()
        due = self.written_at is None or started - self.written_at >= self.every_s
        if not trainer.strategy.broadcast(due):
            return
        try:
            if trainer.is_global_zero:
                with atomic_path(self.path) as tmp:
                    trainer.save_checkpoint(tmp)
            else:
                trainer.save_checkpoint(self.path)  # collective: rank 0 alone writes
        except OSError as exc:  # a full disk: said in one line, the temporary file removed
            raise MhdUadError(f"could not write the resume point ({exc.strerror or exc})", self.path) from None
        self.written_at = time.monotonic()
        self.seconds.append(self.written_at - started)
        log.debug("resume point at step %d: %.2f s", trainer.global_step, self.seconds[-1])
