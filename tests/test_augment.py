"""The batched augmentations against torchio 1.2.1: each op, the chain, the slice shortcut, the sampling."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchio as tio
from scipy import stats

from mhd_uad.data.augment import (
    BIAS_ORDER,
    GHOST_RESTORE,
    N_BIAS,
    AugmentParams,
    AugmentSettings,
    VolumeAugment,
    augment_slices,
    augment_volumes,
    sample_params,
)
from mhd_uad.errors import ConfigError

PAPER = ((50, 96, 96), 2.0)
DEMO = ((32, 64, 64), 3.0)
ODD = ((9, 24, 31), 0.5)  # odd sizes, and blur kernels longer than the S axis (σ up to 4 voxels)
ALL_ON = AugmentSettings(1.0, 1.0, 1.0, 1.0)
ALL_OFF = AugmentSettings(0.0, 0.0, 0.0, 0.0)


def smooth_volume(shape, seed: int) -> torch.Tensor:
    """Smooth random float32 volume in about [-0.03, 1.02], with some fine detail."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 1, 5, 7, 7, generator=g)
    v = F.interpolate(low, size=shape, mode="trilinear", align_corners=True)[0, 0] + 0.1 * torch.rand(shape, generator=g)
    return ((v - v.min()) / (v.max() - v.min()) * 1.05 - 0.03).float()


def batch(shape, n: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([smooth_volume(shape, seed + i) for i in range(n)])


def make_params(rows: list[dict]) -> AugmentParams:
    """Fixed parameters: per volume a dict with any of gamma, bias, blur, ghost; the other ops off."""
    p = sample_params(ALL_OFF, len(rows), torch.Generator().manual_seed(0))
    for b, row in enumerate(rows):
        if "gamma" in row:
            p.gamma_on[b], p.gamma[b] = True, row["gamma"]
        if "bias" in row:
            p.bias_field_on[b], p.bias_coefficients[b] = True, torch.as_tensor(row["bias"])
        if "blur" in row:
            p.blur_on[b], p.blur_std_mm[b] = True, torch.tensor(row["blur"])
        if "ghost" in row:
            p.ghosting_on[b] = True
            p.num_ghosts[b], p.ghosting_axis[b], p.ghosting_intensity[b] = row["ghost"]
    return p


def torchio_reference(volume: torch.Tensor, p: AugmentParams, b: int, spacing: float) -> torch.Tensor:
    """torchio's deterministic transforms with row b's parameters, composed as the original's chain."""
    transforms = []
    if p.gamma_on[b]:
        transforms.append(tio.Gamma(float(p.gamma[b])))
    if p.bias_field_on[b]:
        transforms.append(tio.BiasField(p.bias_coefficients[b].tolist(), BIAS_ORDER))
    if p.blur_on[b]:
        transforms.append(tio.Blur(tuple(p.blur_std_mm[b].tolist())))
    if p.ghosting_on[b]:
        transforms.append(tio.Ghosting(int(p.num_ghosts[b]), int(p.ghosting_axis[b]),
                                       float(p.ghosting_intensity[b]), GHOST_RESTORE))
    if not transforms:
        return volume.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = tio.ScalarImage(tensor=volume[None].clone(), affine=np.diag([spacing] * 3 + [1.0]))
        return tio.Compose(transforms)(image).data[0]


def max_diff_to_torchio(volumes, p, spacing) -> tuple[float, float]:
    """(max abs difference, max |reference|) over the batch."""
    ours = augment_volumes(volumes, p, spacing)
    refs = torch.stack([torchio_reference(volumes[b], p, b, spacing) for b in range(len(p))])
    return (ours - refs).abs().max().item(), refs.abs().max().item()


def random_bias(seed: int) -> list[float]:
    return (torch.rand(N_BIAS, generator=torch.Generator().manual_seed(seed)) - 0.5).tolist()


OP_ROWS = {
    "gamma": [{"gamma": math.exp(-0.3)}, {"gamma": math.exp(0.3)}, {"gamma": 1.0}, {"gamma": 0.9}],
    "bias": [{"bias": random_bias(1)}, {"bias": random_bias(2)}, {"bias": random_bias(3)},
             {"bias": [0.5 if i in (1, 4, 10, 19) else 0.0 for i in range(N_BIAS)]}],  # W, H, S, S³
    "blur": [{"blur": (1e-3, 0.01, 1.999)}, {"blur": (2.0, 1.0, 0.5)}, {"blur": (0.0, 2.0, 0.0)},
             {"blur": (0.25, 0.37, 1.77)},  # 0.25 mm at 2 mm: radius exactly int(4 · 0.125 + 0.5) = 1
             {"blur": (2.25, 0.5625, 1.1)}],  # σ = 1.125 voxels (paper S, odd H): radius int(4.5 + 0.5) = 5
    "ghost": [{"ghost": (4, 0, 0.5)}, {"ghost": (5, 1, 1.0)}, {"ghost": (7, 2, 0.73)}, {"ghost": (10, 0, 0.9)},
              {"ghost": (4, 1, 0.61)}, {"ghost": (9, 2, 0.5)}],
}


@pytest.mark.parametrize("grid", [PAPER, DEMO, ODD], ids=["paper", "demo", "odd"])
@pytest.mark.parametrize("op", list(OP_ROWS))
def test_each_op_equals_torchio_for_fixed_parameters(op, grid):
    shape, spacing = grid
    rows = OP_ROWS[op]
    diff, _ = max_diff_to_torchio(batch(shape, len(rows), seed=10), make_params(rows), spacing)
    assert diff <= 1e-5


def _chain_params(n_all: int, n_random: int, seed: int) -> AugmentParams:
    g = torch.Generator().manual_seed(seed)
    every = sample_params(ALL_ON, n_all, g)
    every.ghosting_axis[:] = torch.arange(n_all) % 3
    return AugmentParams.collate([every, sample_params(AugmentSettings(0.5, 0.5, 0.5, 0.5), n_random, g)])


@pytest.mark.parametrize("grid", [PAPER, DEMO], ids=["paper", "demo"])
def test_the_chain_equals_torchio_compose(grid):
    shape, spacing = grid
    p = _chain_params(6, 8, seed=3)
    assert p.gamma_on[6:].any() and not p.gamma_on[6:].all()  # the seed gives mixed on/off rows
    diff, scale = max_diff_to_torchio(batch(shape, len(p), seed=20), p, spacing)
    assert diff <= 1e-5 * max(1.0, scale)  # torchio's complex64 FFT error grows with the bias-scaled values


def _slice_cases(s: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, s, (14, 1), generator=g),
            torch.cat([torch.tensor([[0, s - 1, 3, 3]] * 7), torch.randint(0, s, (7, 4), generator=g)])]


