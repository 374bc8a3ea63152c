import pytest
import torch
from torch import nn

from veil.config import ModelConfig
from veil.models import RECONSTRUCTORS, Classifier, Obfuscator, build_networks, build_reconstructor, feature_shape, init_xavier
from veil.models.reconstructors import build_attacker


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 32)])
@pytest.mark.parametrize("name", list(RECONSTRUCTORS))
def test_shapes_round_trip(channels, size, name):
    width = 0.125
    f = Obfuscator(channels, width, split=2).eval()
    g = Classifier(10, width, split=2).eval()
    r = build_reconstructor(name, f.out_channels, channels, width, split=2).eval()
    x = torch.rand(2, channels, size, size)
    z = f(x)
    assert z.shape == (2, 16, 8, 8) == (2, *feature_shape(channels, size, width, 2))
    assert g(z).shape == (2, 10)
    out = r(z)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1  # sigmoid output


def test_full_width_feature_map_is_8x8x128():
    f = Obfuscator(3, 1.0, 2)
    assert f(torch.rand(1, 3, 32, 32)).shape == (1, 128, 8, 8)


@pytest.mark.parametrize("split", [1, 3, 4, 5])
@pytest.mark.parametrize("name", [*RECONSTRUCTORS, "unet"])
def test_other_splits_reconstruct_full_size(split, name):
    f = Obfuscator(3, 0.125, split).eval()
    assert f(torch.rand(2, 3, 32, 32)).shape[-1] == 32 >> split
    r = (build_attacker if name == "unet" else build_reconstructor)(name, f.out_channels, 3, 0.125, split).eval()
    g = Classifier(10, 0.125, split).eval()
    x = torch.rand(2, 3, 32, 32)
    assert r(f(x)).shape == x.shape
    assert g(f(x)).shape == (2, 10)


def test_parameter_counts_at_width_one():
    # Hand count: VGG16-BN convolutions without bias (BN carries the shift) plus BN's 2 per channel.
    def conv_bn(cin, cout, k=3):
        return cin * cout * k * k + 2 * cout

    obf = conv_bn(3, 64) + conv_bn(64, 64) + conv_bn(64, 128) + conv_bn(128, 128)
    assert n_params(Obfuscator(3, 1.0, 2)) == obf == 260_544
    rest = conv_bn(128, 256) + 2 * conv_bn(256, 256) + conv_bn(256, 512) + 5 * conv_bn(512, 512)
    head = (512 * 512 + 512) * 2 + 512 * 10 + 10
    assert n_params(Classifier(10, 1.0, 2)) == rest + head
    simrec = conv_bn(128, 128) * 2 + conv_bn(128, 64) + conv_bn(64, 64) + 64 * 3 * 9 + 3
    assert n_params(build_reconstructor("simrec", 128, 3, 1.0, 2)) == simrec
    # The four reconstructors differ in size as Table 1 implies: URec#1 > URec#2 > SimRec.
    sizes = {name: n_params(build_reconstructor(name, 128, 3, 1.0, 2)) for name in RECONSTRUCTORS}
    assert sizes["urec1"] > sizes["urec2"] > sizes["simrec"]
    print({"obfuscator": obf, "classifier": rest + head, **sizes})


def test_xavier_init_and_zero_bias():
    nets = build_networks(ModelConfig(width=0.25), 3, 10)
    lin = nets["classifier"].head[3]
    bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(lin.bias) == 0


def test_unknown_reconstructor_lists_valid_names():
    with pytest.raises(ValueError, match="simrec, urec1, urec2, resrec"):
        build_reconstructor("unet9", 16, 3)


def test_unet_attacker_is_bigger_and_reconstructs_full_size():
    from veil.models.reconstructors import attackers, build_attacker

    assert set(RECONSTRUCTORS) < set(attackers())
    for split in (1, 2, 3):
        f = Obfuscator(3, 0.125, split).eval()
        a = build_attacker("unet", f.out_channels, 3, 0.125, split).eval()
        out = a(f(torch.rand(2, 3, 32, 32)))
        assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    big = n_params(build_attacker("unet", 128, 3, 1.0, 2))
    assert big > 3 * n_params(build_reconstructor("urec1", 128, 3, 1.0, 2))


