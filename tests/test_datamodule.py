import numpy as np
import pytest
import torch

from conftest import run_data_stages
from mhd_uad.data.datamodule import AugmentSettings, IXISliceDataModule, VolumeSliceDataset
from mhd_uad.data.prepared import PreparedSet
from mhd_uad.data.splits import read_split_csv
from mhd_uad.errors import ConfigError


@pytest.fixture(scope="module")
def stage_dirs(tiny_data, demo_params, tmp_path_factory):
    root = run_data_stages(tiny_data, tmp_path_factory.mktemp("dm"), demo_params, only=["IXI_t1", "IXI_t2"])
    return root / "prepared", root / "splits", tiny_data


def test_batches_hold_random_axial_slices_of_the_folds_volumes(stage_dirs, demo_params):
    prepared, splits, data = stage_dirs
    dm = IXISliceDataModule(prepared, splits, data, "t2", fold=0, batch_size=8, slices_per_volume=4,
                            augment=AugmentSettings.from_params(demo_params))
    dm.setup()
    train = read_split_csv(splits / "IXI_train_fold0.csv", data, "t2")
    ps = PreparedSet.open(prepared / "IXI_t2")
    assert sorted(dm.train_set.positions) == sorted(ps.positions(train, "x"))
    batch = next(iter(dm.train_dataloader()))
    s, x, y = ps.images.shape[1:]
    assert batch["image"].shape == (8, 1, x, y) and batch["mask"].shape == (8, 1, x, y)
    assert batch["slice"].min() >= 0 and batch["slice"].max() < s
    assert torch.isfinite(batch["image"]).all()
    assert set(batch["volume"].tolist()) <= set(dm.train_set.positions)


def test_without_augmentation_slices_equal_the_prepared_arrays(stage_dirs):
    prepared, _, _ = stage_dirs
    ps = PreparedSet.open(prepared / "IXI_t1")
    ds = VolumeSliceDataset(prepared / "IXI_t1", [2, 0], slices_per_volume=3)
    item = ds[0]
    for k, s in enumerate(item["slice"].tolist()):
        np.testing.assert_array_equal(item["image"][k, 0].numpy(), ps.images[2, s])
        np.testing.assert_array_equal(item["mask"][k, 0].numpy(), ps.masks[2, s])


def test_val_items_repeat_exactly_and_train_items_vary(stage_dirs, demo_params):
    prepared, _, _ = stage_dirs
    aug = AugmentSettings(1.0, 1.0, 1.0, 1.0)
    val = VolumeSliceDataset(prepared / "IXI_t1", [0, 1], 2, aug, seeded=True, seed=5)
    a, b = val[1], val[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["slice"], b["slice"])
    train = VolumeSliceDataset(prepared / "IXI_t1", [0, 1], 2, aug)
    assert not torch.equal(train[1]["image"], train[1]["image"])


def test_batch_size_must_be_a_multiple_of_slices_per_volume(stage_dirs):
    prepared, splits, data = stage_dirs
    with pytest.raises(ConfigError, match="multiple of data.slices_per_volume"):
        IXISliceDataModule(prepared, splits, data, "t1", 0, batch_size=6, slices_per_volume=4)


def test_augmentation_sees_the_prepared_spacing_and_the_original_ghosting(stage_dirs, monkeypatch):
    import torchio as tio

    prepared, _, _ = stage_dirs
    ghosting = [t for t in AugmentSettings().transform().transforms if isinstance(t, tio.RandomGhosting)]
    assert ghosting and ghosting[0].restore == (0.02, 0.02)  # exactly 0.02, as torchio 0.18.73 in the original
    spacing = PreparedSet.open(prepared / "IXI_t1").index["settings"]["spacing_mm"]
    seen = []

    class Spy:
        def __call__(self, image):
            seen.append(image.spacing)
            return image

    ds = VolumeSliceDataset(prepared / "IXI_t1", [0], 1, AugmentSettings(0.0, 0.0, 1.0, 0.0))
    ds._transform = Spy()
    ds[0]
    assert seen == [(spacing, spacing, spacing)] and spacing != 1.0  # σ of RandomBlur is in mm


def test_a_scan_listed_twice_is_drawn_twice(stage_dirs, tmp_path):
    import pandas as pd

    prepared, splits, data = stage_dirs
    (tmp_path / "splits").mkdir()
    for csv in splits.glob("*.csv"):
        (tmp_path / "splits" / csv.name).write_bytes(csv.read_bytes())
    frame = pd.read_csv(splits / "IXI_train_fold0.csv", index_col=0)
    pd.concat([frame, frame.iloc[:1]], ignore_index=True).to_csv(tmp_path / "splits" / "IXI_train_fold0.csv")
    dm = IXISliceDataModule(prepared, tmp_path / "splits", data, "t1", 0, batch_size=4, slices_per_volume=2)
    dm.setup()
    assert len(dm.train_set) == len(frame) + 1 and dm.train_set.positions.count(dm.train_set.positions[0]) == 2
