import logging
from dataclasses import replace

import pandas as pd
import pytest

from mhd_uad.data.splits import (
    SplitSettings,
    build_splits_stage,
    derive_modality_path,
    expected_split_files,
    make_splits,
    read_split_csv,
)
from mhd_uad.errors import InputFileError


@pytest.mark.parametrize("name", ["Brats21_test", "Brats21_val", "IXI_test", "IXI_train_fold0", "IXI_val_fold0",
                                  "MSLUB_test", "MSLUB_val"])
@pytest.mark.parametrize("modality", ["t1", "t2"])
def test_reads_every_published_split_csv(fixture_splits, tmp_path, name, modality):
    frame = read_split_csv(fixture_splits / f"{name}.csv", tmp_path, modality)
    assert {"img_name", "label", "img_path", "mask_path", "seg_path", "rel_img_path"} <= set(frame.columns)
    raw = pd.read_csv(fixture_splits / f"{name}.csv", index_col=0)
    if modality == "t1":
        assert len(frame) == len(raw)  # rows as listed, repeats included
    for column in ("img_path", "mask_path"):
        assert all(p.startswith(str(tmp_path) + "/") for p in frame[column])
    assert all(f"/{modality}/" in p and p.endswith(f"_{modality}.nii.gz") for p in frame["img_path"])
    if name.startswith("IXI"):
        assert (frame["label"] == 0).all() and (frame["seg_path"] == "").all()
    else:
        assert (frame["label"] == 1).all() and all(p.startswith(str(tmp_path)) for p in frame["seg_path"])


def test_published_ixi_duplicates_are_kept_as_given(fixture_splits, tmp_path, caplog):
    raw = pd.read_csv(fixture_splits / "IXI_train_fold0.csv", index_col=0)
    with caplog.at_level(logging.INFO):
        frame = read_split_csv(fixture_splits / "IXI_train_fold0.csv", tmp_path, "t1")
    assert len(raw) == len(frame) == 387 and frame["img_path"].nunique() < 387  # method.md §2.1
    assert "repeat a scan listed before (kept" in caplog.text


def test_the_drop_duplicates_option_drops_repeated_rows_of_given_lists(tiny_data, demo_params, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "splits").mkdir()
    settings = SplitSettings.from_params(demo_params)
    for name, frame in make_splits(data, settings).items():
        if name == "IXI_train_fold0.csv":
            frame = pd.concat([frame, frame.iloc[:2]], ignore_index=True)  # two rows listed twice
        frame.to_csv(data / "splits" / name, index=True, lineterminator="\n")
    build_splits_stage(data, tmp_path / "as_given", settings)
    kept = read_split_csv(tmp_path / "as_given" / "IXI_train_fold0.csv", data, "t1")
    build_splits_stage(data, tmp_path / "dropped", replace(settings, drop_duplicates=True))
    dropped = read_split_csv(tmp_path / "dropped" / "IXI_train_fold0.csv", data, "t1")
    assert len(kept) == len(dropped) + 2 and not dropped["img_path"].duplicated().any()
    assert list(dropped["img_path"]) == list(dict.fromkeys(kept["img_path"]))
    header = (tmp_path / "dropped" / "IXI_train_fold0.csv").read_text().splitlines()[0]
    assert header == ",img_name,label,img_path,mask_path,seg_path"


def test_ignore_labels_must_be_segmentation_labels(demo_params):
    from conftest import REPO
    from mhd_uad.config import compose
    from mhd_uad.errors import ConfigError

    assert SplitSettings.from_params(compose(["datasets.WMH.ignore_labels=[2]"], REPO)).datasets["WMH"][
        "ignore_labels"] == [2]
    with pytest.raises(ConfigError, match="datasets.WMH.ignore_labels"):
        SplitSettings.from_params(compose(["datasets.WMH.ignore_labels=[0]"], REPO))


def test_t2_mode_keeps_only_ixi_scans_with_a_t2(fixture_splits, tmp_path):
    t1 = read_split_csv(fixture_splits / "IXI_train_fold0.csv", tmp_path, "t1")
    t2 = read_split_csv(fixture_splits / "IXI_train_fold0.csv", tmp_path, "t2")
    assert 0 < len(t1) - len(t2) <= 3  # method.md §2.1: 385–386 of 387 rows have a T2
    with pytest.raises(InputFileError, match="no scan of this split has a T2"):
        read_split_csv(fixture_splits / "IXI_train_fold0.csv", tmp_path, "t2", available_t2=set())


def test_modality_path_changes_only_folder_and_suffix():
    assert derive_modality_path("/Test/MSLUB/t1/patient13_t1.nii.gz", "t2") == "/Test/MSLUB/t2/patient13_t2.nii.gz"
    assert derive_modality_path("/Train/ixi/t1/IXI012-HH-1211_t1.nii.gz", "t2") == "/Train/ixi/t2/IXI012-HH-1211_t2.nii.gz"
    assert derive_modality_path("/Test/Brats21/flair/X_FLAIR.nii.gz", "t2") == "/Test/Brats21/flair/X_t2.nii.gz"
    assert derive_modality_path("/Test/WMH/t1/a_t1.nii.gz", "t1") == "/Test/WMH/t1/a_t1.nii.gz"


