import os
import time

import numpy as np
import pytest
import torch

from conftest import run_data_stages
from mhd_uad.data.datamodule import (
    AugmentSettings,
    IXISliceDataModule,
    PrestartingLoader,
    SliceDrawer,
    VolumeSliceDataset,
    collate_volumes,
    loader_workers,
)
from mhd_uad.data.prepared import PreparedSet
from mhd_uad.data.splits import read_split_csv
from mhd_uad.errors import ConfigError


@pytest.fixture(scope="module")
def stage_dirs(tiny_data, demo_params, tmp_path_factory):
    root = run_data_stages(tiny_data, tmp_path_factory.mktemp("dm"), demo_params, only=["IXI_t1", "IXI_t2"])
    return root / "prepared", root / "splits", tiny_data


def _slices(dm, batch):
    return dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)


def test_batches_hold_random_axial_slices_of_the_folds_volumes(stage_dirs, demo_params):
    prepared, splits, data = stage_dirs
    dm = IXISliceDataModule(prepared, splits, data, "t2", fold=0, batch_size=8, slices_per_volume=4,
                            augment=AugmentSettings.from_params(demo_params))
    dm.setup()
    train = read_split_csv(splits / "IXI_train_fold0.csv", data, "t2")
    ps = PreparedSet.open(prepared / "IXI_t2")
    assert sorted(dm.train_set.positions) == sorted(ps.positions(train, "x"))
    loaded = next(iter(dm.train_dataloader()))
    s, x, y = ps.images.shape[1:]
    assert loaded["scan"].shape == (2, s, x, y)  # whole volumes leave the workers: 8 slices = 2 volumes × 4
    batch = _slices(dm, loaded)
    assert batch["image"].shape == (8, 1, x, y) and batch["slice"].shape == batch["volume"].shape == (8,)
    assert batch["slice"].min() >= 0 and batch["slice"].max() < s
    assert torch.isfinite(batch["image"]).all()
    assert set(batch["volume"].tolist()) <= set(dm.train_set.positions)


def test_without_augmentation_slices_equal_the_prepared_arrays(stage_dirs):
    prepared, _, _ = stage_dirs
    ps = PreparedSet.open(prepared / "IXI_t1")
    ds = VolumeSliceDataset(prepared / "IXI_t1", [2, 0])
    batch = SliceDrawer(3)(collate_volumes([ds[0], ds[1]]))
    for row, (pos, s) in enumerate(zip(batch["volume"].tolist(), batch["slice"].tolist(), strict=True)):
        np.testing.assert_array_equal(batch["image"][row, 0].numpy(), ps.images[pos, s])
    assert batch["volume"].tolist() == [2, 2, 2, 0, 0, 0]


def test_slices_are_the_torchio_reference_volume_sliced(stage_dirs):
    """The drawer's augmented slices are what the original did: augment the 3-D volume, then slice it."""
    from mhd_uad.data.augment import augment_volumes

    prepared, _, _ = stage_dirs
    ds = VolumeSliceDataset(prepared / "IXI_t1", [0, 1], seeded=True, seed=3)
    drawer = SliceDrawer(2, AugmentSettings(1.0, 1.0, 1.0, 1.0), ds.spacing_mm)
    loaded = collate_volumes([ds[0], ds[1]])
    index, params = drawer.draw(loaded["seed"], loaded["scan"].shape[1])
    whole = augment_volumes(loaded["scan"], params, ds.spacing_mm)
    expected = torch.stack([whole[b, index[b]] for b in range(2)]).reshape(4, 1, *whole.shape[2:])
    torch.testing.assert_close(drawer(loaded)["image"], expected, atol=1e-5, rtol=0)


