"""`mhd-uad <command>`: thin wrappers that load params and call the pure functions.

Commands take Hydra-style overrides (`mhd-uad prepare profile=paper`); with none they read params.yaml
as DVC composed it. A bad input ends with one line on stderr naming the file and the problem, and exit
status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mhd_uad import __version__
from mhd_uad.errors import MhdUadError

log = logging.getLogger("mhd_uad")


def _params(args, *checks):
    """Load params and run the command's checks, so a bad value fails before the stage starts work.

    Each command imports its own checks: the modules a stage imports are its DVC deps (tests/test_dvc_deps.py)."""
    from mhd_uad.config import load_params

    params = load_params(args.overrides)
    for check in checks:
        check(params)
    return params


def _data_checks():
    from mhd_uad.data.preprocess import PrepareSettings
    from mhd_uad.data.splits import SplitSettings

    return SplitSettings.from_params, PrepareSettings.from_params


def _free_device(params, devices) -> None:
    """A stage on one device takes a GPU no other mhd-uad process holds (queued DVC experiments side by side)."""
    from mhd_uad.devices import pin_free_device

    pin_free_device(params, devices)


def cmd_demo_data(args) -> None:
    from mhd_uad.data.demo import generate_demo_dataset
    from mhd_uad.io import replace_dir

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise MhdUadError("output folder exists and is not empty (pass --force to replace it)", out)
    with replace_dir(out) as tmp:
        summary = generate_demo_dataset(
            tmp, seed=args.seed, n_healthy=args.n_healthy, n_per_test_set=args.n_per_test_set,
            voxel_size=args.voxel_size, base_t1=args.base_t1, base_tissues=args.base_tissues,
            progress=not args.quiet, workers=args.workers or os.cpu_count() or 1,
        )
    log.info("demo dataset written to %s: %s", out, summary.get("counts", summary))


def cmd_splits(args) -> None:
    from mhd_uad.data.splits import SplitSettings, build_splits_stage

    params = _params(args, SplitSettings.from_params)
    out = Path(params.paths.artifacts) / "splits"
    files = build_splits_stage(params.paths.data, out, SplitSettings.from_params(params))
    log.info("wrote %d split lists to %s", len(files), out)


def cmd_prepare(args) -> None:
    from mhd_uad.data.prepared import build_prepare_stage
    from mhd_uad.data.preprocess import PrepareSettings
    from mhd_uad.data.splits import SplitSettings

    params = _params(args, SplitSettings.from_params, PrepareSettings.from_params)
    artifacts = Path(params.paths.artifacts)
    sets = build_prepare_stage(artifacts / "splits", params.paths.data, artifacts / "prepared",
                               SplitSettings.from_params(params), PrepareSettings.from_params(params))
    log.info("prepared %s under %s", ", ".join(p.name for p in sets), artifacts / "prepared")


def cmd_pretrain(args) -> None:
    from mhd_uad.models.factory import validate_model_params
    from mhd_uad.training import run_pretrain

    params = _params(args, *_data_checks(), validate_model_params)
    _free_device(params, params.trainer.devices)
    out = run_pretrain(params, args.modality)
    log.info("encoder written to %s", out)


def cmd_train(args) -> None:
    from mhd_uad.models.factory import validate_model_params
    from mhd_uad.training import run_train

    params = _params(args, *_data_checks(), validate_model_params)
    _free_device(params, params.trainer.devices)
    out = run_train(params, args.modality, args.fold)
    log.info("cDDPM checkpoint written to %s", out)


def _spread(params, argv: list[str]) -> bool:
    """With `evaluate.devices` > 1 (outside a launch), run this command again as that many processes, one per
    device, each scoring its share (evaluation.sharding; the outputs are one process's); True when done so."""
    import subprocess

    from mhd_uad.devices import relaunch_command, scoring_processes

    processes = scoring_processes(params)
    if processes == 1:
        return False
    log.info("scoring with %d processes (evaluate.devices)", processes)
    done = subprocess.run(relaunch_command(processes, argv), check=False)
    if done.returncode:
        raise MhdUadError(f"{done.returncode} from one of the {processes} scoring processes (their errors above)")
    return True


def cmd_evaluate(args) -> None:
    from mhd_uad.evaluation.evaluate import run_evaluate
    from mhd_uad.models.factory import validate_model_params
    from mhd_uad.models.inference import MhdSettings

    params = _params(args, *_data_checks(), validate_model_params, MhdSettings.from_params)
    if _spread(params, ["evaluate", "--dataset", args.dataset, *args.overrides]):
        return
    _free_device(params, 1)  # one device per process (under torchrun: cuda:<LOCAL_RANK>)
    out = run_evaluate(params, args.dataset)
    log.info("metrics written to %s", out)


def cmd_score_healthy(args) -> None:
    from mhd_uad.evaluation.healthy import run_score_healthy
    from mhd_uad.models.factory import validate_model_params
    from mhd_uad.models.inference import MhdSettings

    params = _params(args, *_data_checks(), validate_model_params, MhdSettings.from_params)
    if _spread(params, ["score-healthy", "--modality", args.modality, "--fold", str(args.fold), *args.overrides]):
        return
    _free_device(params, 1)
    out = run_score_healthy(params, args.modality, args.fold)
    log.info("healthy-scan FPR thresholds written to %s", out)


def cmd_report(args) -> None:
    if args.base is not None:
        from mhd_uad.evaluation.compare import build_report, regressions

        text, result = build_report(args.base, ".", args.format, args.tolerance)
        if args.out:
            from mhd_uad.io import atomic_write_text

            atomic_write_text(args.out, text)
        else:
            sys.stdout.write(text)
        if args.fail_on_regression is not None:
            found = regressions(result, args.fail_on_regression)
            if found:
                raise MhdUadError("AUPRC regressed beyond the tolerance: " + "; ".join(found))
        return
    from mhd_uad.evaluation.report import update_readme, write_report

    params = _params(args)
    recipe = str(params.get("recipe", "base"))
    out = write_report("metrics", list(params.datasets), str(params.profile_name), "reports", recipe)
    log.info("summary written to %s and metrics/summary.json", out)
    if args.readme:
        changed = update_readme(args.readme, out, recipe)
        log.info("%s results block (recipe %s) %s", args.readme, recipe, "updated" if changed else "already current")


def cmd_score(args) -> None:
    from mhd_uad.evaluation.score import score_scan
    from mhd_uad.models.factory import validate_model_params
    from mhd_uad.models.inference import MhdSettings

    if args.raw:
        from mhd_uad.evaluation.score import score_raw_scan
        from mhd_uad.ingest.settings import IngestSettings

        params = _params(args, *_data_checks(), validate_model_params, MhdSettings.from_params,
                         IngestSettings.from_params)
        result = score_raw_scan(params, args.scan, args.out, mask=args.mask, modality=args.modality,
                                template=args.template, checkpoints=args.checkpoint, threshold=args.threshold,
                                out_mask=args.out_mask, out_reconstruction=args.out_reconstruction,
                                force=args.force)
    else:
        if args.mask is None or args.template is not None:
            raise MhdUadError("a scan already in atlas space needs --mask (and takes no --template); "
                              "for a raw scan pass --raw")
        params = _params(args, *_data_checks(), validate_model_params, MhdSettings.from_params)
        result = score_scan(params, args.scan, args.mask, args.out, modality=args.modality,
                            checkpoints=args.checkpoint, threshold=args.threshold, out_mask=args.out_mask,
                            out_reconstruction=args.out_reconstruction, force=args.force)
    log.info("anomaly map written to %s (max %.3g)%s%s", result["map"], result["max_score"],
             f"; lesion mask {result['out_mask']} with {result['lesion_voxels']} voxels" if args.out_mask else "",
             f"; mean reconstruction {result['reconstruction']}" if args.out_reconstruction else "")


def cmd_ingest(args) -> None:
    from mhd_uad.ingest.manifest import read_manifest, scan_folder
    from mhd_uad.ingest.run import run_ingest
    from mhd_uad.ingest.settings import IngestSettings

    params = _params(args, IngestSettings.from_params)
    settings = IngestSettings.from_params(params).with_template(args.template)
    if (args.manifest is None) == (args.input is None):
        raise MhdUadError("name the raw scans: --input DIR with --set and --modality, or --manifest CSV")
    if args.manifest is not None:
        specs = read_manifest(args.manifest)
    elif args.set is None or args.modality is None:
        raise MhdUadError("--input needs --set (e.g. IXI, Brats21) and --modality (t1 or t2)")
    else:
        specs = scan_folder(args.input, args.set, args.modality)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    run_ingest(specs, args.out or params.paths.data, settings, workers=workers, progress=not args.quiet)


def cmd_summary(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from mhd_uad.models.factory import parameter_table, validate_model_params

    params = _params(args, validate_model_params)
    table = Table(title=f"networks of the `{params.profile_name}` profile "
                        f"(slices {params.prepare.grid[0]}×{params.prepare.grid[1]})")
    table.add_column("network")
    table.add_column("parameters", justify="right")
    for name, count in parameter_table(params):
        table.add_row(name, f"{count:,} ({count / 1e6:.2f} M)")
    Console().print(table)


def cmd_plots(args) -> None:
    from mhd_uad.evaluation.plots import render_plots

    out = render_plots(".", args.out, args.base)
    log.info("plots rendered to %s", out)


def cmd_check_lock(args) -> None:
    from mhd_uad.lockcheck import check_lock

    problems = check_lock(".")
    if problems:
        raise MhdUadError("dvc.lock is stale (re-run `dvc repro` and commit dvc.lock with the metrics):\n  "
                          + "\n  ".join(problems))
    log.info("dvc.lock matches params, code and the git-tracked outputs")


def cmd_params(args) -> None:
    from mhd_uad.config import PARAMS_FILE, composed_yaml
    from mhd_uad.io import atomic_write_text

    atomic_write_text(PARAMS_FILE, composed_yaml(args.overrides))
    log.info("composed conf/ into %s", PARAMS_FILE)


def cmd_demo_recipe(args) -> None:
    from mhd_uad import recipe

    chosen = recipe.choose(args.recipe)
    in_force = recipe.switch(chosen) if args.apply else chosen
    print(in_force)


def _add_score_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("scan", help="the scan (NIfTI)")
    p.add_argument("--mask", default=None, help="its brain mask (NIfTI, same grid; optional with --raw: HD-BET)")
    p.add_argument("--raw", action="store_true",
                   help="SCAN is raw (any orientation and voxel size, with skull): ingest it like the training data "
                        "first; the map is written in the raw scan's own grid and affine")
    p.add_argument("--template", default=None, help="with --raw: register to this template (default ingest.template)")
    p.add_argument("--out", required=True, help="output map (NIfTI, in the scan's grid and affine)")
    p.add_argument("--modality", choices=["t1", "t2"], default=None)
    p.add_argument("--checkpoint", action="append", default=None,
                   help="cDDPM checkpoint(s) to use (default: the repository's folds for the modality)")
    p.add_argument("--threshold", type=float, default=None, help="write voxels with map > T as a lesion mask")
    p.add_argument("--out-mask", default=None, help="output lesion mask (NIfTI, uint8)")
    p.add_argument("--out-reconstruction", default=None, metavar="FILE",
                   help="also write the mean of the N reconstructions (NIfTI, float32) in the same grid and affine "
                        "as --out (the raw scan's with --raw), 0 outside the brain mask and the field of view; "
                        "intensities on the model's [0, 1] scale, not the scan's")
    p.add_argument("--force", action="store_true",
                   help="score even a scan that does not look like the training scans (voxel order and size, "
                        "brain position and field of view on the model grid, skull, intensities inside the "
                        "brain: checked against the prepared IXI set before scoring; refused otherwise)")
    p.set_defaults(func=cmd_score)


def _add_ingest_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", default=None, metavar="DIR",
                   help="folder of raw scans: NAME.nii[.gz] with optional NAME_mask / NAME_seg beside them")
    p.add_argument("--set", default=None, help="with --input: IXI (-> Train/ixi) or a test set (-> Test/<set>)")
    p.add_argument("--modality", default=None, choices=["t1", "t2"], help="with --input: the scans' modality")
    p.add_argument("--manifest", default=None, metavar="CSV",
                   help="CSV of scans: set, modality, image[, name, mask, seg] (paths relative to the CSV)")
    p.add_argument("--out", default=None, help="the layout's root (default: paths.data)")
    p.add_argument("--template", default=None, help="template NIfTI (default ingest.template: the bundled SRI24)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)


def _add_model_stage_parsers(sub, with_overrides) -> None:
    """The stages of one modality (and fold): pretrain, train, score-healthy."""
    for name, helptext, func in (
            ("pretrain", "stage: SparK-pretrain the encoder -> models/<M>/encoder.pt", cmd_pretrain),
            ("train", "stage: train the cDDPM -> models/<M>/fold<K>/cddpm.ckpt", cmd_train),
            ("score-healthy", "stage: score the fold's healthy IXI val scans -> each scorer's thresholds at "
                              "1/5/10 %% voxel FPR in artifacts/healthy/<M>/fold<K>/thresholds.json",
             cmd_score_healthy)):
        p = with_overrides(sub.add_parser(name, help=helptext))
        p.add_argument("--modality", required=True, choices=["t1", "t2"])
        if name != "pretrain":
            p.add_argument("--fold", required=True, type=int)
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhd-uad", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mhd-uad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_overrides(p):
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="Hydra-style overrides of conf/ (none: read params.yaml)")
        return p

    p = sub.add_parser("demo-data", help="write the realistic offline demo dataset")
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-healthy", type=int, default=40, help="healthy IXI stand-ins with T1 and T2 (default 40)")
    p.add_argument("--n-per-test-set", type=int, default=12, help="scans per test set (default 12)")
    p.add_argument("--voxel-size", type=float, default=2.0, help="isotropic voxel size in mm (default 2)")
    p.add_argument("--base-t1", default=None, help="another template T1 (NIfTI) as anatomy")
    p.add_argument("--base-tissues", nargs=3, default=None, metavar=("GM", "WM", "CSF"),
                   help="tissue probability maps matching --base-t1")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: one per CPU; the output does not depend on it)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo_data)

    with_overrides(sub.add_parser("splits", help="stage: split lists under artifacts/splits")).set_defaults(
        func=cmd_splits)
    with_overrides(sub.add_parser("prepare", help="stage: preprocessed arrays under artifacts/prepared")
                   ).set_defaults(func=cmd_prepare)
    _add_model_stage_parsers(sub, with_overrides)
    p = with_overrides(sub.add_parser("evaluate", help="stage: score a test set with every fold -> metrics/<set>.json"))
    p.add_argument("--dataset", required=True)
    p.set_defaults(func=cmd_evaluate)
    p = with_overrides(sub.add_parser(
        "report", help="stage: metrics/summary.json and reports/summary.md; with --base: metric deltas against REV"))
    p.add_argument("--readme", default=None, help="also rewrite this README's results block")
    p.add_argument("--base", default=None, metavar="REV", help="compare metrics/*.json at git REV with the workspace")
    p.add_argument("--format", choices=["md", "json"], default="md")
    p.add_argument("--tolerance", type=float, default=0.005, help="AUPRC change marked ▲/▼ (default 0.005)")
    p.add_argument("--fail-on-regression", type=float, default=None, metavar="TOL",
                   help="exit non-zero when an AUPRC drops by more than TOL")
    p.add_argument("--out", default=None, help="write the comparison here instead of stdout")
    p.set_defaults(func=cmd_report)
    _add_score_parser(with_overrides(sub.add_parser(
        "score", help="anomaly map of a new skull-stripped, atlas-space scan (or, with --raw, of a scan as the "
                      "scanner wrote it)")))
    _add_ingest_parser(with_overrides(sub.add_parser(
        "ingest", help="raw scans -> the data layout (reorient, resample, skull strip, register, crop, N4)")))
    with_overrides(sub.add_parser("summary", help="print each network of the profile with its parameter count")
                   ).set_defaults(func=cmd_summary)
    p = sub.add_parser("plots", help="render plots/ (loss and PR curves) to PNG offline, optionally against a REV")
    p.add_argument("--base", default=None, metavar="REV", help="overlay the plots of this git revision, dashed")
    p.add_argument("--out", default="reports/plots", help="output folder (default reports/plots)")
    p.set_defaults(func=cmd_plots)
    sub.add_parser("check-lock", help="fail when dvc.lock is stale for params, code or metrics (no data needed)"
                   ).set_defaults(func=cmd_check_lock)
    with_overrides(sub.add_parser("params", help="compose conf/ (with overrides) into params.yaml")
                   ).set_defaults(func=cmd_params)
    p = sub.add_parser("demo-recipe", help="print the demo recipe for this machine (gpu beside a CUDA device, "
                       "else base); with --apply, recompose an untouched demo params.yaml for it")
    p.add_argument("--recipe", default="auto", help="auto (default), base or gpu (conf/recipe/)")
    p.add_argument("--apply", action="store_true", help="recompose params.yaml for the recipe (what make demo does)")
    p.set_defaults(func=cmd_demo_recipe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options that take values (`score SCAN --out X key=value ~deleted.key`)
    if extra and hasattr(args, "overrides") and all(("=" in e or e.startswith("~")) and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from mhd_uad.devices import is_main_process

    quiet = not is_main_process()  # the other ranks of a distributed run: warnings and errors only
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except MhdUadError as exc:
        print(f"mhd-uad {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mhd-uad {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
