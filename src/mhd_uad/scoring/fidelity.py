"""How faithfully the mean reconstruction keeps a healthy scan: the in-distribution check of a cDDPM.

On healthy brain voxels an ideal model gives back the scan, so every shortfall there is a false-positive floor
under each anomaly map. Over Ω = {mask > 0}, with x the scan and μ the mean of the N reconstructions (both on
the model's [0, 1] scale):

- `brain_l1`: mean |μ − x| (how far the reconstruction is, all tissue together);
- `bias_bright` / `bias_dark`: mean μ − x over the brain voxels with x >= 0.9 / x < 0.3 (T2: CSF / white
  matter; T1: white matter / CSF). A model that keeps contrast has both near 0; one that pulls contrast toward
  the mean has the bright negative and the dark positive, and its map is then highest over the brightest
  tissue of any scan;
- `contrast`: the least-squares slope of μ on x over the brain, the share of the scan's contrast the
  reconstruction keeps (1: all of it; 0.8: a fifth is lost to the mean).

`FidelitySums` holds the sums these come from, so scans pool exactly (voxel-weighted): add them, then `summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from mhd_uad.errors import MhdUadError

BRIGHT = 0.9  # [0, 1] scale: the preprocessing maps the brain's prepare.percentiles (1st, 99th) to 0 and 1
DARK = 0.3


@dataclass(frozen=True)
class FidelitySums:
    """Float64 sums over a scan's (or several scans') brain voxels; `summary` turns them into the figures."""

    n: float = 0.0
    abs_diff: float = 0.0
    n_bright: float = 0.0
    diff_bright: float = 0.0
    n_dark: float = 0.0
    diff_dark: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def __add__(self, other: FidelitySums) -> FidelitySums:
        return FidelitySums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_array(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in fields(self)], dtype=np.float64)

    @classmethod
    def from_array(cls, values) -> FidelitySums:
        return cls(*(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)))

    def summary(self) -> dict[str, float]:
        """{"brain_l1", "bias_bright", "bias_dark", "contrast", "n_voxels", "bright_share", "dark_share"}; a
        figure without voxels to average is nan (so is the contrast of a constant scan)."""
        def mean(total: float, count: float) -> float:
            return total / count if count > 0 else float("nan")

        var = self.xx - self.x * self.x / self.n if self.n > 0 else 0.0
        cov = self.xy - self.x * self.y / self.n if self.n > 0 else 0.0
        return {"brain_l1": mean(self.abs_diff, self.n), "bias_bright": mean(self.diff_bright, self.n_bright),
                "bias_dark": mean(self.diff_dark, self.n_dark),
                "contrast": cov / var if var > 1e-12 * max(self.n, 1.0) else float("nan"),
                "n_voxels": int(self.n), "bright_share": mean(self.n_bright, self.n),
                "dark_share": mean(self.n_dark, self.n)}


def fidelity_sums(image: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray | None) -> FidelitySums:
    """The sums of one scan: `image` and `reconstruction` (the mean of the N) on the same grid and scale."""
    x = np.asarray(image, dtype=np.float64)
    y = np.asarray(reconstruction, dtype=np.float64)
    if x.shape != y.shape:
        raise MhdUadError(f"the reconstruction {y.shape} does not match the scan {x.shape}")
    brain = np.ones(x.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    if brain.shape != x.shape:
        raise MhdUadError(f"the mask {brain.shape} does not match the scan {x.shape}")
    x, y = x[brain], y[brain]  # numpy sums below, not BLAS dots: the same bits whatever the thread count
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise MhdUadError("the scan or its reconstruction is not finite inside the brain")
    d = y - x
    bright, dark = x >= BRIGHT, x < DARK
    return FidelitySums(n=float(x.size), abs_diff=float(np.abs(d).sum()), n_bright=float(bright.sum()),
                        diff_bright=float(d[bright].sum()), n_dark=float(dark.sum()), diff_dark=float(d[dark].sum()),
                        x=float(x.sum()), y=float(y.sum()), xx=float(np.sum(x * x)), xy=float(np.sum(x * y)))


def reconstruction_fidelity(image: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray | None) -> dict:
    """`FidelitySums.summary` of one scan."""
    return fidelity_sums(image, reconstruction, mask).summary()
