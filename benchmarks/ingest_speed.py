"""Time and accuracy of `mhd-uad ingest` on one 1 mm head-sized raw scan, per step, against ANTsPy when present.

The raw scan: the SRI24 head with skull (tests/data, 2 mm) moved by a known affine (rotation 6/-4/12 deg,
shift 8/-6/5 mm, scale 1.06), resampled (linear) onto a 1 x 1 x 1.2 mm grid with sagittal-first (PSR) voxel
axes, multiplied by a smooth bias field and stored as int16 (about 10 M voxels, like an IXI T1), with its
brain mask. It is ingested into the bundled SRI24 T1 brain (1 mm, 240 x 240 x 155), the same anatomy, so the
true template -> raw transform is the known affine: the benchmark prints the registration's error at the
template's brain voxels (mean and max, mm), the Dice of the registered mask with the template brain, and
the white-matter coefficient of variation before and after N4, with the time of each step.

With ANTsPy importable (`pip install antspyx`; its wheels need numpy < 2.4, so a separate venv:
`PYTHONPATH=src python benchmarks/ingest_speed.py` there), it also runs the original's own calls on the same
scan (ants.resample_image interp 4, reorient RAI, registration 'Affine', apply_transforms, N4 with
[200]*4 / 5e-4 and the smoothed mask as weight) and prints the ratios; with itk-elastix importable, the
registration alone with elastix's default affine parameter map.

    python benchmarks/ingest_speed.py [--threads 2] [--spacing 1.0] [--no-ants] [--json OUT]

With --score it also times `score --raw` of the scan end to end with the params' profile (params.yaml): the
repository's T1 folds when trained, else checkpoints of that profile with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_scan(folder: Path) -> tuple[Path, Path, np.ndarray]:
    from test_ingest import known_affine, make_raw_head

    moved = known_affine()
    image, mask, _ = make_raw_head(folder, "raw", moved=moved, spacing=(1.0, 1.0, 1.2), axcodes="PSR")
    return image, mask, moved


def accuracy(template, template_to_raw: np.ndarray, moved: np.ndarray, mask_crop, crop, image_crop) -> dict:
    """Transform error at the template's brain voxels, Dice of the registered mask, WM spread."""
    brain = template.array > 0
    idx = np.argwhere(brain)[::7]
    pts = template.affine @ np.c_[idx, np.ones(len(idx))].T
    err = np.linalg.norm((template_to_raw @ pts)[:3] - (moved @ pts)[:3], axis=0)
    full = np.zeros(template.shape, dtype=np.float32)
    box = tuple(slice(a, b) for a, b in zip(*crop, strict=True))
    full[box] = mask_crop
    dice = 2 * ((full > 0.5) & brain).sum() / ((full > 0.5).sum() + brain.sum())
    wm = np.zeros(template.shape, dtype=bool)
    wm[box] = mask_crop > 0.99
    wm &= template.array > np.percentile(template.array[brain], 80)  # the template's brightest fifth: WM
    values = np.zeros(template.shape, dtype=np.float32)
    values[box] = image_crop
    v = values[wm]
    return {"transform_error_mean_mm": float(err.mean()), "transform_error_max_mm": float(err.max()),
            "dice": float(dice), "wm_cv": float(v.std() / v.mean())}


def run_ours(image: Path, mask: Path, moved, spacing: float) -> dict:
    from mhd_uad.ingest.manifest import ScanSpec
    from mhd_uad.ingest.scan import ingest_subject
    from mhd_uad.ingest.settings import IngestSettings
    from mhd_uad.ingest.template import load_template

    out = {}
    for n4 in (False, True):
        settings = IngestSettings.from_dict({"spacing_mm": spacing, "n4": {"enabled": n4}})
        template = load_template(settings.template, settings.orientation)
        start = time.perf_counter()
        subject = ingest_subject([ScanSpec("IXI", "t1", "raw", image, mask)], template, settings)
        total = time.perf_counter() - start
        acc = accuracy(template, subject.modalities["t1"].template_to_raw, moved, subject.mask, subject.crop,
                       subject.modalities["t1"].image)
        out["n4" if n4 else "no_n4"] = {"seconds": total, "steps": subject.timings, **acc}
    return out


