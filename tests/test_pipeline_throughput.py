"""benchmarks/pipeline_throughput.py and gpu_report.py: a real CPU run of the input part on a few demo scans,
the report from partial results, the paper run's hours from measured rates, and bad options."""

import importlib.util
import json
import sys

import pytest

from conftest import REPO


def _load(monkeypatch, name):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def bench(monkeypatch):
    return _load(monkeypatch, "pipeline_throughput")


@pytest.fixture()
def gpu_report(monkeypatch):
    return _load(monkeypatch, "gpu_report")


@pytest.mark.slow
def test_the_input_part_runs_on_the_cpu_and_writes_its_report(bench, tmp_path):
    code = bench.main(["--profile", "demo", "--parts", "input", "--input-seconds", "1", "--n-healthy", "8",
                       "--n-per-test-set", "2", "--report", str(tmp_path), "--keep", str(tmp_path / "work")])
    assert code == 0
    r = json.loads((tmp_path / "pipeline_throughput_demo.json").read_text())
    assert r["device"].startswith("CPU") and r["cpu_count"] >= 1 and r["input_slices_per_s"] > 0
    assert set(r["augment_ms_per_volume"]) == {"gamma", "bias_field", "blur", "ghosting", "profile"}
    assert all(v > 0 for v in r["torchio_ms_per_volume"].values())
    text = (tmp_path / "pipeline_throughput_demo.md").read_text()
    assert "training input" in text and "`train` stage" not in text  # only the part that ran
    splits = tmp_path / "work" / "artifacts" / "splits"  # a fold of the real IXI size
    assert sum(1 for _ in (splits / "IXI_train_fold0.csv").open()) - 1 == bench.IXI_TRAIN


def test_the_report_shows_each_part_against_its_reference(bench):
    r = {"profile": "paper", "parts": ["train", "eval"], "device": "NVIDIA H200", "torch": "2", "cpu_count": 16,
         "grid": "96×96×50", "batch_size": 32, "train_slices_per_s": 350.0, "model_only_slices_per_s": 370.0,
         "train_over_model_only": 350 / 370, "train_precision": "fp16", "train_compiled": True,
         "eval_scans_per_s": 1.25, "reconstruct_only_scans_per_s": 1.34, "eval_over_reconstruct_only": 1.25 / 1.34,
         "scorers": ["mhd"] * 7, "num_reconstructions": 10, "eval_workers": 4}
    text = bench.report_markdown(r)
    assert "| `train` stage (fp16, compiled, batch 32) | 350.0 slices/s | model-only step 370.0 slices/s | 0.95× |" in text
    assert "1.25 scans/s" in text and "0.93×" in text and "training input" not in text
    assert "between the steps" not in text  # a report from before the epoch breakdown
    r["train_epoch_ms"] = {"steps": 1040.0, "steps_per_epoch": 12, "train_loader_wait": 52.0, "validation": 104.0, "val_loader_wait": 26.0}
    text = bench.report_markdown(r)
    assert "the 12 model-only steps of an epoch take 1040 ms" in text
    assert "| the wait for the epoch's first training batch | 52.0 | 5.0 % |" in text
    assert "| validation | 104.0 | 10.0 % |" in text and "| of which the wait for the first val batch | 26.0 | 2.5 % |" in text


@pytest.mark.parametrize("argv", [["--parts", "input,fly"], ["--parts", ","], ["--dataset", "Nowhere"]])
def test_bad_options_are_refused(bench, argv):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--profile", "demo", *argv])
    assert exc.value.code == 2


def test_the_paper_runs_hours_follow_the_measured_rates(gpu_report):
    hours = gpu_report.paper_hours(train_slices_per_s=320.0, eval_scans_per_s=1.5)
    fit = 14_400 * 32 / 320 / 3600
    assert hours[1]["train"] == pytest.approx(10 * fit) and hours[8]["train"] == pytest.approx(2 * fit)
    assert hours[1]["eval"] == pytest.approx(5 * 2084 / 1.5 / 3600) and hours[8]["eval"] == pytest.approx(hours[1]["eval"] / 8)
    assert hours[1]["total"] == pytest.approx(hours[1]["train"] + hours[1]["eval"])


def test_the_gpu_block_takes_the_train_stage_or_else_the_profiles_fp16_step(gpu_report, tmp_path):
    r = {"device": "NVIDIA H200", "torch": "2", "cpu_count": 16, "eval_scans_per_s": 1.0}
    (tmp_path / "pipeline_throughput_paper.md").write_text("# title\n\n| part |\n")
    (tmp_path / "pipeline_throughput_paper.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="fp16 training step"):
        gpu_report.report(tmp_path)
    (tmp_path / "paper_profile.json").write_text(json.dumps({"rows": [
        {"phase": "train", "variant": "fp16", "throughput": 250.0}, {"phase": "eval", "variant": "fp16"}]}))
    assert "250 slices/s in the fp16 training step alone" in gpu_report.report(tmp_path)
    (tmp_path / "pipeline_throughput_paper.json").write_text(json.dumps({**r, "train_slices_per_s": 300.0}))
    text = gpu_report.report(tmp_path)
    assert "300 slices/s in the train stage" in text and "NVIDIA H200" in text and "# title" not in text
    assert "Keeping the best checkpoint" not in text
    (tmp_path / "checkpoint_cost.md").write_text("# Checkpoint cost (paper profile)\n\nNVIDIA H200, torch 2\n\n| what |\n")
    text = gpu_report.report(tmp_path)
    assert "Keeping the best checkpoint (`benchmarks/checkpoint_cost.py`):\n\n| what |" in text
    assert "Checkpoint cost (paper" not in text
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{gpu_report.README_START}\nSTALE-BLOCK\n{gpu_report.README_END}\nafter\n")
    assert gpu_report.main(["--dir", str(tmp_path), "--readme", str(readme)]) == 0
    assert "300 slices/s" in readme.read_text() and "STALE-BLOCK" not in readme.read_text()


def test_the_gpu_workflows_time_limit_covers_the_paper_run_at_the_last_measured_rates(gpu_report):
    import re

    folder = REPO / "reports" / "gpu"
    r = json.loads((folder / "pipeline_throughput_paper.json").read_text())
    train, _ = gpu_report.training_rate(r, folder)
    one_gpu = gpu_report.paper_hours(train, r["eval_scans_per_s"])[1]["total"]
    workflow = (REPO / ".github" / "workflows" / "gpu-experiment.yml").read_text()
    minutes = int(re.search(r"timeout-minutes: (\d+)", workflow).group(1))
    assert 1.25 * one_gpu * 60 <= minutes <= 3 * one_gpu * 60, (one_gpu, minutes)
