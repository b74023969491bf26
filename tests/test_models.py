"""Tests for refimpl.models: convert_conv2d and the paper's ODConv ResNet-50."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from refimpl.ddf import DDFConv2d
from refimpl.models import (
    PUBLISHED_DDF_RESNET_PARAMS,
    PUBLISHED_RESNET50_PARAMS,
    convert_conv2d,
    count_parameters,
    ddf_resnet,
    is_bottleneck_3x3,
    is_bottleneck_conv,
    paper_resnet50,
)
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
