"""Tests for refimpl.models: convert_conv2d, the published networks, their counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision
from torch import nn

from refimpl import CondConv2d, DeformConv2d, DynamicConv2d
from refimpl.condconv import condconv2d
from refimpl.ddf import DDFConv2d
from refimpl.models import (
    PUBLISHED_COUNTS,
    PUBLISHED_DDF_RESNET_PARAMS,
    PUBLISHED_RESNET50_PARAMS,
    CondConvLinear,
    DynamicConv2dBN,
    PublishedCount,
    ReproducedCount,
    RoutedBlock,
    SharedRoutingCondConv2d,
    build_published,
    condconv_mobilenet_v2,
    condconv_resnet,
    convert_conv2d,
    count_parameters,
    dcnv2_resnet50,
    ddf_resnet,
    dynamic_conv_mobilenet_v2,
    dynamic_conv_resnet,
    is_basic_block_conv,
    is_bottleneck_3x3,
    is_bottleneck_conv,
    odconv_mobilenet_v2,
    odconv_resnet,
    paper_resnet50,
    published_parameters,
    reproduce_published_counts,
)
from refimpl.models import _shapes_only as shapes_only
from refimpl.odconv import ODConv2d

from conftest import randn


class Wrapped(nn.Module):
    """An identity-like replacement: holds the original convolution and calls it."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.inner = conv

    def forward(self, x):
        return self.inner(x)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
        nn.Conv2d(8, 4, 1),
    )


def test_identity_like_factory_keeps_outputs_and_names():
    model = small_model().eval()
    x = randn(2, 3, 6, 6, dtype=torch.float32)
    before = model(x)
    keys = set(model.state_dict())
    out = convert_conv2d(model, Wrapped)
    assert out is model
    assert isinstance(model[0], Wrapped) and isinstance(model[2][0], Wrapped)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # the new keys are the old ones with the replacement's own sub-path inserted
    renamed = {k.replace("inner.", "") for k in model.state_dict()}
    assert renamed == keys


def test_predicate_selects_layers_by_name():
    model = small_model()
    x = randn(2, 3, 5, 5, dtype=torch.float32)
    before = model(x)
    seen = []

    def predicate(name, conv):
        seen.append(name)
        return conv.kernel_size == (3, 3) and name != "0"

    convert_conv2d(model, lambda c: ODConv2d.from_conv2d(c, num_kernels=2), predicate)
    assert seen == ["0", "2.0", "3"]
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Conv2d
    assert isinstance(model[2][0], ODConv2d)
    assert model[2][0].weight.shape == (2, 8, 8, 3, 3)
    assert "2.0.attention.fc.weight" in model.state_dict()
    # from_conv2d copies the weights: the network computes the same function
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_replacement_follows_mode_and_shared_layers_stay_shared():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv).eval()
    x = randn(1, 4, 5, 5, dtype=torch.float32)
    before = model(x)
    convert_conv2d(model, ODConv2d.from_conv2d)
    assert model[0] is model[2] and isinstance(model[0], ODConv2d)
    assert not model[0].training
    # eval mode: a batch of one is fine despite the attention BatchNorm
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_converted_modules_are_not_searched_again():
    model = small_model()
    calls = []

    def factory(conv):
        calls.append(conv)
        return Wrapped(conv)  # contains an nn.Conv2d: must not be converted again

    convert_conv2d(model, factory)
    assert len(calls) == 3


def test_convert_errors():
    model = small_model()
    with pytest.raises(TypeError, match="model to be a torch.nn.Module, got str"):
        convert_conv2d("resnet", Wrapped)
    with pytest.raises(ValueError, match="bare Conv2d"):
        convert_conv2d(nn.Conv2d(3, 3, 1), Wrapped)
    with pytest.raises(TypeError, match="factory to be callable"):
        convert_conv2d(model, 3)
    with pytest.raises(TypeError, match="predicate to be callable or None"):
        convert_conv2d(model, Wrapped, "layer1")
    with pytest.raises(TypeError, match="nn.Module for layer '0', got NoneType"):
        convert_conv2d(model, lambda conv: None)
    with pytest.raises(TypeError, match="count_parameters expected a torch.nn.Module"):
        count_parameters([1, 2])


def test_convert_refuses_what_it_cannot_reproduce():
    class SamePadConv(nn.Conv2d):  # e.g. timm's Conv2dSame: its own forward
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), SamePadConv(4, 4, 2))
    with pytest.raises(
        ValueError,
        match="convert_conv2d expected nn.Conv2d's own "
        "forward for layer '1', got SamePadConv",
    ):
        convert_conv2d(model, Wrapped)
    convert_conv2d(model, Wrapped, lambda name, conv: name != "1")  # excluded: fine
    assert isinstance(model[0], Wrapped) and type(model[1]) is SamePadConv
    lazy = nn.Sequential(nn.LazyConv2d(4, 3))
    with pytest.raises(
        ValueError,
        match="convert_conv2d expected an initialised "
        "convolution for layer '0', got an uninitialised LazyConv2d",
    ):
        convert_conv2d(lazy, Wrapped)
    with pytest.raises(
        ValueError,
        match=r"expected the replacement of layer '0' to "
        r"keep stride=\(1, 1\), got \(2, 2\)",
    ):
        convert_conv2d(small_model(), lambda c: ODConv2d(3, 8, 3, stride=2))


