"""benchmarks/paper_profile.py without running it: the device peak table, the report, bad options."""

import importlib.util
import sys

import pytest

from conftest import REPO


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it builds on train_throughput and eval_throughput
    spec = importlib.util.spec_from_file_location("paper_profile", REPO / "benchmarks" / "paper_profile.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_profile", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "fp16"), [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA A10", 125.0), ("Tesla V100-PCIE-16GB", 112.0), ("Tesla V100-SXM2-32GB", 125.0), ("Tesla T4", 65.0),
    ("NVIDIA A10G", None), ("CPU AMD EPYC", None),
])
def test_device_names_find_their_dense_peaks(bench, name, fp16):
    peaks = bench.device_peaks(name)
    assert (peaks["fp16"] if peaks else None) == fp16


def test_fp32_is_held_against_tf32_where_cudnn_uses_it(bench, monkeypatch):
    monkeypatch.setattr(bench.torch.backends.cudnn, "allow_tf32", True)
    assert bench.peak_for(bench.device_peaks("NVIDIA A100-PCIE-40GB"), "fp32") == ("tf32", 156.0)
    assert bench.peak_for(bench.device_peaks("Tesla V100-SXM2-16GB"), "fp32") == ("fp32", 15.7)
    assert bench.peak_for(bench.device_peaks("Tesla T4"), "bf16") is None
    monkeypatch.setattr(bench.torch.backends.cudnn, "allow_tf32", False)
    assert bench.peak_for(bench.device_peaks("NVIDIA A100-PCIE-40GB"), "fp32") == ("fp32", 19.5)


def test_report_marks_scaled_rows_failures_and_the_fraction_of_peak(bench):
    flops = {"unet_parameters": 44_068_481, "encoder_parameters": 24_550_848, "unet_pass": 149e9,
             "encoder_pass": 1.47e9, "train_slice": 452e9, "eval_scan": 74.6e12}
    rows = [
        {"phase": "train", "variant": "fp32", "precision": "fp32", "batch": 32, "throughput": 100.0,
         "unit": "slices/s", "flops_per_s": 45.2e12, "peak_memory_gb": 20.0, "memory": "GPU", "vs_fp32": 1.0,
         "peak_precision": "tf32", "peak_tflops": 494.5, "fraction_of_peak": 45.2 / 494.5},
        {"phase": "eval", "variant": "fp16", "precision": "fp16", "batch": 500, "throughput": 2.0, "unit": "scans/s",
         "flops_per_s": 149.2e12, "peak_memory_gb": 30.0, "memory": "GPU", "vs_fp32": 2.5, "scaled_by": 25.0},
        {"phase": "eval", "variant": "fp16+compile", "precision": "fp16", "error": "RuntimeError: no compiler"},
    ]
    result = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "threads": 16, "quick": False,
              "grid": [96, 96, 50], "num_reconstructions": 10, "train": {"batch": 32, "steps": 10, "warmup": 3},
              "eval": {"slices": 2, "reconstructions": 2, "scans": 3, "max_batch_cap": 500}, "flops": flops,
              "peaks_tflops": bench.device_peaks("NVIDIA H100 80GB HBM3"), "rows": rows, "skipped": []}
    text = bench.markdown(result)
    assert text.startswith("# Paper profile throughput\n") and "UNet 44.07 M parameters, 149.0 GFLOP" in text
    assert "| train | fp32 | 32 | 100 slices/s | 1.00× | 20.00 (GPU) | 45.200 | 9.1 % (tf32 494.5) |" in text
    assert "| eval | fp16 | 500 | 2 scans/s * |" in text and "scaled to the whole scan" in text
    assert "failed: RuntimeError: no compiler" in text and "No peak rate is known" not in text


@pytest.mark.parametrize("argv", [["--train-batch", "0"], ["--eval-recos", "1"], ["--readme", "README.md"]])
def test_bad_options_fail_cleanly_before_any_measurement(bench, capsys, argv):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("paper_profile: error: ") and "Traceback" not in err