def run_ants(image: Path, mask: Path, moved) -> dict:
    """The original's preprocessing calls (method.md §2.2) on the same scan, timed the same way."""
    import ants
    import SimpleITK as sitk

    from mhd_uad.ingest.spatial import affine_to_ras_matrix
    from mhd_uad.ingest.template import load_template

    template = load_template("sri24", "LPS")
    steps, clock = {}, time.perf_counter()
    img, msk = ants.image_read(str(image)), ants.image_read(str(mask))
    img = ants.resample_image(img, (1.0, 1.0, 1.0), False, 4).reorient_image2("RAI")
    steps["reorient_resample"] = time.perf_counter() - clock
    clock = time.perf_counter()
    msk1 = ants.resample_image_to_target(msk, img, interp_type="nearestNeighbor")
    stripped = img * msk1
    steps["skull_strip"] = time.perf_counter() - clock
    with tempfile.TemporaryDirectory() as tmp:
        fixed_path = Path(tmp) / "template.nii.gz"
        from mhd_uad.io import save_nifti

        save_nifti(fixed_path, template.array, template.affine)
        fixed = ants.image_read(str(fixed_path))
        clock = time.perf_counter()
        reg = ants.registration(fixed=fixed, moving=stripped, type_of_transform="Affine")
        steps["registration"] = time.perf_counter() - clock
        clock = time.perf_counter()
        warped_mask = ants.apply_transforms(fixed=fixed, moving=msk, transformlist=reg["fwdtransforms"]).numpy()
        warped = reg["warpedmovout"].numpy()
        steps["warp"] = time.perf_counter() - clock
        tfm = sitk.ReadTransform(reg["fwdtransforms"][0])
        tfm = sitk.AffineTransform(tfm.Downcast() if hasattr(tfm, "Downcast") else tfm)
    idx = np.argwhere(warped_mask != 0)
    lo, hi = idx.min(0), idx.max(0)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    clock = time.perf_counter()
    img_c = ants.from_numpy(np.ascontiguousarray(warped[box]))
    weight = ants.smooth_image(ants.from_numpy(np.ascontiguousarray(warped_mask[box])), 1)
    corrected = ants.n4_bias_field_correction(img_c, convergence={"iters": [200, 200, 200, 200], "tol": 0.0005},
                                              weight_mask=weight).numpy()
    steps["n4"] = time.perf_counter() - clock
    acc = accuracy(template, affine_to_ras_matrix(tfm), moved, warped_mask[box], ([*lo], [*hi]), corrected)
    acc_before = accuracy(template, affine_to_ras_matrix(tfm), moved, warped_mask[box], ([*lo], [*hi]), warped[box])
    return {"seconds": sum(steps.values()), "steps": steps, **acc, "wm_cv_before_n4": acc_before["wm_cv"]}


def run_elastix(image: Path, mask: Path, moved) -> dict:
    """itk-elastix's default affine map on the same stripped 1 mm scan and template: registration only."""
    import itk
    import SimpleITK as sitk

    from mhd_uad.ingest.spatial import (
        affine_to_ras_matrix,
        from_sitk,
        reorient_resample,
        resample_onto,
        to_sitk,
    )
    from mhd_uad.ingest.template import load_template
    from mhd_uad.io import load_nifti, save_nifti

    template = load_template("sri24", "LPS")
    data, affine = load_nifti(image)
    resampled = reorient_resample(to_sitk(data, affine), 1.0, "LPS")
    brain = sitk.Cast(resample_onto(to_sitk(load_nifti(mask)[0], affine), resampled) > 0.5, sitk.sitkFloat32)
    with tempfile.TemporaryDirectory() as tmp:
        save_nifti(Path(tmp) / "fixed.nii.gz", template.array, template.affine)
        save_nifti(Path(tmp) / "moving.nii.gz", *from_sitk(resampled * brain))
        fixed = itk.imread(str(Path(tmp) / "fixed.nii.gz"), itk.F)
        moving = itk.imread(str(Path(tmp) / "moving.nii.gz"), itk.F)
        parameters = itk.ParameterObject.New()
        parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
        clock = time.perf_counter()
        _, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
        seconds = time.perf_counter() - clock
    values = [float(v) for v in result.GetParameter(0, "TransformParameters")]
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(values[:9])
    transform.SetTranslation(values[9:12])
    transform.SetCenter([float(v) for v in result.GetParameter(0, "CenterOfRotationPoint")])
    idx = np.argwhere(template.array > 0)[::7]
    pts = template.affine @ np.c_[idx, np.ones(len(idx))].T
    err = np.linalg.norm((affine_to_ras_matrix(transform) @ pts)[:3] - (moved @ pts)[:3], axis=0)
    return {"registration_seconds": seconds, "transform_error_mean_mm": float(err.mean()),
            "transform_error_max_mm": float(err.max())}


