"""Inference: one test volume through the trained cDDPM, then its anomaly maps (method.md §4.1-4.2, §8).

The encoder runs once per volume; the N reconstructions are single UNet passes at one noise level.
Reconstruction n of scan s uses a simplex field seeded by (run seed, s, n), so a scan's maps repeat
exactly, whatever else is evaluated beside it. When the cddpm scorer is asked for, the same encoder pass
also serves its ENS reconstructions (method.md §4.6): one at each of `mhd.cddpm_noise_levels`, the one at
0-based index t seeded by (run seed, s, "cddpm", t). The reconstructions of all slices go through the
UNet in chunks of `max_batch` images under the configured autocast precision. The device is chosen here,
once, for every command that runs a trained model (`select_device`).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from mhd_uad.config import as_int_list, auto_switch, require
from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.anomaly_maps import SCORERS, anomaly_maps
from mhd_uad.scoring.mahalanobis import pixelwise_mahalanobis

MAPS_ON = ("auto", "cpu", "device")
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
    cddpm_t_indices: tuple[int, ...] = ()  # 0-based; the cddpm scorer's noise levels 250/500/750 -> 249/499/749
    channels_last: bool | None = False  # NHWC memory format for the passes (the same maths); None: auto
    maps_on: str = "cpu"  # where the anomaly maps are made: cpu, device, or auto (the device when it is a GPU)

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
        levels = m.get("cddpm_noise_levels")
        require(levels is not None or "cddpm" not in scorers,
                "evaluate.scorers includes cddpm, so mhd.cddpm_noise_levels must be set (method.md §4.6: "
                "[250, 500, 750])")
        t_indices = () if levels is None else _cddpm_t_indices(levels, timesteps)
        channels_last = auto_switch(m.get("channels_last", False), "mhd.channels_last")
        maps_on = params.evaluate.get("maps_on", "auto")
        require(maps_on in MAPS_ON, f"evaluate.maps_on must be one of {', '.join(MAPS_ON)}, got {maps_on!r}")
        return cls(n, level - 1, float(m.ridge), int(m.seed), int(m.max_batch), str(m.precision), scorers,
                   t_indices, channels_last, str(maps_on))


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """Whether to run in NHWC: as set, or for auto (None) on the CPU only. Measured: the demo's evaluation
    passes 1.25x faster in NHWC on a 2-core CPU; on an H200 the paper UNet ran 0.80x (evaluation) and 0.90x
    (training) in NHWC, so CUDA keeps NCHW."""
    return device.type == "cpu" if setting is None else bool(setting)


def _cddpm_t_indices(levels, timesteps: int) -> tuple[int, ...]:
    """mhd.cddpm_noise_levels (1-based t of T, like mhd.noise_level) -> 0-based indices (250 -> 249)."""
    key = "mhd.cddpm_noise_levels"
    require(not isinstance(levels, str | bytes), f"`{key}` must be a list of integers, got {levels!r}")
    values = as_int_list(levels, key)
    require(all(float(v) == int(v) for v in levels), f"`{key}` must be a list of integers, got {list(levels)}")
    require(len(values) >= 1, f"`{key}` must name at least one noise level, got {values}")
    require(all(1 <= v <= timesteps for v in values), f"`{key}` entries must lie in 1..{timesteps}, got {values}")
    require(len(set(values)) == len(values), f"`{key}` lists a noise level twice: {values}")
    return tuple(v - 1 for v in values)


def _seed(key: str) -> int:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def reconstruction_seeds(run_seed: int, scan: str, n: int) -> list[int]:
    """Noise seeds of a scan's n reconstructions, stable across machines and Python runs."""
    return [_seed(f"{run_seed}:{scan}:{i}") for i in range(n)]


def ensemble_seeds(run_seed: int, scan: str, t_indices: tuple[int, ...]) -> list[int]:
    """Noise seeds of a scan's cddpm ENS reconstructions, one per 0-based t index (a seed depends on its own t
    only, and none coincides with a reconstruction_seeds key). The original draws a fresh unseeded field per
    t (method.md §3.2); seeding makes a scan's cddpm map repeat exactly."""
    return [_seed(f"{run_seed}:{scan}:cddpm:{t}") for t in t_indices]


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
    if device.type == "cpu" and dtype is torch.float16:
        dtype = torch.bfloat16  # as Lightning does for training: CPU fp16 autocast is many times slower than bf16
    return torch.autocast(device_type=device.type, dtype=dtype)


