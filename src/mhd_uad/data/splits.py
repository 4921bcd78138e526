"""Split lists in the authors' CSV format: read them (with their quirks), or make seeded ones.

The format (method.md §2.1, real examples in the published split folder): an unnamed index column,
`img_name`, dataset-specific metadata, `label`, `img_path`, `mask_path`, `seg_path`; paths relative to the
data root and written with a leading `/` (`/Train/ixi/t1/X_t1.nii.gz`); the image path is always the T1
one, and the T2 path is derived from it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from mhd_uad.errors import ConfigError, InputFileError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("img_name", "label", "img_path", "mask_path", "seg_path")
MODALITIES = ("t1", "t2")
IXI = "IXI"
AVAIL_T2 = "avail_t2.csv"
SPLIT_NAME = re.compile(r"^(?P<set>.+?)_(?P<part>train_fold\d+|val_fold\d+|val|test)\.csv$")


def derive_modality_path(path: str, modality: str) -> str:
    """The path of `modality` from the authors' T1 path.

    The original replaces the substring `t1` everywhere, which also rewrites names that contain it
    (`patient13` -> `patient23`); here only the modality folder and the `_t1` file suffix change, and
    BraTS's `FLAIR.nii.gz` becomes `t2.nii.gz` (method.md §2.1).
    """
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    if modality == "t1":
        return path
    parts = list(PurePosixPath(path).parts)
    parts = ["t2" if p == "t1" else p for p in parts[:-1]] + parts[-1:]
    name = parts[-1]
    name = re.sub(r"_t1(\.nii(\.gz)?)$", r"_t2\1", name)
    name = re.sub(r"FLAIR(\.nii(\.gz)?)$", r"t2\1", name)
    parts[-1] = name
    return str(PurePosixPath(*parts))


def resolve_under(data_root: Path, rel: str, csv_path: Path, column: str) -> Path:
    """Join an authors'-style path (leading `/` = data root) to data_root; refuse anything that leaves it."""
    rel = str(rel).strip()
    if not rel:
        raise InputFileError(f"empty `{column}`", csv_path)
    if re.match(r"^[A-Za-z]:[\\/]", rel) or "\\" in rel or "\x00" in rel:
        raise InputFileError(f"unsafe `{column}` {rel!r}: not a relative POSIX path", csv_path)
    normalised = os.path.normpath(rel.lstrip("/"))
    if normalised in (".", "") or normalised == ".." or normalised.startswith("../"):
        raise InputFileError(f"unsafe `{column}` {rel!r}: it points outside the data root {data_root}", csv_path)
    return data_root / normalised


def _read_available_t2(path: Path) -> set[str]:
    try:
        frame = pd.read_csv(path, index_col=0)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputFileError(f"unreadable T2 availability list ({exc})", path) from None
    if frame.shape[1] < 1:
        raise InputFileError("T2 availability list needs one column of file names", path)
    return set(frame.iloc[:, 0].astype(str))


