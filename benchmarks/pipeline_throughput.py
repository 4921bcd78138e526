"""Throughput of the real stages of a profile: the training input, the `train` stage, the `evaluate` stage.

On whatever device it finds (the first CUDA GPU, else the CPU), each part against a reference measured in
the same run:

- input: the training input alone: the profile's loader (`IXISliceDataModule`, its workers, pinned memory
  on CUDA) and the slice draws and augmentations on the device (`SliceDrawer`), no model step; slices/s,
  with ms per volume for loading and for each augmentation alone (p = 1), against torchio's transforms on
  the same volume (the original's path: in a loader worker, one CPU core, one volume at a time);
- train: the `train` stage itself (`training.run_train`: Lightning, the loaders, validation each
  `train.val_every_n_epochs`, checkpoints, MLflow) on a fold of the real IXI size (385 training and 44
  validation volumes: the demo scans prepared on the profile's grid, listed as often as needed), slices/s
  over the steps after a warm-up, against the model-only step (`train_throughput.measure`, the same
  precision and compile setting) in the same run;
- eval: the `evaluate` stage itself (`evaluation.evaluate.run_evaluate`: every scorer, the profile's N,
  thresholds, metrics, maps written in source space, gallery) with a freshly initialised cDDPM on one fold,
  scans/s end to end, against `reconstruct_scan` alone on the same scans.

    python benchmarks/pipeline_throughput.py --profile demo                    # all parts, minutes on a CPU
    python benchmarks/pipeline_throughput.py --profile paper --parts input     # a CPU: the rest takes hours
    python benchmarks/pipeline_throughput.py --profile paper --json out.json --report reports/gpu   # a GPU

The data are made once per run in a temporary folder (`mhd-uad demo-data` at the profile's voxel size,
`splits`, `prepare`); `--keep DIR` keeps them there for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars (read when tqdm is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import device_name  # noqa: E402
from machine import synchronize as sync  # noqa: E402
from mhd_uad.devices import usable_cpus  # noqa: E402
from mhd_uad.io import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("input", "train", "eval")
IXI_TRAIN, IXI_VAL = 385, 44  # volumes of one published IXI fold (method.md §2.1)
AUGMENTATIONS = ("gamma", "bias_field", "blur", "ghosting")


# ---- data ----------------------------------------------------------------------------------------------

def project_params(profile: str, overrides: list[str], root: Path, *extra: str):
    """The profile with the user's overrides, on one fold, reading and writing under root."""
    from mhd_uad.config import compose

    return compose([f"profile={profile}", *overrides, "splits.num_folds=1", "train.folds=[0]",
                    f"paths.data={root / 'data'}", f"paths.artifacts={root / 'artifacts'}", *extra], REPO)


def make_project(root: Path, profile: str, overrides: list[str], n_healthy: int, n_test: int) -> dict:
    """Demo scans at the profile's voxel size through `splits` and `prepare` into root; the fold-0 IXI lists
    rewritten to the real fold's size by listing the scans as often as needed. Returns the composed params."""
    from mhd_uad.cli import main as cli
    from mhd_uad.data.prepared import build_prepare_stage
    from mhd_uad.data.preprocess import PrepareSettings
    from mhd_uad.data.splits import SplitSettings, build_splits_stage

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "conf").exists():
        (root / "conf").symlink_to(REPO / "conf")
    params = project_params(profile, overrides, root)
    if not (root / "data").is_dir():
        code = cli(["demo-data", "--out", str(root / "data"), "--seed", "5", "--n-healthy", str(n_healthy),
                    "--n-per-test-set", str(n_test), "--quiet"])
        if code:
            raise SystemExit(f"demo-data failed ({code})")
    artifacts = root / "artifacts"
    if not (artifacts / "prepared").is_dir():
        settings = SplitSettings.from_params(params)
        build_splits_stage(root / "data", artifacts / "splits", settings)
        build_prepare_stage(artifacts / "splits", root / "data", artifacts / "prepared", settings,
                            PrepareSettings.from_params(params))
        import pandas as pd

        for part, size in (("train", IXI_TRAIN), ("val", IXI_VAL)):
            csv = artifacts / "splits" / f"IXI_{part}_fold0.csv"
            frame = pd.read_csv(csv, index_col=0)
            rows = frame.iloc[np.arange(size) % len(frame)].reset_index(drop=True)
            rows.to_csv(csv)
    return params


