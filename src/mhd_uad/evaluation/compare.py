"""`mhd-uad report --base REV`: metric deltas between a git revision and the workspace, as markdown or JSON.

Text only: numbers from metrics/*.json and params.yaml, never images of scans, so the report can be
posted to a pull request. The base side is read from git (`git show REV:metrics/<set>.json`); a base
without metrics, and datasets added or removed, are reported explicitly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from mhd_uad.config import flatten
from mhd_uad.errors import MhdUadError
from mhd_uad.evaluation.report import SCORER_LABELS

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


def params_at(rev: str | None, root: Path) -> dict:
    if rev is None:
        path = root / "params.yaml"
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    else:
        shown = _git(["show", f"{rev}:params.yaml"], root)
        text = shown.stdout if shown.returncode == 0 else ""
    return flatten(yaml.safe_load(text) or {})


def compare(base: dict | None, new: dict | None, tolerance: float) -> dict:
    """Structured comparison: per dataset and scorer, base/new/delta of auprc, dice, auroc and volume counts."""
    base, new = base or {}, new or {}
    out = {"added": sorted(set(new) - set(base)), "removed": sorted(set(base) - set(new)), "datasets": {}}
    for dataset in sorted(set(base) | set(new)):
        b_blocks, n_blocks = base.get(dataset, {}), new.get(dataset, {})
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
            row["change"] = "up" if d is not None and d > tolerance else "down" if d is not None and d < -tolerance \
                else "same" if d is not None else "n/a"
            rows[scorer] = row
        out["datasets"][dataset] = rows
    return out


def _fmt(v, pct=True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:g}"


def render_markdown(result: dict, base_rev: str, base_missing: bool, params_diff: list[tuple[str, str, str]],
                    tolerance: float) -> str:
    lines = [MARKER, f"## Metrics: `{base_rev}` → this change", ""]
    if base_missing:
        lines += [f"The base `{base_rev}` has no metrics; showing this change's values only.", ""]
    if result["added"] and not base_missing:
        lines += ["Datasets added: " + ", ".join(f"`{d}`" for d in result["added"]), ""]
    if result["removed"]:
        lines += ["Datasets removed: " + ", ".join(f"`{d}`" for d in result["removed"]), ""]
    lines += [f"AUPRC, Dice and AUROC in %; ▲/▼ marks an AUPRC change beyond {100 * tolerance:.2f} points.", ""]
    for dataset, rows in result["datasets"].items():
        lines += [f"### {dataset}", "", "| scorer | AUPRC base → new | Δ | Δ rel. | Dice Δ | AUROC Δ | volumes |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for scorer, row in rows.items():
            a, dsc, roc, vol = row["auprc"], row["dice"], row["auroc"], row["n_volumes"]
            mark = {"up": " ▲", "down": " ▼"}.get(row["change"], "")
            rel = a.get("relative")
            lines.append(
                f"| {SCORER_LABELS.get(scorer, scorer)} | {_fmt(a['base'])} → {_fmt(a['new'])}{mark} | "
                f"{_fmt(a.get('delta'))} | {'–' if rel is None else f'{100 * rel:+.1f}%'} | "
                f"{_fmt(dsc.get('delta'))} | {_fmt(roc.get('delta'))} | "
                f"{_fmt(vol['base'], False)} → {_fmt(vol['new'], False)} |")
        lines.append("")
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
    result = compare(base, new, tolerance)
    pb, pn = params_at(base_rev, root), params_at(None, root)
    diff = [(k, str(pb.get(k, "–")), str(pn.get(k, "–"))) for k in sorted(set(pb) | set(pn)) if pb.get(k) != pn.get(k)]
    result["base"] = base_rev
    result["base_has_metrics"] = base is not None
    result["params_changed"] = [{"param": k, "base": b, "new": n} for k, b, n in diff]
    if fmt == "json":
        return json.dumps(result, indent=2, ensure_ascii=False) + "\n", result
    return render_markdown(result, base_rev, base is None, diff, tolerance), result


def regressions(result: dict, tolerance: float) -> list[str]:
    out = []
    for dataset, rows in result["datasets"].items():
        for scorer, row in rows.items():
            d = row["auprc"].get("delta")
            if d is not None and d < -tolerance:
                out.append(f"{dataset}/{scorer}: AUPRC {100 * d:+.2f} points")
    return out
