"""resume.py: the best weights are the ones Lightning's ModelCheckpoint (the original's) would keep, and the
resume points are written on their clock, whole, with the best weights in them."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from mhd_uad.errors import MhdUadError
from mhd_uad.resume import BestWeights, ResumePoints

# val losses per epoch: a tie with the best, a NaN, a rise, and the lowest value reached twice
VAL_LOSSES = [3.0, 2.0, 2.0, math.nan, 1.5, 1.7, 1.5, 1.0, 1.0, 1.2]


class Scripted(pl.LightningModule):
    """A linear layer that trains for real (its weights differ every step) and logs the scripted val loss of
    each epoch; the stage exports `net.`."""

    exported_prefix = "net."

    def __init__(self, losses):
        super().__init__()
        self.net, self.losses = torch.nn.Linear(4, 1), losses

    def training_step(self, batch, batch_idx):
        return ((self.net(batch[0]) - batch[1]) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(self.losses[self.current_epoch]), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


def _fit(tmp_path, callbacks, epochs=None, ckpt_path=None, losses=VAL_LOSSES):
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=epochs or len(losses), logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, accelerator="cpu",
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         callbacks=callbacks)
    trainer.fit(Scripted(losses), _loader(), _loader(4), ckpt_path=ckpt_path)
    return trainer


def test_the_best_weights_are_model_checkpoints_choice(tmp_path):
    best = BestWeights("val/loss")
    reference = ModelCheckpoint(dirpath=tmp_path / "ref", filename="best", monitor="val/loss", mode="min",
                                save_top_k=1, enable_version_counter=False)
    _fit(tmp_path, [best, reference])
    chosen = torch.load(reference.best_model_path, weights_only=False)
    assert best.score == float(reference.best_model_score) == 1.0
    assert best.step == chosen["global_step"] == 2 * 8  # the first epoch at 1.0 (2 steps an epoch), not the second
    weights = best.exported()
    assert sorted(weights) == ["bias", "weight"] and all(v.device.type == "cpu" for v in weights.values())
    for name, value in weights.items():
        assert torch.equal(value, chosen["state_dict"][f"net.{name}"])


def test_a_nan_first_validation_is_kept_until_a_number_beats_it(tmp_path):
    best = BestWeights("val/loss")
    _fit(tmp_path, [best], epochs=2, losses=[math.nan, 5.0])
    assert best.score == 5.0 and best.step == 4
    best = BestWeights("val/loss")
    _fit(tmp_path, [best], epochs=1, losses=[math.nan])
    assert best.score == math.inf and best.weights is not None


def test_resume_points_follow_their_clock_and_carry_the_best_weights(tmp_path, monkeypatch):
    written = []
    real = pl.Trainer.save_checkpoint
    monkeypatch.setattr(pl.Trainer, "save_checkpoint",
                        lambda self, path, *a, **k: (written.append(self.global_step), real(self, path, *a, **k)))
    last = tmp_path / "ckpt" / "last.ckpt"
    last.parent.mkdir()
    _fit(tmp_path, [BestWeights("val/loss"), ResumePoints(last, every_s=0.0)], epochs=4)
    assert written == [2, 4, 6]  # every epoch end but the last (the stage exports then)
    written.clear()
    points = ResumePoints(last, every_s=3600.0)
    _fit(tmp_path, [BestWeights("val/loss"), points], epochs=4)
    assert written == [2] and len(points.seconds) == 1  # the first epoch of the run, then an hour later
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left
    state = torch.load(last, weights_only=False)["callbacks"]["BestWeights"]
    assert state["score"] == 3.0 and state["step"] == 2 and sorted(state["weights"]) == ["bias", "weight"]


def test_a_resumed_fit_keeps_the_best_of_the_epochs_before_the_interruption(tmp_path):
    last = tmp_path / "last.ckpt"
    losses = [3.0, 1.0, 2.0, 2.5, 1.5]
    first = BestWeights("val/loss")
    _fit(tmp_path, [first, ResumePoints(last, every_s=0.0)], epochs=3, losses=losses)  # resume point at step 4
    resumed = BestWeights("val/loss")
    _fit(tmp_path, [resumed], epochs=5, ckpt_path=last, losses=losses)
    assert resumed.score == 1.0 and resumed.step == 4  # epochs 3 and 4 (2.5, 1.5) did not beat epoch 1
    for name, value in resumed.exported().items():
        assert torch.equal(value, first.exported()[name])


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_no_resume_point_after_the_last_step(tmp_path, every_s):
    last = tmp_path / "last.ckpt"
    _fit(tmp_path, [BestWeights("val/loss"), ResumePoints(last, every_s=every_s)], epochs=1)
    assert not last.exists()


def test_a_resume_point_that_cannot_be_written_is_named_and_leaves_no_file(tmp_path, monkeypatch):
    def full_disk(self, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", full_disk)
    last = tmp_path / "ckpt" / "last.ckpt"
    last.parent.mkdir()
    with pytest.raises(MhdUadError, match="could not write the resume point .No space left on device.") as exc:
        _fit(tmp_path, [BestWeights("val/loss"), ResumePoints(last, every_s=0.0)], epochs=3)
    assert str(last) in str(exc.value) and list(last.parent.iterdir()) == []