# ---- input ---------------------------------------------------------------------------------------------

def measure_input(params, root: Path, modality: str, device: torch.device, seconds: float) -> dict:
    """Slices/s of the training input alone, and ms per volume of loading and of each augmentation."""
    from mhd_uad.data.augment import AugmentSettings, augment_slices, sample_params
    from mhd_uad.data.datamodule import IXISliceDataModule, loader_workers

    artifacts = root / "artifacts"
    augment = AugmentSettings.from_params(params)
    dm = IXISliceDataModule(artifacts / "prepared", artifacts / "splits", root / "data", modality, 0,
                            int(params.train.batch_size), int(params.data.slices_per_volume),
                            params.data.num_workers, augment, seed=int(params.seed))
    dm.setup()
    loader = dm.train_dataloader()
    batches = slices = 0
    started = None
    while started is None or time.perf_counter() - started < seconds:
        for batch in loader:
            batch = dm.on_before_batch_transfer(batch, 0)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = dm.on_after_batch_transfer(batch, 0)
            if started is None:  # the clock starts after the first batch (workers started, memory mapped)
                sync(device)
                started = time.perf_counter()
                continue
            batches, slices = batches + 1, slices + out["image"].shape[0]
            if time.perf_counter() - started >= seconds:
                break
    sync(device)
    elapsed = time.perf_counter() - started
    result = {"input_slices_per_s": slices / elapsed, "input_batches": batches,
              "input_workers": loader_workers(params.data.num_workers, device.type == "cuda"),
              "batch_size": int(params.train.batch_size), "slices_per_volume": int(params.data.slices_per_volume)}

    # ms per volume: loading (one worker's read), each augmentation alone on a batch of volumes on the device,
    # and torchio's transform of one volume on the CPU (the original's path) for the same augmentation
    ds, n = dm.train_set, int(params.train.batch_size) // int(params.data.slices_per_volume)
    t = time.perf_counter()
    volumes = torch.stack([ds[i % len(ds)]["scan"] for i in range(n)])
    result["load_ms_per_volume"] = 1e3 * (time.perf_counter() - t) / n
    volumes = volumes.to(device)
    index = torch.randint(0, volumes.shape[1], (n, int(params.data.slices_per_volume)), device=device)
    per_op, torchio_ms = {}, {}
    for op in (*AUGMENTATIONS, "profile"):
        probs = {f"{a}_p": float(a == op) for a in AUGMENTATIONS} if op != "profile" else augment.__dict__
        settings = AugmentSettings(**probs)
        times = []
        for rep in range(4):
            p = sample_params(settings, n).to(device)
            sync(device)
            t = time.perf_counter()
            augment_slices(volumes, index, p, ds.spacing_mm)
            sync(device)
            if rep:  # the first is a warm-up
                times.append(time.perf_counter() - t)
        per_op[op] = 1e3 * statistics.median(times) / n
        if op != "profile":
            torchio_ms[op] = _torchio_ms(settings, volumes[0].cpu(), ds.spacing_mm)
    result["augment_ms_per_volume"] = per_op
    result["torchio_ms_per_volume"] = torchio_ms
    return result


