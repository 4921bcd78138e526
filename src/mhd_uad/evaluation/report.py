"""Results tables from metrics/*.json (and the score-healthy stages' metrics/healthy/*.json): the `report`
stage's summary, and the README's results block.

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
# The demo's GPU recipe (conf/recipe/gpu.yaml) reports apart from the CPU demo's results.
README_GPU_START = "<!-- results-gpu:start (written by `mhd-uad report --readme` after the gpu recipe; do not edit) -->"
README_GPU_END = "<!-- results-gpu:end -->"
SCORER_LABELS = {
    "mhd": "MHD (full covariance)", "dmhd": "dMHD (diagonal)", "nocov": "\\|x − μ\\| in place of MHD",
    "mean": "mean reconstruction", "single": "single reconstruction",
    "l1_mean_postproc": "cDDPM post-processing of μ", "cddpm": "cDDPM (original scoring)",
}
# One line per table row under the results (μ: the mean of the N reconstructions at t = 500).
SCORER_LEGEND = {
    "mhd": "(1 − SSIM(μ, x)) · M · gauss_σ1(minmax(pixel-wise Mahalanobis distance of x to the N "
           "reconstructions)) · M, the method (method.md §4.2)",
    "dmhd": "mhd with the diagonal covariance, |x − μ| / √(var + λ) (method.md §4.3)",
    "nocov": "mhd with |x − μ| in place of the Mahalanobis distance",
    "mean": "(1 − SSIM(μ, x)) · M, mhd without its distance term (method.md §4.5)",
    "single": "(1 − SSIM(r₁, x)) · M, one reconstruction at t = 500, the paper's comparison (inferred, "
              "method.md §4.5)",
    "l1_mean_postproc": "cddpm's L1 residual and post-processing applied to μ instead of its three-level ensemble",
    "cddpm": "the original cDDPM scoring (ENS t = 250/500/750, L1, eroded mask, median 5³, components "
             "≥ 8 voxels for Dice; method.md §4.6)",
}


def scorer_legend(metrics: dict[str, dict]) -> list[str]:
    """Markdown lines naming what each scorer in the tables computes, in table order ([] when none)."""
    scorers = [s for s in SCORER_LABELS if any(s in blocks for blocks in metrics.values())]
    if not scorers:
        return []
    return ["", "Scorers:", "", *(f"- {SCORER_LABELS[s]} (`{s}`): {SCORER_LEGEND[s]}" for s in scorers)]


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


# The fidelity figures of metrics/healthy/*.json (scoring.fidelity): label and number format, in table order.
FIDELITY_FIGURES = {"brain_l1": ("brain L1", ".4f"), "bias_bright": ("reco − scan, bright", "+.3f"),
                    "bias_dark": ("reco − scan, dark", "+.3f"), "contrast": ("contrast kept", ".3f")}


def load_fidelity(metrics_dir: str | Path) -> dict[str, list[dict]]:
    """{modality: [each fold's metrics/healthy/<M>_fold<K>.json]} (the score-healthy stages'), folds in order;
    {} without the folder."""
    out: dict[str, list[dict]] = {}
    for path in sorted((Path(metrics_dir) / "healthy").glob("*_fold*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputFileError(f"not valid JSON ({exc})", path) from None
        if not isinstance(data, dict) or not isinstance(data.get("reconstruction"), dict):
            raise InputFileError("no `reconstruction` object (re-run the score-healthy stage)", path)
        out.setdefault(str(data.get("modality", path.stem.split("_")[0])), []).append(data)
    return out


def fidelity_markdown(fidelity: dict[str, list[dict]]) -> list[str]:
    """The in-distribution table: each modality's fidelity on the healthy val scans, the mean over folds."""
    if not fidelity:
        return []

    def mean(folds: list[dict], key: str) -> float | None:
        values = [f["reconstruction"].get(key) for f in folds]
        values = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        return sum(values) / len(values) if values else None

    def cell(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = ["", "How faithfully the mean reconstruction keeps healthy scans (IXI val of each fold, never trained on; "
             "`metrics/healthy/`, the mean over folds; [0, 1] scale; bright ≥ 0.9, dark < 0.3; contrast kept: the "
             "slope of the reconstruction on the scan, 1 = all):", "",
             "| model | folds | val scans | brain L1 | reco − scan, bright | reco − scan, dark | contrast kept |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for modality, folds in sorted(fidelity.items()):
        lines.append(f"| IXI {modality.upper()} | {len(folds)} | {sum(int(f.get('n_scans', 0)) for f in folds)} | "
                     f"{cell(mean(folds, 'brain_l1'), '.4f')} | {cell(mean(folds, 'bias_bright'), '+.3f')} | "
                     f"{cell(mean(folds, 'bias_dark'), '+.3f')} | {cell(mean(folds, 'contrast'), '.2f')} |")
    return lines


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def summary(metrics: dict[str, dict]) -> dict:
    """metrics/summary.json: per dataset and scorer the headline numbers (and MHD − the scorer with its interval and p),
    plus mhd's gain over single."""
    out: dict[str, dict] = {}
    for dataset, blocks in metrics.items():
        entry = {s: {k: b.get(k) for k in ("auprc", "auprc_std", "auroc", "dice", "dice_std")}
                 for s, b in blocks.items() if isinstance(b, dict) and "auprc" in b}
        for s in entry:
            if "versus_mhd" in blocks[s]:
                entry[s]["versus_mhd"] = blocks[s]["versus_mhd"]
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


def format_p(p) -> str:
    """'p = 0.004', 'p < 0.001', or 'p –' when undefined."""
    if p is None or p != p:
        return "p –"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def format_delta(delta, ci=None, p=None, unit: str = "") -> str:
    """A difference of fractions in points with its interval (and p when given): '+3.1 [+1.2, +5.0] pp, p = 0.004'."""
    if delta is None or delta != delta:
        return "–"
    text = f"{100 * delta:+.1f}"
    if ci is not None:
        lo, hi = ci
        text += " [–]" if lo is None or hi is None or lo != lo or hi != hi else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    text += unit
    return text if p is None else f"{text}, {format_p(p)}"


def versus_mhd_table(metrics: dict[str, dict]) -> str:
    """MHD − each baseline per dataset (the `versus_mhd` blocks); '' when no metrics file has them."""
    datasets = list(metrics)
    found = [s for d in datasets for s, b in metrics[d].items() if isinstance(b, dict) and "versus_mhd" in b]
    scorers = [s for s in SCORER_LABELS if s in found] + sorted(set(found) - set(SCORER_LABELS))
    if not scorers:
        return ""
    lines = ["| MHD − | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for s in scorers:
        cells = []
        for d in datasets:
            v = metrics[d].get(s, {}).get("versus_mhd")
            cells.append("–" if not v else format_delta(v.get("delta_auprc"), v.get("ci95"), v.get("p_value")))
        lines.append(f"| {SCORER_LABELS.get(s, s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The field's other conventions (evaluation.evaluate `other_conventions`), shown collapsed under the paper's.
OTHER_CONVENTIONS = {
    "auprc_pooled": "AUPRC pooled over all test voxels of the set (UPD, MedIAnomaly, BMAD)",
    "auroc_pooled": "AUROC pooled over all test voxels of the set",
    "dice_oracle": "Dice at each volume's own best threshold (the original's BestDicePerVol)",
    "dice_fpr01": "Dice at the threshold with 1 % voxel FPR on the fold's healthy IXI val scans",
    "dice_fpr05": "Dice at 5 % healthy FPR",
    "dice_fpr10": "Dice at 10 % healthy FPR",
}


def other_conventions_markdown(metrics: dict[str, dict]) -> list[str]:
    """A collapsed section with one small table per convention present in the metrics ([] when none)."""
    keys = [k for k in OTHER_CONVENTIONS
            if any(isinstance(b, dict) and k in b for blocks in metrics.values() for b in blocks.values())]
    if not keys:
        return []
    lines = ["", "<details><summary>The field's other conventions, in % (pooled metrics, oracle Dice, Dice at "
             "healthy FPR)</summary>", ""]
    for k in keys:
        lines += [f"{OTHER_CONVENTIONS[k]} (`{k}`):", "", markdown_table(metrics, k), ""]
    return [*lines, "</details>"]


def summary_markdown(metrics: dict[str, dict], profile: str, recipe: str = "base",
                     fidelity: dict[str, list[dict]] | None = None) -> str:
    n_folds = {b.get("volumes", {}).get("n_folds") for b in metrics.values()}
    versus = versus_mhd_table(metrics)
    significance = [
        "MHD − each baseline, per-volume AUPRC in points: mean difference over the paired test volumes "
        "[95 % bootstrap interval], p of a two-sided paired permutation test (10,000 rounds):",
        "",
        versus,
        "",
    ] if versus else []
    return "\n".join([
        f"Per-volume AUPRC in % (mean ± std over test volumes; {'/'.join(str(n) for n in sorted(n_folds))} "
        f"fold(s); profile `{profile}`" + (f", recipe `{recipe}`" if recipe != "base" else "") + "):",
        "",
        markdown_table(metrics, "auprc"),
        "",
        *significance,
        "Dice in % at the threshold tuned on each set's val split:",
        "",
        markdown_table(metrics, "dice"),
        "",
        wins_line(metrics),
        *fidelity_markdown(fidelity or {}),
        *other_conventions_markdown(metrics),
        *scorer_legend(metrics),
    ])


def write_report(metrics_dir: str | Path, datasets: list[str], profile: str, reports_dir: str | Path,
                 recipe: str = "base") -> Path:
    metrics = load_metrics(metrics_dir, datasets)
    atomic_write_text(Path(metrics_dir) / "summary.json", json.dumps(summary(metrics), indent=2) + "\n")
    out = Path(reports_dir) / "summary.md"
    atomic_write_text(out, "# Results\n\n" + summary_markdown(metrics, profile, recipe, load_fidelity(metrics_dir))
                      + "\n")
    return out


def update_readme(readme: str | Path, summary_md: str | Path, recipe: str = "base") -> bool:
    """Replace the README's results block of the recipe with reports/summary.md (without its title); True if
    changed. The gpu recipe's results go to their own block, so the CPU demo's figures stay as they were."""
    summary_md = Path(summary_md)
    if not summary_md.is_file():
        raise InputFileError("summary not found (run the report stage)", summary_md)
    start, end = (README_GPU_START, README_GPU_END) if recipe == "gpu" else (README_START, README_END)
    return readme_block_from(readme, summary_md, start, end)


def markdown_body(path: str | Path) -> str:
    """A written report's markdown without its first-line title (what the README shows)."""
    return Path(path).read_text(encoding="utf-8").split("\n", 2)[2].strip()


def readme_block_from(readme: str | Path, report_md: str | Path, start: str, end: str) -> bool:
    """Put a written report (without its title) between the README's `start` and `end` markers."""
    return replace_readme_block(readme, start, end, markdown_body(report_md))


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
