"""Training data: random axial slices of prepared IXI volumes, with the intensity augmentations of §2.3.

The original draws one uniformly random axial slice per volume per epoch, with torchio's RandomGamma,
RandomBiasField, RandomBlur and RandomGhosting applied to the 3-D volume first, on train and val alike
(method.md §2.3.6-7). The volume carries the prepared grid's spacing, so RandomBlur's σ (0-2 mm) is what
the original applied to its 2 mm volume, and RandomGhosting keeps the original's `restore` of 0.02.
Split lists are used as given: a scan listed twice is drawn twice per epoch, as in the original.
Here the number of slices drawn per volume is a parameter (`data.slices_per_volume`): the augmented
volume is reused for all of them, which is what makes several slices per volume cheap. Val items are
seeded by their index (the original draws them at random), so the validation loss compares epochs on the
same slices and noise.

Under DDP Lightning shards both loaders across the ranks (its DistributedSampler; the val shards padded to
equal length by repeating items, whose seeded slices and noise repeat with them); each rank needs at least
one full training batch of its own.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mhd_uad.config import require
from mhd_uad.data.prepared import PreparedSet, prepared_name
from mhd_uad.data.splits import IXI, read_split_csv

GHOSTING_RESTORE = 0.02  # torchio 0.18.73 restored exactly this (the original); 1.x samples (0, r) or None


@dataclass(frozen=True)
class AugmentSettings:
    gamma_p: float = 0.5
    bias_field_p: float = 0.25
    blur_p: float = 0.25
    ghosting_p: float = 0.5

    @classmethod
    def from_params(cls, params) -> AugmentSettings:
        a = params.data.augment
        out = cls(float(a.gamma_p), float(a.bias_field_p), float(a.blur_p), float(a.ghosting_p))
        for name, value in out.__dict__.items():
            require(0.0 <= value <= 1.0, f"data.augment.{name} must be a probability, got {value}")
        return out

    def transform(self):
        import torchio as tio

        return tio.Compose([
            tio.RandomGamma(p=self.gamma_p),
            tio.RandomBiasField(p=self.bias_field_p),
            tio.RandomBlur(p=self.blur_p),  # σ in mm: the volume carries its real spacing (see _sample)
            tio.RandomGhosting(p=self.ghosting_p, restore=(GHOSTING_RESTORE, GHOSTING_RESTORE)),
        ])


class VolumeSliceDataset(Dataset):
    """Item i: `slices_per_volume` random axial slices of volume positions[i], as [k, 1, H, W] in [0, 1] scale.

    The memory maps are opened lazily in each worker (a pickled memmap would be copied whole).
    """

    def __init__(self, folder: str | Path, positions: list[int], slices_per_volume: int = 1,
                 augment: AugmentSettings | None = None, seeded: bool = False, seed: int = 0):
        self.folder = Path(folder)
        self.positions = list(positions)
        self.slices_per_volume = int(slices_per_volume)
        self.augment = augment
        self.seeded = seeded
        self.seed = int(seed)
        self._data: PreparedSet | None = None
        self._transform = None

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

    def _sample(self, i: int) -> dict[str, torch.Tensor]:
        pos = self.positions[i]
        volume = torch.from_numpy(np.array(self.data.images[pos], dtype=np.float32))  # [S, H, W]
        if self.augment is not None:
            import torchio as tio

            if self._transform is None:
                self._transform = self.augment.transform()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = tio.ScalarImage(tensor=volume[None], affine=np.diag([*[self.spacing_mm] * 3, 1.0]))
                volume = self._transform(image).data[0]
        idx = torch.randint(0, volume.shape[0], (self.slices_per_volume,))
        mask = torch.from_numpy(np.array(self.data.masks[pos][idx.numpy()], dtype=np.float32))
        return {"image": volume[idx].unsqueeze(1).contiguous(), "mask": mask.unsqueeze(1), "slice": idx,
                "volume": torch.full((self.slices_per_volume,), pos)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.seeded:
            return self._sample(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + i)
            return self._sample(i)


def collate_slices(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


class IXISliceDataModule(pl.LightningDataModule):
    """Healthy IXI slices of one fold and modality: train and val loaders over the prepared arrays."""

    def __init__(self, prepared_dir: str | Path, splits_dir: str | Path, data_root: str | Path, modality: str,
                 fold: int, batch_size: int, slices_per_volume: int = 1, num_workers: int = 0,
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
        self.num_workers, self.augment, self.seed = int(num_workers), augment, int(seed)
        self.train_set: VolumeSliceDataset | None = None
        self.val_set: VolumeSliceDataset | None = None

    def split_positions(self, part: str) -> list[int]:
        csv = self.splits_dir / f"{IXI}_{part}_fold{self.fold}.csv"
        frame = read_split_csv(csv, self.data_root, self.modality)
        return PreparedSet.open(self.folder).positions(frame, csv)

    def setup(self, stage: str | None = None) -> None:
        spv = self.slices_per_volume
        self.train_set = VolumeSliceDataset(self.folder, self.split_positions("train"), spv, self.augment)
        self.val_set = VolumeSliceDataset(self.folder, self.split_positions("val"), spv, self.augment,
                                          seeded=True, seed=self.seed)
        ranks = self.trainer.world_size if self.trainer is not None else 1
        require(-(-len(self.train_set) // ranks) * spv >= self.batch_size,  # a shard holds ceil(n / ranks)
                f"fold {self.fold} has {len(self.train_set)} training volumes: too few for a batch of "
                f"{self.batch_size} slices" + (f" on each of {ranks} processes" if ranks > 1 else ""))

    def _loader(self, dataset: VolumeSliceDataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size // self.slices_per_volume, shuffle=train,
                          drop_last=train, num_workers=self.num_workers, collate_fn=collate_slices,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)
