"""benchmarks/checkpoint_cost.py on the demo profile's cDDPM (small): what it writes, and its report."""

import json

from conftest import load_benchmark


def test_the_benchmark_writes_and_times_the_original_and_the_resume_points(tmp_path):
    bench = load_benchmark("checkpoint_cost")
    assert bench.main(["--profile", "demo", "--reps", "1", "--dir", str(tmp_path / "work"),
                       "--report", str(tmp_path / "report")]) == 0
    r = json.loads((tmp_path / "report" / "checkpoint_cost.json").read_text())
    # a full checkpoint holds the weights and Adam's two moments (float32); a resume point adds the best weights
    weights = 4 * r["parameters"]
    assert 3 * weights < r["full_checkpoint_bytes"] < 3 * weights * 1.05
    assert r["resume_point_bytes"] - r["full_checkpoint_bytes"] >= weights
    assert r["original_per_new_best_s"] == 2 * r["full_checkpoint_s"] > 0 and r["here_per_new_best_s"] > 0
    assert "epoch_s" not in r  # the demo profile has no GPU reference here
    assert list((tmp_path / "work").iterdir()) == []  # its checkpoints were removed
    text = (tmp_path / "report" / "checkpoint_cost.md").read_text()
    assert "| the original, at each new lowest val loss" in text and "epochs of training" not in text


def test_the_report_counts_the_writes_in_epochs_of_the_gpus_training():
    bench = load_benchmark("checkpoint_cost")
    r = {"profile": "paper", "device": "CPU x", "torch": "2", "parameters": 68.6e6, "full_checkpoint_bytes": 824e6,
         "original_per_new_best_s": 3.0, "here_per_new_best_s": 0.01, "resume_point_bytes": 1100e6,
         "resume_point_s": 1.8, "resume_every_s": 600.0, "batch_size": 32, "steps_per_epoch": 12, "epoch_s": 1.5,
         "epoch_device": "NVIDIA H200", "epoch_source": "the fp16 model-only step"}
    text = bench.report_markdown(r)
    assert "| 2 × 824 MB | 3.000 | 2.00 |" in text and "| 1100 MB | 1.800 | 1.20 |" in text
    assert "1.50 s on NVIDIA H200" in text and "0.30 % of a fit's time" in text
