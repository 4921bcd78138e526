"""Inference: one test volume through the trained cDDPM, then its anomaly maps (method.md §4.1-4.2, §8).

The encoder runs once per volume; the N reconstructions are single UNet passes at one noise level.
Reconstruction n of scan s uses a simplex field seeded by (run seed, s, n), so a scan's maps repeat
exactly, whatever else is evaluated beside it. The N reconstructions of all slices go through the UNet
in chunks of `max_batch` images under the configured autocast precision. The device is chosen here,
once, for every command that runs a trained model (`select_device`).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from mhd_uad.config import require
from mhd_uad.scoring.anomaly_maps import SCORERS, anomaly_maps

PRECISIONS = {"32": None, "32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class MhdSettings:
    num_reconstructions: int
    t_index: int  # 0-based; noise_level 500 of 1000 -> 499
    ridge: float
    seed: int
    max_batch: int
    precision: str
    scorers: tuple[str, ...]

    @classmethod
    def from_params(cls, params) -> MhdSettings:
        m = params.mhd
        timesteps = int(params.model.diffusion.timesteps)
        n, level = int(m.num_reconstructions), int(m.noise_level)
        require(n >= 2, f"mhd.num_reconstructions must be at least 2 (a covariance needs them), got {n}")
        require(1 <= level <= timesteps, f"mhd.noise_level must lie in 1..{timesteps}, got {level}")
        require(float(m.ridge) > 0, f"mhd.ridge must be positive, got {m.ridge}")
        require(int(m.max_batch) >= 1, f"mhd.max_batch must be >= 1, got {m.max_batch}")
        require(str(m.precision) in PRECISIONS, f"mhd.precision must be one of {sorted(PRECISIONS)}, "
                f"got {m.precision!r}")
        scorers = tuple(str(s) for s in params.evaluate.scorers)
        unknown = [s for s in scorers if s not in SCORERS]
        require(not unknown, f"evaluate.scorers holds unknown scorers {unknown}; known: {list(SCORERS)}")
        require("mhd" in scorers, "evaluate.scorers must include mhd")
        return cls(n, level - 1, float(m.ridge), int(m.seed), int(m.max_batch), str(m.precision), scorers)


def reconstruction_seeds(run_seed: int, scan: str, n: int) -> list[int]:
    """Noise seeds of a scan's n reconstructions, stable across machines and Python runs."""
    out = []
    for i in range(n):
        digest = hashlib.sha256(f"{run_seed}:{scan}:{i}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)
    return out


def select_device(params) -> torch.device:
    """CUDA when the trainer asks for a GPU (or `auto` finds one), else the CPU."""
    accel = str(params.trainer.accelerator)
    if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def release_device_memory() -> None:
    """Hand cached GPU memory back between models (a no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def reconstruct_volume(model, image: np.ndarray, settings: MhdSettings, scan: str,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """[S, H, W] in [0, 1] -> its N reconstructions [N, S, H, W] (float32, [0, 1] scale)."""
    device = torch.device(device)
    x = torch.from_numpy(np.array(image, dtype=np.float32))[:, None].to(device)  # a copy: memmaps are read-only
    seeds = reconstruction_seeds(settings.seed, scan, settings.num_reconstructions)
    with torch.inference_mode(), _autocast(device, settings.precision):
        cond = model.encode(x)  # once per volume, reused by every reconstruction (method.md §3.4)
        recos = model.reconstruct_many(x, settings.t_index, seeds, cond=cond, max_batch=settings.max_batch)
    return recos[:, :, 0].float().cpu().numpy()


def score_volume(model, image: np.ndarray, mask: np.ndarray, settings: MhdSettings, scan: str,
                 device: torch.device | str = "cpu", scorers: tuple[str, ...] | None = None):
    """The anomaly maps of one volume ({scorer: [S, H, W]}) and its mean reconstruction ([S, H, W])."""
    recos = reconstruct_volume(model, image, settings, scan, device)
    maps = anomaly_maps(image, recos, mask, ridge=settings.ridge, scorers=scorers or settings.scorers)
    return maps, recos.mean(axis=0)
