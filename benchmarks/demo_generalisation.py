"""Generalisation of the demo-trained models to an anatomy they never saw: the held-out OASIS-30 base.

The demo data are warped from two real base anatomies (MNI152, SRI24); a third, OASIS-30, is held out of them
entirely. From it, at 1 mm (the resolution of real data) and without the training warps, this renders a
stroke case (ATLAS_v2 recipe) and a tumour case (Brats21 recipe), each in T1 and T2, and for each its healthy
twin: the same subject with `lesion=False`, sharing every random draw except the lesion. The case index is
picked deterministically for a lesion of typical size: the first index (0, 1, ...) whose stroke is 3-40 mL,
and the first whose tumour is 20-150 mL. Both twins are cropped to the lesioned scan's brain box (widened to
the union of both masks should the healthy one stick out), so they share one grid.

The twins are not identical outside the lesion: a tumour's mass effect and a territorial stroke's ex-vacuo
dilation of the ipsilateral ventricle move tissue, and the acquisition scales each scan by its own brain p99
(and sets the noise from its own WM level), so intensities elsewhere differ by a global factor of up to a few
percent, which the model's preprocessing (percentile normalisation) removes again.

Every scan is scored with the repository's CLI exactly as a user would, `mhd-uad score SCAN --mask MASK
--modality t1|t2 --out MAP.nii.gz` (params.yaml of the repository, its models or `--checkpoint-dir`), and per
case and contrast it reports:

- AUROC of the lesioned scan's map over its brain voxels inside the field of view the model scores, label
  seg > 0 (target >= 0.9). The profile's centred crop (192 x 192 x 96 mm for the demo, the original's
  192 x 192 x 100 mm for the paper) leaves the top and bottom of a 1 mm brain unscored, with a map of 0 there;
  the evaluate stage's metrics, like the original's, cover only the crop, and so does this target;
- ratio: mean map inside the lesion in the lesioned scan / mean map at the same voxels in the healthy twin's
  map, both inside the field of view (target >= 2);
- AP (average precision, %) over the same voxels, the whole-brain AUROC (voxels outside the view at 0) and
  the share of the lesion inside the view, for information;
- how well the models keep contrast, on the healthy twin: the mean of its N reconstructions (which `score
  --out-reconstruction` writes while scoring it) minus the scan, on the model's grid and [0, 1] scale, over
  the brain voxels the scan has bright (>= 0.9) and dark (< 0.3).
  A model that keeps contrast has both near 0; one that pulls it toward the mean has the bright negative
  and the dark positive, and its map is then highest over the brightest tissue in any scan.

    python benchmarks/demo_generalisation.py [--seed 0] [--out-dir reports] [--work DIR]
        [--checkpoint-dir models] [--override KEY=VALUE ...] [--check]

Writes reports/demo_generalisation.json and .md and prints the table. Exit 0 after writing even when a target
fails (the failing rows are flagged); with --check, exit 1 when any target fails. On two CPU cores a run takes
about 3 minutes: some 30 s to load the base and render both pairs at 1 mm, the rest in the 8 `score` calls
(each about 8 s to start the process and 10 s for the MHD of the demo profile).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhd_uad.errors import MhdUadError
from mhd_uad.evaluation.report import readme_block_from

REPO = Path(__file__).resolve().parents[1]
CONTRASTS = ("t1", "t2")
# case -> (demo recipe, lesion volume range in mL for a typical case)
CASES = {"stroke": ("ATLAS_v2", (3.0, 40.0)), "tumour": ("Brats21", (20.0, 150.0))}
TARGETS = {"auroc": 0.9, "ratio": 2.0}
MIN_LESION_CONTRAST = 0.05  # below this mean |lesion − twin| ([0, 1] scale) the table shows no restored share
MAX_TRIES = 20
TRAIN_FIRST = "train the demo models first (make demo)"


@dataclass
class CasePair:
    """A lesioned scan and its healthy twin on one shared grid (the crop box and its affine)."""

    case: str
    dataset: str
    index: int
    lesioned: object  # SyntheticScan
    healthy: object  # SyntheticScan
    box: tuple
    affine: np.ndarray
    lesion_ml: float


def file_md5(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_checkpoints(checkpoint_dir: Path, shown: str | None = None) -> dict[str, list[Path]]:
    """The cDDPM checkpoints `<dir>/<modality>/fold*/cddpm.ckpt` of each contrast; none -> MhdUadError."""
    found = {}
    for modality in CONTRASTS:
        found[modality] = sorted(Path(checkpoint_dir).glob(f"{modality}/fold*/cddpm.ckpt"))
        if not found[modality]:
            raise MhdUadError(
                f"no trained {modality.upper()} model ({modality}/fold*/cddpm.ckpt) under "
                f"{shown or checkpoint_dir}: {TRAIN_FIRST}"
            )
    return found


def pick_case(base, dataset: str, seed: int, volume_ml: tuple[float, float], max_tries: int = MAX_TRIES):
    """The first index whose lesioned scan (no warp) has a lesion volume within `volume_ml`: (index, scan, mL)."""
    from mhd_uad.data.demo.acquisition import simulate_subject

    voxel_ml = base.voxel_size**3 / 1000.0
    tried = []
    for index in range(max_tries):
        scan = simulate_subject(base, dataset, index, seed, contrasts=CONTRASTS, warp=False)
        ml = float((scan.seg > 0).sum()) * voxel_ml
        if volume_ml[0] <= ml <= volume_ml[1]:
            return index, scan, ml
        tried.append(round(ml, 2))
    raise MhdUadError(
        f"no {dataset} case of {volume_ml[0]:g}-{volume_ml[1]:g} mL among indices 0-{max_tries - 1} "
        f"(seed {seed}; volumes {tried} mL)"
    )


def shared_box(lesioned, healthy, base) -> tuple[tuple, np.ndarray]:
    """The lesioned scan's crop box and affine, widened to the union of both masks if the healthy one sticks out."""
    from mhd_uad.data.demo.writer import crop_to_mask

    box, affine = crop_to_mask(lesioned, base)
    if int(healthy.mask[box].sum()) == int(healthy.mask.sum()):
        return box, affine
    idx = np.argwhere((lesioned.mask > 0) | (healthy.mask > 0))
    lo, hi = idx.min(0), idx.max(0) + 1
    affine = affine.copy()
    affine[:3, 3] = base.origin_mm + lo * base.voxel_size
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), affine


