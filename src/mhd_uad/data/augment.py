"""Batched, device-agnostic intensity augmentations: torchio 1.2.1's four training transforms in torch.

The original applies `tio.Compose([RandomGamma(p=0.5), RandomBiasField(p=0.25), RandomBlur(p=0.25),
RandomGhosting(p=0.5, restore=0.02)])` to each 3-D volume [S, H, W] (torchio's spatial axes 0, 1, 2 are
our S, H, W; the volume's isotropic spacing turns blur σ in mm into voxels) and then draws axial slices.
Here the random parameters are drawn up front (`sample_params`, on the CPU, torchio's distributions) and
the transforms run batched on whatever device the volumes are on (`augment_volumes`), or only for the
slices that are actually used (`augment_slices`). The plan (which volume needs what, blur taps, the small
per-axis matrices) is made with numpy on the CPU; all volume-sized work is torch on the volumes' device.
Params on the CPU (as sampled) cost no device syncs; params on a GPU are copied back once per call.
For the same parameters the result is torchio's (to float32 rounding), computed in a different form:

- Gamma: sign(x)|x|^γ, as torchio (for x >= 0 it equals its x^γ).
- BiasField: exp of torchio's polynomial (its 'xy' meshgrid and transpose put the first exponent on S, the
  second on H, the third on W; coordinates (i - (n-1)/2) / ((n-1)/2), 0 for n = 1), evaluated in float64
  and factorised per axis instead of summed over 3-D monomials.
- Blur: scipy.ndimage.gaussian_filter's kernel (truncate 4, radius int(4σ + 0.5), axes with σ <= 1e-15
  skipped) and its 'reflect' boundary, as an n×n matrix per axis instead of a 1-D correlation.
- Ghosting: the planes torchio scales and restores depend only on the index along the ghosting axis, so its
  3-D FFT reduces to a 1-D one along that axis; its real part is a real circulant n×n matrix, applied by a
  matrix product instead of FFTs. restore is the original's fixed 0.02 (float64); torchio 1.2.1's
  RandomGhosting(restore=(0.02, 0.02)) draws it as float32 0.0199999996, which restores one plane fewer
  only where 0.02·n is an odd integer + 1/2 (n = 75, 175, ...), not for the grids used here.
- augment_slices: the maps along S (blur, ghosting on axis 0) are applied only to the rows that give the
  requested slices, gamma and bias only on the S-rows those rows read, the in-plane maps on the k slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from mhd_uad.scoring.filters import MIN_SIGMA, gaussian_taps, scipy_reflect

# torchio's defaults, as the original used them
LOG_GAMMA = (-0.3, 0.3)
BIAS_COEFFICIENT = 0.5
BIAS_ORDER = 3
BLUR_STD_MM = (0.0, 2.0)
GHOSTS = (4, 10)
GHOST_INTENSITY = (0.5, 1.0)
GHOST_RESTORE = 0.02  # torchio 0.18.73 restored exactly this (the original); 1.x samples (0, r) or None
GHOST_AXES = (0, 1, 2)



def _bias_exponents(order: int) -> list[tuple[int, int, int]]:
    """(S, H, W) exponents of the bias polynomial, in the order of torchio's coefficients."""
    return [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]


BIAS_EXPONENTS = _bias_exponents(BIAS_ORDER)
N_BIAS = len(BIAS_EXPONENTS)  # 20 for order 3


