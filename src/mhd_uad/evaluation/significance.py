"""Significance of a paired difference of per-volume metrics: permutation test and bootstrap interval.

The cDDPM paper tests its deltas with MLxtend's paired permutation test (10,000 rounds, two-sided,
α = 0.05; method.md §6). Here, numpy only and seeded, so a report is reproducible:

- `paired_permutation_test`: the statistic is the mean of the paired differences d = a − b. Under the null
  hypothesis each d is as likely to have the other sign, so the null distribution is that of the mean of
  ±d with random signs. Two-sided: a sign pattern counts as extreme when |mean| ≥ |observed mean| (ties
  count as extreme, with a relative tolerance of 1e-9 for rounding). With 2^n ≤ rounds the 2^n sign
  patterns are enumerated and p is their exact share of extreme ones (the identity is one of them, so
  p ≥ 2/2^n); otherwise `rounds` random patterns give p = (1 + #extreme) / (1 + rounds), the observed
  pattern counted once (never 0, valid for a Monte Carlo test).
- `paired_bootstrap_ci`: the percentile interval of the mean difference over `rounds` resamples of the
  pairs with replacement.
- `paired_comparison`: both, over independent units: pairs that share a unit (the same scan under several
  folds) are averaged per unit first, so one scan scored by five folds' models is one resampled unit, not
  five (treating them as independent would narrow the interval and lower p without new information).

NaNs (volumes without the metric) are dropped pairwise. Fewer than 2 pairs (units) give p = NaN and the
interval [NaN, NaN]. All differences 0 give p = 1 and the interval [0, 0].
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

ROUNDS = 10_000
SEED = 0
_CHUNK = 1 << 22  # sign flips / resample indices held at once (rounds × pairs), about 32 MB of float64


def paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """a − b over the pairs where both are finite."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length ({a.size} and {b.size})")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep] - b[keep]


def _rows_per_chunk(n: int) -> int:
    return max(1, _CHUNK // max(n, 1))


def _count_extreme(sums: np.ndarray, observed: float, scale: float) -> int:
    return int(np.count_nonzero(np.abs(sums) >= abs(observed) - 1e-9 * scale))


def sign_flip_p_value(d: np.ndarray, rounds: int = ROUNDS, seed: int = SEED) -> float:
    """Two-sided p of the mean of differences `d` (no NaNs) under random sign flips; see the module text."""
    d = np.asarray(d, dtype=float).ravel()
    n = d.size
    if n < 2:
        return float("nan")
    observed, scale = float(d.sum()), float(np.abs(d).sum())
    if scale == 0.0:
        return 1.0
    if n < 63 and 2 ** n <= rounds:  # exact: every sign pattern once
        total = 2 ** n
        extreme = 0
        for start in range(0, total, _rows_per_chunk(n)):
            codes = np.arange(start, min(total, start + _rows_per_chunk(n)), dtype=np.int64)
            signs = 1.0 - 2.0 * ((codes[:, None] >> np.arange(n)) & 1)
            extreme += _count_extreme(signs @ d, observed, scale)
        return extreme / total
    rng = np.random.default_rng(seed)
    extreme, done = 0, 0
    while done < rounds:
        rows = min(rounds - done, _rows_per_chunk(n))
        signs = rng.integers(0, 2, size=(rows, n), dtype=np.int8) * 2.0 - 1.0
        extreme += _count_extreme(signs @ d, observed, scale)
        done += rows
    return (1 + extreme) / (1 + rounds)


def bootstrap_interval(d: np.ndarray, rounds: int = ROUNDS, seed: int = SEED, level: float = 0.95
                       ) -> tuple[float, float]:
    """Percentile interval of the mean of `d` (no NaNs) over `rounds` resamples with replacement."""
    d = np.asarray(d, dtype=float).ravel()
    n = d.size
    if n < 2:
        return float("nan"), float("nan")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means, done = [], 0
    while done < rounds:
        rows = min(rounds - done, _rows_per_chunk(n))
        means.append(d[rng.integers(0, n, size=(rows, n))].mean(axis=1))
        done += rows
    lo, hi = np.percentile(np.concatenate(means), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_permutation_test(a: Sequence[float], b: Sequence[float], rounds: int = ROUNDS, seed: int = SEED) -> float:
    """Two-sided p-value of mean(a − b) ≠ 0 by random sign flips of the paired differences."""
    return sign_flip_p_value(paired_differences(a, b), rounds, seed)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], rounds: int = ROUNDS, seed: int = SEED,
                        level: float = 0.95) -> list[float]:
    """[lo, hi]: percentile bootstrap interval of mean(a − b) over the pairs."""
    return list(bootstrap_interval(paired_differences(a, b), rounds, seed, level))


@dataclass(frozen=True)
class PairedComparison:
    """mean(a − b) over independent units, its bootstrap interval, the permutation p and the unit count."""

    delta: float
    ci: tuple[float, float]
    p_value: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        lo, hi = self.ci
        return bool(lo > 0 or hi < 0)  # False for NaN


def unit_differences(a: Sequence[float], b: Sequence[float], units: Sequence[Hashable] | None = None) -> np.ndarray:
    """a − b over the pairs where both are finite, averaged per unit (in order of first appearance)."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    d = paired_differences(a, b)
    if units is None:
        return d
    if len(units) != a.size:
        raise ValueError(f"{len(units)} units for {a.size} pairs")
    keep = np.isfinite(a) & np.isfinite(b)
    kept = [u for u, k in zip(units, keep, strict=True) if k]
    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(u, len(index)) for u in kept], dtype=np.int64)
    if not index:
        return d
    return np.bincount(codes, weights=d, minlength=len(index)) / np.bincount(codes, minlength=len(index))


def paired_comparison(a: Sequence[float], b: Sequence[float], units: Sequence[Hashable] | None = None,
                      rounds: int = ROUNDS, seed: int = SEED, level: float = 0.95) -> PairedComparison:
    """mean(a − b) with its bootstrap interval and permutation p, pairs sharing a unit averaged first."""
    d = unit_differences(a, b, units)
    delta = float(d.mean()) if d.size else float("nan")
    return PairedComparison(delta, bootstrap_interval(d, rounds, seed, level), sign_flip_p_value(d, rounds, seed),
                            int(d.size))
