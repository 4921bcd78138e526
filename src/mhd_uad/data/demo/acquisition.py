"""Rendering and acquisition (demo-data.md §4.1.3, §4.1.5): one subject, from its seed to its images.

`simulate_subject` warps the base anatomy, jitters tissue and sequence parameters, adds the healthy
distractors and the set's lesion, renders T1w and T2w by partial-volume signal mixing and applies the
acquisition (bias field, blur, Rician noise); every subject draws from its own seed sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from mhd_uad.data.demo.anatomy import GM, MASK, T1, TEXTURE, BaseAnatomy, _warp_subject
from mhd_uad.data.demo.datasets import DATASETS
from mhd_uad.data.demo.lesions import (
    LESION_PLANNERS,
    add_healthy_distractors,
    lesion_size_quantile,
    widen_sulci,
)
from mhd_uad.data.demo.tissue import HEALTHY_TISSUES, T1wSequence, T2wSequence, TissueProperties
from mhd_uad.data.demo.warps import compose_backward_maps, healthy_backward_map, smooth_noise


def _mix_signal(pv: np.ndarray, healthy: dict[str, TissueProperties], components, sequence, heterogeneity):
    """S = (1 - F) S_healthy + sum_j f_j S_j (lesion signals with per-voxel heterogeneity)."""
    s_tissue = [sequence.signal(healthy[k]) for k in ("gm", "wm", "csf")]
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


def acquire(rng: np.random.Generator, signal: np.ndarray, brain: np.ndarray, v: float) -> np.ndarray:
    """Bias field, optional blur, Rician noise, skull strip, p99 -> 1; rounded to 1e-5 for determinism."""
    bias = np.exp(rng.uniform(0.1, 0.3) * smooth_noise(rng, signal.shape, 30.0, v))
    image = signal * bias
    if rng.random() < 0.5:
        image = ndi.gaussian_filter(image, rng.uniform(0.2, 0.7, 3))
    sigma = np.percentile(image[brain], 90) / rng.uniform(15.0, 40.0)
    real = image + sigma * rng.standard_normal(image.shape)
    imag = sigma * rng.standard_normal(image.shape)
    image = np.sqrt(real**2 + imag**2) * brain
    image /= max(float(np.percentile(image[brain], 99)), 1e-12)
    return np.round(image, 5).astype(np.float32) * brain


@dataclass
class SyntheticScan:
    """One generated scan on the working grid, before cropping."""

    images: dict[str, np.ndarray]
    mask: np.ndarray
    seg: np.ndarray | None
    info: dict


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


def simulate_subject(
    base: BaseAnatomy, dataset: str, index: int, seed: int, contrasts: Sequence[str] | None = None
) -> SyntheticScan:
    """Generate one subject of `dataset` on the working grid (no I/O)."""
    lesion_type = DATASETS[dataset][4]
    contrasts = tuple(contrasts or DATASETS[dataset][3])
    ss = subject_seed_sequence(seed, dataset, index)
    geometry_ss, tissue_ss, distractor_ss, lesion_ss, t1_ss, t2_ss = ss.spawn(6)
    geometry_rng, tissue_rng = np.random.default_rng(geometry_ss), np.random.default_rng(tissue_ss)
    v = base.voxel_size

    with _torch_deterministic():
        points = healthy_backward_map(geometry_rng, base)
        anat = _warp_subject(base, points)
        plan = None
        if lesion_type != "none":
            size_q = lesion_size_quantile(seed, dataset, index)
            plan = LESION_PLANNERS[lesion_type](np.random.default_rng(lesion_ss), anat, size_q)
            if plan.second_map is not None:
                points = compose_backward_maps(points, plan.second_map, v)
                anat = _warp_subject(base, points)

    # Tissue-parameter jitter x U(0.93, 1.07) per subject (scanner differences), sequence jitter (§4.1.2-3).
    tissues = {k: t.scaled(*tissue_rng.uniform(0.93, 1.07, 3)) for k, t in HEALTHY_TISSUES.items()}
    t1w = T1wSequence(
        tr=tissue_rng.uniform(18.0, 22.0),
        te=tissue_rng.uniform(3.0, 5.0),
        flip_deg=tissue_rng.uniform(22.0, 28.0),
    )
    t2w = T2wSequence(tr=tissue_rng.uniform(3000.0, 6000.0), te=tissue_rng.uniform(80.0, 120.0))
    lesion_jitter = tissue_rng.uniform(0.85, 1.15, 3)
    heterogeneity = np.exp(0.12 * smooth_noise(tissue_rng, anat.shape, 3.0, v))
    t2_texture_noise = smooth_noise(tissue_rng, anat.shape, 4.0, v)

    pv_nominal = anat.channels[GM:MASK].copy()
    distractor_rng = np.random.default_rng(distractor_ss)
    widen_sulci(distractor_rng, anat)
    components, voids = add_healthy_distractors(distractor_rng, anat)

    seg, info = None, {}
    if plan is not None:
        lesion_components, seg, info = plan.paint(anat)
        if not seg.any():
            # Coarse grids can blur a small lesion below f = 0.5 everywhere: label its strongest voxel.
            strongest = np.sum([f for f, _ in lesion_components], axis=0) * anat.brain
            seg = np.zeros(anat.shape, dtype=np.uint8)
            seg[np.unravel_index(np.argmax(strongest), anat.shape)] = 1
        components = components + [(f, t.scaled(*lesion_jitter)) for f, t in lesion_components]

    brain = anat.brain
    pv = anat.channels[GM:MASK]
    images = {}
    if "t1" in contrasts:
        # The real template T1, multiplied by the ratio of this subject's model to the nominal healthy model.
        subject = _mix_signal(pv, tissues, components, t1w, heterogeneity)
        nominal = _mix_signal(pv_nominal, HEALTHY_TISSUES, [], T1wSequence(), 1.0)
        ratio = np.clip(subject / np.maximum(nominal, 1e-9), 0.0, 3.0)
        images["t1"] = acquire(np.random.default_rng(t1_ss), anat.channels[T1] * ratio * brain, brain, v)
    if "t2" in contrasts:
        subject = _mix_signal(pv, tissues, components, t2w, heterogeneity)
        texture = (1.0 - 0.8 * anat.channels[TEXTURE]) * np.exp(0.03 * t2_texture_noise)
        signal = subject * texture * (1.0 - 0.8 * np.clip(voids, 0.0, 1.0))
        images["t2"] = acquire(np.random.default_rng(t2_ss), signal * brain, brain, v)
    mask = brain.astype(np.uint8)
    if seg is not None:
        seg = (seg * mask).astype(np.uint8)
    return SyntheticScan(images, mask, seg, info)
