"""DDP training runs for tests/test_distributed.py: `python tests/ddp_train.py ROOT RECORDS [--pretrain]
[--interrupt-at N] [KEY=VALUE ...]` trains the T2 fold-0 cDDPM of the project ROOT (after SparK-pretraining
its encoder, with --pretrain) with the SHRUNK params and the overrides.

Lightning's launcher starts the other ranks by running this script again. Every rank writes
RECORDS/rank<r>.json: per validation, its own val batches' losses and sizes, and the val loss the trainer
logged. With --interrupt-at every rank stops at that global step as Ctrl-C would (exit status 130).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import shrunk_params  # noqa: E402


class ValRecorder(pl.Callback):
    def __init__(self, folder: Path):
        self.folder, self.validations, self.batches = folder, [], []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches.append((float(outputs), int(batch["image"].shape[0])))

    def on_validation_epoch_end(self, trainer, module):
        self.validations.append({"step": trainer.global_step, "own": self.batches,
                                 "logged": float(trainer.callback_metrics["val/loss"])})
        self.batches = []
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "validations": self.validations,
                  "train_batches_per_epoch": trainer.num_training_batches}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class Interrupt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    from mhd_uad.training import run_pretrain, run_train

    root, records, rest = Path(argv[0]), Path(argv[1]), argv[2:]
    pretrain = rest[:1] == ["--pretrain"]
    rest = rest[pretrain:]
    callbacks = [ValRecorder(records)]
    if rest[:1] == ["--interrupt-at"]:
        callbacks.append(Interrupt(int(rest[1])))
        rest = rest[2:]
    os.chdir(root)
    params = shrunk_params(*rest, root=root)
    if pretrain:
        run_pretrain(params, "t2")
    try:
        run_train(params, "t2", 0, callbacks=callbacks)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
