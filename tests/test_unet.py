"""The cDDPM denoising UNet (method.md §3.3, §3.4): sizes, parameter count, initialisation, conditioning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mhd_uad.errors import ConfigError
from mhd_uad.models.unet import AttentionBlock, GroupNormFP32, UNet, count_parameters, timestep_embedding

PAPER = dict(
    image_size=96,
    in_channels=1,
    out_channels=1,
    model_channels=128,
    channel_mult=(1, 2, 2),
    num_res_blocks=3,
    attention_resolutions=(3, 6, 12),  # the paper config: matches no ds in {1, 2, 4}
    attention_in_middle=True,
    num_head_channels=64,
    cond_dim=512,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
DEMO = dict(  # conf/profile/demo.yaml
    image_size=64,
    model_channels=24,
    channel_mult=(1, 2, 3, 4),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_head_channels=24,
    groupnorm_groups=8,
    cond_dim=128,
)
TINY = dict(
    image_size=16,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_head_channels=8,
    cond_dim=6,
    groupnorm_groups=4,
    dropout=0.1,
)


def _randomise_zero_inits(model: nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised convs (block outputs, attention projections, final conv) random weights."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.count_nonzero() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _n_attention(model: nn.Module) -> int:
    return sum(isinstance(m, AttentionBlock) for m in model.modules())


@pytest.fixture(scope="module")
def paper_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(**PAPER).eval()


def test_paper_parameter_count_is_44_07_million(paper_unet):
    n = count_parameters(paper_unet)
    assert abs(n - 44.07e6) <= 0.01 * 44.07e6, n
    # The time/cond embedding MLPs belong to the UNet (method.md §3.4); without the cond MLP and with a
    # 512-wide embedding the count would be far lower.
    assert count_parameters(paper_unet.cond_embed) == 512 * 512 + 512 + 512 * 512 + 512
    assert count_parameters(paper_unet.time_embed) == 128 * 512 + 512 + 512 * 512 + 512


def test_paper_layout_attention_only_in_the_middle(paper_unet):
    assert _n_attention(paper_unet) == 1
    attn = paper_unet.middle_block[1]
    assert isinstance(attn, AttentionBlock) and attn.num_heads == 4  # 256 channels / 64
    assert len(paper_unet.output_blocks) == 3 * (3 + 1)
    assert paper_unet.emb_dim == 1024


def test_paper_output_shape_and_exact_zero_at_init(paper_unet):
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        out = paper_unet(x, torch.tensor([0, 498]), torch.randn(2, 512))
    assert out.shape == (2, 1, 96, 96)
    assert out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv


@pytest.mark.parametrize(
    "overrides, n_attention",
    [
        ({}, 1 + 2 + 1),  # ds 8: 1 encoder + 2 decoder blocks at the coarsest level, + middle
        (dict(channel_mult=(1, 2, 3, 4), num_res_blocks=2), 2 + 3 + 1),
        (dict(attention_resolutions=(), attention_in_middle=False), 0),
        (dict(cond_dim=None, resblock_updown=False, use_scale_shift_norm=False), 1 + 2 + 1),
    ],
)
def test_demo_configs_shape_and_level_attention(overrides, n_attention):
    torch.manual_seed(0)
    model = UNet(**{**DEMO, **overrides})
    assert _n_attention(model) == n_attention
    _randomise_zero_inits(model)
    cond = None if model.cond_dim is None else torch.randn(3, model.cond_dim)
    with torch.no_grad():
        out = model(torch.randn(3, 1, 64, 64), torch.tensor([0, 10, 999]), cond)
    assert out.shape == (3, 1, 64, 64)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_demo_parameter_count_is_demo_sized():
    n = count_parameters(UNet(**DEMO))
    assert 1.5e6 < n < 3.0e6, n  # demo-profile.md: 2.57 M UNet + 0.32 M encoder in the prototype


def test_multi_channel_in_out_and_non_square_input():
    model = UNet(**{**TINY, "in_channels": 2, "out_channels": 3})
    _randomise_zero_inits(model)
    out = model(torch.randn(2, 2, 16, 24), torch.tensor([1, 2]), torch.randn(2, 6))
    assert out.shape == (2, 3, 16, 24)


def test_conditioning_changes_the_output_once_zero_inits_are_trained():
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    c1, c2 = torch.randn(2, 6), torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(model(x, t, c1), model(x, t, c2))  # both exactly zero at init
        _randomise_zero_inits(model)
        o1, o2 = model(x, t, c1), model(x, t, c2)
        assert o1.abs().max() > 0
        assert (o1 - o2).abs().max() > 1e-4
        # ... and each sample depends only on its own cond vector
        o3 = model(x, t, torch.stack([c1[0], c2[1]]))
        assert torch.allclose(o3[0], o1[0]) and torch.allclose(o3[1], o2[1])
        # the timestep matters too; long and float timesteps are the same thing
        assert (model(x, torch.tensor([5, 900]), c1)[1] - o1[1]).abs().max() > 1e-4
        assert torch.allclose(model(x, t.float(), c1), o1)


def test_cond_none_means_zero_cond_embedding_and_unconditioned_rejects_cond():
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    _randomise_zero_inits(model)
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([3])
    with torch.no_grad():
        got = model(x, t, None)
        # same as a cond MLP whose output is all zeros (not the MLP applied to a zero vector)
        model_zero = UNet(**TINY).eval()
        model_zero.load_state_dict(model.state_dict())
        with torch.no_grad():
            model_zero.cond_embed[-1].weight.zero_()
            model_zero.cond_embed[-1].bias.zero_()
        assert torch.allclose(got, model_zero(x, t, torch.randn(1, 6)))
        assert not torch.allclose(got, model(x, t, torch.zeros(1, 6)))
    uncond = UNet(**{**TINY, "cond_dim": None})
    assert uncond.cond_embed is None and uncond.emb_dim == 4 * 8
    assert count_parameters(uncond) < count_parameters(model)
    with pytest.raises(ValueError, match="without conditioning"):
        uncond(x, t, torch.randn(1, 6))
    with pytest.raises(ValueError, match="cond must have shape"):
        model(x, t, torch.randn(1, 5))


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet(**TINY).train()
    _randomise_zero_inits(model)
    x = torch.randn(4, 1, 16, 16)
    out = model(x, torch.randint(0, 1000, (4,)), torch.randn(4, 6))
    (out - x).abs().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) > 50
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fresh_model_trains_its_output_conv():
    # With zero-init, only the final conv gets a gradient on the first step (as in guided diffusion).
    model = UNet(**TINY)
    x = torch.randn(2, 1, 16, 16)
    (model(x, torch.tensor([1, 2]), torch.randn(2, 6)) - x).abs().mean().backward()
    assert model.out_conv.weight.grad.abs().sum() > 0


def test_attention_matches_explicit_new_order_qkv_split():
    torch.manual_seed(0)
    block = AttentionBlock(channels=16, head_channels=4, groups=4)
    nn.init.normal_(block.proj_out.weight)
    x = torch.randn(2, 16, 3, 5)
    b, c, length, heads = 2, 16, 15, 4
    qkv = block.qkv(block.norm(x.reshape(b, c, length)))
    q, k, v = (t.reshape(b * heads, c // heads, length) for t in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c // heads), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
    expected = x + block.proj_out(a).reshape(b, c, 3, 5)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    model = UNet(**TINY).eval()  # no dropout
    _randomise_zero_inits(model)
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.randn(2, 6)
    with torch.no_grad():
        ref = model(x, t, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, c)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_cpu_bf16_group_norm_keeps_fp32_statistics_without_the_casts(scale):
    torch.manual_seed(0)
    norm = GroupNormFP32(8, 48)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(4, 48, 16, 16) * scale + 3 * scale).bfloat16()  # a large mean: bf16 sums would lose it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    ref = nn.GroupNorm.forward(norm, x.float()).bfloat16()  # the fp32 path every other input takes
    assert out.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1.0)
    assert ((out.float() - ref.float()).abs() <= ulp).all()
    half = torch.randn(2, 48, 4, 4).half()
    assert norm(half).dtype == torch.float16  # fp16 still goes through fp32 and back


def test_timestep_embedding_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0, 7]), 9)
    assert emb.shape == (2, 9)
    assert torch.equal(emb[0, :4], torch.ones(4)) and torch.equal(emb[0, 4:], torch.zeros(5))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(7.0)))  # frequency 1 first


@pytest.mark.parametrize(
    "overrides, parameter",
    [
        (dict(image_size=90), "image_size"),  # 90 not divisible by 2**3
        (dict(image_size=0), "image_size"),
        (dict(groupnorm_groups=32), "groupnorm_groups"),  # 24 channels, 32 groups
        (dict(groupnorm_groups=0), "groupnorm_groups"),
        (dict(num_head_channels=64), "num_head_channels"),  # middle block has 96 channels
        (dict(num_head_channels=48, attention_resolutions=(1,)), "num_head_channels"),  # 24 channels at ds 1
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(cond_dim=-3), "cond_dim"),
        (dict(time_embed_dim=2.5), "time_embed_dim"),
        (dict(dropout=1.0), "dropout"),
        (dict(attention_resolutions=(0,)), "attention_resolutions"),
        (dict(in_channels=0), "in_channels"),
    ],
)
def test_bad_sizes_raise_config_error_naming_the_parameter(overrides, parameter):
    with pytest.raises(ConfigError, match=parameter):
        UNet(**{**DEMO, **overrides})


def test_paper_image_size_must_divide_by_four():
    with pytest.raises(ConfigError, match="image_size"):
        UNet(**{**PAPER, "image_size": 98})
    # attention at a level whose channels do not split into 64-channel heads is rejected too
    with pytest.raises(ConfigError, match="num_head_channels"):
        UNet(**{**PAPER, "model_channels": 96, "attention_resolutions": (1,)})


def test_forward_rejects_wrong_input_shapes():
    model = UNet(**TINY)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 2, 16, 16), torch.tensor([1]), torch.randn(1, 6))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 15, 16), torch.tensor([1]), torch.randn(1, 6))
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]), torch.randn(2, 6))
