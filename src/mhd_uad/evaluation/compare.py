"""`mhd-uad report --base REV`: metric deltas between a git revision and the workspace, as markdown or JSON,
and each model's reconstruction fidelity on its healthy val scans (metrics/healthy/), base → new.

Text only: numbers from metrics/*.json and params.yaml, never images of scans, so the report can be
posted to a pull request. The base side is read from git (`git show REV:metrics/<set>.json`); a base
without metrics, and datasets added or removed, are reported explicitly.

Each AUPRC change comes with the 95 % bootstrap interval of the mean per-volume change: the rows of
metrics/<set>_per_volume.csv at REV and in the workspace are paired by (fold, scan), and a scan's folds are
averaged into one resampled unit (evaluation.significance). ▲/▼ mark a change beyond the tolerance whose
interval excludes 0. Where either side lacks the CSV (or the scorer's column), the change has no interval,
▲/▼ fall back to the tolerance alone, and the report says so.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import yaml

from mhd_uad.config import flatten
from mhd_uad.errors import MhdUadError
from mhd_uad.evaluation.report import FIDELITY_FIGURES, SCORER_LABELS, format_delta
from mhd_uad.evaluation.significance import paired_comparison
from mhd_uad.io import json_safe

MARKER = "<!-- mhd-uad-metrics-report -->"
NOT_DATASETS = {"summary.json"}


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def files_at(rev: str | None, root: Path, folder: str, suffix: str) -> dict[str, str]:
    """{path relative to root: text} of the files under `folder` ending in `suffix`, in the workspace
    (rev None) or at a git revision (an absent folder gives {})."""
    if rev is None:
        return {str(p.relative_to(root)): p.read_text(encoding="utf-8")
                for p in sorted((root / folder).rglob(f"*{suffix}")) if p.is_file()}
    listing = _git(["ls-tree", "-r", "--name-only", rev, "--", folder], root)
    return {name: _git(["show", f"{rev}:{name}"], root).stdout
            for name in listing.stdout.split() if name.endswith(suffix)}


def metrics_at(rev: str | None, root: Path, metrics_dir: str = "metrics") -> dict[str, dict] | None:
    """{dataset: metrics} at a git revision (None: the workspace); None when the revision has no metrics."""
    if rev is not None and _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], root).returncode != 0:
        raise MhdUadError(f"unknown git revision {rev!r}")
    files = {Path(path).name: text for path, text in files_at(rev, root, metrics_dir, ".json").items()
             if Path(path).parent == Path(metrics_dir) and Path(path).name not in NOT_DATASETS}
    out = {}
    for name, text in files.items():
        try:
            out[name.removesuffix(".json")] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MhdUadError(f"{metrics_dir}/{name} at {rev or 'the workspace'} is not valid JSON ({exc})") from None
    return out or None


def per_volume_at(rev: str | None, root: Path, metrics_dir: str = "metrics") -> dict[str, list[dict]]:
    """{dataset: rows of metrics/<dataset>_per_volume.csv} in the workspace (rev None) or at a git revision."""
    suffix = "_per_volume.csv"
    return {Path(path).name.removesuffix(suffix): list(csv.DictReader(io.StringIO(text)))
            for path, text in files_at(rev, root, metrics_dir, suffix).items()
            if Path(path).parent == Path(metrics_dir)}


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def change_interval(base_rows: list[dict], new_rows: list[dict], scorer: str, key: str = "auprc") -> dict | None:
    """The per-volume change new − base of `scorer`'s metric over the rows paired by (fold, scan): mean, 95 %
    bootstrap interval, permutation p and the number of scans; None without the column on either side or
    without 2 paired scans with finite values on both sides."""
    column = f"{scorer}_{key}"
    if not base_rows or not new_rows or column not in base_rows[0] or column not in new_rows[0]:
        return None
    base = {(r.get("fold"), r.get("scan")): _number(r.get(column)) for r in base_rows}
    pairs = [(base[k], _number(r.get(column)), k[1]) for r in new_rows
             if (k := (r.get("fold"), r.get("scan"))) in base]
    if not pairs:
        return None
    b, n, scans = zip(*pairs, strict=True)
    c = paired_comparison(n, b, scans)
    if c.n < 2:
        return None
    return {"delta": c.delta, "ci95": list(c.ci), "p_value": c.p_value, "n_scans": c.n,
            "excludes_zero": c.excludes_zero}


def params_at(rev: str | None, root: Path) -> dict:
    if rev is None:
        path = root / "params.yaml"
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    else:
        shown = _git(["show", f"{rev}:params.yaml"], root)
        text = shown.stdout if shown.returncode == 0 else ""
    return flatten(yaml.safe_load(text) or {})


def compare(base: dict | None, new: dict | None, tolerance: float,
            per_volume: tuple[dict[str, list[dict]], dict[str, list[dict]]] | None = None) -> dict:
    """Structured comparison: per dataset and scorer, base/new/delta of auprc, dice, auroc and volume counts.

    With `per_volume` (the base's and the workspace's per-volume CSV rows per dataset) each AUPRC change gets
    `interval` (change_interval), and ▲/▼ ("up"/"down") need it to exclude 0 as well as |Δ| > tolerance;
    `no_interval` names the datasets on both sides where that rule falls back to the tolerance alone."""
    base, new = base or {}, new or {}
    pv_base, pv_new = per_volume or ({}, {})
    out = {"added": sorted(set(new) - set(base)), "removed": sorted(set(base) - set(new)), "datasets": {},
           "no_interval": {}}
    for dataset in sorted(set(base) | set(new)):
        b_blocks, n_blocks = base.get(dataset, {}), new.get(dataset, {})
        if dataset in base and dataset in new and (dataset not in pv_base or dataset not in pv_new):
            out["no_interval"][dataset] = "no per-volume CSV at the base" if dataset not in pv_base \
                else "no per-volume CSV in the workspace"
        rows = {}
        for scorer in [s for s in SCORER_LABELS if s in b_blocks or s in n_blocks]:
            b, n = b_blocks.get(scorer, {}), n_blocks.get(scorer, {})
            row = {}
            for key in ("auprc", "dice", "auroc", "n_volumes"):
                bv, nv = b.get(key), n.get(key)
                row[key] = {"base": bv, "new": nv}
                if isinstance(bv, int | float) and isinstance(nv, int | float):
                    row[key]["delta"] = nv - bv
                    row[key]["relative"] = (nv - bv) / bv if bv else None
            d = row["auprc"].get("delta")
            interval = None
            if d is not None and dataset in pv_base and dataset in pv_new:
                interval = change_interval(pv_base[dataset], pv_new[dataset], scorer)
                if interval is None:
                    out["no_interval"].setdefault(dataset, f"no paired per-volume {scorer} AUPRC")
            row["auprc"]["interval"] = json_safe(interval)  # `--format json` stays strict JSON
            certain = interval is None or interval["excludes_zero"]
            row["change"] = "n/a" if d is None else "up" if d > tolerance and certain \
                else "down" if d < -tolerance and certain else "same"
            rows[scorer] = row
        out["datasets"][dataset] = rows
    return out


def _delta_cell(a: dict) -> str:
    d = a.get("delta")
    if d is None:
        return "–"
    if not (interval := a.get("interval")):
        return f"{100 * d:+.2f}"
    lo, hi = interval["ci95"]
    return f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def versus_mhd_line(blocks: dict) -> str | None:
    """One line of this change's MHD − baseline AUPRC per scorer (its metrics' `versus_mhd`), or None."""
    parts = [f"{SCORER_LABELS.get(s, s)} "
             f"{format_delta(v.get('delta_auprc'), v.get('ci95'), v.get('p_value'), unit=' pp')}"
             for s, b in blocks.items() if isinstance(b, dict) and (v := b.get("versus_mhd"))]
    return "MHD − baseline, AUPRC [95 % CI], this change: " + " · ".join(parts) if parts else None


def fidelity_at(rev: str | None, root: Path, metrics_dir: str = "metrics") -> dict[str, dict]:
    """{"<M>_fold<K>": the score-healthy stage's pooled reconstruction fidelity} at a git revision (None: the
    workspace); {} where there are none (a revision from before they existed); a file that is not one of them
    is an MhdUadError naming it."""
    out = {}
    for path, text in files_at(rev, root, f"{metrics_dir}/healthy", ".json").items():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MhdUadError(f"{path} at {rev or 'the workspace'} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("reconstruction"), dict):
            raise MhdUadError(f"{path} at {rev or 'the workspace'} has no `reconstruction` object")
        out[Path(path).stem] = data["reconstruction"]
    return out


def fidelity_changes(base: dict[str, dict], new: dict[str, dict]) -> dict[str, dict]:
    """{model: {key: {"base", "new", "delta"}}} for every model in the workspace (base None where it had none)."""
    def value(d: dict | None, key: str) -> float | None:
        v = (d or {}).get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    out = {}
    for model in sorted(new):
        row = {}
        for key in FIDELITY_FIGURES:
            b, n = value(base.get(model), key), value(new[model], key)
            row[key] = {"base": b, "new": n, "delta": None if b is None or n is None else n - b}
        out[model] = row
    return out


def fidelity_markdown(changes: dict[str, dict]) -> list[str]:
    """The in-distribution section of the report: each model's fidelity on its healthy val scans, base → new."""
    if not changes:
        return []

    def cell(entry: dict, fmt: str) -> str:
        def f(v):
            return "–" if v is None else format(v, fmt)
        delta = "" if entry["delta"] is None else f" ({format(entry['delta'], '+' + fmt.lstrip('+'))})"
        return f"{f(entry['base'])} → {f(entry['new'])}{delta}"

    lines = ["### Reconstruction fidelity on the healthy val scans", "",
             "The in-distribution check (`metrics/healthy/`, the score-healthy stages): how faithfully each fold's "
             "mean reconstruction keeps healthy scans it never trained on ([0, 1] scale; reco − scan near 0 and "
             "contrast kept near 1 are better).", "",
             "| model | " + " | ".join(label for label, _ in FIDELITY_FIGURES.values()) + " |",
             "|---|" + "---:|" * len(FIDELITY_FIGURES)]
    for model, row in changes.items():
        lines.append(f"| {model} | " + " | ".join(cell(row[k], fmt) for k, (_, fmt) in FIDELITY_FIGURES.items()) + " |")
    return [*lines, ""]