def _torchio_ms(settings, volume: torch.Tensor, spacing: float, reps: int = 3) -> float:
    """ms of torchio's transform (the original's augmentation) on one volume, one CPU thread."""
    import warnings

    import torchio as tio

    transform = settings.transform()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's share
    try:
        times = []
        for _ in range(reps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = tio.ScalarImage(tensor=volume[None].clone(), affine=np.diag([spacing] * 3 + [1.0]))
                t = time.perf_counter()
                transform(image)
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * statistics.median(times)


# ---- train ---------------------------------------------------------------------------------------------

def steps_per_epoch(params) -> int:
    """Training steps in an epoch of the real IXI fold: full batches of volumes (the loader drops the rest)."""
    return IXI_TRAIN // (int(params.train.batch_size) // int(params.data.slices_per_volume))


class StepClock:
    """Wall-clock time from the end of step `warmup` to the end of the fit, and the steps in it; and, over
    the epochs that start in that window, where the time between the steps goes: the wait for an epoch's
    first training batch (the loader starting over), and the validation (its wait for the first val
    batch apart). Each of these is timed between device syncs at its ends: the device has nothing queued
    there anyway (the epoch's last step and the val loss are read before them)."""

    def __init__(self, warmup: int):
        import lightning.pytorch as pl

        clock = self

        class Callback(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step == warmup:
                    sync(module.device)
                    clock.start = time.perf_counter()

            def on_train_epoch_start(self, trainer, module):
                clock._mark("epoch", trainer, module)

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == 0:
                    clock._span("train_loader_wait", "epoch", module)

            def on_validation_start(self, trainer, module):
                clock._mark("val", trainer, module)

            def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
                if batch_idx == 0:
                    clock._span("val_loader_wait", "val", module, keep=True)

            def on_validation_end(self, trainer, module):
                clock._span("validation", "val", module)

            def on_train_end(self, trainer, module):
                sync(module.device)
                clock.stop, clock.steps = time.perf_counter(), trainer.global_step - warmup

        self.callback = Callback()
        self.start = self.stop = None
        self.steps = 0
        self.marks: dict[str, float] = {}
        self.spans: dict[str, list[float]] = {"train_loader_wait": [], "val_loader_wait": [], "validation": []}

    def _mark(self, name: str, trainer, module) -> None:
        if self.start is not None and not trainer.sanity_checking:  # in the timed window
            sync(module.device)
            self.marks[name] = time.perf_counter()

    def _span(self, what: str, mark: str, module, keep: bool = False) -> None:
        started = self.marks.get(mark) if keep else self.marks.pop(mark, None)
        if started is not None:
            sync(module.device)
            self.spans[what].append(time.perf_counter() - started)

    def per_epoch_ms(self) -> dict[str, float]:
        """Median ms of each span (over the epochs that had one)."""
        return {k: 1e3 * statistics.median(v) for k, v in self.spans.items() if v}


def measure_train(params, overrides: list[str], root: Path, modality: str, device: torch.device, warmup: int,
                  steps: int) -> dict:
    """Slices/s of the train stage over `steps` steps after `warmup` (at least an epoch, validated at its end
    as the paper profile validates every epoch), and of the model-only step."""
    from mhd_uad.config import auto_switch
    from mhd_uad.training import run_pretrain, run_train
    from train_throughput import measure

    batch = int(params.train.batch_size)
    epoch_steps = steps_per_epoch(params)
    steps = max(steps, epoch_steps)
    stage_params = project_params(str(params.profile_name), overrides, root, f"train.modalities=[{modality}]",
                                  "pretrain.enabled=false", f"train.max_steps={warmup + steps}",
                                  "train.val_every_n_epochs=1")

    compiled = auto_switch(params.train.get("compile", False), "train.compile")
    compiled = device.type == "cuda" if compiled is None else compiled
    precision = {"16-mixed": "fp16" if device.type == "cuda" else "bf16", "bf16-mixed": "bf16"}.get(
        str(params.trainer.precision), "fp32")
    model = measure(str(params.profile_name), precision, batch, steps=max(10, min(steps, 30)),
                    warmup=5 if compiled else 3, device=device, compile_model=compiled)  # first: a quiet process
    run_pretrain(stage_params, modality, root)  # pretrain.enabled false: records an untrained encoder
    clock = StepClock(warmup)
    t = time.perf_counter()
    run_train(stage_params, modality, 0, root, callbacks=[clock.callback])
    total = time.perf_counter() - t
    stage = clock.steps * batch / (clock.stop - clock.start)
    return {"train_slices_per_s": stage, "model_only_slices_per_s": model["slices_per_s"],
            "train_over_model_only": stage / model["slices_per_s"], "train_steps_timed": clock.steps,
            "train_epoch_ms": {"steps": 1e3 * epoch_steps * batch / model["slices_per_s"], "steps_per_epoch": epoch_steps,
                               **clock.per_epoch_ms()},
            "train_warmup_steps": warmup, "train_stage_seconds": total, "train_compiled": compiled,
            "train_precision": precision}


# ---- eval ----------------------------------------------------------------------------------------------

def measure_eval(params, overrides: list[str], root: Path, dataset: str, device: torch.device) -> dict:
    """Scans/s of the evaluate stage (one fold, a fresh model) and of reconstruct_scan alone on its scans."""
    from mhd_uad.config import to_plain
    from mhd_uad.evaluation.evaluate import EvaluationSet, run_evaluate
    from mhd_uad.evaluation.healthy import FPR_LEVELS, thresholds_path, write_thresholds
    from mhd_uad.evaluation.overlap import evaluation_workers
    from mhd_uad.models.checkpoint import CDDPM_FORMAT, cddpm_path, save_checkpoint
    from mhd_uad.models.factory import build_cddpm, model_spec
    from mhd_uad.models.inference import MhdSettings, maps_on_device, reconstruct_scan

    ev_params = project_params(str(params.profile_name), overrides, root,
                               *[f"~datasets.{d}" for d in params.datasets if d != dataset])
    modality = str(ev_params.datasets[dataset].modality)
    torch.manual_seed(0)
    model = build_cddpm(ev_params)
    save_checkpoint(cddpm_path(root, modality, 0), CDDPM_FORMAT, {"modality": modality, "fold": 0,
                                                                    "spec": model_spec(ev_params)},
                    model.state_dict())
    scorers = list(ev_params.evaluate.scorers)
    write_thresholds(thresholds_path(root, modality, 0),
                     {"modality": modality, "fold": 0, "n_scans": 1, "n_voxels": 1, "scans": ["-"],
                      "fpr": dict(FPR_LEVELS), "thresholds": {s: dict.fromkeys(FPR_LEVELS, 0.5) for s in scorers}})
    ev = EvaluationSet.open(ev_params, dataset)
    scans = len(ev.val_pos) + len(ev.test_pos)
    settings = MhdSettings.from_params(ev_params)
    run_evaluate(ev_params, dataset, root)  # warm-up: kernels, cuDNN's choices, caches
    where = {}
    for maps_on in ("cpu", "device"):  # evaluate.maps_on: both measured, the profile's auto is one of them
        variant = project_params(str(params.profile_name), overrides, root, f"evaluate.maps_on={maps_on}",
                                 *[f"~datasets.{d}" for d in params.datasets if d != dataset])
        sync(device)
        t = time.perf_counter()
        run_evaluate(variant, dataset, root)
        sync(device)
        where[maps_on] = scans / (time.perf_counter() - t)
    auto = "device" if maps_on_device(settings, device) else "cpu"
    stage = where[auto]
    model = model.to(device).eval()
    ensemble = "cddpm" in settings.scorers
    images = [np.asarray(ev.prepared.images[p]) for p in (*ev.val_pos, *ev.test_pos)]
    reconstruct_scan(model, images[0], settings, "warm-up", device, ensemble)
    sync(device)
    t = time.perf_counter()
    for i, image in enumerate(images):
        reconstruct_scan(model, image, settings, f"scan{i}", device, ensemble)
    sync(device)
    alone = scans / (time.perf_counter() - t)
    return {"eval_scans_per_s": stage, "reconstruct_only_scans_per_s": alone, "eval_over_reconstruct_only":
            stage / alone, "eval_maps_on": auto, "eval_scans_per_s_maps_on_cpu": where["cpu"],
            "eval_scans_per_s_maps_on_device": where["device"], "eval_scans": scans, "eval_dataset": dataset, "num_reconstructions":
            settings.num_reconstructions, "scorers": list(settings.scorers),
            "eval_workers": evaluation_workers(ev_params.evaluate.get("workers", "auto"), device),
            "mhd": {k: v for k, v in to_plain(ev_params.mhd).items() if k in ("precision", "max_batch",
                                                                               "channels_last")}}


# ---- report --------------------------------------------------------------------------------------------

def report_markdown(r: dict) -> str:
    lines = [f"# Pipeline throughput ({r['profile']} profile)", "",
             f"{r['device']}, torch {r['torch']}, {r['cpu_count']} CPUs; grid {r['grid']}; "
             f"`python benchmarks/pipeline_throughput.py --profile {r['profile']} --parts {','.join(r['parts'])}`.",
             "", "| part | measured | reference in the same run | ratio |", "|---|---:|---:|---:|"]
    if "input_slices_per_s" in r:
        workers = f"{r['input_workers']} worker" + ("s" if r["input_workers"] != 1 else "")
        lines.append(f"| training input (loader with {workers}, then slices and augmentation on the device) | "
                     f"{r['input_slices_per_s']:.1f} slices/s | | |")
    if "train_slices_per_s" in r:
        lines.append(f"| `train` stage ({r['train_precision']}{', compiled' if r['train_compiled'] else ''}, "
                     f"batch {r['batch_size']}) | {r['train_slices_per_s']:.1f} slices/s | model-only step "
                     f"{r['model_only_slices_per_s']:.1f} slices/s | {r['train_over_model_only']:.2f}× |")
    if "eval_scans_per_s" in r:
        lines.append(f"| `evaluate` stage ({len(r['scorers'])} scorers, N = {r['num_reconstructions']}, "
                     f"{r['eval_workers']} CPU workers, maps on the {r.get('eval_maps_on', 'cpu')}) | "
                     f"{r['eval_scans_per_s']:.2f} scans/s | reconstructions alone "
                     f"{r['reconstruct_only_scans_per_s']:.2f} scans/s | {r['eval_over_reconstruct_only']:.2f}× |")
        if "eval_scans_per_s_maps_on_cpu" in r:
            cpu, dev = r["eval_scans_per_s_maps_on_cpu"], r["eval_scans_per_s_maps_on_device"]
            lines.append(f"| `evaluate` stage, maps on the device (`evaluate.maps_on=device`) | {dev:.2f} scans/s | "
                         f"maps on the CPU {cpu:.2f} scans/s | {dev / cpu:.2f}× |")
    if r.get("train_epoch_ms"):
        e = r["train_epoch_ms"]
        spans = [("the wait for the epoch's first training batch", "train_loader_wait"),
                 ("validation", "validation"), ("of which the wait for the first val batch", "val_loader_wait")]
        lines += ["", f"An epoch of the `train` stage beside its steps (ms, median over the timed epochs; the "
                  f"{e['steps_per_epoch']} model-only steps of an epoch take {e['steps']:.0f} ms):", "",
                  "| between the steps | ms per epoch | share of the steps' time |", "|---|---:|---:|"]
        lines += [f"| {label} | {e[k]:.1f} | {100 * e[k] / e['steps']:.1f} % |" for label, k in spans if k in e]
    if "augment_ms_per_volume" in r:
        lines += ["", "Per volume (ms): loading, and each augmentation alone on the device against torchio's "
                  "transform on one CPU core (the original's path).", "",
                  "| step | here | torchio | speed-up |", "|---|---:|---:|---:|",
                  f"| load | {r['load_ms_per_volume']:.2f} | | |"]
        for op in AUGMENTATIONS:
            here, ref = r["augment_ms_per_volume"][op], r["torchio_ms_per_volume"][op]
            lines.append(f"| {op} | {here:.3f} | {ref:.1f} | {ref / here:.0f}× |")
        lines.append(f"| the profile's mix (p as configured) | {r['augment_ms_per_volume']['profile']:.3f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mhd_uad.config import compose

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo", choices=("demo", "paper"))
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: input,train,eval")
    parser.add_argument("--modality", default="t2")
    parser.add_argument("--dataset", default="MSLUB", help="the test set the eval part scores")
    parser.add_argument("--input-seconds", type=float, default=8.0)
    parser.add_argument("--train-warmup", type=int, default=24, help="steps before the clock starts")
    parser.add_argument("--train-steps", type=int, default=48, help="steps timed")
    parser.add_argument("--n-healthy", type=int, default=30)
    parser.add_argument("--n-per-test-set", type=int, default=12)
    parser.add_argument("--keep", default=None, help="folder for the data (kept and reused)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None, help="folder for pipeline_throughput_<profile>.md and .json")
    parser.add_argument("--readme", default=None, help="put the report into this README's block for the profile")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.num_workers=4")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts takes some of {','.join(PARTS)}, got {args.parts!r}")
    params = compose([f"profile={args.profile}", *args.overrides], REPO)
    if args.dataset not in params.datasets:
        parser.error(f"--dataset must be one of {sorted(params.datasets)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpus = usable_cpus()
    x, y, z = (int(v) for v in params.prepare.grid)
    result = {"profile": args.profile, "parts": parts, "device": device_name(device, threads=True), "cpu_count": cpus,
              "torch": torch.__version__, "grid": f"{x}×{y}×{z}", "batch_size": int(params.train.batch_size)}
    keep = Path(args.keep).resolve() if args.keep else None
    root = keep or Path(tempfile.mkdtemp(prefix="pipeline-throughput-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(root / 'mlflow.db').resolve()}")
    cwd = os.getcwd()
    try:
        params = make_project(root, args.profile, args.overrides, args.n_healthy, args.n_per_test_set)
        os.chdir(root)  # MLflow's artifacts, Lightning's folders: all under root
        for part in parts:
            t = time.perf_counter()
            print(f"{part} ...", file=sys.stderr, flush=True)
            if part == "input":
                result.update(measure_input(params, root, args.modality, device, args.input_seconds))
            elif part == "train":
                result.update(measure_train(params, args.overrides, root, args.modality, device, args.train_warmup,
                                           args.train_steps))
            else:
                result.update(measure_eval(params, args.overrides, root, args.dataset, device))
            result[f"{part}_part_seconds"] = time.perf_counter() - t
            write(result, args)  # after each part: a run cut short keeps what it measured
    finally:
        os.chdir(cwd)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    text = write(result, args)
    print(text)
    if args.readme:
        from mhd_uad.evaluation.report import replace_readme_block

        start, end = readme_markers(args.profile)
        replace_readme_block(args.readme, start, end, "\n".join(text.strip().splitlines()[2:]))  # no title
    return 0


def readme_markers(profile: str) -> tuple[str, str]:
    return (f"<!-- pipeline-throughput-{profile}:start (written by `benchmarks/pipeline_throughput.py --profile "
            f"{profile} --readme README.md`; do not edit) -->", f"<!-- pipeline-throughput-{profile}:end -->")


def write(result: dict, args) -> str:
    """The report as markdown; also written to --json and --report when given."""
    text = report_markdown(result)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.report:
        folder = Path(args.report)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"pipeline_throughput_{args.profile}.md", text)
        atomic_write_text(folder / f"pipeline_throughput_{args.profile}.json", json.dumps(result, indent=2) + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
