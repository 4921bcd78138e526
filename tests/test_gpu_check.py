"""The GPU check (`make gpu-check`, benchmarks/gpu_check.sh): its CUDA step runs every CUDA-only test, and on a
machine without CUDA it stops at once with a clear message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
MARK = "@pytest.mark.cuda"


def _test_files() -> list[Path]:
    """The test modules, this one (which names the marker in its checks) apart."""
    return sorted(f for f in (REPO / "tests").glob("test_*.py") if f.name != Path(__file__).name)


def _marked(f: Path) -> int:
    return sum(line.strip() == MARK for line in f.read_text().splitlines())


def test_cuda_tests_carry_the_marker_the_check_selects():
    """A CUDA-only test skipped by hand (skipif on torch.cuda) would be left out of the GPU check; the marker
    stands alone on its line, as the check's grep finds it."""
    by_hand = re.compile(r"skipif\(\s*not\s+torch\.cuda\.is_available\(\)")
    offenders = [f.name for f in _test_files() if by_hand.search(f.read_text())]
    assert not offenders, f"use {MARK} instead of a skipif on torch.cuda in {offenders}"
    for f in _test_files():
        for line in f.read_text().splitlines():
            if "pytest.mark.cuda" in line:
                assert line.strip() == MARK, f"{f.name}: {line.strip()!r} (the check greps for a line '{MARK}')"
    text = SCRIPT.read_text()
    assert re.search(r'step cuda_tests .*-m cuda \$\(grep -l "pytest\.mark\.cuda\$" tests/test_\*\.py\)', text)


def test_the_marked_tests_are_collected_and_skipped_without_cuda():
    files = [str(f) for f in _test_files() if _marked(f)]
    assert any(f.endswith("test_device_maps.py") for f in files)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
                          "-n", "0", *files], cwd=REPO, capture_output=True, text=True, timeout=600)
    collected = re.findall(r"(\d+) (?:passed|skipped)", out.stdout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert sum(int(n) for n in collected) == sum(_marked(Path(f)) for f in files)
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in out.stdout and " passed" not in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="what the check does without a GPU")
def test_without_cuda_the_check_stops_with_a_message(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "gpu")}
    out = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA device visible" in (tmp_path / "gpu" / "summary.txt").read_text()
    assert not (tmp_path / "gpu" / "device.txt").exists()