def _fmt(v, pct=True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:g}"


def render_markdown(result: dict, base_rev: str, base_missing: bool, params_diff: list[tuple[str, str, str]],
                    tolerance: float, new_metrics: dict | None = None) -> str:
    lines = [MARKER, f"## Metrics: `{base_rev}` → this change", ""]
    if base_missing:
        lines += [f"The base `{base_rev}` has no metrics; showing this change's values only.", ""]
    if result["added"] and not base_missing:
        lines += ["Datasets added: " + ", ".join(f"`{d}`" for d in result["added"]), ""]
    if result["removed"]:
        lines += ["Datasets removed: " + ", ".join(f"`{d}`" for d in result["removed"]), ""]
    lines += [f"AUPRC, Dice and AUROC in %; Δ AUPRC with the 95 % bootstrap interval of the mean per-volume change "
              f"(volumes paired by fold and scan); ▲/▼ mark an AUPRC change beyond {100 * tolerance:.2f} points "
              "whose interval excludes 0.", ""]
    if no_interval := result.get("no_interval"):
        lines += ["No interval for " + ", ".join(f"`{d}` ({why})" for d, why in no_interval.items())
                  + f": there ▲/▼ mark a change beyond {100 * tolerance:.2f} points alone.", ""]
    for dataset, rows in result["datasets"].items():
        lines += [f"### {dataset}", "",
                  "| scorer | AUPRC base → new | Δ [95 % CI] | Δ rel. | Dice Δ | AUROC Δ | volumes |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for scorer, row in rows.items():
            a, dsc, roc, vol = row["auprc"], row["dice"], row["auroc"], row["n_volumes"]
            mark = {"up": " ▲", "down": " ▼"}.get(row["change"], "")
            rel = a.get("relative")
            lines.append(
                f"| {SCORER_LABELS.get(scorer, scorer)} | {_fmt(a['base'])} → {_fmt(a['new'])}{mark} | "
                f"{_delta_cell(a)} | {'–' if rel is None else f'{100 * rel:+.1f}%'} | "
                f"{_fmt(dsc.get('delta'))} | {_fmt(roc.get('delta'))} | "
                f"{_fmt(vol['base'], False)} → {_fmt(vol['new'], False)} |")
        lines.append("")
        if line := versus_mhd_line(new_metrics.get(dataset, {}) if new_metrics else {}):
            lines += [line, ""]
    lines += fidelity_markdown(result.get("fidelity") or {})
    lines += ["<details><summary>Params changed (" + str(len(params_diff)) + ")</summary>", ""]
    if params_diff:
        lines += ["| param | base | new |", "|---|---|---|"]
        lines += [f"| `{k}` | {b} | {n} |" for k, b, n in params_diff]
    else:
        lines.append("No params changed.")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def build_report(base_rev: str, root: str | Path = ".", fmt: str = "md", tolerance: float = 0.005) -> tuple[str, dict]:
    root = Path(root)
    base = metrics_at(base_rev, root)
    new = metrics_at(None, root)
    if new is None:
        raise MhdUadError("the workspace has no metrics/*.json (run the pipeline first)")
    per_volume = (per_volume_at(base_rev, root), per_volume_at(None, root)) if base is not None else None
    result = compare(base, new, tolerance, per_volume)
    pb, pn = params_at(base_rev, root), params_at(None, root)
    diff = [(k, str(pb.get(k, "–")), str(pn.get(k, "–"))) for k in sorted(set(pb) | set(pn)) if pb.get(k) != pn.get(k)]
    result["fidelity"] = fidelity_changes(fidelity_at(base_rev, root) if base is not None else {},
                                          fidelity_at(None, root))
    result["base"] = base_rev
    result["base_has_metrics"] = base is not None
    result["params_changed"] = [{"param": k, "base": b, "new": n} for k, b, n in diff]
    if fmt == "json":
        return json.dumps(result, indent=2, ensure_ascii=False) + "\n", result
    return render_markdown(result, base_rev, base is None, diff, tolerance, new), result


def regressions(result: dict, tolerance: float) -> list[str]:
    """AUPRC drops beyond `tolerance` whose bootstrap interval (where there is one) lies below 0."""
    out = []
    for dataset, rows in result["datasets"].items():
        for scorer, row in rows.items():
            d, interval = row["auprc"].get("delta"), row["auprc"].get("interval")
            if d is not None and d < -tolerance and (not interval or interval["ci95"][1] < 0):
                out.append(f"{dataset}/{scorer}: AUPRC {100 * d:+.2f} points")
    return out
