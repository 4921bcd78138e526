"""The README's GPU block from the GPU check's reports: the card, the measured rates, and the paper run's hours.

Reads DIR/pipeline_throughput_paper.json (written by `benchmarks/pipeline_throughput.py --profile paper
--report DIR` on a GPU), DIR/device.txt and DIR/summary.txt (written by `benchmarks/gpu_check.sh`), and
writes DIR/gpu_check.md; with `--readme README.md` the same text goes into the README's gpu-check block.

The hours are computed from the measured rates and the paper run's work (method.md): 10 fits (T1 and T2 ×
5 folds) of 14.4k optimizer steps × 32 slices (1200 epochs of 12 batches: 385 volumes at batch 32), then
for each of the 5 folds the healthy IXI val scans of both modalities (44 each) and every val and test scan of
the four test sets at their published sizes (BraTS21 1251, MSLUB 30, ATLAS v2 655, WMH 60). On eight GPUs a
fit runs on one GPU each (`dvc queue start -j 8`: two rounds for 10 fits) and evaluation is shared out scan
by scan (`evaluate.devices`). SparK pretraining (2 fits) is not counted.

    python benchmarks/gpu_report.py --dir reports/gpu --readme README.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mhd_uad.evaluation.report import replace_readme_block
from mhd_uad.io import atomic_write_text

README_START = "<!-- gpu-check:start (written by `benchmarks/gpu_report.py --readme README.md`; do not edit) -->"
README_END = "<!-- gpu-check:end -->"

FITS = 10  # T1, T2 × 5 folds
STEPS_PER_FIT = 14_400  # 1200 epochs × 12 batches (method.md §2.3)
SLICES_PER_STEP = 32
FOLDS = 5
SCANS_PER_FOLD = {"IXI val (score-healthy, T1 and T2)": 2 * 44, "Brats21": 1251, "MSLUB": 30, "ATLAS_v2": 655,
                  "WMH": 60}
GPUS = (1, 8)


def paper_hours(train_slices_per_s: float, eval_scans_per_s: float) -> dict[int, dict[str, float]]:
    """{GPUs: {"train": h, "eval": h, "total": h}} for the paper run at the given rates."""
    fit_h = STEPS_PER_FIT * SLICES_PER_STEP / train_slices_per_s / 3600
    eval_h = FOLDS * sum(SCANS_PER_FOLD.values()) / eval_scans_per_s / 3600
    out = {}
    for gpus in GPUS:
        train = math.ceil(FITS / gpus) * fit_h  # one fit per GPU
        evaluate = eval_h / gpus
        out[gpus] = {"train": train, "eval": evaluate, "total": train + evaluate}
    return out


def training_rate(r: dict, folder: Path) -> tuple[float, str]:
    """(slices/s, where it comes from): the train stage's rate when the report has it, else the model-only
    training step of the profile's precision from paper_profile.json in the same folder (the step alone: a
    bound the stage approaches when its input keeps up)."""
    if "train_slices_per_s" in r:
        return float(r["train_slices_per_s"]), "in the train stage"
    profile = folder / "paper_profile.json"
    if profile.is_file():
        rows = [row for row in json.loads(profile.read_text()).get("rows", [])
                if row.get("phase") == "train" and row.get("variant") == "fp16"]
        if rows:
            return float(rows[0]["throughput"]), "in the fp16 training step alone (paper_profile.json; the train stage was not measured)"
    raise SystemExit(f"{folder}: neither a train-stage rate nor paper_profile.json's fp16 training step")


def report(folder: Path) -> str:
    path = folder / "pipeline_throughput_paper.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run benchmarks/gpu_check.sh or pipeline_throughput.py --profile paper "
                         "--report DIR on a GPU first)")
    r = json.loads(path.read_text())
    if "eval_scans_per_s" not in r:
        raise SystemExit(f"{path}: no eval_scans_per_s (the report lacks the eval part)")
    train_rate, train_source = training_rate(r, folder)
    device = (folder / "device.txt").read_text().strip() if (folder / "device.txt").is_file() else r["device"]
    lines = [f"The last GPU check ran on **{device.split('|')[0].strip()}** (torch, CUDA: "
             f"{' / '.join(p.strip() for p in device.split('|')[1:]) or r['torch']}; {r['cpu_count']} CPUs).", ""]
    if (folder / "summary.txt").is_file():
        lines += ["Steps of `make gpu-check`:", "", "```", (folder / "summary.txt").read_text().strip(), "```", ""]
    table = [line for line in (folder / "pipeline_throughput_paper.md").read_text().splitlines()
             if not line.startswith("# ")]
    lines += "\n".join(table).strip().splitlines()
    hours = paper_hours(train_rate, r["eval_scans_per_s"])
    lines += ["", f"The paper run at these rates ({train_rate:.0f} slices/s {train_source}, "
              f"{r['eval_scans_per_s']:.2f} scans/s in the evaluate stage; `benchmarks/gpu_report.py`):", "",
              "| GPUs | training (10 fits × 14.4k steps × 32 slices) | evaluation (5 folds × "
              f"{sum(SCANS_PER_FOLD.values())} scans) | total |", "|---:|---:|---:|---:|"]
    for gpus, h in hours.items():
        lines.append(f"| {gpus} | {h['train']:.1f} h | {h['eval']:.1f} h | {h['total']:.1f} h |")
    if (folder / "checkpoint_cost.md").is_file():  # benchmarks/checkpoint_cost.py, a step of the check
        cost = [line for line in (folder / "checkpoint_cost.md").read_text().splitlines() if not line.startswith("# ")]
        lines += ["", "Keeping the best checkpoint (`benchmarks/checkpoint_cost.py`):", *"\n".join(cost).strip().splitlines()[1:]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("reports/gpu"))
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args(argv)
    text = report(args.dir)
    atomic_write_text(args.dir / "gpu_check.md", text)
    print(text)
    if args.readme:
        replace_readme_block(args.readme, README_START, README_END, text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