@dataclass(frozen=True)
class AugmentSettings:
    """Probability of each of the four augmentations (data.augment in params)."""

    gamma_p: float = 0.5
    bias_field_p: float = 0.25
    blur_p: float = 0.25
    ghosting_p: float = 0.5

    @classmethod
    def from_params(cls, params) -> AugmentSettings:
        from mhd_uad.config import require

        a = params.data.augment
        out = cls(float(a.gamma_p), float(a.bias_field_p), float(a.blur_p), float(a.ghosting_p))
        for name, value in out.__dict__.items():
            require(0.0 <= value <= 1.0, f"data.augment.{name} must be a probability, got {value}")
        return out

    def transform(self):
        """The torchio reference: what the original applied to each volume (the volume carries its spacing)."""
        import torchio as tio

        return tio.Compose([
            tio.RandomGamma(p=self.gamma_p),
            tio.RandomBiasField(p=self.bias_field_p),
            tio.RandomBlur(p=self.blur_p),  # σ in mm: the volume carries its real spacing
            tio.RandomGhosting(p=self.ghosting_p, restore=(GHOST_RESTORE, GHOST_RESTORE)),
        ])


@dataclass
class AugmentParams:
    """Parameters of the four augmentations, one row per volume; an op whose flag is off leaves it untouched.

    Off rows hold neutral values (γ 1, coefficients 0, σ 0, intensity 0). Ghosting axes: 0 = S, 1 = H, 2 = W.
    """

    gamma_on: Tensor  # [B] bool
    gamma: Tensor  # [B] float32 (exp of the float32 log γ draw, rounded to float32)
    bias_field_on: Tensor  # [B] bool
    bias_coefficients: Tensor  # [B, 20] float32, torchio's order (see BIAS_EXPONENTS)
    blur_on: Tensor  # [B] bool
    blur_std_mm: Tensor  # [B, 3] float32, σ along S, H, W in mm
    ghosting_on: Tensor  # [B] bool
    num_ghosts: Tensor  # [B] int64
    ghosting_axis: Tensor  # [B] int64
    ghosting_intensity: Tensor  # [B] float32

    def __len__(self) -> int:
        return int(self.gamma_on.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AugmentParams:
        return AugmentParams(**{k: v.to(device, non_blocking=non_blocking) for k, v in self.as_dict().items()})

    @staticmethod
    def collate(items: list[AugmentParams]) -> AugmentParams:
        """Concatenate along the batch dimension."""
        if not items:
            raise ValueError("AugmentParams.collate needs at least one item")
        return AugmentParams(**{f.name: torch.cat([getattr(p, f.name) for p in items]) for f in fields(AugmentParams)})

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> AugmentParams:
        """Inverse of as_dict; other keys (a batch's images, say) are ignored."""
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"augmentation parameters missing from the dict: {missing}")
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def validate(self) -> None:
        """Raise ValueError unless every field is a tensor of the right shape and kind."""
        for f in fields(self):
            if not isinstance(getattr(self, f.name), Tensor):
                raise ValueError(f"AugmentParams.{f.name} must be a tensor, got {type(getattr(self, f.name)).__name__}")
        n = len(self)
        trailing = {"bias_coefficients": (N_BIAS,), "blur_std_mm": (3,)}
        for f in fields(self):
            v = getattr(self, f.name)
            shape = (n, *trailing.get(f.name, ()))
            if tuple(v.shape) != shape:
                raise ValueError(f"AugmentParams.{f.name} has shape {tuple(v.shape)}, expected {shape}")
            kind = "bool" if f.name.endswith("_on") else "int" if f.name in ("num_ghosts", "ghosting_axis") else "float"
            ok = {"bool": v.dtype == torch.bool, "int": not v.is_floating_point() and v.dtype != torch.bool,
                  "float": v.is_floating_point()}[kind]
            if not ok:
                raise ValueError(f"AugmentParams.{f.name} must be a {kind} tensor, got {v.dtype}")


