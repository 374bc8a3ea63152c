import copy

import pytest
import torch
from torch import nn

from veil.config import ModelConfig
from veil.models import RECONSTRUCTORS, Classifier, Obfuscator, build_networks, build_reconstructor, feature_shape, init_xavier
from veil.models.reconstructors import attackers, build_attacker, use_layout


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


def _conv_input_layouts(net, z):
    """The layout of every 4-D input with more than one pixel that reaches a convolution of net(z)."""
    seen = []

    def hook(module, args):  # noqa: ANN001, ANN202
        if args[0].shape[-1] * args[0].shape[-2] > 1:  # a 1x1 map reads as both layouts
            seen.append(args[0].is_contiguous(memory_format=torch.channels_last))

    hooks = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    out = net(z)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize("name", ["simrec", "resrec", "unet"])
def test_a_channels_last_decoder_stays_channels_last_after_a_1x1_map(name):
    # At split 5 the code is N x C x 1 x 1, which PyTorch's upsampling hands on as NCHW: without use_layout a
    # channels-last decoder ran its later convolutions NCHW (converting at each; ResRec's residual sums too).
    torch.manual_seed(0)
    z = torch.randn(4, 16, 1, 1)
    plain = init_xavier(build_attacker(name, 16, 3, 0.125, 5)).eval()
    want = plain(z)
    net = use_layout(copy.deepcopy(plain), torch.channels_last)
    got, layouts = _conv_input_layouts(net, z)
    assert layouts and all(layouts)
    assert torch.allclose(got, want, atol=1e-5)  # the order of the arithmetic changes, not the function
    _, mixed = _conv_input_layouts(copy.deepcopy(plain).to(memory_format=torch.channels_last), z)
    assert not all(mixed)  # what use_layout mends
    _, back = _conv_input_layouts(use_layout(net, torch.contiguous_format), z)
    assert back and not any(back)  # NCHW again once asked for


# ----------------------------------------------------------------------------- attackers built for the cut

# Table 1 of the paper, written for split 2 (8x8 maps). "conv3-N": 3x3 convolution, BatchNorm, ReLU; the layer
# before the sigmoid is a plain convolution with a bias; "up": 2x nearest upsampling; "res64": a residual block.
TABLE_1 = {
    "simrec": "conv3-128 x2, up, conv3-64 x2, up, conv3-C, sigmoid",
    "urec1": "conv3-64 x3, up, conv3-128 x3, up, conv3-256 x3, conv3-C, conv1-C, sigmoid",
    "urec2": "conv3-64 x2, up, conv3-128 x2, up, conv3-256 x2, conv3-C, conv1-C, sigmoid",
    "resrec": "transconv3-64, res64, transconv3-64, res64, up, res64 x2, up, conv1-C, sigmoid",
}


def _tokens(text: str) -> list[str]:
    out = []
    for item in text.split(", "):
        layer, _, times = item.partition(" x")
        out += [layer] * int(times or 1)
    return out


def _layers_for_split(name: str, split: int) -> list[str]:
    """Table 1 at split 2; a deeper cut repeats the network's stage after its first upsampling (s upsamplings in
    all); split 1 has an Identity in place of the first upsampling."""
    layers = _tokens(TABLE_1[name])
    first = layers.index("up")
    second = layers.index("up", first + 1)
    stage = layers[first:second]  # up and the convolutions after it
    if split == 1:
        return [*layers[:first], "id", *layers[first + 1:]]
    return [*layers[:second], *stage * (split - 2), *layers[second:]]


def _expected_modules(layers: list[str], c_in: int, out_channels: int, width: float) -> list[tuple[str, dict]]:
    """(module type, {state_dict key: shape}) for each entry of the Sequential the layer list describes."""
    def bn(n, prefix=""):
        return {f"{prefix}{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")} | {f"{prefix}num_batches_tracked": ()}

    mods: list[tuple[str, dict]] = []
    for i, layer in enumerate(layers):
        last = i + 1 < len(layers) and layers[i + 1] == "sigmoid"
        if layer in ("up", "id", "sigmoid"):
            mods.append(({"up": "Upsample", "id": "Identity", "sigmoid": "Sigmoid"}[layer], {}))
            continue
        kind, n = layer.rsplit("-", 1) if "-" in layer else ("res", layer[3:])
        n = out_channels if n == "C" else max(1, round(int(n) * width))
        if kind == "res":
            assert c_in == n
            mods.append(("ResidualBlock", {"body.0.weight": (n, n, 3, 3), **bn(n, "body.1."), "body.3.weight": (n, n, 3, 3), **bn(n, "body.4.")}))
        elif last:  # the output layer: a plain convolution with a bias
            k = int(kind[-1])
            mods.append(("Conv2d", {"weight": (n, c_in, k, k), "bias": (n,)}))
        else:
            k = int(kind[-1])
            shape = (c_in, n, k, k) if kind.startswith("transconv") else (n, c_in, k, k)
            mods += [("ConvTranspose2d" if kind.startswith("transconv") else "Conv2d", {"weight": shape}), ("BatchNorm2d", bn(n)), ("ReLU", {})]
        c_in = n
    return mods


