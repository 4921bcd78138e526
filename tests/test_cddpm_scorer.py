"""The original cDDPM scoring as scorer `cddpm` (method.md §4.6): its map, its noise levels, its reconstructions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from conftest import REPO
from mhd_uad.config import compose
from mhd_uad.errors import ConfigError, MhdUadError
from mhd_uad.models.cddpm import ConditionedDDPM
from mhd_uad.models.inference import (
    MhdSettings,
    ensemble_seeds,
    reconstruct_scan,
    reconstruction_seeds,
    score_volume,
)
from mhd_uad.scoring.anomaly_maps import CONNECTED_COMPONENT_SCORERS, anomaly_maps

# ---------------------------------------------------------------- the map, by hand


def _erode_cross_by_hand(brain: np.ndarray, iterations: int) -> np.ndarray:
    """Per axial slice: a pixel survives when it and its 4 in-slice neighbours are brain (outside the slice: not)."""
    m = brain.copy()
    for _ in range(iterations):
        p = np.pad(m, ((0, 0), (1, 1), (1, 1)), constant_values=False)
        m = p[:, 1:-1, 1:-1] & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    return m


def _median_5_by_hand(v: np.ndarray) -> np.ndarray:
    """5×5×5 median with scipy's 'reflect' border (numpy's 'symmetric': the edge voxel repeats)."""
    windows = sliding_window_view(np.pad(v, 2, mode="symmetric"), (5, 5, 5))
    return np.median(windows.reshape(*v.shape, 125), axis=-1)


def _scan(seed: int = 0, shape=(8, 30, 50)):
    rng = np.random.default_rng(seed)
    s, h, w = shape
    mask = np.zeros(shape, dtype=np.float32)
    mask[:, 4 : h - 4, 6 : w - 6] = 1.0
    mask[:, 10:14, 20:26] = 0.0  # a hole: the erosion eats around it too
    healthy = rng.random(shape) * mask
    x = healthy.copy()
    x[2:6, 14:20, 28:36] += 0.7  # a bright lesion no reconstruction shows
    ens = (healthy[None] + 0.1 * rng.standard_normal((3, *shape))) * mask
    recos = healthy[None] + 0.05 * rng.standard_normal((4, *shape))
    return x.astype(np.float32), recos.astype(np.float32), ens.astype(np.float32), mask


def test_cddpm_map_is_the_hand_computed_ens_l1_erosion_median():
    x, recos, ens, mask = _scan()
    # §4.6 in the original's code order: x̂ = mean of the three ENS reconstructions; |x − x̂|; × the brain
    # mask (> 0) eroded per slice with the cross, W // 25 = 50 // 25 = 2 times; then the 5³ median
    x_hat = (ens[0].astype(np.float64) + ens[1] + ens[2]) / 3.0
    residual = np.abs(x.astype(np.float64) - x_hat)
    expected = _median_5_by_hand(residual * _erode_cross_by_hand(mask > 0, 2))
    out = anomaly_maps(x, recos, mask, scorers=("cddpm",), ensemble=ens)["cddpm"]
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.max() > 0.5  # the lesion is there, the comparison is not trivially all zeros
    # it reads the ensemble, not the N reconstructions (l1_mean_postproc does the same steps on their mean)
    both = anomaly_maps(x, recos, mask, scorers=("cddpm", "l1_mean_postproc"), ensemble=ens)
    np.testing.assert_array_equal(both["cddpm"], out)
    assert np.abs(both["l1_mean_postproc"] - out).max() > 1e-2
    same = anomaly_maps(x, recos, mask, scorers=("cddpm", "l1_mean_postproc"), ensemble=recos)
    np.testing.assert_allclose(same["cddpm"], same["l1_mean_postproc"], atol=1e-7)
    # Dice after the ≥ 8-voxel connected-component filter (§4.6 step 4), as for the mean-based L1 scorer
    assert set(CONNECTED_COMPONENT_SCORERS) == {"cddpm", "l1_mean_postproc"}


# ---------------------------------------------------------------- params


@pytest.fixture(scope="module")
def params():
    return compose([], REPO)


def test_noise_levels_are_one_based_like_noise_level(params):
    settings = MhdSettings.from_params(params)
    assert list(params.mhd.cddpm_noise_levels) == [250, 500, 750]
    assert settings.cddpm_t_indices == (249, 499, 749)  # t = 250 of 1000 -> index 249, as noise_level 500 -> 499
    assert settings.t_index == 499
    assert "cddpm" in settings.scorers and "l1_mean_postproc" in settings.scorers and "l1" not in settings.scorers


@pytest.mark.parametrize("levels", [[0, 500], [250, 1001], [], [500, 500], "abc", 500, [250.5], None])
def test_invalid_noise_levels_name_the_key(params, levels):
    p = copy.deepcopy(params)
    p.mhd.cddpm_noise_levels = levels
    with pytest.raises(ConfigError, match=r"mhd\.cddpm_noise_levels"):
        MhdSettings.from_params(p)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_channels_last_must_be_a_boolean_or_auto(params, value):
    from mhd_uad.models.inference import use_channels_last

    p = copy.deepcopy(params)
    auto = MhdSettings.from_params(p).channels_last
    assert auto is None  # the default: auto, NHWC where measured faster
    assert use_channels_last(auto, torch.device("cpu")) and not use_channels_last(auto, torch.device("cuda"))
    assert use_channels_last(True, torch.device("cuda")) and not use_channels_last(False, torch.device("cpu"))
    p.mhd.channels_last = value
    with pytest.raises(ConfigError, match=r"mhd\.channels_last"):
        MhdSettings.from_params(p)


def test_noise_levels_may_be_unset_when_cddpm_is_not_asked_for(params):
    p = copy.deepcopy(params)
    p.mhd.cddpm_noise_levels = None
    p.evaluate.scorers = ["mhd", "single"]
    assert MhdSettings.from_params(p).cddpm_t_indices == ()


# ---------------------------------------------------------------- the reconstructions


class _StubUNet(nn.Module):
    """x0_hat depends on x_t, t and the conditioning, and records the t of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.t_seen: list[int] = []

    def forward(self, x_t, t, cond):
        self.t_seen += [int(v) for v in t]
        return torch.tanh(x_t * (1.0 + t.float()[:, None, None, None] / 1000.0) + cond[:, :, None, None])