def official_layer_params(c_in, c_out, k, n):
    """Parameters of one official ODConv2d (no bias, BatchNorm, r = 1/16, min 16)."""
    h = max(math.floor(c_in * 0.0625), 16)
    count = n * c_out * c_in * k * k + c_in * h + 2 * h  # kernels, fc, BatchNorm
    count += (h + 1) * c_in + (h + 1) * c_out  # channel and filter heads
    count += (h + 1) * k * k if k > 1 else 0
    count += (h + 1) * n if n > 1 else 0
    return count


# (input channels of the stage, bottleneck width, output channels, blocks)
STAGES = [
    (64, 64, 256, 3),
    (256, 128, 512, 4),
    (512, 256, 1024, 6),
    (1024, 512, 2048, 3),
]


def expected_resnet50(n):
    """Torchvision ResNet-50 count with the 48 bottleneck convolutions replaced."""
    total = 25_557_032  # torchvision resnet50(weights=None), 1000 classes
    for c_first, mid, out, blocks in STAGES:
        for b in range(blocks):
            c_in = c_first if b == 0 else out
            for ci, co, k in ((c_in, mid, 1), (mid, mid, 3), (mid, out, 1)):
                total += official_layer_params(ci, co, k, n) - ci * co * k * k
    return total


@pytest.mark.parametrize(
    "num_kernels, label", [(1, "+ ODConv (1x)"), (4, "+ ODConv (4x)")]
)
def test_paper_resnet50_reproduces_published_counts(num_kernels, label):
    model = paper_resnet50(num_kernels)
    count = count_parameters(model)
    assert count == expected_resnet50(num_kernels)
    assert round(count / 1e6, 2) == PUBLISHED_RESNET50_PARAMS[label]
    assert {28.64, 90.67} == {
        PUBLISHED_RESNET50_PARAMS[k] for k in ("+ ODConv (1x)", "+ ODConv (4x)")
    }
    odconv = [name for name, m in model.named_modules() if isinstance(m, ODConv2d)]
    assert len(odconv) == 48
    assert type(model.conv1) is nn.Conv2d
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d
    assert model.layer2[0].conv2.stride == (2, 2)  # v1.5: the 3x3 carries the stride


def test_torchvision_baseline_count_is_the_published_one():
    import torchvision

    count = count_parameters(torchvision.models.resnet50(weights=None))
    assert count == 25_557_032 and round(count / 1e6, 2) == 25.56


def test_paper_resnet50_runs_and_validates():
    model = paper_resnet50(1, num_classes=10, attention_norm=None).eval()
    assert model(randn(1, 3, 32, 32, dtype=torch.float32)).shape == (1, 10)
    assert is_bottleneck_conv("layer4.2.conv3", None)
    assert not is_bottleneck_conv("layer1.0.downsample.0", None)
    assert not is_bottleneck_conv("conv1", None)
    with pytest.raises(ValueError, match="paper_resnet50 expected num_kernels >= 1"):
        paper_resnet50(0)
    with pytest.raises(ValueError, match="ODConv2d expected min_hidden >= 1"):
        paper_resnet50(1, min_hidden=0)


def test_paper_resnet50_options_reach_every_layer():
    model = paper_resnet50(num_kernels=2, min_hidden=32, reduction=0.125)
    first, last = model.layer1[0].conv1, model.layer4[2].conv3
    assert (first.num_kernels, first.min_hidden, first.reduction) == (2, 32, 0.125)
    assert first.attention.hidden == 32  # max(floor(64 / 8), 32)
    assert last.attention.hidden == 64  # max(floor(512 / 8), 32)
    assert last.weight.shape == (2, 2048, 512, 1, 1)


# --- DDF-ResNets (chapter 5) ----------------------------------------------------------

# torchvision's counts of the plain networks (25.56M and 44.55M)
RESNET_PARAMS = {50: 25_557_032, 101: 44_549_160}
RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def official_ddfpack_params(c: int, k: int = 3, head: int = 1) -> int:
    """Parameters of the official ``DDFPack(c, k, se_ratio=0.2)``, read off its
    branches (theFoxofSky/ddfnet ``ddf/ddf.py``): the spatial 1x1 convolution
    ``c -> head*k*k`` with bias; the channel branch ``c -> int(0.2c) -> c*k*k``
    (1x1 convolutions with bias); the learnable FilterNorm scale ``c*k*k``."""
    mid = int(c * 0.2)
    taps = k * k
    spatial = c * head * taps + head * taps
    channel = c * mid + mid + mid * c * taps + c * taps
    return spatial + channel + c * taps