def render_pair(base, case: str, seed: int, max_tries: int = MAX_TRIES) -> CasePair:
    """The case's typical-size lesioned scan and its healthy twin (same index and seed, lesion=False)."""
    from mhd_uad.data.demo.acquisition import simulate_subject

    dataset, volume_ml = CASES[case]
    index, lesioned, ml = pick_case(base, dataset, seed, volume_ml, max_tries)
    healthy = simulate_subject(base, dataset, index, seed, contrasts=CONTRASTS, warp=False, lesion=False)
    box, affine = shared_box(lesioned, healthy, base)
    return CasePair(case, dataset, index, lesioned, healthy, box, affine, ml)


def write_pair(pair: CasePair, folder: Path) -> dict[str, dict[str, Path]]:
    """NIfTIs of both twins: {twin: {t1, t2, mask[, seg]: path}} under folder/<case>/."""
    from mhd_uad.io import save_nifti

    files: dict[str, dict[str, Path]] = {}
    for twin, scan in (("lesioned", pair.lesioned), ("healthy", pair.healthy)):
        out = folder / pair.case
        files[twin] = {c: out / f"{twin}_{c}.nii.gz" for c in CONTRASTS}
        for c in CONTRASTS:
            save_nifti(files[twin][c], scan.images[c][pair.box], pair.affine, dtype=np.float32)
        files[twin]["mask"] = save_nifti(
            out / f"{twin}_mask.nii.gz", scan.mask[pair.box], pair.affine, dtype=np.uint8
        )
    files["lesioned"]["seg"] = save_nifti(
        folder / pair.case / "lesioned_seg.nii.gz", pair.lesioned.seg[pair.box], pair.affine, dtype=np.uint8
    )
    return files