class _CountingEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x01):
        self.calls += 1
        return x01.mean(dim=(2, 3))  # [B, 1]


def _settings(scorers=("mhd", "single", "cddpm")) -> MhdSettings:
    return MhdSettings(num_reconstructions=3, t_index=499, ridge=1e-2, seed=3141, max_batch=5, precision="32",
                       scorers=scorers, cddpm_t_indices=(249, 499, 749))


def _volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((6, 16, 16), dtype=np.float32)
    mask[:, 3:13, 3:13] = 1.0
    return (rng.random(mask.shape) * mask).astype(np.float32), mask


def test_ensemble_is_one_reconstruction_per_t_seeded_by_scan_and_t():
    model = ConditionedDDPM(_StubUNet(), _CountingEncoder())
    image, _ = _volume()
    settings = _settings()
    recos, ens = reconstruct_scan(model, image, settings, "scan-a", ensemble=True)
    assert model.encoder.calls == 1  # one encoder pass serves the N reconstructions and the ensemble
    assert recos.shape == (3, *image.shape) and ens.shape == (3, *image.shape) and ens.dtype == np.float32
    assert sorted(set(model.unet.t_seen)) == [249, 499, 749]

    seeds = ensemble_seeds(settings.seed, "scan-a", (249, 499, 749))
    assert len(set(seeds)) == 3 and not set(seeds) & set(reconstruction_seeds(settings.seed, "scan-a", 3))
    x = torch.from_numpy(image)[:, None]
    with torch.inference_mode():
        cond = model.encode(x)
        for k, (t, seed) in enumerate(zip((249, 499, 749), seeds, strict=True)):
            direct = model.reconstruct(x, t, seed, cond=cond)[:, 0].numpy()
            np.testing.assert_allclose(ens[k], direct, atol=1e-6, err_msg=f"t index {t}")
    assert np.abs(ens[0] - ens[2]).max() > 1e-3  # different t: different reconstructions

    again_recos, again = reconstruct_scan(model, image, settings, "scan-a", ensemble=True)
    np.testing.assert_array_equal(again, ens)  # the same scan repeats exactly
    np.testing.assert_array_equal(again_recos, recos)
    other = reconstruct_scan(model, image, settings, "scan-b", ensemble=True)[1]
    assert np.abs(other - ens).max() > 1e-3
    # a seed depends on its own t only: the 500 of a [500]-only list is the 500 of [250, 500, 750]
    assert ensemble_seeds(settings.seed, "scan-a", (499,)) == [seeds[1]]


def test_ensemble_is_only_made_when_cddpm_is_asked_for():
    model = ConditionedDDPM(_StubUNet(), _CountingEncoder())
    image, mask = _volume(1)
    maps, _ = score_volume(model, image, mask, _settings(("mhd", "single")), "scan-a")
    assert set(maps) == {"mhd", "single"} and set(model.unet.t_seen) == {499}
    assert reconstruct_scan(model, image, _settings(), "scan-a")[1] is None

    model.unet.t_seen.clear()
    maps, _ = score_volume(model, image, mask, _settings(), "scan-a")
    assert set(maps) == {"mhd", "single", "cddpm"} and set(model.unet.t_seen) == {249, 499, 749}
    np.testing.assert_array_equal(score_volume(model, image, mask, _settings(), "scan-a")[0]["cddpm"], maps["cddpm"])

    no_levels = MhdSettings(**{**_settings().__dict__, "cddpm_t_indices": ()})
    with pytest.raises(MhdUadError, match="cddpm_noise_levels"):
        score_volume(model, image, mask, no_levels, "scan-a")


