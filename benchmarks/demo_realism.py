"""Realism report of the demo dataset: tissue contrast, SNR, residual bias and fine noise against real templates.

Generates `--n` subjects of every demo set in memory (T1w and T2w, 2 mm) and measures, per contrast, with
mhd_uad.data.demo.realism (lesion voxels, dilated by 4 mm, left out):

1. tissue medians relative to WM (PV > 0.9; deep GM > 0.6) from the generator's own tissue maps;
2. SNR = mean eroded-WM signal / noise sigma, the sigma by Immerkaer's (1996) Laplacian-kernel estimator
   extended to 3-D ([1, -2, 1] along each axis, sigma = sqrt(pi/2) mean|response| / sqrt(216)) in eroded WM,
   at the 2 mm grid and as the 1 mm equivalent (x 1/sqrt(8): the noise is drawn at 1 mm and averaged);
3. residual bias: CV over eroded WM of the WM-only image smoothed with a 10 mm Gaussian (normalised
   convolution);
4. HF noise: sd over eroded WM of image - Gaussian(1 voxel)(image), relative to the WM mean; the Gaussian
   over WM only (normalised convolution), the plain Gaussian's value in a note and the JSON.

References (real images): T1 MNI152 2009a, SRI24, OASIS-30 (1 mm; their SNR, bias and HF noise are measured
after 2 x 2 x 2 block averaging, on the demo's 2 mm grid) and SPM's avg152T1; T2 SPM's avg152T2 (2 mm,
tissue maps: the MNI152 2009a maps resampled onto its grid). Also the signal model's nominal ratios and the
generator's noise and bias targets. Writes OUT/demo_realism.json, OUT/demo_realism.md (printed too) and
OUT/figures/demo_realism.png (an axial and a sagittal slice of one subject per set next to the references).

    python benchmarks/demo_realism.py [--out-dir reports] [--seed 0] [--n 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from mhd_uad.data.demo.realism import (
    block_average,
    brain_window,
    hf_noise_factor,
    measure_noise_and_bias,
    tissue_ratios_measured,
)
from mhd_uad.data.geometry import voxel_spacing
from mhd_uad.data.preprocess import to_canonical
from mhd_uad.errors import MhdUadError
from mhd_uad.evaluation.report import readme_block_from
from mhd_uad.io import atomic_write_text, json_safe

VOXEL_MM = 2.0
CONTRASTS = ("t1", "t2")
# Sets and contrasts shown in the figure: the contrast each set is written in.
FIGURE_DEMO = (
    ("ixi", "t1"),
    ("ixi", "t2"),
    ("ATLAS_v2", "t1"),
    ("WMH", "t1"),
    ("Brats21", "t2"),
    ("MSLUB", "t2"),
)
FIGURE_REFERENCES = ("MNI152 2009a", "SRI24", "OASIS-30", "avg152T2")
LESION_MARGIN_VOX = 2  # lesion labels dilated by 4 mm before they are left out of every measure
COLUMNS = (
    ("gm", "GM/WM", 2),
    ("dgm", "deep GM/WM", 2),
    ("csf", "CSF/WM", 2),
    ("snr", "SNR (2 mm)", 0),
    ("snr_1mm", "SNR (1 mm equiv.)", 0),
    ("bias_cv", "residual bias CV %", 1),
    ("hf_noise", "HF noise %", 1),
)
PERCENT = {"bias_cv", "hf_noise"}


@dataclass
class Reference:
    """A real template in RAS voxel order: image, tissue PV maps, brain mask, voxel size."""

    name: str
    contrast: str
    image: np.ndarray
    pv: dict[str, np.ndarray]
    brain: np.ndarray
    voxel_mm: float


def _ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return to_canonical(array, affine)[0]


def _voxel_mm(affine: np.ndarray) -> float:
    return float(np.mean(voxel_spacing(affine)))


def _base_reference(name: str, label: str) -> tuple[Reference, dict[str, np.ndarray], np.ndarray]:
    from mhd_uad.data.demo.anatomy import split_grey_matter
    from mhd_uad.data.demo.bases import load_base_arrays

    loaded = load_base_arrays(name)
    arrays = {k: _ras(a, loaded.affine) for k, a in loaded.arrays.items()}
    pv = {"gm": arrays["gm"], "wm": arrays["wm"], "csf": arrays["csf"]}
    if "dgm" in arrays:  # cortical GM as the demo renders it: GM less its deep part
        cortical, deep = split_grey_matter(arrays["gm"], arrays["dgm"])
        pv = {**pv, "gm": cortical, "dgm": deep}
    ref = Reference(label, "t1", arrays["t1"], pv, arrays["mask"] > 0.5, _voxel_mm(loaded.affine))
    return ref, loaded.arrays, loaded.affine


def _avg152_references(mni_arrays: dict[str, np.ndarray], mni_affine: np.ndarray) -> list[Reference]:
    """SPM's avg152T1/T2 with the MNI152 2009a GM/WM/brain maps resampled (linear) onto their grid."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    folder = Path(str(resources.files("mhd_uad.data.demo") / "templates"))
    out = []
    maps = None
    for contrast, file_name in (("t1", "avg152T1.nii.gz"), ("t2", "avg152T2.nii.gz")):
        try:
            img = nib.load(str(folder / file_name))
            data = np.asarray(img.dataobj, dtype=np.float64)
        except (OSError, ValueError) as exc:
            raise MhdUadError(f"cannot read the bundled template {file_name} ({exc})") from None
        if data.ndim == 4:
            data = data[..., 0]
        if maps is None:
            maps = {}
            for k in ("gm", "wm", "mask"):
                src = nib.Nifti1Image(mni_arrays[k].astype(np.float32), mni_affine)
                with warnings.catch_warnings():  # linear on the binary mask is meant: a fractional mask
                    warnings.simplefilter("ignore", UserWarning)
                    res = resample_to_img(
                        src, img, interpolation="linear", force_resample=True, copy_header=True
                    )
                maps[k] = _ras(np.clip(np.asarray(res.dataobj, dtype=np.float64), 0.0, 1.0), img.affine)
            maps["csf"] = np.clip(maps["mask"] - maps["gm"] - maps["wm"], 0.0, 1.0)
        pv = {k: maps[k] for k in ("gm", "wm", "csf")}
        name = file_name.split(".")[0]
        out.append(
            Reference(name, contrast, _ras(data, img.affine), pv, maps["mask"] > 0.5, _voxel_mm(img.affine))
        )
    return out


