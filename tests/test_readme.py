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