@pytest.mark.parametrize("grid", [PAPER, DEMO, ODD], ids=["paper", "demo", "odd"])
def test_augment_slices_equals_the_augmented_volumes_slices(grid):
    shape, spacing = grid
    p = _chain_params(6, 8, seed=4)
    volumes = batch(shape, len(p), seed=30)
    full = augment_volumes(volumes, p, spacing)
    for idx in _slice_cases(shape[0]):
        got = augment_slices(volumes, idx, p, spacing)
        want = full[torch.arange(len(p))[:, None], idx]
        assert got.shape == (len(p), idx.shape[1], *shape[1:])
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.cuda
def test_cuda_equals_cpu():
    shape, spacing = PAPER
    p = _chain_params(6, 10, seed=6)
    volumes = batch(shape, len(p), seed=40)
    idx = torch.randint(0, shape[0], (len(p), 4), generator=torch.Generator().manual_seed(1))
    for fn, args in ((augment_volumes, ()), (augment_slices, (idx,))):
        cpu = fn(volumes, *args, p, spacing)
        cuda = fn(volumes.cuda(), *(a.cuda() for a in args), p.to("cuda"), spacing)
        assert cuda.device.type == "cuda"
        assert (cuda.cpu() - cpu).abs().max().item() <= 1e-5 * max(1.0, cpu.abs().max().item())


N_DRAWS = 10_000