def load_references() -> list[Reference]:
    mni, mni_arrays, mni_affine = _base_reference("mni152", "MNI152 2009a")
    sri, _, _ = _base_reference("sri24", "SRI24")
    oasis, _, _ = _base_reference("oasis30", "OASIS-30")
    return [mni, sri, oasis, *_avg152_references(mni_arrays, mni_affine)]


def measure_reference(ref: Reference) -> dict:
    """Tissue ratios on the native grid; SNR, bias and HF noise on the 2 mm grid (1 mm templates averaged)."""
    out = {"contrast": ref.contrast, "voxel_mm": ref.voxel_mm}
    out["ratios"] = tissue_ratios_measured(ref.image, ref.pv)
    strict = {k: 0.95 for k in ref.pv}
    out["ratios_pv95"] = tissue_ratios_measured(ref.image, ref.pv, thresholds=strict)
    k = max(int(round(VOXEL_MM / ref.voxel_mm)), 1)
    image, wm = block_average(ref.image, k), block_average(ref.pv["wm"], k)
    brain = block_average(ref.brain.astype(np.float64), k) > 0.5
    out["noise"] = measure_noise_and_bias(image, wm, brain, ref.voxel_mm * k)
    out["measured_mm"] = ref.voxel_mm * k
    return out


def measure_scan(scan, contrast: str) -> dict:
    from mhd_uad.data.demo.anatomy import RENDERED_TISSUES

    pv = dict(zip(RENDERED_TISSUES, scan.tissue, strict=True))
    exclude = None
    if scan.seg is not None and scan.seg.any():
        exclude = ndi.binary_dilation(scan.seg > 0, iterations=LESION_MARGIN_VOX)
    image = scan.images[contrast]
    return {
        "ratios": tissue_ratios_measured(image, pv, exclude=exclude),
        "noise": measure_noise_and_bias(image, pv["wm"], scan.mask > 0, VOXEL_MM, exclude=exclude),
    }