def test_val_items_repeat_exactly_and_train_items_vary(stage_dirs, demo_params):
    prepared, _, _ = stage_dirs
    drawer = SliceDrawer(2, AugmentSettings(1.0, 1.0, 1.0, 1.0), 3.0)
    val = VolumeSliceDataset(prepared / "IXI_t1", [0, 1], seeded=True, seed=5)
    a, b = drawer(collate_volumes([val[1]])), drawer(collate_volumes([val[1]]))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["slice"], b["slice"])
    other = drawer(collate_volumes([VolumeSliceDataset(prepared / "IXI_t1", [0, 1], seeded=True, seed=6)[1]]))
    assert not torch.equal(a["image"], other["image"])
    train = VolumeSliceDataset(prepared / "IXI_t1", [0, 1])
    assert not torch.equal(drawer(collate_volumes([train[1]]))["image"], drawer(collate_volumes([train[1]]))["image"])


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_do_not_depend_on_the_number_of_loader_workers(stage_dirs, demo_params, workers):
    prepared, splits, data = stage_dirs

    def two_epochs(num_workers):
        torch.manual_seed(11)
        dm = IXISliceDataModule(prepared, splits, data, "t1", 0, batch_size=4, slices_per_volume=2,
                                num_workers=num_workers, augment=AugmentSettings.from_params(demo_params))
        dm.setup()
        train, val = dm.train_dataloader(), dm.val_dataloader()
        out = []
        for _ in range(2):
            out += [_slices(dm, b)["image"] for b in train] + [_slices(dm, b)["image"] for b in val]
        return out

    inline = two_epochs(0)
    assert len(inline) > 4 and all(torch.equal(a, b) for a, b in zip(inline, two_epochs(workers), strict=True))


def test_auto_workers_follow_the_cpus_and_bad_counts_are_refused(stage_dirs):
    prepared, splits, data = stage_dirs
    assert loader_workers("auto", cuda=False) == (1 if (os.cpu_count() or 1) > 1 else 0)
    assert 1 <= loader_workers("auto", cuda=True) <= 8
    assert loader_workers(3, cuda=True) == 3
    for bad in (-1, "many", 2.5):
        with pytest.raises(ConfigError, match="data.num_workers"):
            IXISliceDataModule(prepared, splits, data, "t1", 0, batch_size=4, num_workers=bad)


def test_batch_size_must_be_a_multiple_of_slices_per_volume(stage_dirs):
    prepared, splits, data = stage_dirs
    with pytest.raises(ConfigError, match="multiple of data.slices_per_volume"):
        IXISliceDataModule(prepared, splits, data, "t1", 0, batch_size=6, slices_per_volume=4)


def test_augmentation_sees_the_prepared_spacing_and_the_original_ghosting(stage_dirs, monkeypatch):
    import torchio as tio

    from mhd_uad.data import datamodule

    prepared, splits, data = stage_dirs
    ghosting = [t for t in AugmentSettings().transform().transforms if isinstance(t, tio.RandomGhosting)]
    assert ghosting and ghosting[0].restore == (0.02, 0.02)  # exactly 0.02, as torchio 0.18.73 in the original
    spacing = PreparedSet.open(prepared / "IXI_t1").index["settings"]["spacing_mm"]
    seen = []
    original = datamodule.augment_slices

    def spy(volumes, index, params, spacing_mm):
        seen.append(spacing_mm)
        return original(volumes, index, params, spacing_mm)

    monkeypatch.setattr(datamodule, "augment_slices", spy)
    dm = IXISliceDataModule(prepared, splits, data, "t1", 0, batch_size=2, augment=AugmentSettings(0.0, 0.0, 1.0, 0.0))
    dm.setup()
    _slices(dm, next(iter(dm.train_dataloader())))
    assert seen == [spacing] and spacing != 1.0  # σ of RandomBlur is in mm


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


