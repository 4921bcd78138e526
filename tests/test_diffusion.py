"""Cosine schedule, q_sample and the ConditionedDDPM wiring (method.md §3.1, §3.4, §4.2), with stand-in nets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mhd_uad.models.cddpm import ConditionedDDPM
from mhd_uad.models.diffusion import CosineNoiseSchedule, cosine_alphas_cumprod, cosine_betas
from mhd_uad.models.noise import simplex_noise, simplex_noise_stack

T = 1000
COND_DIM = 4

# -- schedule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "abar", "sqrt_abar", "sqrt_one_minus"),
    [
        (249, 0.8470, 0.9203, 0.3911),
        (498, 0.4954, 0.7038, 0.7104),
        (499, 0.4938, 0.7027, 0.7114),
        (749, 0.1443, 0.3798, 0.9251),
    ],
)
def test_alphas_cumprod_match_method_table(index, abar, sqrt_abar, sqrt_one_minus):
    # method.md §3.1 table, 0-based indices, 4 decimals.
    sched = CosineNoiseSchedule()
    assert sched.alphas_cumprod[index].item() == pytest.approx(abar, abs=5e-5)
    assert sched.sqrt_alphas_cumprod[index].item() == pytest.approx(sqrt_abar, abs=1e-4)
    assert sched.sqrt_one_minus_alphas_cumprod[index].item() == pytest.approx(sqrt_one_minus, abs=1e-4)


def test_cosine_schedule_closed_form_and_clipping():
    abar = cosine_alphas_cumprod(T)
    assert abar.shape == (T,)

    def f(t: float) -> float:
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    # Before the clip bites, ᾱ at 0-based index t is f(t+1)/f(0).
    for t in (0, 10, 498, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    betas = cosine_betas(T)
    assert betas.max().item() == pytest.approx(0.999)  # the last β is clipped
    assert (betas[:-1] < 0.999).all()
    assert (abar[1:] < abar[:-1]).all()
    assert abar[-1].item() < 1e-6


def test_schedule_buffers_follow_the_module_but_stay_out_of_checkpoints():
    sched = CosineNoiseSchedule()
    names = {name for name, _ in sched.named_buffers()}
    assert {"alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"} <= names
    assert sched.state_dict() == {}
    assert sched.double().alphas_cumprod.dtype == torch.float64


def test_q_sample_endpoints_and_per_sample_t():
    sched = CosineNoiseSchedule()
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    noise = simplex_noise(16, 16, 5).expand(2, 1, 16, 16)
    at_start = sched.q_sample(x0, torch.tensor([0, 0]), noise)
    assert torch.allclose(at_start, x0, atol=0.02)  # √(1−ᾱ_0) = 0.0064
    at_end = sched.q_sample(x0, torch.tensor([T - 1, T - 1]), noise)
    assert torch.allclose(at_end, noise, atol=1e-3)  # √ᾱ_999 ≈ 5e-5
    assert not torch.allclose(at_end, x0, atol=0.1)
    mixed = sched.q_sample(x0, torch.tensor([0, T - 1]), noise)
    assert torch.equal(mixed[0], at_start[0]) and torch.equal(mixed[1], at_end[1])
    mid = sched.q_sample(x0, 498, noise)
    abar = cosine_alphas_cumprod(T)[498]
    want = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    assert torch.allclose(mid.double(), want, atol=1e-6)


def test_q_sample_rejects_bad_timesteps_and_noise():
    sched = CosineNoiseSchedule()
    x0 = torch.zeros(3, 1, 8, 8)
    noise = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="shape"):
        sched.q_sample(x0, torch.zeros(2, dtype=torch.long), noise)
    with pytest.raises(ValueError, match="outside"):
        sched.q_sample(x0, T, noise)
    with pytest.raises(TypeError, match="integers"):
        sched.q_sample(x0, torch.zeros(3), noise)
    with pytest.raises(ValueError, match="broadcast"):
        sched.q_sample(x0, 3, torch.zeros(2, 3, 1, 8, 8))


# -- stand-in networks -------------------------------------------------------------------------------------


class TinyUNet(nn.Module):
    """Respects the UNet interface: (x_t [B,1,H,W], t [B] long, cond [B,D] | None) -> x0_hat [B,1,H,W]."""

    def __init__(self, cond_dim: int = COND_DIM, timesteps: int = T) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.time = nn.Embedding(timesteps, 1)
        self.cond = nn.Linear(cond_dim, 1)

    def forward(self, x_t, t, cond):
        h = self.conv(x_t) + self.time(t).view(-1, 1, 1, 1)
        if cond is not None:
            h = h + self.cond(cond).view(-1, 1, 1, 1)
        return h


class TinyEncoder(nn.Module):
    """Respects the encoder interface: x01 [B,1,H,W] -> cond [B,D]."""

    def __init__(self, cond_dim: int = COND_DIM) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, cond_dim, 3, padding=1)

    def forward(self, x01):
        return torch.tanh(self.conv(x01).mean(dim=(2, 3)))


class Spy(nn.Module):
    """Wraps a module and records clones of the positional inputs of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, *args):
        self.calls.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
        return self.inner(*args)