def show(name: str, r: dict) -> None:
    steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps"].items())
    print(f"{name:28s} {r['seconds']:6.1f} s  ({steps})")
    print(f"{'':28s} transform error mean {r['transform_error_mean_mm']:.2f} mm, max "
          f"{r['transform_error_max_mm']:.2f} mm; Dice {r['dice']:.3f}; WM CV {r['wm_cv']:.3f}")


def _reference_available(module: str, name: str, skip: bool) -> bool:
    """Whether a reference library is importable (and wanted); says why not."""
    import importlib

    if skip:
        print(f"{name} reference skipped (--no-ants)")
        return False
    try:
        importlib.import_module(module)
    except ImportError as exc:
        print(f"{name} reference skipped ({exc})")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ITK threads (default: all)")
    parser.add_argument("--spacing", type=float, default=1.0, help="ingest.spacing_mm (the method: 1)")
    parser.add_argument("--no-ants", action="store_true", help="skip the ANTsPy and itk-elastix references")
    parser.add_argument("--score", action="store_true", help="also time `score --raw` with the repository's models")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    results: dict = {"threads": args.threads, "cpu_count": os.cpu_count(), "simpleitk": sitk.Version.VersionString(),
                     "machine": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        image, mask, moved = make_scan(Path(tmp))
        import nibabel as nib

        raw = nib.load(str(image))
        print(f"raw scan {raw.shape} voxels of {raw.header.get_zooms()} mm, {nib.aff2axcodes(raw.affine)}, int16; "
              f"template SRI24 240x240x155 @ 1 mm; {args.threads} ITK thread(s) on {os.cpu_count()} CPU(s)")
        ours = run_ours(image, mask, moved, args.spacing)
        results["simpleitk"] = ours
        show("mhd-uad ingest (SimpleITK)", ours["n4"])
        print(f"{'':28s} WM CV without N4 {ours['no_n4']['wm_cv']:.3f} -> with N4 {ours['n4']['wm_cv']:.3f}")
        if _reference_available("ants", "ANTsPy", args.no_ants):
            ref = run_ants(image, mask, moved)
            results["antspy"] = ref
            show("original's calls (ANTsPy)", ref)
            print(f"{'':28s} ratio ANTsPy / ours: total {ref['seconds'] / ours['n4']['seconds']:.2f}x, registration "
                  f"{ref['steps']['registration'] / ours['n4']['steps']['registration']:.2f}x, N4 "
                  f"{ref['steps']['n4'] / ours['n4']['steps']['n4']:.2f}x")
        if _reference_available("itk", "itk-elastix", args.no_ants):
            elx = run_elastix(image, mask, moved)
            results["itk_elastix"] = elx
            print(f"{'itk-elastix affine (default)':28s} registration {elx['registration_seconds']:.1f} s; transform "
                  f"error mean {elx['transform_error_mean_mm']:.2f} mm, max {elx['transform_error_max_mm']:.2f} mm")
        if args.score:
            results["score_raw_seconds"] = time_score_raw(image, mask)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


def time_score_raw(image: Path, mask: Path) -> float:
    """`score --raw` end to end with the repository's T1 folds, or, when there are none, checkpoints of the
    params' profile (params.yaml) with random weights: the time does not depend on training."""
    import torch

    from mhd_uad.config import load_params
    from mhd_uad.evaluation.score import score_raw_scan
    from mhd_uad.models.checkpoint import CDDPM_FORMAT, cddpm_path, save_checkpoint
    from mhd_uad.models.factory import build_cddpm, model_spec

    params = load_params([], REPO)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root, which = REPO, "the repository's trained"
        if not all(cddpm_path(REPO, "t1", f).is_file() for f in params.train.folds):
            root, which = Path(tmp), "random-weight"
            for fold in params.train.folds:
                save_checkpoint(cddpm_path(root, "t1", fold), CDDPM_FORMAT,
                                {"modality": "t1", "fold": int(fold), "spec": model_spec(params)},
                                build_cddpm(params).state_dict())
        start = time.perf_counter()
        result = score_raw_scan(params, image, Path(tmp) / "map.nii.gz", mask=mask, modality="t1", root=root)
        seconds = time.perf_counter() - start
    print(f"score --raw, end to end       {seconds:6.1f} s  (ingest {sum(result['ingest_seconds'].values()):.1f} s; "
          f"{len(result['checkpoints'])} {which} `{params.profile_name}` fold(s), "
          f"N = {params.mhd.num_reconstructions})")
    return seconds


if __name__ == "__main__":
    sys.exit(main())