def measure_demo(bases, sets, n: int, seed: int) -> tuple[dict, dict]:
    """Per set, per contrast, the list of per-subject measures; and the first subject of each set (figure)."""
    from mhd_uad.data.demo.acquisition import simulate_subject

    results: dict = {}
    shown: dict = {}
    for name in sets:
        results[name] = {c: [] for c in CONTRASTS}
        for index in range(n):
            scan = simulate_subject(bases, name, index, seed, contrasts=CONTRASTS)
            for contrast in CONTRASTS:
                entry = measure_scan(scan, contrast)
                entry["base"], entry["age"] = scan.info["base"], scan.info["age"]
                results[name][contrast].append(entry)
            if index == 0:
                shown[name] = scan
    return results, shown


def _flat(entry: dict) -> dict[str, float]:
    return {**{k: v for k, v in entry["ratios"].items() if k != "wm"}, **entry["noise"]}


def _stats(entries: list[dict]) -> dict[str, dict[str, float]]:
    flat = [_flat(e) for e in entries]
    out = {}
    for key in flat[0] if flat else ():
        values = np.array([f.get(key, np.nan) for f in flat], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if finite.size else np.nan
        sd = float(finite.std(ddof=1)) if finite.size > 1 else np.nan
        out[key] = {"mean": mean, "sd": sd, "n": int(finite.size)}
    return out


def model_rows() -> dict:
    """The signal model's nominal ratios and the generator's noise/bias targets, per contrast."""
    from mhd_uad.data.demo.acquisition import BIAS_AMPLITUDE, SNR_1MM
    from mhd_uad.data.demo.tissue import T1wSequence, T2wSequence, tissue_ratios

    factor = hf_noise_factor()
    out = {}
    for contrast, seq in (("t1", T1wSequence()), ("t2", T2wSequence())):
        ratios = tissue_ratios(seq)
        # Target noise: the WM signal / U(18, 32) at 1 mm (acquisition.SNR_1MM), averaged to 2 mm.
        snr_1mm = list(SNR_1MM)
        snr_2mm = [s * math.sqrt(8.0) for s in snr_1mm]
        out[contrast] = {
            "ratios": {k: v for k, v in ratios.items() if k != "wm"},
            "snr_1mm_range": snr_1mm,
            "snr_range": snr_2mm,
            "bias_amplitude_range": list(BIAS_AMPLITUDE),
            "hf_noise_range": [factor / snr_2mm[1], factor / snr_2mm[0]],
        }
    return out


def _num(value: float, digits: int, percent: bool) -> str:
    if value is None or not np.isfinite(value):
        return "—"
    return f"{100.0 * value if percent else value:.{digits}f}"


def _cell_stats(stat: dict | None, key: str, digits: int) -> str:
    if stat is None or not np.isfinite(stat["mean"]):
        return "—"
    mean = _num(stat["mean"], digits, key in PERCENT)
    return mean if not np.isfinite(stat["sd"]) else f"{mean} ± {_num(stat['sd'], digits, key in PERCENT)}"


def _range(pair, digits: int, percent: bool) -> str:
    return f"{_num(pair[0], digits, percent)}–{_num(pair[1], digits, percent)}"


def _table(contrast: str, report: dict) -> list[str]:
    head = ["source", "n", *(label for _, label, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, stats in report["demo_summary"][contrast].items():
        if label == "demo, all sets":  # in the JSON and the notes; the table splits healthy and test sets
            continue
        n = max((s["n"] for s in stats.values()), default=0)
        cells = [_cell_stats(stats.get(k), k, d) for k, _, d in COLUMNS]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    for name, ref in report["references"].items():
        if ref["contrast"] != contrast:
            continue
        values = {**ref["ratios"], **ref["noise"]}
        cells = [_num(values.get(k, np.nan), d, k in PERCENT) for k, _, d in COLUMNS]
        lines.append(f"| {name} (real) | 1 | " + " | ".join(cells) + " |")
    model = report["model"][contrast]
    cells = [_num(model["ratios"].get(k, np.nan), d, False) for k, _, d in COLUMNS[:3]]
    cells += [
        _range(model["snr_range"], 0, False),
        _range(model["snr_1mm_range"], 0, False),
        _range(model["bias_amplitude_range"], 0, True) + " (field a)",
        _range(model["hf_noise_range"], 1, True) + " (noise only)",
    ]
    lines.append("| model / generator target | — | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict) -> str:
    lines = [
        "# Demo data realism",
        "",
        f"Seed {report['seed']}, {report['n_per_set']} subjects per set, {VOXEL_MM:g} mm grid; demo values are "
        "mean ± sd over subjects (lesions and a 4 mm margin left out).",
    ]
    for contrast in CONTRASTS:
        lines += ["", f"## {contrast.upper()}w", "", *_table(contrast, report)]
        p90 = report["demo_summary"][contrast]["demo, all sets"].get("p90_over_sigma_1mm")
        if p90 is not None:
            lines.append("")
            lines.append(f"Demo p90(brain) / sigma at 1 mm: {_cell_stats(p90, 'p', 1)}.")
        plain = [
            f"{label} {_cell_stats(stats.get('hf_noise_plain'), 'hf_noise', 1)}"
            for label, stats in report["demo_summary"][contrast].items()
            if label != "demo, all sets"
        ]
        plain += [
            f"{name} {_num(ref['noise']['hf_noise_plain'], 1, True)}"
            for name, ref in report["references"].items()
            if ref["contrast"] == contrast
        ]
        lines += [
            "",
            "HF noise % with a plain Gaussian (GM/CSF next to WM leak in): " + "; ".join(plain) + ".",
        ]
    t2 = report["references"].get("avg152T2")
    lines += [
        "",
        "Notes:",
        "- The real templates are averages of many subjects: their SNR and HF noise show a floor of residual "
        "texture and interpolation, not a target. Their SNR, bias and HF noise are measured on a 2 mm grid "
        "(1 mm templates averaged 2 x 2 x 2), their tissue ratios on their own grid.",
        "- Noise sigma: Immerkaer (1996) Laplacian-kernel estimator in 3-D, in WM (PV > 0.9) eroded by one voxel; "
        "SNR (1 mm equiv.) = SNR (2 mm) / sqrt(8). Residual bias: CV of the WM-only image smoothed with a 10 mm "
        "Gaussian (normalised convolution); HF noise: sd of image - Gaussian(1 voxel) taken over WM only "
        "(normalised convolution), / WM mean.",
        "- Deep GM: labelled only in OASIS-30 (PV > 0.6); the MNI152 and SRI24 GM maps include deep GM. "
        "avg152T1/T2 use the MNI152 2009a maps resampled onto their grid (linear-space templates: approximate).",
        "- Model row: the sequences' nominal ratios; SNR: the generator's WM signal / sigma, U(18, 32) at 1 mm; "
        "bias: the amplitude a of exp(a * field); HF noise expected from that noise alone.",
    ]
    if t2 is not None:
        r, s = t2["ratios"], t2["ratios_pv95"]
        lines.append(
            f"- avg152T2 is a blurred 152-subject average: partial volume lowers its CSF/WM (GM/WM {r['gm']:.2f}, "
            f"CSF/WM {r['csf']:.2f} at PV > 0.9; {s['gm']:.2f}, {s['csf']:.2f} at PV > 0.95); pure CSF is brighter."
        )
    return "\n".join(lines) + "\n"


def _centre(scan_mask: np.ndarray, seg: np.ndarray | None) -> tuple[int, int, int]:
    target = seg > 0 if seg is not None and np.any(seg) else scan_mask > 0
    return tuple(int(round(c)) for c in ndi.center_of_mass(target))


def _panel(ax_axial, ax_sag, image, brain, seg, title: str) -> None:
    lo, hi = brain_window(image, brain)
    x, _, z = _centre(brain, seg)
    for ax, view, cut in ((ax_axial, "ax", image[:, :, z].T), (ax_sag, "sag", image[x, :, :].T)):
        ax.imshow(cut, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        if seg is not None and np.any(seg):
            outline = (seg[:, :, z].T if view == "ax" else seg[x, :, :].T) > 0
            if outline.any():
                ax.contour(outline.astype(float), levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(f"{title} · {view}", fontsize=8)
        ax.set_axis_off()


def write_figure(path: Path, shown: dict, references: list[Reference]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = {r.name: r for r in references}
    rows = [
        [("demo", s, c) for s, c in FIGURE_DEMO if c == "t1"],
        [("real", n, None) for n in FIGURE_REFERENCES if refs[n].contrast == "t1"],
        [("demo", s, c) for s, c in FIGURE_DEMO if c == "t2"],
        [("real", n, None) for n in FIGURE_REFERENCES if refs[n].contrast == "t2"],
    ]
    fig, axes = plt.subplots(len(rows), 6, figsize=(13, 10.5), squeeze=False)
    for r, row in enumerate(rows):
        for a in axes[r]:
            a.set_axis_off()
        for i, (kind, name, contrast) in enumerate(row):
            if kind == "demo":
                scan = shown[name]
                image, brain, seg = scan.images[contrast], scan.mask > 0, scan.seg
                title = f"demo {name} {contrast.upper()}"
            else:
                ref = refs[name]
                k = max(int(round(VOXEL_MM / ref.voxel_mm)), 1)
                image = block_average(ref.image, k)
                brain, seg = block_average(ref.brain.astype(float), k) > 0.5, None
                title = f"{name} (real)"
            _panel(axes[r][2 * i], axes[r][2 * i + 1], np.where(brain, image, 0.0), brain, seg, title)
    fig.suptitle(
        "Demo subjects (2 mm; red: lesion outline) next to real templates (shown at 2 mm)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def build_report(seed: int, n: int, demo: dict, references: dict) -> dict:
    from mhd_uad.data.demo.datasets import TEST_SETS

    summary = {}
    for contrast in CONTRASTS:
        test = [e for s in TEST_SETS if s in demo for e in demo[s][contrast]]
        everything = [e for s in demo for e in demo[s][contrast]]
        summary[contrast] = {"demo ixi": _stats(demo.get("ixi", {}).get(contrast, []))}
        summary[contrast]["demo test sets"] = _stats(test)
        summary[contrast]["demo, all sets"] = _stats(everything)
    report = {"seed": seed, "n_per_set": n, "voxel_mm": VOXEL_MM, "demo_summary": summary}
    report["references"] = references
    report["model"] = model_rows()
    report["demo"] = demo
    return report


def run(out_dir: Path, seed: int, n: int) -> str:
    from mhd_uad.data.demo.anatomy import load_base_anatomy
    from mhd_uad.data.demo.bases import TRAINING_BASES
    from mhd_uad.data.demo.datasets import DATASETS

    if n < 1:
        raise MhdUadError(f"--n must be at least 1, got {n}")
    started = time.perf_counter()
    bases = {name: load_base_anatomy(voxel_size=VOXEL_MM, name=name) for name in TRAINING_BASES}
    demo, shown = measure_demo(bases, tuple(DATASETS), n, seed)
    references = load_references()
    measured = {ref.name: measure_reference(ref) for ref in references}
    report = build_report(seed, n, demo, measured)
    markdown = render_markdown(report)
    write_figure(out_dir / "figures" / "demo_realism.png", shown, references)
    report["run_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out_dir / "demo_realism.json", json.dumps(json_safe(report), indent=1) + "\n")
    atomic_write_text(out_dir / "demo_realism.md", markdown)
    return (
        markdown
        + f"\n({report['run_seconds']:.0f} s; wrote demo_realism.json, demo_realism.md, figures/demo_realism.png)\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir", type=Path, default=Path("reports"), help="output folder (default reports)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=4, help="subjects per demo set (default 4)")
    parser.add_argument(
        "--readme", type=Path, default=None, help="also put the tables into this README's block"
    )
    args = parser.parse_args(argv)
    try:
        print(run(args.out_dir, args.seed, args.n), end="")
        if args.readme is not None:
            readme_block_from(args.readme, args.out_dir / "demo_realism.md", README_START, README_END)
    except MhdUadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


README_START = (
    "<!-- demo-realism:start (written by `benchmarks/demo_realism.py --readme README.md`; do not edit) -->"
)
README_END = "<!-- demo-realism:end -->"


if __name__ == "__main__":
    sys.exit(main())
