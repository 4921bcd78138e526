"""Build the networks of a composed profile, and describe them for checkpoints and `mhd-uad summary`."""

from __future__ import annotations

from mhd_uad.config import as_int_list, require, to_plain
from mhd_uad.errors import ConfigError


def image_size(params) -> int:
    """The UNet's in-plane size: the prepared grid is (X, Y, Z) and slices are X×Y, square here."""
    x, y, _ = as_int_list(params.prepare.grid, "prepare.grid", 3)
    require(x == y, f"prepare.grid must be square in-plane (X == Y) for the UNet, got {x}×{y}")
    return x


def model_spec(params) -> dict:
    """Everything that fixes the networks' shapes: stored in checkpoints and compared when loading."""
    return {
        "profile": str(params.profile_name),
        "image_size": image_size(params),
        "cond_dim": int(params.model.cond_dim),
        "unet": to_plain(params.model.unet),
        "encoder": to_plain(params.model.encoder),
        "diffusion": to_plain(params.model.diffusion),
        "noise": to_plain(params.model.noise),
    }


def encoder_spec(params) -> dict:
    return {"profile": str(params.profile_name), "image_size": image_size(params),
            "cond_dim": int(params.model.cond_dim), "encoder": to_plain(params.model.encoder)}


def build_encoder(params):
    from mhd_uad.models.encoder import ResNetEncoder

    e = params.model.encoder
    size = image_size(params)
    require(size % ResNetEncoder.downsample_ratio == 0,
            f"prepare.grid in-plane size {size} must be divisible by the encoder's downsampling "
            f"({ResNetEncoder.downsample_ratio}) for the SparK mask grid")
    return ResNetEncoder(depth=int(e.depth), in_channels=1, cond_dim=int(params.model.cond_dim),
                         base_width=int(e.base_width), drop_path_rate=float(e.drop_path_rate))


def build_unet(params):
    from mhd_uad.models.unet import UNet

    u = params.model.unet
    return UNet(
        image_size=image_size(params), in_channels=1, out_channels=1,
        model_channels=int(u.model_channels), channel_mult=tuple(int(m) for m in u.channel_mult),
        num_res_blocks=int(u.num_res_blocks), attention_resolutions=tuple(int(a) for a in u.attention_resolutions),
        attention_in_middle=bool(u.attention_in_middle), num_head_channels=int(u.num_head_channels),
        dropout=float(u.dropout), cond_dim=int(params.model.cond_dim), groupnorm_groups=int(u.groupnorm_groups),
    )


def build_cddpm(params, encoder=None):
    """The cDDPM: UNet + conditioning encoder (a fresh one unless given) + schedule + simplex noise."""
    from mhd_uad.models.cddpm import ConditionedDDPM

    n = params.model.noise
    return ConditionedDDPM(
        build_unet(params), encoder if encoder is not None else build_encoder(params),
        timesteps=int(params.model.diffusion.timesteps), noise_octaves=int(n.octaves),
        noise_persistence=float(n.persistence), noise_frequency=float(n.frequency),
    )


def build_spark(params, encoder=None):
    from mhd_uad.models.spark import SparKPretrainer

    p = params.pretrain
    return SparKPretrainer(encoder if encoder is not None else build_encoder(params),
                           mask_ratio=float(p.mask_ratio), dec_dim=int(p.dec_dim))


def validate_model_params(params) -> None:
    """Build every network once on the meta device, so impossible sizes fail before any work starts."""
    import torch

    with torch.device("meta"):
        build_cddpm(params)
        build_spark(params)
    require(params.train.optimizer in ("adam", "adamw"), f"train.optimizer must be adam or adamw, "
            f"got {params.train.optimizer!r}")
    require(params.train.lr_schedule in ("constant", "cosine"),
            f"train.lr_schedule must be constant or cosine, got {params.train.lr_schedule!r}")
    for section in ("train", "pretrain"):
        batch = int(params[section].batch_size)
        spv = int(params.data.slices_per_volume)
        if batch % spv:
            raise ConfigError(f"{section}.batch_size ({batch}) must be a multiple of data.slices_per_volume "
                              f"({spv})", "params.yaml")
    for modality in params.train.modalities:
        require(modality in ("t1", "t2"), f"train.modalities holds {modality!r}; expected t1 and/or t2")


def parameter_table(params) -> list[tuple[str, int]]:
    """(network, parameter count) for `mhd-uad summary`."""
    import torch

    from mhd_uad.models import count_parameters

    with torch.device("meta"):
        unet, encoder = build_unet(params), build_encoder(params)
        spark = build_spark(params, encoder=build_encoder(params))
    decoder = count_parameters(spark) - count_parameters(spark.encoder)
    return [
        ("UNet (denoiser, with time and condition embeddings)", count_parameters(unet)),
        (f"ResNet-{int(params.model.encoder.depth)} conditioning encoder", count_parameters(encoder)),
        ("cDDPM total (UNet + encoder)", count_parameters(unet) + count_parameters(encoder)),
        ("SparK decoder and mask tokens (pretraining only)", decoder),
    ]
