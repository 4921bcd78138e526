"""The conditioned DDPM (cDDPM): UNet + optional conditioning encoder + cosine schedule (method.md §3).

Pure torch. Images enter and leave in [0, 1]; the [0,1] → [−1,1] map (2x−1) happens here and nowhere else,
and the conditioning encoder sees the [0,1] slice (method.md §3.1, §3.4). The UNet predicts x0 directly,
trained with L1; a reconstruction is ONE network evaluation at a fixed t (method.md §0 fact 5).

Interfaces of the wired modules:
- ``unet(x_t [B,C,H,W] in the [−1,1] frame, t [B] long (0-based), cond [B,D] or None) -> x0_hat [B,C,H,W]``
- ``encoder(x01 [B,C,H,W] in [0,1]) -> cond [B,D]``; ``encoder=None`` makes an unconditioned DDPM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mhd_uad.models.diffusion import CosineNoiseSchedule
from mhd_uad.models.noise import draw_noise_seed, simplex_noise_like, simplex_noise_stack

__all__ = ["ConditionedDDPM"]


class ConditionedDDPM(nn.Module):
    """x0-predicting diffusion model with simplex noise and an optional per-slice conditioning vector."""

    def __init__(
        self,
        unet: nn.Module,
        encoder: nn.Module | None = None,
        *,
        timesteps: int = 1000,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
        noise_octaves: int = 6,
        noise_persistence: float = 0.8,
        noise_frequency: float = 64,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.schedule = CosineNoiseSchedule(timesteps, cosine_s, max_beta)
        # Simplex field parameters (method.md §3.2: 6 octaves, persistence 0.8, start frequency 64).
        self.noise_kwargs = {
            "octaves": noise_octaves,
            "persistence": noise_persistence,
            "frequency": noise_frequency,
        }

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def conditioned(self) -> bool:
        return self.encoder is not None

    # -- helpers ---------------------------------------------------------------------------------------

    @staticmethod
    def _check_images(x01: torch.Tensor, what: str) -> None:
        if not isinstance(x01, torch.Tensor) or x01.dim() != 4:
            shape = tuple(x01.shape) if isinstance(x01, torch.Tensor) else type(x01).__name__
            raise ValueError(f"{what}: expected images [B, C, H, W] in [0, 1], got {shape}")
        if not x01.dtype.is_floating_point:
            raise TypeError(f"{what}: expected floating-point images in [0, 1], got dtype {x01.dtype}")

    @staticmethod
    def to_model_range(x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] → [−1, 1], the diffusion frame (method.md §3.1)."""
        return x01 * 2.0 - 1.0

    @staticmethod
    def to_image_range(x: torch.Tensor) -> torch.Tensor:
        """[−1, 1] → [0, 1]; no clipping, as the original returns (x̂0+1)/2 unclipped (method.md §3.1)."""
        return (x + 1.0) / 2.0

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x0_hat = self.unet(x_t, t, cond)
        if x0_hat.shape != x_t.shape:
            # A silently broadcasting L1 against a wrongly shaped output would train on garbage.
            raise ValueError(f"unet returned shape {tuple(x0_hat.shape)}, expected {tuple(x_t.shape)}")
        return x0_hat

    def _check_cond(self, cond: torch.Tensor | None, batch: int, what: str) -> None:
        if cond is not None and cond.shape[0] != batch:
            raise ValueError(f"{what}: conditioning has {cond.shape[0]} rows for a batch of {batch} images")

    # -- public API ------------------------------------------------------------------------------------

    def encode(self, x01: torch.Tensor) -> torch.Tensor | None:
        """Conditioning vectors [B, D] from the [0,1] slices (None for an unconditioned model)."""
        self._check_images(x01, "encode")
        if self.encoder is None:
            return None
        return self.encoder(x01)

    def training_loss(
        self,
        x01: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise_seed: int | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """L1 x0-prediction loss for a batch of [0,1] slices (method.md §3.1).

        t ~ U{0..T−1} per sample; ONE simplex field, shared by the whole batch (method.md §3.2), seeded by
        ``noise_seed`` or, when None, by a seed drawn from ``generator`` (torch's global RNG when None).
        Returns ``(loss, aux)`` with aux = {"t", "noise_seed", "x_t", "x0_hat"} (tensors detached).
        """
        self._check_images(x01, "training_loss")
        batch = x01.shape[0]
        rng_device = generator.device if generator is not None else x01.device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=rng_device)
        t = t.to(x01.device)
        if noise_seed is None:
            noise_seed = draw_noise_seed(generator)

        x0 = self.to_model_range(x01)
        noise = simplex_noise_like(x0, noise_seed, **self.noise_kwargs)
        x_t = self.schedule.q_sample(x0, t, noise)
        cond = self.encode(x01)
        self._check_cond(cond, batch, "training_loss")
        x0_hat = self._denoise(x_t, t, cond)
        # Mean over every pixel, background included (method.md §3.1); promotes fp16 UNet output to fp32.
        loss = (x0_hat - x0).abs().mean()
        aux = {"t": t, "noise_seed": int(noise_seed), "x_t": x_t.detach(), "x0_hat": x0_hat.detach()}
        return loss, aux

    def reconstruct(
        self,
        x01: torch.Tensor,
        t_index: int,
        noise_seed: int,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One reconstruction [B,C,H,W] in [0,1] scale: noise to ``t_index`` with one shared simplex field,
        then a single UNet evaluation (method.md §0 fact 5). ``cond`` None means: encode ``x01`` here.

        Runs under the caller's grad mode; wrap evaluation in ``torch.inference_mode()``.
        """
        self._check_images(x01, "reconstruct")
        batch = x01.shape[0]
        t = self.schedule.timestep_tensor(t_index, batch, x01.device)
        if cond is None:
            cond = self.encode(x01)
        self._check_cond(cond, batch, "reconstruct")
        x0 = self.to_model_range(x01)
        noise = simplex_noise_like(x0, noise_seed, **self.noise_kwargs)
        x_t = self.schedule.q_sample(x0, t, noise)
        return self.to_image_range(self._denoise(x_t, t, cond))

    def reconstruct_many(
        self,
        x01: torch.Tensor,
        t_index: int,
        seeds: Sequence[int],
        cond: torch.Tensor | None = None,
        max_batch: int | None = None,
    ) -> torch.Tensor:
        """N = len(seeds) reconstructions of the same slices, [N,B,C,H,W] in [0,1] scale (method.md §4.2).

        The conditioning is computed once and reused (method.md §3.4); reconstruction n uses the simplex field
        of ``seeds[n]``, shared by all B slices (method.md §0 facts 5–6). The N·B noised images go through
        the UNet in chunks of at most ``max_batch`` images (all at once when None). Equals
        ``stack([reconstruct(x01, t_index, s, cond) for s in seeds])`` up to floating-point batching effects.
        """
        self._check_images(x01, "reconstruct_many")
        seeds = list(seeds)
        if not seeds:
            raise ValueError("reconstruct_many: seeds is empty; at least one reconstruction is needed")
        if max_batch is not None and (
            isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
        ):
            raise ValueError(
                f"reconstruct_many: max_batch must be a positive integer or None, got {max_batch!r}"
            )
        batch, channels, height, width = x01.shape
        n_recos = len(seeds)
        rows = n_recos * batch
        t_one = self.schedule.timestep_tensor(t_index, batch, x01.device)  # validates t_index
        if cond is None:
            cond = self.encode(x01)
        self._check_cond(cond, batch, "reconstruct_many")

        x0 = self.to_model_range(x01)
        fields = simplex_noise_stack(
            seeds, height, width, device=x0.device, dtype=x0.dtype, **self.noise_kwargs
        )
        # Row n*B + b holds slice b under field n: reconstruction-major, so the output views as [N, B, ...].
        x0_rows = x0.unsqueeze(0).expand(n_recos, *x0.shape).reshape(rows, channels, height, width)
        noise_rows = fields.view(n_recos, 1, 1, height, width).expand(n_recos, batch, channels, height, width)
        noise_rows = noise_rows.reshape(rows, channels, height, width)
        t_rows = t_one.repeat(n_recos)
        x_t = self.schedule.q_sample(x0_rows, t_rows, noise_rows)
        cond_rows = None
        if cond is not None:
            cond_rows = cond.unsqueeze(0).expand(n_recos, *cond.shape).reshape(rows, *cond.shape[1:])

        chunk = rows if max_batch is None else max_batch
        outputs = []
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            part_cond = None if cond_rows is None else cond_rows[start:stop]
            outputs.append(self._denoise(x_t[start:stop], t_rows[start:stop], part_cond))
        x0_hat = torch.cat(outputs, dim=0).view(n_recos, batch, channels, height, width)
        return self.to_image_range(x0_hat)
