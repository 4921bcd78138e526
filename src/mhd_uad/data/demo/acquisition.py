"""Rendering and acquisition (demo-data.md §4.1.3, §4.1.5): one subject, from its seed to its images.

`simulate_subject` warps the base anatomy, jitters tissue and sequence parameters, adds the healthy
distractors and the set's lesion, renders T1w and T2w by partial-volume signal mixing and applies the
acquisition (bias field, blur, Rician noise); every subject draws from its own seed sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mhd_uad.data.demo.anatomy import RENDERED_TISSUES, T1, TEXTURE, _warp_subject, tissue_pv
from mhd_uad.data.demo.base_anatomy import BaseAnatomy
from mhd_uad.data.demo.datasets import DATASETS, sample_age
from mhd_uad.data.demo.lesions import (
    LESION_PLANNERS,
    add_healthy_distractors,
    add_subarachnoid_csf,
    lesion_size_quantile,
    widen_sulci,
)
from mhd_uad.data.demo.tissue import HEALTHY_TISSUES, T1wSequence, T2wSequence, TissueProperties
from mhd_uad.data.demo.warps import _grid_mm, compose_backward_maps, healthy_backward_map, smooth_noise


def _mix_signal(pv: np.ndarray, healthy: dict[str, TissueProperties], components, sequence, heterogeneity):
    """S = (1 - F) S_healthy + sum_j f_j S_j (lesion signals with per-voxel heterogeneity)."""
    s_tissue = [sequence.signal(healthy[k]) for k in RENDERED_TISSUES]
    signal = np.tensordot(np.array(s_tissue), pv, axes=1)
    if not components:
        return signal
    amount = pv.sum(0)
    total = np.sum([f for f, _ in components], axis=0)
    over = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-9), 1.0)
    mixed = (1.0 - total * over) * signal
    for f, tissue in components:
        mixed += f * over * amount * sequence.signal(tissue) * heterogeneity
    return mixed


# Residual bias of an N4-corrected scan: exp(a * field), a ~ U(0.02, 0.05), 30 mm correlation (a few percent;
# the published data are N4-corrected, method.md §2.2). Noise: Rician at 1 mm with sigma = WM signal /
# U(18, 32), i.e. WM / U(50, 90) once averaged to 2 mm, a real scan's SNR (demo-data.md §4.4 measured that
# these two settings decide whether a model trained on the demo data transfers to real scans; it set sigma
# from the brain's p90, which is WM on T1; on T2 WM is the darkest tissue, so the WM signal is the reference).
BIAS_AMPLITUDE = (0.02, 0.05)
# T2 carries the real T1's anatomical texture sign-flipped (demo-data.md §4.1.3) at this gain.
T2_TEXTURE_GAIN = 0.8
SNR_1MM = (18.0, 32.0)
ACQUISITION_MM = 1.0


def acquire(
    rng: np.random.Generator, signal: np.ndarray, brain: np.ndarray, v: float, wm: np.ndarray | None = None
) -> np.ndarray:
    """Residual bias, Rician noise at 1 mm averaged to the `v` mm grid, skull strip, p99 -> 1.

    The noise level is set against the median signal of `wm` (voxels of nearly pure white matter), or of
    the brain's p90 when `wm` is None or empty.

    The signal is a PV mix, linear in the tissue fractions, so the signal on the `v` mm grid equals a 1 mm
    render averaged over each voxel; the noise is drawn at the 1 mm acquisition resolution (each `v` mm voxel
    split into k^3 sub-voxels, k = round(v / 1 mm)), made Rician there and averaged back, as a scanner's 1 mm
    image resampled to `v` mm would be. Rounded to 1e-5 for determinism.
    """
    bias = np.exp(rng.uniform(*BIAS_AMPLITUDE) * smooth_noise(rng, signal.shape, 30.0, v))
    image = signal * bias
    reference = np.median(image[wm]) if wm is not None and wm.any() else np.percentile(image[brain], 90)
    sigma = reference / rng.uniform(*SNR_1MM)
    k = max(int(round(v / ACQUISITION_MM)), 1)
    fine = image
    for axis in range(3):
        fine = np.repeat(fine, k, axis=axis)
    real = fine + sigma * rng.standard_normal(fine.shape)
    imag = sigma * rng.standard_normal(fine.shape)
    magnitude = np.sqrt(real**2 + imag**2)
    if k > 1:
        x, y, z = image.shape
        magnitude = magnitude.reshape(x, k, y, k, z, k).mean(axis=(1, 3, 5))
    image = magnitude * brain
    image /= max(float(np.percentile(image[brain], 99)), 1e-12)
    return np.round(image, 5).astype(np.float32) * brain


@dataclass
class SyntheticScan:
    """One generated scan on the working grid, before cropping."""

    images: dict[str, np.ndarray]
    mask: np.ndarray
    seg: np.ndarray | None
    info: dict
    tissue: np.ndarray | None = None  # (4, X, Y, Z) PV of cortical GM, WM, CSF, deep GM (RENDERED_TISSUES)


@contextlib.contextmanager
def _torch_deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def subject_seed_sequence(seed: int, dataset: str, index: int) -> np.random.SeedSequence:
    """One stream per subject, keyed by set and index (not by how many subjects are made)."""
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(DATASETS[dataset][0], int(index)))


@dataclass
class _SubjectDraws:
    """One subject's tissue, sequence and texture draws (all from its tissue stream)."""

    tissues: dict[str, TissueProperties]
    t1w: T1wSequence
    t2w: T2wSequence
    lesion_jitter: np.ndarray
    heterogeneity: np.ndarray
    t2_texture_noise: np.ndarray


