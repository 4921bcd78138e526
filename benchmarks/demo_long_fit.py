"""What the demo's GPU recipe buys, measured on the CPU: the long-fit probe (not part of `make demo`).

The demo's `gpu` recipe (conf/recipe/gpu.yaml, what `make demo` runs beside a CUDA GPU) trains each cDDPM
10x longer than the CPU demo. This probe runs those fits on the CPU, in a scratch copy of the repository
(demo_seed_spread.scratch_copy: the tracked files, data/ linked, the splits and prepared arrays copied) with
the committed encoders (the recipe does not change pretraining), then scores them as the pipeline does
(score-healthy, evaluate on the four demo test sets) and on the held-out anatomy (demo_generalisation.py).
Its params are the demo profile with recipe=gpu and the CPU's device settings (trainer.accelerator=cpu, bf16 AMP and the CPU
demo's scoring batch), so its models are the recipe's up to rounding.

Writes reports/demo_long_fit.{json,md} (the demo AUPRC table of the long fits beside the committed demo's, the
held-out table, the fit times) and reports/demo_long_fit/gallery/<set>.png (the evaluate stage's gallery of
the long fits: set it beside reports/gallery/<set>.png to see the mean reconstructions):

    python benchmarks/demo_long_fit.py --work /tmp/long-fit [--readme README.md]   # after make demo

On two CPU cores the two fits take about an hour side by side (--parallel, the default where there are two
cores or more: each fit gets half of them), scoring some 8 minutes. Given the same --work folder again, a run
continues where it stopped: finished steps are kept, and an interrupted fit resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_generalisation import restored_percent
from demo_seed_spread import SCORERS, read_auprc, scratch_copy
from mhd_uad.config import compose
from mhd_uad.devices import usable_cpus
from mhd_uad.evaluation.compare import fidelity_at
from mhd_uad.evaluation.healthy import fidelity_path
from mhd_uad.evaluation.report import readme_block_from
from mhd_uad.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RECIPE = "gpu"
# The recipe's fits on a CPU: its device settings are the CPU demo's (conf/profile/demo.yaml).
CPU_SETTINGS = ("trainer.accelerator=cpu", "trainer.precision=bf16-mixed", "trainer.benchmark=false",
                "mhd.precision=bf16-mixed", "mhd.max_batch=16")
README_START = ("<!-- demo-long-fit:start (written by `benchmarks/demo_long_fit.py --readme README.md`; "
                "do not edit) -->")
README_END = "<!-- demo-long-fit:end -->"


def _env(threads: int | None = None) -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the scratch copy's own store
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _mhd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mhd_uad.cli", *args]


def _run(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"demo_long_fit: `{' '.join(cmd[2:])}` failed with exit code {done.returncode}")
    return time.perf_counter() - started


def prepare_scratch(root: Path, repo: Path, modalities: list[str]) -> None:
    """The scratch copy with the committed encoders and params.yaml composed for the recipe on the CPU."""
    if not (repo / "params.yaml").is_file():
        partial = repo.with_name(repo.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        scratch_copy(root, partial)
        for name in ("metrics", "plots", "reports"):  # the committed demo's, not this probe's
            shutil.rmtree(partial / name, ignore_errors=True)
        for modality in modalities:
            (partial / "models" / modality).mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / "models" / modality / "encoder.pt", partial / "models" / modality / "encoder.pt")
        _run(_mhd("params", f"recipe={RECIPE}", *CPU_SETTINGS), partial)
        partial.rename(repo)


def fit_all(repo: Path, modalities: list[str], parallel: bool) -> dict[str, float]:
    """Train each modality's fold-0 cDDPM (side by side with --parallel); seconds per modality."""
    todo = [m for m in modalities if not (repo / "models" / m / "fold0" / "cddpm.ckpt").is_file()]
    threads = max(1, usable_cpus() // len(todo)) if parallel and todo else None
    started, running = {}, {}
    for modality in todo:
        print(f"fitting {modality.upper()} ({'side by side' if threads else 'one at a time'})", flush=True)
        log = (repo / f"train-{modality}.log").open("w")
        started[modality] = time.perf_counter()
        running[modality] = subprocess.Popen(_mhd("train", "--modality", modality, "--fold", "0"), cwd=repo,
                                             env=_env(threads), stdout=log, stderr=subprocess.STDOUT)
        if not threads:
            running[modality].wait()
    seconds = {}
    while len(seconds) < len(running):  # each fit's own end, whichever finishes first
        for modality, proc in running.items():
            if modality in seconds or proc.poll() is None:
                continue
            if proc.returncode != 0:
                tail = (repo / f"train-{modality}.log").read_text()[-3000:]
                raise SystemExit(f"{tail}\ndemo_long_fit: the {modality.upper()} fit failed (exit {proc.returncode})")
            seconds[modality] = round(time.perf_counter() - started[modality], 1)
        time.sleep(1.0)
    return seconds


def checkpoint_facts(repo: Path, modality: str) -> dict:
    import torch

    meta = torch.load(repo / "models" / modality / "fold0" / "cddpm.ckpt", map_location="cpu",
                      weights_only=True)["meta"]
    return {k: meta[k] for k in ("global_step", "epoch", "best_val_loss") if k in meta}


def score_all(repo: Path, params) -> dict[str, float]:
    seconds = {"score-healthy": 0.0, "evaluate": 0.0}
    for modality in params.train.modalities:
        if not (repo / "artifacts" / "healthy" / str(modality) / "fold0").is_dir() or \
                not fidelity_path(repo, str(modality), 0).is_file():
            seconds["score-healthy"] += _run(_mhd("score-healthy", "--modality", str(modality), "--fold", "0"), repo)
    for dataset in params.datasets:
        if not (repo / "metrics" / f"{dataset}.json").is_file():
            seconds["evaluate"] += _run(_mhd("evaluate", "--dataset", str(dataset)), repo)
    return {k: round(v, 1) if v else None for k, v in seconds.items()}  # None: nothing left to run


def in_distribution(root: Path, repo: Path, modalities: list[str]) -> dict:
    """{modality: {"demo": .., "long_fit": ..}}: the score-healthy stage's fidelity of each fold-0 model on its
    healthy IXI val scans (scoring.fidelity); None where the committed demo has not written it."""
    demo, long_fit = fidelity_at(None, root), fidelity_at(None, repo)
    return {m: {"demo": demo.get(f"{m}_fold0"), "long_fit": long_fit.get(f"{m}_fold0")} for m in modalities}


def held_out(repo: Path, work: Path) -> dict:
    out = work / "generalisation"
    if not (out / "demo_generalisation.json").is_file():
        _run([sys.executable, str(REPO / "benchmarks" / "demo_generalisation.py"), "--checkpoint-dir",
              str(repo / "models"), "--out-dir", str(out)], REPO)
    return json.loads((out / "demo_generalisation.json").read_text())


def markdown(report: dict, committed_held_out: dict | None) -> str:
    r = report
    lines = ["# The demo's GPU recipe, fitted on the CPU", "",
             f"The `{RECIPE}` recipe's fits ({r['steps']} steps of {r['batch_size']} slices, against the CPU "
             f"demo's {r['cpu_steps']}) run on {r['machine']} by `python benchmarks/demo_long_fit.py`: "
             + ", ".join(f"{m.upper()} {s / 60:.0f} min" for m, s in r["seconds"]["fit"].items())
             + (" (side by side)" if r["parallel"] else "") + ".", "",
             "Demo AUPRC % of the long fits against the committed demo models (`metrics/`):", "",
             "| set | " + " | ".join(f"{s} demo | {s} long fit" for s in SCORERS) + " |",
             "|---|" + "---:|---:|" * len(SCORERS)]
    for dataset, long in r["auprc"]["long_fit"].items():
        demo = r["auprc"]["demo"].get(dataset, {})
        cells = [f"{100 * demo[s]:.1f} | {100 * long[s]:.1f}" if s in demo and s in long else "– | –"
                 for s in SCORERS]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    if r.get("in_distribution"):
        def cells(f):
            return (f"{f['brain_l1']:.4f} | {f['bias_bright']:+.3f} / {f['bias_dark']:+.3f} | {f['contrast']:.2f}"
                    if f else "– | – | –")

        lines += ["", "In distribution first: the fold-0 model on its healthy IXI val scans (the score-healthy "
                  "stage's `metrics/healthy/`; reco − scan on brain voxels ≥ 0.9 / < 0.3; contrast kept: 1 = all):",
                  "", "| model | brain L1 demo | reco − scan demo | contrast demo | brain L1 long fit "
                  "| reco − scan long fit | contrast long fit |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m, pair in r["in_distribution"].items():
            lines.append(f"| IXI {m.upper()} | {cells(pair['demo'])} | {cells(pair['long_fit'])} |")
    lines += ["", "The held-out anatomy (`benchmarks/demo_generalisation.py --checkpoint-dir` the long fits; "
              "targets AUROC >= 0.9, ratio >= 2):", "",
              "| case | contrast | AUROC demo | AUROC long fit | ratio demo | ratio long fit "
              "| reco − scan bright / dark, demo | long fit | lesion restored %, demo / long fit | result |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case, entry in r["held_out"]["cases"].items():
        for c, row in entry["contrasts"].items():
            old = (committed_held_out or {}).get("cases", {}).get(case, {}).get("contrasts", {}).get(c)
            before = (f"{old['auroc']:.3f}", f"{old['ratio']:.2f}", f"{old['bias_bright']:+.3f} / {old['bias_dark']:+.3f}") \
                if old else ("–", "–", "–")
            restored = f"{restored_percent(old) if old else '–'} / {restored_percent(row)}"
            lines.append(f"| {case} | {c.upper()} | {before[0]} | {row['auroc']:.3f} | {before[1]} | "
                         f"{row['ratio']:.2f} | {before[2]} | {row['bias_bright']:+.3f} / {row['bias_dark']:+.3f} | "
                         f"{restored} | {'pass' if row['pass'] else 'FAIL'} |")
    lines += ["", "Fits (lowest val loss; steps run): " + ", ".join(
        f"{m.upper()} {f.get('best_val_loss', float('nan')):.4f} ({f.get('global_step', '?')} steps)"
        for m, f in r["fits"].items()) + ". Galleries of the long fits: `reports/demo_long_fit/gallery/`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="the repository, after `make demo`")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (kept; a rerun continues there)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <root>/reports")
    parser.add_argument("--readme", type=Path, default=None, help="also put the tables into this README's block")
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="fit the modalities side by side (default: with two CPUs or more)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    demo = compose([], root)
    params = compose([f"recipe={RECIPE}", *CPU_SETTINGS], root)
    modalities = [str(m) for m in params.train.modalities]
    if list(params.train.folds) != [0]:
        raise SystemExit("demo_long_fit: the recipe fits fold 0 only (train.folds: [0])")
    missing = [m for m in modalities if not (root / "models" / m / "encoder.pt").is_file()]
    missing += [d for d in demo.datasets if not (root / "metrics" / f"{d}.json").is_file()]
    if missing:
        raise SystemExit(f"demo_long_fit: run `make demo` first (missing: {', '.join(missing)})")
    work = (args.work or Path(tempfile.mkdtemp(prefix="long-fit-"))).resolve()
    repo = work / "repo"
    parallel = usable_cpus() >= 2 if args.parallel is None else args.parallel
    print(f"scratch: {work}", flush=True)
    prepare_scratch(root, repo, modalities)
    fit_seconds = fit_all(repo, modalities, parallel)
    previous = work / "fit_seconds.json"
    if previous.is_file():  # fits finished by an earlier call keep their times
        fit_seconds = {**json.loads(previous.read_text()), **fit_seconds}
    atomic_write_text(previous, json.dumps(fit_seconds) + "\n")
    score_seconds = score_all(repo, params)
    previous = work / "score_seconds.json"
    if previous.is_file():  # a stage an earlier call ran (and this one skipped) keeps its time
        earlier = json.loads(previous.read_text())
        score_seconds = {k: v or earlier.get(k, v) for k, v in score_seconds.items()}
    atomic_write_text(previous, json.dumps(score_seconds) + "\n")
    from machine import cpu_name

    report = {
        "recipe": RECIPE, "machine": f"{cpu_name()} ({usable_cpus()} cores)", "parallel": parallel,
        "steps": int(params.train.max_steps), "cpu_steps": int(demo.train.max_steps),
        "batch_size": int(params.train.batch_size), "overrides": list(CPU_SETTINGS),
        "fits": {m: checkpoint_facts(repo, m) for m in modalities},
        "seconds": {"fit": fit_seconds, **score_seconds},
        "auprc": {"demo": read_auprc(root / "metrics", list(demo.datasets)),
                  "long_fit": read_auprc(repo / "metrics", list(demo.datasets))},
        "in_distribution": in_distribution(root, repo, modalities),
        "held_out": held_out(repo, work),
    }
    out_dir = args.out_dir or root / "reports"
    gallery = out_dir / "demo_long_fit" / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    for png in sorted((repo / "reports" / "gallery").glob("*.png")):
        shutil.copyfile(png, gallery / png.name)
    committed = out_dir / "demo_generalisation.json"  # the demo models' held-out figures, set beside these
    report["held_out_demo"] = json.loads(committed.read_text())["cases"] if committed.is_file() else None
    text = markdown(report, {"cases": report["held_out_demo"]} if report["held_out_demo"] else None)
    atomic_write_text(out_dir / "demo_long_fit.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out_dir / "demo_long_fit.md", text)
    print(text)
    if args.readme:
        readme_block_from(args.readme, out_dir / "demo_long_fit.md", README_START, README_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
