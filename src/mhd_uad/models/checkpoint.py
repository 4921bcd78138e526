"""The checkpoint format: where the trained networks live, how they are written and how they are loaded.

A checkpoint is a lean file of tensors and plain metadata (`format`, `version`, `meta`, `state_dict`) that
loads with `torch.load(weights_only=True)`, so no pickled object is ever executed. `meta.spec` records
everything that fixes the networks' shapes (models.factory.model_spec); a checkpoint from another profile,
modality or shape is refused with the file named, before any work starts.

    models/<modality>/encoder.pt            the SparK-pretrained encoder (or the record "no pretraining")
    models/<modality>/fold<k>/cddpm.ckpt    the cDDPM of fold k (lowest val loss)
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from mhd_uad.errors import ConfigError, InputFileError
from mhd_uad.io import atomic_write_bytes

CDDPM_FORMAT = "mhd-uad/cddpm"
ENCODER_FORMAT = "mhd-uad/encoder"
CHECKPOINT_VERSION = 1


def encoder_path(root: str | Path, modality: str) -> Path:
    return Path(root) / "models" / modality / "encoder.pt"


def cddpm_path(root: str | Path, modality: str, fold: int) -> Path:
    return Path(root) / "models" / modality / f"fold{int(fold)}" / "cddpm.ckpt"


def save_checkpoint(path: str | Path, fmt: str, meta: dict, state_dict: dict | None) -> Path:
    payload = {"format": fmt, "version": CHECKPOINT_VERSION, "meta": meta,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in (state_dict or {}).items()}}
    buffer = io.BytesIO()  # torch.save names the zip's records after the file: a temp name would leak into them
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path, fmt: str, *, what: str = "checkpoint") -> dict:
    """Load a lean checkpoint with weights_only=True (no arbitrary pickle) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{what} not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or non-weights files
        raise InputFileError(f"unreadable {what} ({type(exc).__name__}: {str(exc).splitlines()[0]})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InputFileError(f"not an mhd-uad {what} (format {found!r}, expected {fmt!r})", path)
    return payload


def check_spec(path: Path, meta: dict, expected: dict, modality: str, what: str) -> None:
    """A checkpoint from another profile, modality or network shape is refused before any work."""
    if meta.get("modality") != modality:
        raise ConfigError(f"{what} was trained on {meta.get('modality')!r}, not {modality!r}", path)
    got = meta.get("spec", {})
    if got.get("profile") != expected.get("profile"):
        raise ConfigError(f"{what} comes from profile {got.get('profile')!r}, params select "
                          f"{expected.get('profile')!r}", path)
    diff = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
    if diff:
        raise ConfigError(f"{what} does not match the params ({', '.join(diff)} differ): re-run its stage", path)


def load_encoder_for(params, modality: str, root: str | Path):
    """A fresh encoder for the cDDPM, with SparK weights when the pretrain stage made them."""
    from mhd_uad.models.factory import build_encoder, encoder_spec
    from mhd_uad.models.spark import load_pretrained_encoder

    path = encoder_path(root, modality)
    payload = load_checkpoint(path, ENCODER_FORMAT, what="encoder checkpoint")
    check_spec(path, payload["meta"], encoder_spec(params), modality, "encoder checkpoint")
    encoder = build_encoder(params)
    if payload["meta"].get("pretrained") and bool(params.pretrain.enabled):
        try:
            load_pretrained_encoder(encoder, payload["state_dict"])
        except ConfigError as exc:
            raise ConfigError(f"encoder checkpoint does not fit the params' encoder: {exc}", path) from None
    elif bool(params.pretrain.enabled) != bool(payload["meta"].get("pretrained")):
        raise ConfigError("encoder checkpoint was made with pretraining "
                          f"{'on' if payload['meta'].get('pretrained') else 'off'}, params say "
                          f"{'on' if params.pretrain.enabled else 'off'}: re-run the pretrain stage", path)
    return encoder


def checkpoint_modality(path: str | Path) -> str | None:
    """The modality a cDDPM checkpoint was trained on (its file is checked as it is read)."""
    return load_checkpoint(path, CDDPM_FORMAT, what="cDDPM checkpoint")["meta"].get("modality")


def load_cddpm(params, path: str | Path, modality: str):
    """The trained cDDPM of a checkpoint, checked against the params and modality, in eval mode."""
    from mhd_uad.models.factory import build_cddpm, model_spec

    path = Path(path)
    payload = load_checkpoint(path, CDDPM_FORMAT, what="cDDPM checkpoint")
    check_spec(path, payload["meta"], model_spec(params), modality, "cDDPM checkpoint")
    model = build_cddpm(params)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"cDDPM checkpoint does not fit the network ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors)", path)
    return model.eval(), payload["meta"]
