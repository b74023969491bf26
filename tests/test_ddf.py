"""DDF (chapter 5): the operator against its literal loop, identities, the module
against the official ``DDFPack`` restated, and the memory it keeps."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refimpl.ddf as ddf_module
from refimpl.bench import _AllocationTracker
from refimpl.ddf import (
    DDFConv2d,
    ddf,
    ddf_output_size,
    ddf_reference,
    filter_norm,
)

from conftest import DEVICES, randn, tolerance

F64 = tolerance(torch.float64)


def operands(n, c, h, w, k, stride=1, heads=1, seed=0, **kwargs):
    """Random ``input, channel_filter, spatial_filter`` for :func:`ddf`."""
    s = (stride, stride) if isinstance(stride, int) else stride
    h_out, w_out = (h - 1) // s[0] + 1, (w - 1) // s[1] + 1
    return (
        randn(n, c, h, w, seed=seed, **kwargs),
        randn(n, c, k, k, seed=seed + 1, **kwargs),
        randn(n, heads * k * k, h_out, w_out, seed=seed + 2, **kwargs),
    )


def unfold_ddf(x, channel, spatial, k, stride, dilation, combine):
    """An independent restatement through ``F.unfold`` (materialises everything)."""
    n, c, h, w = x.shape
    heads = spatial.shape[1] // (k * k)
    padding = ((k - 1) * dilation[0] // 2, (k - 1) * dilation[1] // 2)
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)
    h_out, w_out = spatial.shape[-2:]
    cols = cols.view(n, heads, c // heads, k * k, h_out, w_out)
    sp = spatial.view(n, heads, 1, k * k, h_out, w_out)
    ch = channel.view(n, heads, c // heads, k * k, 1, 1)
    weight = ch * sp if combine == "mul" else ch + sp
    return (cols * weight).sum(3).reshape(n, c, h_out, w_out)


# --- the operator ---------------------------------------------------------------------

LOOP_CASES = [
    (combine, k, stride, dilation, heads)
    for combine, k, stride, dilation, heads in itertools.product(
        ("mul", "add"), (3, 5, 7), (1, 2, 3), (1, 2), (1, 2)
    )
    if not (k == 7 and dilation == 2 and stride == 1)  # keeps the loop quick
]


@pytest.mark.parametrize("combine, k, stride, dilation, heads", LOOP_CASES, ids=str)
def test_ddf_equals_the_literal_loop(combine, k, stride, dilation, heads):
    # 6 rows: strides 2 and 3 divide them; 7 columns: neither does
    x, ch, sp = operands(2, 4, 6, 7, k, stride, heads)
    out = ddf(x, ch, sp, k, stride, dilation, combine)
    assert out.shape == (2, 4, ddf_output_size(6, stride), ddf_output_size(7, stride))
    torch.testing.assert_close(
        out, ddf_reference(x, ch, sp, k, stride, dilation, combine), **F64
    )


@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("stride, dilation", [(1, 1), ((2, 1), (1, 2)), (3, 2)])
def test_the_literal_loop_equals_an_unfold_restatement(combine, stride, dilation):
    s, d = (stride, stride) if isinstance(stride, int) else stride, dilation
    d = (d, d) if isinstance(d, int) else d
    x, ch, sp = operands(2, 4, 9, 8, 3, s, heads=2, seed=3)
    expected = unfold_ddf(x, ch, sp, 3, s, d, combine)
    torch.testing.assert_close(ddf_reference(x, ch, sp, 3, s, d, combine), expected)


def test_output_size_is_the_official_one_where_the_stride_divides():
    for size, stride in [(8, 2), (9, 3), (28, 2), (7, 7), (6, 1)]:
        assert ddf_output_size(size, stride) == size // stride
    for size, stride in [(7, 2), (10, 3), (29, 2)]:
        assert ddf_output_size(size, stride) == math.ceil(size / stride)
        # nn.Conv2d's size for DDF's padding (k - 1) * d / 2, here k = 3, d = 1
        conv = nn.Conv2d(1, 1, 3, stride, 1)
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == math.ceil(size / stride)


def test_non_dividing_stride_extends_the_official_output():
    # the official operator gives size // stride rows; ours gives one more, and the
    # rows they share are the same sums
    x, ch, sp = operands(1, 2, 7, 7, 3, 2, seed=5)
    out = ddf(x, ch, sp, 3, 2)
    assert out.shape[-2:] == (4, 4)
    loop = ddf_reference(x, ch, sp, 3, 2)
    torch.testing.assert_close(out[..., :3, :3], loop[..., :3, :3], **F64)


@pytest.mark.parametrize("combine, value", [("mul", 1.0), ("add", 0.0)])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 2)])
def test_identity_is_a_per_sample_depthwise_convolution(
    combine, value, stride, dilation
):
    x, ch, sp = operands(3, 4, 8, 9, 3, stride, seed=7)
    sp = torch.full_like(sp, value)
    out = ddf(x, ch, sp, 3, stride, dilation, combine)
    n, c = x.shape[:2]
    expected = F.conv2d(
        x.reshape(1, n * c, 8, 9),
        ch.reshape(n * c, 1, 3, 3),
        stride=stride,
        padding=dilation,
        dilation=dilation,
        groups=n * c,
    ).reshape(n, c, *out.shape[-2:])
    torch.testing.assert_close(out, expected, **F64)


def test_add_is_the_sum_of_two_filterings():
    # (ch + sp) * x = ch * x + sp * x: 'add' is a depthwise convolution plus a
    # per-pixel filter shared by the channels
    x, ch, sp = operands(2, 4, 6, 6, 3, seed=9)
    total = ddf(x, ch, sp, 3, combine="add")
    zeros = torch.zeros_like(sp)
    ones = torch.ones_like(ch)
    parts = ddf(x, ch, zeros, 3, combine="add") + ddf(x, ones, sp, 3, combine="mul")
    torch.testing.assert_close(total, parts, **F64)


@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize(
    "stride, dilation, heads", [(1, 1, 1), (2, 1, 2), ((1, 3), (2, 1), 1)]
)
def test_gradcheck(combine, stride, dilation, heads, one_thread):
    x, ch, sp = operands(2, 4, 5, 7, 3, stride, heads, seed=11, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: ddf(*t, 3, stride, dilation, combine), (x, ch, sp)
    )


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_backward_in_blocks_equals_autograd_of_the_loop_free_form(combine, monkeypatch):
    # tiny blocks: many channel blocks and heads, the strided-view bookkeeping of
    # every block boundary checked against autograd through plain operations
    monkeypatch.setattr(ddf_module, "_BLOCK_ELEMENTS", 64)
    x, ch, sp = operands(3, 6, 9, 8, 3, 2, heads=3, seed=13, requires_grad=True)
    grad = randn(3, 6, 5, 4, seed=14)
    out = ddf(x, ch, sp, 3, 2, (1, 2), combine)
    ours = torch.autograd.grad(out, (x, ch, sp), grad)
    geo = ddf_module._Geometry(3, (2, 2), (1, 2), (1, 2), 3, combine == "mul")
    plain = ddf_module._ddf_graph(x, ch, sp, geo)
    torch.testing.assert_close(out, plain, **F64)
    expected = torch.autograd.grad(plain, (x, ch, sp), grad)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, **F64)


def test_gradients_only_where_asked():
    x, ch, sp = operands(1, 2, 5, 5, 3, seed=15)
    ch.requires_grad_()
    out = ddf(x, ch, sp, 3)
    (grad_ch,) = torch.autograd.grad(out.sum(), ch)
    assert grad_ch.shape == ch.shape and x.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("combine", ["mul", "add"])
def test_dtypes_agree_with_float64(device, dtype, combine):
    x, ch, sp = operands(2, 8, 7, 6, 3, seed=17)
    expected = ddf(x, ch, sp, 3, combine=combine)
    low = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, ch, sp)]
    out = ddf(*low, 3, combine=combine)
    assert out.dtype == dtype and out.device.type == device
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    scale = expected.abs().max().item()
    assert (out.double().cpu() - expected).abs().max().item() <= tol * scale
    out.sum().backward()
    assert all(t.grad.dtype == dtype for t in low)


def test_autocast_casts_the_operands_like_a_convolution():
    x, ch, sp = operands(2, 4, 6, 6, 3, seed=19, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ddf(x, ch.bfloat16(), sp, 3)  # mixed dtypes are fine under autocast
    assert out.dtype == torch.bfloat16
    expected = ddf(x, ch, sp, 3)
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 3e-2 * scale


def test_compiled_forward_and_backward_agree(one_thread):
    torch._dynamo.reset()
    x, ch, sp = operands(2, 4, 7, 6, 3, 2, heads=2, seed=21, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, ch, sp)]
    compiled = torch.compile(
        lambda *t: ddf(*t, 3, 2, 1, "mul"), backend="aot_eager", fullgraph=True
    )
    out = compiled(*leaves)
    out.square().sum().backward()
    eager = [t.clone().requires_grad_() for t in (x, ch, sp)]
    expected = ddf(*eager, 3, 2, 1, "mul")
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_non_finite_values_propagate_as_the_loop():
    x, ch, sp = operands(1, 2, 6, 6, 3, seed=23)
    x[0, 1, 0, 5] = math.inf
    x[0, 0, 3, 3] = math.nan
    sp[0, 4, 2, 2] = -math.inf
    out, loop = ddf(x, ch, sp, 3), ddf_reference(x, ch, sp, 3)
    assert torch.equal(out.isnan(), loop.isnan())
    assert torch.equal(out.isinf(), loop.isinf())
    finite = loop.isfinite()
    torch.testing.assert_close(out[finite], loop[finite], **F64)


# --- memory ---------------------------------------------------------------------------


class _NewStorages(_AllocationTracker):
    """The bench's allocation tracker, not counting the operands' own storages
    (a view of an operand returned by an op is not a new allocation)."""

    def __init__(self, *operands):
        super().__init__()
        for t in operands:
            self._live[t.untyped_storage().data_ptr()] = 0


def test_forward_never_materialises_the_per_pixel_filter():
    # the per-pixel filter (or the unfolded input) would be k*k = 9 times the
    # output; the forward allocates the output and a few cache-sized blocks
    x, ch, sp = operands(4, 256, 24, 24, 3, seed=25, dtype=torch.float32)
    out_bytes = x.numel() * 4
    for combine in ("mul", "add"):
        with _NewStorages(x, ch, sp) as tracker:
            ddf(x, ch, sp, 3, combine=combine)
        assert tracker.peak < 2 * out_bytes, (combine, tracker.peak, out_bytes)


def test_backward_saves_only_the_operands():
    x, ch, sp = operands(2, 16, 12, 12, 3, seed=27, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ddf(x, ch, sp, 3)
    assert sum(saved) <= x.numel() + ch.numel() + sp.numel()


# --- errors ---------------------------------------------------------------------------


def test_operator_errors():
    x, ch, sp = operands(2, 4, 6, 6, 3, seed=29, dtype=torch.float32)
    cases = [
        ((x, ch, sp, 4), ValueError, r"^ddf expected an odd kernel_size >= 1"),
        ((x, ch, sp, 3.0), TypeError, r"^ddf expected kernel_size to be an int"),
        ((x, ch, sp, (3, 5)), ValueError, r"^ddf expected a square kernel_size"),
        ((x[0], ch, sp, 3), ValueError, r"^ddf expected input with 4 dimensions"),
        (
            (x, ch[:, :3], sp, 3),
            ValueError,
            r"^ddf expected channel_filter of shape \[N, C, k, k\] = \(2, 4, 3, 3\), "
            r"got \(2, 3, 3, 3\)",
        ),
        (
            (x, ch, sp[..., :5], 3),
            ValueError,
            r"^ddf expected spatial_filter of shape \[N, heads \* k \* k, H_out, "
            r"W_out\] = \(2, heads \* 9, 6, 6\), got \(2, 9, 6, 5\)",
        ),
        (
            (x, ch, sp[:, :8], 3),
            ValueError,
            r"^ddf expected spatial_filter of shape",
        ),
        (
            (x, ch, torch.cat([sp] * 3, 1), 3),
            ValueError,
            r"^ddf expected the heads of spatial_filter \(3 = 27 / 9\) to divide the "
            r"input channels, got 4 channels",
        ),
        (
            (x, ch.double(), sp, 3),
            TypeError,
            r"^ddf expected channel_filter with the dtype of the input "
            r"\(torch\.float32\), got torch\.float64",
        ),
        ((x.int(), ch, sp, 3), TypeError, r"^ddf expected input with a floating"),
        ((x, ch, sp, 3, 0), ValueError, r"^ddf expected stride >= 1, got 0"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ddf(*args)
    with pytest.raises(ValueError, match=r"^ddf expected combine 'mul' or 'add'"):
        ddf(x, ch, sp, 3, combine="sum")
    with pytest.raises(ValueError, match=r"^ddf_reference expected an odd"):
        ddf_reference(x, ch, sp, 2)


# --- FilterNorm -----------------------------------------------------------------------


def test_filter_norm_is_the_official_formula():
    d = randn(3, 5, 9, seed=31)
    manual = (d - d.mean(-1, keepdim=True)) / (d.std(-1, keepdim=True) + 1e-10)
    torch.testing.assert_close(filter_norm(d, -1, 0.5), manual * 0.5, **F64)
    out = filter_norm(d, -1, 1.0)
    # unbiased: the k*k - 1 divisor leaves sum of squares k*k - 1, not k*k
    eight = torch.full((3, 5), 8.0, dtype=torch.float64)  # up to the 1e-10
    torch.testing.assert_close(out.square().sum(-1), eight, rtol=1e-8, atol=0)
    constant = torch.full((2, 9), 0.25, dtype=torch.float64)
    assert torch.equal(filter_norm(constant, 1, 3.0), torch.zeros(2, 9).double())


# --- the module -----------------------------------------------------------------------


def official_state_dict(layer: DDFConv2d) -> dict:
    """``layer``'s parameters under the official ``DDFPack`` names and shapes."""
    c, k, h = layer.channels, layer.kernel_size[0], layer.hidden
    return {
        "spatial_branch.0.weight": layer.spatial.weight.detach().clone(),
        "spatial_branch.0.bias": layer.spatial.bias.detach().clone(),
        "channel_branch.1.weight": layer.channel_fc1.weight.detach().reshape(
            h, c, 1, 1
        ),
        "channel_branch.1.bias": layer.channel_fc1.bias.detach().clone(),
        "channel_branch.3.weight": layer.channel_fc2.weight.detach().reshape(
            c * k * k, h, 1, 1
        ),
        "channel_branch.3.bias": layer.channel_fc2.bias.detach().clone(),
        "channel_branch.4.std": layer.channel_scale.detach().reshape(-1).clone(),
    }


