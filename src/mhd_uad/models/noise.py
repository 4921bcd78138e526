"""Fractal 2-D OpenSimplex noise, the forward-process noise of the cDDPM (method.md §3.2).

A vectorised torch implementation of Kurt Spencer's original 2-D OpenSimplex algorithm (stretched/squashed
lattice, 8 gradients, a 256-entry permutation table built from a 64-bit seed with a 64-bit LCG), with the
same seed semantics as the ``opensimplex`` Python package, so a seed gives the same field as that package.

Fractal field (method.md §3.2): octave k = 0..octaves-1 samples the noise at pixel coordinates
``(x, y) = (column, row) / (frequency / 2**k)`` with amplitude ``persistence**k``; octaves are summed and
NOT normalised (std ≈ 0.55 on 96×96 with the defaults). Row index = y, column index = x, as the
original's ``noise2array(x, y)`` lays out its output.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import lru_cache

import torch

__all__ = [
    "draw_noise_seed",
    "opensimplex_noise2",
    "permutation_table",
    "simplex_noise",
    "simplex_noise_like",
    "simplex_noise_stack",
]

# Lattice constants of 2-D OpenSimplex: stretch (1/sqrt(3)-1)/2, squish (sqrt(3)-1)/2, output scale 1/47.
_STRETCH = -0.211324865405187
_SQUISH = 0.366025403784439
_NORM = 47.0

# The 8 gradients (octagon directions), indexed by (perm value & 14) / 2.
_GRAD_X = (5, 2, -5, -2, 5, 2, -5, -2)
_GRAD_Y = (2, 5, 2, 5, -2, -5, -2, -5)

# Knuth's MMIX LCG, as the reference implementation uses to shuffle the permutation table.
_LCG_MUL = 6364136223846793005
_LCG_INC = 1442695040888963407

# The original draws np.random.randint(-2**31, 2**31 - 1) per field (method.md §3.2).
_SEED_LOW = -(2**31)
_SEED_HIGH = 2**31 - 1


def _wrap_int64(value: int) -> int:
    """Two's-complement wrap of a Python int to signed 64 bit (the reference's integer overflow)."""
    return ((value + 2**63) % 2**64) - 2**63


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool):
        raise TypeError(f"noise seed must be an integer, got {seed!r}")
    try:
        return operator.index(seed)  # accepts int, numpy ints, 0-d integer tensors
    except TypeError:
        raise TypeError(f"noise seed must be an integer, got {type(seed).__name__} {seed!r}") from None


@lru_cache(maxsize=256)
def _permutation_tuple(seed: int) -> tuple[int, ...]:
    # A Fisher-Yates shuffle of 0..255 driven by the LCG; Python's floor-modulo keeps r in [0, i].
    state = _wrap_int64(seed)
    for _ in range(3):
        state = _wrap_int64(state * _LCG_MUL + _LCG_INC)
    source = list(range(256))
    perm = [0] * 256
    for i in range(255, -1, -1):
        state = _wrap_int64(state * _LCG_MUL + _LCG_INC)
        r = (state + 31) % (i + 1)
        perm[i] = source[r]
        source[r] = source[i]
    return tuple(perm)


def permutation_table(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry OpenSimplex permutation table for ``seed`` (int64 tensor, a permutation of 0..255)."""
    return torch.tensor(_permutation_tuple(_check_seed(seed)), dtype=torch.int64, device=device)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 as the reference computes (matches it to ~1e-15); MPS has no float64, so float32 there.
    return torch.float32 if device.type == "mps" else torch.float64


