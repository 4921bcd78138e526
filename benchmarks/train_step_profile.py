"""Where a cDDPM training step's time goes, and what the fused optimizer saves: a profile of the real step.

Runs the training step the `train` stage runs (models.lightning.CDDPMModule's loss: simplex noise, q_sample,
encoder, UNet x0-prediction, L1; backward; the profile's optimizer) at the profile's batch size and
precision on the CPU (or --device), after a warm-up, under torch.profiler, and prints the step's self time
by kind of operation. Then it times the optimizer update alone, plain (a loop over the parameters, torch's
CPU default and what the train stage uses today) against fused (the same update in one kernel),
interleaved in the same run:

    python benchmarks/train_step_profile.py                     # demo profile, bf16, batch 16, 1 thread
    python benchmarks/train_step_profile.py --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mhd_uad.config import compose
from mhd_uad.models.factory import build_cddpm, image_size

REPO = Path(__file__).resolve().parents[1]
KINDS = (  # (label, substrings of aten op names), the first match wins
    ("convolutions, backward", ("convolution_backward",)),
    ("convolutions, forward", ("convolution",)),
    ("dtype and layout copies (autocast)", ("copy_", "_to_copy", "empty")),
    ("group norm", ("group_norm",)),
    ("SiLU", ("silu",)),
    ("attention and linear", ("bmm", "addmm", "aten::mm", "softmax", "baddbmm")),
    ("pooling and upsampling", ("pool", "upsample")),
    ("optimizer", ("Optimizer.step", "_fused_adam", "addcdiv", "lerp", "sqrt", "_foreach")),
    ("elementwise (add, mul, ...)", ("add", "mul", "sub", "div", "where", "sum", "neg", "abs", "sign")),
)


def _kind(name: str) -> str:
    for label, keys in KINDS:
        if any(k in name for k in keys):
            return label
    return "other"


def build(profile: str, device: torch.device, fused: bool, overrides: list[str]):
    params = compose([f"profile={profile}", *overrides], REPO)
    torch.manual_seed(0)
    model = build_cddpm(params).to(device).train()
    cls = torch.optim.AdamW if params.train.optimizer == "adamw" else torch.optim.Adam
    opt = cls(model.parameters(), lr=float(params.train.lr), fused=fused or None)
    size = image_size(params)
    x = torch.rand(int(params.train.batch_size), 1, size, size, device=device)
    precision = str(params.trainer.precision)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    return model, opt, x, dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the optimizer A/B")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, opt, x, dtype = build(args.profile, device, True, args.override)

    def backward():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = model.training_loss(x)
        loss.backward()

    for _ in range(3):
        backward()
        opt.step()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            backward()
            opt.step()
    step_s = (time.perf_counter() - start) / args.steps
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        shares[_kind(event.key)] = shares.get(_kind(event.key), 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    rows = sorted(((k, v / total) for k, v in shares.items()), key=lambda kv: -kv[1])

    plain = torch.optim.Adam(model.parameters(), lr=1e-4) if not isinstance(opt, torch.optim.AdamW) \
        else torch.optim.AdamW(model.parameters(), lr=1e-4)
    timings = {"plain": [], "fused": []}
    backward()
    for _ in range(args.rounds):
        for name, o in (("plain", plain), ("fused", opt)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            o.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - t)
    opt_s = {k: statistics.median(v) for k, v in timings.items()}

    print(f"{args.profile} profile, batch {x.shape[0]}, {x.shape[-1]}x{x.shape[-1]}, "
          f"{str(dtype).replace('torch.', '') if dtype else 'fp32'}, {device}, {args.threads} thread(s): "
          f"{step_s:.3f} s per profiled step (the profiler adds some)")
    print("| kind | share of the step's self time |\n|---|---:|")
    for kind, share in rows:
        print(f"| {kind} | {100 * share:.1f} % |")
    print(f"optimizer update alone: plain {1000 * opt_s['plain']:.1f} ms, fused {1000 * opt_s['fused']:.1f} ms "
          f"({opt_s['plain'] / opt_s['fused']:.1f}x; {100 * (opt_s['plain'] - opt_s['fused']) / step_s:.1f} % "
          "of the step saved)")
    if args.json:
        args.json.write_text(json.dumps({"profile": args.profile, "device": str(device), "threads": args.threads,
                                         "step_s": step_s, "shares": dict(rows), "optimizer_s": opt_s}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