def _modules(net: nn.Module) -> list[tuple[str, dict]]:
    return [(type(m).__name__, {k: tuple(v.shape) for k, v in m.state_dict().items()}) for m in net]


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", list(RECONSTRUCTORS))
def test_reconstructor_layer_lists_are_table_1s_at_split_2_and_repeat_a_stage_deeper(name, split):
    for width, c_in in ((1.0, 128), (0.125, 16), (0.25, 128)):
        net = build_reconstructor(name, c_in, 3, width, split)
        expected = _expected_modules(_layers_for_split(name, split), c_in, 3, width)
        assert _modules(net) == expected
        keys = [f"{i}.{k}" for i, (_, state) in enumerate(expected) for k in state]
        assert list(net.state_dict()) == keys  # split 2: the state_dict of Table 1's network, key for key
    if split >= 2:
        ups = [m for m in net if isinstance(m, nn.Upsample)]
        assert len(ups) == split and all(m.scale_factor == 2 for m in ups)  # one 2x stage per pooling of f
        # every upsampling is followed by a convolution (or a residual block of them) before the next one
        kinds = [type(m).__name__ for m in net]
        for i in (i for i, k in enumerate(kinds) if k == "Upsample"):
            nxt = kinds[i + 1:]
            assert any(k in ("Conv2d", "ResidualBlock") for k in nxt[: nxt.index("Upsample") if "Upsample" in nxt else None])


CAPACITY_MARGIN_DB = 3.0  # above the images' class floor; a 2x2 mosaic of them cannot reach it (asserted below)


@pytest.fixture(scope="module")
def four_airplanes(tmp_path_factory) -> torch.Tensor:
    """4 real CIFAR-10 images of one class (airplane) from the bundled demo sample, N x 3 x 32 x 32 in [0, 1]."""
    import numpy as np
    from tests.conftest import DEMO_NPZ

    from veil.data import read_npz, to_float

    images, labels, classes = read_npz(DEMO_NPZ, tmp_path_factory.mktemp("cache"))
    idx = np.flatnonzero(labels == classes.index("airplane"))[:4]
    return to_float(torch.from_numpy(images[idx]).permute(0, 3, 1, 2))


@pytest.mark.parametrize("split", [2, 4, 5])
@pytest.mark.parametrize("name", list(attackers()))
def test_every_attacker_can_draw_a_full_resolution_image_at_every_cut(four_airplanes, name, split):
    """Given the true features, each attacker overfits 4 images well above their class floor, and what it
    draws is not a mosaic of large blocks (at split 5 the old one-step 16x upsampling drew 2x2 mosaics)."""
    import torch.nn.functional as F

    from veil.metrics import psnr

    x, width = four_airplanes, 0.125
    floor = psnr(x, x.mean(0, keepdim=True).expand_as(x)).mean().item()  # the mean image: a class floor at most this high
    mosaic = psnr(x, F.interpolate(F.avg_pool2d(x, 16), scale_factor=16, mode="nearest")).mean().item()  # best 2x2 mosaic
    assert mosaic < floor + CAPACITY_MARGIN_DB - 1  # the margin is one no 2x2 mosaic could pass

    torch.manual_seed(0)
    f = init_xavier(Obfuscator(3, width, split)).eval().requires_grad_(False)
    with torch.no_grad():
        z = f(x)
    r = init_xavier(build_attacker(name, f.out_channels, 3, width, split)).train()
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    for _ in range(100):
        loss = -psnr(x, r(z)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = r(z)  # still in train mode: BatchNorm on the batch's own statistics, as in the fit
    reached = psnr(x, out).mean().item()
    distinct = min(out[i, c].unique().numel() for i in range(len(x)) for c in range(3))
    print(f"split {split} {name}: PSNR {reached:.2f} dB, floor {floor:.2f} (+{reached - floor:.2f}), 2x2 mosaic {mosaic:.2f}, "
          f"fewest distinct values in a channel {distinct}")
    assert out.shape == x.shape == (4, 3, 32, 32)
    assert reached >= floor + CAPACITY_MARGIN_DB
    # Not piecewise constant: a 32x32 channel drawn in 2x2 blocks (ResRec's last stage) holds up to 256 values,
    # a 4x4 mosaic 64 (144 with a 3x3 convolution's seams, as the old split-4 SimRec drew), a 2x2 mosaic 4.
    assert distinct >= 192
