"""3-D SSIM (method.md §4.4) and anomaly-map assembly for mhd and the baselines (§4.2, §4.5, §4.6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.functional.image import structural_similarity_index_measure

from mhd_uad.data.geometry import from_slices, to_slices
from mhd_uad.errors import MhdUadError
from mhd_uad.scoring.anomaly_maps import (
    SCORERS,
    anomaly_maps,
    connected_component_filter,
    eroded_brain_mask,
    normalise_min_max,
)
from mhd_uad.scoring.mahalanobis import diagonal_mahalanobis, pixelwise_mahalanobis
from mhd_uad.scoring.ssim import gaussian_window_1d, ssim_map_3d


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Straightforward SSIM: pad 4 by reflection, slide the full 9×9×9 Gaussian window offset by offset."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    g = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    kernel = np.einsum("i,j,k->ijk", g, g, g)
    kernel /= kernel.sum()
    data_range = max(a.max() - a.min(), b.max() - b.min())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pa, pb = np.pad(a, 4, mode="reflect"), np.pad(b, 4, mode="reflect")
    moments = {k: np.zeros(a.shape) for k in ("a", "b", "aa", "bb", "ab")}
    s, h, w = a.shape
    for i in range(9):
        for j in range(9):
            for k in range(9):
                wa = pa[i : i + s, j : j + h, k : k + w]
                wb = pb[i : i + s, j : j + h, k : k + w]
                weight = kernel[i, j, k]
                moments["a"] += weight * wa
                moments["b"] += weight * wb
                moments["aa"] += weight * wa * wa
                moments["bb"] += weight * wb * wb
                moments["ab"] += weight * wa * wb
    mu_a, mu_b = moments["a"], moments["b"]
    var_a = moments["aa"] - mu_a**2
    var_b = moments["bb"] - mu_b**2
    cov = moments["ab"] - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def _volume(rng: np.random.Generator, shape=(12, 20, 24), n: int = 6, lesion: bool = True):
    """A smooth 'brain' inside a box mask spanning every slice, reconstructions that miss a bright lesion."""
    s, h, w = shape
    mask = np.zeros(shape, dtype=np.float32)
    mask[:, 3 : h - 3, 4 : w - 4] = 1.0
    x = ndimage.gaussian_filter(rng.random(shape), 1.5) * mask
    recos = x[None] + 0.02 * rng.standard_normal((n, *shape)) * mask
    if lesion:
        x = x.copy()
        x[4:8, 7:13, 9:15] += 0.6
    return x.astype(np.float32), recos.astype(np.float32), mask


# ---------------------------------------------------------------- SSIM


def test_gaussian_window_has_nine_normalised_taps():
    taps = gaussian_window_1d(1.0)
    assert taps.size == 9
    np.testing.assert_allclose(taps.sum(), 1.0)
    np.testing.assert_allclose(taps[4] / taps[5], np.exp(0.5))


def test_ssim_identical_volumes_is_one_everywhere_and_full_size():
    rng = np.random.default_rng(0)
    x = rng.random((10, 13, 17)).astype(np.float32)
    out = ssim_map_3d(x, x)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_ssim_matches_straightforward_reference():
    rng = np.random.default_rng(1)
    b = rng.random((10, 12, 14))
    a = 0.7 * b + 0.2 * rng.random(b.shape)
    out = ssim_map_3d(a, b)
    assert out.shape == b.shape
    np.testing.assert_allclose(out, _reference_ssim(a, b), atol=2e-6)
    assert out.min() < 0.9  # the inputs do differ: the comparison is not trivially all ones


def test_ssim_matches_torchmetrics_with_kernel_size_nine():
    rng = np.random.default_rng(2)
    b = rng.random((16, 20, 24)).astype(np.float32)
    a = (0.8 * b + 0.1 * rng.standard_normal(b.shape)).astype(np.float32)
    _, full = structural_similarity_index_measure(
        torch.from_numpy(a)[None, None],
        torch.from_numpy(b)[None, None],
        sigma=1.0,
        kernel_size=9,
        return_full_image=True,
    )
    assert tuple(full.shape[2:]) == b.shape
    np.testing.assert_allclose(ssim_map_3d(a, b), full[0, 0].numpy(), atol=1e-4)


def test_ssim_data_range_is_max_of_both_ranges():
    rng = np.random.default_rng(3)
    b = rng.random((10, 10, 10))
    a = 3.0 * b  # range 3 > range 1 of b
    np.testing.assert_allclose(ssim_map_3d(a, b), ssim_map_3d(a, b, data_range=float(np.ptp(a))), rtol=1e-6)
    assert np.abs(ssim_map_3d(a, b) - ssim_map_3d(a, b, data_range=float(np.ptp(b)))).max() > 1e-3


def test_ssim_rejects_bad_input():
    with pytest.raises(MhdUadError, match="does not match"):
        ssim_map_3d(np.zeros((10, 10, 10)), np.zeros((10, 10, 11)))
    with pytest.raises(MhdUadError, match="too small"):
        ssim_map_3d(np.zeros((4, 10, 10)), np.zeros((4, 10, 10)))
    with pytest.raises(MhdUadError, match="3-D"):
        ssim_map_3d(np.zeros((10, 10)), np.zeros((10, 10)))


# ---------------------------------------------------------------- assembly


def test_all_scorers_shapes_dtype_order_and_zero_outside_mask():
    rng = np.random.default_rng(4)
    x, recos, mask = _volume(rng)
    maps = anomaly_maps(x, recos, mask, ensemble=recos[:3])
    assert tuple(maps) == SCORERS
    for name, m in maps.items():
        assert m.shape == x.shape, name
        assert m.dtype == np.float32, name
        assert np.isfinite(m).all(), name
        assert (m >= 0).all(), name
        np.testing.assert_array_equal(m[mask == 0], 0.0, err_msg=name)
        assert m.max() > 0, name


def test_lesion_is_the_highest_scoring_region():
    rng = np.random.default_rng(5)
    x, recos, mask = _volume(rng)
    lesion = np.zeros(x.shape, dtype=bool)
    lesion[4:8, 7:13, 9:15] = True
    near = ndimage.binary_dilation(lesion, iterations=2)  # SSIM residuals peak at the lesion's rim
    for name, m in anomaly_maps(x, recos, mask, ensemble=recos[:3]).items():
        assert near[np.unravel_index(np.argmax(m), m.shape)], name
        assert m[lesion].mean() > 3 * m[~lesion & (mask > 0)].mean(), name


def test_mhd_family_follows_the_method_formula():
    """A = (1 − SSIM(μ, x)) · M · gauss_σ1(minmax(distance)) · M, assembled by hand from the parts."""
    rng = np.random.default_rng(6)
    x, recos, mask = _volume(rng)
    mu = recos.mean(0)
    s_mean = 1.0 - _reference_ssim(mu, x)
    brain = mask > 0

    def assemble(distance):
        d = distance.astype(np.float64)
        g = ndimage.gaussian_filter((d - d.min()) / (d.max() - d.min()), 1.0, mode="reflect", truncate=4.0)
        return s_mean * mask * g * mask

    maps = anomaly_maps(x, recos, mask, ridge=0.02, scorers=("mhd", "dmhd", "nocov", "mean", "single"))
    expected = {
        "mhd": assemble(pixelwise_mahalanobis(x, recos, brain, ridge=0.02)),
        "dmhd": assemble(diagonal_mahalanobis(x, recos, brain, ridge=0.02)),
        "nocov": assemble(np.abs(x - mu) * brain),
        "mean": s_mean * mask,
        "single": (1.0 - _reference_ssim(recos[0], x)) * mask,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(maps[name], value, atol=1e-5, err_msg=name)
    # the scorers really differ from one another
    assert np.abs(maps["single"] - maps["mean"]).max() > 1e-3
    assert np.abs(maps["mhd"] - maps["dmhd"]).max() > 1e-6


def test_l1_mean_postproc_follows_cddpm_postprocessing():
    rng = np.random.default_rng(7)
    x, recos, mask = _volume(rng, shape=(12, 40, 50))
    mu = recos.mean(0)
    eroded = np.stack(
        [
            ndimage.binary_erosion(
                mask[k] > 0, structure=ndimage.generate_binary_structure(2, 1), iterations=2
            )
            for k in range(x.shape[0])
        ]
    )  # W = 50 -> 50 // 25 = 2 iterations
    expected = ndimage.median_filter(np.abs(x - mu) * eroded, size=5, mode="reflect")
    out = anomaly_maps(x, recos, mask, scorers=("l1_mean_postproc",))["l1_mean_postproc"]
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_eroded_mask_per_slice_with_cross():
    mask = np.zeros((3, 11, 11), dtype=np.uint8)
    mask[:, 2:9, 2:9] = 1  # 7×7 square on every slice
    one = eroded_brain_mask(mask, iterations=1)
    np.testing.assert_array_equal(one[:, 3:8, 3:8], True)
    assert one.sum() == 3 * 25  # the first and last slices are not eroded along S
    # two cross erosions of a square give a square (cross ⊕ cross is a diamond inside the 5×5 box)
    two = eroded_brain_mask(mask, iterations=2)
    assert two.sum() == 3 * 9
    assert eroded_brain_mask(mask, iterations=0).sum() == mask.sum()
    # default iterations = W // 25: W = 11 -> 0 -> no erosion
    np.testing.assert_array_equal(eroded_brain_mask(mask), mask > 0)


def test_eroded_mask_uses_the_cross_not_the_box():
    mask = np.ones((1, 9, 9), dtype=bool)
    mask[0, 4, 4] = False  # a one-pixel hole
    out = eroded_brain_mask(mask, iterations=1)[0]
    assert not out[4, 4] and not out[3, 4] and not out[5, 4] and not out[4, 3] and not out[4, 5]
    assert out[3, 3] and out[5, 5] and out[3, 5] and out[5, 3]  # diagonal neighbours survive a cross
    assert not out[0].any() and not out[:, 0].any()  # the slice border counts as outside
    assert out.sum() == 7 * 7 - 5


def test_connected_component_filter_26_connectivity_and_size():
    vol = np.zeros((12, 12, 12), dtype=bool)
    for i in range(8):  # 8 voxels touching only corner to corner: one 26-connected component
        vol[i, i, i] = True
    vol[0:7, 11, 0] = True  # a 7-voxel straight line: removed
    vol[10, 0:2, 5:9] = True  # 8 voxels: kept
    out = connected_component_filter(vol, min_size=8)
    assert out[np.arange(8), np.arange(8), np.arange(8)].all()
    assert not out[0:7, 11, 0].any()
    assert out[10, 0:2, 5:9].all()
    assert out.sum() == 16
    assert connected_component_filter(np.zeros((3, 3, 3)), 8).sum() == 0


def test_torch_inputs_give_the_numpy_result():
    rng = np.random.default_rng(8)
    x, recos, mask = _volume(rng)
    a = anomaly_maps(x, recos, mask, ensemble=recos[3:])
    b = anomaly_maps(torch.from_numpy(x), torch.from_numpy(recos), torch.from_numpy(mask),
                     ensemble=torch.from_numpy(recos[3:]))
    for name in SCORERS:
        assert isinstance(b[name], np.ndarray)
        np.testing.assert_allclose(b[name], a[name], atol=1e-6, err_msg=name)


def test_subset_of_scorers_and_raw_mask_values():
    rng = np.random.default_rng(9)
    x, recos, mask = _volume(rng)
    maps = anomaly_maps(x, recos, mask * 0.5, scorers=("mean", "mhd"))
    assert tuple(maps) == ("mean", "mhd")
    full = anomaly_maps(x, recos, mask, scorers=("mean", "mhd"))
    np.testing.assert_allclose(maps["mean"], 0.5 * full["mean"], atol=1e-7)  # mask values multiply once
    np.testing.assert_allclose(maps["mhd"], 0.25 * full["mhd"], atol=1e-7)  # and twice in S·M·G·M


def test_bad_arguments_raise():
    rng = np.random.default_rng(10)
    x, recos, mask = _volume(rng)
    with pytest.raises(MhdUadError, match="unknown scorer"):
        anomaly_maps(x, recos, mask, scorers=("mhd", "fancy"))
    with pytest.raises(MhdUadError, match="N >= 2"):
        anomaly_maps(x, recos[:1], mask, scorers=("mhd",))
    assert set(anomaly_maps(x, recos[:1], mask, scorers=("single", "mean", "l1_mean_postproc"))) == {
        "single", "mean", "l1_mean_postproc"}
    with pytest.raises(MhdUadError, match="cddpm scorer needs its ensemble"):
        anomaly_maps(x, recos, mask, scorers=("cddpm",))
    with pytest.raises(MhdUadError, match="ensemble must be"):
        anomaly_maps(x, recos, mask, scorers=("cddpm",), ensemble=recos[:3, :-1])
    with pytest.raises(MhdUadError, match="ensemble contains NaN"):
        anomaly_maps(x, recos, mask, scorers=("cddpm",), ensemble=np.full_like(recos[:3], np.nan))
    with pytest.raises(MhdUadError, match="mask shape"):
        anomaly_maps(x, recos, mask[:, :-1])
    with pytest.raises(MhdUadError, match="NaN"):
        anomaly_maps(np.where(mask > 0, np.nan, x), recos, mask)


def test_helpers():
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # [X,Y,Z]
    shw = to_slices(v)
    assert shw.shape == (4, 2, 3)
    np.testing.assert_array_equal(shw[1], v[:, :, 1])
    np.testing.assert_array_equal(from_slices(shw), v)
    np.testing.assert_array_equal(normalise_min_max(np.full((2, 2), 3.0)), 0.0)
    np.testing.assert_allclose(normalise_min_max(np.array([1.0, 2.0, 5.0])), [0.0, 0.25, 1.0])
