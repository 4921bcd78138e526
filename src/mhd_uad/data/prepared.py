"""Prepared volumes on disk: one folder per (set, modality), read by memory map.

artifacts/prepared/<set>_<modality>/
    images.npy   float32 [V, S, H, W]   preprocessed scans on the model grid
    masks.npy    float32 [V, S, H, W]   brain masks with their own values (soft at registered borders)
    segs.npy     uint8   [V, S, H, W]   segmentation label codes, > 0 is lesion (zeros for healthy scans)
    source_masks.npy  uint8 [B]        each scan's own brain mask (> 0) in its source grid, bit-packed
                                        (np.packbits, C order) one after the other
    index.json   names, labels, keys (image path relative to the data root), each scan's geometry
                 (data.geometry.ScanGeometry) and source-mask offset, and the preprocessing settings

The source brain masks make the set self-contained: maps go back to each scan's own space (zeroed outside
its brain) without reading data/ again, so the evaluate stage depends on the prepared set alone.

Training reads slices straight from the memory maps: no NIfTI decoding per epoch. Arrays are plain .npy,
read with allow_pickle=False.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mhd_uad.data.geometry import ScanGeometry
from mhd_uad.data.preprocess import PrepareSettings, preprocess_scan
from mhd_uad.data.splits import IXI, MODALITIES, SPLIT_NAME, SplitSettings, read_split_csv
from mhd_uad.errors import InputFileError
from mhd_uad.io import replace_dir

log = logging.getLogger(__name__)

ARRAYS = ("images", "masks", "segs")
FORMAT_VERSION = 2  # 2: soft masks (float32), segmentation labels, source brain masks


def prepared_name(set_name: str, modality: str) -> str:
    return f"{set_name}_{modality}"


@dataclass
class PreparedSet:
    """A prepared (set, modality): memory-mapped arrays plus the per-scan index."""

    folder: Path
    images: np.ndarray
    masks: np.ndarray
    segs: np.ndarray
    index: dict

    @classmethod
    def open(cls, folder: str | Path) -> PreparedSet:
        folder = Path(folder)
        index_path = folder / "index.json"
        if not index_path.is_file():
            raise InputFileError("prepared set not found (run the `prepare` stage: `dvc repro prepare`)", folder)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputFileError(f"unreadable index ({exc})", index_path) from None
        arrays = {}
        for name in ARRAYS:
            path = folder / f"{name}.npy"
            try:
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputFileError(f"unreadable prepared array ({exc})", path) from None
        if index.get("format_version") != FORMAT_VERSION:
            raise InputFileError(f"prepared with format {index.get('format_version')}, this version reads "
                                 f"{FORMAT_VERSION}: re-run the `prepare` stage", index_path)
        n = len(index.get("scans", []))
        for name, arr in arrays.items():
            if arr.shape[0] != n or arr.ndim != 4:
                raise InputFileError(f"{name}.npy has shape {arr.shape}, index lists {n} scans", folder)
        return cls(folder, arrays["images"], arrays["masks"], arrays["segs"], index)

    def __len__(self) -> int:
        return len(self.index["scans"])

    @property
    def keys(self) -> list[str]:
        return [s["key"] for s in self.index["scans"]]

    @property
    def names(self) -> list[str]:
        return [s["img_name"] for s in self.index["scans"]]

    def geometry(self, pos: int) -> ScanGeometry:
        return ScanGeometry.from_dict(self.index["scans"][pos]["geometry"])

    def source_mask(self, pos: int) -> np.ndarray:
        """The scan's own brain mask (bool) in its source grid."""
        record = self.index["scans"][pos]
        shape = tuple(record["geometry"]["source_shape"])
        start, stop = record["source_mask_bytes"]
        packed = np.load(self.folder / "source_masks.npy", mmap_mode="r", allow_pickle=False)[start:stop]
        return np.unpackbits(np.asarray(packed), count=int(np.prod(shape))).astype(bool).reshape(shape)

    def positions(self, frame: pd.DataFrame, source: str | Path) -> list[int]:
        """Positions of a split's scans (by `rel_img_path`) in this prepared set."""
        where = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in frame["rel_img_path"] if k not in where]
        if missing:
            raise InputFileError(f"{len(missing)} scans of the split are not in the prepared set {self.folder} "
                                 f"(first: {missing[0]}); re-run `dvc repro prepare`", source)
        return [where[k] for k in frame["rel_img_path"]]


