"""SparK masked pretraining of the conditioning encoder (method.md §3.6; Tian et al., ICLR 2023).

An image is cut into patches of ``downsample_ratio`` px (the encoder's output grid: 3x3 at 96 px, 2x2 at
64 px); ``round(n * (1 - mask_ratio))`` of them stay visible per image. The encoder sees only the visible
patches through a *sparse-convolution emulation*: the input's masked pixels are zeroed, every conv/pool output
is multiplied by the active mask upsampled to its resolution, and every BatchNorm normalises over active
positions only (BatchNorm1d semantics on the gathered positions). A light UNet-style decoder fills the masked
patches from the encoder's four stage features; the loss is the MSE on masked patches only.

How the emulation runs the *same* encoder: ``ResNetEncoder.forward_features`` takes an optional
``FeatureMasking`` (here :class:`ActiveMask`), applied after every conv and pool and in place of every BN
call. The ResNet wiring therefore exists once (in ``encoder.py``); nothing is copied or monkey-patched, no
hooks linger, and the encoder's own BN parameters and running statistics are the ones updated here, so
``encoder_state_dict()`` transfers exactly what was learnt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mhd_uad.errors import ConfigError
from mhd_uad.models.encoder import STAGE_BLOCKS, ResNetEncoder

# The classification head is never pretrained (SparK drops it; method.md §3.6 "FC dropped").
HEAD_PREFIX = "fc."


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: ``round(n * (1 - mask_ratio))`` (9 patches, 0.65 -> 3; 4 patches -> 1)."""
    return round(num_patches * (1.0 - mask_ratio))