def expected_ddf_resnet(depth: int) -> int:
    """The plain ResNet's count, each bottleneck 3x3 (``width^2 * 9`` weights, no
    bias) swapped for a ``DDFPack(width)``."""
    total = RESNET_PARAMS[depth]
    for stage, blocks in enumerate(RESNET_LAYERS[depth]):
        width = 64 * 2**stage
        total += blocks * (official_ddfpack_params(width) - width * width * 9)
    return total


@pytest.mark.parametrize("depth", [50, 101])
@pytest.mark.parametrize("combine", ["mul", "add"])
def test_ddf_resnet_reproduces_the_official_counts(depth, combine):
    model = ddf_resnet(depth, combine)
    count = count_parameters(model)
    assert count == expected_ddf_resnet(depth)
    assert (
        round(count / 1e6, 1)
        == PUBLISHED_DDF_RESNET_PARAMS[f"ddf_{combine}_resnet{depth}"]
    )
    layers = [m for _, m in model.named_modules() if isinstance(m, DDFConv2d)]
    assert len(layers) == sum(RESNET_LAYERS[depth])
    assert all(m.combine == combine for m in layers)
    assert model.layer2[0].conv2.stride == (2, 2)  # the DDF layer carries the stride
    assert type(model.layer2[0].conv1) is nn.Conv2d
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d


def test_plain_resnet101_count():
    import torchvision

    count = count_parameters(torchvision.models.resnet101(weights=None))
    assert count == RESNET_PARAMS[101]


def test_ddf_resnet_runs_and_validates():
    model = ddf_resnet(50, num_classes=10).eval()
    assert model(randn(1, 3, 33, 33, dtype=torch.float32)).shape == (1, 10)
    assert is_bottleneck_3x3("layer3.5.conv2", None)
    assert not is_bottleneck_3x3("layer3.5.conv1", None)
    assert not is_bottleneck_3x3("conv1", None)
    with pytest.raises(ValueError, match=r"^ddf_resnet expected depth 50 or 101"):
        ddf_resnet(34)
    with pytest.raises(ValueError, match=r"^DDFConv2d expected combine 'mul' or"):
        ddf_resnet(50, "cat")


# --- the published networks of every method (chapters 2-8) ---------------------------
# Expected counts are computed here from the shapes of torchvision's plain networks
# and each method's per-layer formula, independently of the builders.


def plain(name):
    """A plain torchvision network on the meta device (shapes only)."""
    with torch.device("meta"):
        return getattr(torchvision.models, name)()


def convs(model):
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]


def names_of(model, cls):
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def meta_count(build):
    with torch.device("meta"):
        return count_parameters(build())


# ---- CondConv (chapter 2)


def final_blocks(model, count):
    blocks = [
        f"{stage}.{i}"
        for stage in ("layer1", "layer2", "layer3", "layer4")
        for i in range(len(getattr(model, stage)))
    ]
    return blocks[-count:]


def expected_condconv(model, blocks, n, shared, fc, classifier_bias=False):
    """Plain count; every conv of ``blocks`` (not the shortcut) gets ``n`` experts
    (``n - 1`` more kernels) and either one routing ``Linear(C_in, n)`` per block or
    one per layer; the classifier ``fc`` becomes ``n`` experts plus a routing."""
    total = count_parameters(model)
    for block in blocks:
        layers = [
            m
            for name, m in convs(model)
            if name.startswith(block + ".") and ".downsample." not in name
        ]
        for conv in layers:
            total += (n - 1) * conv.weight.numel()
            if not shared:
                total += conv.in_channels * n + n
        if shared:
            total += layers[0].in_channels * n + n
    out, inp = fc.weight.shape
    total += n * out * inp - out * inp - out  # bias-free experts replace W and b
    total += n * out if classifier_bias else 0
    total += inp * n + n  # the classifier's own routing
    return total


@pytest.mark.parametrize("depth, published", [(50, 129.86), (18, 81.35)])
def test_condconv_resnet_count_and_placement(depth, published):
    ref = plain(f"resnet{depth}")
    blocks = final_blocks(ref, 3)
    with torch.device("meta"):
        model = condconv_resnet(depth)
    count = count_parameters(model)
    assert count == expected_condconv(ref, blocks, 8, True, ref.fc)
    assert round(count / 1e6, 2) == published
    # the final 3 blocks route once each; their convs have no routing of their own
    assert names_of(model, RoutedBlock) == blocks
    convs_per_block = 3 if depth == 50 else 2
    layers = names_of(model, SharedRoutingCondConv2d)
    assert len(layers) == 3 * convs_per_block
    assert {name.rsplit(".", 1)[0] for name in layers} == set(blocks)
    assert not any(hasattr(model.get_submodule(n), "routing_fc") for n in layers)
    assert [model.get_submodule(b).routing_fc.in_features for b in blocks] == [
        ref.get_submodule(b).conv1.in_channels for b in blocks
    ]
    assert type(model.layer4[0].downsample[0]) is nn.Conv2d  # shortcut static
    assert type(model.layer3[0].conv1) is nn.Conv2d  # earlier blocks static
    assert isinstance(model.fc, CondConvLinear) and model.fc.bias is None
    assert model.fc.weight.shape == (8, 1000, ref.fc.in_features, 1, 1)


