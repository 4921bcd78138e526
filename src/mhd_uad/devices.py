"""Which process this is and which device it uses: the rank a distributed launcher gave it, and a free GPU
for a stage that asks for one.

Ranks come from the launchers' environment, read before any process group exists: torchrun (RANK,
LOCAL_RANK, WORLD_SIZE), Lightning's own launcher (LOCAL_RANK and NODE_RANK in the processes it starts) and
SLURM's srun (SLURM_PROCID). Only the process of rank 0 writes a stage's outputs.

A free GPU: `dvc queue start -j K` runs K queued experiments at once and gives none of them a device of its
own, so each would start on the first GPU. When several CUDA devices are visible and a stage asks for one,
`pin_free_device` takes the first whose lock file no other process holds (one file per device, in the
folder $MHD_UAD_DEVICE_LOCKS, default `mhd-uad-devices` in the system's temporary directory), waits while
all are held, and narrows CUDA_VISIBLE_DEVICES to it before CUDA initialises. The lock is an OS file lock
held for the life of the process: a finished or crashed stage frees its device.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "MHD_UAD_DEVICE_LOCKS"
CUDA_ACCELERATORS = ("auto", "gpu", "cuda")
_held: list = []  # the locks of this process's devices, kept (a collected FileLock releases its file)


def is_main_process() -> bool:
    """Whether this process is rank 0 of a distributed launch, or not part of one."""
    env = os.environ
    if env.get("RANK"):  # torchrun
        return int(env["RANK"]) == 0
    if env.get("LOCAL_RANK") or env.get("NODE_RANK"):  # Lightning's launcher; its parent on node n is local rank 0
        return int(env.get("LOCAL_RANK") or 0) == 0 and int(env.get("NODE_RANK") or 0) == 0
    return int(env.get("SLURM_PROCID") or 0) == 0  # srun


def launch_world_size() -> int:
    """Processes in a torchrun or Lightning launch (1 without one)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else all of the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "mhd-uad-devices")


def visible_cuda_devices(count: Callable[[], int]) -> list[str]:
    """The CUDA devices this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs);
    `count()` gives their number when the variable is unset."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count())]
    return [d.strip() for d in listed.split(",") if d.strip()]


def claim_device(candidates: list[str], folder: Path, poll_s: float = 10.0) -> str:
    """The first of `candidates` whose lock in `folder` no other process holds, locked for this process's
    life; while every one is held, waits and tries again."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for device in candidates:
            lock = FileLock(str(folder / f"cuda-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"))
            try:
                lock.acquire(blocking=False)
            except Timeout:
                continue
            _held.append(lock)
            return device
        if not waiting:
            log.info("all %d CUDA devices are held by other mhd-uad processes (locks in %s): waiting",
                     len(candidates), folder)
            waiting = True
        time.sleep(poll_s)


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()  # NVML, without initialising CUDA (torch does not cache it before that)


def pin_free_device(params, devices: int | str | None = 1, count: Callable[[], int] = _cuda_device_count
                    ) -> str | None:
    """For a process that uses one device (`devices` == 1, not part of a distributed launch) on a CUDA
    accelerator: when several CUDA devices are visible, claim a free one and make it the only one visible.
    Returns the device claimed, or None when there was nothing to choose."""
    if str(params.trainer.accelerator) not in CUDA_ACCELERATORS or str(devices) != "1" or launch_world_size() > 1:
        return None
    candidates = visible_cuda_devices(count)
    if len(candidates) < 2:
        return None
    device = claim_device(candidates, lock_dir())
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    log.info("using CUDA device %s (free among %s)", device, ",".join(candidates))
    return device


def scoring_processes(params, count: Callable[[], int] = _cuda_device_count) -> int:
    """How many processes `score-healthy`/`evaluate` spread over (`evaluate.devices`): as given, or for `auto`
    one per visible CUDA device on a CUDA accelerator (1 on a CPU). Inside a launch (torchrun, srun) the
    launcher has decided: 1."""
    from mhd_uad.config import auto_count

    value = auto_count(params.evaluate.get("devices", 1), "evaluate.devices", 1)
    if launch_world_size() > 1:
        return 1
    if value is None:
        cuda = str(params.trainer.accelerator) in CUDA_ACCELERATORS
        return max(1, len(visible_cuda_devices(count))) if cuda and count() > 0 else 1
    return value


def relaunch_command(processes: int, argv: list[str]) -> list[str]:
    """The command that runs this mhd-uad command again as `processes` ranks of one machine (torchrun's
    launcher, standalone: it picks a free port), each scoring its share (evaluation.sharding)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "mhd_uad.cli", *argv]
