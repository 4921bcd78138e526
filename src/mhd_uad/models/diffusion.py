"""Forward diffusion process: the cosine noise schedule and q(x_t | x_0) (method.md §3.1)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CosineNoiseSchedule", "cosine_alphas_cumprod", "cosine_betas"]


def cosine_betas(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_1..β_T of the cosine schedule (Nichol & Dhariwal 2021), float64, clipped at ``max_beta``.

    ᾱ(t) = f(t)/f(0) with f(t) = cos²(((t/T) + s)/(1 + s) · π/2); β_t = 1 − ᾱ(t)/ᾱ(t−1) (method.md §3.1).
    """
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"diffusion schedule: timesteps must be a positive integer, got {timesteps!r}")
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"diffusion schedule: max_beta must lie in (0, 1], got {max_beta!r}")
    steps = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    # The clip only bites at the very end, where ᾱ → 0 would make β = 1 (method.md §3.1: 0.999).
    return betas.clamp(0.0, max_beta)


def cosine_alphas_cumprod(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t for 0-based t = 0..T−1 (index t is the (t+1)-th diffusion step), float64."""
    return torch.cumprod(1.0 - cosine_betas(timesteps, s, max_beta), dim=0)


class CosineNoiseSchedule(nn.Module):
    """The T-step cosine schedule as buffers, plus ``q_sample``.

    Buffers are float32 and non-persistent: they are a pure function of (T, s, max_beta), so they follow
    ``.to(device)`` but do not bloat or pin checkpoints.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    def __init__(self, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        super().__init__()
        self.num_timesteps = timesteps
        self.s = s
        self.max_beta = max_beta
        betas = cosine_betas(timesteps, s, max_beta)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Square roots taken in float64 before the cast, so index 498 gives 0.7038/0.7104 exactly (method.md §3.1).
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt().float(), persistent=False
        )

    def extra_repr(self) -> str:
        return f"timesteps={self.num_timesteps}, s={self.s}, max_beta={self.max_beta}"

    def timestep_tensor(self, t: int | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
        """``t`` as a long tensor [batch_size] on ``device``; an int is repeated for every sample."""
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"diffusion timesteps must be integers, got a {t.dtype} tensor")
            t = t.to(device=device, dtype=torch.long)
            if t.dim() == 0:
                t = t.expand(batch_size)
            if t.shape != (batch_size,):
                raise ValueError(
                    f"diffusion timesteps must have shape [{batch_size}] (one per sample), got {tuple(t.shape)}"
                )
            return t
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"diffusion timestep must be an int or a long tensor, got {type(t).__name__}")
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"diffusion timestep {t} outside 0..{self.num_timesteps - 1} (0-based index)")
        return torch.full((batch_size,), t, dtype=torch.long, device=device)

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε for x0 in [−1, 1], ``t`` a 0-based index per sample [B] (or an int).

        ``noise`` must broadcast to ``x0`` (simplex noise in this method, method.md §3.2).
        """
        if x0.dim() < 1:
            raise ValueError("q_sample: x0 needs a leading batch dimension")
        try:
            fits = torch.broadcast_shapes(noise.shape, x0.shape) == x0.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"q_sample: noise of shape {tuple(noise.shape)} does not broadcast to x0 {tuple(x0.shape)}"
            )
        t = self.timestep_tensor(t, x0.shape[0], x0.device)
        view = (-1,) + (1,) * (x0.dim() - 1)
        signal = self.sqrt_alphas_cumprod[t].view(view)
        sigma = self.sqrt_one_minus_alphas_cumprod[t].view(view)
        return signal * x0 + sigma * noise