def reconstruct_scan(model, image: np.ndarray, settings: MhdSettings, scan: str,
                     device: torch.device | str = "cpu", ensemble: bool = False, keep_on_device: bool = False
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """[S, H, W] in [0, 1] -> (its N reconstructions [N, S, H, W] at settings.t_index, and with `ensemble`
    the cddpm scorer's L reconstructions [L, S, H, W], one at each of settings.cddpm_t_indices, else None);
    float32, [0, 1] scale, from one encoder pass; numpy arrays, or tensors on the device with
    `keep_on_device`."""
    if ensemble and not settings.cddpm_t_indices:
        raise MhdUadError("the cddpm scorer needs mhd.cddpm_noise_levels (method.md §4.6: [250, 500, 750])")
    device = torch.device(device)
    x = torch.from_numpy(np.array(image, dtype=np.float32))[:, None].to(device)  # a copy: memmaps are read-only
    if use_channels_last(settings.channels_last, device):
        # In place, as .to(device) is. The 1-channel input needs no conversion: its layout is the same in NHWC.
        model = model.to(memory_format=torch.channels_last)
    seeds = reconstruction_seeds(settings.seed, scan, settings.num_reconstructions)
    ens = None
    with torch.inference_mode(), _autocast(device, settings.precision):
        cond = model.encode(x)  # once per volume, reused by every reconstruction (method.md §3.4)
        recos = model.reconstruct_many(x, settings.t_index, seeds, cond=cond, max_batch=settings.max_batch)
        if ensemble:
            # differs knowingly: seeded fields per (scan, t); the original draws a fresh random field per t
            ens_seeds = ensemble_seeds(settings.seed, scan, settings.cddpm_t_indices)
            ens = torch.cat([model.reconstruct_many(x, t, [seed], cond=cond, max_batch=settings.max_batch)
                             for t, seed in zip(settings.cddpm_t_indices, ens_seeds, strict=True)])
    recos, ens = recos[:, :, 0].float(), None if ens is None else ens[:, :, 0].float()
    if keep_on_device:
        return recos, ens
    return recos.cpu().numpy(), None if ens is None else ens.cpu().numpy()


def reconstruct_volume(model, image: np.ndarray, settings: MhdSettings, scan: str,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """[S, H, W] in [0, 1] -> its N reconstructions [N, S, H, W] (float32, [0, 1] scale)."""
    return reconstruct_scan(model, image, settings, scan, device)[0]


def maps_on_device(settings: MhdSettings, device: torch.device) -> bool:
    """Whether a scan's anomaly maps are made on the device (evaluate.maps_on; auto: on a GPU)."""
    return settings.maps_on == "device" or (settings.maps_on == "auto" and torch.device(device).type == "cuda")


@dataclass
class DeviceScan:
    """What the device made of one scan: its reconstructions (on the CPU, when the maps are made there), or its
    maps and mean reconstruction made on the device (`maps_on_device`), with what its Mahalanobis solve
    reported when asked (`diagnostics`)."""

    recos: np.ndarray | None = None
    ens: np.ndarray | None = None
    maps: dict[str, np.ndarray] | None = None
    reco_mean: np.ndarray | None = None
    diagnostics: dict | None = None


def device_part(model, image: np.ndarray, mask: np.ndarray, settings: MhdSettings, scan: str,
                device: torch.device | str = "cpu", scorers: tuple[str, ...] | None = None,
                diagnostics: bool = False) -> DeviceScan:
    """The device's part of scoring a scan: the reconstructions, and the maps too when they are made on the
    device (scoring.device_maps, equal to scoring.anomaly_maps to 1e-5). With `diagnostics` and the maps on the
    device, the residual's share in the span comes from the device's Mahalanobis solve, so the reconstructions
    stay there."""
    scorers = scorers or settings.scorers
    device = torch.device(device)
    ensemble = "cddpm" in scorers
    if not maps_on_device(settings, device):
        recos, ens = reconstruct_scan(model, image, settings, scan, device, ensemble)
        return DeviceScan(recos, ens)
    from mhd_uad.scoring.device_maps import anomaly_maps_torch

    recos, ens = reconstruct_scan(model, image, settings, scan, device, ensemble, keep_on_device=True)
    with torch.inference_mode():
        x = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)
        m = torch.from_numpy(np.array(mask, dtype=np.float32)).to(device)
        diag = {} if diagnostics else None
        maps = anomaly_maps_torch(x, recos, m, ridge=settings.ridge, scorers=scorers, ensemble=ens, diagnostics=diag)
        if diag is not None and "mhd" not in scorers:  # no mhd map: a solve for the share alone
            pixelwise_mahalanobis(x, recos, m, ridge=settings.ridge, diagnostics=diag)
        return DeviceScan(maps={k: v.cpu().numpy() for k, v in maps.items()}, reco_mean=recos.mean(0).cpu().numpy(),
                          diagnostics=diag)


def cpu_part(image: np.ndarray, mask: np.ndarray, made: DeviceScan, settings: MhdSettings,
             scorers: tuple[str, ...] | None = None, diagnostics: dict | None = None):
    """The CPU's part of scoring a scan: its anomaly maps ({scorer: [S, H, W]}, made here unless the device
    made them) and its mean reconstruction. With a `diagnostics` dict, its "residual_share_in_span" is set
    (scoring.diagnostics) from the Mahalanobis solve that made the mhd map, here or on the device (a solve of
    its own without mhd among the scorers)."""
    scorers = scorers or settings.scorers
    if made.maps is not None:
        maps, reco_mean = made.maps, made.reco_mean
        if diagnostics is not None:
            if made.diagnostics is None:
                raise MhdUadError("diagnostics of maps made on the device: device_part(..., diagnostics=True)")
            diagnostics.update(made.diagnostics)
        return maps, reco_mean
    maps = anomaly_maps(image, made.recos, mask, ridge=settings.ridge, scorers=scorers, ensemble=made.ens,
                        diagnostics=diagnostics)
    if diagnostics is not None and "mhd" not in scorers:
        pixelwise_mahalanobis(image, made.recos, mask, ridge=settings.ridge, diagnostics=diagnostics)
    return maps, made.recos.mean(axis=0)


def score_volume(model, image: np.ndarray, mask: np.ndarray, settings: MhdSettings, scan: str,
                 device: torch.device | str = "cpu", scorers: tuple[str, ...] | None = None,
                 diagnostics: dict | None = None):
    """The anomaly maps of one volume ({scorer: [S, H, W]}) and its mean reconstruction ([S, H, W]): the
    device part (`device_part`; the cddpm scorer's ENS reconstructions only when cddpm is among the scorers),
    then the CPU part (`cpu_part`)."""
    made = device_part(model, image, mask, settings, scan, device, scorers, diagnostics is not None)
    return cpu_part(image, mask, made, settings, scorers, diagnostics)