def _model(conditioned: bool = True, seed: int = 0) -> tuple[ConditionedDDPM, Spy, Spy | None]:
    torch.manual_seed(seed)
    unet = Spy(TinyUNet())
    encoder = Spy(TinyEncoder()) if conditioned else None
    return ConditionedDDPM(unet, encoder), unet, encoder


def _slices(batch: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    x[:, :, :3] = 0.0  # background rows, as in skull-stripped slices
    return x


# -- training loss --------------------------------------------------------------------------------------


def test_training_loss_is_l1_on_x0_by_hand():
    model, unet, encoder = _model()
    x01 = _slices()
    loss, aux = model.training_loss(x01, generator=torch.Generator().manual_seed(7), noise_seed=1234)

    # t ~ U{0..T-1} per sample, drawn from the given generator.
    want_t = torch.randint(0, T, (3,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(aux["t"], want_t)
    assert aux["noise_seed"] == 1234

    abar = cosine_alphas_cumprod(T)[want_t].view(-1, 1, 1, 1)
    x0 = x01.double() * 2 - 1
    field = simplex_noise(16, 16, 1234, dtype=torch.float64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * field
    with torch.no_grad():
        x0_hat = unet.inner(x_t.float(), want_t, encoder.inner(x01))
    want = (x0_hat.double() - x0).abs().mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() != pytest.approx((x0_hat.double() - x0).square().mean().item(), rel=1e-3)  # not MSE


def test_encoder_sees_unit_range_and_unet_sees_mapped_noisy_input():
    model, unet, encoder = _model()
    x01 = _slices()
    _, aux = model.training_loss(x01, generator=torch.Generator().manual_seed(3), noise_seed=55)
    assert len(encoder.calls) == 1 and len(unet.calls) == 1
    assert torch.equal(encoder.calls[0][0], x01)  # the [0,1] slice, untouched (method.md §3.4)

    x_t_seen, t_seen, cond_seen = unet.calls[0]
    assert t_seen.dtype == torch.long and torch.equal(t_seen, aux["t"])
    assert cond_seen.shape == (3, COND_DIM)
    sched = model.schedule
    field = simplex_noise(16, 16, 55)
    mapped = sched.q_sample(x01 * 2 - 1, aux["t"], field)
    unmapped = sched.q_sample(x01, aux["t"], field)
    assert torch.allclose(x_t_seen, mapped, atol=1e-6)
    assert not torch.allclose(x_t_seen, unmapped, atol=1e-2)


def test_one_noise_field_is_shared_across_the_batch():
    model, unet, _ = _model()
    x01 = _slices(batch=4)
    _, aux = model.training_loss(x01, generator=torch.Generator().manual_seed(11))
    sched = model.schedule
    t = aux["t"]
    x_t = unet.calls[0][0]
    signal = sched.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = sched.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    recovered = (x_t - signal * (x01 * 2 - 1)) / sigma
    assert torch.allclose(recovered, simplex_noise(16, 16, aux["noise_seed"]).expand_as(recovered), atol=1e-3)


def test_training_noise_seed_is_reproducible_from_the_generator():
    model, _, _ = _model()
    x01 = _slices()
    loss_a, aux_a = model.training_loss(x01, generator=torch.Generator().manual_seed(5))
    loss_b, aux_b = model.training_loss(x01, generator=torch.Generator().manual_seed(5))
    loss_c, aux_c = model.training_loss(x01, generator=torch.Generator().manual_seed(6))
    assert aux_a["noise_seed"] == aux_b["noise_seed"] and loss_a.item() == loss_b.item()
    assert aux_a["noise_seed"] != aux_c["noise_seed"]


def test_gradients_reach_unet_and_encoder():
    model, _, _ = _model()
    loss, _ = model.training_loss(_slices(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
    for prefix in ("unet.", "encoder."):
        grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and sum(grads) > 0, prefix


def test_unconditioned_model_passes_none():
    model, unet, _ = _model(conditioned=False)
    assert not model.conditioned and model.encode(_slices()) is None
    loss, _ = model.training_loss(_slices(), noise_seed=1)
    assert torch.isfinite(loss)
    assert unet.calls[-1][2] is None
    reco = model.reconstruct_many(_slices(), 498, [1, 2])
    assert reco.shape == (2, 3, 1, 16, 16)


class FlatUNet(nn.Module):
    def forward(self, x_t, t, cond):
        return x_t.mean(dim=(1, 2))  # [B, W]: would broadcast silently against [B, 1, H, W] in the loss


def test_wrong_unet_output_shape_is_an_error():
    model = ConditionedDDPM(FlatUNet(), None)
    with pytest.raises(ValueError, match="unet returned shape"):
        model.training_loss(_slices(), noise_seed=1)


def test_bad_images_are_rejected():
    model, _, _ = _model()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model.training_loss(torch.rand(16, 16))
    with pytest.raises(TypeError, match="floating"):
        model.reconstruct(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 498, 1)


# -- reconstruction -------------------------------------------------------------------------------------


def test_reconstruct_is_one_network_evaluation_in_unit_scale():
    model, unet, encoder = _model()
    x01 = _slices()
    with torch.no_grad():
        reco = model.reconstruct(x01, 498, noise_seed=9)
    assert len(unet.calls) == 1 and len(encoder.calls) == 1
    x_t, t, cond = unet.calls[0]
    assert torch.equal(t, torch.full((3,), 498))
    want_x_t = model.schedule.q_sample(x01 * 2 - 1, 498, simplex_noise(16, 16, 9))
    assert torch.allclose(x_t, want_x_t, atol=1e-6)
    with torch.no_grad():
        raw = unet.inner(x_t, t, cond)
    assert torch.allclose(reco, (raw + 1) / 2, atol=1e-6)


@pytest.mark.parametrize("max_batch", [None, 1, 4, 6, 100])
def test_reconstruct_many_equals_separate_reconstructions(max_batch):
    model, unet, encoder = _model()
    x01 = _slices(batch=3)
    seeds = [101, -7, 2**35, 0]
    with torch.no_grad():
        many = model.reconstruct_many(x01, 498, seeds, max_batch=max_batch)
        assert len(encoder.calls) == 1  # conditioning computed once for all N (method.md §3.4)
        rows = len(seeds) * 3
        assert len(unet.calls) == (1 if max_batch is None else math.ceil(rows / max_batch))
        assert all(call[0].shape[0] <= (max_batch or rows) for call in unet.calls)
        separate = torch.stack([model.reconstruct(x01, 498, s) for s in seeds])
    assert many.shape == (4, 3, 1, 16, 16)
    assert torch.allclose(many, separate, rtol=0, atol=1e-6)
    # Different seeds give different reconstructions.
    assert (many[0] - many[1]).abs().max() > 1e-3


def test_reconstruct_many_is_deterministic_and_shares_fields_within_a_reconstruction():
    model, unet, _ = _model()
    x01 = _slices(batch=3)
    seeds = [3, 4]
    with torch.no_grad():
        a = model.reconstruct_many(x01, 498, seeds, max_batch=4)
        b = model.reconstruct_many(x01, 498, seeds, max_batch=4)
    assert torch.equal(a, b)

    # Recover the noise each UNet row saw: rows n*B..n*B+B-1 all carry seeds[n]'s field.
    x_t = torch.cat([call[0] for call in unet.calls[:2]])  # first reconstruct_many call: 6 rows in chunks 4+2
    sched = model.schedule
    signal, sigma = sched.sqrt_alphas_cumprod[498], sched.sqrt_one_minus_alphas_cumprod[498]
    noise = (x_t - signal * (x01 * 2 - 1).repeat(2, 1, 1, 1)) / sigma
    fields = simplex_noise_stack(seeds, 16, 16)
    for n in range(2):
        for b in range(3):
            assert torch.allclose(noise[n * 3 + b, 0], fields[n], atol=1e-3)


def test_reconstruct_many_uses_given_conditioning():
    model, unet, encoder = _model()
    x01 = _slices(batch=2)
    cond = torch.randn(2, COND_DIM)
    with torch.no_grad():
        out = model.reconstruct_many(x01, 498, [1, 2, 3], cond=cond)
    assert len(encoder.calls) == 0
    assert torch.equal(unet.calls[0][2], cond.repeat(3, 1))
    assert out.shape == (3, 2, 1, 16, 16)


def test_reconstruct_many_rejects_bad_arguments():
    model, _, _ = _model()
    x01 = _slices()
    with pytest.raises(ValueError, match="seeds"):
        model.reconstruct_many(x01, 498, [])
    with pytest.raises(ValueError, match="max_batch"):
        model.reconstruct_many(x01, 498, [1], max_batch=0)
    with pytest.raises(ValueError, match="outside"):
        model.reconstruct_many(x01, T, [1])
    with pytest.raises(ValueError, match="conditioning"):
        model.reconstruct_many(x01, 498, [1], cond=torch.zeros(2, COND_DIM))


@pytest.mark.cuda
def test_cuda_reconstruct_many_matches_cpu():
    model, _, _ = _model()
    x01 = _slices()
    with torch.no_grad():
        cpu = model.reconstruct_many(x01, 498, [1, 2])
        model.cuda()
        gpu = model.reconstruct_many(x01.cuda(), 498, [1, 2])
        loss, _ = model.training_loss(x01.cuda(), noise_seed=3)
    assert gpu.device.type == "cuda" and torch.isfinite(loss)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
