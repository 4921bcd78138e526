"""How far the demo's numbers move from run to run: the same data and splits, the fits under other seeds.

Two machines of one kind running the same commit give bit-identical results (tests/test_training.py), but
two kinds of CPU or GPU round differently, and a rounding difference early in a fit grows like a change of
seed. This benchmark measures that spread where it is cheap to: it copies the repository's tracked files
into a scratch folder beside the current `data/`, `artifacts/splits` and `artifacts/prepared` (so the
test scans stay the same), re-runs pretrain, train, score-healthy and evaluate with the fits seeded by
each `--seeds` value (`seed=<s>` on the pretrain and train commands only), and tabulates every scorer's
AUPRC per set for the current run (`metrics/`, the committed seed) and each other seed, with the mean,
the standard deviation and the range; and the same for each model's reconstruction fidelity on its healthy
val scans (`metrics/healthy/`, scoring.fidelity). Writes reports/demo_seed_spread.{json,md}:

    python benchmarks/demo_seed_spread.py --seeds 1 2                 # after `make demo`; ~10 min a seed
    python benchmarks/demo_seed_spread.py --seeds 1 2 --readme README.md

A seed already in reports/demo_seed_spread.json is read from there, not fitted again (--fresh refits);
the params' own seed is always read from the current metrics/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mhd_uad.config import compose
from mhd_uad.evaluation.compare import fidelity_at
from mhd_uad.evaluation.report import FIDELITY_FIGURES, readme_block_from
from mhd_uad.io import atomic_write_text

README_START = ("<!-- demo-seed-spread:start (written by `benchmarks/demo_seed_spread.py --readme README.md`; "
                "do not edit) -->")
README_END = "<!-- demo-seed-spread:end -->"
SCORERS = ("mhd", "single", "cddpm")


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the scratch copy's own store
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"demo_seed_spread: `{' '.join(cmd)}` failed with exit code {done.returncode}")


def scratch_copy(root: Path, dest: Path) -> Path:
    """The tracked files of `root`, its data (linked) and its splits and prepared arrays (copied)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True)
    for rel in filter(None, tracked.stdout.split("\0")):
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "data").symlink_to((root / "data").resolve())
    for part in ("splits", "prepared"):
        shutil.copytree(root / "artifacts" / part, dest / "artifacts" / part)
    return dest


def read_auprc(metrics_dir: Path, datasets: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for dataset in datasets:
        blocks = json.loads((metrics_dir / f"{dataset}.json").read_text())
        out[dataset] = {s: float(blocks[s]["auprc"]) for s in SCORERS if s in blocks}
    return out


def run_seed(work: Path, seed: int, params) -> dict[str, dict[str, float]]:
    mhd = [sys.executable, "-m", "mhd_uad.cli"]
    modalities = [str(m) for m in params.train.modalities]
    folds = [int(f) for f in params.train.folds]
    for modality in modalities:
        _run([*mhd, "pretrain", "--modality", modality, f"seed={seed}"], work)
        for fold in folds:
            _run([*mhd, "train", "--modality", modality, "--fold", str(fold), f"seed={seed}"], work)
            _run([*mhd, "score-healthy", "--modality", modality, "--fold", str(fold)], work)
    for dataset in params.datasets:
        _run([*mhd, "evaluate", "--dataset", str(dataset)], work)
    return read_auprc(work / "metrics", list(params.datasets)), read_fidelity(work / "metrics")


def read_fidelity(metrics_dir: Path) -> dict[str, dict[str, float]]:
    """{"<M>_fold<K>": the score-healthy stage's pooled fidelity figures that have a value} ({} before the stage
    wrote them)."""
    return {model: {k: pooled[k] for k in FIDELITY_FIGURES if isinstance(pooled.get(k), int | float)}
            for model, pooled in fidelity_at(None, metrics_dir.parent, metrics_dir.name).items()}


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "min": float(values.min()), "max": float(values.max())}


def summarise_fidelity(runs: dict[str, dict]) -> dict:
    """{model: {figure: mean, std, min, max}} over the seeds that have the model's figure."""
    models = sorted({m for r in runs.values() for m in r})
    out = {}
    for model in models:
        out[model] = {}
        for key in FIDELITY_FIGURES:
            values = np.array([r[model][key] for r in runs.values() if key in r.get(model, {})])
            if len(values):
                out[model][key] = _stats(values)
    return out


