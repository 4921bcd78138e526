"""Which raw scans to ingest, and where each output goes in the layout of architecture.md.

Two ways to name the inputs:
- a CSV manifest with the columns `set, modality, image` and optionally `name, mask, seg` (paths relative
  to the CSV's folder; `name` defaults to the image's file name without `.nii[.gz]`). Rows of one set that
  share a name are one subject: its first row's brain mask is the subject's mask, and every modality is
  cropped to it (so IXI's T1 and T2 share `mask/<name>_mask.nii.gz`, as the published layout has it);
- a folder with `--set S --modality M`: every `NAME.nii[.gz]` in it is an image, with its brain mask
  `NAME_mask.nii[.gz]` and its segmentation `NAME_seg.nii[.gz]` beside it when present.

Set `IXI` goes to `Train/ixi/`, any other set to `Test/<set>/`; each subject writes `<modality>/<name>_<modality>.nii.gz`,
`mask/<name>_mask.nii.gz`, `seg/<name>_seg.nii.gz` (with a segmentation), and `transforms/<name>_<modality>.tfm`
and `transforms/<name>.json` (the record of what produced them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mhd_uad.errors import ConfigError, InputFileError

MODALITIES = ("t1", "t2")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")


@dataclass(frozen=True)
class ScanSpec:
    """One raw image with its optional brain mask and segmentation (all in the image's own grid)."""

    set: str
    modality: str
    name: str
    image: Path
    mask: Path | None = None
    seg: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.set}/{self.name} ({self.modality})"


def nifti_stem(path: str | Path) -> str | None:
    match = _NIFTI.match(Path(path).name)
    return match.group("stem") if match else None


def _check_name(value: str, what: str, source: Path) -> str:
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise InputFileError(f"{what} {value!r} is not a safe file-name part (letters, digits, . _ + -; no path "
                             "separators, no leading dot): it would leave the output folder", source)
    return value


def _check_modality(value: str, source: Path) -> str:
    if value not in MODALITIES:
        raise InputFileError(f"modality must be one of {', '.join(MODALITIES)}, got {value!r}", source)
    return value


def read_manifest(path: str | Path) -> list[ScanSpec]:
    """Scans listed in a CSV manifest (see the module docstring)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputFileError("manifest not found", path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputFileError(f"not a readable CSV manifest ({exc})", path) from None
    missing = [c for c in ("set", "modality", "image") if c not in table.columns]
    if missing:
        raise InputFileError(f"manifest lacks the column(s) {', '.join(missing)} (needs set, modality, image; "
                             "optional name, mask, seg)", path)
    base = path.parent
    specs = []
    for row in table.to_dict("records"):
        image = base / row["image"].strip()
        name = row.get("name", "").strip() or nifti_stem(image) or image.name
        specs.append(ScanSpec(_check_name(row["set"].strip(), "set", path),
                              _check_modality(row["modality"].strip(), path), _check_name(name, "name", path), image,
                              base / row["mask"].strip() if row.get("mask", "").strip() else None,
                              base / row["seg"].strip() if row.get("seg", "").strip() else None))
    check_unique(specs, path)
    return specs


def scan_folder(folder: str | Path, set_name: str, modality: str) -> list[ScanSpec]:
    """Scans of a folder: `NAME.nii[.gz]` images with optional `NAME_mask` / `NAME_seg` siblings."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError("raw scan folder not found", folder)
    _check_name(set_name, "set", folder)
    _check_modality(modality, folder)
    files = {nifti_stem(p): p for p in sorted(folder.iterdir()) if p.is_file() and nifti_stem(p)}
    specs = []
    for stem, image in sorted(files.items()):
        if stem.endswith(("_mask", "_seg")):
            continue
        specs.append(ScanSpec(set_name, modality, _check_name(stem, "name", image), image,
                              files.get(f"{stem}_mask"), files.get(f"{stem}_seg")))
    if not specs:
        raise InputFileError("no NIfTI image (NAME.nii or NAME.nii.gz) in the raw scan folder", folder)
    return specs


def check_unique(specs: Iterable[ScanSpec], source: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for spec in specs:
        key = (set_dir_name(spec.set), spec.name, spec.modality)
        if key in seen:
            raise InputFileError(f"{spec.label} is listed twice", source)
        seen.add(key)


def set_dir_name(set_name: str) -> str:
    return "Train/ixi" if set_name.lower() == "ixi" else f"Test/{set_name}"


def group_subjects(specs: Iterable[ScanSpec]) -> list[list[ScanSpec]]:
    """Rows grouped by subject (set folder, name), in first-seen order; the first row is the reference."""
    groups: dict[tuple[str, str], list[ScanSpec]] = {}
    for spec in specs:
        groups.setdefault((set_dir_name(spec.set), spec.name), []).append(spec)
    return list(groups.values())


@dataclass(frozen=True)
class SubjectPaths:
    """Where one subject's outputs go, each checked to stay inside the output root."""

    root: Path
    set_dir: str
    name: str

    def _inside(self, *parts: str) -> Path:
        path = self.root.joinpath(self.set_dir, *parts)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ConfigError(f"output path {path} leaves the output folder", self.root)
        return path

    def image(self, modality: str) -> Path:
        return self._inside(modality, f"{self.name}_{modality}.nii.gz")

    @property
    def mask(self) -> Path:
        return self._inside("mask", f"{self.name}_mask.nii.gz")

    @property
    def seg(self) -> Path:
        return self._inside("seg", f"{self.name}_seg.nii.gz")

    def transform(self, modality: str) -> Path:
        return self._inside("transforms", f"{self.name}_{modality}.tfm")

    @property
    def record(self) -> Path:
        return self._inside("transforms", f"{self.name}.json")


def subject_paths(root: str | Path, group: list[ScanSpec]) -> SubjectPaths:
    return SubjectPaths(Path(root), set_dir_name(group[0].set), group[0].name)