def read_split_csv(
    csv_path: str | Path,
    data_root: str | Path,
    modality: str,
    *,
    available_t2: set[str] | None = None,
) -> pd.DataFrame:
    """Read one split CSV of the authors' format into absolute paths for `modality`.

    Returns at least `img_name, label, img_path, mask_path, seg_path` (absolute, under data_root; seg empty
    for healthy rows) plus `rel_img_path` (the image path relative to data_root, the key of prepared
    arrays) and any metadata columns. Rows are kept as listed: a scan listed twice (as in the published IXI
    lists) is trained on twice, as the original does (the `splits` stage drops repeats when
    `splits.drop_duplicates` is on). In T2 mode, IXI rows are kept only if their T2 file is in the availability
    list (`available_t2`, or `avail_t2.csv` beside the CSV when present), as the original does.
    """
    csv_path = Path(csv_path)
    data_root = Path(data_root)
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})", csv_path)
    if not csv_path.is_file():
        raise InputFileError("split CSV not found", csv_path)
    try:
        frame = pd.read_csv(csv_path, index_col=0, dtype={"img_path": str, "mask_path": str, "seg_path": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputFileError(f"unreadable split CSV ({type(exc).__name__}: {exc})", csv_path) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise InputFileError(f"split CSV lacks the columns {', '.join(missing)}", csv_path)
    if frame.empty:
        raise InputFileError("split CSV lists no scans", csv_path)
    frame = frame.reset_index(drop=True)
    frame["seg_path"] = frame["seg_path"].fillna("").astype(str)
    frame["img_name"] = frame["img_name"].astype(str)
    for column in ("img_path", "mask_path"):
        if frame[column].isna().any():
            row = int(frame.index[frame[column].isna()][0])
            raise InputFileError(f"empty `{column}` in data row {row + 1}", csv_path)
    try:
        frame["label"] = frame["label"].astype(int)
    except (TypeError, ValueError):
        raise InputFileError("`label` must be 0 (healthy) or 1 (lesioned) in every row", csv_path) from None

    duplicated = frame["img_path"].duplicated(keep="first")
    if duplicated.any():
        log.info("%s: %d rows repeat a scan listed before (kept, as the original trains on them)", csv_path,
                 int(duplicated.sum()))

    rel = frame["img_path"].map(lambda p: derive_modality_path(str(p).strip(), modality))
    if modality == "t2":
        is_ixi = frame["img_path"].str.contains("/ixi/", case=False, regex=False)
        avail = available_t2
        if avail is None and (csv_path.parent / AVAIL_T2).is_file():
            avail = _read_available_t2(csv_path.parent / AVAIL_T2)
        if avail is not None:
            keep = ~is_ixi | rel.map(lambda p: PurePosixPath(p).name in avail)
            if (~keep).any():
                log.info("%s: %d IXI rows without T2 dropped", csv_path, int((~keep).sum()))
            frame, rel = frame.loc[keep].reset_index(drop=True), rel.loc[keep].reset_index(drop=True)
        if frame.empty:
            raise InputFileError("no scan of this split has a T2 image", csv_path)

    out = frame.copy()
    out["img_path"] = [str(resolve_under(data_root, p, csv_path, "img_path")) for p in rel]
    out["mask_path"] = [str(resolve_under(data_root, p, csv_path, "mask_path")) for p in frame["mask_path"]]
    out["seg_path"] = [
        str(resolve_under(data_root, p, csv_path, "seg_path")) if p.strip() else "" for p in frame["seg_path"]
    ]
    out["rel_img_path"] = [os.path.relpath(p, data_root) for p in out["img_path"]]
    return out


def check_files_exist(frame: pd.DataFrame, csv_path: str | Path) -> None:
    """Every image, mask and (for lesioned rows) segmentation of a split must exist."""
    for column in ("img_path", "mask_path", "seg_path"):
        for value, label in zip(frame[column], frame["label"], strict=True):
            if not value:
                if column == "seg_path" and int(label) != 0:
                    raise InputFileError("a lesioned scan has no `seg_path`", csv_path)
                continue
            if not Path(value).is_file():
                raise InputFileError(f"{column.removesuffix('_path')} listed in {csv_path} is missing", value)


# ---------------------------------------------------------------------------------------------------------
# Seeded splits (used when data/splits/ holds none)


@dataclass(frozen=True)
class SplitSettings:
    num_folds: int
    ixi_test_fraction: float
    ixi_val_fraction: float
    seed: int
    datasets: Mapping[str, Mapping]
    drop_duplicates: bool = False

    @classmethod
    def from_params(cls, params) -> SplitSettings:
        s = params.splits
        settings = cls(int(s.num_folds), float(s.ixi_test_fraction), float(s.ixi_val_fraction), int(params.seed),
                       {k: dict(v) for k, v in params.datasets.items()}, bool(s.drop_duplicates))
        if settings.num_folds < 1:
            raise ConfigError(f"splits.num_folds must be at least 1, got {settings.num_folds}", "params.yaml")
        for name, frac in (("ixi_test_fraction", settings.ixi_test_fraction),
                           ("ixi_val_fraction", settings.ixi_val_fraction)):
            if not 0.0 < frac < 1.0:
                raise ConfigError(f"splits.{name} must lie in (0, 1), got {frac}", "params.yaml")
        for name, spec in settings.datasets.items():
            if spec.get("modality") not in MODALITIES:
                raise ConfigError(f"datasets.{name}.modality must be t1 or t2, got {spec.get('modality')!r}",
                                  "params.yaml")
            if not 0.0 < float(spec.get("val_fraction", -1)) < 1.0:
                raise ConfigError(f"datasets.{name}.val_fraction must lie in (0, 1)", "params.yaml")
            ignore = spec.get("ignore_labels", [])
            if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in ignore):
                raise ConfigError(f"datasets.{name}.ignore_labels must list segmentation labels in 1..255, "
                                  f"got {list(ignore)}", "params.yaml")
        return settings


def expected_split_files(settings: SplitSettings) -> list[str]:
    files = [f"{IXI}_train_fold{k}.csv" for k in range(settings.num_folds)]
    files += [f"{IXI}_val_fold{k}.csv" for k in range(settings.num_folds)] + [f"{IXI}_test.csv"]
    for name in settings.datasets:
        files += [f"{name}_val.csv", f"{name}_test.csv"]
    return files


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _scan_names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if p.is_file())