def summarise(runs: dict[str, dict]) -> dict:
    datasets = list(next(iter(runs.values())))
    spread = {}
    for dataset in datasets:
        spread[dataset] = {}
        for scorer in SCORERS:
            values = np.array([r[dataset][scorer] for r in runs.values() if scorer in r[dataset]])
            if len(values):
                spread[dataset][scorer] = _stats(values)
    return {"runs": runs, "spread": spread}


def markdown(report: dict) -> str:
    runs, spread = report["runs"], report["spread"]
    seeds = list(runs)
    lines = ["# Demo run-to-run spread", "",
             f"AUPRC % of the same test scans after fits under {len(seeds)} seeds ({', '.join(seeds)}; "
             "`python benchmarks/demo_seed_spread.py`): the spread to expect between machines.", "",
             "| set | scorer | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | range |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for dataset, by_scorer in spread.items():
        for scorer, s in by_scorer.items():
            cells = [f"{100 * runs[k][dataset][scorer]:.1f}" for k in seeds]
            lines.append(f"| {dataset} | {scorer} | " + " | ".join(cells) +
                         f" | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {100 * (s['max'] - s['min']):.1f} |")
    fidelity, fruns = report.get("fidelity_spread"), report.get("fidelity_runs", {})
    if fidelity:
        lines += ["", "Reconstruction fidelity of the same fits on their healthy IXI val scans (the score-healthy "
                  "stage's `metrics/healthy/`): the spread a change has to beat before it counts in distribution.",
                  "", "| model | figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | range |",
                  "|---|---|" + "---|" * len(seeds) + "---|---|"]
        for model, by_key in fidelity.items():
            for key, s in by_key.items():
                label, fmt = FIDELITY_FIGURES[key]
                cells = [format(fruns[k][model][key], fmt) if key in fruns.get(k, {}).get(model, {}) else "–"
                         for k in seeds]
                lines.append(f"| {model} | {label} | " + " | ".join(cells) + f" | {format(s['mean'], fmt)} ± "
                             f"{s['std']:.4f} | {s['max'] - s['min']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository, after `make demo`")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="fit seeds besides the params' own")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <root>/reports")
    parser.add_argument("--readme", type=Path, default=None, help="also put the table into this README's block")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--fresh", action="store_true", help="re-measure seeds an earlier call wrote")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    params = compose([], root)
    if not all((root / "metrics" / f"{d}.json").is_file() for d in params.datasets):
        raise SystemExit("demo_seed_spread: metrics/ is incomplete: run `make demo` first")
    out_dir = args.out_dir or root / "reports"
    previous = out_dir / "demo_seed_spread.json"
    earlier = {} if args.fresh or not previous.is_file() else json.loads(previous.read_text())
    done, done_fidelity = earlier.get("runs", {}), earlier.get("fidelity_runs", {})
    runs = {str(params.seed): read_auprc(root / "metrics", list(params.datasets))}
    fidelity = {str(params.seed): read_fidelity(root / "metrics")}
    for seed in args.seeds:
        if str(seed) in runs:
            raise SystemExit(f"demo_seed_spread: seed {seed} is listed twice (or is the params' own)")
        if str(seed) in done:  # measured by an earlier call (--fresh measures again)
            print(f"seed {seed}: from {previous.name}", flush=True)
            runs[str(seed)] = done[str(seed)]
            fidelity[str(seed)] = done_fidelity.get(str(seed), {})
            continue
        work = Path(tempfile.mkdtemp(prefix=f"seed{seed}-"))
        try:
            print(f"seed {seed}: fitting and evaluating in a scratch copy", flush=True)
            runs[str(seed)], fidelity[str(seed)] = run_seed(scratch_copy(root, work / "repo"), seed, params)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    report = {**summarise(runs), "fidelity_runs": fidelity, "fidelity_spread": summarise_fidelity(fidelity)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "demo_seed_spread.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out_dir / "demo_seed_spread.md", markdown(report))
    print(markdown(report))
    if args.readme:
        readme_block_from(args.readme, out_dir / "demo_seed_spread.md", README_START, README_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
