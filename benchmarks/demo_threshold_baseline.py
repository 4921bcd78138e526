"""Calibration check of the demo dataset: the plain intensity-threshold ("Thresh") baseline per test set.

Prints, per test set, the mean per-volume average precision of the raw intensity (clipped to [p1, p99] of
brain voxels, scaled to [0, 1], zero outside the brain mask; sklearn average_precision_score over all
voxels of the cropped volume, label seg > 0) next to the paper's Thresh row (method.md §7.2), and the
AUROC of a per-volume mean-intensity classifier healthy vs lesioned, which should stay near 0.5
(demo-data.md §4.3).

    python benchmarks/demo_threshold_baseline.py --data data
    python benchmarks/demo_threshold_baseline.py --generate [--seeds 0 1 2 3] [--workers 2]

With --generate, every seed's dataset is generated into a temporary directory and reported, then a summary
gives each set's Thresh AP per seed and flags any outside a factor of two of the paper's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from mhd_uad.errors import MhdUadError
from mhd_uad.io import load_nifti

# Thresh AUPRC (%) on the real data, cDDPM paper v1 Table 3 (method.md §7.2).
PAPER_THRESH_AUPRC = {"Brats21": 20.27, "MSLUB": 4.23, "ATLAS_v2": 1.71, "WMH": 4.72}
CONTRAST = {"Brats21": "t2", "MSLUB": "t2", "ATLAS_v2": "t1", "WMH": "t1"}


def normalised_intensity(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Clip to [p1, p99] of brain voxels, scale to [0, 1], zero outside the brain (method.md §2.3 step 4)."""
    brain = mask > 0
    lo, hi = np.percentile(image[brain], [1, 99])
    scaled = (np.clip(image, lo, hi) - lo) / max(hi - lo, 1e-12)
    return np.where(brain, scaled, 0.0)


def _scans(data: Path, rel_dir: str, contrast: str) -> list[tuple[Path, Path, Path]]:
    folder = data / rel_dir / contrast
    out = []
    for img in sorted(folder.glob(f"*_{contrast}.nii.gz")):
        name = img.name[: -len(f"_{contrast}.nii.gz")]
        out.append(
            (
                img,
                data / rel_dir / "mask" / f"{name}_mask.nii.gz",
                data / rel_dir / "seg" / f"{name}_seg.nii.gz",
            )
        )
    return out


def evaluate(data: Path) -> dict:
    results: dict = {"sets": {}}
    healthy_means = {}
    for contrast in ("t1", "t2"):
        means = []
        for img_path, mask_path, _ in _scans(data, "Train/ixi", contrast):
            image, _ = load_nifti(img_path)
            mask, _ = load_nifti(mask_path, what="mask")
            means.append(float(normalised_intensity(image, mask)[mask > 0].mean()))
        healthy_means[contrast] = means
    for name, contrast in CONTRAST.items():
        scans = _scans(data, f"Test/{name}", contrast)
        if not scans:
            continue
        aps, means, volumes = [], [], []
        for img_path, mask_path, seg_path in scans:
            image, _ = load_nifti(img_path)
            mask, _ = load_nifti(mask_path, what="mask")
            seg, _ = load_nifti(seg_path, what="seg")
            score = normalised_intensity(image, mask)
            label = seg.ravel() > 0
            aps.append(average_precision_score(label, score.ravel()) if label.any() else np.nan)
            means.append(float(score[mask > 0].mean()))
            volumes.append(float(label.sum()))
        healthy = healthy_means[contrast]
        auroc = np.nan
        if healthy and means:
            y = np.r_[np.zeros(len(healthy)), np.ones(len(means))]
            auroc = float(roc_auc_score(y, np.r_[healthy, means]))
        results["sets"][name] = {
            "contrast": contrast,
            "n": len(scans),
            "ap_percent": 100.0 * float(np.nanmean(aps)),
            "ap_percent_median": 100.0 * float(np.nanmedian(aps)),
            "paper_percent": PAPER_THRESH_AUPRC[name],
            "mean_intensity_auroc": auroc,
        }
    return results


def print_report(results: dict) -> None:
    print(
        f"{'set':<10} {'contrast':<8} {'n':>3} {'Thresh AP %':>12} {'median':>8} {'paper %':>8} "
        f"{'ratio':>6}  {'mean-intensity AUROC':>20}"
    )
    for name, r in results["sets"].items():
        ratio = r["ap_percent"] / r["paper_percent"]
        flag = "" if 0.5 <= ratio <= 2.0 else "  <- outside x2"
        print(
            f"{name:<10} {r['contrast']:<8} {r['n']:>3} {r['ap_percent']:>12.2f} {r['ap_percent_median']:>8.2f} "
            f"{r['paper_percent']:>8.2f} {ratio:>6.2f}  {r['mean_intensity_auroc']:>20.3f}{flag}"
        )


def _generate_and_evaluate(tmp: str, seed: int, args) -> dict:
    from mhd_uad.data.demo import generate_demo_dataset

    data = Path(tmp) / f"data_seed{seed}"
    started = time.perf_counter()
    summary = generate_demo_dataset(
        data,
        seed=seed,
        n_healthy=args.n_healthy,
        n_per_test_set=args.n_per_test_set,
        voxel_size=args.voxel_size,
        workers=args.workers,
        progress=False,
    )
    print(
        f"\nseed {seed}: generated {sum(summary['counts'].values())} scans ({args.voxel_size} mm, "
        f"{args.workers} worker(s)) in {time.perf_counter() - started:.1f} s"
    )
    for name, vol in summary["lesion_volume_ml"].items():
        print(f"  {name:<10} lesion mL min/median/max {vol['min']:.2f} / {vol['median']:.2f} / {vol['max']:.2f}")
    results = evaluate(data)
    print_report(results)
    return results


def print_seed_summary(by_seed: dict[int, dict]) -> bool:
    """Thresh AP % per set and seed, flagged outside x2 of the paper; True when every entry is within."""
    seeds = list(by_seed)
    print("\nThresh AP % per seed (paper in brackets; * = outside a factor of two)")
    print(f"{'set':<10} {'paper':>7} " + " ".join(f"{'seed ' + str(s):>9}" for s in seeds))
    ok = True
    for name, paper in PAPER_THRESH_AUPRC.items():
        cells = []
        for s in seeds:
            r = by_seed[s]["sets"].get(name)
            if r is None:
                cells.append(f"{'-':>9}")
                continue
            inside = 0.5 <= r["ap_percent"] / paper <= 2.0
            ok &= inside
            cells.append(f"{r['ap_percent']:>8.2f}{' ' if inside else '*'}")
        print(f"{name:<10} {paper:>7.2f} " + " ".join(cells))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="demo data root (Train/, Test/)")
    parser.add_argument(
        "--generate", action="store_true", help="generate each seed's dataset into a temporary directory"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="with --generate")
    parser.add_argument("--n-healthy", type=int, default=40)
    parser.add_argument("--n-per-test-set", type=int, default=12)
    parser.add_argument("--voxel-size", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.generate and args.data is None:
        parser.error("give --data DIR or --generate")
    try:
        if not args.generate:
            if not args.data.is_dir():
                raise MhdUadError("demo data directory not found", args.data)
            print_report(evaluate(args.data))
            return 0
        with tempfile.TemporaryDirectory(prefix="mhd-uad-demo-") as tmp:
            by_seed = {seed: _generate_and_evaluate(tmp, seed, args) for seed in args.seeds}
        print_seed_summary(by_seed)
    except MhdUadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
