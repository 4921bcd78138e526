"""What keeping the best checkpoint costs a fit: the original's way against resume.py's, per epoch of training.

The original (Lightning's ModelCheckpoint, top 1 by val loss, with last.ckpt) writes two full checkpoints
(weights and Adam's moments) at every new lowest val loss; here (`mhd_uad.resume`) a new best is a copy of
the exported weights where the model is, and a resume point (the full checkpoint and the best weights) is
written every 10 minutes. This measures, for a profile's cDDPM on this machine:

- a full checkpoint: its size and the seconds to write it the way Lightning does (`TorchCheckpointIO`);
- a new best here: the seconds to copy the exported weights on the training device;
- a resume point here: its size and the seconds to write it;

against the reference: one epoch of the real IXI fold (385 training volumes, 12 full batches) of the
model-only training step, measured in the same run on a GPU. A CPU takes minutes per paper-size step, so
there the reference comes from the last GPU check's `paper_profile.json` and the report names that card.

    python benchmarks/checkpoint_cost.py                                  # paper profile, this machine
    python benchmarks/checkpoint_cost.py --report reports/gpu             # from the GPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import device_name
from machine import synchronize as sync
from mhd_uad.io import atomic_write_text
from pipeline_throughput import steps_per_epoch

REPO = Path(__file__).resolve().parents[1]
GPU_REPORT = REPO / "reports" / "gpu" / "paper_profile.json"


def training_state(profile: str, device: torch.device):
    """The profile's cDDPM in its Lightning module with Adam's moments filled, as a fit holds them."""
    from mhd_uad.config import compose
    from mhd_uad.models.factory import build_cddpm
    from mhd_uad.models.lightning import CDDPMModule

    params = compose([f"profile={profile}"], REPO)
    torch.manual_seed(0)
    module = CDDPMModule(build_cddpm(params)).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return params, module, opt


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(profile: str, reps: int, folder: Path, device: torch.device) -> dict:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from mhd_uad.resume import RESUME_EVERY_S as every_s
    from mhd_uad.resume import exported_weights

    params, module, opt = training_state(profile, device)
    io = TorchCheckpointIO()
    full = {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 0}
    resume_point = {**full, "callbacks": {"BestWeights": {"score": 0.0, "step": 0, "weights": exported_weights(module)}}}
    path = folder / "checkpoint.ckpt"

    def write(checkpoint):
        io.save_checkpoint(checkpoint, path)

    def copy_best():  # what BestWeights does at a new best
        copied = exported_weights(module)
        sync(device)
        return copied

    write(full)  # warm-up: the file exists, the page cache is primed
    full_s = median_seconds(lambda: write(full), reps)
    full_bytes = path.stat().st_size
    copy_best()
    copy_s = median_seconds(copy_best, reps)
    resume_s = median_seconds(lambda: write(resume_point), reps)
    resume_bytes = path.stat().st_size
    return {"profile": profile, "parameters": sum(p.numel() for p in module.parameters()),
            "full_checkpoint_bytes": full_bytes, "full_checkpoint_s": full_s,
            "original_per_new_best_s": 2 * full_s, "here_per_new_best_s": copy_s,
            "resume_point_bytes": resume_bytes, "resume_point_s": resume_s, "resume_every_s": every_s,
            "batch_size": int(params.train.batch_size), "steps_per_epoch": steps_per_epoch(params),
            "precision": str(params.trainer.precision)}


def epoch_reference(result: dict, device: torch.device, steps: int) -> dict:
    """Seconds of one epoch of the model-only step: measured here on a GPU, else from the last GPU check."""
    batch, steps = result["batch_size"], result["steps_per_epoch"]
    if device.type == "cuda":
        from train_throughput import measure as model_step

        precision = {"16-mixed": "fp16", "bf16-mixed": "bf16"}.get(result["precision"], "fp32")
        step = model_step(result["profile"], precision, batch, steps=steps, warmup=3, device=device)
        return {"epoch_s": steps * step["step_s"],
                "epoch_source": f"the {precision} model-only step measured in this run", "epoch_device":
                device_name(device)}
    if not GPU_REPORT.is_file():
        return {}
    gpu = json.loads(GPU_REPORT.read_text())
    row = next((r for r in gpu["rows"] if r["phase"] == "train" and r["variant"] == "fp16"), None)
    if row is None or result["profile"] != "paper":
        return {}
    return {"epoch_s": steps * row["batch"] / row["throughput"],
            "epoch_source": f"the fp16 model-only step in {GPU_REPORT.relative_to(REPO)}",
            "epoch_device": gpu["device"]}


def report_markdown(r: dict) -> str:
    mb = 1e6
    lines = [f"# Checkpoint cost ({r['profile']} profile)", "",
             f"{r['device']}, torch {r['torch']}; {r['parameters'] / 1e6:.1f} M parameters; "
             "`python benchmarks/checkpoint_cost.py`.", "",
             "| what | size | seconds |" + (" epochs of training |" if "epoch_s" in r else ""),
             "|---|---:|---:|" + ("---:|" if "epoch_s" in r else "")]

    def row(what, size, seconds):
        epochs = f" {seconds / r['epoch_s']:.2f} |" if "epoch_s" in r else ""
        return f"| {what} | {size} | {seconds:.3f} |{epochs}"

    lines += [row("the original, at each new lowest val loss: best and last, each a full checkpoint",
                  f"2 × {r['full_checkpoint_bytes'] / mb:.0f} MB", r["original_per_new_best_s"]),
              row("here, at each new lowest val loss: a copy of the weights on the device", "in memory",
                  r["here_per_new_best_s"]),
              row(f"here, every {r['resume_every_s'] / 60:.0f} minutes: a resume point (full checkpoint and the "
                  "best weights)", f"{r['resume_point_bytes'] / mb:.0f} MB", r["resume_point_s"])]
    if "epoch_s" in r:
        lines += ["", f"An epoch: {r['steps_per_epoch']} steps of {r['batch_size']} slices (the real IXI fold), "
                  f"{r['epoch_s']:.2f} s on {r['epoch_device']} ({r['epoch_source']}). The resume points take "
                  f"{100 * r['resume_point_s'] / r['resume_every_s']:.2f} % of a fit's time."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper", choices=("demo", "paper"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="model-only steps timed on a GPU")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp "
                        "folder beside the repository's artifacts, on the disk a fit writes to)")
    parser.add_argument("--report", type=Path, default=None, help="folder for checkpoint_cost.md and .json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = args.dir or REPO
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".checkpoint-cost-", dir=base) as folder:
        result = measure(args.profile, args.reps, Path(folder), device)
    result.update(device=device_name(device, threads=True), torch=torch.__version__)
    result.update(epoch_reference(result, device, args.steps))
    text = report_markdown(result)
    print(text)
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.report / "checkpoint_cost.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.report / "checkpoint_cost.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