def sample_params(settings: AugmentSettings, n: int, generator: torch.Generator | None = None) -> AugmentParams:
    """Draw parameters for n volumes on the CPU, with torchio's distributions (global RNG when no generator).

    Each op is on with its probability (torchio skips when U > p; here on when U < p, so p = 0 is never);
    log γ ~ U(-0.3, 0.3); 20 bias coefficients ~ U(-0.5, 0.5); σ per axis ~ U(0, 2) mm; ghosts uniform on
    {4..10}, axis uniform on {0, 1, 2}, intensity ~ U(0.5, 1). All draws are made whatever the flags.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"the number of volumes must be >= 0, got {n}")
    for name, p in settings.__dict__.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"AugmentSettings.{name} must be a probability in [0, 1], got {p}")
    g = generator

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return torch.empty(n, *shape, dtype=torch.float32).uniform_(lo, hi, generator=g)

    def on(p: float) -> Tensor:
        return torch.rand(n, generator=g) < p

    gamma_on, log_gamma = on(settings.gamma_p), uniform(*LOG_GAMMA)
    bias_on, coefficients = on(settings.bias_field_p), uniform(-BIAS_COEFFICIENT, BIAS_COEFFICIENT, N_BIAS)
    blur_on, std = on(settings.blur_p), uniform(*BLUR_STD_MM, 3)
    ghost_on = on(settings.ghosting_p)
    ghosts = torch.randint(GHOSTS[0], GHOSTS[1] + 1, (n,), generator=g)
    axis = torch.tensor(GHOST_AXES)[torch.randint(0, len(GHOST_AXES), (n,), generator=g)]
    intensity = uniform(*GHOST_INTENSITY)
    return AugmentParams(
        gamma_on=gamma_on, gamma=torch.where(gamma_on, log_gamma.double().exp().float(), 1.0),
        bias_field_on=bias_on, bias_coefficients=torch.where(bias_on[:, None], coefficients, 0.0),
        blur_on=blur_on, blur_std_mm=torch.where(blur_on[:, None], std, 0.0),
        ghosting_on=ghost_on, num_ghosts=ghosts, ghosting_axis=axis,
        ghosting_intensity=torch.where(ghost_on, intensity, 0.0))


# ---------------------------------------------------------------------------------------------- the plan (host)
# Which volumes need what, blur taps and the small per-axis matrices are worked out with numpy on the CPU
# (float64, the formulas of scipy and torchio); only the volume-sized work runs on the volumes' device.

Host = dict[str, np.ndarray]


def _check_spacing(spacing_mm: float) -> float:
    try:
        s = float(spacing_mm)
    except (TypeError, ValueError):
        raise ValueError(f"spacing_mm must be a positive, finite voxel size in mm, got {spacing_mm!r}") from None
    if isinstance(spacing_mm, bool) or not (math.isfinite(s) and s > 0):
        raise ValueError(f"spacing_mm must be a positive, finite voxel size in mm, got {spacing_mm!r}")
    return s


def _check_inputs(volumes: Tensor, params: AugmentParams, spacing_mm: float) -> tuple[Host, float]:
    spacing = _check_spacing(spacing_mm)
    if not isinstance(volumes, Tensor) or volumes.ndim != 4:
        shape = tuple(volumes.shape) if isinstance(volumes, Tensor) else type(volumes).__name__
        raise ValueError(f"volumes must be a [B, S, H, W] tensor, got shape {shape}")
    if volumes.dtype != torch.float32:
        raise ValueError(f"volumes must be float32, got {volumes.dtype}")
    if min(volumes.shape[1:]) < 1:
        raise ValueError(f"volumes must have a non-empty [S, H, W] grid, got shape {tuple(volumes.shape)}")
    if not isinstance(params, AugmentParams):
        raise ValueError(f"params must be AugmentParams, got {type(params).__name__}")
    params.validate()
    if len(params) != volumes.shape[0]:
        raise ValueError(f"params are for {len(params)} volumes but the batch holds {volumes.shape[0]}")
    host = {k: v.detach().cpu().numpy() for k, v in params.as_dict().items()}  # a sync only for GPU params
    if (host["ghosting_on"] & ~np.isin(host["ghosting_axis"], GHOST_AXES)).any():
        raise ValueError("ghosting_axis must be 0 (S), 1 (H) or 2 (W)")
    return host, spacing


def _select(h: Host, index: np.ndarray) -> Host:
    return {k: v[index] for k, v in h.items()}


def _ghost_active(h: Host) -> np.ndarray:
    """torchio's Ghosting does nothing for 0 ghosts or intensity 0."""
    return h["ghosting_on"] & (h["num_ghosts"] > 0) & (h["ghosting_intensity"] != 0)