def test_condconv_variants_are_counted_and_do_not_match_the_figure():
    ref = plain("resnet50")
    blocks = final_blocks(ref, 3)
    per_layer = meta_count(lambda: condconv_resnet(50, shared_routing=False))
    assert per_layer == expected_condconv(ref, blocks, 8, False, ref.fc)
    assert round(per_layer / 1e6, 2) == 129.89  # != 129.86: routing is per block
    biased = meta_count(lambda: condconv_resnet(50, classifier_bias=True))
    assert biased == expected_condconv(ref, blocks, 8, True, ref.fc, True)
    assert round(biased / 1e6, 2) == 129.87  # != 129.86: the classifier has no bias
    # the detection backbone of the FDConv README: layer4 only, classifier static
    with torch.device("meta"):
        backbone = condconv_resnet(50, classifier=False)
    assert type(backbone.fc) is nn.Linear
    added = count_parameters(backbone) - count_parameters(ref)
    assert added == sum(
        7 * m.weight.numel()
        for n, m in convs(ref)
        if n.startswith("layer4.") and ".downsample." not in n
    ) + sum(ref.get_submodule(b).conv1.in_channels * 8 + 8 for b in blocks)
    assert round(added / 1e6, 1) == 90.0
    with torch.device("meta"):
        model = condconv_resnet(50, shared_routing=False)
    assert len(names_of(model, RoutedBlock)) == 0
    assert len([m for m in model.modules() if type(m) is CondConv2d]) == 9


def test_condconv_mobilenet_v2_count_and_placement():
    ref = plain("mobilenet_v2")
    blocks = [f"features.{i}" for i in range(12, 18)]
    with torch.device("meta"):
        model = condconv_mobilenet_v2()
    count = count_parameters(model)
    assert count == expected_condconv(ref, blocks, 8, True, ref.classifier[1])
    assert round(count / 1e6, 2) == 22.88
    assert names_of(model, RoutedBlock) == blocks
    assert len(names_of(model, SharedRoutingCondConv2d)) == 18
    assert type(model.features[11].conv[0][0]) is nn.Conv2d
    assert type(model.features[18][0]) is nn.Conv2d  # the final 1x1 stays static
    assert isinstance(model.classifier[1], CondConvLinear)
    per_layer = meta_count(lambda: condconv_mobilenet_v2(shared_routing=False))
    assert round(per_layer / 1e6, 2) == 22.95


def capture_routings(block):
    seen = []
    for module in block.modules():
        if isinstance(module, SharedRoutingCondConv2d):
            module.register_forward_pre_hook(
                lambda mod, args: seen.append(args[1].detach().clone())
            )
    return seen


@pytest.mark.parametrize("where", ["resnet50", "resnet18", "mobilenet_v2"])
def test_one_routing_per_block_is_shared_by_its_convs(where):
    torch.manual_seed(0)
    if where == "mobilenet_v2":
        block = condconv_mobilenet_v2(num_classes=4).features[12]
        x = randn(2, 96, 5, 5, dtype=torch.float32)
    else:
        model = condconv_resnet(int(where[6:]), num_classes=4)
        block = model.layer4[1]
        x = randn(2, block.conv1.in_channels, 3, 3, dtype=torch.float32)
    nn.init.normal_(block.routing_fc.weight)  # spread the routing away from 1/2
    seen = capture_routings(block)
    block(x)
    expected = torch.sigmoid(
        x.mean(dim=(2, 3)) @ block.routing_fc.weight.T + block.routing_fc.bias
    )
    assert len(seen) == (2 if where == "resnet18" else 3)
    for routing in seen:
        torch.testing.assert_close(routing, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["Bottleneck", "BasicBlock"])