def collect_scans(splits_dir: Path, data_root: Path, settings: SplitSettings) -> dict[tuple[str, str], pd.DataFrame]:
    """Every (set, modality) the pipeline needs and its unique scans, gathered from the split lists."""
    frames: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for csv in sorted(splits_dir.glob("*.csv")):
        match = SPLIT_NAME.match(csv.name)
        if not match:
            continue
        set_name = match.group("set")
        if set_name == IXI:
            modalities = list(MODALITIES)
        elif set_name in settings.datasets:
            modalities = [settings.datasets[set_name]["modality"]]
        else:
            continue
        for modality in modalities:
            frames.setdefault((set_name, modality), []).append(read_split_csv(csv, data_root, modality))
    if not frames:
        raise InputFileError("no split lists found (run the `splits` stage first)", splits_dir)
    return {
        key: pd.concat(parts, ignore_index=True).drop_duplicates("rel_img_path").sort_values("rel_img_path")
        .reset_index(drop=True)
        for key, parts in frames.items()
    }


def write_prepared_set(folder: Path, scans: pd.DataFrame, settings: PrepareSettings, desc: str) -> None:
    """Preprocess each scan straight into memory-mapped arrays (no whole set in RAM)."""
    shape = (len(scans), settings.grid[2], settings.grid[0], settings.grid[1])
    folder.mkdir(parents=True)
    outs = {
        "images": np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.float32, shape=shape),
        "masks": np.lib.format.open_memmap(folder / "masks.npy", mode="w+", dtype=np.float32, shape=shape),
        "segs": np.lib.format.open_memmap(folder / "segs.npy", mode="w+", dtype=np.uint8, shape=shape),
    }
    records, offset, outside = [], 0, []
    packed_part = folder / "source_masks.part"
    with packed_part.open("wb") as packed:
        for i, row in enumerate(tqdm(scans.itertuples(index=False), total=len(scans), desc=desc, unit="scan")):
            scan = preprocess_scan(row.img_path, row.mask_path, row.seg_path or None, settings)
            if int(row.label) != 0 and not scan.seg.any():
                outside.append(str(row.img_name))
            outs["images"][i], outs["masks"][i], outs["segs"][i] = scan.image, scan.mask, scan.seg
            bits = np.packbits(np.ascontiguousarray(scan.source_brain).ravel())
            packed.write(bits.tobytes())
            records.append({
                "img_name": str(row.img_name), "label": int(row.label), "key": str(row.rel_img_path),
                "geometry": scan.geometry.as_dict(), "source_mask_bytes": [offset, offset + bits.size],
                "brain_voxels": int((scan.mask > 0).sum()), "lesion_voxels": int((scan.seg > 0).sum()),
            })
            offset += bits.size
    for arr in outs.values():
        arr.flush()
    del outs
    _part_to_npy(packed_part, folder / "source_masks.npy", offset)
    if outside:  # kept, as the original: AP/AUROC undefined, Dice counted, voxels in the val pool
        log.warning("%s: %d lesioned scans have no lesion voxel on the model grid (lesion outside the crop; "
                    "kept, left out of AP/AUROC): %s", folder.name, len(outside), ", ".join(outside))
    index = {"format_version": FORMAT_VERSION, "axes": "scan, axial slice (Z), X, Y",
             "settings": settings.as_dict(), "scans": records}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _part_to_npy(part: Path, out: Path, size: int, chunk: int = 1 << 26) -> None:
    """A raw byte file -> a 1-D uint8 .npy, copied in chunks (the masks of a large set need not fit in RAM)."""
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(size,))
    with part.open("rb") as fh:
        for start in range(0, size, chunk):
            block = np.frombuffer(fh.read(chunk), dtype=np.uint8)
            arr[start:start + block.size] = block
    arr.flush()
    del arr
    part.unlink()


def build_prepare_stage(
    splits_dir: str | Path, data_root: str | Path, out_dir: str | Path,
    split_settings: SplitSettings, settings: PrepareSettings, only: Sequence[str] | None = None,
) -> list[Path]:
    """The `prepare` stage: every needed (set, modality) under out_dir, replaced whole on success."""
    splits_dir, data_root, out_dir = Path(splits_dir), Path(data_root), Path(out_dir)
    groups = collect_scans(splits_dir, data_root, split_settings)
    with replace_dir(out_dir) as tmp:
        for (set_name, modality), scans in groups.items():
            name = prepared_name(set_name, modality)
            if only and name not in only:
                continue
            write_prepared_set(tmp / name, scans, settings, desc=f"prepare {name}")
    return sorted(p for p in out_dir.iterdir() if p.is_dir())