def _sigma_voxels(h: Host, axis: int, spacing: float) -> np.ndarray:
    """Blur σ along an axis in voxels (float64, as torchio computes it), 0 where blur is off."""
    return np.where(h["blur_on"], h["blur_std_mm"][:, axis].astype(np.float64) / spacing, 0.0)


def _needs_axis(h: Host, axis: int, spacing: float) -> np.ndarray:
    """Volumes with a non-identity linear map along an axis."""
    return (_sigma_voxels(h, axis, spacing) > MIN_SIGMA) | (_ghost_active(h) & (h["ghosting_axis"] == axis))


def _blur_matrices(sigma: np.ndarray, n: int) -> np.ndarray:
    """[m, n, n]: scipy's gaussian_filter1d along an axis of length n as a matrix (identity for σ 0)."""
    w, big = gaussian_taps(sigma)  # torchio's Blur is gaussian_filter with its default truncate
    cols = scipy_reflect(np.arange(n)[:, None] + np.arange(-big, big + 1), n)  # [n, T]
    out, rows = np.zeros((len(w), n, n)), np.arange(n)
    for t in range(2 * big + 1):  # one column per row and tap: no repeated index within an update
        out[:, rows, cols[:, t]] += w[:, t, None]
    return out


def _restore_size(n: int) -> int:
    return int(round(GHOST_RESTORE * n))  # round half to even, as np.round


def _ghost_matrices(num_ghosts: np.ndarray, intensity: np.ndarray, n: int) -> np.ndarray:
    """[m, n, n]: Re(IFFT · ifftshift · mask · fftshift · FFT) along an axis of length n."""
    j = np.arange(n)
    hit = j % np.maximum(num_ghosts, 1)[:, None] == 0  # every num_ghosts-th shifted plane from 0
    mask = np.where(hit, 1.0 - intensity.astype(np.float64)[:, None], 1.0)
    half, mid = _restore_size(n) // 2, n // 2
    mask[:, mid - half:mid + half] = 1.0  # torchio restores these planes (an empty slice when size < 2)
    c = np.fft.ifft(np.fft.ifftshift(mask, axes=-1), axis=-1).real  # first column of the circulant
    return c[:, (j[:, None] - j[None, :]) % n]


def _axis_maps(h: Host, axis: int, n: int, spacing: float) -> np.ndarray:
    """[m, n, n]: ghosting (where on this axis) after blur along one axis, per volume."""
    maps = _blur_matrices(_sigma_voxels(h, axis, spacing), n)
    ghost = np.flatnonzero(_ghost_active(h) & (h["ghosting_axis"] == axis))
    if len(ghost):
        maps[ghost] = _ghost_matrices(h["num_ghosts"][ghost], h["ghosting_intensity"][ghost], n) @ maps[ghost]
    return maps


def _coordinates(n: int) -> np.ndarray:
    """torchio's bias-field coordinate along an axis: arange(-n/2, n/2) + 0.5, divided by its max if > 0."""
    r = np.arange(n) - (n - 1) / 2
    return r / ((n - 1) / 2) if n > 1 else r


def _powers(n: int) -> np.ndarray:
    """[n, order + 1]: powers 0..order of an axis' coordinates."""
    return _coordinates(n)[:, None] ** np.arange(BIAS_ORDER + 1)


_BIAS_INDEX = tuple(np.array(BIAS_EXPONENTS).T)


# ---------------------------------------------------------------------------------------------- device work

