"""The conditioning encoder F_enc: a ResNet in the timm layout, mapping a [0,1] slice to one cond vector.

method.md §3.4: timm ResNet-50, ``in_chans=1, num_classes=cond_dim``, global average pool -> FC,
drop_path_rate 0.05, trained end to end with the UNet (optionally from SparK weights, §3.6).

Parameter names follow timm (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``), so a
state dict has the same keys as the original's encoder. ``base_width`` scales every width (stem and the four
stages) so the demo profile can run a narrow ResNet-18 on CPU; 64 gives the standard network.

Every block can run in a *masked* mode (SparK's sparse-convolution emulation, see ``spark.py``): the forward
takes an optional :class:`FeatureMasking` that is applied after every conv/pool and replaces every
BatchNorm call. The wiring of the network therefore exists once, here, and the pretrainer runs exactly
these modules.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from mhd_uad.errors import ConfigError
from mhd_uad.models import count_parameters  # noqa: F401  (re-exported)

# Blocks per stage for each supported depth (He et al. 2016; timm resnet18/34/50).
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
}


class FeatureMasking(Protocol):
    """What a block needs to run sparsely: zero inactive positions, and normalise over active ones only."""

    def mask(self, x: torch.Tensor) -> torch.Tensor: ...

    def norm(self, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor: ...


def _conv_norm(conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor, masking: FeatureMasking | None):
    """conv -> BN, or, masked: conv -> zero inactive positions -> BN over active positions only."""
    if masking is None:
        return bn(conv(x))
    return masking.norm(bn, masking.mask(conv(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a block's residual branch for whole samples, only while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        # Rescale kept samples so the expected output equals the input (timm's scale_by_keep=True).
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    # timm's default projection shortcut: 1x1 conv (with the block's stride) + BN; keys downsample.0/.1.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the stride sits on the first."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_ch, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.drop_path = DropPath(drop_path)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor, masking: FeatureMasking | None = None) -> torch.Tensor:
        shortcut = x if self.downsample is None else _conv_norm(*self.downsample, x, masking)
        out = self.act1(_conv_norm(self.conv1, self.bn1, x, masking))
        out = _conv_norm(self.conv2, self.bn2, out, masking)
        return self.act2(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, as in timm/torchvision "ResNet v1.5") -> 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.drop_path = DropPath(drop_path)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor, masking: FeatureMasking | None = None) -> torch.Tensor:
        shortcut = x if self.downsample is None else _conv_norm(*self.downsample, x, masking)
        out = self.act1(_conv_norm(self.conv1, self.bn1, x, masking))
        out = self.act2(_conv_norm(self.conv2, self.bn2, out, masking))
        out = _conv_norm(self.conv3, self.bn3, out, masking)
        return self.act3(self.drop_path(out) + shortcut)


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"ResNetEncoder: {name} must be an integer >= {minimum}, got {value!r}")
    return value


class ResNetEncoder(nn.Module):
    """timm-layout ResNet-18/34/50 -> global average pool -> Linear(feature_dim, cond_dim).

    ``forward(x)``: ``x`` is ``[B, in_channels, H, W]`` in [0, 1] (no normalisation, as in the original);
    returns ``[B, cond_dim]``. ``forward_features(x)`` returns the four stage outputs (layer1..layer4) at
    strides 4, 8, 16, 32 with ``feature_channels`` channels.
    """

    downsample_ratio = 32

    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 1,
        cond_dim: int = 512,
        base_width: int = 64,
        drop_path_rate: float = 0.05,
    ):
        super().__init__()
        if isinstance(depth, bool) or depth not in STAGE_BLOCKS:
            raise ConfigError(f"ResNetEncoder: depth must be one of {sorted(STAGE_BLOCKS)}, got {depth!r}")
        _check_int("in_channels", in_channels)
        _check_int("cond_dim", cond_dim)
        _check_int("base_width", base_width)
        if (
            isinstance(drop_path_rate, bool)
            or not isinstance(drop_path_rate, int | float)
            or not (0.0 <= drop_path_rate < 1.0)
        ):
            raise ConfigError(f"ResNetEncoder: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")

        self.depth = depth
        self.in_channels = in_channels
        self.cond_dim = cond_dim
        self.base_width = base_width
        self.drop_path_rate = float(drop_path_rate)
        block_cls = Bottleneck if depth >= 50 else BasicBlock
        stage_blocks = STAGE_BLOCKS[depth]

        self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Stochastic depth rises linearly from 0 (first block) to drop_path_rate (last block), as in timm.
        n_blocks = sum(stage_blocks)
        # plain Python (not torch.linspace) so the network can be built on the meta device for checks
        rates = [self.drop_path_rate * i / (n_blocks - 1) for i in range(n_blocks)] if n_blocks > 1 else [0.0]
        in_ch = base_width
        block_idx = 0
        self.feature_channels: list[int] = []
        for stage_idx, n in enumerate(stage_blocks):
            planes = base_width * 2**stage_idx
            blocks = []
            for i in range(n):
                stride = 2 if (stage_idx > 0 and i == 0) else 1
                blocks.append(block_cls(in_ch, planes, stride=stride, drop_path=rates[block_idx]))
                in_ch = planes * block_cls.expansion
                block_idx += 1
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            self.feature_channels.append(in_ch)

        self.feature_dim = in_ch
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.feature_dim, cond_dim)
        self._init_weights()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _init_weights(self) -> None:
        # timm's ResNet init: He-normal (fan_out) convs, BN (1, 0), and the last BN of each residual branch
        # zeroed so every block starts as the identity. The FC keeps torch's default Linear init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                nn.init.zeros_(m.last_norm().weight)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetEncoder expects [B, {self.in_channels}, H, W], got a tensor of shape {tuple(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor, masking: FeatureMasking | None = None) -> list[torch.Tensor]:
        """The outputs of layer1..layer4 (strides 4, 8, 16, 32).

        ``masking`` (used by SparK pretraining only) is applied after every conv and pool and replaces every
        BatchNorm call; ``None`` is the ordinary dense network.
        """
        self._check_input(x)
        x = self.act1(_conv_norm(self.conv1, self.bn1, x, masking))
        x = self.maxpool(x)
        if masking is not None:
            x = masking.mask(x)
        features = []
        for stage in self.stages:
            for block in stage:
                x = block(x, masking)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.forward_features(x)[-1]
        return self.fc(torch.flatten(self.global_pool(last), 1))

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, in_channels={self.in_channels}, cond_dim={self.cond_dim}, "
            f"base_width={self.base_width}, drop_path_rate={self.drop_path_rate}"
        )


__all__ = ["BasicBlock", "Bottleneck", "DropPath", "FeatureMasking", "ResNetEncoder", "count_parameters"]
