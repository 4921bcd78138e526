"""Results tables from metrics/*.json: the `report` stage's summary, and the README's results block.

Figures in the README come only from here: `mhd-uad report --readme README.md` rewrites the block
between the results markers from the metrics files the pipeline wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from mhd_uad.errors import InputFileError
from mhd_uad.io import atomic_write_text

README_START = "<!-- results:start (written by `mhd-uad report --readme`; do not edit) -->"
README_END = "<!-- results:end -->"
SCORER_LABELS = {
    "mhd": "MHD (full covariance)", "dmhd": "dMHD (diagonal)", "nocov": "\\|x − μ\\| in place of MHD",
    "mean": "mean reconstruction", "single": "single reconstruction", "l1": "cDDPM L1 + post-processing",
}


def load_metrics(metrics_dir: str | Path, datasets: list[str]) -> dict[str, dict]:
    out = {}
    for name in datasets:
        path = Path(metrics_dir) / f"{name}.json"
        if not path.is_file():
            raise InputFileError("metrics file not found (run the evaluate stage)", path)
        try:
            out[name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputFileError(f"not valid JSON ({exc})", path) from None
    return out


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def summary(metrics: dict[str, dict]) -> dict:
    """metrics/summary.json: per dataset and scorer the headline numbers, plus mhd's gain over single."""
    out: dict[str, dict] = {}
    for dataset, blocks in metrics.items():
        entry = {s: {k: b.get(k) for k in ("auprc", "auprc_std", "auroc", "dice", "dice_std")}
                 for s, b in blocks.items() if isinstance(b, dict) and "auprc" in b}
        single, mhd = blocks.get("single", {}).get("auprc"), blocks.get("mhd", {}).get("auprc")
        if single and mhd is not None:
            entry["mhd_vs_single_relative_gain"] = (mhd - single) / single
        out[dataset] = entry
    return out


def markdown_table(metrics: dict[str, dict], key: str = "auprc") -> str:
    datasets = list(metrics)
    scorers = [s for s in SCORER_LABELS if any(s in metrics[d] for d in datasets)]
    lines = ["| scorer | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for s in scorers:
        cells = []
        for d in datasets:
            block = metrics[d].get(s)
            if not block:
                cells.append("–")
                continue
            cell = f"{_pct(block.get(key))} ± {_pct(block.get(key + '_std'))}" if block.get(key + "_std") is not None \
                else _pct(block.get(key))
            cells.append(f"**{cell}**" if s == "mhd" else cell)
        lines.append(f"| {SCORER_LABELS[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wins_line(metrics: dict[str, dict]) -> str:
    parts = []
    for d, blocks in metrics.items():
        v = blocks.get("volumes", {})
        if "mhd_beats_single" in v:
            parts.append(f"{d} {v['mhd_beats_single']:g}/{v.get('n_test', 0) - v.get('n_without_lesion', 0)}")
    return "Test volumes on which MHD's AUPRC beats a single reconstruction's: " + ", ".join(parts) + "."


def summary_markdown(metrics: dict[str, dict], profile: str) -> str:
    n_folds = {b.get("volumes", {}).get("n_folds") for b in metrics.values()}
    return "\n".join([
        f"Per-volume AUPRC in % (mean ± std over test volumes; {'/'.join(str(n) for n in sorted(n_folds))} "
        f"fold(s); profile `{profile}`):",
        "",
        markdown_table(metrics, "auprc"),
        "",
        "Dice in % at the threshold tuned on each set's val split:",
        "",
        markdown_table(metrics, "dice"),
        "",
        wins_line(metrics),
    ])


def write_report(metrics_dir: str | Path, datasets: list[str], profile: str, reports_dir: str | Path) -> Path:
    metrics = load_metrics(metrics_dir, datasets)
    atomic_write_text(Path(metrics_dir) / "summary.json", json.dumps(summary(metrics), indent=2) + "\n")
    out = Path(reports_dir) / "summary.md"
    atomic_write_text(out, "# Results\n\n" + summary_markdown(metrics, profile) + "\n")
    return out


def update_readme(readme: str | Path, summary_md: str | Path) -> bool:
    """Replace the README's results block with reports/summary.md (without its title); True if changed."""
    summary_md = Path(summary_md)
    if not summary_md.is_file():
        raise InputFileError("summary not found (run the report stage)", summary_md)
    body = summary_md.read_text(encoding="utf-8").split("\n", 2)[2].strip()
    return replace_readme_block(readme, README_START, README_END, body)


def markdown_body(path: str | Path) -> str:
    """A written report's markdown without its first-line title (what the README shows)."""
    return Path(path).read_text(encoding="utf-8").split("\n", 2)[2].strip()


def replace_readme_block(readme: str | Path, start: str, end: str, body: str) -> bool:
    """Put `body` between the README's `start` and `end` marker lines; True if the README changed."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise InputFileError(f"README has no {start!r} ... {end!r} markers", readme)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{body}\n{end}{tail}"
    if new != text:
        atomic_write_text(readme, new)
    return new != text