class _Stamped(torch.utils.data.Dataset):
    """Item i: i and the wall-clock time it was loaded (in the worker)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([i, time.time()], dtype=torch.float64)


def _loader(cls, workers):
    sampler = torch.utils.data.RandomSampler(range(10), generator=torch.Generator().manual_seed(5))
    return cls(_Stamped(), batch_size=3, sampler=sampler, drop_last=True, num_workers=workers,
               persistent_workers=workers > 0, generator=torch.Generator().manual_seed(6))


def _one_pass(loader, counted: bool) -> list:
    """A whole pass, as a `for` loop takes it (until StopIteration) or as Lightning does (exactly len(loader)
    batches: it knows the length and never asks past the last)."""
    if not counted:
        return list(loader)
    it = iter(loader)
    return [next(it) for _ in range(len(loader))]


@pytest.mark.parametrize("counted", [False, True], ids=["for-loop", "lightning"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_prestarting_loader_loads_the_next_pass_before_it_is_asked_for(workers, counted):
    plain, early = _loader(torch.utils.data.DataLoader, workers), _loader(PrestartingLoader, workers)
    orders = {"plain": [], "early": []}
    asked, first_loaded = [], []
    for epoch in range(3):
        for name, loader in (("plain", plain), ("early", early)):
            if epoch == 2:  # a pass left early: the next one starts afresh, in order
                orders[name].append([int(i) for i in next(iter(loader))[:, 0]])
                continue
            time.sleep(0.2)  # the training step of the epoch's end, validation...
            asked.append(time.time()) if name == "early" else None
            batches = _one_pass(loader, counted)
            if name == "early":
                first_loaded.append(float(batches[0][0, 1]))
            orders[name].append([int(i) for b in batches for i in b[:, 0]])
    orders["early"].append([int(i) for b in _one_pass(early, counted) for i in b[:, 0]])
    orders["plain"].append([int(i) for b in _one_pass(plain, counted) for i in b[:, 0]])
    assert orders["early"] == orders["plain"]  # the same batches in the same order
    if workers:  # the second pass was loaded before it was asked for; the first could not be
        assert first_loaded[0] > asked[0] and first_loaded[1] < asked[1]
    else:
        assert all(loaded > a for loaded, a in zip(first_loaded, asked, strict=True))


def test_a_finished_pass_hands_out_nothing_of_the_next():
    """Once a pass has handed out its last batch the next pass is already loading in the same iterator; asking
    the finished pass for more ends it, and the next pass still starts at its own first batch."""
    plain, early = _loader(torch.utils.data.DataLoader, 2), _loader(PrestartingLoader, 2)
    finished = iter(early)
    first = [next(finished) for _ in range(len(early))]
    with pytest.raises(StopIteration):
        next(finished)
    with pytest.raises(StopIteration):
        next(finished)
    expected = [list(plain), list(plain)]
    got = [first, list(early)]
    assert [[b[:, 0].tolist() for b in p] for p in got] == [[b[:, 0].tolist() for b in p] for p in expected]


def test_a_batch_taken_ahead_is_handed_out_next_in_its_place():
    """take_ahead fetches the pass's next batch early and hands out what was made of it at the next request;
    not past the pass's end, and the batches and their order stay those of a plain loader."""
    plain, early = _loader(torch.utils.data.DataLoader, 2), _loader(PrestartingLoader, 2)
    expected = [b[:, 0].tolist() for _ in range(2) for b in plain]
    got, ahead = [], []
    for _ in range(2):
        it = iter(early)
        assert early.current is it
        for _ in range(len(early)):
            batch = next(it)
            got.append(batch[:, 0].tolist() if isinstance(batch, torch.Tensor) else batch)
            ahead.append(it.take_ahead(lambda b: ["made", b[:, 0].tolist()]))
            assert not it.take_ahead(lambda b: None)  # one at a time
        with pytest.raises(StopIteration):
            next(it)
    assert ahead == [True, True, False] * 2  # the last batch of a pass: nothing left to take
    assert [g[1] if g[0] == "made" else g for g in got] == expected
    assert [g[0] == "made" for g in got] == [False, True, True] * 2
