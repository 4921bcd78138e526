"""Training throughput of the cDDPM (UNet + conditioning encoder), slices per second, fp32 against bf16.

Runs the real training step (simplex noise, q_sample, UNet x0-prediction, L1, backward, Adam) for the
`demo` and `paper` profiles on whatever machine runs it, after a warm-up, and prints one table:

    python benchmarks/train_throughput.py                 # both profiles, CPU or the first GPU
    python benchmarks/train_throughput.py --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mhd_uad.config import compose
from mhd_uad.models.factory import build_cddpm, image_size

REPO = Path(__file__).resolve().parents[1]


def measure(profile: str, precision: str, batch: int, steps: int, warmup: int, device: torch.device,
            channels_last: bool = False, compile_model: bool = False) -> dict:
    """Seconds per real training step after `warmup` steps; optionally in channels_last memory format and
    with the UNet and encoder through torch.compile (benchmarks/paper_profile.py uses both)."""
    params = compose([f"profile={profile}"], REPO)
    torch.manual_seed(0)
    model = build_cddpm(params).to(device).train()
    size = image_size(params)
    x = torch.rand(batch, 1, size, size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile_model:
        model.unet, model.encoder = torch.compile(model.unet), torch.compile(model.encoder)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = model.training_loss(x)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    out = {"profile": profile, "precision": precision, "batch": batch, "image": size,
           "step_s": seconds, "slices_per_s": batch / seconds}
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["demo", "paper"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paper-batch", type=int, default=None, help="default: 32 on GPU, 4 on CPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    low = "fp16" if device.type == "cuda" else "bf16"
    rows = []
    for profile in args.profiles:
        params = compose([f"profile={profile}"], REPO)
        batch = int(params.train.batch_size)
        if profile == "paper" and device.type == "cpu":
            batch = args.paper_batch or 4  # a 44 M UNet step at batch 32 takes minutes on 2 cores
        elif profile == "paper" and args.paper_batch:
            batch = args.paper_batch
        precisions = ["fp32", low] + (["bf16"] if device.type == "cuda" and low != "bf16" else [])
        for precision in precisions:
            rows.append(measure(profile, precision, batch, args.steps, args.warmup, device))
    print(f"training throughput on {where} (torch {torch.__version__})")
    print(f"{'profile':8} {'precision':9} {'batch':>5} {'image':>5} {'s/step':>8} {'slices/s':>9}")
    for r in rows:
        print(f"{r['profile']:8} {r['precision']:9} {r['batch']:5d} {r['image']:5d} {r['step_s']:8.3f} "
              f"{r['slices_per_s']:9.1f}")
    for profile in args.profiles:
        fp32 = next(r for r in rows if r["profile"] == profile and r["precision"] == "fp32")
        for r in rows:
            if r["profile"] == profile and r["precision"] != "fp32":
                print(f"{profile}: {r['precision']} is {r['slices_per_s'] / fp32['slices_per_s']:.2f}x fp32")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
