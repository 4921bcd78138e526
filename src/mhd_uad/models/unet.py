"""The cDDPM denoising UNet (method.md §3.3, §3.4): a guided-diffusion-style UNet, pure torch.

Layout, as in the OpenAI guided-diffusion UNet the paper used (written fresh here):

- encoder: conv3x3 in, then per level ``num_res_blocks`` ResBlocks (+ self-attention when the level's
  downsampling factor ``ds`` is in ``attention_resolutions``), and between levels a ResBlock that
  average-pools inside the block (``resblock_updown``) or a plain avg-pool;
- middle: ResBlock -> self-attention -> ResBlock (the attention can be turned off);
- decoder: per level ``num_res_blocks + 1`` ResBlocks, each fed the concatenation of the running
  features and one saved encoder output, then a ResBlock that upsamples (nearest) inside the block;
- out: GroupNorm -> SiLU -> zero-initialised conv3x3, so a fresh model outputs exactly zero.

Every ResBlock is FiLM-conditioned on ``emb = concat(time_mlp(sinusoidal(t)), cond_mlp(cond))``
(only the time part when the model is unconditioned). With the paper settings (image 96, 128 channels,
multipliers (1, 2, 2), 3 res-blocks, middle attention, 64 channels per head, cond_dim 512) the module
has 44,068,481 parameters (method.md §3.3: 44.07 M); the conditioning ResNet encoder is a separate module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mhd_uad.errors import ConfigError
from mhd_uad.models import count_parameters  # noqa: F401  (re-exported)

__all__ = ["UNet", "count_parameters", "timestep_embedding"]  # count_parameters re-exported


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim]: cos half then sin half, frequencies max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd width: one zero column so the output is exactly `dim` wide
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNormFP32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back, so bf16/fp16 autocast does not lose the statistics.

    A bf16 input on the CPU goes to torch's native kernel instead, which accumulates in fp32 itself: the
    same values (rarely one bf16 ulp apart) without casting the activations twice, 10 % of a demo training
    step on 2 cores.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.bfloat16 and x.device.type == "cpu":
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


def _zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Pre-activation residual block with FiLM from the embedding and optional in-block down/upsampling."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int,
        dropout: float,
        groups: int,
        use_scale_shift_norm: bool = True,
        resample: str | None = None,  # None, "down" (avg-pool 2) or "up" (nearest x2)
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.in_norm = GroupNormFP32(groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = GroupNormFP32(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        # Zero-initialised so every block starts as the identity (on its skip path).
        self.out_conv = _zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        # Resample after the activation and before the conv, on both paths (guided diffusion's order).
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        e = self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
            h = F.silu(h)
        else:
            h = F.silu(self.out_norm(h + e))
        h = self.out_conv(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual, the "new order" QKV split.

    A 1x1 conv gives [B, 3C, T]; it is split into q, k, v (each [B, C, T]) first and then into heads of
    ``head_channels`` each.
    """

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.num_heads = channels // head_channels
        self.norm = GroupNormFP32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        flat = x.reshape(b, c, hgt * wid)
        qkv = self.qkv(self.norm(flat))
        q, k, v = qkv.chunk(3, dim=1)  # each [B, C, T]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, heads, T, C/heads]
            return t.reshape(b, self.num_heads, c // self.num_heads, hgt * wid).transpose(-1, -2)

        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # softmax(qk^T/sqrt(d)) v
        a = a.transpose(-1, -2).reshape(b, c, hgt * wid)
        return (flat + self.proj_out(a)).reshape(b, c, hgt, wid)


class _Downsample(nn.Module):
    """Plain average-pool between levels (used when ``resblock_updown`` is False)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class _Upsample(nn.Module):
    """Nearest x2 followed by a conv3x3 (used when ``resblock_updown`` is False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.ModuleList):
    """A sequence of layers; ResBlocks get the embedding, the others only the features."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"unet.{name} must be an integer >= {minimum}, got {value!r}")
    return value


class UNet(nn.Module):
    """Conditioned denoising UNet: ``forward(x [B,C,H,W], timesteps [B], cond [B,cond_dim] | None)``.

    ``attention_resolutions`` holds downsampling factors ``ds`` (1 at full size, 2 after one downsampling,
    ...), as in guided diffusion; values that match no level are ignored, which is why the paper's
    (3, 6, 12) yields attention only in the middle block. ``cond_dim`` None or 0 builds an unconditioned
    model. ``time_embed_dim`` defaults to ``4 * model_channels``; with conditioning the ResBlocks see an
    embedding of twice that width.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 1,
        out_channels: int = 1,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (),
        attention_in_middle: bool = True,
        num_head_channels: int = 64,
        dropout: float = 0.0,
        cond_dim: int | None = 512,
        time_embed_dim: int | None = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        groupnorm_groups: int = 32,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult) if isinstance(channel_mult, Sequence) else channel_mult
        attention_resolutions = (
            tuple(attention_resolutions)
            if isinstance(attention_resolutions, Sequence)
            else attention_resolutions
        )
        self._validate(
            image_size, in_channels, out_channels, model_channels, channel_mult, num_res_blocks,
            attention_resolutions, attention_in_middle, num_head_channels, dropout, cond_dim,
            time_embed_dim, groupnorm_groups,
        )  # fmt: skip
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.cond_dim = cond_dim or None
        self.time_embed_dim = time_embed_dim or 4 * model_channels
        ted = self.time_embed_dim
        self.emb_dim = 2 * ted if self.cond_dim else ted

        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.cond_embed = (
            nn.Sequential(nn.Linear(self.cond_dim, ted), nn.SiLU(), nn.Linear(ted, ted))
            if self.cond_dim
            else None
        )

        def resblock(ch_in: int, ch_out: int, resample: str | None = None) -> ResBlock:
            return ResBlock(
                ch_in, self.emb_dim, ch_out, dropout, groupnorm_groups, use_scale_shift_norm, resample
            )

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_head_channels, groupnorm_groups)

        ch = model_channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        # built in this order (encoder path, middle, decoder path): the order fixes the random initialisation
        ch, ds, skip_channels = self._build_encoder_path(ch, resblock, attention, resblock_updown)
        middle: list[nn.Module] = [resblock(ch, ch)]
        if attention_in_middle:
            middle.append(attention(ch))
        middle.append(resblock(ch, ch))
        self.middle_block = _Stage(middle)
        ch = self._build_decoder_path(ch, ds, skip_channels, resblock, attention, resblock_updown)

        self.out_norm = GroupNormFP32(groupnorm_groups, ch)
        self.out_conv = _zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def _build_encoder_path(self, ch: int, resblock, attention, resblock_updown: bool):
        """input_blocks: num_res_blocks ResBlocks (+ attention) per level, a downsampling between levels."""
        self.input_blocks = nn.ModuleList()
        skip_channels = [ch]  # channels of every saved encoder output, input conv first
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, self.model_channels * mult)]
                ch = self.model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(_Stage(layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = resblock(ch, ch, "down") if resblock_updown else _Downsample()
                self.input_blocks.append(_Stage([down]))
                skip_channels.append(ch)
                ds *= 2
        return ch, ds, skip_channels

    def _build_decoder_path(self, ch: int, ds: int, skip_channels: list[int], resblock, attention,
                            resblock_updown: bool) -> int:
        """output_blocks: num_res_blocks + 1 ResBlocks per level, each taking one skip, upsampling between."""
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), self.model_channels * mult)]
                ch = self.model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == self.num_res_blocks:
                    layers.append(resblock(ch, ch, "up") if resblock_updown else _Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Stage(layers))
        assert not skip_channels, "every encoder output must be consumed once"
        return ch

    @staticmethod
    def _validate(
        image_size, in_channels, out_channels, model_channels, channel_mult, num_res_blocks,
        attention_resolutions, attention_in_middle, num_head_channels, dropout, cond_dim,
        time_embed_dim, groupnorm_groups,
    ) -> None:  # fmt: skip
        """Raise ConfigError naming the parameter for any impossible size; nothing is built before this."""
        _positive_int("image_size", image_size)
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        _positive_int("model_channels", model_channels)
        _positive_int("num_res_blocks", num_res_blocks)
        _positive_int("num_head_channels", num_head_channels)
        _positive_int("groupnorm_groups", groupnorm_groups)
        if cond_dim is not None and cond_dim != 0:
            _positive_int("cond_dim", cond_dim)
        if time_embed_dim is not None:
            _positive_int("time_embed_dim", time_embed_dim)
        if not isinstance(channel_mult, tuple) or not channel_mult:
            raise ConfigError(f"unet.channel_mult must be a non-empty list of integers, got {channel_mult!r}")
        for m in channel_mult:
            _positive_int("channel_mult[...]", m)
        if not isinstance(attention_resolutions, tuple):
            raise ConfigError(
                f"unet.attention_resolutions must be a list of downsampling factors, got {attention_resolutions!r}"
            )
        for r in attention_resolutions:
            _positive_int("attention_resolutions[...]", r)
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"unet.dropout must be a number in [0, 1), got {dropout!r}")

        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ConfigError(
                f"unet.image_size {image_size} must be divisible by 2**(len(channel_mult)-1) = {factor} "
                f"(channel_mult {list(channel_mult)} downsamples {len(channel_mult) - 1} times)"
            )
        for level, m in enumerate(channel_mult):
            ch = model_channels * m
            if ch % groupnorm_groups:
                raise ConfigError(
                    f"unet.groupnorm_groups {groupnorm_groups} must divide the channels of every level; "
                    f"level {level} has model_channels*channel_mult = {model_channels}*{m} = {ch}"
                )
            ds = 2**level
            at_level = ds in attention_resolutions
            in_middle = attention_in_middle and level == len(channel_mult) - 1
            if (at_level or in_middle) and ch % num_head_channels:
                where = f"attention at ds {ds}" if at_level else "the middle-block attention"
                raise ConfigError(
                    f"unet.num_head_channels {num_head_channels} must divide the {ch} channels of {where} "
                    f"(heads = channels // num_head_channels)"
                )

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, in_channels, H, W], timesteps [B] (long or float), cond [B, cond_dim] or None -> [B, out, H, W].

        A conditioned model given ``cond=None`` uses a zero conditioning embedding.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"UNet input H, W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {tuple(timesteps.shape)}")

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.cond_embed is not None:
            if cond is None:
                cond_emb = torch.zeros_like(emb)
            else:
                if cond.shape != (x.shape[0], self.cond_dim):
                    raise ValueError(
                        f"cond must have shape [{x.shape[0]}, {self.cond_dim}], got {tuple(cond.shape)}"
                    )
                cond_emb = self.cond_embed(cond)
            emb = torch.cat([emb, cond_emb.to(emb.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("this UNet was built without conditioning (cond_dim None/0) but got cond")

        h = self.input_conv(x)
        saved = [h]
        for block in self.input_blocks:
            h = block(h, emb)
            saved.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = torch.cat([h, saved.pop().to(h.dtype)], dim=1)
            h = block(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
