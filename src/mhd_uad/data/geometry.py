"""Where a prepared volume sits in the world, and the way back to its source scan's own grid.

Axis convention of every [S, H, W] volume in the package: S axial slices (the third voxel axis of an
atlas-space scan), then X and Y (`to_slices` / `from_slices`). Each prepared scan carries a
`ScanGeometry` (the model grid's shape and affine, the source scan's shape and affine), the way MONAI
keeps metadata with the data, so a map computed on the grid is written back as NIfTI in the source space.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


def to_slices(volume_xyz: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> [S=Z, H=X, W=Y] (also [N, X, Y, Z] -> [N, S, H, W]), contiguous: one axial slice is one
    contiguous block on disk."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(volume_xyz), -1, -3))


def from_slices(volume_shw: np.ndarray) -> np.ndarray:
    """[S, H, W] -> (X, Y, Z), the inverse of `to_slices`."""
    return np.moveaxis(np.asarray(volume_shw), -3, -1)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


@dataclass(frozen=True)
class ScanGeometry:
    """The model grid of a prepared scan and the source scan it came from (both voxel -> world, (X, Y, Z))."""

    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray

    def as_dict(self) -> dict:
        return {"grid_shape": list(self.grid_shape), "grid_affine": np.asarray(self.grid_affine).tolist(),
                "source_shape": list(self.source_shape), "source_affine": np.asarray(self.source_affine).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ScanGeometry:
        return cls(tuple(int(v) for v in d["grid_shape"]), np.asarray(d["grid_affine"], dtype=np.float64),
                   tuple(int(v) for v in d["source_shape"]), np.asarray(d["source_affine"], dtype=np.float64))


def to_source_space(volume_shw: np.ndarray, geometry: ScanGeometry,
                    source_mask: np.ndarray | None = None) -> np.ndarray:
    """A map on the model grid ([S, H, W]) resampled (trilinear) into its source scan's grid and affine.

    With `source_mask` the result is zeroed outside the scan's own brain mask (interpolation would
    otherwise spread the map a voxel past the brain's edge)."""
    import torch
    import torchio as tio

    image = tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(from_slices(volume_shw),
                                                                         dtype=np.float32))[None],
                            affine=np.asarray(geometry.grid_affine, dtype=np.float64))
    target = (tuple(int(s) for s in geometry.source_shape), np.asarray(geometry.source_affine, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tio.Resample(target, image_interpolation="linear")(image)
    result = out.data[0].numpy().astype(np.float32)
    if source_mask is not None:
        result *= np.asarray(source_mask) > 0
    return result
