"""Tests for refimpl.odconv (chapter 4)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refimpl
from refimpl.odconv import (
    ODAttentions,
    ODConv2d,
    choose_order,
    odconv2d,
    odconv2d_reference,
    order_costs,
)

from conftest import randn, tolerance

F64 = torch.float64

# (in, out, kernel_size, stride, padding, dilation, groups, num_kernels)
GEOMETRIES = [
    (6, 4, 3, 1, 1, 1, 1, 4),
    (6, 4, 3, 2, 0, 1, 2, 2),
    (4, 6, (3, 2), 1, (1, 0), 2, 1, 1),
    (5, 5, 3, 1, 1, 1, 5, 2),  # depthwise: no filter attention
    (4, 8, 1, 2, 0, 1, 1, 1),  # 1x1, one kernel: the sample-independent path
    (4, 8, 1, 1, 0, 1, 2, 3),  # 1x1 with several kernels
    (3, 6, 3, 1, 1, 1, 3, 2),  # depthwise with multiplier 2: keeps the filter head
]


def make(geometry, *, device="cpu", seed=0, **kwargs):
    c_in, c_out, k, s, p, d, g, n = geometry
    torch.manual_seed(seed)
    layer = ODConv2d(c_in, c_out, k, s, p, d, g, num_kernels=n, **kwargs)
    return layer.to(device=device, dtype=F64)


def random_attentions(layer, n, seed=1, device="cpu"):
    """Attentions unrelated to the module's branch, with the module's structure."""
    a = layer.attention
    kh, kw = layer.kernel_size
    return ODAttentions(
        torch.rand(
            n,
            layer.in_channels,
            generator=torch.Generator().manual_seed(seed),
            dtype=F64,
        ).to(device),
        None
        if a.filter_fc is None
        else randn(n, layer.out_channels, seed=seed + 1, device=device).sigmoid(),
        None
        if a.spatial_fc is None
        else randn(n, kh, kw, seed=seed + 2, device=device).sigmoid(),
        None
        if a.kernel_fc is None
        else randn(n, layer.num_kernels, seed=seed + 3, device=device).softmax(1),
    )


def conv_args(layer):
    return (layer.stride, layer.padding, layer.dilation, layer.groups)


# --- the operator against the literal reference -------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_loop_reference(geometry, bias, device):
    layer = make(geometry, device=device, bias=bias)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(randn(layer.out_channels, seed=5, device=device))
    x = randn(3, geometry[0], 9, 8, seed=2, device=device)
    att = layer.dynamic_tensors(x)
    expected = odconv2d_reference(x, *att, layer.weight, layer.bias, *conv_args(layer))
    torch.testing.assert_close(layer(x), expected, **tolerance(F64))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("order", ["auto", "kernel", "feature"])
def test_both_orders_match_reference(geometry, order, device):
    layer = make(geometry, device=device)
    x = randn(3, geometry[0], 7, 9, seed=3, device=device)
    att = random_attentions(layer, 3, device=device)
    expected = odconv2d_reference(x, *att, layer.weight, None, *conv_args(layer))
    out = odconv2d(x, *att, layer.weight, None, *conv_args(layer), order=order)
    torch.testing.assert_close(out, expected, **tolerance(F64))


def test_orders_agree_on_module_forward():
    layer = make(GEOMETRIES[0])
    x = randn(4, 6, 10, 10, seed=4)
    outs = []
    for order in ("kernel", "feature"):
        layer.order = order
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], **tolerance(F64))


def test_loop_reference_against_paper_sum():
    """The reference mixes n kernels as sum_i a_w,i a_f a_c a_s W_i: check one entry."""
    layer = make(GEOMETRIES[1])
    c, f, s, k = random_attentions(layer, 2)
    # sample 1, filter 3 (group 1), channel 2 of its group = input channel 5, tap (2,1)
    w = sum(
        k[1, i] * f[1, 3] * c[1, 5] * s[1, 2, 1] * layer.weight[i, 3, 2, 2, 1]
        for i in range(layer.num_kernels)
    )
    probe = torch.zeros(2, 6, 7, 7, dtype=F64)
    probe[1, 5, 2, 1] = 1.0  # the input pixel that tap (2, 1) of output (0, 0) reads
    out = odconv2d_reference(probe, c, f, s, k, layer.weight, None, *conv_args(layer))
    torch.testing.assert_close(out[1, 3, 0, 0], w, **tolerance(F64))


# --- identities ---------------------------------------------------------------------


def test_unit_attentions_one_kernel_is_plain_convolution(device):
    weight = randn(1, 6, 3, 3, 2, seed=7, device=device)
    bias = randn(6, seed=8, device=device)
    x = randn(2, 6, 8, 9, seed=9, device=device)
    ones = ODAttentions(
        torch.ones(2, 6, dtype=F64, device=device),
        torch.ones(2, 6, dtype=F64, device=device),
        torch.ones(2, 3, 2, dtype=F64, device=device),
        torch.ones(2, 1, dtype=F64, device=device),
    )
    expected = F.conv2d(x, weight[0], bias, 2, (1, 0), 1, 2)
    for order in ("kernel", "feature"):
        for att in (ones, ODAttentions(None, None, None, None)):
            out = odconv2d(x, *att, weight, bias, 2, (1, 0), 1, 2, order=order)
            torch.testing.assert_close(out, expected, **tolerance(F64))


def test_module_with_unit_attentions_is_plain_convolution():
    layer = make((6, 4, 3, 1, 1, 1, 2, 1), bias=True)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2).to(F64)
    with torch.no_grad():
        conv.weight.copy_(layer.weight[0])
        conv.bias.copy_(randn(4, seed=10))
        layer.bias.copy_(conv.bias)

    def unit_attentions(x, temperature=1.0):
        n = x.shape[0]
        ones = x.new_ones
        return ODAttentions(ones(n, 6), ones(n, 4), ones(n, 3, 3), None)

    layer.attention.forward = unit_attentions
    x = randn(3, 6, 8, 8, seed=11)
    torch.testing.assert_close(layer(x), conv(x), **tolerance(F64))


def test_one_hot_kernel_attention_selects_a_kernel():
    weight = randn(3, 4, 4, 3, 3, seed=12)
    x = randn(2, 4, 6, 6, seed=13)
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    out = odconv2d(x, None, None, None, one_hot, weight, padding=1)
    torch.testing.assert_close(out[0:1], F.conv2d(x[0:1], weight[1], padding=1))
    torch.testing.assert_close(out[1:2], F.conv2d(x[1:2], weight[2], padding=1))


# --- the attention branch ----------------------------------------------------------


def independent_attentions(layer, x, batch_stats):
    """The branch of odconv.py written out with explicit formulas."""
    a = layer.attention
    z = x.mean(dim=(2, 3)) @ a.fc.weight.T
    if a.bn is not None:
        if batch_stats:
            mean, var = z.mean(0), z.var(0, unbiased=False)
        else:
            mean, var = a.bn.running_mean, a.bn.running_var
        z = (z - mean) / torch.sqrt(var + a.bn.eps) * a.bn.weight + a.bn.bias
    else:
        z = z + a.fc.bias
    h = z.clamp_min(0)
    t = layer.temperature
    sig = lambda fc: 1 / (1 + torch.exp(-(h @ fc.weight.T + fc.bias) / t))  # noqa: E731
    logits = (h @ a.kernel_fc.weight.T + a.kernel_fc.bias) / t
    kernel = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    spatial = sig(a.spatial_fc).reshape(-1, 3, 3)
    return sig(a.channel_fc), sig(a.filter_fc), spatial, kernel


@pytest.mark.parametrize("norm", ["batch", None])
@pytest.mark.parametrize("training", [True, False])
def test_attention_branch_formulas(norm, training):
    layer = make((6, 4, 3, 1, 1, 1, 1, 4), attention_norm=norm, temperature=2.5)
    if norm == "batch":  # non-trivial running statistics for eval mode
        layer.attention.bn.running_mean.uniform_(-0.5, 0.5)
        layer.attention.bn.running_var.uniform_(0.5, 2.0)
    layer.train(training)
    x = randn(5, 6, 7, 7, seed=14)
    expected = independent_attentions(layer, x, batch_stats=training)
    got = layer.dynamic_tensors(x)
    assert isinstance(got, ODAttentions)
    for field, want in zip(ODAttentions._fields, expected):
        torch.testing.assert_close(getattr(got, field), want, **tolerance(F64))
    assert torch.allclose(got.kernel.sum(1), torch.ones(5, dtype=F64))


@pytest.mark.parametrize(
    "geometry, heads",
    [
        ((8, 8, 3, 1, 1, 1, 8, 4), (True, False, True, True)),  # depthwise
        ((8, 16, 3, 1, 1, 1, 8, 4), (True, True, True, True)),  # multiplier 2
        ((8, 8, 1, 1, 0, 1, 1, 4), (True, True, False, True)),  # pointwise
        ((8, 8, 3, 1, 1, 1, 1, 1), (True, True, True, False)),  # one kernel
    ],
)
def test_heads_omitted_as_in_official_code(geometry, heads):
    layer = make(geometry)
    a = layer.attention
    present = tuple(
        m is not None for m in (a.channel_fc, a.filter_fc, a.spatial_fc, a.kernel_fc)
    )
    assert present == heads
    att = layer.dynamic_tensors(randn(2, geometry[0], 5, 5))
    assert tuple(t is not None for t in att) == heads


def closed_form_params(c_in, c_out, k, g, n, bias, norm="batch"):
    """Per-layer count of the official ODConv (methods reference, section 5)."""
    h = max(math.floor(c_in / 16), 16)
    count = n * c_out * (c_in // g) * k * k + c_in * h + (h * c_in + c_in)
    count += 2 * h if norm == "batch" else h  # BN affine pair, or the fc bias
    if not (c_in == g == c_out):
        count += h * c_out + c_out
    if k > 1:
        count += h * k * k + k * k
    if n > 1:
        count += h * n + n
    return count + (c_out if bias else 0)


@pytest.mark.parametrize(
    "c_in, c_out, k, g, n, bias, norm",
    [
        (64, 64, 3, 1, 1, False, "batch"),
        (512, 2048, 1, 1, 4, False, "batch"),
        (32, 32, 3, 32, 4, True, "batch"),
        (300, 20, 3, 2, 2, True, None),
    ],
)
def test_parameter_count_closed_form(c_in, c_out, k, g, n, bias, norm):
    layer = ODConv2d(
        c_in, c_out, k, groups=g, bias=bias, num_kernels=n, attention_norm=norm
    )
    got = sum(p.numel() for p in layer.parameters())
    assert got == closed_form_params(c_in, c_out, k, g, n, bias, norm)


def test_official_initialisation():
    torch.manual_seed(0)
    layer = ODConv2d(64, 128, 3, num_kernels=4, bias=False)
    fan_out = 128 * 9
    for i in range(4):
        std = layer.weight[i].std().item()
        assert abs(std - math.sqrt(2 / fan_out)) < 0.05 * math.sqrt(2 / fan_out)
    a = layer.attention
    assert a.fc.bias is None and a.hidden == 16
    assert torch.equal(a.bn.weight, torch.ones(16))
    assert torch.equal(a.bn.bias, torch.zeros(16))
    for head in (a.channel_fc, a.filter_fc, a.spatial_fc, a.kernel_fc):
        assert torch.equal(head.bias, torch.zeros_like(head.bias))
    assert ODConv2d(512, 8, 1).attention.hidden == 32  # int(512 / 16)
    free = ODConv2d(8, 8, 3, attention_norm=None).attention
    assert free.fc.bias is not None and free.bn is None


def test_temperature_divides_every_logit():
    layer = make(GEOMETRIES[0]).eval()
    x = randn(3, 6, 6, 6, seed=15)
    at1 = layer.dynamic_tensors(x)
    layer.temperature = 4.0
    at4 = layer.dynamic_tensors(x)
    for p1, p4 in zip(at1[:3], at4[:3]):  # sigmoid heads: logit(p) scales by 1/tau
        torch.testing.assert_close(torch.logit(p4), torch.logit(p1) / 4)
    log1, log4 = at1.kernel.log(), at4.kernel.log()
    torch.testing.assert_close(
        log4 - log4.mean(1, keepdim=True), (log1 - log1.mean(1, keepdim=True)) / 4
    )
    layer.temperature = 30  # any real > 0, stored as a float
    assert layer.temperature == 30.0 and isinstance(layer.temperature, float)


def test_temperature_schedule_from_chapter_3_drives_the_layer():
    from refimpl.dynamic_conv import set_temperature, temperature_schedule

    second = make((4, 4, 3, 1, 1, 1, 1, 2))
    model = nn.Sequential(make(GEOMETRIES[0]), nn.ReLU(), second)
    assert set_temperature(model, temperature_schedule(0.0)) == 2
    assert refimpl.set_temperature is set_temperature
    assert model[0].temperature == 30.0 and model[2].temperature == 30.0
    set_temperature(model, temperature_schedule(5.0))
    assert model[0].temperature == pytest.approx(15.5)


# --- BatchNorm in the attention, batch sizes ---------------------------------------


@pytest.mark.parametrize("norm", ["batch", None])
def test_unbatched_input_is_a_batch_of_one(norm):
    layer = make(GEOMETRIES[0], attention_norm=norm).eval()
    x = randn(6, 7, 8, seed=29)
    out = layer(x)
    assert out.shape == (4, 7, 8)
    torch.testing.assert_close(out, layer(x[None])[0], **tolerance(F64))
    for got, want in zip(layer.dynamic_tensors(x), layer.dynamic_tensors(x[None])):
        torch.testing.assert_close(got, want, **tolerance(F64))
    layer.train()
    if norm == "batch":  # one sample cannot be batch-normalised
        with pytest.raises(ValueError, match=r"batch of 1 .*attention_norm=None"):
            layer(x)
    else:
        torch.testing.assert_close(layer(x), out, **tolerance(F64))


def test_batch_of_one_in_training_with_batchnorm_raises_clear_error():
    layer = make(GEOMETRIES[0])
    with pytest.raises(ValueError, match=r"batch of 1 .*attention_norm=None"):
        layer(randn(1, 6, 5, 5))


@pytest.mark.parametrize("norm", ["batch", None])
def test_batch_of_one_in_eval_mode_and_norm_free_training(norm):
    layer = make(GEOMETRIES[0], attention_norm=norm)
    x = randn(4, 6, 6, 6, seed=16)
    layer.eval()
    alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(layer(x), alone, **tolerance(F64))
    if norm is None:  # norm-free: batch independent in training mode too
        layer.train()
        alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(layer(x), alone, **tolerance(F64))


def test_training_mode_output_depends_on_the_batch_with_batchnorm():
    layer = make(GEOMETRIES[0])
    x = randn(4, 6, 6, 6, seed=17)
    with torch.no_grad():
        full = layer(x)[:2]
        half = layer(x[:2])
    assert not torch.allclose(full, half)


@pytest.mark.parametrize("norm", ["batch", None])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(norm, training, device):
    layer = make(GEOMETRIES[0], attention_norm=norm, device=device).train(training)
    x = randn(0, 6, 8, 8, device=device, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad.shape == x.shape


def test_large_batch_matches_samples_one_by_one():
    layer = make((4, 4, 3, 1, 1, 1, 1, 2)).eval()
    x = randn(33, 4, 5, 5, seed=18)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(33)])
    torch.testing.assert_close(layer(x), alone, **tolerance(F64))


# --- shapes, layouts, dtypes -------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("size", [(8, 8), (11, 6)])
def test_output_shape_matches_conv2d(geometry, size):
    c_in, c_out, k, s, p, d, g, n = geometry
    layer = make(geometry)
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, g)
    x = randn(2, c_in, *size)
    assert layer(x).shape == conv(x.float()).shape


def test_channels_last_and_non_contiguous_inputs():
    layer = make(GEOMETRIES[0])
    x = randn(3, 6, 8, 8, seed=19)
    expected = layer(x)
    cl = x.contiguous(memory_format=torch.channels_last)
    nc = randn(3, 8, 8, 6, seed=19).permute(0, 3, 1, 2)  # same layout trick, other data
    torch.testing.assert_close(layer(cl), expected, **tolerance(F64))
    torch.testing.assert_close(layer(nc), layer(nc.contiguous()), **tolerance(F64))


@pytest.mark.parametrize("order", ["kernel", "feature"])
def test_autocast_bfloat16_cpu(order):
    torch.manual_seed(0)
    layer = ODConv2d(8, 8, 3, padding=1, order=order).eval()
    x = randn(2, 8, 8, 8, seed=20, dtype=torch.float32)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_float32_on_device_matches_float64(device):
    layer64 = make(GEOMETRIES[0], device=device).eval()
    layer32 = copy.deepcopy(layer64).float()
    x = randn(2, 6, 8, 8, seed=21, device=device)
    torch.testing.assert_close(
        layer32(x.float()).double(), layer64(x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("order", ["kernel", "feature"])
def test_gradcheck_functional(order):
    layer = make((4, 4, 3, 2, 1, 1, 2, 2))
    x = randn(2, 4, 5, 5, seed=22, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    c, f, s, k = (
        t.detach().clone().requires_grad_(True) for t in random_attentions(layer, 2)
    )
    bias = randn(4, seed=23, requires_grad=True)

    def fn(x, w, c, f, s, k, bias):
        return odconv2d(x, c, f, s, k, w, bias, 2, 1, 1, 2, order=order)

    assert torch.autograd.gradcheck(fn, (x, w, c, f, s, k, bias), fast_mode=True)


@pytest.mark.parametrize("norm", ["batch", None])
def test_gradcheck_module_input(norm):
    layer = make((3, 4, 3, 1, 1, 1, 1, 2), attention_norm=norm)
    x = randn(2, 3, 4, 4, seed=24, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_state_dict_round_trip():
    layer = make(GEOMETRIES[0], bias=True)
    layer.temperature = 12.5
    layer(randn(4, 6, 5, 5))  # moves the BatchNorm running statistics
    other = make(GEOMETRIES[0], seed=99, bias=True)
    other.load_state_dict(layer.state_dict())
    assert other.temperature == 12.5
    layer.eval(), other.eval()
    x = randn(2, 6, 5, 5, seed=25)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_torch_compile_traces_without_graph_breaks():
    layer = make(GEOMETRIES[0]).eval()
    x = randn(2, 6, 8, 8, seed=26)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


# --- the order rule ------------------------------------------------------------------


def test_choose_order_rule():
    # early ResNet layer: large maps, few channels -> fold into the kernel
    assert choose_order((32, 64, 56, 56), (4, 64, 64, 3, 3), (56, 56)) == "kernel"
    # late layer: small maps, many channels -> scale the feature maps
    assert choose_order((32, 512, 7, 7), (4, 512, 512, 3, 3), (7, 7)) == "feature"
    # 1x1 with one kernel: sample-independent kernel, one batched convolution
    assert (
        choose_order(
            (32, 64, 56, 56), (1, 64, 64, 1, 1), (56, 56), spatial=False, kernel=False
        )
        == "feature"
    )
    costs = order_costs((2, 8, 10, 10), (1, 4, 8, 3, 3), (8, 8))
    assert costs == {"kernel": 2 * 4 * 8 * 9 * 2, "feature": 2 * 8 * 100 + 2 * 4 * 64}


def test_module_resolves_order_from_shapes():
    layer = ODConv2d(64, 64, 3, padding=1)
    assert layer.resolve_order((32, 64, 56, 56)) == "kernel"
    assert layer.resolve_order((32, 64, 4, 4)) == "feature"
    pointwise = ODConv2d(64, 64, 1, num_kernels=1)
    assert pointwise.resolve_order((2, 64, 56, 56)) == "feature"
    fixed = ODConv2d(64, 64, 3, order="feature")
    assert fixed.resolve_order((32, 64, 56, 56)) == "feature"


def test_from_conv2d_copies_geometry_and_mode():
    conv = nn.Conv2d(
        8, 16, (3, 1), stride=2, padding=(1, 0), dilation=1, groups=2, bias=False
    ).eval()
    layer = ODConv2d.from_conv2d(conv, num_kernels=2)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.groups) == (
        (3, 1),
        (2, 2),
        (1, 0),
        2,
    )
    assert layer.bias is None and not layer.training
    assert layer.weight.shape == (2, 16, 4, 3, 1)
    with pytest.raises(
        TypeError, match="ODConv2d.from_conv2d expected an nn.Conv2d, got Linear"
    ):
        ODConv2d.from_conv2d(nn.Linear(3, 3))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("bias", [False, True])
def test_from_conv2d_preserves_the_function(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(
        8, 16, (3, 1), stride=2, padding=(1, 0), groups=2, bias=bias, dtype=F64
    )
    layer = ODConv2d.from_conv2d(conv, num_kernels=3)
    assert layer.training  # conv's mode, here training: BatchNorm on batch stats
    x = randn(4, 8, 9, 7, seed=27)
    torch.testing.assert_close(layer(x), conv(x), **tolerance(F64))
    torch.testing.assert_close(layer.eval()(x), conv(x), **tolerance(F64))
    # the kernels stay different from one another (they would not learn apart)
    assert not torch.allclose(layer.weight[0], layer.weight[1])
    # padding strings are copied and padded as nn.Conv2d pads them
    same = nn.Conv2d(4, 6, (2, 3), padding="same", dilation=(1, 2), dtype=F64)
    converted = ODConv2d.from_conv2d(same, attention_norm=None)
    assert converted.padding == "same"
    x = randn(2, 4, 7, 8, seed=28)
    torch.testing.assert_close(converted(x), same(x), **tolerance(F64))


def test_from_conv2d_without_preserve_keeps_the_fresh_initialisation():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    torch.manual_seed(5)
    fresh = ODConv2d.from_conv2d(conv, preserve=False, num_kernels=2)
    torch.manual_seed(5)
    built = ODConv2d(8, 16, 3, padding=1, bias=False, num_kernels=2)
    for (name, a), b in zip(fresh.state_dict().items(), built.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.allclose(fresh.weight[0], conv.weight)
    with pytest.raises(TypeError, match="from_conv2d expected preserve to be a bool"):
        ODConv2d.from_conv2d(conv, preserve="no")


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_kernels": 0}, ValueError, "ODConv2d expected num_kernels >= 1, got 0"),
        ({"num_kernels": 2.0}, TypeError, "num_kernels to be an int"),
        ({"reduction": 0.0}, ValueError, "ODConv2d expected reduction > 0"),
        ({"reduction": "1/16"}, TypeError, "reduction to be a real number"),
        ({"min_hidden": 0}, ValueError, "ODConv2d expected min_hidden >= 1"),
        ({"attention_norm": "layer"}, ValueError, "attention_norm 'batch' or None"),
        (
            {"attention_norm": "none"},
            ValueError,
            "ODConv2d expected attention_norm 'batch' or None, got 'none'",
        ),
        ({"order": "input"}, ValueError, "order in"),
        ({"temperature": 0.0}, ValueError, "ODConv2d expected temperature > 0"),
        ({"temperature": "hot"}, TypeError, "temperature to be a real number"),
        ({"padding": "full"}, ValueError, "'same' or 'valid', got 'full'"),
        ({"padding_mode": "mirror"}, ValueError, "padding_mode in"),
        ({"groups": 3}, ValueError, "groups to divide in_channels"),
        ({"bias": None}, TypeError, "bias to be a bool"),
        ({"kernel_size": 0}, ValueError, "kernel_size >= 1"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    args = {"in_channels": 8, "out_channels": 8, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        ODConv2d(**args)


def test_forward_and_setter_errors():
    layer = ODConv2d(8, 8, 3)
    with pytest.raises(ValueError, match="expected input with 8 channels, got 4"):
        layer(torch.randn(2, 4, 5, 5))
    for bad in (torch.randn(8, 5), torch.randn(1, 2, 8, 5, 5)):
        with pytest.raises(
            ValueError,
            match=r"ODConv2d expected input of shape \[N, C_in, H, W\] or "
            rf"\[C_in, H, W\], got {bad.dim()} dimensions",
        ):
            layer(bad)
    with pytest.raises(ValueError, match="expected input with 8 channels, got 2"):
        layer(torch.randn(2, 8, 5))  # unbatched: 2 channels
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 8, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"padded input \(2\) to be at least"):
        layer(torch.randn(2, 8, 2, 5))
    with pytest.raises(ValueError, match="temperature to be finite, got inf"):
        layer.temperature = math.inf
    with pytest.raises(ValueError, match="ODConv2d expected temperature > 0, got -1"):
        layer.temperature = -1
    with pytest.raises(TypeError, match="temperature to be a real number, got bool"):
        layer.temperature = True
    assert layer.temperature == 1.0


@pytest.mark.parametrize("fn", [odconv2d, odconv2d_reference])
def test_functional_errors(fn):
    x, w = randn(2, 4, 5, 5), randn(3, 6, 4, 3, 3)
    name = fn.__name__
    with pytest.raises(TypeError):  # the four attentions are required arguments
        fn(x, w)
    with pytest.raises(
        ValueError,
        match=rf"^{name} expected kernel_attention of shape \(2, 3\) to mix 3 "
        r"kernels, got None",
    ):
        fn(x, None, None, None, None, w)
    k = randn(2, 3).softmax(1)
    with pytest.raises(
        ValueError,
        match=rf"^{name} expected channel_attention of shape \[N, C_in\] = \(2, 4\), "
        r"got \(2, 6\)",
    ):
        fn(x, randn(2, 6), None, None, k, w)
    with pytest.raises(
        ValueError, match=r"filter_attention of shape \[N, C_out\] = \(2, 6\)"
    ):
        fn(x, None, randn(2, 4), None, k, w)
    with pytest.raises(ValueError, match=r"spatial_attention with 3 dimensions, got 2"):
        fn(x, None, None, randn(2, 9), k, w)
    with pytest.raises(
        ValueError,
        match=r"kernel_attention of shape \[N, num_kernels\] = \(2, 3\), got",
    ):
        fn(x, None, None, None, randn(2, 4), w)
    with pytest.raises(ValueError, match=r"bias of shape \[C_out\] = \(6,\)"):
        fn(x, None, None, None, k, w, randn(4))
    with pytest.raises(
        ValueError,
        match=r"expected input with 8 channels \(C_in/groups = 4 in the weight, times "
        r"groups = 2\), got 4",
    ):
        fn(x, None, None, None, k, w, groups=2)
    with pytest.raises(
        ValueError, match=rf"^{name} expected input with 4 dimensions, got 3"
    ):
        fn(x[0], None, None, None, k, w)  # the functional forms take batches only
    if fn is odconv2d:
        with pytest.raises(ValueError, match="order in"):
            fn(x, None, None, None, k, w, order="fast")


# --- algorithms chosen by shape, forced by hand ---------------------------------------


@pytest.mark.parametrize("algorithm", ["auto", "grouped", "unfold", "outputs"])
@pytest.mark.parametrize("order", ["kernel", "feature"])
@pytest.mark.parametrize("num_kernels, spatial", [(3, True), (1, True), (3, False)])
def test_every_algorithm_and_order_equals_the_reference(
    algorithm, order, num_kernels, spatial
):
    n, groups = 4, 2
    x = randn(n, 4, 7, 6, seed=41, requires_grad=True)
    channel = torch.sigmoid(randn(n, 4, seed=42)).requires_grad_()
    filt = torch.sigmoid(randn(n, 6, seed=43)).requires_grad_()
    spat = torch.sigmoid(randn(n, 3, 2, seed=44)).requires_grad_() if spatial else None
    kern = None
    if num_kernels > 1:
        kern = torch.softmax(randn(n, num_kernels, seed=45), 1).requires_grad_()
    weight = randn(num_kernels, 6, 4 // groups, 3, 2, seed=46, requires_grad=True)
    bias = randn(6, seed=47, requires_grad=True)
    args = (x, channel, filt, spat, kern, weight, bias, (2, 1), 1, (1, 2), groups)
    out = odconv2d(*args, order=order, algorithm=algorithm)
    expected = odconv2d_reference(*args)
    torch.testing.assert_close(out, expected, **tolerance(torch.float64))
    inputs = [t for t in (x, channel, filt, spat, kern, weight, bias) if t is not None]
    grad = randn(*out.shape, seed=48)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tolerance(torch.float64))


def test_frugal_backward_equals_kept_kernels_to_round_off(monkeypatch):
    import refimpl.per_sample as per_sample

    monkeypatch.setattr(per_sample, "KERNEL_BUDGET", 100)  # several chunks
    torch.manual_seed(0)
    kw = {"num_kernels": 3, "attention_norm": None, "dtype": torch.float64}
    frugal = ODConv2d(4, 6, 3, padding=1, order="kernel", **kw)
    kept = ODConv2d(4, 6, 3, padding=1, order="kernel", keep_kernels=True, **kw)
    kept.load_state_dict(frugal.state_dict())
    x = randn(5, 4, 6, 5, seed=49)
    grads = []
    for layer in (frugal, kept):
        out = layer(x)
        grads.append(torch.autograd.grad(out.square().sum(), list(layer.parameters())))
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert "keep_kernels=True" in kept.extra_repr()
    assert "keep_kernels" not in frugal.extra_repr()


def test_resolve_algorithm_and_errors():
    layer = ODConv2d(512, 512, 3, padding=1, num_kernels=2, device="meta")
    assert layer.resolve_algorithm((32, 512, 56, 56)) == "grouped"
    assert layer.resolve_algorithm((32, 512, 1, 1)) == "outputs"
    forced = ODConv2d(4, 6, 3, algorithm="unfold")
    assert forced.resolve_algorithm((32, 4, 1, 1)) == "unfold"
    assert "algorithm='unfold'" in forced.extra_repr()
    with pytest.raises(ValueError, match=r"ODConv2d expected algorithm to be one of"):
        ODConv2d(4, 6, 3, algorithm="kernel")
    with pytest.raises(TypeError, match=r"ODConv2d expected keep_kernels to be a bool"):
        ODConv2d(4, 6, 3, keep_kernels=None)
    x = randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"odconv2d expected algorithm to be one of"):
        odconv2d(x, None, None, None, None, randn(1, 6, 4, 3, 3), algorithm="x")


def test_official_temperature_ramp_is_temperature_schedule_one_step_ahead():
    # OSVAI/ODConv (utils/misc.py, main.py): before the 0-based step i of epoch e,
    # tau = 1 + max(0, (30 - 1) (10 M - m) / (10 M)) with m = e M + i + 1, written
    # out here from that formula, not from refimpl.
    from refimpl.dynamic_conv import temperature_schedule

    steps = 7
    total = 10 * steps
    seen = []
    for epoch in range(12):
        for i in range(steps):
            m = epoch * steps + i + 1
            official = 1.0 + max(0.0, 29.0 * (total - m) / total)
            ours = temperature_schedule(epoch + (i + 1) / steps)
            assert math.isclose(ours, official, rel_tol=1e-12), (epoch, i)
            seen.append(official)
    assert 29.0 < seen[0] < 30.0  # the first step already runs below 30
    assert seen[total - 1] == 1.0 and set(seen[total:]) == {1.0}
