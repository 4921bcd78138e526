"""Models: the cDDPM's networks as pure torch modules (unet, encoder, spark, diffusion, noise, cddpm), built
from params (factory) and wrapped for Lightning (lightning); the checkpoint format (checkpoint) and
inference with a trained model (inference)."""

from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (shared tensors once; BN running stats are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
