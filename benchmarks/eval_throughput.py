"""Evaluation throughput: scans per second through reconstruction and scoring, and peak memory.

One scan = the encoder once, N reconstructions of every slice (batched UNet passes) plus the cddpm
scorer's three ENS reconstructions when it is among the scorers, then the anomaly maps (MHD via the
low-rank solve, SSIM, the baselines). Uses the profile's network with random
weights (speed does not depend on training) on a brain-shaped random volume of the profile's grid:

    python benchmarks/eval_throughput.py                       # demo profile, CPU or the first GPU
    python benchmarks/eval_throughput.py --profile paper --scans 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from mhd_uad.config import compose
from mhd_uad.models.factory import build_cddpm
from mhd_uad.models.inference import MhdSettings, reconstruct_scan
from mhd_uad.scoring.anomaly_maps import anomaly_maps

REPO = Path(__file__).resolve().parents[1]


def brain_volume(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    s, h, w = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, s), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    mask = ((zz / 0.9) ** 2 + (yy / 0.8) ** 2 + (xx / 0.7) ** 2 <= 1).astype(np.float32)
    image = np.random.default_rng(seed).random(shape, dtype=np.float32) * mask
    return image, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--scans", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. mhd.num_reconstructions=20")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    params = compose([f"profile={args.profile}", *args.overrides], REPO)
    settings = MhdSettings.from_params(params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and settings.precision == "16-mixed":
        settings = MhdSettings(**{**settings.__dict__, "precision": "bf16-mixed"})
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    model = build_cddpm(params).to(device).eval()
    x, y, z = (int(v) for v in params.prepare.grid)
    image, mask = brain_volume((z, x, y), 0)

    ensemble = "cddpm" in settings.scorers
    reconstruct_scan(model, image, settings, "warm-up", device, ensemble)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_reco = t_maps = 0.0
    for i in range(args.scans):
        start = time.perf_counter()
        recos, ens = reconstruct_scan(model, image, settings, f"scan{i}", device, ensemble)
        t_reco += time.perf_counter() - start
        start = time.perf_counter()
        anomaly_maps(image, recos, mask, ridge=settings.ridge, scorers=settings.scorers, ensemble=ens)
        t_maps += time.perf_counter() - start
    per_scan = (t_reco + t_maps) / args.scans
    result = {
        "device": where, "profile": args.profile, "grid": [x, y, z], "num_reconstructions": settings.num_reconstructions,
        "precision": settings.precision, "scorers": list(settings.scorers),
        "reconstruction_s_per_scan": t_reco / args.scans, "maps_s_per_scan": t_maps / args.scans,
        "scans_per_s": 1.0 / per_scan,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.type == "cuda":
        result["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"evaluation throughput on {where} (torch {torch.__version__}), profile {args.profile}, "
          f"grid {x}x{y}x{z}, N={settings.num_reconstructions}, {settings.precision}")
    print(f"  reconstruction {result['reconstruction_s_per_scan']:.2f} s/scan, maps ({len(settings.scorers)} scorers) "
          f"{result['maps_s_per_scan']:.2f} s/scan -> {result['scans_per_s']:.3f} scans/s")
    print(f"  peak memory: {result['peak_rss_gb']:.2f} GB RSS"
          + (f", {result['peak_gpu_mem_gb']:.2f} GB GPU" if "peak_gpu_mem_gb" in result else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
