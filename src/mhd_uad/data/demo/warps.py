"""Random fields and warps (demo-data.md §4.1.1).

Smooth Gaussian noise fields, the healthy backward map (affine, elastic and atrophy in one map from subject
grid mm to template grid mm), trilinear warping with `grid_sample`, and composition of backward maps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from mhd_uad.data.demo.base_anatomy import BaseAnatomy


def smooth_noise(rng: np.random.Generator, shape, corr_mm: float, voxel_size: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise with correlation length about `corr_mm`."""
    corr_vox = corr_mm / voxel_size
    if corr_vox <= 3.0:
        field = ndi.gaussian_filter(rng.standard_normal(shape), max(corr_vox, 0.5), mode="wrap")
    else:
        # Coarse lattice at half the correlation length, smoothed, then upsampled: cheap for long lengths.
        step = corr_vox / 2.0
        coarse_shape = tuple(int(np.ceil(s / step)) + 2 for s in shape)
        coarse = ndi.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap")
        t = torch.from_numpy(coarse)[None, None]
        field = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
    field = field - field.mean()
    return field / max(float(field.std()), 1e-12)


def _grid_mm(shape, v: float) -> np.ndarray:
    axes = [np.arange(s, dtype=np.float64) * v for s in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _radial_dilation(points: np.ndarray, centre: np.ndarray, amount: float, sigma_mm) -> np.ndarray:
    """Backward-map term that expands the space around `centre` (amount < 1 keeps the map invertible)."""
    d = points - centre
    g = np.exp(-0.5 * np.sum((d / np.asarray(sigma_mm)) ** 2, axis=-1))
    return -amount * d * g[..., None]


def atrophy_level(age: float) -> float:
    """0 at 20 years, 1 at 86: brain atrophy grows faster than linearly with age [approximate]."""
    return float(np.clip((age - 20.0) / 66.0, 0.0, 1.2) ** 1.5)


def healthy_backward_map(rng: np.random.Generator, base: BaseAnatomy, age: float = 50.0) -> np.ndarray:
    """Subject grid mm -> template grid mm: affine, elastic and atrophy in one map (demo-data.md §4.1.1).

    Ventricle enlargement follows the subject's age (`atrophy_level`) plus a subject-level spread."""
    shape, v = base.shape, base.voxel_size
    p = _grid_mm(shape, v)
    angles = np.deg2rad(rng.uniform(-6.0, 6.0, 3))
    scale = rng.uniform(0.94, 1.06, 3)
    shift = rng.uniform(-4.0, 4.0, 3)
    matrix = _rotation(angles) @ np.diag(1.0 / scale)
    q = base.centre_mm + (p - base.centre_mm) @ matrix.T + shift
    # Elastic: 8^3 Gaussian control grid, sigma 3 mm, cubic to 1/4 resolution, then linear up.
    control = rng.normal(0.0, 3.0, (3, 8, 8, 8))
    quarter = tuple(max(int(np.ceil(s / 4)), 2) for s in shape)
    coarse = np.stack([ndi.zoom(c, np.array(quarter) / 8.0, order=3, grid_mode=False) for c in control])
    t = torch.from_numpy(np.ascontiguousarray(coarse[:, : quarter[0], : quarter[1], : quarter[2]]))[None]
    elastic = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=True)[0].numpy()
    q += np.moveaxis(elastic, 0, -1)
    # Atrophy, for healthy and lesioned alike so that age is not the anomaly signal (§4.1.1).
    ventricle_growth = float(np.clip(0.02 + 0.3 * atrophy_level(age) + rng.normal(0.0, 0.04), 0.0, 0.45))
    q += _radial_dilation(p, base.vent_centre_mm, ventricle_growth, (18.0, 30.0, 15.0))
    return q


def _to_grid_sample(points_mm: np.ndarray, shape, v: float) -> torch.Tensor:
    """Grid mm -> grid_sample's normalised (x=W, y=H, z=D) coordinates, align_corners=True."""
    norm = points_mm / (v * (np.asarray(shape, dtype=np.float64) - 1.0)) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(norm[..., ::-1]))[None]


def warp_volumes(volumes: np.ndarray, points_mm: np.ndarray, v: float, padding: str = "zeros") -> np.ndarray:
    """Sample (C, X, Y, Z) `volumes` at template positions `points_mm` (X', Y', Z', 3), trilinear."""
    grid = _to_grid_sample(points_mm, volumes.shape[1:], v)
    out = F.grid_sample(
        torch.from_numpy(volumes)[None], grid, mode="bilinear", padding_mode=padding, align_corners=True
    )
    return out[0].numpy()


def compose_backward_maps(outer_mm: np.ndarray, inner_points_mm: np.ndarray, v: float) -> np.ndarray:
    """Return outer(inner(p)): `outer_mm` sampled at the points of the second (lesion) warp."""
    field = np.ascontiguousarray(np.moveaxis(outer_mm, -1, 0))
    return np.moveaxis(warp_volumes(field, inner_points_mm, v, padding="border"), 0, -1)
