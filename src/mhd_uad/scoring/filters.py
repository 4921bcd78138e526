"""scipy.ndimage's conventions for torch code that must give its numbers: the 'reflect' extension of an index
and the Gaussian taps of gaussian_filter. Shared by the anomaly maps on the device (scoring.device_maps) and
the training augmentations (data.augment, torchio's RandomBlur is gaussian_filter)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GAUSSIAN_TRUNCATE = 4.0  # gaussian_filter's default
MIN_SIGMA = 1e-15  # gaussian_filter leaves an axis whose σ (in voxels) is at or below this untouched


def scipy_reflect(index, n: int):
    """Positions on an axis of length n for any integer offsets, extended as scipy's 'reflect'
    (d c b a | a b c d | d c b a), repeated with period 2n; numpy or torch in, the same out."""
    r = index % (2 * n)
    return torch.minimum(r, 2 * n - 1 - r) if isinstance(r, Tensor) else np.minimum(r, 2 * n - 1 - r)


def gaussian_taps(sigma: np.ndarray, truncate: float = GAUSSIAN_TRUNCATE) -> tuple[np.ndarray, int]:
    """gaussian_filter's 1-D weights for each σ (in voxels) at offsets -R..R: [m, 2R+1] with R the largest
    radius int(truncate·σ + 0.5), each row zero beyond its own radius and normalised; a σ <= MIN_SIGMA gives
    the identity tap, as scipy leaves that axis alone."""
    sigma = np.asarray(sigma, dtype=np.float64)
    active = sigma > MIN_SIGMA
    safe = np.where(active, sigma, 1.0)
    radius = np.where(active, np.floor(truncate * safe + 0.5), 0.0)
    big = int(radius.max(initial=0.0))
    t = np.arange(-big, big + 1)
    w = np.where(np.abs(t) <= radius[:, None], np.exp(-0.5 / (safe * safe)[:, None] * t**2), 0.0)
    w /= w.sum(axis=1, keepdims=True)
    w[~active] = t == 0
    return w, big
