"""SparK masked pretraining (method.md §3.6): masks, sparse emulation, loss, decoder, weight transfer."""

from __future__ import annotations

import itertools

import pytest
import torch

from mhd_uad.errors import ConfigError
from mhd_uad.models.encoder import ResNetEncoder, count_parameters
from mhd_uad.models.spark import (
    ActiveMask,
    SparKPretrainer,
    load_pretrained_encoder,
    masked_patch_mse,
    num_visible_patches,
    random_active_mask,
    spark_optimizer,
    sparse_batch_norm,
    upsample_mask,
)


def _demo_encoder(seed: int = 0, **kwargs) -> ResNetEncoder:
    torch.manual_seed(seed)
    cfg = {"depth": 18, "in_channels": 1, "cond_dim": 32, "base_width": 8}
    cfg.update(kwargs)
    return ResNetEncoder(**cfg)


def _batch(seed: int = 0, n: int = 4, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(("grid", "kept"), [((3, 3), 3), ((2, 2), 1)])
def test_kept_patches_per_sample(grid, kept):
    assert num_visible_patches(grid[0] * grid[1], 0.65) == kept
    active = random_active_mask(32, grid, 0.65, torch.Generator().manual_seed(0))
    assert active.shape == (32, 1, *grid) and active.dtype == torch.bool
    assert active.sum(dim=(1, 2, 3)).tolist() == [kept] * 32
    assert len({tuple(a.flatten().tolist()) for a in active}) > 1  # chosen per sample, not one mask per batch


def test_mask_follows_the_generator():
    a = random_active_mask(16, (3, 3), 0.65, torch.Generator().manual_seed(7))
    b = random_active_mask(16, (3, 3), 0.65, torch.Generator().manual_seed(7))
    c = random_active_mask(16, (3, 3), 0.65, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pretrainer_mask_is_on_the_encoder_output_grid():
    pretrainer = SparKPretrainer(_demo_encoder(), dec_dim=64)
    loss, reconstruction, active = pretrainer(_batch(), generator=torch.Generator().manual_seed(0))
    assert active.shape == (4, 1, 2, 2)
    assert active.sum(dim=(1, 2, 3)).tolist() == [1, 1, 1, 1]
    assert reconstruction.shape == (4, 1, 64, 64)
    assert loss.ndim == 0 and torch.isfinite(loss)


# ---------------------------------------------------------------- sparse emulation


def test_pretrainer_wraps_the_encoder_modules_not_a_copy():
    encoder = _demo_encoder()
    pretrainer = SparKPretrainer(encoder, dec_dim=64)
    assert pretrainer.encoder is encoder
    before = encoder.layer2[0].bn1.running_mean.clone()
    x = _batch()
    active = random_active_mask(4, (2, 2), 0.65, torch.Generator().manual_seed(0))
    pretrainer.train().masked_features(x, active)
    assert encoder.bn1.num_batches_tracked.item() == 1
    assert not torch.equal(encoder.layer2[0].bn1.running_mean, before)
    # the stem BN's running mean (momentum 0.1, from 0) is the mean of the conv1 output over active positions
    with torch.no_grad():
        stem = encoder.conv1(x * upsample_mask(active, (64, 64)))
    visible = upsample_mask(active, stem.shape[-2:])[:, 0]
    active_mean = stem.permute(0, 2, 3, 1)[visible].mean(0)
    torch.testing.assert_close(encoder.bn1.running_mean, 0.1 * active_mean)
    assert not torch.allclose(encoder.bn1.running_mean, 0.1 * stem.mean(dim=(0, 2, 3)), rtol=0.05, atol=0)


def test_masked_pixels_do_not_reach_the_encoder_features():
    pretrainer = SparKPretrainer(_demo_encoder(), dec_dim=64).train()
    x = _batch(0)
    active = random_active_mask(4, (2, 2), 0.65, torch.Generator().manual_seed(3))
    pixel_active = upsample_mask(active, (64, 64))
    x_changed = torch.where(pixel_active, x, _batch(1) * 5.0)  # new content in every masked patch only
    assert not torch.equal(x, x_changed)

    torch.manual_seed(0)  # same drop-path draws for both passes
    feats = pretrainer.masked_features(x, active)
    torch.manual_seed(0)
    feats_changed = pretrainer.masked_features(x_changed, active)
    for f, g in zip(feats, feats_changed, strict=True):
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-6)
        inactive = ~upsample_mask(active, f.shape[-2:])
        assert (f.masked_select(inactive) == 0).all()
    assert feats[0].abs().sum() > 0

    # Control: the dense encoder does see the masked pixels at the visible positions of layer1 (through
    # its receptive field and batch statistics), so the assertion above can fail.
    dense = pretrainer.encoder.forward_features(x)[0]
    dense_changed = pretrainer.encoder.forward_features(x_changed)[0]
    visible = upsample_mask(active, dense.shape[-2:]).expand_as(dense)
    assert not torch.allclose(dense[visible], dense_changed[visible])


def test_all_visible_masked_forward_equals_the_dense_encoder():
    encoder = _demo_encoder(drop_path_rate=0.0).eval()
    with torch.no_grad():
        encoder.train()(_batch(5))  # non-trivial running statistics
    encoder.eval()
    x = _batch(1)
    masking = ActiveMask(torch.ones(4, 1, 2, 2, dtype=torch.bool))
    with torch.no_grad():
        sparse = encoder.forward_features(masking.mask(x), masking)
        dense = encoder.forward_features(x)
    for s, d in zip(sparse, dense, strict=True):
        torch.testing.assert_close(s, d, rtol=1e-5, atol=1e-5)


def test_sparse_batch_norm_uses_active_positions_only():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=0.1)
    torch.nn.init.uniform_(bn.weight, 0.5, 2.0)
    torch.nn.init.uniform_(bn.bias, -1.0, 1.0)
    x = torch.randn(2, 3, 4, 4) * 2 + 1
    active = upsample_mask(
        torch.tensor([[[[True, False], [False, False]]], [[[False, True], [True, False]]]]), (4, 4)
    )
    x[~active.expand_as(x)] = 1000.0  # would dominate the statistics if inactive positions were used
    out = sparse_batch_norm(bn.train(), x, active)

    values = x.permute(0, 2, 3, 1)[active[:, 0]]  # [N, C]
    mean, var = values.mean(0), values.var(0, unbiased=False)
    expected = (values - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[active[:, 0]], expected)
    assert (out.permute(0, 2, 3, 1)[~active[:, 0]] == 0).all()
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * values.var(0, unbiased=True))
    assert bn.num_batches_tracked.item() == 1