@pytest.mark.parametrize("kind", ["learned", "orthogonal"])
def test_bottleneck_keeps_k_channels_and_every_network_follows(kind):
    m = ModelConfig(width=0.125, split=2, bottleneck=kind, bottleneck_channels=5)
    nets = build_networks(m, 3, 10, 32, seed=1)
    z = nets["obfuscator"](torch.rand(4, 3, 32, 32))
    assert z.shape == (4, 5, 8, 8) and nets["obfuscator"].out_channels == 5
    assert nets["classifier"](z).shape == (4, 10) and nets["reconstructor"](z).shape == (4, 3, 32, 32)
    plain = build_networks(ModelConfig(width=0.125, split=2), 3, 10, 32)["obfuscator"]
    extra = n_params(nets["obfuscator"]) - n_params(plain)
    assert extra == (16 * 5 if kind == "learned" else 0)  # a learned 1x1 convolution 16 -> 5; a fixed projection has no parameters


def test_orthogonal_projection_is_orthonormal_seeded_and_fixed():
    from veil.models.obfuscator import Projection

    p = Projection(16, 5, seed=3)
    w = p.weight[:, :, 0, 0]  # 5 x 16
    torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.equal(w, Projection(16, 5, seed=3).weight[:, :, 0, 0]) and not torch.equal(w, Projection(16, 5, seed=4).weight[:, :, 0, 0])
    assert not list(p.parameters()) and "weight" in p.state_dict()  # saved with the weights, moved by no optimiser


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantiser_has_2_to_the_bits_levels_and_passes_gradients(bits):
    from veil.models.obfuscator import Quantise

    q = Quantise(6, bits)
    x = (torch.randn(8, 6, 4, 4) * 3).requires_grad_(True)
    y = q(x)
    levels = y.detach().unique()
    assert len(levels) <= 2**bits and len(levels) >= 2
    codes = levels * (2**bits - 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)  # every value is an integer code / (2^b - 1)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad.abs().sum() > 0  # straight-through: rounding does not cut the gradient


@pytest.mark.parametrize("override,key", [
    (["model.bottleneck=learned", "model.bottleneck_channels=17", "model.width=0.125"], "model.bottleneck_channels must be in 1..16"),
    (["model.bottleneck=learned"], "model.bottleneck_channels must be in 1..128"),
    (["model.bottleneck=pca", "model.bottleneck_channels=4"], "model.bottleneck must be one of none, learned, orthogonal"),
    (["model.feature_bits=17"], "model.feature_bits must be 0 \\(float\\) or 1..16, got 17"),
    (["model.bottleneck_channels=4"], "model.bottleneck_channels is 4 but model.bottleneck is none"),
])
def test_impossible_bottleneck_is_refused_when_read(override, key):
    from veil import config as config_mod

    with pytest.raises(config_mod.ConfigError, match=key):
        config_mod.apply_overrides(config_mod.Config(), override)


@pytest.mark.parametrize("norm", ["image", "channel"])
def test_a_standardising_obfuscator_cannot_see_brightness_contrast_or_colour_cast(norm):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 0.5
    per_channel = norm == "channel"
    gain = torch.tensor([1.5, 0.7, 1.2]).view(1, 3, 1, 1) if per_channel else torch.tensor(1.5)
    shift = torch.tensor([0.2, -0.1, 0.3]).view(1, 3, 1, 1) if per_channel else torch.tensor(0.2)
    y = x * gain + shift
    m = ModelConfig(width=0.125, split=2, input_norm=norm)
    f = build_networks(m, 3, 10)["obfuscator"].eval()
    plain = build_networks(ModelConfig(width=0.125, split=2), 3, 10)["obfuscator"].eval()
    with torch.no_grad():
        assert torch.allclose(f(x), f(y), atol=1e-4)
        assert not torch.allclose(plain(x), plain(y), atol=1e-2)  # without it, f sees the change
        assert f(torch.full((1, 3, 32, 32), 0.5)).isfinite().all()  # a flat image: no division by zero
    # A per-image standardisation keeps the colour cast, which only the per-channel one removes.
    if not per_channel:
        cast = x * torch.tensor([1.5, 0.7, 1.2]).view(1, 3, 1, 1)
        with torch.no_grad():
            assert not torch.allclose(f(x), f(cast), atol=1e-2)


def test_xavier_draws_the_same_weights_in_either_memory_layout():
    # A channels-last weight is filled in storage order by in-place draws; init_xavier draws in the
    # contiguous order, so a re-initialisation in NHWC (the pool's, on a CPU) matches one in NCHW.
    def drawn(layout):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ConvTranspose2d(8, 4, 2)).to(memory_format=layout)
        return init_xavier(net).state_dict()

    plain, nhwc = drawn(torch.contiguous_format), drawn(torch.channels_last)
    assert nhwc["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(plain[k], nhwc[k]) for k in plain)