def _csv(path, rows, columns=("img_name", "label", "img_path", "mask_path", "seg_path")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path)
    return path


@pytest.mark.parametrize("bad", ["/Train/../../etc/passwd", "../outside_t1.nii.gz", "C:\\data\\x_t1.nii.gz", "/.."])
def test_paths_leaving_the_data_root_are_rejected(tmp_path, bad):
    csv = _csv(tmp_path / "x.csv", [["a", 0, bad, "/Train/ixi/mask/a_mask.nii.gz", ""]])
    with pytest.raises(InputFileError, match="img_path") as err:
        read_split_csv(csv, tmp_path / "data", "t1")
    assert str(csv) in str(err.value)


def test_missing_columns_and_empty_lists_are_errors(tmp_path):
    csv = _csv(tmp_path / "x.csv", [["a", 0, "/x_t1.nii.gz"]], columns=("img_name", "label", "img_path"))
    with pytest.raises(InputFileError, match="lacks the columns mask_path, seg_path"):
        read_split_csv(csv, tmp_path, "t1")
    empty = _csv(tmp_path / "e.csv", [])
    with pytest.raises(InputFileError, match="lists no scans"):
        read_split_csv(empty, tmp_path, "t1")
    with pytest.raises(InputFileError, match="not found"):
        read_split_csv(tmp_path / "absent.csv", tmp_path, "t1")


def _settings(params, **over):
    settings = SplitSettings.from_params(params)
    return SplitSettings(**{**settings.__dict__, **over})


def test_seeded_splits_are_deterministic_disjoint_and_complete(tiny_data, demo_params):
    settings = _settings(demo_params, num_folds=3, ixi_val_fraction=0.2)
    a, b = make_splits(tiny_data, settings), make_splits(tiny_data, settings)
    assert set(a) == set(expected_split_files(settings)) | {"avail_t2.csv"}
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    test = set(a["IXI_test.csv"]["img_path"])
    vals = [set(a[f"IXI_val_fold{k}.csv"]["img_path"]) for k in range(3)]
    for k in range(3):
        train = set(a[f"IXI_train_fold{k}.csv"]["img_path"])
        assert not train & vals[k] and not train & test and not vals[k] & test
        assert len(train | vals[k] | test) == 8
    assert not vals[0] & vals[1]
    other = make_splits(tiny_data, _settings(demo_params, num_folds=3, ixi_val_fraction=0.2, seed=7))
    assert any(not a[n].equals(other[n]) for n in a)


def test_splits_stage_writes_the_authors_format_or_copies_given_lists(tiny_data, demo_params, tmp_path):
    settings = SplitSettings.from_params(demo_params)
    out = tmp_path / "splits"
    files = build_splits_stage(tiny_data, out, settings)
    assert {f.name for f in files} == set(expected_split_files(settings)) | {"avail_t2.csv"}
    header = (out / "Brats21_test.csv").read_text().splitlines()[0]
    assert header == ",img_name,label,img_path,mask_path,seg_path"
    frame = read_split_csv(out / "Brats21_test.csv", tiny_data, "t2")
    assert all(p.endswith("_t2.nii.gz") for p in frame["img_path"])

    assert not (tiny_data / "splits").exists()
    (tiny_data / "splits").mkdir()
    try:
        (tiny_data / "splits" / "Brats21_val.csv").write_text((out / "Brats21_val.csv").read_text())
        with pytest.raises(InputFileError, match="IXI_train_fold0.csv is missing"):
            build_splits_stage(tiny_data, tmp_path / "copied", settings)
        assert not (tmp_path / "copied").exists()
        for f in files:
            (tiny_data / "splits" / f.name).write_bytes(f.read_bytes())
        build_splits_stage(tiny_data, tmp_path / "copied", settings)
        assert (tmp_path / "copied" / "IXI_test.csv").read_bytes() == (out / "IXI_test.csv").read_bytes()
    finally:
        for f in (tiny_data / "splits").iterdir():
            f.unlink()
        (tiny_data / "splits").rmdir()


def test_splits_stage_names_a_missing_scan_and_leaves_no_output(tiny_data, demo_params, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = next((data / "Test" / "WMH" / "seg").iterdir())
    victim.unlink()
    with pytest.raises(InputFileError) as err:
        build_splits_stage(data, tmp_path / "splits", SplitSettings.from_params(demo_params))
    assert victim.name in str(err.value) and "missing" in str(err.value)
    assert not (tmp_path / "splits").exists()


def test_a_missing_modality_folder_is_named(tiny_data, demo_params, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / "Test" / "MSLUB" / "t2")
    with pytest.raises(InputFileError, match="need at least 2 T2 scans of MSLUB") as err:
        build_splits_stage(data, tmp_path / "splits", SplitSettings.from_params(demo_params))
    assert str(data / "Test" / "MSLUB" / "t2") in str(err.value)