def score_command(
    scan: Path,
    mask: Path,
    modality: str,
    out: Path,
    checkpoints: list[Path] | None = None,
    overrides: list[str] | None = None,
    reconstruction: Path | None = None,
) -> list[str]:
    """`mhd-uad score` as a user types it (with --checkpoint for each given checkpoint, and
    --out-reconstruction when `reconstruction` is given)."""
    cmd = [
        sys.executable,
        "-m",
        "mhd_uad.cli",
        "score",
        str(scan),
        "--mask",
        str(mask),
        "--modality",
        modality,
        "--out",
        str(out),
    ]
    for ckpt in checkpoints or ():
        cmd += ["--checkpoint", str(ckpt)]
    if reconstruction is not None:
        cmd += ["--out-reconstruction", str(reconstruction)]
    return cmd + list(overrides or ())


def run_score(cmd: list[str]) -> None:
    """Run one `mhd-uad score` in the repository root (its params.yaml); a failure -> MhdUadError."""
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise MhdUadError(
            f"mhd-uad score {Path(cmd[4]).name} failed (exit {done.returncode}): "
            f"{lines[-1] if lines else 'no message'}"
        )


def measure(map_lesioned: np.ndarray, map_healthy: np.ndarray, seg: np.ndarray, mask: np.ndarray,
            fov: np.ndarray | None = None) -> dict:
    """AUROC and AP of the lesioned map over the brain voxels inside `fov` (the voxels the model scores; all
    when None), label seg > 0, and the lesion/healthy-twin ratio there; also the whole-brain AUROC (voxels
    outside `fov` at their map value, 0) and the share of the lesion inside `fov`."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    brain, lesion = mask > 0, seg > 0
    scored = brain if fov is None else brain & (fov > 0)
    if not lesion[scored].any() or lesion[scored].all():
        raise MhdUadError("the lesion must cover some but not all of the scored brain voxels")
    label, score = lesion[scored], map_lesioned[scored].astype(np.float64)
    inside = float(map_lesioned[lesion & scored].mean())
    twin = float(map_healthy[lesion & scored].mean())
    return {
        "auroc": float(roc_auc_score(label, score)),
        "ap_percent": 100.0 * float(average_precision_score(label, score)),
        "ratio": inside / max(twin, 1e-12),
        "lesion_mean": inside,
        "healthy_twin_mean": twin,
        "auroc_whole_brain": float(roc_auc_score(lesion[brain], map_lesioned[brain].astype(np.float64))),
        "lesion_in_fov_percent": 100.0 * float((lesion & scored).sum()) / float((lesion & brain).sum()),
    }


def prepare_as_score(scan: Path, mask: Path, seg: Path | None, overrides: list[str] | None):
    """The scan preprocessed as `mhd-uad score` does, under the params the CLI reads (params.yaml, or conf/
    with the overrides): the model grid every measure below is taken on; `run_benchmark` prepares each twin
    once for all of them."""
    from mhd_uad.config import load_params
    from mhd_uad.data.preprocess import PrepareSettings, preprocess_scan

    params = load_params(list(overrides or []), REPO)
    return preprocess_scan(scan, mask, seg, PrepareSettings.from_params(params))


def reconstruction_file(maps_dir: Path, contrast: str, twin: str = "healthy") -> Path:
    """Where `score_pair` has `mhd-uad score --out-reconstruction` write a twin's mean reconstruction."""
    return maps_dir / f"{twin}_{contrast}_reconstruction.nii.gz"


