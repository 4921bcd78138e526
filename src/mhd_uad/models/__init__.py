"""The cDDPM's networks as pure torch modules (UNet, ResNet encoder, SparK, diffusion, simplex noise)."""

from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (shared tensors once; BN running stats are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