def _ixi_rows(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "img_name": [f"{n}_t1.nii.gz" for n in names],
        "label": 0,
        "img_path": [f"/Train/ixi/t1/{n}_t1.nii.gz" for n in names],
        "mask_path": [f"/Train/ixi/mask/{n}_mask.nii.gz" for n in names],
        "seg_path": "",
    }, index=pd.Index(range(len(names))))


def _test_rows(dataset: str, names: list[str]) -> pd.DataFrame:
    # The authors' lists name the T1 path even for sets used in T2; the reader derives the modality path.
    return pd.DataFrame({
        "img_name": names,
        "label": 1,
        "img_path": [f"/Test/{dataset}/t1/{n}_t1.nii.gz" for n in names],
        "mask_path": [f"/Test/{dataset}/mask/{n}_mask.nii.gz" for n in names],
        "seg_path": [f"/Test/{dataset}/seg/{n}_seg.nii.gz" for n in names],
    }, index=pd.Index(range(len(names))))


def make_splits(data_root: str | Path, settings: SplitSettings) -> dict[str, pd.DataFrame]:
    """Seeded IXI train/val folds plus an IXI test list, and a val/test split per test set.

    Each fold's val set is a contiguous window of one seeded permutation of the non-test scans, so val sets
    are disjoint across folds whenever num_folds × n_val fits (the published folds overlap).
    """
    data_root = Path(data_root)
    ixi_dir = data_root / "Train" / "ixi"
    names_t1 = _scan_names(ixi_dir / "t1", "_t1.nii.gz")
    if len(names_t1) < 3:
        raise InputFileError(f"need at least 3 healthy IXI scans in t1/, found {len(names_t1)}", ixi_dir)
    out: dict[str, pd.DataFrame] = {}
    order = _rng(settings.seed, IXI).permutation(len(names_t1))
    n_test = min(max(1, round(settings.ixi_test_fraction * len(names_t1))), len(names_t1) - 2)
    test = sorted(names_t1[i] for i in order[:n_test])
    rest = [names_t1[i] for i in order[n_test:]]
    n_val = min(max(1, round(settings.ixi_val_fraction * len(rest))), len(rest) - 1)
    out[f"{IXI}_test.csv"] = _ixi_rows(test)
    for k in range(settings.num_folds):
        val_idx = {(k * n_val + j) % len(rest) for j in range(n_val)}
        out[f"{IXI}_train_fold{k}.csv"] = _ixi_rows(sorted(n for i, n in enumerate(rest) if i not in val_idx))
        out[f"{IXI}_val_fold{k}.csv"] = _ixi_rows(sorted(n for i, n in enumerate(rest) if i in val_idx))
    names_t2 = set(_scan_names(ixi_dir / "t2", "_t2.nii.gz"))
    out[AVAIL_T2] = pd.DataFrame({"0": [f"{n}_t2.nii.gz" for n in names_t1 if n in names_t2]})

    for dataset, spec in settings.datasets.items():
        modality = spec["modality"]
        folder = data_root / "Test" / dataset / modality
        names = _scan_names(folder, f"_{modality}.nii.gz")
        if len(names) < 2:
            raise InputFileError(f"need at least 2 {modality.upper()} scans of {dataset} for a val/test split, "
                                 f"found {len(names)}", folder)
        order = _rng(settings.seed, dataset).permutation(len(names))
        n_val = min(max(1, round(float(spec["val_fraction"]) * len(names))), len(names) - 1)
        out[f"{dataset}_val.csv"] = _test_rows(dataset, sorted(names[i] for i in order[:n_val]))
        out[f"{dataset}_test.csv"] = _test_rows(dataset, sorted(names[i] for i in order[n_val:]))
    return out


