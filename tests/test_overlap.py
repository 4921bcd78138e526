"""evaluation.overlap: the device steps run in order in one thread, the CPU steps beside it, and the results
come back in the items' order whatever order the CPU steps finish in."""

import random
import threading
import time

import pytest
import torch

from mhd_uad.evaluation.overlap import MAX_AUTO_WORKERS, evaluation_workers, overlapped


def _steps(log: list):
    def device_step(item):
        log.append(("device", item, threading.current_thread().name))
        return item * 10

    def cpu_step(item, made):
        time.sleep(random.Random(item).random() * 0.01)  # finish out of order
        return item, made, threading.current_thread().name

    return device_step, cpu_step


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_come_back_in_order_and_device_steps_run_in_order_in_one_thread(workers):
    log = []
    out = list(overlapped(range(20), *_steps(log), workers))
    assert [(i, made) for i, made, _ in out] == [(i, 10 * i) for i in range(20)]
    assert [item for _, item, _ in log] == list(range(20))
    device_threads = {name for *_, name in log}
    cpu_threads = {name for *_, name in out}
    assert len(device_threads) == 1
    if workers == 0:  # inline: no thread at all
        assert device_threads == cpu_threads == {threading.current_thread().name}
    else:
        assert device_threads != {threading.current_thread().name}
        assert 1 <= len(cpu_threads) <= workers and not cpu_threads & device_threads


def test_the_device_runs_ahead_of_the_cpu_steps():
    started, first_cpu_done = [], threading.Event()

    def device_step(item):
        started.append(item)
        return item

    def cpu_step(item, made):
        if item == 0:
            time.sleep(0.2)
            first_cpu_done.set()
        return made

    gen = overlapped(range(5), device_step, cpu_step, workers=1)
    assert next(gen) == 0
    assert len(started) >= 2  # the device made scan 1 while the CPU finished scan 0
    assert list(gen) == [1, 2, 3, 4]


@pytest.mark.parametrize("failing", ["device", "cpu"])
def test_an_error_in_either_step_reaches_the_caller(failing):
    def device_step(item):
        if failing == "device" and item == 3:
            raise ValueError("device broke on 3")
        return item

    def cpu_step(item, made):
        if failing == "cpu" and item == 3:
            raise ValueError("cpu broke on 3")
        return made

    got = []
    with pytest.raises(ValueError, match=f"{failing} broke on 3"):
        for value in overlapped(range(10), device_step, cpu_step, workers=2):
            got.append(value)
    assert got == [0, 1, 2]


def test_leaving_early_stops_the_device_thread():
    made = []

    def device_step(item):
        made.append(item)
        return item

    gen = overlapped(range(1000), device_step, lambda item, value: value, workers=1)
    assert next(gen) == 0
    gen.close()
    count = len(made)
    time.sleep(0.1)
    assert len(made) == count < 1000
    assert not [t for t in threading.enumerate() if t.name == "mhd-uad-device"]


def test_auto_workers_none_on_a_cpu_some_beside_a_gpu():
    assert evaluation_workers("auto", torch.device("cpu")) == 0
    assert 1 <= evaluation_workers("auto", torch.device("cuda")) <= MAX_AUTO_WORKERS
    assert evaluation_workers(2, torch.device("cpu")) == 2


@pytest.mark.parametrize("bad", [-1, "four", 1.5, True])
def test_bad_worker_counts_are_refused_by_name(bad):
    from mhd_uad.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluate.workers"):
        evaluation_workers(bad, torch.device("cpu"))