def test_routed_block_is_the_block_with_mixed_kernels(kind):
    from torchvision.models import resnet

    torch.manual_seed(0)
    planes = 8 if kind == "Bottleneck" else 32
    shortcut = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    block = getattr(resnet, kind)(16, planes, stride=2, downsample=shortcut)
    block = convert_conv2d(
        block,
        lambda c: SharedRoutingCondConv2d.from_conv2d(c, preserve=False, num_kernels=3),
        lambda name, conv: not name.startswith("downsample."),
    )
    block = RoutedBlock(block, 3, preserve=False).eval()
    assert block.kind == kind.lower().replace("block", "")
    x = randn(2, 16, 6, 6, dtype=torch.float32)
    r = torch.sigmoid(block.routing_fc(x.mean(dim=(2, 3))))

    def conv(layer, inp):  # the functional CondConv with the block's routing
        return condconv2d(inp, r, layer.weight, None, layer.stride, layer.padding)

    out = torch.relu(block.bn1(conv(block.conv1, x)))
    out = block.bn2(conv(block.conv2, out))
    if kind == "Bottleneck":
        out = block.bn3(conv(block.conv3, torch.relu(out)))
    expected = torch.relu(out + block.downsample(x))
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_condconv_linear_is_a_routed_mixture_of_matrices():
    torch.manual_seed(0)
    layer = CondConvLinear(6, 3, bias=True, num_kernels=4)
    x = randn(5, 6, dtype=torch.float32)
    alpha = torch.sigmoid(x @ layer.routing_fc.weight.T + layer.routing_fc.bias)
    w = layer.weight[:, :, :, 0, 0]  # (E, out, in)
    expected = torch.einsum("ne,eoi,ni->no", alpha, w, x) + alpha @ layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert (layer.in_features, layer.out_features) == (6, 3)
    assert "num_kernels=4" in repr(layer)
    with pytest.raises(ValueError, match=r"expected input Tensor\[N, in_features\]"):
        layer(randn(5, 6, 1, 1, dtype=torch.float32))
    with pytest.raises(TypeError, match="expected input to be a Tensor, got list"):
        layer([[0.0] * 6])
    with pytest.raises(ValueError, match="expected input with 6 channels, got 5"):
        layer(randn(2, 5, dtype=torch.float32))
    with pytest.raises(TypeError, match="from_linear expected an nn.Linear"):
        CondConvLinear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="cannot preserve an nn.Linear with bias"):
        CondConvLinear.from_linear(nn.Linear(4, 2), bias=False)


def test_shared_routing_layer_needs_its_block():
    layer = SharedRoutingCondConv2d(4, 4, 3, padding=1, num_kernels=2)
    assert not hasattr(layer, "routing_fc")
    assert count_parameters(layer) == 2 * (4 * 4 * 9 + 4)
    with pytest.raises(ValueError, match="expected a routing computed by its block"):
        layer(randn(1, 4, 5, 5, dtype=torch.float32))
    out = layer(randn(1, 4, 5, 5, dtype=torch.float32), torch.full((1, 2), 0.5))
    assert out.shape == (1, 4, 5, 5)
    with pytest.raises(TypeError, match="RoutedBlock expected a torchvision"):
        RoutedBlock(nn.Sequential(nn.Conv2d(3, 3, 1)), 2, preserve=False)


# ---- dynamic convolution (chapter 3)


def expected_dynamic(model, n, bn, skip):
    """Every conv but ``skip``: ``n - 1`` more kernels and the attention
    ``Linear(C, h, no bias) [BN: 2h] Linear(h, n) + bias``, ``h = floor(C / 4)``."""
    total = count_parameters(model)
    for name, conv in convs(model):
        if name != skip:
            h = conv.in_channels // 4
            total += (n - 1) * conv.weight.numel() + conv.in_channels * h
            total += h * n + n + (2 * h if bn else 0)
    return total


@pytest.mark.parametrize(
    "depth, norm, published, layers",
    [
        (50, "batch", 100.88, 52),
        (50, None, 100.87, 52),
        (18, "batch", 45.47, 19),
        (18, None, 45.47, 19),
    ],
)
def test_dynamic_conv_resnet_counts(depth, norm, published, layers):
    ref = plain(f"resnet{depth}")
    with torch.device("meta"):
        model = dynamic_conv_resnet(depth, attention_norm=norm)
    count = count_parameters(model)
    assert count == expected_dynamic(ref, 4, norm == "batch", "conv1")
    assert round(count / 1e6, 2) == published
    dynamic = names_of(model, DynamicConv2d)
    assert len(dynamic) == layers
    assert "layer2.0.downsample.0" in dynamic and "conv1" not in dynamic
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    cls = DynamicConv2dBN if norm == "batch" else DynamicConv2d
    assert all(type(model.get_submodule(n)) is cls for n in dynamic)


@pytest.mark.parametrize("norm, published", [(None, 12.40), ("batch", 12.41)])
def test_dynamic_conv_mobilenet_v2_counts(norm, published):
    ref = plain("mobilenet_v2")
    with torch.device("meta"):
        model = dynamic_conv_mobilenet_v2(attention_norm=norm)
    count = count_parameters(model)
    assert count == expected_dynamic(ref, 4, norm == "batch", "features.0.0")
    assert round(count / 1e6, 2) == published
    assert len(names_of(model, DynamicConv2d)) == 51
    assert type(model.features[0][0]) is nn.Conv2d
    assert isinstance(model.features[18][0], DynamicConv2d)  # the final 1x1
    assert model.features[2].conv[0][0].hidden == 4  # floor(16 / 4): 16-ch input