def _on_model_grid(reconstruction: Path, prepared) -> np.ndarray:
    """A mean reconstruction `score --out-reconstruction` wrote in the scan's space, sampled back onto the
    model grid of the prepared scan (linear; see `reconstruction_bias`)."""
    import warnings

    import torch
    import torchio as tio

    from mhd_uad.data.geometry import to_slices
    from mhd_uad.io import load_nifti

    volume, affine = load_nifti(reconstruction, what="mean reconstruction")
    geometry = prepared.geometry
    image = tio.ScalarImage(tensor=torch.from_numpy(volume)[None], affine=affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchio warns about tensors without a path
        on_grid = tio.Resample((geometry.grid_shape, geometry.grid_affine), image_interpolation="linear")(image)
    return to_slices(on_grid.data[0].numpy()).astype(np.float64)


def lesion_restored(lesioned, healthy, reconstruction: Path) -> dict:
    """The lesion's own contrast and how much of it the model takes out of its reconstruction, on the model
    grid, over the lesion's brain voxels: `lesion_contrast` = mean(lesioned scan − healthy twin) ([0, 1] scale;
    > 0: the lesion is brighter than the tissue it replaced), and `lesion_restored` = mean(lesioned scan − its
    mean reconstruction) / lesion_contrast. 1: the reconstruction shows the healthy tissue the lesion replaced,
    so the residual marks the lesion; 0: it reproduces the lesion, which the model then takes for healthy
    anatomy. Below 0 or above 1 it pushes the lesion further from, or past, the healthy tissue; the ratio
    means little when the contrast is faint (`markdown` leaves it out below MIN_LESION_CONTRAST). `lesioned`
    (with its seg) and `healthy` are the twins in one contrast from `prepare_as_score`."""
    lesion = (lesioned.seg > 0) & (lesioned.mask > 0.5)
    if not lesion.any():
        raise MhdUadError("no lesion voxel on the model grid")
    scan = lesioned.image.astype(np.float64)
    removed = float((scan - _on_model_grid(reconstruction, lesioned))[lesion].mean())
    contrast = float((scan - healthy.image.astype(np.float64))[lesion].mean())
    return {"lesion_restored": removed / contrast if abs(contrast) > 1e-6 else float("nan"),
            "lesion_contrast": contrast}


def reconstruction_bias(prepared, reconstruction: Path) -> dict:
    """Mean reconstruction minus scan over the brain voxels >= 0.9 ("bright") and < 0.3 ("dark"), on the
    model's grid and [0, 1] scale: the scan preprocessed as `mhd-uad score` does (`prepare_as_score`), and the
    mean reconstruction `score --out-reconstruction` wrote in the scan's space (the folds' means averaged, as
    `score` averages their maps) sampled back onto the model grid (linear). When the model's spacing is an odd multiple of the scan's
    voxel size (the demo profile's 3 mm over these 1 mm scans) the grid's voxel centres are voxel centres of the
    scan, and this gives back the grid values `score` computed exactly; otherwise (2 mm over 1 mm, the paper
    profile) the way there and back smooths them slightly."""
    from mhd_uad.scoring.fidelity import reconstruction_fidelity

    fidelity = reconstruction_fidelity(prepared.image, _on_model_grid(reconstruction, prepared), prepared.mask > 0.5)
    return {"bias_bright": fidelity["bias_bright"], "bias_dark": fidelity["bias_dark"]}


def passes(m: dict) -> bool:
    return m["auroc"] >= TARGETS["auroc"] and m["ratio"] >= TARGETS["ratio"]


def score_pair(
    files: dict, maps_dir: Path, checkpoints: dict[str, list[Path]] | None, overrides: list[str] | None
) -> dict[str, dict[str, np.ndarray]]:
    """Score both twins in both contrasts with the CLI: {twin: {contrast: map}} on the scans' grid; their mean
    reconstructions go to `reconstruction_file(maps_dir, contrast, twin)`."""
    from mhd_uad.io import load_nifti

    maps: dict[str, dict[str, np.ndarray]] = {}
    for twin in ("lesioned", "healthy"):
        maps[twin] = {}
        for c in CONTRASTS:
            out = maps_dir / f"{twin}_{c}_map.nii.gz"
            run_score(
                score_command(
                    files[twin][c],
                    files[twin]["mask"],
                    c,
                    out,
                    None if checkpoints is None else checkpoints[c],
                    overrides,
                    reconstruction_file(maps_dir, c, twin),
                )
            )
            maps[twin][c], _ = load_nifti(out, what="anomaly map")
    return maps


def run_benchmark(
    seed: int = 0,
    out_dir: Path = REPO / "reports",
    work: Path | None = None,
    checkpoint_dir: Path = REPO / "models",
    overrides: list[str] | None = None,
) -> dict:
    """Render, score, measure and write the reports; returns the results (also in <out_dir>/*.json)."""
    from mhd_uad.data.demo.anatomy import load_base_anatomy
    from mhd_uad.data.demo.bases import HELD_OUT_BASE
    from mhd_uad.evaluation.score import field_of_view
    from mhd_uad.io import load_nifti

    checkpoint_dir = Path(checkpoint_dir).resolve()
    repo_models = checkpoint_dir == (REPO / "models").resolve()
    shown = "models" if repo_models else checkpoint_dir.name
    checkpoints = find_checkpoints(checkpoint_dir, shown)
    results = {
        "seed": seed,
        "base": HELD_OUT_BASE,
        "voxel_size_mm": 1.0,
        "targets": TARGETS,
        "checkpoints": {
            c: [f"{shown}/{p.relative_to(checkpoint_dir).as_posix()}" for p in v]
            for c, v in checkpoints.items()
        },
        # which models these are: the md5 DVC records for them in dvc.lock (tests/test_readme.py checks it)
        "checkpoint_md5": {c: [file_md5(p) for p in v] for c, v in checkpoints.items()},
        "cases": {},
        "seconds": {"render": 0.0, "score": 0.0},
    }
    with tempfile.TemporaryDirectory(prefix="mhd-uad-generalisation-") as tmp:
        folder = Path(work).resolve() if work is not None else Path(tmp)  # the CLI runs in REPO
        started = time.perf_counter()
        base = load_base_anatomy(voxel_size=1.0, name=HELD_OUT_BASE)
        results["seconds"]["render"] += time.perf_counter() - started
        for case in CASES:
            started = time.perf_counter()
            pair = render_pair(base, case, seed)
            files = write_pair(pair, folder)
            results["seconds"]["render"] += time.perf_counter() - started
            started = time.perf_counter()
            maps = score_pair(files, folder / case, None if repo_models else checkpoints, overrides)
            results["seconds"]["score"] += time.perf_counter() - started
            seg, _ = load_nifti(files["lesioned"]["seg"], what="seg")
            mask, _ = load_nifti(files["lesioned"]["mask"], what="mask")
            prepared = {twin: {c: prepare_as_score(files[twin][c], files[twin]["mask"], files[twin].get("seg"),
                                                   overrides) for c in CONTRASTS} for twin in files}
            fov = field_of_view(prepared["lesioned"]["t1"])  # the voxels `mhd-uad score` scores
            entry = {
                "dataset": pair.dataset,
                "index": pair.index,
                "lesion_ml": round(pair.lesion_ml, 2),
                "shape": [int(s) for s in seg.shape],
                "contrasts": {},
            }
            for c in CONTRASTS:
                m = measure(maps["lesioned"][c], maps["healthy"][c], seg, mask, fov)
                m.update(reconstruction_bias(prepared["healthy"][c], reconstruction_file(folder / case, c)))
                m.update(lesion_restored(prepared["lesioned"][c], prepared["healthy"][c],
                                         reconstruction_file(folder / case, c, "lesioned")))
                entry["contrasts"][c] = {**{k: round(v, 4) for k, v in m.items()}, "pass": passes(m)}
            results["cases"][case] = entry
    results["seconds"] = {k: round(v, 1) for k, v in results["seconds"].items()}
    results["all_pass"] = all(r["pass"] for e in results["cases"].values() for r in e["contrasts"].values())
    write_reports(results, Path(out_dir))
    return results


def _signed(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:+.3f}"


def restored_percent(row: dict) -> str:
    """The restored share of a row in %, or – where the lesion's contrast is too faint for the ratio to mean much."""
    value, contrast = row.get("lesion_restored"), row.get("lesion_contrast")
    if value is None or contrast is None or not np.isfinite(value) or abs(contrast) < MIN_LESION_CONTRAST:
        return "–"
    return f"{100 * value:.0f}"


def markdown(results: dict) -> str:
    """The results table (case, contrast, lesion mL, AUROC, AP %, ratio, pass/fail) with a short header."""
    t = results["targets"]
    lines = [
        f"Demo models on the held-out {results['base']} anatomy (1 mm, no warp), seed {results['seed']}; "
        f"targets AUROC >= {t['auroc']:g}, ratio >= {t['ratio']:g}.",
        "AUROC, AP and ratio over the brain inside the field of view the models score (the profile's centred "
        "crop, which the evaluate stage's metrics cover too); whole-brain AUROC counts the voxels outside it "
        "at their map value, 0. Reco − scan: the healthy twin's mean reconstruction minus the scan over its "
        "brain voxels >= 0.9 / < 0.3 ([0, 1] scale, model grid); near 0 when the model keeps contrast. "
        "Lesion − twin: the lesioned scan minus the healthy twin over the lesion (model grid). Restored: the "
        "share of that contrast the lesioned scan's mean reconstruction takes out (100 %: it shows the healthy "
        f"tissue; 0 %: it reproduces the lesion as healthy anatomy; – when the contrast is under "
        f"{MIN_LESION_CONTRAST:g}).",
        "",
        "| case | contrast | lesion mL | lesion in view % | AUROC | AP % | ratio | AUROC whole brain "
        "| reco − scan, bright / dark | lesion − twin | restored % | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case, e in results["cases"].items():
        for c, r in e["contrasts"].items():
            lines.append(
                f"| {case} ({e['dataset']} #{e['index']}) | {c.upper()} | {e['lesion_ml']:.1f} | "
                f"{r['lesion_in_fov_percent']:.0f} | {r['auroc']:.3f} | {r['ap_percent']:.1f} | {r['ratio']:.2f} | "
                f"{r['auroc_whole_brain']:.3f} | {r['bias_bright']:+.3f} / {r['bias_dark']:+.3f} | "
                f"{_signed(r.get('lesion_contrast'))} | {restored_percent(r)} | {'pass' if r['pass'] else 'FAIL'} |"
            )
    s = results["seconds"]
    lines += ["", f"Render {s['render']:.0f} s, score {s['score']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_reports(results: dict, out_dir: Path) -> None:
    from mhd_uad.io import atomic_write_text

    atomic_write_text(out_dir / "demo_generalisation.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(
        out_dir / "demo_generalisation.md", "# Demo models on a held-out anatomy\n\n" + markdown(results)
    )


def failures(results: dict) -> list[str]:
    return [
        f"{case} {c.upper()}"
        for case, e in results["cases"].items()
        for c, r in e["contrasts"].items()
        if not r["pass"]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", type=Path, default=Path("reports"), help="reports folder (default reports)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the scans and maps here (default: a temp dir)"
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=REPO / "models",
        help="models folder with <t1|t2>/fold<K>/cddpm.ckpt (default: the repository's models)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed on to every `mhd-uad score` (it then composes conf/ instead of params.yaml)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when any target fails")
    parser.add_argument("--readme", type=Path, default=None, help="also put the table into this README's block")
    args = parser.parse_args(argv)
    try:
        results = run_benchmark(args.seed, args.out_dir, args.work, args.checkpoint_dir, args.override)
        if args.readme is not None:
            readme_block_from(args.readme, args.out_dir / "demo_generalisation.md", README_START, README_END)
    except MhdUadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(results), end="")
    failed = failures(results)
    if failed:
        print(f"TARGETS FAILED: {', '.join(failed)}")
    else:
        print("all targets met")
    return 1 if failed and args.check else 0


README_START = (
    "<!-- demo-generalisation:start (written by `benchmarks/demo_generalisation.py --readme README.md`; do not edit) -->"
)
README_END = "<!-- demo-generalisation:end -->"


if __name__ == "__main__":
    sys.exit(main())
