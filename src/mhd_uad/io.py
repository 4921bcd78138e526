"""NIfTI and file I/O: validated reads, deterministic atomic writes, JSON-safe values.

Every writer goes through `atomic_path`: the output appears under its final name only when complete, so an
interrupted stage leaves nothing half-written. NIfTI files are gzipped with a zero timestamp and no file
name in the gzip header, so the same array and affine always give the same bytes (DVC checksums stay valid
on any machine).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from mhd_uad.errors import InputFileError


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, remove it otherwise.

    `suffix` lets writers that infer the format from the name (np.save, nibabel) see the right extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{sfx}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(tree):
    """A tree of dicts, lists and tuples as strict JSON takes it: NaN and ±inf (e.g. the Dice of a fold without a
    single prediction) become None (null), numpy scalars Python numbers, tuples lists; the rest is left as is."""
    if isinstance(tree, dict):
        return {k: json_safe(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [json_safe(v) for v in tree]
    if isinstance(tree, float | np.floating):
        return float(tree) if math.isfinite(tree) else None
    if isinstance(tree, np.integer):
        return int(tree)
    return tree


def nifti_bytes(array: np.ndarray, affine: np.ndarray, *, dtype=None, gz: bool = True) -> bytes:
    """Serialise an array as NIfTI-1, gzipped deterministically (mtime 0, no name) when `gz`."""
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, *, dtype=None) -> Path:
    """Write `array` with `affine` to `path` (.nii or .nii.gz) atomically and byte-reproducibly."""
    path = Path(path)
    atomic_write_bytes(path, nifti_bytes(array, affine, dtype=dtype, gz=path.name.endswith(".gz")))
    return path


def load_nifti(path: str | Path, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI as float32 with its affine; every failure is an InputFileError naming the file.

    Checks: the file exists and decodes completely (truncated gzip included), is 3-D (a trailing
    singleton 4th axis is dropped), is non-empty, and holds only finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{what} file not found", path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise InputFileError(f"unreadable or truncated NIfTI {what} ({type(exc).__name__}: {exc})", path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputFileError(f"{what} must be a 3-D volume, got shape {tuple(data.shape)}", path)
    if data.size == 0:
        raise InputFileError(f"{what} is empty (shape {tuple(data.shape)})", path)
    if not np.isfinite(affine).all():
        raise InputFileError(f"{what} has a non-finite affine", path)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputFileError(f"{what} contains {int(bad.sum())} NaN/inf voxels", path)
    return data, affine


def check_same_geometry(
    ref_path: str | Path,
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    other_path: str | Path,
    other_shape: tuple[int, ...],
    other_affine: np.ndarray,
    *,
    what: str = "mask",
    atol: float = 1e-3,
) -> None:
    """Raise InputFileError when two volumes of one scan differ in shape or affine."""
    if tuple(ref_shape) != tuple(other_shape):
        raise InputFileError(
            f"{what} shape {tuple(other_shape)} does not match the image shape {tuple(ref_shape)} of {ref_path}",
            other_path,
        )
    if not np.allclose(ref_affine, other_affine, atol=atol):
        raise InputFileError(f"{what} affine does not match the affine of the image {ref_path}", other_path)


@contextlib.contextmanager
def replace_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` whole, else it is removed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