def _to(a: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    return t.to(device, dtype, non_blocking=True)


def _bias_field(coefficients: np.ndarray, rows: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """exp(polynomial) at S-rows `rows` [m, T] -> float32 [m, T, H, W]; in float64 as torchio, cast as it does."""
    s, h, w = shape
    c = np.zeros((len(coefficients), *(BIAS_ORDER + 1,) * 3))  # float64: exp amplifies float32 log errors
    c[(slice(None), *_BIAS_INDEX)] = coefficients
    dev = rows.device
    inner = _to(_powers(h), dev) @ (_to(c, dev) @ _to(_powers(w).T, dev))  # [m, 4, H, W]
    return torch.einsum("mti,mihw->mthw", _to(_powers(s), dev)[rows], inner).exp_().float()


def _pointwise_(x: Tensor, h: Host, rows: Tensor, s: int) -> Tensor:
    """Gamma then bias field, in place on x [m, T, H, W] whose row t of volume i is S-row rows[i, t]."""
    dev = x.device
    sel = np.flatnonzero(h["gamma_on"])
    if len(sel):
        gamma = _to(h["gamma"][sel].reshape(-1, 1, 1, 1), dev, torch.float32)
        if len(sel) == len(x):
            torch.copysign(x.abs().pow_(gamma), x, out=x)  # sign(x)|x|^γ, which is x^γ for x >= 0
        else:
            sel_d = _to(sel, dev)
            part = x[sel_d]
            powered = part.abs().pow_(gamma)
            x[sel_d] = torch.copysign(powered, part, out=powered)
    sel = np.flatnonzero(h["bias_field_on"])
    if len(sel):
        if len(sel) == len(x):
            x.mul_(_bias_field(h["bias_coefficients"], rows, (s, *x.shape[2:])))
        else:
            sel_d = _to(sel, dev)
            x[sel_d] = x[sel_d].mul_(_bias_field(h["bias_coefficients"][sel], rows[sel_d], (s, *x.shape[2:])))
    return x


def _apply_map(x: Tensor, a: Tensor, dim: int) -> Tensor:
    """x [m, T, H, W] with per-volume matrices a [m, n, n] applied along dim 1, 2 or 3 of x."""
    if dim == 1:
        return torch.bmm(a, x.flatten(2)).view_as(x)
    if dim == 2:
        return a[:, None] @ x
    return x @ a.transpose(1, 2)[:, None]


def _apply_in_groups_(x: Tensor, h: Host, spacing: float, axes: tuple[int, ...]) -> Tensor:
    """The linear maps along the given axes of x [B, S or k, H, W], each only on the volumes it changes."""
    dev = x.device
    for axis in axes:
        sel = np.flatnonzero(_needs_axis(h, axis, spacing))
        if not len(sel):
            continue
        a = _to(_axis_maps(_select(h, sel), axis, x.shape[axis + 1], spacing), dev, torch.float32)
        if len(sel) == len(x):
            x = _apply_map(x, a, axis + 1)
        else:
            sel_d = _to(sel, dev)
            x[sel_d] = _apply_map(x[sel_d], a, axis + 1)
    return x


# ---------------------------------------------------------------------------------------------- public API

def augment_volumes(volumes: Tensor, params: AugmentParams, spacing_mm: float) -> Tensor:
    """[B, S, H, W] float32 -> augmented [B, S, H, W]: Gamma, BiasField, Blur, Ghosting, each where on."""
    h, spacing = _check_inputs(volumes, params, spacing_mm)
    b, s = volumes.shape[:2]
    x = _pointwise_(volumes.clone(), h, torch.arange(s, device=volumes.device).expand(b, s), s)
    return _apply_in_groups_(x, h, spacing, (0, 1, 2))


def augment_slices(volumes: Tensor, slice_index: Tensor, params: AugmentParams, spacing_mm: float) -> Tensor:
    """augment_volumes(volumes, params, spacing_mm)[b, slice_index[b]] -> [B, k, H, W], computing only those.

    Volumes ghosted along S read every S-row (the circulant is dense); the others read each requested row's
    blur neighbourhood along S (only that row when they are not blurred along S), reflected as scipy does.
    """
    h, spacing = _check_inputs(volumes, params, spacing_mm)
    b, s, hh, ww = volumes.shape
    if (not isinstance(slice_index, Tensor) or slice_index.ndim != 2 or slice_index.shape[0] != b
            or slice_index.is_floating_point() or slice_index.dtype == torch.bool):
        shape = tuple(slice_index.shape) if isinstance(slice_index, Tensor) else type(slice_index).__name__
        raise ValueError(f"slice_index must be an integer [B, k] tensor with B = {b}, got {shape}")
    if slice_index.numel() and bool(((slice_index < 0) | (slice_index >= s)).any()):  # a sync if on a GPU
        lo, hi = slice_index.min().item(), slice_index.max().item()
        raise ValueError(f"slice_index must lie in [0, {s}) (the S axis), got values {lo}..{hi}")
    dev = volumes.device
    idx = _to(slice_index, dev, torch.long)
    k = idx.shape[1]
    dense = _ghost_active(h) & (h["ghosting_axis"] == 0)
    banded = ~dense & _needs_axis(h, 0, spacing)
    parts = []

    sel = np.flatnonzero(~dense & ~banded)
    if len(sel):  # nothing along S: the requested rows themselves
        sel_d = _to(sel, dev)
        rows = idx[sel_d]
        parts.append((sel_d, _pointwise_(volumes[sel_d[:, None], rows], _select(h, sel), rows, s)))
    sel = np.flatnonzero(banded)
    if len(sel):  # blurred along S: each requested row's taps, reflected at the ends as scipy does
        q, sel_d = _select(h, sel), _to(sel, dev)
        taps, big = gaussian_taps(_sigma_voxels(q, 0, spacing))
        rows = scipy_reflect(idx[sel_d][:, :, None] + torch.arange(-big, big + 1, device=dev), s).flatten(1)
        part = _pointwise_(volumes[sel_d[:, None], rows], q, rows, s).view(len(sel), k, 2 * big + 1, hh, ww)
        parts.append((sel_d, torch.einsum("mt,mkthw->mkhw", _to(taps, dev, torch.float32), part)))
    sel = np.flatnonzero(dense)
    if len(sel):  # ghosted along S: rows of the composed S map times the whole (pointwise-augmented) volume
        q, sel_d = _select(h, sel), _to(sel, dev)
        maps = _to(_axis_maps(q, 0, s, spacing), dev, torch.float32)
        rows_of_map = maps.gather(1, idx[sel_d][:, :, None].expand(-1, -1, s))  # [m, k, S]
        part = _pointwise_(volumes[sel_d], q, torch.arange(s, device=dev).expand(len(sel), s), s)
        parts.append((sel_d, torch.bmm(rows_of_map, part.flatten(2)).view(len(sel), k, hh, ww)))

    if len(parts) == 1:
        out = parts[0][1]
    else:
        out = volumes.new_empty(b, k, hh, ww)
        for sel_d, part in parts:
            out[sel_d] = part
    return _apply_in_groups_(out, h, spacing, (1, 2))  # in-plane maps on the k slices


class VolumeAugment:
    """The project's augmentation at one grid spacing: sample parameters, augment the drawn slices."""

    def __init__(self, settings: AugmentSettings, spacing_mm: float):
        self.settings = settings
        self.spacing_mm = _check_spacing(spacing_mm)

    def sample(self, n: int, generator: torch.Generator | None = None) -> AugmentParams:
        return sample_params(self.settings, n, generator)

    def __call__(self, volumes: Tensor, slice_index: Tensor, params: AugmentParams) -> Tensor:
        return augment_slices(volumes, slice_index, params, self.spacing_mm)