# ---------------------------------------------------------------- loss


def test_loss_only_counts_masked_patches():
    target = _batch(0)
    reconstruction = _batch(1)
    active = random_active_mask(4, (2, 2), 0.65, torch.Generator().manual_seed(0))
    visible = upsample_mask(active, (64, 64))
    loss = masked_patch_mse(reconstruction, target, active)
    expected = ((reconstruction - target) ** 2)[~visible].mean()
    torch.testing.assert_close(loss, expected)

    changed_visible = torch.where(visible, torch.full_like(reconstruction, 9.0), reconstruction)
    assert masked_patch_mse(changed_visible, target, active) == loss
    changed_masked = torch.where(visible, reconstruction, torch.full_like(reconstruction, 9.0))
    assert masked_patch_mse(changed_masked, target, active) > loss + 1.0


def test_a_few_optimisation_steps_reduce_the_loss_on_a_fixed_batch():
    encoder = _demo_encoder(drop_path_rate=0.0)
    pretrainer = SparKPretrainer(encoder, dec_dim=64).train()
    optimizer = spark_optimizer(pretrainer.pretraining_parameters(), lr=1e-3)
    x = _batch(0, n=8)
    conv1_before = encoder.conv1.weight.detach().clone()
    fc_before = encoder.fc.weight.detach().clone()
    losses = []
    for _ in range(6):
        loss, _, _ = pretrainer(x, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # every step lowers the loss
    assert losses[-1] < losses[0] - 0.01, losses
    assert not torch.equal(encoder.conv1.weight, conv1_before)  # the encoder is trained through the mask
    assert torch.equal(encoder.fc.weight, fc_before)  # the head is not part of pretraining


def test_spark_optimizer_defaults():
    optimizer = spark_optimizer([torch.nn.Parameter(torch.zeros(2))])
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-4, 0.05, (0.9, 0.95))


# ---------------------------------------------------------------- decoder


def test_paper_scale_decoder_and_densify_layers():
    pretrainer = SparKPretrainer(ResNetEncoder(depth=50), mask_ratio=0.65, dec_dim=512)
    assert pretrainer.decoder.widths == [512, 256, 128, 64, 32, 16]
    assert len(pretrainer.decoder.stages) == 5
    stage = pretrainer.decoder.stages[0]
    assert (stage.up.kernel_size, stage.up.stride, stage.up.padding) == ((4, 4), (2, 2), (1, 1))
    assert isinstance(stage.conv[2], torch.nn.ReLU6) and isinstance(stage.conv[4], torch.nn.BatchNorm2d)
    assert pretrainer.decoder.proj.out_channels == 1 and pretrainer.decoder.proj.kernel_size == (1, 1)
    projs = [(p.in_channels, p.out_channels, p.kernel_size[0]) for p in pretrainer.densify_projs]
    assert projs == [(2048, 512, 1), (1024, 256, 3), (512, 128, 3), (256, 64, 3)]
    assert [t.shape[1] for t in pretrainer.mask_tokens] == [2048, 1024, 512, 256]
    assert count_parameters(pretrainer.encoder) == 24_550_848


