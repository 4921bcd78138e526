"""The conditioning ResNet (method.md §3.4): sizes, shapes, stochastic depth, argument checks."""

from __future__ import annotations

import pytest
import torch

from mhd_uad.errors import ConfigError, MhdUadError
from mhd_uad.models.encoder import BasicBlock, Bottleneck, DropPath, ResNetEncoder, count_parameters

# timm resnet50(in_chans=1, num_classes=512), method.md §3.4: 24.55 M. Derivation: torchvision's ResNet-50 has
# 25,557,032 parameters; minus its 1000-way FC (2,049,000), minus 2 of 3 stem input channels (64*2*7*7 = 6,272),
# plus Linear(2048, 512) (1,049,088) = 24,550,848.
RESNET50_COND512_PARAMS = 24_550_848


def _blocks(encoder: ResNetEncoder) -> list[torch.nn.Module]:
    return [m for m in encoder.modules() if isinstance(m, BasicBlock | Bottleneck)]


def test_resnet50_parameter_count_matches_timm_layout():
    encoder = ResNetEncoder(depth=50, in_channels=1, cond_dim=512, base_width=64)
    n = count_parameters(encoder)
    assert n == RESNET50_COND512_PARAMS
    assert abs(n - 24.55e6) / 24.55e6 < 0.01
    assert count_parameters(encoder.fc) == 2048 * 512 + 512
    assert encoder.feature_channels == [256, 512, 1024, 2048]
    assert encoder.feature_dim == 2048
    # timm key names, so a state dict looks like the original encoder's
    keys = set(encoder.state_dict())
    assert {
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer4.2.bn3.weight",
        "fc.weight",
    } <= keys
    assert len(_blocks(encoder)) == 16


@pytest.mark.parametrize(
    ("depth", "expected"), [(18, 11_170_240 + 512 * 512 + 512), (34, 21_278_400 + 512 * 512 + 512)]
)
def test_resnet18_34_parameter_counts(depth, expected):
    # torchvision's resnet18/34 (11,689,512 / 21,797,672) minus the 1000-way FC and 2 stem input channels.
    assert count_parameters(ResNetEncoder(depth=depth, cond_dim=512)) == expected


def test_demo_encoder_shapes_64px():
    torch.manual_seed(0)
    encoder = ResNetEncoder(depth=18, in_channels=1, cond_dim=128, base_width=16)
    assert encoder.feature_channels == [16, 32, 64, 128]
    assert encoder.downsample_ratio == 32
    x = torch.rand(3, 1, 64, 64)
    feats = encoder.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(3, 16, 16, 16), (3, 32, 8, 8), (3, 64, 4, 4), (3, 128, 2, 2)]
    out = encoder(x)
    assert out.shape == (3, 128)
    assert torch.isfinite(out).all()


def test_resnet50_feature_maps_at_96px():
    torch.manual_seed(0)
    encoder = ResNetEncoder(depth=50).eval()
    with torch.no_grad():
        feats = encoder.forward_features(torch.rand(1, 1, 96, 96))
        out = encoder(torch.rand(1, 1, 96, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 24, 24), (512, 12, 12), (1024, 6, 6), (2048, 3, 3)]
    assert out.shape == (1, 512)


def test_base_width_scales_every_stage():
    narrow = ResNetEncoder(depth=50, base_width=8)
    assert narrow.conv1.out_channels == 8
    assert narrow.feature_channels == [32, 64, 128, 256]
    assert narrow.fc.in_features == 256
    assert ResNetEncoder(depth=34, base_width=4, in_channels=3).feature_channels == [4, 8, 16, 32]
    assert ResNetEncoder(depth=18, in_channels=3).conv1.in_channels == 3


def test_drop_path_rates_rise_linearly_to_the_configured_rate():
    encoder = ResNetEncoder(depth=18, base_width=8, drop_path_rate=0.05)
    rates = [b.drop_path.drop_prob for b in _blocks(encoder)]
    assert rates == pytest.approx(torch.linspace(0, 0.05, 8).tolist())
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05)


def test_drop_path_module_only_acts_in_training():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(256, 3)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    y = drop(x)
    rows = set(y[:, 0].tolist())
    assert rows == {0.0, 2.0}  # whole samples dropped, survivors rescaled by 1/keep_prob
    assert (y == y[:, :1]).all()


def test_drop_path_active_only_in_training_mode():
    x = torch.rand(4, 1, 64, 64)
    stochastic = ResNetEncoder(depth=18, base_width=8, drop_path_rate=0.9)
    deterministic = ResNetEncoder(depth=18, base_width=8, drop_path_rate=0.0)
    for encoder in (stochastic, deterministic):
        # zero-init of the last BN would make every residual branch zero; give them weight to drop
        for block in _blocks(encoder):
            torch.nn.init.ones_(block.last_norm().weight)
    with torch.no_grad():
        stochastic.eval()
        assert torch.equal(stochastic(x), stochastic(x))
        stochastic.train()
        torch.manual_seed(1)
        a = stochastic(x)
        torch.manual_seed(2)
        b = stochastic(x)
        assert not torch.allclose(a, b)
        deterministic.train()  # control: train-mode BN alone is deterministic
        torch.manual_seed(1)
        c = deterministic(x)
        torch.manual_seed(2)
        assert torch.allclose(c, deterministic(x))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"depth": 101}, "depth"),
        ({"depth": True}, "depth"),
        ({"in_channels": 0}, "in_channels"),
        ({"cond_dim": "512"}, "cond_dim"),
        ({"base_width": 2.5}, "base_width"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"drop_path_rate": -0.1}, "drop_path_rate"),
    ],
)
def test_invalid_arguments_raise_config_error_naming_the_parameter(kwargs, name):
    with pytest.raises(ConfigError, match=name) as info:
        ResNetEncoder(**kwargs)
    assert isinstance(info.value, MhdUadError)


def test_wrong_input_channels_is_a_clear_error():
    encoder = ResNetEncoder(depth=18, base_width=8)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        encoder(torch.rand(2, 3, 64, 64))
