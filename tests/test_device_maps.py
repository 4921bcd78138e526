"""The torch anomaly maps (scoring/device_maps.py) against the numpy path (scoring/anomaly_maps.py, scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.anomaly_maps import (
    SCORERS,
    anomaly_maps,
    distance_to_anomaly_map,
    eroded_brain_mask,
    l1_anomaly_map,
    normalise_min_max,
    smooth_volume,
)
from mhd_uad.scoring.device_maps import (
    anomaly_maps_torch,
    distance_to_anomaly_map_torch,
    eroded_brain_mask_torch,
    l1_anomaly_map_torch,
    median_filter_torch,
    normalise_min_max_torch,
    smooth_volume_torch,
    ssim_map_3d_torch,
)
from mhd_uad.scoring.ssim import ssim_map_3d

TOL = 1e-5


def _max_abs(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.abs(a.cpu().numpy().astype(np.float64) - np.asarray(b, dtype=np.float64)).max())


def _brain_case(shape: tuple[int, int, int], n: int = 10, ens: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A brain-shaped ellipsoid mask (1 inside, 0.5 on a soft border shell), an image in [0,1] with smooth
    structure and a bright lesion blob, N noisy reconstructions of the healthy image and an ensemble."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    centre = [(s - 1) / 2 + 0.3 for s in shape]
    radii = [0.42 * s for s in shape]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    mask = np.where(r2 <= 0.8, 1.0, np.where(r2 <= 1.0, 0.5, 0.0)).astype(np.float32)
    tissue = 0.35 + 0.4 * ndimage.gaussian_filter(rng.random(shape), 2.0) + 0.15 * np.cos(grids[2] / 3.0)
    healthy = np.clip(tissue, 0.0, 1.0) * (mask > 0)
    lesion_centre = [c + 0.2 * r for c, r in zip(centre, radii, strict=True)]
    blob = sum(((g - c) / (0.12 * s + 1)) ** 2 for g, c, s in zip(grids, lesion_centre, shape, strict=True)) <= 1
    image = np.clip(healthy + 0.45 * (blob & (mask > 0)), 0.0, 1.0)
    noise = 0.03 * ndimage.gaussian_filter(rng.standard_normal((n, *shape)), (0, 0.7, 0.7, 0.7))
    recos = np.clip(healthy[None] + noise * 3, 0.0, 1.0)
    ensemble = np.clip(healthy[None] + 0.05 * rng.standard_normal((ens, *shape)), 0.0, 1.0)
    return {
        "image": image.astype(np.float32),
        "recos": recos.astype(np.float32),
        "mask": mask,
        "ensemble": ensemble.astype(np.float32),
    }


def _both(case: dict[str, np.ndarray], with_mask: bool = True):
    mask = case["mask"] if with_mask else None
    ref = anomaly_maps(case["image"], case["recos"], mask, ensemble=case["ensemble"])
    got = anomaly_maps_torch(
        torch.from_numpy(case["image"]),
        torch.from_numpy(case["recos"]),
        None if mask is None else torch.from_numpy(mask),
        ensemble=torch.from_numpy(case["ensemble"]),
    )
    return ref, got


@pytest.fixture(scope="module")
def realistic() -> dict[str, np.ndarray]:
    return _brain_case((50, 96, 96))


@pytest.fixture(scope="module")
def realistic_maps(realistic):
    return _both(realistic)


# ---------------------------------------------------------------- whole maps equal the numpy path


@pytest.mark.parametrize("scorer", SCORERS)
def test_realistic_volume_every_scorer_equals_numpy(realistic_maps, scorer):
    ref, got = realistic_maps
    assert list(got) == list(SCORERS)
    assert got[scorer].dtype == torch.float32 and tuple(got[scorer].shape) == (50, 96, 96)
    assert float(np.abs(ref[scorer]).max()) > 1e-2  # a non-trivial map, so the comparison means something
    assert _max_abs(got[scorer], ref[scorer]) <= TOL


@pytest.mark.parametrize("with_mask", [True, False])
def test_small_odd_volume_every_scorer_equals_numpy(with_mask):
    ref, got = _both(_brain_case((7, 26, 30), n=4, ens=2, seed=1), with_mask=with_mask)
    for scorer in SCORERS:
        assert float(np.abs(ref[scorer]).max()) > 1e-3, scorer
        assert _max_abs(got[scorer], ref[scorer]) <= TOL, scorer


def test_order_and_subset_follow_the_request(realistic):
    t = {k: torch.from_numpy(v) for k, v in realistic.items()}
    got = anomaly_maps_torch(t["image"], t["recos"], t["mask"], scorers=["nocov", "single"])
    assert list(got) == ["nocov", "single"]


# ---------------------------------------------------------------- each step equals its numpy/scipy twin


@pytest.mark.parametrize("shape", [(50, 96, 96), (7, 26, 30), (5, 9, 6)])
def test_ssim_map_equals_numpy(shape):
    rng = np.random.default_rng(2)
    a = ndimage.gaussian_filter(rng.random(shape), 1.0).astype(np.float32)
    b = (a + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    got = ssim_map_3d_torch(torch.from_numpy(a), torch.from_numpy(b))
    assert got.dtype == torch.float32
    assert _max_abs(got, ssim_map_3d(a, b)) <= 1e-6
    # explicit data_range and constant volumes (range 0 -> 1.0)
    assert _max_abs(ssim_map_3d_torch(torch.from_numpy(a), torch.from_numpy(b), data_range=2.0),
                    ssim_map_3d(a, b, data_range=2.0)) <= 1e-6
    c = np.full(shape, 0.3, dtype=np.float32)
    assert _max_abs(ssim_map_3d_torch(torch.from_numpy(c), torch.from_numpy(c * 0)), ssim_map_3d(c, c * 0)) <= 1e-6


@pytest.mark.parametrize("shape", [(50, 96, 96), (7, 26, 30), (3, 2, 11)])
@pytest.mark.parametrize("sigma", [1.0, 0.6, 2.5])
def test_smooth_volume_equals_scipy(shape, sigma):
    v = np.random.default_rng(3).random(shape)
    got = smooth_volume_torch(torch.from_numpy(v), sigma)
    assert got.dtype == torch.float64
    assert _max_abs(got, smooth_volume(v, sigma)) <= 1e-12


def test_normalise_and_distance_assembly_equal_numpy(realistic):
    rng = np.random.default_rng(4)
    d = (rng.random((7, 26, 30)) * 3).astype(np.float32)
    assert _max_abs(normalise_min_max_torch(torch.from_numpy(d)), normalise_min_max(d)) <= 1e-12
    const = np.full((4, 5, 6), 2.5)
    assert _max_abs(normalise_min_max_torch(torch.from_numpy(const)), normalise_min_max(const)) == 0.0
    s = rng.random((7, 26, 30)).astype(np.float32)
    m = (rng.random((7, 26, 30)) > 0.3).astype(np.float32) * 0.5
    got = distance_to_anomaly_map_torch(torch.from_numpy(d), torch.from_numpy(s), torch.from_numpy(m))
    assert got.dtype == torch.float32
    assert _max_abs(got, distance_to_anomaly_map(d, s, m)) <= 1e-7


@pytest.mark.parametrize("iterations", [None, 0, 1, 3, 5])
def test_eroded_mask_equals_scipy(realistic, iterations):
    mask = realistic["mask"]
    got = eroded_brain_mask_torch(torch.from_numpy(mask), iterations).numpy()
    ref = eroded_brain_mask(mask, iterations)
    assert got.dtype == bool and np.array_equal(got, ref)
    assert np.array_equal(got, mask > 0) == (iterations == 0)


@pytest.mark.parametrize("iterations", [None, 0, 1, 2, 4])  # None: W // 25 = 1 here, H // 25 = 0
def test_eroded_mask_touching_the_border_equals_scipy(iterations):
    rng = np.random.default_rng(5)
    mask = (ndimage.gaussian_filter(rng.random((6, 23, 31)), 1.5) > 0.48).astype(np.uint8)
    mask[:, :4, :] = 1  # the brain runs into the top and left slice borders
    mask[:, :, :3] = 2
    got = eroded_brain_mask_torch(torch.from_numpy(mask), iterations).numpy()
    assert np.array_equal(got, eroded_brain_mask(mask, iterations))
    if iterations:
        assert not got[:, 0, :].any() and not got[:, :, 0].any()


@pytest.mark.parametrize("shape", [(50, 96, 96), (7, 26, 30), (3, 4, 9)])
def test_median_filter_equals_scipy_reflect(shape):
    rng = np.random.default_rng(6)
    v = rng.standard_normal(shape).astype(np.float32)
    got = median_filter_torch(torch.from_numpy(v))
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), ndimage.median_filter(v, size=5, mode="reflect"))
    ties = rng.integers(0, 4, shape).astype(np.float32)  # many equal values per window
    assert np.array_equal(median_filter_torch(torch.from_numpy(ties)).numpy(),
                          ndimage.median_filter(ties, size=5, mode="reflect"))
    assert np.array_equal(median_filter_torch(torch.from_numpy(v), size=3).numpy(),
                          ndimage.median_filter(v, size=3, mode="reflect"))


def test_median_filter_chunks_give_the_same_result(monkeypatch):
    import mhd_uad.scoring.device_maps as dm

    v = torch.from_numpy(np.random.default_rng(7).random((9, 12, 14)).astype(np.float32))
    whole = median_filter_torch(v)
    monkeypatch.setattr(dm, "_MEDIAN_CHUNK_ELEMENTS", 2 * 12 * 14 * 125)  # 2 slices per chunk
    assert torch.equal(median_filter_torch(v), whole)


@pytest.mark.parametrize("iterations", [None, 0, 2])
def test_l1_map_equals_numpy(realistic, iterations):
    x, r, m = realistic["image"], realistic["recos"][1], realistic["mask"]
    got = l1_anomaly_map_torch(torch.from_numpy(x), torch.from_numpy(r), torch.from_numpy(m), iterations)
    ref = l1_anomaly_map(x, r, m, iterations)
    assert got.dtype == torch.float32 and ref.max() > 0.1
    assert _max_abs(got, ref) == 0.0


# ---------------------------------------------------------------- errors


def _small():
    c = _brain_case((7, 26, 30), n=3, ens=2, seed=8)
    return {k: torch.from_numpy(v) for k, v in c.items()}


def test_unknown_and_repeated_scorer_raise():
    t = _small()
    with pytest.raises(MhdUadError, match="unknown scorer"):
        anomaly_maps_torch(t["image"], t["recos"], t["mask"], scorers=["mhd", "nope"])
    with pytest.raises(MhdUadError, match="listed twice"):
        anomaly_maps_torch(t["image"], t["recos"], t["mask"], scorers=["mean", "mean"])


@pytest.mark.parametrize("scorer", ["mhd", "dmhd"])
def test_one_reconstruction_with_mhd_raises(scorer):
    t = _small()
    with pytest.raises(MhdUadError, match="N >= 2"):
        anomaly_maps_torch(t["image"], t["recos"][:1], t["mask"], scorers=[scorer])
    assert set(anomaly_maps_torch(t["image"], t["recos"][:1], t["mask"], scorers=["mean"])) == {"mean"}


def test_wrong_shapes_raise():
    t = _small()
    with pytest.raises(MhdUadError, match="image must be a volume"):
        anomaly_maps_torch(t["image"][0], t["recos"], t["mask"])
    with pytest.raises(MhdUadError, match="reconstructions must be"):
        anomaly_maps_torch(t["image"], t["recos"][:, :-1], t["mask"])
    with pytest.raises(MhdUadError, match="reconstructions must be"):
        anomaly_maps_torch(t["image"], t["recos"][0], t["mask"])
    with pytest.raises(MhdUadError, match="mask shape"):
        anomaly_maps_torch(t["image"], t["recos"], t["mask"][:, 1:])
    with pytest.raises(MhdUadError, match="ensemble must be"):
        anomaly_maps_torch(t["image"], t["recos"], t["mask"], scorers=["cddpm"], ensemble=t["ensemble"][0])
    with pytest.raises(MhdUadError, match="too small"):
        ssim_map_3d_torch(t["image"][:4], t["image"][:4])
    with pytest.raises(MhdUadError, match="odd"):
        median_filter_torch(t["image"], size=4)


@pytest.mark.parametrize("where", ["image", "recos", "mask", "ensemble"])
def test_nan_input_raises(where):
    t = _small()
    t[where] = t[where].clone()
    t[where].view(-1)[5] = float("nan")
    name = {"recos": "reconstructions"}.get(where, where)
    with pytest.raises(MhdUadError, match=f"{name} contains NaN"):
        anomaly_maps_torch(t["image"], t["recos"], t["mask"], ensemble=t["ensemble"])


def test_cddpm_without_ensemble_raises_and_others_ignore_it():
    t = _small()
    with pytest.raises(MhdUadError, match="cddpm scorer needs its ensemble"):
        anomaly_maps_torch(t["image"], t["recos"], t["mask"], scorers=["mhd", "cddpm"])
    bad = torch.full_like(t["ensemble"], float("nan"))  # only read for cddpm
    assert list(anomaly_maps_torch(t["image"], t["recos"], t["mask"], scorers=["l1_mean_postproc"], ensemble=bad))


def test_non_tensor_input_raises():
    t = _small()
    with pytest.raises(MhdUadError, match="torch tensor"):
        anomaly_maps_torch(t["image"].numpy(), t["recos"], t["mask"])


# ---------------------------------------------------------------- on the GPU


@pytest.mark.cuda
def test_cuda_equals_cpu(realistic):
    cpu = {k: torch.from_numpy(v) for k, v in realistic.items()}
    gpu = {k: v.cuda() for k, v in cpu.items()}
    ref = anomaly_maps_torch(cpu["image"], cpu["recos"], cpu["mask"], ensemble=cpu["ensemble"])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # mhd's float32 products in full precision, as on the CPU
    try:
        got = anomaly_maps_torch(gpu["image"], gpu["recos"], gpu["mask"], ensemble=gpu["ensemble"])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for scorer in SCORERS:
        assert got[scorer].is_cuda and got[scorer].dtype == torch.float32
        assert float((got[scorer].cpu() - ref[scorer]).abs().max()) <= TOL, scorer
    with pytest.raises(MhdUadError, match="share a device"):
        anomaly_maps_torch(gpu["image"], cpu["recos"], gpu["mask"])