def test_dynamic_conv_bn_attention():
    torch.manual_seed(0)
    layer = DynamicConv2dBN(8, 4, 3, padding=1, temperature=1.0)
    x = randn(3, 8, 5, 5, dtype=torch.float32)
    pooled = x.mean(dim=(2, 3))
    z = pooled @ layer.fc1.weight.T
    z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + layer.bn.eps)
    logits = torch.relu(z) @ layer.fc2.weight.T + layer.fc2.bias
    (attention,) = layer.dynamic_tensors(x)
    torch.testing.assert_close(
        attention, torch.softmax(logits, 1), rtol=1e-4, atol=1e-5
    )
    # a BatchNorm with fresh statistics in eval mode is the identity (up to eps)
    layer.bn.reset_running_stats()
    plain_layer = DynamicConv2d(8, 4, 3, padding=1, temperature=1.0)
    plain_layer.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("bn.")}
    )
    torch.testing.assert_close(layer.eval()(x), plain_layer(x), rtol=1e-4, atol=1e-5)
    assert count_parameters(layer) == count_parameters(plain_layer) + 2 * 4
    with pytest.raises(ValueError, match="cannot train on a batch of 1 sample"):
        layer.train()(x[:1])
    with pytest.raises(ValueError, match="no official checkpoint"):
        layer.load_official_state_dict({})


# ---- ODConv (chapter 4)