def random_active_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A bool ``[B, 1, h, w]`` mask, True = visible; each sample keeps its own random set of patches."""
    h, w = grid
    n = h * w
    keep = num_visible_patches(n, mask_ratio)
    if not 1 <= keep < n:
        raise ConfigError(
            f"mask_ratio {mask_ratio} keeps {keep} of the {n} patches of a {h}x{w} grid; "
            "at least one patch must stay visible and one must be masked (change mask_ratio or image size)"
        )
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, n, generator=generator, device=noise_device)
    keep_idx = noise.argsort(dim=1)[:, :keep]
    active = torch.zeros(batch_size, n, dtype=torch.bool, device=noise.device)
    active.scatter_(1, keep_idx, True)
    return active.view(batch_size, 1, h, w).to(device if device is not None else noise.device)


def upsample_mask(active: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest upsampling of a ``[B, 1, h, w]`` patch mask to ``size``, which must be a multiple of (h, w)."""
    h, w = active.shape[-2:]
    H, W = int(size[0]), int(size[1])
    if H % h or W % w:
        raise ValueError(f"cannot upsample a {h}x{w} patch mask to {H}x{W}: not an integer multiple")
    return active.repeat_interleave(H // h, dim=2).repeat_interleave(W // w, dim=3)


def sparse_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``bn`` applied as BatchNorm1d to the active positions of ``x`` only; inactive positions become 0.

    ``active`` is a bool ``[B, 1, H, W]`` mask at x's resolution. Statistics (and the running-stat update in
    training) come from the active positions alone, using ``bn``'s own affine parameters and buffers and
    its momentum/eps, exactly as ``nn.BatchNorm2d.forward`` would on the gathered ``[N, C]`` matrix.
    """
    selected = active[:, 0]  # [B, H, W]
    bhwc = x.permute(0, 2, 3, 1)
    gathered = bhwc[selected]  # [N_active, C]

    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    normed = F.batch_norm(
        gathered,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        momentum,
        bn.eps,
    )
    out = bhwc.new_zeros(bhwc.shape)
    out[selected] = normed.to(out.dtype)
    return out.permute(0, 3, 1, 2)


class ActiveMask:
    """The per-resolution view of one batch's patch mask; the ``FeatureMasking`` the encoder runs with."""

    def __init__(self, active: torch.Tensor):
        if active.dtype != torch.bool or active.ndim != 4 or active.shape[1] != 1:
            raise ValueError(
                f"active mask must be a bool [B, 1, h, w] tensor, got {active.dtype} {tuple(active.shape)}"
            )
        self.active = active
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        key = (int(size[0]), int(size[1]))
        if key not in self._cache:
            self._cache[key] = upsample_mask(self.active, key)
        return self._cache[key]

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.at(x.shape[-2:]).to(x.dtype)

    def norm(self, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        return sparse_batch_norm(bn, x, self.at(x.shape[-2:]))


def masked_patch_mse(
    reconstruction: torch.Tensor, target: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """Mean squared error over the pixels of masked patches only (SparK ``loss_on_mask``, no pix_norm).

    Every patch has the same number of pixels, so this equals SparK's mean over masked patches of the
    per-patch MSE. Visible patches do not contribute.
    """
    masked = ~upsample_mask(active, target.shape[-2:])
    weight = masked.to(torch.float32)
    err = (reconstruction.float() - target.float()).pow(2)
    return (err * weight).sum() / (weight.sum() * target.shape[1]).clamp_min(1.0)


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------


class UpStage(nn.Module):
    """ConvTranspose(4x4, s2, p1) -> conv3x3-BN-ReLU6 -> conv3x3-BN (no final activation)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, in_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """``num_stages`` x2 up-stages, widths halving from ``width`` (512 -> 256 -> ... -> 16), then 1x1 conv.

    ``forward(features)`` takes the densified features deepest first; ``features[i]`` (``width / 2**i``
    channels) is added to the input of up-stage ``i``.
    """

    def __init__(self, num_stages: int, width: int, out_channels: int = 1):
        super().__init__()
        self.widths = [width // 2**i for i in range(num_stages + 1)]
        self.stages = nn.ModuleList(
            UpStage(a, b) for a, b in zip(self.widths[:-1], self.widths[1:], strict=True)
        )
        self.proj = nn.Conv2d(self.widths[-1], out_channels, kernel_size=1, bias=True)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x: torch.Tensor | float = 0.0
        for i, stage in enumerate(self.stages):
            if i < len(features):
                x = x + features[i]
            x = stage(x)
        return self.proj(x)


def _init_decoder_weights(module: nn.Module) -> None:
    # SparK's decoder init: truncated normal (std 0.02) for (transposed) convs, zero bias; BN (1, 0).
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def default_dec_dim(base_width: int, num_stages: int = 5) -> int:
    """512 at base_width 64 (method.md §3.6), scaled with the encoder width, kept divisible by 2**num_stages."""
    step = 2**num_stages
    return max(step, (512 * base_width // 64) // step * step)


# --------------------------------------------------------------------------------------------------
# Pretrainer
# --------------------------------------------------------------------------------------------------


class SparKPretrainer(nn.Module):
    """Masked-image pretraining around an existing :class:`ResNetEncoder` (its modules, not a copy).

    ``forward(x, generator=None) -> (loss, reconstruction, active)``: ``x`` is ``[B, C, H, W]`` in [0, 1]
    with H, W multiples of the encoder's downsample ratio (32); ``reconstruction`` is the decoder output
    ``[B, C, H, W]`` (all patches; only masked ones are trained); ``active`` is the bool ``[B, 1, H/32, W/32]``
    patch mask, True = visible. ``dec_dim=None`` scales 512 with the encoder's base_width.
    """

    def __init__(self, encoder: ResNetEncoder, mask_ratio: float = 0.65, dec_dim: int | None = 512):
        super().__init__()
        if not isinstance(encoder, ResNetEncoder):
            raise ConfigError(
                f"SparKPretrainer: encoder must be a ResNetEncoder, got {type(encoder).__name__}"
            )
        if (
            isinstance(mask_ratio, bool)
            or not isinstance(mask_ratio, int | float)
            or not 0.0 < mask_ratio < 1.0
        ):
            raise ConfigError(f"SparKPretrainer: mask_ratio must be in (0, 1), got {mask_ratio!r}")
        num_stages = round(math.log2(encoder.downsample_ratio))
        step = 2**num_stages
        if dec_dim is None:
            dec_dim = default_dec_dim(encoder.base_width, num_stages)
        if isinstance(dec_dim, bool) or not isinstance(dec_dim, int) or dec_dim < step or dec_dim % step:
            raise ConfigError(
                f"SparKPretrainer: dec_dim must be a positive multiple of {step} (it halves over "
                f"{num_stages} decoder stages), got {dec_dim!r}"
            )
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.dec_dim = dec_dim
        self.downsample_ratio = encoder.downsample_ratio

        self.decoder = LightDecoder(num_stages, dec_dim, out_channels=encoder.in_channels)
        enc_channels = encoder.feature_channels[::-1]  # layer4 .. layer1, deepest first
        dec_channels = self.decoder.widths[: len(enc_channels)]
        # Per scale: sparse BN -> learned mask token -> densify conv (1x1 at the coarsest scale, 3x3 elsewhere).
        self.densify_norms = nn.ModuleList(nn.BatchNorm2d(c) for c in enc_channels)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in enc_channels)
        self.densify_projs = nn.ModuleList(
            nn.Conv2d(e, d, kernel_size=1 if i == 0 else 3, padding=0 if i == 0 else 1, bias=True)
            for i, (e, d) in enumerate(zip(enc_channels, dec_channels, strict=True))
        )
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        _init_decoder_weights(self.decoder)
        _init_decoder_weights(self.densify_projs)
        _init_decoder_weights(self.densify_norms)

    def grid_size(self, image_size: tuple[int, int] | torch.Size) -> tuple[int, int]:
        H, W = int(image_size[0]), int(image_size[1])
        r = self.downsample_ratio
        if H % r or W % r:
            raise ConfigError(
                f"SparK pretraining needs an image size divisible by the encoder's downsample ratio {r}; got {H}x{W}"
            )
        return H // r, W // r

    def random_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_active_mask(
            x.shape[0], self.grid_size(x.shape[-2:]), self.mask_ratio, generator, x.device
        )

    def masked_features(self, x: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's four stage features seeing only the visible patches (masked positions are 0)."""
        masking = ActiveMask(active)
        return self.encoder.forward_features(masking.mask(x), masking)

    def reconstruct(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        masking = ActiveMask(active)
        features = self.encoder.forward_features(masking.mask(x), masking)
        to_decoder = []
        for i, feat in enumerate(reversed(features)):
            visible = masking.at(feat.shape[-2:])
            feat = sparse_batch_norm(self.densify_norms[i], feat, visible)
            feat = torch.where(visible, feat, self.mask_tokens[i].to(feat.dtype))
            to_decoder.append(self.densify_projs[i](feat))
        return self.decoder(to_decoder)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        active = self.random_mask(x, generator)
        reconstruction = self.reconstruct(x, active)
        return masked_patch_mse(reconstruction, x, active), reconstruction, active

    def pretraining_parameters(self) -> list[nn.Parameter]:
        """Everything that SparK trains: all but the encoder's FC head (which never sees a gradient here)."""
        head = {id(p) for p in self.encoder.fc.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights and BN running statistics to transfer, keyed as in ResNetEncoder; FC dropped."""
        return {
            k: v.detach().clone()
            for k, v in self.encoder.state_dict().items()
            if not k.startswith(HEAD_PREFIX)
        }


def spark_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict],
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW with SparK's settings from method.md §3.6 (lr 1e-4, wd 0.05, betas (0.9, 0.95))."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


# --------------------------------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------------------------------


@dataclass
class TransferReport:
    """What ``load_pretrained_encoder`` did: keys loaded, encoder keys left as they were, source keys unused."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def _describe_weights(state: Mapping[str, torch.Tensor]) -> str:
    """A best-effort 'ResNet-50, base_width 64, in_channels 1' read off a state dict's shapes."""
    stem = state.get("conv1.weight")
    if stem is None or stem.ndim != 4:
        return "an unknown network (no conv1.weight)"
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = []
    for stage in range(1, 5):
        prefix = f"layer{stage}."
        idx = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
        blocks.append(len(idx))
    depth = next(
        (d for d, b in STAGE_BLOCKS.items() if tuple(blocks) == b and (d >= 50) == bottleneck),
        f"blocks {blocks} ({'bottleneck' if bottleneck else 'basic'})",
    )
    return f"ResNet-{depth}, base_width {stem.shape[0]}, in_channels {stem.shape[1]}"


def load_pretrained_encoder(
    encoder: ResNetEncoder, state_dict: Mapping[str, torch.Tensor], strict_backbone: bool = True
) -> TransferReport:
    """Load SparK-pretrained weights (from ``SparKPretrainer.encoder_state_dict``) into a fresh encoder.

    The FC head is never loaded (it keeps its initialisation). A tensor whose shape differs always raises
    ConfigError (weights from another depth/base_width/in_channels). With ``strict_backbone`` every backbone
    tensor must be present and every source key must exist in the encoder; without it, those are reported
    in the returned :class:`TransferReport` instead. Loading nothing at all always raises.
    """
    target = encoder.state_dict()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(
                f"pretrained encoder weights: entry {k!r} is a {type(v).__name__}, not a tensor"
            )
    source = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    head_keys = sorted(k for k in state_dict if k.startswith(HEAD_PREFIX))
    unexpected = sorted(k for k in source if k not in target)
    mismatched = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    ]
    described = (
        f"the weights are from {_describe_weights(state_dict)}, the encoder is {_describe_weights(target)}"
    )
    if mismatched:
        examples = "; ".join(f"{k}: pretrained {a} vs encoder {b}" for k, a, b in mismatched[:3])
        raise ConfigError(
            f"pretrained encoder weights do not fit this encoder ({described}): {len(mismatched)} tensors "
            f"differ in shape, e.g. {examples}. Pretrain with the same depth, base_width and in_channels."
        )
    missing = sorted(k for k in target if not k.startswith(HEAD_PREFIX) and k not in source)
    loadable = {k: v for k, v in source.items() if k in target}
    if not loadable:
        raise ConfigError(
            f"pretrained encoder weights: none of the {len(state_dict)} keys matches the encoder "
            f"(first keys: {list(state_dict)[:3]}); expected keys like 'conv1.weight', 'layer1.0.bn1.weight'"
        )
    if strict_backbone and (missing or unexpected):
        raise ConfigError(
            f"pretrained encoder weights do not match the encoder's structure ({described}): "
            f"{len(missing)} backbone tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unknown keys (e.g. {unexpected[:3]})"
        )
    encoder.load_state_dict(loadable, strict=False)
    head_target = sorted(k for k in target if k.startswith(HEAD_PREFIX))
    return TransferReport(
        loaded=sorted(loadable), missing=missing + head_target, unused=unexpected + head_keys
    )


__all__ = [
    "ActiveMask",
    "LightDecoder",
    "SparKPretrainer",
    "TransferReport",
    "UpStage",
    "default_dec_dim",
    "load_pretrained_encoder",
    "masked_patch_mse",
    "num_visible_patches",
    "random_active_mask",
    "sparse_batch_norm",
    "spark_optimizer",
    "upsample_mask",
]
