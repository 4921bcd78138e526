"""GPU readiness of the `paper` profile: training and evaluation throughput per precision, layout and compile.

On whatever device it finds (the first CUDA GPU, else the CPU), each variant against fp32 in the same run:

- training: slices/s of the real cDDPM training step (UNet + ResNet-50 encoder, simplex noise, L1, backward,
  Adam; `train_throughput.measure`), batch 32 on a GPU and 2 on a CPU;
- evaluation: scans/s of `models.inference.reconstruct_scan` (one scan = the encoder on 50 slices and
  N = 10 reconstructions of each, 500 UNet passes at 96×96) on a brain-shaped volume
  (`eval_throughput.brain_volume`), in chunks of the largest batch that fits: on a GPU found by doubling
  until out of memory, up to one scan's N × 50 images; on a CPU capped (`--eval-max-batch`);
- variants: fp32; fp16 autocast (training with a GradScaler; GPU only: on a CPU the profile's 16-mixed
  falls back to bf16, as Lightning does); bf16 autocast; channels_last and torch.compile, each on top of the
  profile's precision on the device (fp16 on a GPU, bf16 on a CPU);
- peak memory: the GPU's peak allocation per variant, or the process's peak RSS so far on a CPU;
- FLOPs: one UNet pass and one training slice (forward and backward), counted with
  torch.utils.flop_counter.FlopCounterMode, and the achieved rate as a fraction of the device's dense peak
  for the variant's precision (`DEVICE_PEAKS`; an unknown device gets the rates only).

With `--quick` a CPU times one training step and an evaluation of 2 slices × N = 2, scaled to a whole scan
(UNet passes dominate, so time grows with their number); the table says so. Prints one table; `--json FILE`
writes the figures, `--report DIR` writes DIR/paper_profile.md and .json, `--readme README.md` puts the
report into the README's paper-profile block:

    python benchmarks/paper_profile.py --quick                    # a couple of minutes on a 2-core CPU
    python benchmarks/paper_profile.py --json paper_profile.json  # on a GPU runner
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from eval_throughput import brain_volume
from machine import device_name, synchronize
from mhd_uad.config import compose
from mhd_uad.errors import MhdUadError
from mhd_uad.evaluation.report import readme_block_from
from mhd_uad.io import atomic_write_text
from mhd_uad.models import count_parameters
from mhd_uad.models.factory import build_cddpm, image_size
from mhd_uad.models.inference import MhdSettings, reconstruct_scan
from train_throughput import measure as measure_training

REPO = Path(__file__).resolve().parents[1]
README_START = "<!-- paper-profile:start (written by `benchmarks/paper_profile.py --readme README.md`; do not edit) -->"
README_END = "<!-- paper-profile:end -->"

# Dense peak TFLOP/s by precision, from the vendors' datasheets: NVIDIA H100, H200, A100, L4, L40, L40S, A10,
# V100 and T4 datasheets; RTX 4090 from the Ada Lovelace architecture whitepaper (appendix, FP32 accumulate).
# Tensor-core figures are without sparsity: half the "with sparsity" figure where a datasheet gives only that.
# fp32 is the CUDA-core rate; tf32/bf16/fp16 the tensor-core rates. First pattern that matches the name wins.
DEVICE_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),  # H200 SXM
    (r"H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}),
    (r"H100", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),  # H100 SXM ("H100 80GB HBM3")
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05}),
    (r"\bL40\b", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.05, "fp16": 181.05}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    (r"RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    (r"\bA10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"V100.*PCI", {"fp32": 14.0, "fp16": 112.0}),
    (r"V100", {"fp32": 15.7, "fp16": 125.0}),  # SXM2
    (r"\bT4\b", {"fp32": 8.1, "fp16": 65.0}),
)


def device_peaks(name: str) -> dict[str, float] | None:
    """The dense peak TFLOP/s of a device by its name (torch.cuda.get_device_name), or None when unknown."""
    for pattern, peaks in DEVICE_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks
    return None


def peak_for(peaks: dict[str, float] | None, precision: str) -> tuple[str, float] | None:
    """(precision whose peak applies, TFLOP/s): an fp32 run's convolutions use TF32 tensor cores when cuDNN
    allows it (PyTorch's default), so fp32 is held against the TF32 rate there."""
    if peaks is None:
        return None
    key = precision
    if precision == "fp32" and "tf32" in peaks and torch.backends.cudnn.allow_tf32:
        key = "tf32"
    return (key, peaks[key]) if key in peaks else None


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # fp32, fp16, bf16
    channels_last: bool = False
    compile_model: bool = False

    @property
    def mhd_precision(self) -> str:
        return {"fp32": "32", "fp16": "16-mixed", "bf16": "bf16-mixed"}[self.precision]


def variants(device: torch.device) -> list[Variant]:
    low = "fp16" if device.type == "cuda" else "bf16"  # the profile's 16-mixed, or Lightning's CPU fallback
    out = [Variant("fp32", "fp32")]
    if device.type == "cuda":
        out.append(Variant("fp16", "fp16"))
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        out.append(Variant("bf16", "bf16"))
    out += [Variant(f"{low}+channels_last", low, channels_last=True), Variant(f"{low}+compile", low, compile_model=True)]
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS so far"


def count_flops(params, device: torch.device) -> dict[str, float]:
    """FLOPs of one UNet pass, one encoder pass and one training slice (forward and backward), at batch 1."""
    torch.manual_seed(0)
    model = build_cddpm(params).to(device)
    size = image_size(params)
    x = torch.rand(1, 1, size, size, device=device)
    t = torch.full((1,), 499, device=device, dtype=torch.long)
    counts = {}
    with torch.inference_mode():
        cond = model.encode(x)
        with FlopCounterMode(display=False) as fc:
            model.unet(model.to_model_range(x), t, cond)
        counts["unet_pass"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.encode(x)
        counts["encoder_pass"] = fc.get_total_flops()
    model.train()
    with FlopCounterMode(display=False) as fc:
        loss, _ = model.training_loss(x)
        loss.backward()
    counts["train_slice"] = fc.get_total_flops()
    counts["unet_parameters"] = count_parameters(model.unet)
    counts["encoder_parameters"] = count_parameters(model.encoder)
    return counts


def largest_batch(model, size: int, cond_dim: int, variant: Variant, device: torch.device, cap: int) -> int:
    """The largest UNet batch that fits, doubling from 16 up to `cap` until CUDA runs out of memory."""
    settings_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(variant.precision)
    fits, batch = 0, min(16, cap)
    while True:
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=settings_dtype or torch.float16,
                                                         enabled=settings_dtype is not None):
                x = torch.rand(batch, 1, size, size, device=device)
                model.unet(x, torch.full((batch,), 499, device=device), torch.zeros(batch, cond_dim, device=device))
            synchronize(device)
            fits = batch
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        if batch >= cap:
            break
        batch = min(2 * batch, cap)
    if fits == 0:
        raise MhdUadError(f"not even a UNet batch of {min(16, cap)} fits on {device_name(device)}")
    return fits


def measure_evaluation(params, variant: Variant, device: torch.device, slices: int, recos: int, scans: int,
                       max_batch_cap: int) -> dict:
    """Seconds per scan of reconstruct_scan on `slices` slices × `recos` reconstructions, scaled to the grid's
    slices × N of the params when fewer were run."""
    torch.manual_seed(0)
    model = build_cddpm(params).to(device).eval()
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if variant.compile_model:
        model.unet = torch.compile(model.unet)
    full = MhdSettings.from_params(params)
    x, y, z = (int(v) for v in params.prepare.grid)
    rows = slices * recos
    if device.type == "cuda":
        batch = largest_batch(model, image_size(params), int(params.model.cond_dim), variant, device,
                              min(max_batch_cap, rows))
    else:
        batch = min(max_batch_cap, rows)
    settings = replace(full, num_reconstructions=recos, max_batch=batch, precision=variant.mhd_precision,
                       channels_last=variant.channels_last)
    image, _ = brain_volume((z, x, y), 0)
    first = (z - slices) // 2
    image = image[first:first + slices]
    reset_peak_memory(device)
    reconstruct_scan(model, image, settings, "warm-up", device)
    synchronize(device)
    start = time.perf_counter()
    for i in range(scans):
        reconstruct_scan(model, image, settings, f"scan{i}", device)
    synchronize(device)
    measured = (time.perf_counter() - start) / scans
    scale = (z * full.num_reconstructions) / rows
    memory, memory_kind = peak_memory_gb(device)
    return {"batch": batch, "measured_s": measured, "scan_s": measured * scale, "scans_per_s": 1.0 / (measured * scale),
            "measured_slices": slices, "measured_reconstructions": recos, "scaled_by": scale,
            "peak_memory_gb": memory, "memory": memory_kind}


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = device.type == "cpu"
    params = compose(["profile=paper"], REPO)
    grid = [int(v) for v in params.prepare.grid]
    n_recos = int(params.mhd.num_reconstructions)
    quick = args.quick
    if on_cpu:  # a 44 M UNet step takes seconds per slice on a few cores
        defaults = {"train_batch": 2, "train_steps": 1 if quick else 3, "warmup": 1,
                    "eval_slices": 2 if quick else grid[2], "eval_recos": 2 if quick else n_recos, "eval_scans": 1,
                    "eval_max_batch": 16}
    else:
        defaults = {"train_batch": 32, "train_steps": 5 if quick else 10, "warmup": 3, "eval_slices": grid[2],
                    "eval_recos": n_recos, "eval_scans": 1 if quick else 3, "eval_max_batch": grid[2] * n_recos}
    given = {k: getattr(args, k) for k in defaults}
    s = {k: defaults[k] if v is None else v for k, v in given.items()}
    for key, low in (("train_batch", 1), ("train_steps", 1), ("warmup", 0), ("eval_slices", 1), ("eval_recos", 2),
                     ("eval_scans", 1), ("eval_max_batch", 1)):
        if s[key] < low:
            raise MhdUadError(f"--{key.replace('_', '-')} must be at least {low}, got {s[key]}")
    train_batch, train_steps, warmup = s["train_batch"], s["train_steps"], s["warmup"]
    eval_slices, eval_recos, eval_scans, cap = s["eval_slices"], s["eval_recos"], s["eval_scans"], s["eval_max_batch"]
    if eval_slices > grid[2]:
        raise MhdUadError(f"--eval-slices must be at most the grid's {grid[2]} slices, got {eval_slices}")

    name = device_name(device)
    peaks = device_peaks(name) if device.type == "cuda" else None
    flops = count_flops(params, device)
    eval_flops_per_scan = grid[2] * n_recos * flops["unet_pass"] + grid[2] * flops["encoder_pass"]
    chosen = variants(device)
    if args.variants:
        known = {v.name: v for v in chosen}
        unknown = [v for v in args.variants if v not in known]
        if unknown:
            raise MhdUadError(f"unknown or unsupported variants here: {unknown}; on this device: {list(known)}")
        chosen = [known[v] for v in args.variants]
    skipped = []
    if on_cpu:
        skipped.append("fp16: not run on a CPU (the profile's 16-mixed falls back to bf16 there, as Lightning does)")
    if on_cpu and quick and not args.variants:
        chosen = [v for v in chosen if not v.compile_model]
        skipped.append("bf16+compile: not run with --quick on a CPU (compiling the 44 M UNet takes minutes; "
                       "name it in --variants to run it)")

    rows = []
    for phase in ("train", "eval"):
        for v in chosen:
            row = {"phase": phase, "variant": v.name, "precision": v.precision}
            try:
                if phase == "train":
                    reset_peak_memory(device)
                    r = measure_training("paper", v.precision, train_batch, train_steps, warmup, device,
                                         channels_last=v.channels_last, compile_model=v.compile_model)
                    memory, kind = peak_memory_gb(device)
                    row.update(batch=train_batch, throughput=r["slices_per_s"], unit="slices/s",
                               flops_per_s=r["slices_per_s"] * flops["train_slice"], peak_memory_gb=memory,
                               memory=kind)
                else:
                    r = measure_evaluation(params, v, device, eval_slices, eval_recos, eval_scans, cap)
                    row.update(batch=r["batch"], throughput=r["scans_per_s"], unit="scans/s",
                               flops_per_s=r["scans_per_s"] * eval_flops_per_scan, peak_memory_gb=r["peak_memory_gb"],
                               memory=r["memory"], scaled_by=r["scaled_by"])
            except MhdUadError:
                raise
            except Exception as exc:  # e.g. torch.compile without a C++ compiler, OOM at the training batch
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
            finally:
                reset_peak_memory(device)
            bound = peak_for(peaks, v.precision)
            if bound and "flops_per_s" in row:
                row["peak_precision"], row["peak_tflops"] = bound
                row["fraction_of_peak"] = row["flops_per_s"] / (bound[1] * 1e12)
            rows.append(row)
            print(f"  {phase} {v.name}: " + (f"{row['throughput']:.4g} {row['unit']}" if "throughput" in row
                                              else row["error"]), file=sys.stderr, flush=True)
    for phase in ("train", "eval"):
        base = next((r for r in rows if r["phase"] == phase and r["variant"] == "fp32" and "throughput" in r), None)
        for r in rows:
            if r["phase"] == phase and base and "throughput" in r:
                r["vs_fp32"] = r["throughput"] / base["throughput"]
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "quick": quick, "grid": grid, "num_reconstructions": n_recos,
        "train": {"batch": train_batch, "steps": train_steps, "warmup": warmup},
        "eval": {"slices": eval_slices, "reconstructions": eval_recos, "scans": eval_scans, "max_batch_cap": cap},
        "flops": {**flops, "eval_scan": eval_flops_per_scan}, "peaks_tflops": peaks, "rows": rows, "skipped": skipped,
    }


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def markdown(result: dict) -> str:
    f = result["flops"]
    grid = "×".join(str(v) for v in result["grid"])
    e, t = result["eval"], result["train"]
    lines = [
        "# Paper profile throughput",
        "",
        f"{result['device']}, torch {result['torch']}, {result['threads']} threads"
        + (", `--quick`" if result["quick"] else "") + f"; grid {grid}, N = {result['num_reconstructions']}. "
        f"UNet {f['unet_parameters'] / 1e6:.2f} M parameters, {f['unet_pass'] / 1e9:.1f} GFLOP per 96×96 pass; "
        f"ResNet-50 encoder {f['encoder_parameters'] / 1e6:.2f} M, {f['encoder_pass'] / 1e9:.2f} GFLOP per slice; "
        f"one training slice (forward and backward) {f['train_slice'] / 1e9:.0f} GFLOP; one scan "
        f"{f['eval_scan'] / 1e12:.2f} TFLOP.",
        "",
        "| phase | variant | batch | throughput | vs fp32 | peak memory GB | achieved TFLOP/s | of peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['phase']} | {r['variant']} | | failed: {r['error']} | | | | |")
            continue
        scaled = " *" if r.get("scaled_by", 1.0) != 1.0 else ""
        of_peak = (f"{100 * r['fraction_of_peak']:.1f} % ({r['peak_precision']} {r['peak_tflops']:g})"
                   if "fraction_of_peak" in r else "—")
        lines.append(f"| {r['phase']} | {r['variant']} | {r['batch']} | {_fmt(r['throughput'])} {r['unit']}{scaled} | "
                     f"{r.get('vs_fp32', math.nan):.2f}× | {r['peak_memory_gb']:.2f} ({r['memory']}) | "
                     f"{r['flops_per_s'] / 1e12:.3f} | {of_peak} |")
    lines += ["", f"Training: the real step at batch {t['batch']}, {t['steps']} timed steps after {t['warmup']} "
              f"warm-up. Evaluation: `reconstruct_scan` of one scan ({grid}, N = {result['num_reconstructions']}) "
              f"in chunks of the batch shown, {e['scans']} timed scan(s) after a warm-up."]
    if any(r.get("scaled_by", 1.0) != 1.0 for r in result["rows"]):
        lines.append(f"\\* measured on {e['slices']} slices × N = {e['reconstructions']} and scaled to the whole scan "
                     "by the number of UNet passes.")
    if result["peaks_tflops"] is None:
        lines.append("No peak rate is known for this device: achieved rates only.")
    for note in result["skipped"]:
        lines.append(f"Not run: {note}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps; on a CPU one step and a 2-slice, N = 2 "
                        "evaluation")
    parser.add_argument("--variants", nargs="+", default=None, help="run only these (default: all the device has)")
    parser.add_argument("--train-batch", type=int, default=None, help="default 32 on a GPU, 2 on a CPU")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--eval-slices", type=int, default=None, help="slices per measured scan (default all)")
    parser.add_argument("--eval-recos", type=int, default=None, help="reconstructions measured (default N)")
    parser.add_argument("--eval-scans", type=int, default=None)
    parser.add_argument("--eval-max-batch", type=int, default=None,
                        help="largest evaluation batch tried (default one scan's N × slices on a GPU, 16 on a CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write DIR/paper_profile.md and DIR/paper_profile.json")
    parser.add_argument("--readme", type=Path, default=None, help="put the report into this README's block")
    args = parser.parse_args(argv)
    try:
        if args.readme is not None and args.report is None:
            raise MhdUadError("--readme needs --report DIR (the README quotes the written report)")
        result = run(args)
        text = markdown(result)
        print(text)
        if args.json is not None:
            atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        if args.report is not None:
            atomic_write_text(args.report / "paper_profile.json", json.dumps(result, indent=1) + "\n")
            atomic_write_text(args.report / "paper_profile.md", text)
        if args.readme is not None:
            readme_block_from(args.readme, args.report / "paper_profile.md", README_START, README_END)
    except MhdUadError as exc:
        print(f"paper_profile: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
