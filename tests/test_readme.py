"""The README's results come from the pipeline's files, never typed by hand."""

import yaml

from conftest import REPO
from mhd_uad.evaluation.report import README_END, README_START, load_fidelity, load_metrics, summary_markdown


def test_readme_results_block_is_the_rendering_of_the_committed_metrics():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    metrics = load_metrics(REPO / "metrics", list(params["datasets"]))
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    fidelity = load_fidelity(REPO / "metrics")
    assert block == summary_markdown(metrics, params["profile_name"], fidelity=fidelity).strip(), (
        "README results differ from metrics/*.json: run `mhd-uad report --readme README.md`")
    assert (REPO / "reports" / "summary.md").read_text(encoding="utf-8").split("\n", 2)[2].strip() == block


def _block(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def test_readme_benchmark_blocks_are_the_benchmarks_reports():
    from mhd_uad.evaluation.report import markdown_body

    text = (REPO / "README.md").read_text(encoding="utf-8")
    for name in ("demo-realism", "demo-generalisation", "demo-stage-times", "demo-seed-spread", "paper-profile"):
        start = next(line for line in text.splitlines() if line.startswith(f"<!-- {name}:start"))
        report = REPO / "reports" / f"{name.replace('-', '_')}.md"
        assert report.is_file(), f"{report.name} missing: run benchmarks/{name.replace('-', '_')}.py"
        assert _block(text, start, f"<!-- {name}:end -->") == markdown_body(report), (
            f"README {name} block differs from reports/{report.name}: rerun the benchmark with --readme README.md"
        )


def _lock_md5(path: str) -> str:
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    found = {o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", []) if o["path"] == path}
    assert len(found) == 1, f"{path}: {found or 'not'} in dvc.lock"
    return found.pop()


def test_the_benchmark_reports_in_the_readme_are_of_the_committed_models_and_metrics():
    """The README's benchmark figures describe the models and metrics `dvc.lock` records, not older ones: a
    retrained demo has to re-run the benchmarks that read its models or its metrics."""
    import json

    from conftest import load_benchmark

    spread_script = load_benchmark("demo_seed_spread")
    read_auprc, read_fidelity = spread_script.read_auprc, spread_script.read_fidelity

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    datasets = list(params["datasets"])
    held_out = json.loads((REPO / "reports" / "demo_generalisation.json").read_text())
    for contrast, sums in held_out["checkpoint_md5"].items():
        files = [f"models/{contrast}/fold{fold}/cddpm.ckpt" for fold in params["train"]["folds"]]
        assert sums == [_lock_md5(f) for f in files], (
            "reports/demo_generalisation.* are of other models: run benchmarks/demo_generalisation.py --readme README.md")
    spread = json.loads((REPO / "reports" / "demo_seed_spread.json").read_text())
    assert spread["runs"][str(params["seed"])] == read_auprc(REPO / "metrics", datasets), (
        "reports/demo_seed_spread.* predate metrics/: run benchmarks/demo_seed_spread.py --seeds 1 2 --fresh")
    assert spread["fidelity_runs"][str(params["seed"])] == read_fidelity(REPO / "metrics")
    long_fit = json.loads((REPO / "reports" / "demo_long_fit.json").read_text())
    assert long_fit["auprc"]["demo"] == read_auprc(REPO / "metrics", datasets), (
        "reports/demo_long_fit.* compare with older demo metrics: rerun benchmarks/demo_long_fit.py --work DIR")
    for contrast, pair in long_fit["in_distribution"].items():
        pooled = json.loads((REPO / "metrics" / "healthy" / f"{contrast}_fold0.json").read_text())["reconstruction"]
        assert pair["demo"] == pooled
    assert long_fit["held_out_demo"] == held_out["cases"], "reports/demo_long_fit.* hold another held-out report"