def _subject_draws(rng: np.random.Generator, shape, v: float) -> _SubjectDraws:
    # Tissue-parameter jitter per subject, sequence jitter around IXI's (scanner differences). demo-data.md
    # §4.1.2 says x U(0.93, 1.07); the inversion-prepared T1w signal is steep in T1, and +-7 % on each tissue's
    # T1 spread T1w GM/WM over 0.52-0.92 against the real templates' 0.60-0.75, so T1 gets +-3 %.
    low, high = [0.97, 0.93, 0.93], [1.03, 1.07, 1.07]
    tissues = {k: t.scaled(*rng.uniform(low, high)) for k, t in HEALTHY_TISSUES.items()}
    t1w = T1wSequence(tr=rng.uniform(9.3, 10.3), flip_deg=rng.uniform(7.0, 9.0), ti=rng.uniform(745.0, 775.0))
    t2w = T2wSequence(tr=rng.uniform(4500.0, 7000.0), te=rng.uniform(90.0, 110.0))
    # Lesion T1 x U(0.97, 1.03) like the healthy tissues (+-15 % turned WMH bright on this T1w), T2
    # x U(0.85, 1.15) as demo-data.md §4.2, PD x U(0.95, 1.05).
    lesion_jitter = rng.uniform([0.97, 0.85, 0.95], [1.03, 1.15, 1.05])
    heterogeneity = np.exp(0.12 * smooth_noise(rng, shape, 3.0, v))
    t2_texture_noise = smooth_noise(rng, shape, 4.0, v)
    return _SubjectDraws(tissues, t1w, t2w, lesion_jitter, heterogeneity, t2_texture_noise)


def _render(anat, pv, pv_nominal, components, voids, draws: _SubjectDraws, contrasts, streams) -> dict:
    """T1w: the real template T1 times the ratio of this subject's model to the nominal healthy model;
    T2w: the signal equation with the template's texture; both through the acquisition."""
    brain, v = anat.brain, anat.v
    pure_wm = brain & (pv[1] > 0.9)
    images = {}
    if "t1" in contrasts:
        subject = _mix_signal(pv, draws.tissues, components, draws.t1w, draws.heterogeneity)
        nominal = _mix_signal(pv_nominal, HEALTHY_TISSUES, [], T1wSequence(), 1.0)
        ratio = np.clip(subject / np.maximum(nominal, 1e-9), 0.0, 3.0)
        signal = anat.channels[T1] * ratio * brain
        images["t1"] = acquire(np.random.default_rng(streams["t1"]), signal, brain, v, pure_wm)
    if "t2" in contrasts:
        subject = _mix_signal(pv, draws.tissues, components, draws.t2w, draws.heterogeneity)
        texture = (1.0 - T2_TEXTURE_GAIN * anat.channels[TEXTURE]) * np.exp(0.03 * draws.t2_texture_noise)
        signal = subject * texture * (1.0 - 0.8 * np.clip(voids, 0.0, 1.0)) * brain
        images["t2"] = acquire(np.random.default_rng(streams["t2"]), signal, brain, v, pure_wm)
    return images


