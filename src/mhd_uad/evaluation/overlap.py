"""Evaluation that keeps the device busy: the device makes scan i + 1 while the CPU finishes scan i.

Scoring a scan has a device part (the encoder and the N reconstructions: UNet passes) and a CPU part (the
anomaly maps, the per-volume metrics, the writing). Done one after the other, a GPU idles while the CPU
works. `overlapped` runs the device part of every item in order in one thread of its own (one device, one
stream of work, in the list's order) and hands each result to a pool of CPU threads for the CPU part; the
caller gets the finished items back in the list's order, so whatever it accumulates is what the sequential
loop would have accumulated. At most `workers + 1` items wait between the two parts (their reconstructions
are the memory held).

With `workers` 0 everything runs inline in the caller, one item after the other: on a CPU both parts
compete for the same cores and overlapping them gains nothing (`evaluation_workers` picks 0 there).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from mhd_uad.config import auto_count
from mhd_uad.devices import usable_cpus

T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")

MAX_AUTO_WORKERS = 4  # CPU threads per evaluating process when `evaluate.workers` is auto (each also uses torch's)

_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def evaluation_workers(setting, device: torch.device) -> int:
    """CPU threads that finish scans beside the device: `evaluate.workers` as given, or for `auto` none on a
    CPU (the same cores would do both parts) and min(4, CPUs / 2) beside a GPU."""
    count = auto_count(setting, "evaluate.workers", 0)
    if count is not None:
        return count
    if device.type == "cpu":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, usable_cpus() // 2))


def overlapped(items: Iterable[T], device_step: Callable[[T], U], cpu_step: Callable[[T, U], V], workers: int,
               device: torch.device | None = None) -> Iterator[V]:
    """cpu_step(item, device_step(item)) for every item, in the items' order; the device steps run in one
    thread in order, the CPU steps in `workers` threads beside it (inline without threads when 0). An
    exception in either step is raised here, and the rest of the work is abandoned."""
    if workers <= 0:
        for item in items:
            yield cpu_step(item, device_step(item))
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mhd-uad-cpu")
    handed: queue.Queue = queue.Queue(maxsize=workers + 1)  # CPU steps under way, in the items' order
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handed.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if device is not None and device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # the current device is per thread (a rank's cuda:<LOCAL_RANK>)
            for item in items:
                if stop.is_set():
                    return
                made = device_step(item)
                if not put(pool.submit(cpu_step, item, made)):
                    return
        except BaseException as exc:  # handed to the caller, which raises it
            put(_Failed(exc))
        finally:
            put(_DONE)

    thread = threading.Thread(target=produce, name="mhd-uad-device", daemon=True)
    thread.start()
    try:
        while True:
            entry = handed.get()
            if entry is _DONE:
                break
            if isinstance(entry, _Failed):
                raise entry.exc
            future: Future = entry
            yield future.result()
    finally:
        stop.set()
        while thread.is_alive():  # let a producer blocked on a full queue see the stop
            try:
                handed.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
        pool.shutdown(wait=True, cancel_futures=True)
