"""Tests of CondConv (chapter 2): functional op, expert reference and module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refimpl.condconv import (
    CondConv2d,
    condconv2d,
    condconv2d_reference,
    experts_from_flat,
    experts_to_flat,
    mix_experts,
)

from conftest import randn, tolerance

F64 = tolerance(torch.float64)

# (c_in, c_out, kernel, stride, padding, dilation, groups, size)
GEOMETRIES = [
    (3, 4, 3, 1, 1, 1, 1, (8, 8)),
    (4, 6, (3, 5), (2, 1), (1, 2), 1, 2, (9, 10)),
    (6, 3, (1, 3), 1, 0, (1, 2), 3, (7, 11)),
    (4, 4, 2, 3, (0, 1), 2, 4, (12, 9)),
    (2, 5, (5, 1), (1, 3), 2, (2, 1), 1, (10, 7)),
]


def _module(*geometry, num_kernels=3, bias=True, seed=0, dtype=torch.float64):
    c_in, c_out, kernel, stride, padding, dilation, groups, _ = geometry
    torch.manual_seed(seed)
    return CondConv2d(
        c_in,
        c_out,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        bias,
        num_kernels=num_kernels,
        dtype=dtype,
    )


def _per_sample_mixed_reference(
    x, routing, weight, bias, stride, padding, dilation, groups
):
    """Mixed kernel written out per sample with einsum, then plain F.conv2d."""
    outs = []
    for i in range(x.shape[0]):
        w = torch.einsum("e,eoihw->oihw", routing[i], weight)
        b = None if bias is None else torch.einsum("e,eo->o", routing[i], bias)
        outs.append(F.conv2d(x[i : i + 1], w, b, stride, padding, dilation, groups))
    return torch.cat(outs)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_output_shape_is_conv2d_shape(geometry, device):
    c_in, c_out, kernel, stride, padding, dilation, groups, size = geometry
    m = _module(*geometry).to(device)
    plain = nn.Conv2d(
        c_in,
        c_out,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        dtype=torch.float64,
        device=device,
    )
    x = randn(2, c_in, *size, device=device)
    assert m(x).shape == plain(x).shape
    assert m.weight.shape == (3, *plain.weight.shape)
    assert m.bias.shape == (3, c_out)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_strings_as_conv2d(padding):
    # kernel (2, 4): "same" pads asymmetrically, as nn.Conv2d does
    geometry = (4, 6, (2, 4), 1, padding, 1, 2, (7, 9))
    c_in, c_out, kernel, stride, _, dilation, groups, size = geometry
    torch.manual_seed(4)
    plain = nn.Conv2d(
        c_in, c_out, kernel, stride, padding, dilation, groups, dtype=torch.float64
    )
    m = _module(*geometry, num_kernels=1)
    assert m.padding == plain.padding
    with torch.no_grad():
        m.weight.copy_(plain.weight[None])
        m.bias.copy_(plain.bias[None])
    x = randn(3, c_in, *size, seed=24)
    ones = x.new_ones(3, 1)
    assert m(x).shape == plain(x).shape
    torch.testing.assert_close(m(x, ones), plain(x), **F64)


def test_unbatched_input_is_a_batch_of_one():
    m = _module(*GEOMETRIES[1])
    x = randn(4, 9, 10, seed=25)
    out = m(x)
    assert out.shape == (6, 5, 10)
    torch.testing.assert_close(out, m(x[None])[0], **F64)
    (routing,) = m.dynamic_tensors(x)
    torch.testing.assert_close(routing, m.dynamic_tensors(x[None]).routing, **F64)
    r = torch.rand(3, dtype=torch.float64)
    torch.testing.assert_close(m(x, r), m(x[None], r[None])[0], **F64)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_mix_then_convolve_equals_mixture_of_expert_outputs(geometry, bias, device):
    c_in, _c_out, _kernel, _stride, _padding, _dilation, _groups, size = geometry
    m = _module(*geometry, bias=bias).to(device)
    x = randn(4, c_in, *size, seed=1, device=device)
    # Any real routing, negative entries included: linearity needs no sigmoid.
    routing = randn(4, 3, seed=2, device=device)
    args = (m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    fast = condconv2d(x, routing, *args)
    experts = condconv2d_reference(x, routing, *args)
    mixed = _per_sample_mixed_reference(x, routing, *args)
    torch.testing.assert_close(fast, experts, **F64)
    torch.testing.assert_close(fast, mixed, **F64)
    torch.testing.assert_close(m(x, routing), fast, **F64)


def test_module_uses_its_routing_function():
    m = _module(*GEOMETRIES[1])
    x = randn(3, 4, 9, 10, seed=1)
    # The paper's r(x) = sigmoid(GAP(x) R + c), written out independently.
    pooled = x.sum(dim=(2, 3)) / (9 * 10)
    expected = torch.sigmoid(pooled @ m.routing_fc.weight.T + m.routing_fc.bias)
    torch.testing.assert_close(m.dynamic_tensors(x).routing, expected, **F64)
    torch.testing.assert_close(
        m(x),
        condconv2d_reference(
            x, expected, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups
        ),
        **F64,
    )


def test_routing_is_sigmoid_not_softmax():
    m = _module(4, 6, 3, 1, 1, 1, 1, None, num_kernels=8)
    with torch.no_grad():
        m.routing_fc.weight.normal_(0, 3.0)
        m.routing_fc.bias.normal_(0, 3.0)
    r = m.dynamic_tensors(randn(16, 4, 5, 5, seed=4)).routing
    assert r.shape == (16, 8)
    assert bool(((r > 0) & (r < 1)).all())
    # Independent sigmoids: the rows do not sum to one.
    assert not torch.allclose(r.sum(dim=1), torch.ones(16, dtype=r.dtype))


def test_one_expert_with_routing_one_is_conv2d():
    c_in, c_out, kernel, stride, padding, dilation, groups, size = GEOMETRIES[1]
    torch.manual_seed(3)
    plain = nn.Conv2d(
        c_in, c_out, kernel, stride, padding, dilation, groups, dtype=torch.float64
    )
    m = _module(*GEOMETRIES[1], num_kernels=1)
    with torch.no_grad():
        m.weight.copy_(plain.weight[None])
        m.bias.copy_(plain.bias[None])
    x = randn(5, c_in, *size, seed=5)
    ones = x.new_ones(5, 1)
    torch.testing.assert_close(m(x, ones), plain(x), **F64)
    # A routing weight a scales the kernel and the bias: a * conv(x).
    torch.testing.assert_close(m(x, 0.25 * ones), 0.25 * plain(x), **F64)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_uniform_routing_is_scaled_mean_kernel(alpha):
    geometry = GEOMETRIES[0]
    m = _module(*geometry, num_kernels=8)
    x = randn(3, 3, 8, 8, seed=6)
    routing = x.new_full((3, 8), alpha)
    # sum_e alpha W_e = n * alpha * mean_e W_e: the sigmoid routing is not convex.
    scale = 8 * alpha
    expected = F.conv2d(x, scale * m.weight.mean(0), scale * m.bias.mean(0), 1, 1)
    torch.testing.assert_close(m(x, routing), expected, **F64)


def test_external_routing_is_used_and_shared():
    torch.manual_seed(0)
    a = CondConv2d(4, 8, 3, padding=1, num_kernels=4, dtype=torch.float64)
    b = CondConv2d(8, 4, 1, num_kernels=4, dtype=torch.float64)
    x = randn(2, 4, 6, 6, seed=7)
    # one routing vector per block, as the official code
    (shared,) = a.dynamic_tensors(x)
    y = b(a(x, shared), shared)
    inner = condconv2d_reference(x, shared, a.weight, a.bias, 1, 1)
    expected = condconv2d_reference(inner, shared, b.weight, b.bias)
    torch.testing.assert_close(y, expected, **F64)
    other = torch.rand(2, 4, dtype=torch.float64)
    assert not torch.allclose(a(x, other), a(x))
    torch.testing.assert_close(
        a(x, other), condconv2d(x, other, a.weight, a.bias, 1, 1), **F64
    )


def test_mix_experts_is_weighted_sum():
    w = randn(3, 4, 2, 3, 3, seed=8)
    b = randn(3, 4, seed=9)
    r = randn(5, 3, seed=10)
    kernel, bias = mix_experts(r, w, b)
    assert kernel.shape == (5, 4, 2, 3, 3) and bias.shape == (5, 4)
    for i in range(5):
        torch.testing.assert_close(
            kernel[i], sum(r[i, e] * w[e] for e in range(3)), **F64
        )
        torch.testing.assert_close(
            bias[i], sum(r[i, e] * b[e] for e in range(3)), **F64
        )
    assert mix_experts(r, w)[1] is None


@torch.no_grad()
def test_initialisation_like_conv2d():
    m = CondConv2d(16, 32, (3, 5), groups=2, num_kernels=8)
    fan_in = 8 * 3 * 5
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and nn.Conv2d's bias
    assert float(m.weight.abs().max()) <= bound
    assert float(m.bias.abs().max()) <= bound
    for expert in m.weight:
        # uniform(-bound, bound) has std bound / sqrt(3)
        assert abs(float(expert.std()) - bound / math.sqrt(3)) < 0.1 * bound
    assert not torch.allclose(m.weight[0], m.weight[1])
    # the official dense routing layer: Glorot-uniform weight, zero bias
    assert float(m.routing_fc.weight.abs().max()) <= math.sqrt(6 / (16 + 8))
    assert bool((m.routing_fc.bias == 0).all())


def test_gradcheck_functional(one_thread):
    x = randn(2, 4, 4, 5, seed=11, requires_grad=True)
    r = randn(2, 2, seed=12, requires_grad=True)
    w = randn(2, 2, 2, 2, 3, seed=13, requires_grad=True)
    b = randn(2, 2, seed=14, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: condconv2d(x, r, w, b, (2, 1), 1, (1, 2), 2), (x, r, w, b)
    )


def test_gradcheck_module(one_thread):
    # The routing path (GAP, Linear, sigmoid) is differentiated here too.
    m = _module(2, 2, 2, 1, 1, 1, 1, None, num_kernels=2)
    x = randn(2, 2, 3, 3, seed=15, requires_grad=True)
    params = list(m.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(
            m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,)
        )

    assert torch.autograd.gradcheck(
        fn, (x, *[p.detach().requires_grad_() for p in params])
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_independence(mode):
    m = _module(*GEOMETRIES[1], num_kernels=4)
    getattr(m, mode)()
    x = randn(6, 4, 9, 10, seed=16)
    together = m(x)
    for i in range(6):
        torch.testing.assert_close(together[i : i + 1], m(x[i : i + 1]), **F64)
    m.train(mode == "eval")  # flipping the mode changes nothing: no BN, no dropout
    torch.testing.assert_close(m(x), together, rtol=0, atol=0)


@pytest.mark.parametrize("n", [0, 1, 33])
def test_batch_sizes(n, device):
    m = _module(*GEOMETRIES[1]).to(device)
    x = randn(n, 4, 9, 10, seed=17, device=device, requires_grad=True)
    out = m(x)
    assert out.shape == (n, 6, 5, 10)
    if n:
        (routing,) = m.dynamic_tensors(x)
        ref = _per_sample_mixed_reference(
            x, routing, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups
        )
        torch.testing.assert_close(out, ref, **F64)
    out.sum().backward()
    assert m.weight.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_channels_last_and_non_contiguous(layout, device):
    m = _module(*GEOMETRIES[1]).to(device)
    x = randn(3, 4, 9, 10, seed=18, device=device)
    if layout == "channels_last":
        xi = x.contiguous(memory_format=torch.channels_last)
    else:
        xi = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xi.is_contiguous()
    torch.testing.assert_close(m(xi), m(x), **F64)


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    m = CondConv2d(8, 8, 3, padding=1, num_kernels=4)
    x = randn(4, 8, 10, 10, seed=19, dtype=torch.float32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        routing = m.dynamic_tensors(x).routing
        shared = m(x, routing)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(shared, out, rtol=0, atol=0)


def test_float32_matches_float64():
    m = _module(*GEOMETRIES[0])
    x = randn(3, 3, 8, 8, seed=20)
    ref = m(x)
    out = m.float()(x.float())
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))


def test_state_dict_round_trip(tmp_path):
    a = _module(*GEOMETRIES[2], seed=1)
    b = _module(*GEOMETRIES[2], seed=2)
    x = randn(2, 6, 7, 11, seed=21)
    assert not torch.allclose(a(x), b(x))
    assert set(a.state_dict()) == {
        "weight",
        "bias",
        "routing_fc.weight",
        "routing_fc.bias",
    }
    torch.save(a.state_dict(), tmp_path / "cc.pt")
    b.load_state_dict(torch.load(tmp_path / "cc.pt"))
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_factory_kwargs_and_to():
    m = CondConv2d(4, 4, 3, bias=False, num_kernels=2, dtype=torch.float64)
    assert m.bias is None
    assert all(p.dtype == torch.float64 for p in m.parameters())
    m = m.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m(torch.zeros(1, 4, 5, 5)).shape == (1, 4, 3, 3)
    assert "num_kernels=2" in repr(m) and "bias=False" in repr(m)


def test_flat_layouts():
    m = _module(*GEOMETRIES[1], num_kernels=3)
    flat = experts_to_flat(m.weight)
    assert flat.shape == (3, 6 * 2 * 3 * 5)
    torch.testing.assert_close(
        experts_from_flat(flat, 6, 2, (3, 5)), m.weight, rtol=0, atol=0
    )
    # timm's forward: matmul with the flat matrix, then view as per-sample kernels
    r = randn(4, 3, seed=22)
    timm_kernels = (r @ flat).view(4, 6, 2, 3, 5)
    torch.testing.assert_close(timm_kernels, mix_experts(r, m.weight)[0], **F64)

    dense = _module(3, 4, (2, 3), 1, 0, 1, 1, None, num_kernels=2)
    tf = experts_to_flat(dense.weight, "tf")
    # TensorFlow stores each expert as kernel[kh, kw, c_in, c_out]
    tf5 = tf.reshape(2, 2, 3, 3, 4)
    for e, i, j, c, o in [(0, 0, 0, 0, 0), (1, 1, 2, 2, 3), (1, 0, 1, 2, 1)]:
        assert tf5[e, i, j, c, o] == dense.weight[e, o, c, i, j]
    back = experts_from_flat(tf, 4, 3, (2, 3), layout="tf")
    torch.testing.assert_close(back, dense.weight, rtol=0, atol=0)


def test_flops_are_one_convolution_plus_mixing():
    from torch.utils.flop_counter import FlopCounterMode

    n, c_in, c_out, k, e, size = 4, 8, 16, 3, 8, 12
    torch.manual_seed(0)
    m = CondConv2d(c_in, c_out, k, padding=1, num_kernels=e)
    x = torch.zeros(n, c_in, size, size)

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    conv = count(lambda: F.conv2d(x, m.weight[0], m.bias[0], padding=1))
    assert conv == 2 * n * c_out * size * size * c_in * k * k
    mixing = 2 * n * e * (c_out * c_in * k * k + c_out)  # kernel and bias matmuls
    routing = 2 * n * c_in * e
    assert count(lambda: m(x)) == conv + mixing + routing
    experts = count(
        lambda: condconv2d_reference(
            x, m.dynamic_tensors(x).routing, m.weight, m.bias, padding=1
        )
    )
    assert experts == e * conv + routing


def test_torch_compile_eager_backend():
    # Dynamo tracing (graph capture) is what user code can break; the inductor
    # backend only adds code generation, too slow for a unit test on a small CPU.
    torch._dynamo.reset()
    m = _module(*GEOMETRIES[1], dtype=torch.float32)
    x = randn(3, 4, 9, 10, seed=23, dtype=torch.float32)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), **tolerance(torch.float32))
    r = torch.rand(3, 3)
    torch.testing.assert_close(compiled(x, r), m(x, r), **tolerance(torch.float32))


# --- errors -----------------------------------------------------------------------

CONSTRUCTOR_ERRORS = [
    ({"in_channels": 0}, ValueError, r"CondConv2d expected in_channels >= 1, got 0"),
    (
        {"out_channels": 2.0},
        TypeError,
        r"CondConv2d expected out_channels to be an int",
    ),
    ({"kernel_size": (3,)}, TypeError, r"expected kernel_size to be an int or a pair"),
    ({"stride": 0}, ValueError, r"expected stride >= 1, got 0"),
    ({"padding": -1}, ValueError, r"expected padding >= 0, got -1"),
    (
        {"padding": "full"},
        ValueError,
        r"CondConv2d expected padding to be an int, a pair of ints, 'same' or "
        r"'valid', got 'full'",
    ),
    (
        {"padding": "same", "stride": 2},
        ValueError,
        r"CondConv2d expected stride 1 with padding='same'",
    ),
    ({"dilation": (0, 1)}, ValueError, r"expected dilation >= 1"),
    ({"groups": 3}, ValueError, r"expected groups to divide in_channels"),
    (
        {"groups": 2, "out_channels": 3},
        ValueError,
        r"expected groups to divide out_channels",
    ),
    ({"num_kernels": 0}, ValueError, r"CondConv2d expected num_kernels >= 1, got 0"),
    ({"num_kernels": None}, TypeError, r"expected num_kernels to be an int"),
    (
        {"bias": "yes"},
        TypeError,
        r"CondConv2d expected bias to be a bool, got str 'yes'",
    ),
    (
        {"padding_mode": "mirror"},
        ValueError,
        r"CondConv2d expected padding_mode in \('zeros', 'reflect', 'replicate', "
        r"'circular'\), got 'mirror'",
    ),
]


@pytest.mark.parametrize("override, error, match", CONSTRUCTOR_ERRORS)
def test_constructor_errors(override, error, match):
    kwargs = {"in_channels": 4, "out_channels": 6, "kernel_size": 3}
    kwargs.update(override)
    with pytest.raises(error, match=match):
        CondConv2d(**kwargs)


def test_forward_errors():
    m = CondConv2d(4, 6, 3, num_kernels=3)
    x = torch.zeros(2, 4, 5, 5)
    with pytest.raises(
        TypeError, match=r"CondConv2d expected input to be a torch\.Tensor"
    ):
        m([1.0])
    for bad in (torch.zeros(4, 5), torch.zeros(1, 2, 4, 5, 5)):
        with pytest.raises(
            ValueError,
            match=r"CondConv2d expected input of shape \[N, C_in, H, W\] or "
            rf"\[C_in, H, W\], got {bad.dim()} dimensions",
        ):
            m(bad)
    with pytest.raises(
        ValueError, match=r"CondConv2d expected input with 4 channels, got 3"
    ):
        m(torch.zeros(2, 3, 5, 5))
    with pytest.raises(TypeError, match=r"expected input with a floating-point dtype"):
        m(torch.zeros(2, 4, 5, 5, dtype=torch.int32))
    with pytest.raises(
        TypeError,
        match=r"expected input of dtype torch\.float32 \(the "
        r"dtype of its parameters\), got torch\.float64",
    ):
        m(x.double())
    with pytest.raises(
        ValueError,
        match=r"expected routing of shape \[N, num_kernels\] "
        r"= \(2, 3\), got \(2, 4\)",
    ):
        m(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"= \(2, 3\), got \(3, 3\)"):
        m(x, torch.zeros(3, 3))
    # a 1-D routing belongs to an unbatched input only
    with pytest.raises(ValueError, match=r"expected routing with 2 dimensions, got 1"):
        m(x, torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"routing of shape \[num_kernels\] = \(3,\), got \(4,\)"
    ):
        m(x[0], torch.zeros(4))
    with pytest.raises(TypeError, match=r"expected routing to be a torch\.Tensor"):
        m(x, [[0.5, 0.5, 0.5]] * 2)
    with pytest.raises(
        TypeError, match=r"expected routing with a floating-point dtype"
    ):
        m(x, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"padded input \(3\) to be at least the dilated "
        r"kernel size \(5\)",
    ):
        CondConv2d(4, 6, 3, dilation=2, num_kernels=3)(torch.zeros(1, 4, 3, 3))


FUNCTIONAL_ERRORS = [
    ({"x": torch.zeros(2, 4, 5)}, ValueError, r"expected input with 4 dimensions"),
    (
        {"routing": torch.zeros(2, 3, 1)},
        ValueError,
        r"expected routing with 2 dimensions",
    ),
    (
        {"routing": torch.zeros(2, 4)},
        ValueError,
        r"expected routing of shape \[N, num_kernels\] = \(2, 3\), got \(2, 4\)",
    ),
    (
        {"weight": torch.zeros(3, 6, 4, 3)},
        ValueError,
        r"expected weight with 5 dimensions",
    ),
    (
        {"weight": torch.zeros(3, 6, 2, 3, 3)},
        ValueError,
        r"expected input with 2 channels \(C_in/groups = 2 in the weight, times "
        r"groups = 1\), got 4",
    ),
    (
        {"bias": torch.zeros(3, 5)},
        ValueError,
        r"expected bias of shape \[num_kernels, C_out\] = \(3, 6\), got \(3, 5\)",
    ),
    ({"bias": torch.zeros(6)}, ValueError, r"expected bias with 2 dimensions"),
    (
        {"routing": torch.zeros(2, 3, dtype=torch.float64)},
        TypeError,
        (
            r"expected routing with the dtype of the input \(torch\.float32\), "
            r"got torch\.float64"
        ),
    ),
    (
        {"weight": torch.zeros(3, 6, 4, 3, 3, dtype=torch.float64)},
        TypeError,
        r"expected weight with the dtype of the input",
    ),
    ({"groups": 0}, ValueError, r"expected groups >= 1, got 0"),
    ({"groups": 3}, ValueError, r"expected input with 12 channels"),
    ({"stride": 0}, ValueError, r"expected stride >= 1"),
]


@pytest.mark.parametrize("fn", [condconv2d, condconv2d_reference])
@pytest.mark.parametrize("override, error, match", FUNCTIONAL_ERRORS)
def test_functional_errors(fn, override, error, match):
    args = {
        "x": torch.zeros(2, 4, 5, 5),
        "routing": torch.zeros(2, 3),
        "weight": torch.zeros(3, 6, 4, 3, 3),
        "bias": torch.zeros(3, 6),
        "stride": 1,
        "groups": 1,
    }
    args.update(override)
    with pytest.raises(error, match=rf"^{fn.__name__} {match}"):
        fn(
            args["x"],
            args["routing"],
            args["weight"],
            args["bias"],
            stride=args["stride"],
            groups=args["groups"],
        )


def test_layout_errors():
    w = torch.zeros(2, 4, 3, 3, 3)
    with pytest.raises(
        ValueError,
        match=r"experts_to_flat expected layout in "
        r"\('timm', 'tf'\), got 'keras'",
    ):
        experts_to_flat(w, "keras")
    with pytest.raises(ValueError, match=r"experts_to_flat expected weight with 5 "):
        experts_to_flat(w[0])
    with pytest.raises(
        ValueError,
        match=r"experts_from_flat expected flat\.shape\[1\] "
        r"== out_channels \* in_channels_per_group \* kH \* kW = 108, "
        r"got 100",
    ):
        experts_from_flat(torch.zeros(2, 100), 4, 3, 3)
    with pytest.raises(ValueError, match=r"experts_from_flat expected flat with 2 dim"):
        experts_from_flat(w, 4, 3, 3)
    with pytest.raises(ValueError, match=r"experts_from_flat expected layout in"):
        experts_from_flat(torch.zeros(2, 108), 4, 3, 3, layout="pt")


# --- algorithms chosen by shape, forced by hand ---------------------------------------


@pytest.mark.parametrize("algorithm", ["auto", "grouped", "unfold", "outputs"])
@pytest.mark.parametrize("keep_kernels", [False, True])
def test_every_algorithm_equals_the_mixture_of_experts(algorithm, keep_kernels):
    x = randn(5, 4, 7, 6, seed=21, requires_grad=True)
    routing = torch.sigmoid(randn(5, 3, seed=22)).requires_grad_()
    weight = randn(3, 6, 2, 3, 2, seed=23, requires_grad=True)
    bias = randn(3, 6, seed=24, requires_grad=True)
    args = (x, routing, weight, bias, (2, 1), 1, (1, 2), 2)
    out = condconv2d(*args, algorithm=algorithm, keep_kernels=keep_kernels)
    expected = condconv2d_reference(*args)
    torch.testing.assert_close(out, expected, **tolerance(torch.float64))
    grad = randn(*out.shape, seed=25)
    inputs = (x, routing, weight, bias)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tolerance(torch.float64))


@pytest.mark.parametrize("algorithm", ["grouped", "unfold", "outputs"])
def test_layer_algorithms_agree_and_show_in_extra_repr(algorithm):
    torch.manual_seed(0)
    auto = CondConv2d(4, 6, 3, padding=1, num_kernels=3, dtype=torch.float64)
    forced = CondConv2d(
        4, 6, 3, padding=1, num_kernels=3, algorithm=algorithm, dtype=torch.float64
    )
    forced.load_state_dict(auto.state_dict())
    x = randn(3, 4, 6, 5, seed=26)
    torch.testing.assert_close(forced(x), auto(x), **tolerance(torch.float64))
    assert f"algorithm={algorithm!r}" in forced.extra_repr()
    assert "algorithm" not in auto.extra_repr()
    kept = CondConv2d(4, 6, 3, keep_kernels=True)
    assert "keep_kernels=True" in kept.extra_repr()


def test_algorithm_and_keep_kernels_errors():
    with pytest.raises(ValueError, match=r"CondConv2d expected algorithm to be one of"):
        CondConv2d(4, 6, 3, algorithm="fft")
    with pytest.raises(TypeError, match=r"CondConv2d expected algorithm to be a str"):
        CondConv2d(4, 6, 3, algorithm=None)
    with pytest.raises(TypeError, match=r"CondConv2d expected keep_kernels to be a"):
        CondConv2d(4, 6, 3, keep_kernels="yes")
    x, routing = randn(2, 4, 5, 5), randn(2, 3)
    weight = randn(3, 6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"condconv2d expected algorithm to be one"):
        condconv2d(x, routing, weight, algorithm="loop")


def test_auto_follows_the_cost_model():
    layer = CondConv2d(512, 512, 3, padding=1, num_kernels=2, device="meta")
    from refimpl.condconv import bank_algorithm

    assert (
        bank_algorithm((32, 512, 56, 56), layer.weight.shape, (1, 1), (1, 1), (1, 1))
        == "grouped"
    )
    assert (
        bank_algorithm((32, 512, 1, 1), layer.weight.shape, (1, 1), (1, 1), (1, 1))
        == "outputs"
    )
    # the choice is the same for every batch size (a compiled batch stays dynamic)
    for n in (1, 7, 64):
        assert (
            bank_algorithm((n, 512, 1, 1), layer.weight.shape, (1, 1), (1, 1), (1, 1))
            == "outputs"
        )


def test_bn_and_activation_after_the_mixture_keep_the_equivalence():
    # conv -> BN -> ReLU on the mixed kernel equals BN -> ReLU on the mixed expert
    # outputs; a ReLU inside each expert, before the mixing, is another function.
    m = _module(*GEOMETRIES[0], num_kernels=4)
    bn = nn.BatchNorm2d(4, dtype=torch.float64)  # training mode: batch statistics
    x = randn(5, 3, 8, 8, seed=3)
    alpha = m.dynamic_tensors(x).routing
    experts = torch.stack(
        [F.conv2d(x, m.weight[i], m.bias[i], padding=1) for i in range(4)], dim=1
    )
    mixed_outputs = torch.einsum("ne,neohw->nohw", alpha, experts)
    torch.testing.assert_close(
        F.relu(bn(m(x))), F.relu(bn(mixed_outputs)), **F64
    )  # fmt: skip
    inside = torch.einsum("ne,neohw->nohw", alpha, F.relu(experts))
    gap = (inside - F.relu(m(x))).norm() / F.relu(m(x)).norm()
    assert gap > 0.1


def _least_squares_residual(x, y, kernel_size, padding):
    """Relative residual of the best static kernel and bias mapping x to y."""
    columns = F.unfold(x, kernel_size, padding=padding)
    a = columns.transpose(1, 2).reshape(-1, columns.shape[1])
    a = torch.cat([a, a.new_ones(len(a), 1)], dim=1)
    target = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    fit = torch.linalg.lstsq(a, target).solution
    return float((a @ fit - target).norm() / target.norm())


def test_one_kernel_per_sample_but_no_static_kernel_for_a_routed_batch():
    m = _module(4, 6, 3, 1, 1, 1, 1, (9, 9), num_kernels=3)
    x = randn(8, 4, 9, 9, seed=4) + 2 * randn(8, 4, 1, 1, seed=5)
    with torch.no_grad():
        y = m(x)
    # each sample alone is exactly a convolution (with its mixed kernel) ...
    for j in range(8):
        assert _least_squares_residual(x[j : j + 1], y[j : j + 1], 3, 1) < 1e-10
    # ... a constant routing makes the whole batch one static convolution ...
    with torch.no_grad():
        frozen = m(x, torch.full((8, 3), 0.5, dtype=torch.float64))
    assert _least_squares_residual(x, frozen, 3, 1) < 1e-10
    # ... but with each sample routed differently, no static kernel fits the batch
    assert _least_squares_residual(x, y, 3, 1) > 0.05
