"""Where `make demo`'s minutes go: the whole demo, stage by stage, each timed on the wall clock.

Runs what `make demo` runs, in the repository it is started in, one step at a time: the demo data
(`mhd-uad demo-data`, only when `data/` is absent or with --regenerate), then every DVC stage in
dvc.yaml's order with `dvc repro --single-item --force <stage>` (so an up-to-date stage is timed too, and
dvc.lock is current afterwards), then `mhd-uad report --readme README.md`. It prints one table, grouped
as data, splits + prepare, pretrain, train, score-healthy, evaluate, report, and writes
reports/demo_stage_times.{json,md}:

    python benchmarks/demo_stage_times.py                      # about as long as `make demo`
    python benchmarks/demo_stage_times.py --readme README.md   # also fill the README's timing block

The sum of the rows is `make demo` end to end, DVC's own bookkeeping included (hashing, dvc.lock).
Shared machines drift in speed from hour to hour, so before and after the demo it also times a reference:
one bf16 training step of the demo cDDPM (16 slices of 64², forward, backward and Adam; the median of 10,
each after a warm-up step; benchmarks/train_throughput.py). Two runs compare through their totals divided by
their reference steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from machine import cpu_name
from mhd_uad.evaluation.report import readme_block_from
from mhd_uad.io import atomic_write_text
from train_throughput import measure as time_train_step

README_START = ("<!-- demo-stage-times:start (written by `benchmarks/demo_stage_times.py --readme README.md`; "
                "do not edit) -->")
README_END = "<!-- demo-stage-times:end -->"
GROUPS = ("data", "splits + prepare", "pretrain", "train", "score-healthy", "evaluate", "report")


def group_of(step: str) -> str:
    """The table row a step is counted in: `train@t1-fold0` -> train."""
    stage = step.split("@", 1)[0]
    return {"splits": "splits + prepare", "prepare": "splits + prepare", "demo-data": "data",
            "dvc commit data": "data", "report --readme": "report"}.get(stage, stage)


def _run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"demo_stage_times: `{' '.join(cmd)}` failed with exit code {done.returncode}")
    return seconds


def reference_step() -> float:
    """Median seconds of one bf16 demo training step at batch 16 on the CPU: this machine's speed right now."""
    return statistics.median(time_train_step("demo", "bf16", 16, 1, 1, torch.device("cpu"))["step_s"]
                             for _ in range(10))


def stage_names(root: Path, dvc: list[str]) -> list[str]:
    """Every stage of dvc.yaml, foreach/matrix expanded, in the file's order (each depends on earlier ones)."""
    out = subprocess.run([*dvc, "stage", "list", "--name-only"], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"demo_stage_times: `dvc stage list` failed: {out.stderr.strip()[-500:]}")
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def measure(root: Path, regenerate: bool) -> list[dict]:
    bindir = Path(sys.executable).parent
    mhd = [str(bindir / "mhd-uad")] if (bindir / "mhd-uad").exists() else [sys.executable, "-m", "mhd_uad.cli"]
    dvc = [sys.executable, "-m", "dvc"]
    steps: list[dict] = []

    def timed(name: str, cmd: list[str]) -> None:
        seconds = _run(cmd, root)
        steps.append({"step": name, "group": group_of(name), "seconds": round(seconds, 1)})
        print(f"{name:28s} {seconds:7.1f} s", flush=True)

    if regenerate and (root / "data").exists():
        shutil.rmtree(root / "data")
    if not (root / "data").exists():
        timed("demo-data", [*mhd, "demo-data", "--out", "data", "--seed", "0", "--quiet"])
        timed("dvc commit data", [*dvc, "commit", "-q", "-f", "data.dvc"])
    for stage in stage_names(root, dvc):
        timed(stage, [*dvc, "repro", "--single-item", "--force", stage])
    timed("report --readme", [*mhd, "report", "--readme", "README.md"])
    return steps


def summarise(steps: list[dict], reference: tuple[float, float]) -> dict:
    totals = {g: round(sum(s["seconds"] for s in steps if s["group"] == g), 1) for g in GROUPS}
    total = round(sum(s["seconds"] for s in steps), 1)
    ref = sum(reference) / 2
    return {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
            "steps": steps, "groups": totals, "total_seconds": total,
            "reference_step_s": {"before": round(reference[0], 4), "after": round(reference[1], 4)},
            "total_in_reference_steps": round(total / ref)}


def markdown(report: dict) -> str:
    total = report["total_seconds"]
    m = report["machine"]
    lines = ["# Demo stage times", "",
             f"`make demo`, stage by stage (`python benchmarks/demo_stage_times.py`), on {m['cpu']} "
             f"({m['cores']} cores):", "",
             "| step | seconds | share |", "|---|---|---|"]
    for group in GROUPS:
        seconds = report["groups"][group]
        lines.append(f"| {group} | {seconds:.0f} | {100 * seconds / total:.0f} % |")
    lines.append(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | |")
    ref = report["reference_step_s"]
    lines += ["", f"Reference step of this machine (one bf16 demo training step at batch 16, median of 10): "
              f"{ref['before']:.3f} s before the run, {ref['after']:.3f} s after; the total is "
              f"{report['total_in_reference_steps']} reference steps."]
    lines += ["", "<details><summary>Every stage</summary>", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| `{s['step']}` | {s['seconds']:.1f} |" for s in report["steps"]]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository to run the demo in")
    parser.add_argument("--regenerate", action="store_true", help="delete data/ and time its generation too")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <root>/reports")
    parser.add_argument("--readme", type=Path, default=None, help="also put the table into this README's block")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not (root / "dvc.yaml").is_file():
        raise SystemExit(f"demo_stage_times: {root} has no dvc.yaml: run it in the repository")
    before = reference_step()
    print(f"reference step before: {before:.3f} s", flush=True)
    steps = measure(root, args.regenerate)
    after = reference_step()
    print(f"reference step after: {after:.3f} s", flush=True)
    report = summarise(steps, (before, after))
    out_dir = args.out_dir or root / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "demo_stage_times.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out_dir / "demo_stage_times.md", markdown(report))
    print(markdown(report))
    if args.readme:
        readme_block_from(args.readme, out_dir / "demo_stage_times.md", README_START, README_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