def official_odconv_params(conv, n):
    """The official ODConv2d's count for the geometry of ``conv`` (groups and the
    depthwise rule included): kernels, trunk + BN, channel, filter (not depthwise),
    spatial (k > 1) and kernel (n > 1) heads."""
    c_in, c_out, g = conv.in_channels, conv.out_channels, conv.groups
    k = conv.kernel_size[0]
    h = max(c_in // 16, 16)
    count = n * conv.weight.numel() + c_in * h + 2 * h + (h + 1) * c_in
    count += 0 if (c_in == g == c_out) else (h + 1) * c_out
    count += (h + 1) * k * k if k > 1 else 0
    count += (h + 1) * n if n > 1 else 0
    return count


@pytest.mark.parametrize(
    "depth, n, published, layers",
    [(18, 1, 11.94, 16), (18, 4, 44.90, 16), (50, 4, 90.67, 48)],
)
def test_odconv_resnet_counts(depth, n, published, layers):
    ref = plain(f"resnet{depth}")
    selected = is_basic_block_conv if depth == 18 else is_bottleneck_conv
    expected = count_parameters(ref)
    for name, conv in convs(ref):
        if selected(name, conv):
            expected += official_odconv_params(conv, n) - conv.weight.numel()
    with torch.device("meta"):
        model = odconv_resnet(depth, n)
    count = count_parameters(model)
    assert count == expected and round(count / 1e6, 2) == published
    assert len(names_of(model, ODConv2d)) == layers
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d
    if depth == 50:
        assert count == meta_count(lambda: paper_resnet50(n))


@pytest.mark.parametrize("n, published", [(1, 4.94), (4, 11.51)])
def test_odconv_mobilenet_v2_counts(n, published):
    ref = plain("mobilenet_v2")
    expected = count_parameters(ref)
    for name, conv in convs(ref):
        if name != "features.0.0":
            expected += official_odconv_params(conv, n) - conv.weight.numel()
    with torch.device("meta"):
        model = odconv_mobilenet_v2(n)
    count = count_parameters(model)
    assert count == expected and round(count / 1e6, 2) == published
    assert len(names_of(model, ODConv2d)) == 51
    dw = model.features[2].conv[1][0]
    assert dw.groups == dw.in_channels and dw.attention.filter_fc is None


# ---- DCNv2 (chapter 6)


def test_dcnv2_resnet50_placement_and_count():
    with torch.device("meta"):
        model = dcnv2_resnet50()
    layers = names_of(model, DeformConv2d)
    assert len(layers) == 13  # 4 + 6 + 3; the paper says "12 layers"
    assert layers == [
        f"layer{s}.{b}.conv2"
        for s, blocks in ((2, 4), (3, 6), (4, 3))
        for b in range(blocks)
    ]
    assert all(model.get_submodule(n).modulated for n in layers)
    assert model.layer2[0].conv2.stride == (2, 2)
    # each adds a biased 3x3 offset conv with 3 * 9 outputs (2 offsets, 1 mask/tap)
    ref = plain("resnet50")
    added = sum(27 * model.get_submodule(n).in_channels * 9 + 27 for n in layers)
    assert count_parameters(model) == count_parameters(ref) + added
    assert round(added / 1e6, 2) == 0.87
    with torch.device("meta"):
        twelve = dcnv2_resnet50(("layer2", "layer3", "layer4.0", "layer4.1"))
        conv5 = dcnv2_resnet50(["layer4"])
    assert len(names_of(twelve, DeformConv2d)) == 12
    assert names_of(conv5, DeformConv2d) == [f"layer4.{b}.conv2" for b in range(3)]


def test_dcnv2_resnet50_errors():
    with pytest.raises(TypeError, match="collection of names"):
        dcnv2_resnet50("layer4")
    with pytest.raises(ValueError, match="at least one stage"):
        dcnv2_resnet50(())
    for bad in ("layer5", "layer4.3", "conv1", 4):
        with pytest.raises(ValueError, match=r"expected stages 'layer1'-'layer4'"):
            dcnv2_resnet50([bad])


# ---- every builder: forward, preservation, errors


@pytest.mark.parametrize(
    "build",
    [
        lambda: condconv_resnet(50, num_classes=10),
        lambda: condconv_resnet(18, num_classes=10),
        lambda: condconv_mobilenet_v2(num_classes=10),
        lambda: dynamic_conv_resnet(18, num_classes=10),
        lambda: dynamic_conv_mobilenet_v2(num_classes=10),
        lambda: odconv_resnet(18, 4, num_classes=10),
        lambda: odconv_mobilenet_v2(num_classes=10),
        lambda: dcnv2_resnet50(num_classes=10),
    ],
    ids=["cc50", "cc18", "ccmb", "dy18", "dymb", "od18", "odmb", "dcn"],
)
def test_builders_run_forward_and_backward(build, one_thread):
    torch.manual_seed(0)
    model = build()
    assert model.training
    out = model(randn(2, 3, 32, 32, dtype=torch.float32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "build, plain_name",
    [
        (
            lambda: condconv_resnet(
                18, num_classes=10, classifier_bias=True, preserve=True
            ),
            "resnet18",
        ),
        (
            lambda: condconv_mobilenet_v2(
                num_classes=10, classifier_bias=True, preserve=True
            ),
            "mobilenet_v2",
        ),
        (lambda: dynamic_conv_resnet(18, num_classes=10, preserve=True), "resnet18"),
        (lambda: odconv_resnet(18, 2, num_classes=10, preserve=True), "resnet18"),
        (lambda: dcnv2_resnet50(num_classes=10, preserve=True), "resnet50"),
    ],
    ids=["cc18", "ccmb", "dy18", "od18", "dcn"],
)
def test_preserving_builders_compute_the_plain_network(build, plain_name, one_thread):
    # same seed: torchvision draws the same plain network the builder converted
    torch.manual_seed(0)
    model = build().eval()
    torch.manual_seed(0)
    reference = getattr(torchvision.models, plain_name)(num_classes=10).eval()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    expected = reference(x)
    scale = expected.abs().max()
    torch.testing.assert_close(model(x) / scale, expected / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: condconv_resnet(34),
            r"^condconv_resnet expected depth 18 or 50, got 34",
        ),
        (lambda: condconv_resnet("50"), r"expected depth 18 or 50, got '50'"),
        (lambda: condconv_resnet(True), r"expected depth 18 or 50, got True"),
        (lambda: dynamic_conv_resnet(101), r"^dynamic_conv_resnet expected depth 18"),
        (
            lambda: odconv_resnet(152),
            r"^odconv_resnet expected depth 18, 34, 50 or 101, got 152",
        ),
        (lambda: condconv_resnet(50, 0), "condconv_resnet expected num_kernels >= 1"),
        (
            lambda: condconv_resnet(50, preserve=True),
            "cannot preserve torchvision's classifier",
        ),
        (
            lambda: condconv_mobilenet_v2(preserve=True),
            "cannot preserve torchvision's classifier",
        ),
        (
            lambda: dynamic_conv_resnet(50, attention_norm="layer"),
            "expected attention_norm 'batch' or None, got 'layer'",
        ),
        (
            lambda: dynamic_conv_mobilenet_v2(num_classes=0),
            "dynamic_conv_mobilenet_v2 expected num_classes >= 1",
        ),
    ],
)
def test_builder_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_builders_on_the_meta_device_count_like_real_ones():
    with torch.device("meta"):
        on_meta = condconv_resnet(18)
    assert on_meta.fc.weight.device.type == "meta"
    real = count_parameters(condconv_resnet(18))
    assert count_parameters(on_meta) == real
    # the table's shapes-only build (random fills skipped) counts the same
    (record,) = [r for r in PUBLISHED_COUNTS if r.key == "condconv8x-resnet18"]
    assert published_parameters(record) == real


# ---- the table of published counts (chapter 8)


