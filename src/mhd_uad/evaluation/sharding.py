"""Scoring spread over processes, one per device: `torchrun --nproc_per_node K -m mhd_uad.cli evaluate ...`.

Rank r of K scores the scans r, r + K, r + 2K, ... of every list. What the merge needs goes to rank 0
exactly: small per-scan results as objects over the process group, large arrays as files in the stage's
work folder (written under a temporary name and renamed). Rank 0 puts them back in the single-process
order and runs the same threshold search and metrics on them, and alone writes the outputs, so these equal
a single process's byte for byte. The process group is gloo (only objects and barriers travel over it); on
CUDA, rank r uses cuda:<LOCAL_RANK>. Without torchrun (WORLD_SIZE unset) nothing here does anything: the
one process keeps everything in memory, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhd_uad.devices import launch_world_size
from mhd_uad.errors import MhdUadError
from mhd_uad.io import atomic_path, replace_dir

GROUP_TIMEOUT = timedelta(hours=6)  # ranks wait for each other's share of a fold, and for rank 0's merge


@dataclass(frozen=True)
class Shard:
    """This process's part of a distributed scoring run (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence) -> list[tuple[int, Any]]:
        """(index, item) of the items this rank handles: r, r + K, r + 2K, ..."""
        return [(i, items[i]) for i in range(self.rank, len(items), self.world)]

    def slot(self, index: int) -> int:
        """Where item `index` of a list sits among this rank's items of it."""
        return index // self.world

    def owner(self, index: int) -> int:
        return index % self.world

    def device(self, device: torch.device) -> torch.device:
        """One device per rank: cuda:<LOCAL_RANK> when scoring on CUDA under torchrun."""
        if device.type == "cuda" and self.world > 1:
            if self.local_rank >= torch.cuda.device_count():
                raise MhdUadError(f"torchrun started local rank {self.local_rank}, but this machine shows "
                                  f"{torch.cuda.device_count()} CUDA devices: start one process per device "
                                  "(--nproc_per_node)")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def gather_in_order(self, items: list[tuple[int, Any]]) -> list | None:
        """The (index, value) pairs of every rank, on rank 0, as the values in index order (None elsewhere)."""
        parts = self.gather(items)
        return None if parts is None else [v for _, v in sorted((p for part in parts for p in part),
                                                                key=lambda p: p[0])]

    def stash(self, path: Path, arrays: dict[str, np.ndarray]):
        """Arrays for rank 0: kept as they are in a single process, else saved to `path` (.npz, atomically)."""
        if self.world == 1:
            return arrays
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        return path


SINGLE = Shard()  # a process on its own


def unstash(item, key: str) -> np.ndarray:
    """One array of what `Shard.stash` returned."""
    if isinstance(item, dict):
        return item[key]
    with np.load(item) as data:
        return data[key]


def drop(items) -> None:
    """Remove the files `Shard.stash` wrote (nothing to do for arrays kept in memory)."""
    for item in items:
        if isinstance(item, Path):
            item.unlink(missing_ok=True)


@contextlib.contextmanager
def process_shard() -> Iterator[Shard]:
    """This process's Shard: from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT),
    with a gloo process group for the run's duration; Shard() without torchrun."""
    if launch_world_size() == 1:
        yield Shard()
        return
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        yield Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK") or 0))
    finally:
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def shared_folder(shard: Shard, path: Path) -> Iterator[Path]:
    """`io.replace_dir(path)` opened by rank 0, its temporary folder shared by every rank: each writes its
    part into it; once all are done (a barrier), rank 0 puts it in place."""
    if not shard.main:
        yield Path(shard.broadcast(None))
        shard.barrier()
        return
    with replace_dir(path) as tmp:
        shard.broadcast(str(tmp))
        yield tmp
        shard.barrier()
