"""Device choice without a GPU: which rank writes, the free-device locks that keep queued experiments on
different GPUs (the device count is faked; other mhd-uad processes are real subprocesses), and each rank's
share of the scans under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import REPO
from mhd_uad import devices
from mhd_uad.devices import claim_device, is_main_process, pin_free_device

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "CUDA_VISIBLE_DEVICES")


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path / "locks"))
    yield tmp_path / "locks"
    for lock in devices._held:  # noqa: SLF001 (release what the test claimed)
        lock.release()
    devices._held.clear()  # noqa: SLF001


def _params(accelerator="auto"):
    return SimpleNamespace(trainer=SimpleNamespace(accelerator=accelerator))


def _other_process(code: str, locks, **env) -> subprocess.Popen:
    """Another mhd-uad process on this machine, sharing the lock folder."""
    full = {**os.environ, devices.LOCK_DIR_ENV: str(locks), "PYTHONPATH": str(REPO / "src"), **env}
    for key in LAUNCH_VARS:
        if key not in env:
            full.pop(key, None)
    return subprocess.Popen([sys.executable, "-c", "from types import SimpleNamespace as N\n"
                             "from mhd_uad.devices import claim_device, pin_free_device\n" + code],
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_queued_stages_take_different_free_devices_and_a_finished_one_frees_its_own(clean_env):
    pin = "import os\nprint(pin_free_device(N(trainer=N(accelerator='gpu')), 1, count=lambda: 3), " \
          "os.environ['CUDA_VISIBLE_DEVICES'])"
    assert pin_free_device(_params(), 1, count=lambda: 3) == "0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # before CUDA initialises, so cuda:0 is the claimed one
    second = _other_process(pin + "\nimport time; time.sleep(30)", clean_env)  # holds device 1 while it runs
    time.sleep(0.2)
    third = _other_process(pin, clean_env)
    assert third.communicate(timeout=60)[0].split() == ["2", "2"]  # 0 and 1 are held
    assert second.poll() is None
    second.kill()
    second.wait()
    fourth = _other_process(pin, clean_env)  # the killed process's device is free again
    assert fourth.communicate(timeout=60)[0].split() == ["1", "1"]


def test_claiming_waits_while_every_device_is_held(clean_env):
    os.environ["CUDA_VISIBLE_DEVICES"] = "4,GPU-abc"  # the devices CUDA_VISIBLE_DEVICES names are the candidates
    assert pin_free_device(_params("cuda"), "1", count=lambda: 8) == "4"
    assert claim_device(["GPU-abc"], clean_env) == "GPU-abc"
    waiting = _other_process("print(claim_device(['4', 'GPU-abc'], __import__('pathlib').Path("
                             f"{str(clean_env)!r}), poll_s=0.1))", clean_env)
    time.sleep(1.5)
    assert waiting.poll() is None  # both held: still waiting
    devices._held[0].release()  # noqa: SLF001 (this process's device 4 is done)
    out, err = waiting.communicate(timeout=60)
    assert out.split() == ["4"], err


@pytest.mark.parametrize(("accelerator", "stage_devices", "env", "visible"), [
    ("cpu", 1, {}, 4),  # not on CUDA
    ("auto", 2, {}, 4),  # the stage uses several devices (DDP): Lightning places it
    ("auto", "auto", {}, 4),
    ("gpu", 1, {"WORLD_SIZE": "2"}, 4),  # a rank of a torchrun launch: cuda:<LOCAL_RANK>
    ("gpu", 1, {}, 1),  # nothing to choose
    ("gpu", 1, {"CUDA_VISIBLE_DEVICES": "3"}, 8),  # pinned by the user
])
def test_nothing_is_claimed_where_there_is_no_choice_to_make(clean_env, monkeypatch, accelerator, stage_devices,
                                                              env, visible):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert pin_free_device(_params(accelerator), stage_devices, count=lambda: visible) is None
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before and not clean_env.exists()


@pytest.mark.parametrize(("env", "main"), [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3", "LOCAL_RANK": "1"}, False),
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False), ({"NODE_RANK": "1"}, False), ({"LOCAL_RANK": "0"}, True),
    ({"SLURM_PROCID": "2"}, False), ({"SLURM_PROCID": "2", "LOCAL_RANK": "0"}, True),
])
def test_the_main_process_is_rank_zero_of_whichever_launcher_started_it(clean_env, monkeypatch, env, main):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_main_process() is main


def test_each_of_k_ranks_scores_every_kth_scan_and_finds_its_slot():
    from mhd_uad.evaluation.sharding import Shard

    scans = [f"scan{i}" for i in range(7)]
    shares = [Shard(rank, 3).mine(scans) for rank in range(3)]
    assert shares[1] == [(1, "scan1"), (4, "scan4")]
    assert sorted(i for share in shares for i, _ in share) == list(range(7))  # each scan once
    for rank, share in enumerate(shares):
        assert [Shard(rank, 3).slot(i) for i, _ in share] == list(range(len(share)))
        assert {Shard(0, 3).owner(i) for i, _ in share} == {rank}
    assert Shard().mine(scans) == list(enumerate(scans))


def test_more_processes_than_cuda_devices_is_a_clear_error(monkeypatch):
    import torch

    from mhd_uad.errors import MhdUadError
    from mhd_uad.evaluation.sharding import Shard

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MhdUadError, match="local rank 2, but this machine shows 2 CUDA devices"):
        Shard(2, 4, local_rank=2).device(torch.device("cuda"))
    assert Shard(3, 4, local_rank=3).device(torch.device("cpu")) == torch.device("cpu")


def test_scoring_processes_from_evaluate_devices(monkeypatch):
    from mhd_uad.devices import relaunch_command, scoring_processes
    from mhd_uad.errors import ConfigError

    for var in ("WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)

    def params(devices, accelerator="auto"):
        return SimpleNamespace(evaluate={"devices": devices}, trainer=SimpleNamespace(accelerator=accelerator))

    assert scoring_processes(params(1)) == 1 and scoring_processes(params(3)) == 3
    assert scoring_processes(params("auto"), count=lambda: 4) == 4
    assert scoring_processes(params("auto"), count=lambda: 0) == 1  # no GPU: one process
    assert scoring_processes(params("auto", "cpu"), count=lambda: 4) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert scoring_processes(params("auto"), count=lambda: 8) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert scoring_processes(params(4)) == 1  # already one rank of a launch
    monkeypatch.delenv("WORLD_SIZE")
    for bad in (0, -2, "two", 1.5, True):
        with pytest.raises(ConfigError, match="evaluate.devices"):
            scoring_processes(params(bad))
    command = relaunch_command(2, ["evaluate", "--dataset", "WMH", "mhd.ridge=0.1"])
    assert command[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert command[7:] == ["mhd_uad.cli", "evaluate", "--dataset", "WMH", "mhd.ridge=0.1"]
