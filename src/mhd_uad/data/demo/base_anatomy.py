"""`BaseAnatomy`: a base anatomy on the working grid, the type that `anatomy` makes (`load_base_anatomy`) and
`warps` and the rest of the generator read; a module of its own so that neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BaseAnatomy:
    """A template resampled to the working grid, with the derived maps the lesion recipes need.

    `channels` is (10, X, Y, Z) float64 in RAS order: T1, GM, WM, CSF, brain mask (soft), T1 texture
    (relative deviation from the PV model), depth below the brain surface (mm), distance to the
    ventricles (mm), ventricle map, deep GM (indexed by anatomy.T1 ... anatomy.DGM). Coordinates in "grid
    mm" are index * voxel_size; world = origin + that.
    """

    channels: np.ndarray
    voxel_size: float
    origin_mm: np.ndarray
    centre_mm: np.ndarray  # brain-mask centroid, grid mm
    vent_centre_mm: np.ndarray  # ventricle-system centroid, grid mm
    lateral_vent_mm: tuple[np.ndarray, np.ndarray]  # left (x < midline) and right lateral ventricle centroids
    midline_mm: float  # x of the mid-sagittal plane, grid mm
    description: str
    files: tuple[str, ...]
    name: str = "custom"
    notice: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.channels.shape[1:])  # type: ignore[return-value]
