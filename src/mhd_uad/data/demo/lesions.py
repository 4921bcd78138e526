"""Lesions (demo-data.md §4.2) and healthy distractors (§4.1.4), painted as soft fraction maps.

Soft painting helpers (ellipsoids, softened binaries, region growing); the healthy distractors every subject
gets (perivascular spaces, periventricular caps, choroid plexus, flow voids, wider sulci, the subarachnoid
CSF a skull-strip mask keeps); and one planner per lesion type: `plan_*` draws the lesion before the final
warp and returns a `LesionPlan` whose painter edits the tissue model of the warped subject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

from mhd_uad.data.demo.anatomy import (
    CSF,
    D_VENT,
    DEPTH,
    GM,
    MASK,
    T1,
    VENT,
    WM,
    SubjectAnatomy,
    _parenchyma_fraction,
)
from mhd_uad.data.demo.datasets import DATASETS
from mhd_uad.data.demo.tissue import (
    DISTRACTOR_TISSUES,
    LESION_TISSUES,
    MS_LESION_MEDIAN_MM3,
    OEDEMA_FLOOR,
    STROKE_CAVITATION,
    STROKE_MEDIAN_ML,
    STROKE_RIM_MM,
    STROKE_SIGMA,
    WMH_MEDIAN_ML,
    T1wSequence,
    tissue_ratios,
)
from mhd_uad.data.demo.warps import _grid_mm, _radial_dilation, _rotation, atrophy_level, smooth_noise

# ---------------------------------------------------------------------------------------------------
# Soft painting
# ---------------------------------------------------------------------------------------------------


def _pick_voxel(rng: np.random.Generator, candidates: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        idx = np.flatnonzero(fallback)
    return np.array(np.unravel_index(idx[rng.integers(idx.size)], candidates.shape))


def _random_axes(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).T


def paint_ellipsoid(
    frac: np.ndarray, centre_mm, radii_mm, axes: np.ndarray, v: float, volume_mm3: float | None = None
) -> np.ndarray:
    """Max-composite a soft ellipsoid into `frac` (edge ramp one voxel wide); returns the painted box's f.

    With `volume_mm3`, a lesion smaller than the ramp's volume is scaled down so that sum(f)*v^3 equals its
    volume: a 1 mm perivascular space in a 2 mm voxel is a partial-volume tint, not a full voxel.
    """
    radii = np.asarray(radii_mm, dtype=np.float64)
    centre = np.asarray(centre_mm, dtype=np.float64)
    reach = radii.max() + 2.0 * v
    lo = np.maximum(np.floor((centre - reach) / v).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / v).astype(int) + 1, frac.shape)
    if np.any(hi <= lo):
        return np.zeros(0)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    pts = np.stack(
        np.meshgrid(*[np.arange(a, b) * v for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    )
    local = (pts - centre) @ axes.T / radii
    rho = np.sqrt(np.sum(local**2, axis=-1))
    f = np.clip(0.5 + (1.0 - rho) * radii.min() / v, 0.0, 1.0)
    if volume_mm3 is not None:
        painted = f.sum() * v**3
        if painted > volume_mm3 > 0:
            f *= volume_mm3 / painted
    frac[box] = np.maximum(frac[box], f)
    return f


def _soften(binary: np.ndarray) -> np.ndarray:
    """Partial-volume edge about a voxel wide; f > 0.5 exactly on `binary`, so the seg is the binary shape."""
    f = np.clip(ndi.gaussian_filter(binary.astype(np.float64), 0.6, mode="constant"), 0.0, 1.0)
    return np.where(binary, np.maximum(f, 0.55), np.minimum(f, 0.45))


def _top_voxels(score: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """Binary map of the `n` highest-scoring candidate voxels (stable order: deterministic ties)."""
    out = np.zeros(score.shape, dtype=bool)
    idx = np.flatnonzero(candidates)
    if idx.size == 0 or n <= 0:
        return out
    n = min(n, idx.size)
    order = np.argsort(-score.ravel()[idx], kind="stable")[:n]
    out.ravel()[idx[order]] = True
    return out


def _grow_region(score: np.ndarray, allowed: np.ndarray, seed: np.ndarray, n: int) -> np.ndarray:
    """Grow `seed` inside `allowed`, adding the best-scoring neighbours first, until it has `n` voxels."""
    region = seed & allowed
    while (have := int(region.sum())) < n:
        frontier = ndi.binary_dilation(region) & allowed & ~region
        if not frontier.any():
            break
        if frontier.sum() > n - have:
            frontier = _top_voxels(score, frontier, n - have)
        region |= frontier
    return region


# ---------------------------------------------------------------------------------------------------
# Healthy distractors (demo-data.md §4.1.4)
# ---------------------------------------------------------------------------------------------------


def add_healthy_distractors(rng: np.random.Generator, anat: SubjectAnatomy) -> tuple[list, np.ndarray]:
    """Perivascular spaces, periventricular caps, choroid plexus; returns components and a T2 flow-void map."""
    ch, v, shape = anat.channels, anat.v, anat.shape
    rel = anat.relative_mm()
    brain = anat.brain
    components = []

    # Enlarged perivascular spaces: 1-3 mm CSF-like dots in basal ganglia and centrum semiovale.
    pvs = np.zeros(shape)
    basal_ganglia = brain & (ch[GM] > 0.5) & (ch[DEPTH] > 25.0) & (rel[..., 2] > -25.0) & (rel[..., 2] < 5.0)
    semiovale = brain & (ch[WM] > 0.6) & (rel[..., 2] > 10.0) & (ch[DEPTH] > 12.0)
    for _ in range(int(rng.integers(5, 31))):
        pool = basal_ganglia if rng.random() < 0.5 else semiovale
        c = _pick_voxel(rng, pool, brain) * v
        radius = rng.uniform(0.5, 1.5)
        length = radius * rng.uniform(1.0, 3.0)  # they run along perforating arteries, roughly vertical
        axes = _rotation(np.deg2rad(rng.uniform(-20, 20, 3)))
        vol = 4.0 / 3.0 * np.pi * radius * radius * length
        paint_ellipsoid(pvs, c, (radius, radius, length), axes, v, volume_mm3=vol)
    components.append((pvs * _parenchyma_fraction(anat), DISTRACTOR_TISSUES["pvs"]))

    # Normal periventricular caps at the frontal horns: a thin, mildly T2-bright WM rim.
    cap_mm = rng.uniform(2.0, 5.0)
    frontal = (ch[D_VENT] < cap_mm) & (rel[..., 1] > 18.0) & (ch[WM] > 0.3) & (ch[VENT] < 0.5)
    cap = _soften(frontal) * rng.uniform(0.3, 0.7) * (1.0 + 0.3 * smooth_noise(rng, shape, 4.0, v))
    components.append((np.clip(cap, 0.0, 1.0) * _parenchyma_fraction(anat), DISTRACTOR_TISSUES["cap"]))

    # Choroid plexus in the atria of the lateral ventricles.
    choroid = np.zeros(shape)
    atria = (ch[VENT] > 0.5) & (rel[..., 1] < -5.0) & (np.abs(rel[..., 0]) > 8.0)
    for _ in range(int(rng.integers(1, 3))):
        c = _pick_voxel(rng, atria, ch[VENT] > 0.5) * v
        r = rng.uniform(2.5, 4.5)
        paint_ellipsoid(choroid, c, (r, r * rng.uniform(1.0, 1.8), r), _random_axes(rng), v)
    csf_share = np.clip(ch[CSF] / np.maximum(ch[GM] + ch[WM] + ch[CSF], 1e-6), 0.0, 1.0)
    components.append((0.8 * choroid * csf_share, DISTRACTOR_TISSUES["choroid"]))

    # Flow voids: dark T2 dots in the sylvian and perimesencephalic cisterns.
    voids = np.zeros(shape)
    cisterns = brain & (ch[CSF] > 0.5) & (ch[VENT] < 0.5) & (ch[DEPTH] > 10.0) & (rel[..., 2] < 10.0)
    for _ in range(int(rng.integers(3, 11))):
        c = _pick_voxel(rng, cisterns, brain) * v
        r = rng.uniform(0.8, 1.8)
        paint_ellipsoid(
            voids, c, (r, r, r * 2.0), _random_axes(rng), v, volume_mm3=4.0 / 3.0 * np.pi * r**3 * 2
        )
    return components, voids


def widen_sulci(rng: np.random.Generator, anat: SubjectAnatomy, age: float = 50.0) -> None:
    """Cortical atrophy growing with age: move some GM next to CSF into CSF (healthy and lesioned alike)."""
    ch, v = anat.channels, anat.v
    amount = float(np.clip(0.05 + 0.45 * atrophy_level(age) + rng.normal(0.0, 0.05), 0.0, 0.6))
    near_csf = ndi.gaussian_filter(ch[CSF], 1.5 / v)
    moved = amount * ch[GM] * np.clip(near_csf * 2.0, 0.0, 1.0) * (ch[DEPTH] < 25.0)
    ch[GM] -= moved
    ch[CSF] += moved


def subarachnoid_thickness_mm(age: float) -> float:
    """Mean thickness of the CSF between the cortex and the inner skull: about 1 mm at 20 years, 3-4 mm at
    80 [approximate: the brain-to-skull distance of adult MRI grows with atrophy]."""
    return 0.8 + 3.0 * atrophy_level(age)


def add_subarachnoid_csf(rng: np.random.Generator, anat: SubjectAnatomy, age: float = 50.0) -> None:
    """The CSF around the brain that a skull-strip mask keeps (HD-BET and BET masks reach the inner skull):
    the mask grows outward by a shell of subarachnoid CSF, thicker with age and uneven over the convexity.

    The templates' own masks hug the cortex (MNI152 holds almost no CSF more than 2 mm out), so without this
    the model never sees the bright T2 (dark T1) rim every skull-stripped scan has. The shell's T1 channel
    is the T1w model's CSF level (WM = 1), like the rest of the T1 image after `_render`'s tissue ratio.
    """
    ch, v = anat.channels, anat.v
    brain = ch[MASK] > 0.5
    mean_mm = float(np.clip(subarachnoid_thickness_mm(age) * np.exp(rng.normal(0.0, 0.25)), 0.3, 6.0))
    # Uneven over the brain: thicker in some regions (frontal, sylvian), thinner in others.
    thickness = mean_mm * np.exp(0.35 * smooth_noise(rng, anat.shape, 20.0, v))
    outside_mm = ndi.distance_transform_edt(~brain) * v
    # Partial volume of the shell in each voxel outside the brain (a voxel's centre `outside_mm` out).
    mask = np.where(brain, ch[MASK], np.maximum(ch[MASK], np.clip((thickness - outside_mm) / v + 0.5, 0.0, 1.0)))
    added = np.clip(mask - ch[GM] - ch[WM] - ch[CSF], 0.0, 1.0) * ~brain  # filled up to the mask with CSF
    ch[CSF] += added
    ch[T1] += added * tissue_ratios(T1wSequence())["csf"]
    ch[MASK] = mask


# ---------------------------------------------------------------------------------------------------
# Lesions (demo-data.md §4.2)
# ---------------------------------------------------------------------------------------------------


@dataclass
class LesionPlan:
    """What a lesion recipe decided before the final warp: the extra backward-map term and the painter."""

    second_map: np.ndarray | None
    paint: object  # callable(anat) -> (components, seg, info)


def _lognormal(rng, median: float, sigma: float, lo: float, hi: float) -> float:
    return float(np.clip(median * np.exp(sigma * rng.standard_normal()), lo, hi))


def _lognormal_quantile(q: float, median: float, sigma: float, lo: float, hi: float) -> float:
    return float(np.clip(median * np.exp(sigma * ndtri(q)), lo, hi))


def lesion_size_quantile(seed: int, dataset: str, index: int) -> float:
    """Quantile of a subject's lesion size: a golden-ratio sequence with a seeded start.

    Any run of consecutive subjects spreads evenly over the size distribution, so a 12-scan test set is not
    at the mercy of one or two draws from a heavy tail; subject i's quantile depends only on (seed, set, i).
    """
    start = np.random.default_rng(
        np.random.SeedSequence(int(seed), spawn_key=(DATASETS[dataset][0], 2**20))
    ).random()
    q = (start + index * 0.6180339887498949) % 1.0
    return float(np.clip(q, 1e-4, 1.0 - 1e-4))


def plan_tumour(rng: np.random.Generator, anat: SubjectAnatomy, size_q: float) -> LesionPlan:
    """BraTS-like: necrotic/enhancing core, finger-like oedema preferring WM, mass effect."""
    ch, v, shape = anat.channels, anat.v, anat.shape
    core_ml = _lognormal_quantile(size_q, 25.0, 0.7, 2.0, 120.0)
    whole_ml = core_ml * _lognormal(rng, 3.0, 0.5, 1.2, 8.0)
    whole_ml = min(whole_ml, 300.0)
    r = (3.0 * core_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    deep_wm = anat.brain & (ch[WM] > 0.5) & (ch[DEPTH] >= max(18.0, 0.6 * r))
    centre = _pick_voxel(rng, deep_wm, anat.brain & (ch[DEPTH] >= ch[DEPTH].max() * 0.5)) * v
    # Mass effect: radial push of 0.15-0.4 r with Gaussian fall-off, damped within 10 mm of the brain edge.
    amplitude = rng.uniform(0.15, 0.4) * r
    p = _grid_mm(shape, v)
    d = p - centre
    dist2 = np.sum(d**2, axis=-1)
    damp = np.clip(ndi.gaussian_filter(ch[DEPTH], 2.0 / v) / 10.0, 0.0, 1.0)
    push = amplitude / r * np.exp(-dist2 / (2.0 * (1.5 * r) ** 2)) * damp
    second = p - d * push[..., None]

    elong = rng.uniform(0.75, 1.33, 3)
    radii = r * elong / np.prod(elong) ** (1.0 / 3.0)
    axes = _random_axes(rng)
    necrosis_radius = rng.uniform(0.35, 0.75) if rng.random() < 0.8 else 0.0
    noise_seed = rng.integers(2**32)

    def paint(final: SubjectAnatomy):
        nrng = np.random.default_rng(noise_seed)
        fch = final.channels
        local = (p - centre) @ axes.T / radii
        rho = np.sqrt(np.sum(local**2, axis=-1)) + 0.2 * smooth_noise(nrng, shape, max(r / 2.0, 4.0), v)
        edge = r / v
        core = np.clip(0.5 + (1.0 - rho) * edge, 0.0, 1.0) * final.channels[MASK]
        necrosis = (
            np.clip(0.5 + (necrosis_radius - rho) * edge, 0.0, 1.0) * core if necrosis_radius else 0 * core
        )
        enhancing = core - necrosis
        # Oedema: top-V voxels of -(|x-c|/R + 0.25 noise) + 0.25 WM, not CSF, same hemisphere, connected.
        big_r = (3.0 * whole_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
        score = -(np.sqrt(dist2) / big_r + 0.25 * smooth_noise(nrng, shape, 6.0, v)) + 0.25 * fch[WM]
        side = np.sign(final.template_mm[..., 0] - final.base.midline_mm)
        centre_side = np.sign(centre[0] - final.base.midline_mm) or 1.0
        core_bin = core > 0.5
        candidates = final.brain & (fch[CSF] < 0.5) & (side == centre_side) & ~core_bin
        n_oedema = int(round((whole_ml - core_ml) * 1000.0 / v**3))
        oedema_bin = _top_voxels(score, candidates, n_oedema)
        labels, _ = ndi.label(oedema_bin | core_bin)
        keep = np.unique(labels[core_bin])
        oedema_bin &= np.isin(labels, keep[keep > 0])
        # Vasogenic oedema fades away from the tumour: the labelled region is whole, its water excess is not.
        from_core = ndi.distance_transform_edt(~core_bin) * v
        strength = OEDEMA_FLOOR + (1.0 - OEDEMA_FLOOR) * np.exp(-from_core / 8.0)
        strength = np.clip(strength + 0.15 * smooth_noise(nrng, shape, 4.0, v), 0.2, 1.0)
        oedema = np.clip(_soften(oedema_bin) - core, 0.0, 1.0) * final.channels[MASK] * strength
        components = [
            (oedema, LESION_TISSUES["oedema"]),
            (enhancing, LESION_TISSUES["enhancing"]),
            (necrosis, LESION_TISSUES["necrosis"]),
        ]
        seg = np.where(core_bin, np.where(necrosis >= enhancing, 1, 4), np.where(oedema_bin, 2, 0))
        seg = (seg * final.brain).astype(np.uint8)
        info = {
            "core_target_ml": core_ml,
            "whole_target_ml": whole_ml,
            "mass_effect_mm": amplitude,
            "necrosis_radius_fraction": necrosis_radius,
        }
        return components, seg, info

    return LesionPlan(second, paint)


def plan_ms(rng: np.random.Generator, anat: SubjectAnatomy, size_q: float) -> LesionPlan:
    """MSLUB-like: periventricular ovoids along the ventricle-radial direction (Dawson's fingers)."""
    n_lesions = int(round(_lognormal_quantile(size_q, 20.0, 0.6, 3.0, 100.0)))
    pools = rng.choice(4, size=n_lesions, p=[0.5, 0.25, 0.15, 0.10])
    volumes = [_lognormal(rng, MS_LESION_MEDIAN_MM3, 1.1, 10.0, 5000.0) for _ in range(n_lesions)]
    shapes = [(rng.uniform(1.3, 2.2), rng.random() < 0.2) for _ in range(n_lesions)]
    draws = rng.integers(2**32, size=n_lesions)

    def paint(final: SubjectAnatomy):
        ch, v, shape = final.channels, final.v, final.shape
        rel = final.relative_mm()
        brain = final.brain
        wm = brain & (ch[WM] > 0.5)
        pool_maps = [
            wm & (ch[D_VENT] >= 2.0) & (ch[D_VENT] <= 10.0),  # periventricular
            wm & (ch[D_VENT] > 10.0) & (ch[DEPTH] > 10.0),  # deep WM
            brain & (ch[WM] > 0.3) & (ch[GM] > 0.3) & (ch[DEPTH] < 15.0),  # juxtacortical
            wm & (rel[..., 2] < -30.0),  # infratentorial
        ]
        grad = np.stack(np.gradient(ndi.gaussian_filter(ch[D_VENT], 1.0)), axis=-1)
        plaque = np.zeros(shape)
        black_hole = np.zeros(shape)
        for pool, vol, (elongation, has_hole), draw in zip(pools, volumes, shapes, draws, strict=True):
            lrng = np.random.default_rng(draw)
            c_idx = _pick_voxel(lrng, pool_maps[pool], wm)
            direction = grad[tuple(c_idx)]
            if np.linalg.norm(direction) < 1e-6:
                direction = lrng.standard_normal(3)
            direction = direction / np.linalg.norm(direction)
            ortho = np.linalg.qr(np.column_stack([direction, lrng.standard_normal((3, 2))]))[0].T
            axes = np.vstack([direction, ortho[1], ortho[2]])
            a = (3.0 * vol / (4.0 * np.pi * elongation)) ** (1.0 / 3.0)
            radii = np.array([a * elongation, a, a])
            paint_ellipsoid(plaque, c_idx * v, radii, axes, v, volume_mm3=vol)
            if has_hole:
                paint_ellipsoid(black_hole, c_idx * v, radii * 0.55, axes, v, volume_mm3=vol * 0.55**3)
        share = _parenchyma_fraction(final) * ch[MASK]
        black_hole = np.minimum(black_hole, plaque) * share
        plaque = (plaque * share) - black_hole
        seg = ((plaque + black_hole) > 0.5) & brain
        components = [(plaque, LESION_TISSUES["ms_plaque"]), (black_hole, LESION_TISSUES["ms_black_hole"])]
        info = {"n_lesions_drawn": n_lesions, "target_load_ml": float(np.sum(volumes)) / 1000.0}
        return components, seg.astype(np.uint8), info

    return LesionPlan(None, paint)


def plan_wmh(rng: np.random.Generator, anat: SubjectAnatomy, size_q: float) -> LesionPlan:
    """WMH-challenge-like: periventricular caps and bands plus patchy deep foci, bilateral."""
    target_ml = _lognormal_quantile(size_q, WMH_MEDIAN_ML, 0.9, 0.5, 80.0)
    noise_seed = rng.integers(2**32)

    def paint(final: SubjectAnatomy):
        ch, v, shape = final.channels, final.v, final.shape
        noise = smooth_noise(np.random.default_rng(noise_seed), shape, 5.0, v)
        score = np.exp(-ch[D_VENT] / 6.0) + 0.25 * noise
        candidates = final.brain & (ch[WM] > 0.5) & (ch[VENT] < 0.5) & (_parenchyma_fraction(final) > 0.7)
        binary = _top_voxels(score, candidates, int(round(target_ml * 1000.0 / v**3)))
        frac = _soften(binary)
        frac = np.where(binary, frac, frac * _parenchyma_fraction(final) * ch[MASK])
        seg = binary & final.brain
        return [(frac, LESION_TISSUES["wmh"])], seg.astype(np.uint8), {"target_volume_ml": target_ml}

    return LesionPlan(None, paint)


def plan_stroke(rng: np.random.Generator, anat: SubjectAnatomy, size_q: float) -> LesionPlan:
    """ATLAS-like chronic stroke: territorial wedge (or lacunes), CSF-like core, gliotic rim, ex vacuo."""
    v, shape = anat.v, anat.shape
    # The smallest fifth of the size distribution are lacunar infarcts (20-30 % lacunes, §4.2).
    lacunar = size_q < 0.2
    target_ml = _lognormal_quantile(size_q, STROKE_MEDIAN_ML, STROKE_SIGMA, 0.3, 250.0)
    hemi = 1.0 if rng.random() < 0.5 else -1.0
    rel_apex = np.array([hemi * rng.uniform(19.0, 25.0), rng.uniform(-30.0, 25.0), rng.uniform(-5.0, 25.0)])
    yaw, pitch = np.deg2rad(rng.uniform(-35.0, 35.0)), np.deg2rad(rng.uniform(-30.0, 30.0))
    axis = np.array([hemi * np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
    half_angle = np.deg2rad(rng.uniform(12.0, 35.0))
    n_lacunes = int(rng.integers(1, 4)) if lacunar else int(rng.random() < 0.2)
    lacune_draws = rng.integers(2**32, size=n_lacunes)
    noise_seed = rng.integers(2**32)
    cavitation = rng.uniform(STROKE_CAVITATION[0], STROKE_CAVITATION[1])
    # Ex-vacuo dilation of the ipsilateral lateral ventricle, growing with the infarct.
    growth = 0.0 if lacunar else 0.05 + 0.2 * min(target_ml / 50.0, 1.0)
    vent = anat.base.lateral_vent_mm[1 if hemi > 0 else 0]
    p = _grid_mm(shape, v)
    second = p + _radial_dilation(p, vent, growth, (12.0, 25.0, 12.0)) if growth > 0 else None

    def paint(final: SubjectAnatomy):
        ch = final.channels
        brain = final.brain
        rel = final.relative_mm()
        parenchyma = brain & ((ch[GM] + ch[WM]) > 0.5)
        tissue = brain & ((ch[GM] + ch[WM]) > 0.3) & (ch[VENT] < 0.5)  # an old infarct also takes in sulci
        lesion = np.zeros(shape, dtype=bool)
        if not lacunar:
            lesion |= _territorial_infarct(
                rel, p, rel_apex, axis, hemi, half_angle, tissue, noise_seed, target_ml, shape, v
            )
        deep = brain & (ch[GM] > 0.4) & (ch[DEPTH] > 25.0) & (rel[..., 2] > -25.0) & (rel[..., 2] < 5.0)
        pons = (
            brain
            & (ch[WM] > 0.4)
            & (np.abs(rel[..., 0]) < 8.0)
            & (rel[..., 2] < -30.0)
            & (rel[..., 2] > -60.0)
        )
        lacune_ml = _paint_lacunes(lesion, lacune_draws, deep, pons, parenchyma, brain, shape, v)
        if not lesion.any():
            lesion[tuple(_pick_voxel(rng, deep, parenchyma))] = True
        frac = _soften(lesion) * ch[MASK]
        # CSF-like core inside a gliotic rim (demo-data.md §4.2).
        inside = ndi.distance_transform_edt(lesion) * v
        core_weight = np.clip((inside - STROKE_RIM_MM) / v + 0.5, 0.0, 1.0)
        # Incomplete cavitation: part of the core is gliotic tissue rather than CSF-like fluid.
        components = [
            (frac * core_weight * cavitation, LESION_TISSUES["stroke_core"]),
            (frac * (1.0 - core_weight * cavitation), LESION_TISSUES["gliosis"]),
        ]
        seg = (frac > 0.5) & brain
        info = {
            "lacunar": bool(lacunar),
            "n_lacunes": int(n_lacunes),
            "target_volume_ml": 0.0 if lacunar else target_ml,
            "half_angle_deg": float(np.rad2deg(half_angle)),
            "hemisphere": "right" if hemi > 0 else "left",
            "cavitation": cavitation,
            "lacune_ml": lacune_ml,
        }
        return components, seg.astype(np.uint8), info

    return LesionPlan(second, paint)


def _territorial_infarct(
    rel, p, rel_apex, axis, hemi, half_angle, tissue, noise_seed, target_ml, shape, v
) -> np.ndarray:
    """Territorial wedge of `target_ml` in a cone from the apex, widened until the volume fits (stroke)."""
    # Template position of the apex -> the subject voxel nearest to it.
    dist_apex = np.sum((rel - rel_apex) ** 2, axis=-1)
    apex = np.array(np.unravel_index(np.argmin(dist_apex), shape)) * v
    d = p - apex
    along = d @ axis
    cos_angle = along / np.maximum(np.linalg.norm(d, axis=-1), 1e-6)
    same_side = np.sign(rel[..., 0]) == hemi
    noise = smooth_noise(np.random.default_rng(noise_seed), shape, 5.0, v)
    n_target = max(int(round(target_ml * 1000.0 / v**3)), 1)
    angle = half_angle
    hemisphere_tissue = tissue & same_side
    while True:
        cone = tissue & same_side & (cos_angle >= np.cos(angle)) & (along > 0)
        # Grown from the cortex inward until the volume is reached: a wedge with its base on the cortex.
        score = along + 3.0 * noise
        chosen = _top_voxels(score, cone, n_target)
        labels, n = ndi.label(chosen)
        if n > 1:
            sizes = ndi.sum_labels(chosen, labels, np.arange(1, n + 1))
            chosen = labels == 1 + int(np.argmax(sizes))
        chosen = _grow_region(score, cone, chosen, n_target)  # one connected territory
        if chosen.sum() >= 0.9 * n_target:
            break
        if angle >= np.deg2rad(75.0):
            # Still short of a large infarct: let it spread through the hemisphere's tissue.
            chosen = _grow_region(-np.sqrt(np.sum(d**2, axis=-1)), hemisphere_tissue, chosen, n_target)
            break
        angle += np.deg2rad(5.0)  # the cone is too small for the volume: widen the territory
    return chosen


def _paint_lacunes(lesion, lacune_draws, deep, pons, parenchyma, brain, shape, v) -> float:
    """Add one 3-15 mm lacune per draw to `lesion` (in place); return their nominal volume in mL."""
    lacune_ml = 0.0
    for draw in lacune_draws:
        lrng = np.random.default_rng(draw)
        pool = deep if lrng.random() < 0.8 else pons
        c = _pick_voxel(lrng, pool, parenchyma) * v
        radius = lrng.uniform(1.5, 7.5)  # 3-15 mm blobs
        blob = np.zeros(shape)
        paint_ellipsoid(blob, c, radius * lrng.uniform(0.8, 1.25, 3), _random_axes(lrng), v)
        lesion |= (blob > 0.5) & brain
        lacune_ml += 4.0 / 3.0 * np.pi * radius**3 / 1000.0
    return lacune_ml


LESION_PLANNERS = {"tumour": plan_tumour, "ms": plan_ms, "wmh": plan_wmh, "stroke": plan_stroke}