def test_published_table_is_well_formed():
    keys = [record.key for record in PUBLISHED_COUNTS]
    assert len(keys) == len(set(keys))
    assert all(isinstance(r, PublishedCount) for r in PUBLISHED_COUNTS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PUBLISHED_COUNTS[0].millions = 1.0
    by_key = {r.key: r for r in PUBLISHED_COUNTS}
    # the figures the ODConv README prints agree with the older constants
    assert (
        by_key["odconv4x-resnet50"].millions
        == PUBLISHED_RESNET50_PARAMS["+ ODConv (4x)"]
    )
    assert (
        by_key["ddf-resnet101"].millions
        == PUBLISHED_DDF_RESNET_PARAMS["ddf_mul_resnet101"]
    )
    assert by_key["ddf-resnet50"].decimals == 1
    assert by_key["dcnv2-resnet50"].millions is None
    assert by_key["condconv8x-resnet50"].builder_call == (
        "condconv_resnet(depth=50, num_kernels=8)"
    )
    second_hand = [r.key for r in PUBLISHED_COUNTS if "second-hand" in r.source]
    assert {k.split("-")[0] for k in second_hand} == {"condconv8x", "dyconv4x"}


# The published figures (millions), transcribed here from their sources: the
# README tables of OSVAI/ODConv and theFoxofSky/ddfnet, the FDConv README
# (Linwei-Chen/FDConv), and the comparison tables of the ODConv and KernelWarehouse
# papers for CondConv (8x) and DY-Conv (4x). A typo in PUBLISHED_COUNTS, or a
# builder tuned to it, fails against this independent copy.
PUBLISHED_FIGURES = {
    "resnet50": 25.56, "resnet18": 11.69, "resnet101": 44.55,
    "mobilenet_v2": 3.50, "mobilenet_v2-0.75": 2.64, "mobilenet_v2-0.5": 1.97,
    "condconv8x-resnet50": 129.86, "condconv8x-resnet18": 81.35,
    "condconv8x-mobilenet_v2": 22.88,
    "dyconv4x-resnet50": 100.88, "dyconv4x-resnet18": 45.47,
    "dyconv4x-mobilenet_v2": 12.40,
    "odconv1x-resnet50": 28.64, "odconv4x-resnet50": 90.67,
    "odconv1x-resnet18": 11.94, "odconv4x-resnet18": 44.90,
    "odconv1x-resnet101": 50.82, "odconv2x-resnet101": 90.44,
    "odconv1x-mobilenet_v2": 4.94, "odconv4x-mobilenet_v2": 11.51,
    "odconv1x-mobilenet_v2-0.75": 3.51, "odconv4x-mobilenet_v2-0.75": 7.50,
    "odconv1x-mobilenet_v2-0.5": 2.43, "odconv4x-mobilenet_v2-0.5": 4.44,
    "ddf-resnet50": 16.8, "ddf-resnet101": 28.1,
    "condconv8x-resnet50-backbone": 90.0, "dyconv4x-resnet50-backbone": 75.3,
    "odconv4x-resnet50-backbone": 65.1, "fdconv-resnet50": 3.6,
    "dcnv2-resnet50": None,
}  # fmt: skip


def test_published_table_matches_the_sources():
    assert {r.key: r.millions for r in PUBLISHED_COUNTS} == PUBLISHED_FIGURES


@pytest.mark.parametrize("record", PUBLISHED_COUNTS, ids=lambda r: r.key)
def test_every_published_count_is_reproduced(record):
    (row,) = reproduce_published_counts([record.key])
    assert isinstance(row, ReproducedCount)
    method, network, built, published, source, recipe = row
    assert (method, network, published, source) == (
        record.method,
        record.network,
        record.millions,
        record.source,
    )
    assert recipe.endswith(record.builder_call)
    exact = published_parameters(record)
    assert built == round(exact / 1e6, record.decimals)
    if record.millions is None:  # DCNv2: no figure to compare with
        assert row.matches is None and row.difference is None
        assert built == 26.43
    else:
        assert row.matches and row.difference == 0
        # against the figure transcribed in this file, not the module's copy
        assert built == PUBLISHED_FIGURES[record.key]


def test_extra_counts_are_differences_and_keys_are_checked():
    extra = [r for r in PUBLISHED_COUNTS if r.extra]
    assert {r.key for r in extra} == {
        "fdconv-resnet50",
        "condconv8x-resnet50-backbone",
        "dyconv4x-resnet50-backbone",
        "odconv4x-resnet50-backbone",
    }
    for record in extra:
        assert "Linwei-Chen/FDConv" in record.source
        with shapes_only():
            total = count_parameters(build_published(record))
        assert published_parameters(record) == total - 25_557_032
    with pytest.raises(ValueError, match="expected keys of PUBLISHED_COUNTS"):
        reproduce_published_counts(["resnet-50"])
    with pytest.raises(TypeError, match="expected a PublishedCount"):
        build_published("resnet50")
    rows = reproduce_published_counts("resnet50")
    assert [r.built for r in rows] == [25.56]