def split_modalities(filename: str, settings: SplitSettings) -> list[str]:
    """Modalities in which a split file is read: IXI in both, a test set in its model's modality."""
    match = SPLIT_NAME.match(filename)
    if not match:
        return []
    name = match.group("set")
    if name == IXI:
        return list(MODALITIES)
    spec = settings.datasets.get(name)
    return [spec["modality"]] if spec else []


def _write_without_repeats(src: Path, dest: Path) -> None:
    """A split CSV with every repeated scan (same img_path) after its first row dropped, format kept."""
    try:
        frame = pd.read_csv(src, index_col=0, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputFileError(f"unreadable split CSV ({type(exc).__name__}: {exc})", src) from None
    if "img_path" not in frame.columns:
        raise InputFileError("split CSV lacks the column img_path", src)
    repeated = frame["img_path"].duplicated(keep="first")
    if repeated.any():
        log.info("%s: %d repeated rows dropped (splits.drop_duplicates)", src, int(repeated.sum()))
    frame.loc[~repeated].to_csv(dest, index=True, lineterminator="\n")


def build_splits_stage(data_root: str | Path, out_dir: str | Path, settings: SplitSettings) -> list[Path]:
    """The `splits` stage: copy data/splits/*.csv through when present, else write seeded lists.

    Every list is read back and every file it names is checked, then the folder replaces out_dir whole.
    """
    from mhd_uad.io import replace_dir

    data_root, out_dir = Path(data_root), Path(out_dir)
    if not data_root.is_dir():
        raise InputFileError("data root not found (run `mhd-uad demo-data --out data` or add real data)", data_root)
    given = data_root / "splits"
    with replace_dir(out_dir) as tmp:
        if given.is_dir() and any(given.glob("*.csv")):
            for name in expected_split_files(settings):
                if not (given / name).is_file():
                    raise InputFileError(f"split list {name} is missing (needed by the params' folds and datasets)",
                                         given / name)
            for src in sorted(given.glob("*.csv")):
                if settings.drop_duplicates and SPLIT_NAME.match(src.name):
                    _write_without_repeats(src, tmp / src.name)
                else:
                    shutil.copyfile(src, tmp / src.name)
        else:
            for name, frame in make_splits(data_root, settings).items():
                frame.to_csv(tmp / name, index=True, lineterminator="\n")
        for name in expected_split_files(settings):
            for modality in split_modalities(name, settings):
                frame = read_split_csv(tmp / name, data_root, modality)
                check_files_exist(frame, given / name if given.is_dir() else out_dir / name)
    return sorted(out_dir.glob("*.csv"))