def _noise2_points(x: torch.Tensor, y: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """2-D OpenSimplex noise at points (x, y) of shape [M] for each permutation table in ``perms`` [S, 256].

    Returns [S, M]. Every branch of the scalar algorithm becomes a mask: the two always-present corners
    (1,0) and (0,1), the base corner (0,0) or (1,1) of the rhombus half the point falls in, and one extra
    lattice vertex. The geometry is seed-independent, so it is computed once; only the gradient choice
    (a permutation lookup) differs between seeds.
    """
    grad_x = torch.tensor(_GRAD_X, dtype=x.dtype, device=x.device)
    grad_y = torch.tensor(_GRAD_Y, dtype=x.dtype, device=x.device)
    n_seeds = perms.shape[0]
    # Offsets into the flattened [S*256] table so one gather serves all seeds at once.
    row_offset = (torch.arange(n_seeds, device=x.device, dtype=torch.int64) * 256).unsqueeze(1)
    perm_flat = perms.reshape(-1)

    stretch = (x + y) * _STRETCH
    xs = x + stretch
    ys = y + stretch
    xsb_f = torch.floor(xs)
    ysb_f = torch.floor(ys)
    squish = (xsb_f + ysb_f) * _SQUISH
    dx0 = x - (xsb_f + squish)
    dy0 = y - (ysb_f + squish)
    xins = xs - xsb_f
    yins = ys - ysb_f
    in_sum = xins + yins
    xsb = xsb_f.to(torch.int64)
    ysb = ysb_f.to(torch.int64)

    def corner(off_x: torch.Tensor | int, off_y: torch.Tensor | int) -> torch.Tensor:
        # Displacement from lattice vertex (xsb+off_x, ysb+off_y): skewing adds (off_x+off_y)*squish per axis.
        fx = off_x.to(dx0.dtype) if isinstance(off_x, torch.Tensor) else float(off_x)
        fy = off_y.to(dx0.dtype) if isinstance(off_y, torch.Tensor) else float(off_y)
        skew = (fx + fy) * _SQUISH
        dx = dx0 - fx - skew
        dy = dy0 - fy - skew
        ramp = (2.0 - dx * dx - dy * dy).clamp_min(0.0)  # radial falloff; zero outside radius sqrt(2)
        ramp = ramp * ramp
        ramp = ramp * ramp
        # The seed's hash of the lattice vertex picks one of the 8 gradients per point: [S, M].
        h1 = perm_flat[row_offset + ((xsb + off_x) & 0xFF)]
        h2 = perm_flat[row_offset + ((h1 + (ysb + off_y)) & 0xFF)]
        gi = (h2 & 0x0E) >> 1
        return ramp * (grad_x[gi] * dx + grad_y[gi] * dy)

    value = corner(1, 0) + corner(0, 1)

    lower = in_sum <= 1.0
    x_larger = xins > yins
    # Lower triangle: (0,0) among the closest two vertices -> extra vertex (1,-1) or (-1,1), else (1,1).
    zins_low = 1.0 - in_sum
    near_origin = (zins_low > xins) | (zins_low > yins)
    ext_x_low = torch.where(near_origin, torch.where(x_larger, 1, -1), 1)
    ext_y_low = torch.where(near_origin, torch.where(x_larger, -1, 1), 1)
    # Upper triangle: (1,1) among the closest two -> extra vertex (2,0) or (0,2), else (0,0).
    zins_up = 2.0 - in_sum
    near_far = (zins_up < xins) | (zins_up < yins)
    ext_x_up = torch.where(near_far, torch.where(x_larger, 2, 0), 0)
    ext_y_up = torch.where(near_far, torch.where(x_larger, 0, 2), 0)

    ext_x = torch.where(lower, ext_x_low, ext_x_up)
    ext_y = torch.where(lower, ext_y_low, ext_y_up)
    base = (~lower).to(torch.int64)  # base corner (0,0) in the lower triangle, (1,1) in the upper

    value = value + corner(base, base)
    value = value + corner(ext_x, ext_y)
    return value / _NORM


def _resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def opensimplex_noise2(
    x: torch.Tensor, y: torch.Tensor, seed: int, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Single-octave 2-D OpenSimplex noise at arbitrary points (x, y) (broadcast together), for ``seed``.

    Equal to ``opensimplex.OpenSimplex(seed).noise2(x, y)`` of the ``opensimplex`` package, elementwise.
    """
    x, y = torch.broadcast_tensors(torch.as_tensor(x), torch.as_tensor(y))
    device = x.device
    work = _compute_dtype(device)
    perms = permutation_table(seed, device=device).unsqueeze(0)
    out = _noise2_points(x.reshape(-1).to(work), y.reshape(-1).to(work), perms)
    out_dtype = dtype if dtype is not None else (x.dtype if x.dtype.is_floating_point else torch.float32)
    return out.reshape(x.shape).to(out_dtype)


def _check_fractal_args(height: int, width: int, octaves: int, persistence: float, frequency: float) -> None:
    for name, value in (("height", height), ("width", width), ("octaves", octaves)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"simplex noise: {name} must be a positive integer, got {value!r}")
    if not frequency > 0:
        raise ValueError(f"simplex noise: frequency must be > 0, got {frequency!r}")
    if not persistence > 0:
        raise ValueError(f"simplex noise: persistence must be > 0, got {persistence!r}")


def simplex_noise_stack(
    seeds: Sequence[int],
    height: int,
    width: int,
    *,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One fractal simplex field per seed, ``[len(seeds), height, width]``, all computed in one pass.

    Field s equals ``simplex_noise(height, width, seeds[s], ...)``.
    """
    seeds = [_check_seed(s) for s in seeds]
    if not seeds:
        raise ValueError("simplex noise: at least one seed is needed")
    _check_fractal_args(height, width, octaves, persistence, frequency)
    dev = _resolve_device(device)
    work = _compute_dtype(dev)

    perms = torch.stack([permutation_table(s, device=dev) for s in seeds])  # [S, 256]
    rows = torch.arange(height, device=dev, dtype=work)
    cols = torch.arange(width, device=dev, dtype=work)
    # Octave k divides pixel coordinates by frequency / 2**k (method.md §3.2: 64, 32, ..., 2).
    scales = torch.tensor([frequency / 2**k for k in range(octaves)], device=dev, dtype=work)
    amplitudes = [1.0]
    for _ in range(octaves - 1):
        amplitudes.append(amplitudes[-1] * persistence)  # persistence**k, accumulated as the reference does
    amps = torch.tensor(amplitudes, device=dev, dtype=work)

    xk = (cols.view(1, 1, width) / scales.view(-1, 1, 1)).expand(octaves, height, width)
    yk = (rows.view(1, height, 1) / scales.view(-1, 1, 1)).expand(octaves, height, width)
    values = _noise2_points(xk.reshape(-1), yk.reshape(-1), perms).view(len(seeds), octaves, height, width)
    field = (values * amps.view(1, -1, 1, 1)).sum(dim=1)
    return field.to(dtype)


def simplex_noise(
    height: int,
    width: int,
    seed: int,
    *,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A fractal 2-D OpenSimplex field ``[height, width]``, reproducible from ``seed`` (method.md §3.2)."""
    return simplex_noise_stack(
        [seed],
        height,
        width,
        octaves=octaves,
        persistence=persistence,
        frequency=frequency,
        device=device,
        dtype=dtype,
    )[0]


def simplex_noise_like(x: torch.Tensor, seed: int, **kwargs) -> torch.Tensor:
    """One field of size x's last two dims, repeated over every leading index of ``x`` (e.g. ``[B, 1, H, W]``).

    The whole batch shares one field (method.md §3.2). Device and (floating) dtype follow ``x``; extra
    keyword arguments (octaves, persistence, frequency) go to :func:`simplex_noise`.
    """
    if x.dim() < 2:
        raise ValueError(
            f"simplex_noise_like needs a tensor with >= 2 dims (..., H, W), got shape {tuple(x.shape)}"
        )
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    field = simplex_noise(x.shape[-2], x.shape[-1], seed, device=x.device, dtype=dtype, **kwargs)
    return field.expand(x.shape).contiguous()


def draw_noise_seed(generator: torch.Generator | None = None) -> int:
    """A fresh field seed drawn from ``generator`` (torch's global RNG when None), in the original's range."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(_SEED_LOW, _SEED_HIGH, (1,), generator=generator, device=device).item())
