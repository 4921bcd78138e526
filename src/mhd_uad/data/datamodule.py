"""Training data: random axial slices of prepared IXI volumes, with the intensity augmentations of §2.3.

The original draws one uniformly random axial slice per volume per epoch, with torchio's RandomGamma,
RandomBiasField, RandomBlur and RandomGhosting applied to the 3-D volume first, on train and val alike
(method.md §2.3.6-7). Here the loader workers only load volumes (one memory-mapped read each); the random
draws (slices, augmentation parameters) and the augmentations run after the batch is on the training
device (`SliceDrawer`, from `on_after_batch_transfer`), batched: the same transforms as torchio for the same
parameters, with torchio's parameter distributions (data.augment, tested against torchio), and computed
only for the slices drawn, which equals augmenting the volume and then slicing it. The augmentation sees the
prepared grid's spacing, so RandomBlur's σ (0-2 mm) is what the original applied to its 2 mm volume, and
RandomGhosting keeps the original's `restore` of 0.02. Differs knowingly in where, not what: the original
augments in its loader workers on the CPU (there, one 50×96×96 volume costs about 50 ms and starves a GPU).

The loaders' persistent workers start the next pass as soon as one ends (`PrestartingLoader`), so the first
batch of an epoch or a validation is not loaded while the device waits.

The draws come from the training process's torch RNG, so a fit does not depend on the number of loader
workers (data.num_workers; auto: from the CPUs). Split lists are used as given: a scan listed twice is drawn
twice per epoch, as in the original. The number of slices drawn per volume is a parameter
(`data.slices_per_volume`): they all come from the same augmented volume, which is what makes several
slices per volume cheap. Val items are seeded by their index (the original draws them at random), so the
validation loss compares epochs on the same slices, augmentations and noise.

Under DDP Lightning shards both loaders across the ranks (its DistributedSampler; the val shards padded to
equal length by repeating items, whose seeded slices and noise repeat with them); each rank needs at least
one full training batch of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate

from mhd_uad.config import auto_count, require
from mhd_uad.data.augment import AugmentParams, AugmentSettings, augment_slices, sample_params
from mhd_uad.data.prepared import PreparedSet, prepared_name
from mhd_uad.data.splits import IXI, read_split_csv
from mhd_uad.devices import usable_cpus

__all__ = ["AugmentSettings", "IXISliceDataModule", "SliceDrawer", "VolumeSliceDataset", "loader_workers"]

UNSEEDED = -1  # the seed of a training item: its draws come from the training process's RNG
MAX_AUTO_WORKERS = 8


def loader_workers(setting, cuda: bool) -> int:
    """data.num_workers as given, or for `auto`: beside a GPU min(8, CPUs - 1) (loading one volume is a
    memory-mapped read); on a CPU one, which reads the next volumes while the fit computes."""
    count = auto_count(setting, "data.num_workers", 0)
    if count is not None:
        return count
    cpus = usable_cpus()
    if not cuda:
        return 1 if cpus > 1 else 0
    return max(1, min(MAX_AUTO_WORKERS, cpus - 1))


class VolumeSliceDataset(Dataset):
    """Item i: volume positions[i] as loaded ([S, H, W] float32, "scan"), its position ("volume") and the
    seed of its draws ("seed": UNSEEDED for training items, `seed * 1_000_003 + i` for seeded val items).
    `SliceDrawer` turns a batch of them into slices.

    The memory maps are opened lazily in each worker (a pickled memmap would be copied whole).
    """

    def __init__(self, folder: str | Path, positions: list[int], seeded: bool = False, seed: int = 0):
        self.folder = Path(folder)
        self.positions = list(positions)
        self.seeded = seeded
        self.seed = int(seed)
        self._data: PreparedSet | None = None

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def data(self) -> PreparedSet:
        if self._data is None:
            self._data = PreparedSet.open(self.folder)
        return self._data

    @property
    def spacing_mm(self) -> float:
        """Voxel size of the prepared grid: torchio's blur σ is in mm (the original blurs the 2 mm volume)."""
        return float(self.data.index["settings"]["spacing_mm"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pos = self.positions[i]
        return {"scan": torch.from_numpy(np.array(self.data.images[pos], dtype=np.float32)),
                "volume": torch.tensor(pos), "seed": torch.tensor(self.seed * 1_000_003 + i if self.seeded else UNSEEDED)}


@dataclass(frozen=True)
class SliceDrawer:
    """A batch of loaded volumes -> `slices_per_volume` random axial slices of each, augmented, on the
    batch's device: {"image": [B·k, 1, H, W], "slice": [B·k], "volume": [B·k]}.

    Seeded items draw from their own generator (the same slices and augmentations every time), the others
    from the torch RNG of the process. The draws happen on the CPU; the augmentation where the volumes are."""

    slices_per_volume: int = 1
    augment: AugmentSettings | None = None
    spacing_mm: float = 1.0

    def _draw(self, n_slices: int, generator: torch.Generator | None, n: int) -> tuple[torch.Tensor, AugmentParams | None]:
        index = torch.randint(0, n_slices, (n, self.slices_per_volume), generator=generator)
        params = sample_params(self.augment, n, generator) if self.augment is not None else None
        return index, params

    def draw(self, seeds: torch.Tensor, n_slices: int) -> tuple[torch.Tensor, AugmentParams | None]:
        """Slice indices [B, k] and augmentation parameters (None without augmentation) for a batch."""
        seeds = [int(s) for s in seeds.tolist()]
        if all(s == UNSEEDED for s in seeds):
            return self._draw(n_slices, None, len(seeds))
        parts = [self._draw(n_slices, None if s == UNSEEDED else torch.Generator().manual_seed(s), 1)
                 for s in seeds]
        index = torch.cat([p[0] for p in parts])
        params = AugmentParams.collate([p[1] for p in parts]) if self.augment is not None else None
        return index, params

    def __call__(self, batch: dict[str, torch.Tensor], drawn: tuple | None = None) -> dict[str, torch.Tensor]:
        """The slices of a batch of volumes; `drawn` = self.draw(...) made before the batch went to the device
        (drawing from a batch on a GPU would wait for it)."""
        volumes = batch["scan"]  # [B, S, H, W]
        n, n_slices, height, width = volumes.shape
        index, params = drawn or self.draw(batch["seed"], n_slices)  # on the CPU: augment_slices reads them there
        on_device = index.to(volumes.device, non_blocking=True)
        if params is None:
            slices = torch.gather(volumes, 1, on_device[:, :, None, None].expand(-1, -1, height, width))
        else:
            slices = augment_slices(volumes, index, params, self.spacing_mm)
        k = self.slices_per_volume
        return {"image": slices.reshape(n * k, 1, height, width).contiguous(), "slice": on_device.reshape(-1),
                "volume": batch["volume"].to(volumes.device).repeat_interleave(k)}


class PrepareAhead(pl.Callback):
    """After each training step's backward, the next batch of the epoch is made ready on the device
    (`IXISliceDataModule.prepare_ahead`), while the device still works on the step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        prepare = getattr(trainer.datamodule, "prepare_ahead", None)
        if prepare is not None:
            prepare()


class PrestartingLoader(DataLoader):
    """A DataLoader whose persistent workers start the next pass the moment one ends, instead of when the
    next pass is asked for. Lightning asks at the start of each epoch (train) and each validation (val), so
    without this the first batch of every pass is one worker's whole batch of reads with the device idle;
    with it the train batches load during the epoch's last step and its validation, the val batches during
    the training epoch. The same batches in the same order: the next pass's order is drawn from the
    sampler's own generator, as it would be a moment later. Without persistent workers, a plain DataLoader."""

    _prestarted = False

    current: _Pass | None = None  # the pass under way (the one `IXISliceDataModule.prepare_ahead` takes from)

    def __iter__(self):
        if self._prestarted:
            self._prestarted = False
            self.current = _Pass(self, self._iterator)
        else:
            self.current = _Pass(self, super().__iter__())
        return self.current

    def _prestart(self) -> bool:
        """Start the next pass in the persistent workers; whether it did (not without them, nor twice)."""
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None and not self._prestarted:
            self._iterator._reset(self)  # what DataLoader.__iter__ does for persistent workers (torch's private API)
            self._prestarted = True
        return self._prestarted


class _Pass:
    """One pass of a `PrestartingLoader`: its iterator, which prestarts the next pass as soon as it has handed
    out its last batch. Lightning knows a pass's length and never asks past its last batch (the StopIteration
    that a `for` loop waits for never comes there), so the pass counts its batches; one it cannot count (a
    loader without a length) prestarts at that StopIteration instead. Once the next pass is under way in the
    same iterator, this pass hands out nothing more. `take_ahead` fetches the next batch early and keeps what
    is made of it to hand out next."""

    def __init__(self, loader: PrestartingLoader, iterator):
        self.loader, self.iterator = loader, iterator
        try:
            self.length: int | None = len(loader)
        except TypeError:
            self.length = None
        self.served, self.ended = 0, False
        self.ready = None  # the next batch, taken ahead

    def __iter__(self):
        return self

    def __next__(self):
        if self.ready is not None:
            batch, self.ready = self.ready, None
            return batch
        return self._fetch()

    def _fetch(self):
        if self.ended:
            raise StopIteration
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.ended = True
            self.loader._prestart()
            raise
        self.served += 1
        # the last batch handed out: nothing of this pass is still loading (the workers' sampler is exhausted)
        if self.served == self.length and self.loader._prestart():
            self.ended = True
        return batch

    def take_ahead(self, make) -> bool:
        """Fetch the next batch now and hand out make(batch) at the next request; only while the pass has a
        batch left by its count (never past its end, nor for a pass that cannot be counted)."""
        if self.ready is not None or self.ended or self.length is None or self.served >= self.length:
            return False
        self.ready = make(self._fetch())
        return True

    def __len__(self) -> int:
        return len(self.iterator)


def collate_volumes(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacked items; in a loader worker straight into shared memory (torch's default_collate does that), so a
    batch is not copied again on its way to the training process."""
    return default_collate(items)


class IXISliceDataModule(pl.LightningDataModule):
    """Healthy IXI slices of one fold and modality: train and val loaders over the prepared arrays, whose
    batches of volumes become slices on the training device (`on_after_batch_transfer`, `SliceDrawer`)."""

    def __init__(self, prepared_dir: str | Path, splits_dir: str | Path, data_root: str | Path, modality: str,
                 fold: int, batch_size: int, slices_per_volume: int = 1, num_workers: int | str = 0,
                 augment: AugmentSettings | None = None, seed: int = 0):
        super().__init__()
        require(batch_size >= 1 and slices_per_volume >= 1, "batch size and slices per volume must be >= 1")
        require(batch_size % slices_per_volume == 0,
                f"the batch size ({batch_size} slices) must be a multiple of data.slices_per_volume "
                f"({slices_per_volume})")
        self.folder = Path(prepared_dir) / prepared_name(IXI, modality)
        self.splits_dir, self.data_root = Path(splits_dir), Path(data_root)
        self.modality, self.fold = modality, int(fold)
        self.batch_size, self.slices_per_volume = int(batch_size), int(slices_per_volume)
        self.num_workers, self.augment, self.seed = num_workers, augment, int(seed)
        loader_workers(num_workers, False)  # a bad setting fails here, before any fit
        self.train_set: VolumeSliceDataset | None = None
        self.val_set: VolumeSliceDataset | None = None
        self.drawer: SliceDrawer | None = None
        self._drawn: tuple | None = None  # the draws of the batch between the two transfer hooks

    def split_positions(self, part: str) -> list[int]:
        csv = self.splits_dir / f"{IXI}_{part}_fold{self.fold}.csv"
        frame = read_split_csv(csv, self.data_root, self.modality)
        return PreparedSet.open(self.folder).positions(frame, csv)

    def setup(self, stage: str | None = None) -> None:
        spv = self.slices_per_volume
        self.train_set = VolumeSliceDataset(self.folder, self.split_positions("train"))
        self.val_set = VolumeSliceDataset(self.folder, self.split_positions("val"), seeded=True, seed=self.seed)
        self.drawer = SliceDrawer(spv, self.augment, self.train_set.spacing_mm)
        ranks = self.trainer.world_size if self.trainer is not None else 1
        require(-(-len(self.train_set) // ranks) * spv >= self.batch_size,  # a shard holds ceil(n / ranks)
                f"fold {self.fold} has {len(self.train_set)} training volumes: too few for a batch of "
                f"{self.batch_size} slices" + (f" on each of {ranks} processes" if ranks > 1 else ""))

    def _cuda(self) -> bool:
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self, dataset: VolumeSliceDataset, train: bool) -> DataLoader:
        """The loader's order and its workers' seeds come from generators of its own, seeded from the torch
        RNG once: the process's RNG, which draws the slices and augmentations, then does not depend on the
        number of workers (a DataLoader draws its workers' seed from it every epoch without workers, once
        with persistent ones)."""
        cuda = self._cuda()
        workers = loader_workers(self.num_workers, cuda)
        seeds = torch.randint(0, 2**62, (2,)).tolist()
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seeds[0])) if train else None
        return PrestartingLoader(dataset, batch_size=self.batch_size // self.slices_per_volume, sampler=sampler,
                                 drop_last=train, num_workers=workers, collate_fn=collate_volumes,
                                 generator=torch.Generator().manual_seed(seeds[1]), persistent_workers=workers > 0,
                                 pin_memory=cuda, prefetch_factor=4 if workers > 0 and cuda else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def prepare_ahead(self) -> bool:
        """Make the next training batch of the epoch ready on the device now, as Lightning would make it at the
        next step's start (its input conversion, `on_before_batch_transfer`, the transfer and
        `on_after_batch_transfer`); `PrepareAhead` calls this after each step's backward. With fp16 AMP the
        optimizer step waits for the device (the grad scaler reads its inf check), so the host's work between
        two steps (the draws, the augmentation's planning and launches, the transfer) left the device idle;
        made during the backward, it is hidden behind the device's work. The draws keep their place in the
        torch RNG's stream: after the step's own draws (its forward) and before anything the next step draws,
        the optimizer step drawing nothing. Returns whether a batch was made (not the epoch's last step)."""
        from lightning.pytorch.trainer import call

        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None else None
        under_way = getattr(loader, "current", None)
        if under_way is None:
            return False

        def make(batch):
            batch = trainer.precision_plugin.convert_input(batch)
            batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
            return call._call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=0)

        return under_way.take_ahead(make)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """The batch's draws, on the CPU while it is still there (kept for `on_after_batch_transfer`, which
        Lightning calls next for the same batch)."""
        if isinstance(batch, dict) and "scan" in batch:
            self._drawn = self.drawer.draw(batch["seed"], batch["scan"].shape[1])
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Volumes on the device -> slices, augmented there (`SliceDrawer`)."""
        if isinstance(batch, dict) and "scan" in batch:
            drawn, self._drawn = self._drawn, None
            return self.drawer(batch, drawn)
        return batch
