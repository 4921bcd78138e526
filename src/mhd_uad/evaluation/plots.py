"""`mhd-uad plots`: render the pipeline's plot CSVs to PNG, offline, optionally against a git revision.

`dvc plots show/diff` writes HTML that loads vega from a CDN, which renders blank without a network; this
draws the same data (loss curves under plots/train and plots/pretrain, PR curves under plots/<set>) with
matplotlib, the workspace solid and the base revision dashed, plus an index.html that shows them.
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from mhd_uad.evaluation.compare import files_at
from mhd_uad.io import atomic_path, atomic_write_text


def _read_csv(text: str) -> dict[str, list[float]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return {k: [float(r[k]) for r in rows if r[k] not in ("", None)] for k in (rows[0] if rows else {})}


def render_plots(root: str | Path = ".", out_dir: str | Path = "reports/plots", base: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, out_dir = Path(root), Path(out_dir)
    new, old = files_at(None, root, "plots", ".csv"), (files_at(base, root, "plots", ".csv") if base else {})
    groups: dict[str, list[str]] = {}
    for name in sorted(set(new) | set(old)):
        groups.setdefault(str(Path(name).parent), []).append(name)
    images = []
    for group, names in groups.items():
        is_pr = any(Path(n).name.startswith("pr_") for n in names)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name in names:
            label = Path(name).stem.removeprefix("pr_")
            for source, style, suffix in ((new, "-", ""), (old, "--", f" ({base})")):
                if name not in source:
                    continue
                data = _read_csv(source[name])
                x, y = ("recall", "precision") if is_pr else ("step", "loss")
                if x in data and y in data:
                    ax.plot(data[x], data[y], style, lw=1.2, label=f"{label}{suffix}")
        ax.set_xlabel("recall" if is_pr else "step")
        ax.set_ylabel("precision" if is_pr else "loss")
        if not is_pr:
            ax.set_yscale("log")
        ax.set_title(group)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        target = out_dir / (group.replace("/", "_") + ".png")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})
        plt.close(fig)
        images.append(target.name)
    title = "mhd-uad plots" + (f": workspace (solid) against {html.escape(base)} (dashed)" if base else "")
    body = "\n".join(f'<figure><img src="{i}" alt="{i}"><figcaption>{i}</figcaption></figure>' for i in images)
    atomic_write_text(out_dir / "index.html", f"<!doctype html><meta charset=utf-8><title>{title}</title>"
                                              f"<h1>{title}</h1>\n{body}\n")
    return out_dir / "index.html"