def test_dec_dim_scales_with_width_when_not_given():
    assert SparKPretrainer(_demo_encoder(base_width=16), dec_dim=None).dec_dim == 128
    assert SparKPretrainer(ResNetEncoder(depth=18), dec_dim=None).dec_dim == 512


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mask_ratio": 0.0}, "mask_ratio"), ({"mask_ratio": 1.2}, "mask_ratio"), ({"dec_dim": 100}, "dec_dim")],
)
def test_invalid_pretrainer_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SparKPretrainer(_demo_encoder(), **kwargs)


def test_image_size_and_mask_ratio_are_checked_at_forward():
    with pytest.raises(ConfigError, match="divisible"):
        SparKPretrainer(_demo_encoder(), dec_dim=64)(torch.rand(2, 1, 60, 60))
    with pytest.raises(ConfigError, match="mask_ratio 0.9 keeps 0 of the 4"):
        SparKPretrainer(_demo_encoder(), mask_ratio=0.9, dec_dim=64)(torch.rand(2, 1, 64, 64))


# ---------------------------------------------------------------- transfer


def _pretrained(seed: int = 0, **kwargs) -> SparKPretrainer:
    pretrainer = SparKPretrainer(_demo_encoder(seed, **kwargs), dec_dim=64).train()
    optimizer = spark_optimizer(pretrainer.pretraining_parameters(), lr=1e-3)
    loss, _, _ = pretrainer(_batch(seed), generator=torch.Generator().manual_seed(seed))
    loss.backward()
    optimizer.step()
    return pretrainer


def test_weight_transfer_round_trip_keeps_bn_statistics_and_drops_fc():
    pretrainer = _pretrained()
    state = pretrainer.encoder_state_dict()
    assert not any(k.startswith("fc.") for k in state)
    assert "layer1.0.bn1.running_mean" in state and "bn1.num_batches_tracked" in state

    fresh = _demo_encoder(seed=123)
    fc_before = {k: v.clone() for k, v in fresh.fc.state_dict().items()}
    assert not torch.equal(fresh.bn1.running_var, pretrainer.encoder.bn1.running_var)
    report = load_pretrained_encoder(fresh, state)

    source = pretrainer.encoder.state_dict()
    for key, value in fresh.state_dict().items():
        if key.startswith("fc."):
            assert torch.equal(value, fc_before[key.removeprefix("fc.")])
            assert not torch.equal(value, source[key])
        else:
            assert torch.equal(value, source[key]), key
    assert report.loaded == sorted(state)
    assert report.missing == ["fc.bias", "fc.weight"]
    assert report.unused == []

    # a full encoder state dict (with its FC) transfers the same way: the head is reported, not loaded
    again = _demo_encoder(seed=7)
    report = load_pretrained_encoder(again, pretrainer.encoder.state_dict())
    assert report.unused == ["fc.bias", "fc.weight"]
    assert not torch.equal(again.fc.weight, pretrainer.encoder.fc.weight)


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"base_width": 16}, "base_width 16"),
        ({"in_channels": 2}, "in_channels 2"),
        ({"depth": 50}, "ResNet-50"),
    ],
)
def test_mismatched_weights_raise_config_error(other, match):
    pretrainer = SparKPretrainer(_demo_encoder(**other), dec_dim=64)
    target = _demo_encoder()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        load_pretrained_encoder(target, pretrainer.encoder_state_dict(), strict_backbone=False)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def test_structural_mismatch_is_strict_by_default():
    deeper = SparKPretrainer(_demo_encoder(depth=34), dec_dim=64).encoder_state_dict()
    with pytest.raises(ConfigError, match=r"ResNet-34.*ResNet-18"):
        load_pretrained_encoder(_demo_encoder(), deeper)
    report = load_pretrained_encoder(_demo_encoder(), deeper, strict_backbone=False)
    assert "layer1.2.conv1.weight" in report.unused
    incomplete = {k: v for k, v in _pretrained().encoder_state_dict().items() if not k.startswith("layer4.")}
    with pytest.raises(ConfigError, match="missing"):
        load_pretrained_encoder(_demo_encoder(), incomplete)
    report = load_pretrained_encoder(_demo_encoder(), incomplete, strict_backbone=False)
    assert "layer4.0.conv1.weight" in report.missing


def test_wrongly_keyed_weights_never_load_silently():
    whole = _pretrained().state_dict()  # keys prefixed with "encoder.", "decoder." ...
    with pytest.raises(ConfigError, match="none of the"):
        load_pretrained_encoder(_demo_encoder(), whole, strict_backbone=False)