def official_forward(state, x, k, stride, dilation, head, gain, combine):
    """theFoxofSky/ddfnet ``DDFPack.forward`` restated from its state dict: the
    branches with the official layout (heads folded into the batch) and the
    literal loop as the operator."""

    def norm(t, dim, scale):  # FilterNorm: unbiased std, 1e-10 on the std
        t = t - t.mean(dim, keepdim=True)
        return t / (t.std(dim, keepdim=True) + 1e-10) * scale

    b, c, h, w = x.shape
    s = stride
    spatial = F.conv2d(
        x, state["spatial_branch.0.weight"], state["spatial_branch.0.bias"], s
    )
    ho, wo = spatial.shape[-2:]
    spatial = norm(spatial.reshape(b, head, k * k, ho, wo), 2, gain / k)
    pooled = x.mean((2, 3), keepdim=True)
    hidden = F.relu(
        F.conv2d(
            pooled, state["channel_branch.1.weight"], state["channel_branch.1.bias"]
        )
    )
    channel = F.conv2d(
        hidden, state["channel_branch.3.weight"], state["channel_branch.3.bias"]
    ).reshape(b, c, k * k)
    channel = norm(channel, 2, state["channel_branch.4.std"].reshape(c, k * k))
    out = ddf_reference(
        x.reshape(b * head, c // head, h, w),
        channel.reshape(b * head, c // head, k, k),
        spatial.reshape(b * head, k * k, ho, wo),
        k,
        stride,
        dilation,
        combine,
    )
    return out.reshape(b, c, ho, wo)


@pytest.mark.parametrize(
    "k, stride, dilation, head, combine",
    [
        (3, 1, 1, 1, "mul"),
        (3, 2, 1, 2, "add"),
        (5, 1, 2, 4, "mul"),
        (3, 3, 1, 1, "add"),
    ],
)
def test_module_is_the_official_pack(k, stride, dilation, head, combine):
    torch.manual_seed(0)
    layer = DDFConv2d(
        8, k, stride, dilation, head=head, combine=combine, dtype=torch.float64
    )
    state = official_state_dict(layer)
    for value in state.values():  # away from the initialisation
        value.copy_(torch.randn(value.shape, dtype=torch.float64) * 0.5)
    fresh = DDFConv2d(
        8, k, stride, dilation, head=head, combine=combine, dtype=torch.float64
    )
    fresh.load_official_state_dict(state)
    x = randn(2, 8, 9, 9, seed=33)  # 9 rows: strides 1 and 3 divide, 2 does not
    expected = official_forward(state, x, k, stride, dilation, head, 2**0.5, combine)
    torch.testing.assert_close(fresh(x), expected, **F64)
    round_trip = official_state_dict(fresh)
    for key, value in state.items():
        assert torch.equal(round_trip[key], value), key


def test_official_shapes_names_and_initialisation():
    torch.manual_seed(0)
    layer = DDFConv2d(64, 3, 2)
    state = official_state_dict(layer)
    shapes = {key: tuple(v.shape) for key, v in state.items()}
    assert shapes == {
        "spatial_branch.0.weight": (9, 64, 1, 1),
        "spatial_branch.0.bias": (9,),
        "channel_branch.1.weight": (12, 64, 1, 1),  # int(64 * 0.2) = 12
        "channel_branch.1.bias": (12,),
        "channel_branch.3.weight": (576, 12, 1, 1),
        "channel_branch.3.bias": (576,),
        "channel_branch.4.std": (576,),
    }
    assert layer.spatial.stride == (2, 2)  # the spatial branch carries the stride
    # official: std ~ randn * calculate_gain('relu') / k; 576 draws
    scale = layer.channel_scale.detach()
    assert abs(scale.std().item() - math.sqrt(2) / 3) < 0.05
    bound = 1 / math.sqrt(64)  # default 1x1 conv initialisation, fan-in 64
    assert layer.spatial.weight.abs().max().item() <= bound
    assert sum(p.numel() for p in layer.parameters()) == (
        64 * 9 + 9 + 64 * 12 + 12 + 12 * 576 + 576 + 576
    )


def test_filters_are_normalised():
    layer = DDFConv2d(6, 3, head=2, nonlinearity="linear").eval()
    x = randn(2, 6, 7, 7, seed=35, dtype=torch.float32)
    channel, spatial = layer.dynamic_tensors(x)
    sp = spatial.reshape(2, 2, 9, 7, 7)
    torch.testing.assert_close(sp.mean(2), torch.zeros(2, 2, 7, 7), atol=1e-6, rtol=0)
    # fixed scale gain / k = 1 / 3 for 'linear'
    torch.testing.assert_close(
        sp.std(2), torch.full((2, 2, 7, 7), 1 / 3), atol=1e-5, rtol=0
    )
    ch = channel.reshape(2, 6, 9) / layer.channel_scale
    torch.testing.assert_close(ch.std(2), torch.ones(2, 6), atol=1e-5, rtol=0)


def test_load_official_state_dict_errors():
    layer = DDFConv2d(8, 3)
    state = official_state_dict(layer)
    name = r"^DDFConv2d\.load_official_state_dict"
    with pytest.raises(ValueError, match=rf"{name} expected the official keys"):
        layer.load_official_state_dict({**state, "spatial_branch.1.std": 1.0})
    bad = {**state, "channel_branch.4.std": torch.zeros(8, 9)}
    with pytest.raises(
        ValueError, match=rf"{name} expected 'channel_branch\.4\.std' of shape \(72,\)"
    ):
        layer.load_official_state_dict(bad)


def test_constructor_and_extra_repr():
    layer = DDFConv2d(8)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (8, 8, 8)
    assert layer.padding == (1, 1) and layer.bias is None
    assert layer.extra_repr() == "8, kernel_size=3"
    layer = DDFConv2d(8, 5, 2, 2, head=2, combine="add")
    assert layer.padding == (4, 4)
    assert layer.extra_repr() == (
        "8, kernel_size=5, stride=(2, 2), dilation=(2, 2), head=2, combine='add'"
    )
    cases = [
        ({"channels": 0}, ValueError, r"expected channels >= 1, got 0"),
        (
            {"kernel_size": 4},
            ValueError,
            r"expected an odd kernel_size >= 3 \(.*, got 4",
        ),
        (
            {"kernel_size": 1},
            ValueError,
            r"expected an odd kernel_size >= 3 \(.*, got 1",
        ),
        ({"head": 3}, ValueError, r"expected head to divide channels, got channels=8"),
        ({"se_ratio": 0}, ValueError, r"expected se_ratio > 0, got 0"),
        ({"combine": "cat"}, ValueError, r"expected combine 'mul' or 'add', got 'cat'"),
        ({"nonlinearity": "swish"}, ValueError, r"expected nonlinearity to be a name"),
        ({"nonlinearity": 1}, TypeError, r"expected nonlinearity to be a str"),
        ({"stride": 0}, ValueError, r"expected stride >= 1, got 0"),
        ({"dilation": (1, 0)}, ValueError, r"expected dilation >= 1"),
    ]
    for override, error, match in cases:
        with pytest.raises(error, match=rf"^DDFConv2d {match}"):
            DDFConv2d(**{"channels": 8, **override})


def test_from_conv2d_errors_and_the_resnet_replacement():
    name = r"^DDFConv2d\.from_conv2d"
    with pytest.raises(ValueError, match=rf"{name} expected a convolution from C to C"):
        DDFConv2d.from_conv2d(nn.Conv2d(4, 8, 3, padding=1), preserve=False)
    with pytest.raises(ValueError, match=rf"{name} expected padding \(1, 1\)"):
        DDFConv2d.from_conv2d(nn.Conv2d(4, 4, 3), preserve=False)
    dense = nn.Conv2d(4, 4, 3, 2, padding=1, bias=False)
    with pytest.raises(ValueError, match=rf"{name} expected a depthwise convolution"):
        DDFConv2d.from_conv2d(dense, combine="add")
    layer = DDFConv2d.from_conv2d(dense, preserve=False)  # the DDF-ResNet placement
    assert layer.stride == (2, 2) and layer(torch.zeros(1, 4, 7, 7)).shape[-1] == 4
    same = nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False)
    layer = DDFConv2d.from_conv2d(same, combine="add")
    x = randn(2, 4, 6, 6, seed=37, dtype=torch.float32)
    torch.testing.assert_close(layer(x), same(x), rtol=1e-5, atol=1e-5)