def _pick_base(rng: np.random.Generator, bases) -> BaseAnatomy:
    if isinstance(bases, BaseAnatomy):
        return bases
    names = sorted(bases)
    return bases[names[int(rng.integers(len(names)))]]


def simulate_subject(
    bases: BaseAnatomy | Mapping[str, BaseAnatomy],
    dataset: str,
    index: int,
    seed: int,
    contrasts: Sequence[str] | None = None,
    *,
    warp: bool = True,
    lesion: bool = True,
) -> SyntheticScan:
    """Generate one subject of `dataset` on the working grid (no I/O), from one base or a drawn one.

    `warp=False` renders the base anatomy as it is (no affine, elastic or atrophy warp, no added subarachnoid
    CSF: the generalisation benchmark's held-out anatomy, whose mask keeps its own); `lesion=False` leaves
    out the set's lesion and keeps every other draw, so the pair (lesion=True, lesion=False) differs only by
    the lesion (and its mass effect).
    """
    lesion_type = DATASETS[dataset][4] if lesion else "none"
    contrasts = tuple(contrasts or DATASETS[dataset][3])
    ss = subject_seed_sequence(seed, dataset, index)
    geometry_ss, tissue_ss, distractor_ss, lesion_ss, t1_ss, t2_ss, subject_ss, shell_ss = ss.spawn(8)
    geometry_rng, tissue_rng = np.random.default_rng(geometry_ss), np.random.default_rng(tissue_ss)
    subject_rng = np.random.default_rng(subject_ss)
    base = _pick_base(subject_rng, bases)
    age = sample_age(subject_rng, dataset)
    v = base.voxel_size

    with _torch_deterministic():
        points = healthy_backward_map(geometry_rng, base, age) if warp else _grid_mm(base.shape, v)
        anat = _warp_subject(base, points)
        plan = None
        if lesion_type != "none":
            size_q = lesion_size_quantile(seed, dataset, index)
            plan = LESION_PLANNERS[lesion_type](np.random.default_rng(lesion_ss), anat, size_q)
            if plan.second_map is not None:
                points = compose_backward_maps(points, plan.second_map, v)
                anat = _warp_subject(base, points)

    if warp:
        # Before the nominal PVs: the shell is anatomy (template T1 = the model's CSF level), not a change.
        add_subarachnoid_csf(np.random.default_rng(shell_ss), anat, age)
    draws = _subject_draws(tissue_rng, anat.shape, v)
    pv_nominal = tissue_pv(anat.channels)
    distractor_rng = np.random.default_rng(distractor_ss)
    if warp:
        widen_sulci(distractor_rng, anat, age)
    components, voids = add_healthy_distractors(distractor_rng, anat)

    seg, info = None, {}
    if plan is not None:
        lesion_components, seg, info = plan.paint(anat)
        if not seg.any():
            # Coarse grids can blur a small lesion below f = 0.5 everywhere: label its strongest voxel.
            strongest = np.sum([f for f, _ in lesion_components], axis=0) * anat.brain
            seg = np.zeros(anat.shape, dtype=np.uint8)
            seg[np.unravel_index(np.argmax(strongest), anat.shape)] = 1
        components = components + [(f, t.scaled(*draws.lesion_jitter)) for f, t in lesion_components]

    brain = anat.brain
    pv = tissue_pv(anat.channels)
    images = _render(anat, pv, pv_nominal, components, voids, draws, contrasts, {"t1": t1_ss, "t2": t2_ss})
    mask = brain.astype(np.uint8)
    if seg is not None:
        seg = (seg * mask).astype(np.uint8)
    info = {**info, "base": base.name, "age": round(age, 1)}
    return SyntheticScan(images, mask, seg, info, pv)