@pytest.fixture(scope="module")
def torchio_draws():
    """torchio's own get_params, N_DRAWS times each, from a seeded global RNG (restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        gamma, bias, blur = tio.RandomGamma(), tio.RandomBiasField(), tio.RandomBlur()
        ghosting = tio.RandomGhosting(restore=(GHOST_RESTORE, GHOST_RESTORE))
        log_gamma = [math.log(gamma.get_params(gamma.log_gamma_range)) for _ in range(N_DRAWS)]
        coefficients = [bias.get_params(bias.order, bias.coefficients_range) for _ in range(N_DRAWS)]
        stds = [blur.get_params(blur.std_ranges) for _ in range(N_DRAWS)]
        ghosts = [ghosting.get_params(ghosting.num_ghosts_range, ghosting.axes, ghosting.intensity_range,
                                      ghosting.restore) for _ in range(N_DRAWS)]
    return {"log_gamma": np.array(log_gamma), "bias": np.array(coefficients), "blur": np.array(stds),
            "num_ghosts": np.array([d[0] for d in ghosts]), "axis": np.array([d[1] for d in ghosts]),
            "intensity": np.array([d[2] for d in ghosts]), "restore": np.array([d[3] for d in ghosts])}


def test_sampled_parameters_have_torchios_distributions(torchio_draws):
    ref = torchio_draws
    p = sample_params(ALL_ON, N_DRAWS, torch.Generator().manual_seed(99))
    assert ref["bias"].shape == (N_DRAWS, N_BIAS) and np.allclose(ref["restore"], GHOST_RESTORE)
    pairs = [(ref["log_gamma"], p.gamma.double().log().numpy()), (ref["intensity"], p.ghosting_intensity.numpy())]
    pairs += [(ref["bias"][:, i], p.bias_coefficients[:, i].numpy()) for i in (0, 7, 13, 19)]
    pairs += [(ref["blur"][:, i], p.blur_std_mm[:, i].numpy()) for i in range(3)]
    for theirs, ours in pairs:
        assert stats.ks_2samp(theirs, ours).pvalue > 1e-3
    for key, ours, values in (("num_ghosts", p.num_ghosts, range(4, 11)), ("axis", p.ghosting_axis, range(3))):
        table = [[int((ref[key] == v).sum()) for v in values], [int((ours == v).sum()) for v in values]]
        assert min(table[0]) > 0 and min(table[1]) > 0  # every value occurs, nothing outside the range
        assert sum(table[1]) == N_DRAWS and sum(table[0]) == N_DRAWS
        assert stats.chi2_contingency(table).pvalue > 1e-3


def test_each_op_is_on_with_its_probability():
    settings = AugmentSettings()  # 0.5, 0.25, 0.25, 0.5
    p = sample_params(settings, N_DRAWS, torch.Generator().manual_seed(7))
    flags = {"gamma_p": p.gamma_on, "bias_field_p": p.bias_field_on, "blur_p": p.blur_on,
             "ghosting_p": p.ghosting_on}
    for name, on in flags.items():
        prob = getattr(settings, name)
        assert abs(on.double().mean().item() - prob) <= 4.5 * math.sqrt(prob * (1 - prob) / N_DRAWS), name
    assert not (p.gamma_on & p.ghosting_on).all() and (p.gamma_on & p.ghosting_on).any()  # independent flags
    assert (p.gamma[~p.gamma_on] == 1).all() and (p.bias_coefficients[~p.bias_field_on] == 0).all()
    assert (p.blur_std_mm[~p.blur_on] == 0).all() and (p.ghosting_intensity[~p.ghosting_on] == 0).all()
    reference = settings.transform().transforms  # the torchio Compose the original used, same probabilities
    assert [t.probability for t in reference] == [0.5, 0.25, 0.25, 0.5]
    assert [type(t).__name__ for t in reference] == ["RandomGamma", "RandomBiasField", "RandomBlur",
                                                     "RandomGhosting"]


def test_every_flag_off_returns_the_input_bit_identical():
    volumes = batch(DEMO[0], 5, seed=50)
    p = sample_params(ALL_OFF, 5, torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 31, 7, 7]] * 5)
    assert torch.equal(augment_volumes(volumes, p, 3.0), volumes)
    assert torch.equal(augment_slices(volumes, idx, p, 3.0), volumes[torch.arange(5)[:, None], idx])
    # and volumes whose flags are off stay bit-identical inside an augmented batch
    mixed = AugmentParams.collate([sample_params(ALL_ON, 2, torch.Generator().manual_seed(1)), p])
    both = torch.cat([batch(DEMO[0], 2, seed=60), volumes])
    assert torch.equal(augment_volumes(both, mixed, 3.0)[2:], volumes)
    assert torch.equal(augment_slices(both, torch.cat([idx[:2], idx]), mixed, 3.0)[2:],
                       volumes[torch.arange(5)[:, None], idx])


def test_bad_inputs_raise_clear_errors():
    volumes = batch(DEMO[0], 2, seed=70)
    p = sample_params(ALL_ON, 2, torch.Generator().manual_seed(0))
    idx = torch.zeros(2, 1, dtype=torch.long)
    for spacing in (0.0, -2.0, float("nan"), float("inf"), "2 mm", True, None):
        with pytest.raises(ValueError, match="spacing_mm"):
            augment_volumes(volumes, p, spacing)
        with pytest.raises(ValueError, match="spacing_mm"):
            augment_slices(volumes, idx, p, spacing)
    with pytest.raises(ValueError, match="spacing_mm"):
        VolumeAugment(AugmentSettings(), 0)
    with pytest.raises(ValueError, match=r"\[B, S, H, W\]"):
        augment_volumes(volumes[0], p, 3.0)
    with pytest.raises(ValueError, match="float32"):
        augment_volumes(volumes.double(), p, 3.0)
    with pytest.raises(ValueError, match="params are for 2 volumes but the batch holds 1"):
        augment_volumes(volumes[:1], p, 3.0)
    with pytest.raises(ValueError, match="slice_index must lie in"):
        augment_slices(volumes, idx + 32, p, 3.0)
    with pytest.raises(ValueError, match="slice_index must be an integer"):
        augment_slices(volumes, idx.float(), p, 3.0)
    with pytest.raises(ValueError, match="slice_index must be an integer"):
        augment_slices(volumes, idx[:1], p, 3.0)
    bad = AugmentParams.from_dict({**p.as_dict(), "ghosting_axis": torch.tensor([0, 3])})
    with pytest.raises(ValueError, match="ghosting_axis"):
        augment_volumes(volumes, bad, 3.0)
    bad = AugmentParams.from_dict({**p.as_dict(), "blur_std_mm": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"blur_std_mm has shape \(2, 2\), expected \(2, 3\)"):
        augment_volumes(volumes, bad, 3.0)
    with pytest.raises(ValueError, match="missing"):
        AugmentParams.from_dict({"gamma": p.gamma})
    with pytest.raises(ValueError, match="probability"):
        sample_params(AugmentSettings(gamma_p=1.5), 1)


def test_params_collate_transfer_and_the_convenience_wrapper():
    g = torch.Generator().manual_seed(8)
    a, b = sample_params(AugmentSettings(), 3, g), sample_params(AugmentSettings(), 2, g)
    both = AugmentParams.collate([a, b])
    assert len(both) == 5 and torch.equal(both.bias_coefficients[3:], b.bias_coefficients)
    plain = both.as_dict()
    assert all(isinstance(v, torch.Tensor) for v in plain.values())
    again = AugmentParams.from_dict({**plain, "image": torch.zeros(1)})  # other batch keys are ignored
    assert all(torch.equal(plain[k], v) for k, v in again.as_dict().items())
    assert torch.equal(both.to("cpu").num_ghosts, both.num_ghosts)
    aug = VolumeAugment(AugmentSettings(), 2.0)
    p1, p2 = aug.sample(4, torch.Generator().manual_seed(2)), sample_params(AugmentSettings(), 4,
                                                                            torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(p1.as_dict().values(), p2.as_dict().values(), strict=True))
    volumes, idx = batch(DEMO[0], 4, seed=80), torch.tensor([[1], [2], [3], [4]])
    assert torch.equal(aug(volumes, idx, p1), augment_slices(volumes, idx, p1, 2.0))


def test_settings_from_params_checks_probabilities():
    good = SimpleNamespace(data=SimpleNamespace(augment=SimpleNamespace(gamma_p=0.5, bias_field_p=0.25,
                                                                        blur_p=0.25, ghosting_p=0.5)))
    assert AugmentSettings.from_params(good) == AugmentSettings()
    good.data.augment.blur_p = 2.0
    with pytest.raises(ConfigError, match="blur_p"):
        AugmentSettings.from_params(good)