# ---------------------------------------------------------------- the results legend


def test_every_scorer_has_a_label_and_one_legend_line_in_table_order():
    from mhd_uad.evaluation.report import SCORER_LABELS, SCORER_LEGEND, summary_markdown
    from mhd_uad.scoring.anomaly_maps import SCORERS

    assert set(SCORERS) <= set(SCORER_LABELS) and set(SCORER_LABELS) == set(SCORER_LEGEND)
    block = {"auprc": 0.5, "auprc_std": 0.1, "dice": 0.4, "dice_std": 0.1}
    metrics = {"A": {"cddpm": block, "mhd": block, "volumes": {"n_folds": 1}}, "B": {"single": block, "volumes": {"n_folds": 1}}}
    text = summary_markdown(metrics, "demo")
    assert text == summary_markdown(metrics, "demo")
    legend = [line for line in text.splitlines() if line.startswith("- ")]
    assert [line.split("`")[1] for line in legend] == ["mhd", "single", "cddpm"]
    assert "ENS t = 250/500/750" in legend[2] and "method.md §4.6" in legend[2]


def test_fp16_autocast_falls_back_to_bf16_on_the_cpu():
    from mhd_uad.models.inference import _autocast

    with _autocast(torch.device("cpu"), "16-mixed"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with _autocast(torch.device("cpu"), "32"):
        assert not torch.is_autocast_enabled("cpu")


def test_channels_last_passes_give_the_same_reconstructions():
    from dataclasses import replace

    from mhd_uad.models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(16, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), num_head_channels=8, groupnorm_groups=4, cond_dim=1)
    for p in unet.parameters():  # the zero-initialised output layer would hide any difference
        torch.nn.init.normal_(p, std=0.2)
    model = ConditionedDDPM(unet, _CountingEncoder())
    image, _ = _volume(2)
    default, _ = reconstruct_scan(model, image, _settings(), "scan-a")
    fast, _ = reconstruct_scan(model, image, replace(_settings(), channels_last=True), "scan-a")
    assert next(p for p in model.unet.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(fast, default, atol=1e-5)
    assert np.abs(default - default.mean()).max() > 1e-3  # a real, non-constant output was compared


def test_maps_made_on_the_device_equal_the_cpu_maps_and_keep_the_reconstructions_when_asked():
    """evaluate.maps_on=device (auto on a GPU): device_part makes the maps in torch where the model runs
    (scoring.device_maps); here the device is the CPU, and the maps equal the numpy path's to 1e-5."""
    from dataclasses import replace

    from mhd_uad.models.inference import cpu_part, device_part, maps_on_device
    from mhd_uad.scoring.anomaly_maps import SCORERS

    model = ConditionedDDPM(_StubUNet(), _CountingEncoder())
    image, mask = _volume(2)
    on_cpu = replace(_settings(SCORERS), maps_on="cpu")
    on_device = replace(on_cpu, maps_on="device")
    assert not maps_on_device(replace(on_cpu, maps_on="auto"), torch.device("cpu"))
    assert maps_on_device(replace(on_cpu, maps_on="auto"), torch.device("cuda")) and maps_on_device(on_device, "cpu")
    reference, reference_mean = cpu_part(image, mask, device_part(model, image, mask, on_cpu, "scan-a"), on_cpu)
    made = device_part(model, image, mask, on_device, "scan-a")
    assert made.maps is not None and made.recos is None
    maps, mean = cpu_part(image, mask, made, on_device)
    assert list(maps) == list(SCORERS)
    for s in SCORERS:
        np.testing.assert_allclose(maps[s], reference[s], atol=1e-5, rtol=0, err_msg=s)
    np.testing.assert_allclose(mean, reference_mean, atol=1e-6)
    # the share in the span from the device's own solve: the reconstructions stay there, the value is the CPU's
    diag, reference_diag = {}, {}
    cpu_part(image, mask, device_part(model, image, mask, on_cpu, "scan-a", diagnostics=True), on_cpu,
             diagnostics=reference_diag)
    kept = device_part(model, image, mask, on_device, "scan-a", diagnostics=True)
    cpu_part(image, mask, kept, on_device, diagnostics=diag)
    assert kept.recos is None and 0 <= diag["residual_share_in_span"] <= 1
    assert diag["residual_share_in_span"] == pytest.approx(reference_diag["residual_share_in_span"], abs=1e-6)
    with pytest.raises(MhdUadError, match="diagnostics=True"):
        cpu_part(image, mask, made, on_device, diagnostics={})


def test_maps_on_must_name_a_place(params):
    p = copy.deepcopy(params)
    p.evaluate.maps_on = "gpu"
    with pytest.raises(ConfigError, match=r"evaluate\.maps_on"):
        MhdSettings.from_params(p)
