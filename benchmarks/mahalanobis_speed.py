"""Dense P×P inverse (the original's path) vs the low-rank Woodbury path for the pixel-wise Mahalanobis map.

At P = 96·96 = 9216 (full mask), N = 10, ridge 1e-2, on CPU it prints: the dense fp32 inverse time for
one slice, the low-rank time for one slice and per slice when batched over --slices slices, their
ratio, the largest relative difference between the two maps (max|a − b| / max|b|, and element-wise
where the dense map exceeds 1 % of its maximum), and the time of the whole `anomaly_maps` for a
--slices×96×96 volume. Goal (method.md §4.3): ≥ 1000× faster, agreement to 1e-4 relative.

    python benchmarks/mahalanobis_speed.py [--slices 50] [--n 10] [--repeats 5] [--threads T] [--json OUT]

On a shared, oversubscribed CPU torch's default threads spin against other processes: --threads 1 can be
several times faster for the low-rank path there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from mhd_uad.scoring.anomaly_maps import SCORERS, anomaly_maps
from mhd_uad.scoring.mahalanobis import dense_pixelwise_mahalanobis, pixelwise_mahalanobis


def synthetic_volume(slices: int, size: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth [0,1] 'scan' and N reconstructions varying by a few hundredths, like the model's."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((slices, size, size)), 2.0)
    x = (x - x.min()) / (x.max() - x.min())
    variation = ndimage.gaussian_filter(rng.standard_normal((n, slices, size, size)), (0, 0, 3, 3))
    variation *= 0.02 / variation.std()
    recos = x[None] + variation + 0.01 * rng.standard_normal((n, slices, size, size))
    return x.astype(np.float32), recos.astype(np.float32)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time over `repeats` runs after `warmup` untimed runs; returns (seconds, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=50, help="slices in the batched run and the volume")
    parser.add_argument("--n", type=int, default=10, help="reconstructions N")
    parser.add_argument("--size", type=int, default=96, help="slice side; P = size² (full mask)")
    parser.add_argument("--ridge", type=float, default=1e-2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast paths (median)")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed runs of the dense inverse")
    parser.add_argument("--dense-method", choices=("inv", "solve"), default="inv")
    parser.add_argument("--exact-check", action="store_true", help="also compare with a float64 dense solve")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    x, recos = synthetic_volume(args.slices, args.size, args.n)
    p = args.size * args.size
    x0, r0 = x[0], recos[:, 0]
    results: dict[str, object] = {
        "P": p,
        "N": args.n,
        "ridge": args.ridge,
        "slices": args.slices,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(
        f"P = {p} (full {args.size}×{args.size} mask), N = {args.n}, ridge = {args.ridge}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    dense_s, dense_map = timed(
        lambda: dense_pixelwise_mahalanobis(
            x0, r0, ridge=args.ridge, dtype=torch.float32, method=args.dense_method
        ),
        repeats=args.dense_repeats,
        warmup=0,
    )
    print(f"dense fp32 {args.dense_method} (P×P), per slice : {dense_s:10.3f} s")

    single_s, fast_map = timed(lambda: pixelwise_mahalanobis(x0, r0, ridge=args.ridge), args.repeats)
    batch_s, batch_map = timed(lambda: pixelwise_mahalanobis(x, recos, ridge=args.ridge), args.repeats)
    per_slice_batched = batch_s / args.slices
    print(f"low-rank, one slice              : {single_s * 1e3:10.3f} ms")
    print(
        f"low-rank, {args.slices} slices batched        : {batch_s * 1e3:10.3f} ms "
        f"({per_slice_batched * 1e3:.3f} ms per slice)"
    )
    print(f"speed-up per slice (one slice)   : {dense_s / single_s:10.0f}×")
    print(f"speed-up per slice (batched)     : {dense_s / per_slice_batched:10.0f}×")

    dense_map = np.asarray(dense_map, dtype=np.float64)
    fast_map = np.asarray(fast_map, dtype=np.float64)
    rel_max = float(np.abs(fast_map - dense_map).max() / np.abs(dense_map).max())
    big = dense_map > 0.01 * dense_map.max()
    rel_elem = float((np.abs(fast_map - dense_map)[big] / dense_map[big]).max())
    batch_vs_single = float(np.abs(np.asarray(batch_map)[0] - fast_map).max() / np.abs(fast_map).max())
    print(f"max |low-rank − dense| / max dense : {rel_max:.3e}")
    print(f"max element-wise relative diff (dense > 1 % of max): {rel_elem:.3e}")
    print(f"batched vs single-slice low-rank  : {batch_vs_single:.3e}")
    results.update(
        dense_seconds_per_slice=dense_s,
        dense_method=args.dense_method,
        lowrank_seconds_one_slice=single_s,
        lowrank_seconds_batched=batch_s,
        lowrank_seconds_per_slice_batched=per_slice_batched,
        speedup_one_slice=dense_s / single_s,
        speedup_batched=dense_s / per_slice_batched,
        max_relative_difference=rel_max,
        max_elementwise_relative_difference=rel_elem,
        batched_vs_single_relative_difference=batch_vs_single,
    )

    if args.exact_check:
        exact_s, exact = timed(
            lambda: dense_pixelwise_mahalanobis(
                x0, r0, ridge=args.ridge, dtype=torch.float64, method="solve"
            ),
            repeats=1,
            warmup=0,
        )
        exact = np.asarray(exact, dtype=np.float64)
        err_fast = float(np.abs(fast_map - exact).max() / exact.max())
        err_dense32 = float(np.abs(dense_map - exact).max() / exact.max())
        print(
            f"vs float64 dense solve ({exact_s:.1f} s): low-rank {err_fast:.3e}, dense fp32 {err_dense32:.3e}"
        )
        results.update(lowrank_vs_float64=err_fast, dense32_vs_float64=err_dense32)

    mask = np.ones(x.shape, dtype=np.float32)
    maps_s, _ = timed(lambda: anomaly_maps(x, recos, mask, ridge=args.ridge, ensemble=recos[:3]), args.repeats)
    print(f"anomaly_maps, all {len(SCORERS)} scorers, {args.slices}×{args.size}×{args.size}, N={args.n}: "
          f"{maps_s:.3f} s")
    results["anomaly_maps_seconds"] = maps_s

    goal = results["speedup_one_slice"] >= 1000 and rel_max <= 1e-4
    print(f"goal (≥ 1000× and ≤ 1e-4 relative): {'met' if goal else 'NOT met'}")
    results["goal_met"] = bool(goal)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
