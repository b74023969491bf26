"""Tests for refimpl.dynamic_conv: DynamicConv2d, its functional forms and schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refimpl
from refimpl._conv import hidden_width
from refimpl.dynamic_conv import (
    DynamicConv2d,
    dynamic_conv2d,
    dynamic_conv2d_reference,
    kernel_attention,
    set_temperature,
    temperature_schedule,
)

from conftest import randn, tolerance

# (in, out, kernel, stride, padding, dilation, groups, input H x W)
CONFIGS = [
    (4, 6, 3, 1, 1, 1, 1, (7, 7)),
    (4, 6, (3, 5), 2, (1, 2), 1, 2, (9, 8)),
    (6, 4, (1, 3), (1, 2), 0, (1, 2), 2, (5, 11)),
    (6, 6, 3, 1, 2, 2, 6, (8, 6)),
    (3, 5, 2, 2, 0, 1, 1, (6, 7)),
]


def _module(cfg, *, seed=0, dtype=torch.float64, device="cpu", **kwargs):
    c_in, c_out, k, s, p, d, g, _ = cfg
    torch.manual_seed(seed)
    return DynamicConv2d(c_in, c_out, k, s, p, d, g, dtype=dtype, **kwargs).to(device)


def _input(cfg, n=3, *, seed=1, dtype=torch.float64, device="cpu"):
    c_in, *_, (h, w) = cfg
    return randn(n, c_in, h, w, seed=seed, dtype=dtype, device=device)


def _randomise_attention(module, seed=2):
    # fc2.bias starts at zero and tau at 30 (near-uniform attention); larger
    # logits and tau=1 make the attention really input dependent in the tests.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (module.fc1.weight, module.fc2.weight, module.fc2.bias):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 2)
    module.temperature = 1.0
    return module


def _logits(module, x):
    # independent of kernel_attention: written out with explicit matrix products
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    hidden = torch.clamp(pooled @ module.fc1.weight.T, min=0)
    return hidden @ module.fc2.weight.T + module.fc2.bias


# --- shapes and agreement -----------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS)
def test_output_shape_matches_conv2d(cfg, device):
    c_in, c_out, k, s, p, d, g, _ = cfg
    x = _input(cfg, device=device)
    plain = nn.Conv2d(c_in, c_out, k, s, p, d, g, dtype=torch.float64).to(device)
    assert _module(cfg, device=device)(x).shape == plain(x).shape


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_vectorised_equals_literal_reference_float64(cfg, bias, device):
    m = _randomise_attention(_module(cfg, bias=bias, device=device))
    x = _input(cfg, device=device)
    attention = m.dynamic_tensors(x).attention
    # the attention really varies across samples, or the test would prove little
    assert (attention.max(0).values - attention.min(0).values).max() > 0.05
    expected = dynamic_conv2d_reference(
        x, attention, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups
    )
    torch.testing.assert_close(m(x), expected, **tolerance(torch.float64))


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_module_equals_per_sample_loop_with_hand_aggregated_kernels(cfg):
    m = _randomise_attention(_module(cfg))
    x = _input(cfg)
    pi = torch.softmax(_logits(m, x), dim=1)
    outputs = []
    for i in range(x.shape[0]):
        kernel = sum(pi[i, k] * m.weight[k] for k in range(m.num_kernels))
        bias = sum(pi[i, k] * m.bias[k] for k in range(m.num_kernels))
        outputs.append(
            F.conv2d(
                x[i : i + 1], kernel, bias, m.stride, m.padding, m.dilation, m.groups
            )
        )
    torch.testing.assert_close(m(x), torch.cat(outputs), **tolerance(torch.float64))


def test_functional_accepts_arbitrary_real_attention():
    cfg = CONFIGS[1]
    m = _module(cfg)
    x = _input(cfg)
    attention = randn(x.shape[0], m.num_kernels, seed=5)  # signed, not normalised
    args = (x, attention, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    torch.testing.assert_close(
        dynamic_conv2d(*args),
        dynamic_conv2d_reference(*args),
        **tolerance(torch.float64),
    )


# --- identities ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS)
def test_one_kernel_is_a_plain_convolution(cfg, device):
    c_in, c_out, k, s, p, d, g, _ = cfg
    m = _randomise_attention(_module(cfg, num_kernels=1, device=device))
    x = _input(cfg, device=device)
    assert torch.equal(
        m.dynamic_tensors(x).attention,
        torch.ones(x.shape[0], 1, dtype=x.dtype, device=device),
    )
    plain = nn.Conv2d(c_in, c_out, k, s, p, d, g, dtype=torch.float64).to(device)
    with torch.no_grad():
        plain.weight.copy_(m.weight[0])
        plain.bias.copy_(m.bias[0])
    torch.testing.assert_close(m(x), plain(x), **tolerance(torch.float64))


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_uniform_attention_gives_the_mean_kernel(cfg):
    m = _module(cfg, temperature=1.0)
    with torch.no_grad():
        m.fc2.weight.zero_()
        m.fc2.bias.zero_()
    x = _input(cfg)
    k = m.num_kernels
    torch.testing.assert_close(
        m.dynamic_tensors(x).attention,
        torch.full((x.shape[0], k), 1 / k, dtype=x.dtype),
    )
    mean_w = sum(m.weight[i] for i in range(k)) / k
    mean_b = sum(m.bias[i] for i in range(k)) / k
    expected = F.conv2d(x, mean_w, mean_b, m.stride, m.padding, m.dilation, m.groups)
    torch.testing.assert_close(m(x), expected, **tolerance(torch.float64))


# --- attention and temperature ------------------------------------------------------


def test_attention_is_softmax_of_logits_over_temperature():
    cfg = CONFIGS[0]
    m = _randomise_attention(_module(cfg))
    x = _input(cfg, n=5)
    for tau in (0.5, 1.0, 7.0):
        m.temperature = tau
        z = _logits(m, x) / tau
        expected = torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True)
        torch.testing.assert_close(
            m.dynamic_tensors(x).attention, expected, **tolerance(torch.float64)
        )


def test_attention_on_the_simplex_and_limits_of_temperature():
    cfg = CONFIGS[0]
    m = _randomise_attention(_module(cfg))
    x = _input(cfg, n=6)
    k = m.num_kernels
    entropies = []
    for tau in (1e-4, 0.3, 1.0, 3.0, 30.0, 1e6):
        m.temperature = tau
        pi = m.dynamic_tensors(x).attention
        assert (pi >= 0).all()
        torch.testing.assert_close(pi.sum(dim=1), torch.ones(6, dtype=pi.dtype))
        entropies.append(-(pi * pi.clamp_min(1e-300).log()).sum(dim=1))
    # entropy never decreases as tau grows
    for lower, higher in zip(entropies, entropies[1:]):
        assert (higher >= lower - 1e-12).all()
    # tau -> infinity: uniform; tau -> 0: one-hot at the largest logit
    m.temperature = 1e6
    assert (m.dynamic_tensors(x).attention - 1 / k).abs().max() < 1e-5
    m.temperature = 1e-4
    one_hot = F.one_hot(_logits(m, x).argmax(dim=1), k).to(x.dtype)
    torch.testing.assert_close(
        m.dynamic_tensors(x).attention, one_hot, atol=1e-8, rtol=0
    )
    torch.testing.assert_close(
        entropies[-1], torch.full((6,), math.log(k), dtype=x.dtype)
    )


def test_default_attention_is_near_uniform_at_initialisation():
    torch.manual_seed(0)
    m = DynamicConv2d(16, 16, 3, padding=1)
    assert m.temperature == 30.0
    assert torch.equal(m.fc2.bias, torch.zeros(4))
    pi = m.dynamic_tensors(torch.randn(8, 16, 6, 6)).attention
    assert (pi - 0.25).abs().max() < 0.01


@pytest.mark.parametrize("value", [2, 0.01, 30.0, 1e9])
def test_temperature_setter_accepts_positive_reals(value):
    m = DynamicConv2d(4, 4, 3)
    m.temperature = value
    assert isinstance(m.temperature, float) and m.temperature == float(value)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (
            "3",
            TypeError,
            "DynamicConv2d expected temperature to be a real number, got str '3'",
        ),
        (True, TypeError, "expected temperature to be a real number, got bool True"),
        (torch.tensor(2.0), TypeError, "a real number, got Tensor"),
        (None, TypeError, "a real number, got NoneType None"),
        (
            0.0,
            ValueError,
            r"DynamicConv2d expected temperature > 0, got 0.0",
        ),
        (-1, ValueError, r"expected temperature > 0, got -1"),
        (math.nan, ValueError, r"expected temperature to be finite, got nan"),
        (math.inf, ValueError, r"expected temperature to be finite, got inf"),
    ],
)
def test_temperature_setter_rejects(value, error, message):
    m = DynamicConv2d(4, 4, 3)
    with pytest.raises(error, match=message):
        m.temperature = value
    assert m.temperature == 30.0
    with pytest.raises(error, match=message.replace("DynamicConv2d", "")):
        DynamicConv2d(4, 4, 3, temperature=value)


# --- schedule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, 30.0),  # start
        (5, 15.5),  # midpoint: (30 + 1) / 2
        (2.5, 22.75),  # a quarter of the way: 30 - 29 / 4
        (10, 1.0),  # end of the ramp
        (10.5, 1.0),  # after it
        (250, 1.0),
    ],
)
def test_schedule_defaults(epoch, expected):
    assert temperature_schedule(epoch) == pytest.approx(expected, abs=1e-12)


def test_schedule_custom_ramp_and_no_annealing():
    assert temperature_schedule(1.0, start=9.0, end=3.0, anneal_epochs=4) == 7.5
    assert temperature_schedule(3.0, start=2.0, end=6.0, anneal_epochs=4) == 5.0
    assert temperature_schedule(0, anneal_epochs=0) == 1.0
    assert temperature_schedule(0, end=0.5, anneal_epochs=0) == 0.5


def test_schedule_per_iteration_matches_odconv_formula():
    # ODConv (OSVAI/ODConv, utils/misc.py) before iteration i of epoch e uses
    # 1 + max(0, (T0 - 1) * (total - current) / total) with current = i + 1 + e * n
    iters, total_epochs = 7, 10
    total = iters * total_epochs
    for e in range(12):
        for i in range(iters):
            current = i + 1 + e * iters
            odconv = 1.0 + max(0.0, 29.0 * (total - current) / total)
            ours = temperature_schedule(e + (i + 1) / iters)
            assert ours == pytest.approx(odconv, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"epoch": -0.5},
            ValueError,
            r"temperature_schedule expected epoch >= 0, got -0.5",
        ),
        ({"epoch": math.nan}, ValueError, "expected epoch to be finite, got nan"),
        (
            {"epoch": "1"},
            TypeError,
            "expected epoch to be a real number, got str",
        ),
        (
            {"epoch": 1, "start": 0},
            ValueError,
            r"expected start > 0, got 0",
        ),
        (
            {"epoch": 1, "end": -1.0},
            ValueError,
            r"expected end > 0, got -1.0",
        ),
        ({"epoch": 1, "end": None}, TypeError, "expected end to be a real number"),
        ({"epoch": 1, "anneal_epochs": -1}, ValueError, r"expected anneal_epochs >= 0"),
        (
            {"epoch": 1, "anneal_epochs": math.inf},
            ValueError,
            "expected anneal_epochs to be finite, got inf",
        ),
    ],
)
def test_schedule_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        temperature_schedule(**kwargs)


def test_set_temperature_reaches_every_refimpl_layer_only():
    class Holder(nn.Module):  # a foreign module with a temperature attribute
        temperature = 5.0

    model = nn.Sequential(
        DynamicConv2d(3, 4, 3),
        nn.ReLU(),
        nn.Sequential(DynamicConv2d(4, 4, 1), Holder()),
    )
    assert set_temperature(model, 2.5) == 2
    assert [m.temperature for m in model.modules() if hasattr(m, "temperature")] == [
        2.5,
        2.5,
        5.0,
    ]
    assert isinstance(model[0].temperature, float)
    # one function, exported from the package and from this module
    assert refimpl.set_temperature is set_temperature
    assert set_temperature(model[0], 4) == 1 and model[0].temperature == 4.0


def test_set_temperature_errors():
    # a model without a refimpl temperature layer is no error: nothing is set
    plain = nn.Sequential(nn.Conv2d(1, 1, 1))
    assert set_temperature(plain, 1.0) == 0
    assert not hasattr(plain[0], "temperature")
    with pytest.raises(
        TypeError,
        match="set_temperature expected model to be a torch.nn.Module, got list",
    ):
        set_temperature([DynamicConv2d(1, 1, 1)], 1.0)
    layer = DynamicConv2d(1, 1, 1)
    with pytest.raises(ValueError, match=r"set_temperature expected value > 0, got 0"):
        set_temperature(layer, 0)
    with pytest.raises(
        TypeError, match=r"set_temperature expected value to be a real number"
    ):
        set_temperature(layer, "1")
    assert layer.temperature == 30.0  # unchanged by the failed calls


# --- parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "c_in, reduction, min_hidden, hidden",
    [
        (3, 0.25, 4, 4),
        (16, 0.25, 4, 4),
        (20, 0.25, 4, 5),
        (64, 0.25, 4, 16),
        (64, 0.0625, 4, 4),
        (3, 0.25, 1, 1),
        (10, 0.5, 2, 5),
        (64, 1.0, 4, 64),
    ],
)
def test_hidden_width(c_in, reduction, min_hidden, hidden):
    # hidden = max(floor(c_in * reduction), min_hidden)
    assert hidden_width(c_in, reduction, min_hidden, owner="DynamicConv2d") == hidden
    m = DynamicConv2d(c_in, 8, 3, reduction=reduction, min_hidden=min_hidden)
    assert m.hidden == hidden
    assert m.fc1.weight.shape == (hidden, c_in)
    assert m.fc1.bias is None
    assert m.fc2.weight.shape == (4, hidden) and m.fc2.bias.shape == (4,)


@pytest.mark.parametrize("c_in", [3, 20, 48, 100, 1000])
def test_hidden_width_of_ratio_h_over_c_in_is_h(c_in):
    # the port's width int(C_in / 4) + 1, reached with reduction = h / C_in
    h = int(c_in / 4) + 1
    assert hidden_width(c_in, h / c_in, 1, owner="DynamicConv2d") == h
    assert DynamicConv2d(c_in, 4, 1, reduction=h / c_in, min_hidden=1).hidden == h


def test_parameter_count_and_layout():
    m = DynamicConv2d(64, 32, 3, groups=2, num_kernels=4)
    assert m.weight.shape == (4, 32, 32, 3, 3) and m.bias.shape == (4, 32)
    kernels = 4 * (32 * 32 * 9 + 32)
    attention = 64 * 16 + 16 * 4 + 4
    assert sum(p.numel() for p in m.parameters()) == kernels + attention


def test_each_kernel_initialised_like_conv2d():
    torch.manual_seed(0)
    m = DynamicConv2d(32, 64, 3, num_kernels=4)
    bound = 1 / math.sqrt(32 * 9)  # nn.Conv2d: kaiming_uniform(a=sqrt(5)) bound
    for k in range(4):
        w = m.weight[k]
        assert w.abs().max() <= bound
        # uniform on [-bound, bound] has std bound / sqrt(3)
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
        assert m.bias[k].abs().max() <= bound
    assert not torch.equal(m.weight[0], m.weight[1])


def test_repr_mentions_the_options():
    text = repr(
        DynamicConv2d(4, 8, 3, padding=1, bias=False, num_kernels=2, temperature=5)
    )
    assert "num_kernels=2" in text and "temperature=5" in text and "bias=False" in text


# --- batches and layouts ------------------------------------------------------------


def test_unbatched_input_is_a_batch_of_one():
    cfg = CONFIGS[1]
    m = _randomise_attention(_module(cfg))
    x = _input(cfg, n=1)
    out = m(x[0])
    assert out.shape == m(x).shape[1:]
    torch.testing.assert_close(out, m(x)[0], **tolerance(torch.float64))
    (attention,) = m.dynamic_tensors(x[0])
    torch.testing.assert_close(
        attention, m.dynamic_tensors(x).attention, **tolerance(torch.float64)
    )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_strings_as_conv2d(padding):
    # kernel (2, 5) with dilation (1, 2): "same" pads asymmetrically in height
    m = DynamicConv2d(
        4,
        6,
        (2, 5),
        padding=padding,
        dilation=(1, 2),
        groups=2,
        num_kernels=1,
        dtype=torch.float64,
    )
    plain = nn.Conv2d(
        4, 6, (2, 5), padding=padding, dilation=(1, 2), groups=2, dtype=torch.float64
    )
    assert m.padding == plain.padding
    with torch.no_grad():
        plain.weight.copy_(m.weight[0])
        plain.bias.copy_(m.bias[0])
    x = randn(2, 4, 9, 11, seed=3)
    assert m(x).shape == plain(x).shape
    torch.testing.assert_close(m(x), plain(x), **tolerance(torch.float64))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_independence(mode):
    cfg = CONFIGS[1]
    m = _randomise_attention(_module(cfg))
    getattr(m, mode)()
    x = _input(cfg, n=5)
    single = torch.cat([m(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(m(x), single, **tolerance(torch.float64))


@pytest.mark.parametrize("n", [0, 1, 40])
def test_batch_sizes(n, device):
    cfg = CONFIGS[1]
    m = _module(cfg, dtype=torch.float32, device=device)
    x = _input(cfg, n=n, dtype=torch.float32, device=device).requires_grad_()
    y = m(x)
    assert (
        y.shape[0] == n
        and y.shape[1:]
        == nn.Conv2d(4, 6, (3, 5), 2, (1, 2))(torch.zeros(1, 4, 9, 8)).shape[1:]
    )
    y.sum().backward()
    assert m.weight.grad is not None and x.grad.shape == x.shape
    if n == 0:
        assert torch.count_nonzero(m.weight.grad) == 0


def test_channels_last_and_non_contiguous(device):
    cfg = CONFIGS[1]
    m = _randomise_attention(_module(cfg, device=device))
    x = _input(cfg, n=4, device=device)
    expected = m(x)
    cl = x.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    torch.testing.assert_close(m(cl), expected, **tolerance(torch.float64))
    wide = randn(4, 4, 9, 16, seed=1, dtype=torch.float64, device=device)
    strided = wide[:, :, :, ::2]  # non-contiguous view, width 8
    assert not strided.is_contiguous()
    torch.testing.assert_close(
        m(strided), m(strided.contiguous()), **tolerance(torch.float64)
    )


def test_autocast_bfloat16_cpu():
    cfg = CONFIGS[0]
    m = _randomise_attention(_module(cfg, dtype=torch.float32))
    x = _input(cfg, n=4, dtype=torch.float32)
    expected = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: compare relative to the output scale
    err = (y.float() - expected).abs().max() / expected.abs().max()
    assert err < 3e-2
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and m.fc1.weight.grad is not None


def test_gradcheck():
    # small shapes: the numerical Jacobian needs two forwards per input entry
    cfg = (2, 4, (2, 3), 2, (1, 0), (1, 2), 2, (4, 6))
    m = _randomise_attention(_module(cfg, num_kernels=3, reduction=1.0))
    x = _input(cfg, n=2).requires_grad_()
    params = [
        t.detach().clone().requires_grad_()
        for t in (m.weight, m.bias, m.fc1.weight, m.fc2.weight, m.fc2.bias)
    ]

    def fn(x, weight, bias, fc1, fc2, fc2_bias):
        pi = kernel_attention(x, fc1, fc2, fc2_bias, 1.5)
        return dynamic_conv2d(
            x, pi, weight, bias, m.stride, m.padding, m.dilation, m.groups
        )

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_state_dict_round_trip_keeps_temperature():
    cfg = CONFIGS[1]
    a = _randomise_attention(_module(cfg, seed=0))
    a.temperature = 2.5
    b = _module(cfg, seed=7)
    assert b.temperature == 30.0
    x = _input(cfg)
    assert not torch.allclose(a(x), b(x))
    state = a.state_dict()
    assert set(state) == {
        "weight",
        "bias",
        "fc1.weight",
        "fc2.weight",
        "fc2.bias",
        "_extra_state",
    }
    b.load_state_dict(state)
    assert b.temperature == 2.5
    torch.testing.assert_close(b(x), a(x), **tolerance(torch.float64))
    with pytest.raises(
        ValueError,
        match=r"DynamicConv2d expected extra state "
        r"\{'temperature': float\}, got \{\}",
    ):
        b.set_extra_state({})
    # a state dict without the temperature (an older or official checkpoint) loads
    # strictly and keeps the layer's current temperature
    c = _module(cfg, seed=3)
    c.temperature = 7.0
    c.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"})
    assert c.temperature == 7.0
    c.temperature = 2.5
    torch.testing.assert_close(c(x), a(x), **tolerance(torch.float64))


def test_module_moves_with_to():
    m = DynamicConv2d(4, 4, 3).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.zeros(1, 4, 5, 5, dtype=torch.float64)).dtype == torch.float64


def test_torch_compile_eager_backend():
    # backend="eager" checks that Dynamo traces the module (no graph breaks that
    # change results, guards on the temperature); inductor would spend minutes
    # compiling C++ on a 2-core CPU without testing anything of ours.
    cfg = CONFIGS[0]
    m = _randomise_attention(_module(cfg, dtype=torch.float32))
    x = _input(cfg, dtype=torch.float32)
    compiled = torch.compile(m, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))
    m.temperature = 4.0  # a new temperature must not reuse a stale graph
    torch.testing.assert_close(compiled(x), m(x))


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((0, 4, 3), {}, ValueError, "DynamicConv2d expected in_channels >= 1, got 0"),
        ((4.0, 4, 3), {}, TypeError, "DynamicConv2d expected in_channels to be an int"),
        ((4, 0, 3), {}, ValueError, "DynamicConv2d expected out_channels >= 1, got 0"),
        (
            (4, 4, (3, 3, 3)),
            {},
            TypeError,
            "expected kernel_size to be an int or a pair",
        ),
        ((4, 4, 3), {"stride": 0}, ValueError, "DynamicConv2d expected stride >= 1"),
        ((4, 4, 3), {"padding": -1}, ValueError, "DynamicConv2d expected padding >= 0"),
        (
            (4, 4, 3),
            {"dilation": 0},
            ValueError,
            "DynamicConv2d expected dilation >= 1",
        ),
        (
            (4, 6, 3),
            {"groups": 4},
            ValueError,
            "expected groups to divide out_channels",
        ),
        ((6, 4, 3), {"groups": 4}, ValueError, "expected groups to divide in_channels"),
        ((4, 4, 3), {"bias": 1}, TypeError, "DynamicConv2d expected bias to be a bool"),
        ((4, 4, 3), {"num_kernels": 0}, ValueError, "expected num_kernels >= 1, got 0"),
        ((4, 4, 3), {"reduction": 0}, ValueError, "expected reduction > 0, got 0"),
        ((4, 4, 3), {"reduction": -0.25}, ValueError, "expected reduction > 0"),
        (
            (4, 4, 3),
            {"reduction": "1/4"},
            TypeError,
            "DynamicConv2d expected reduction to be a real number, got str",
        ),
        (
            (4, 4, 3),
            {"reduction": math.inf},
            ValueError,
            "expected reduction to be finite",
        ),
        ((4, 4, 3), {"min_hidden": 0}, ValueError, "expected min_hidden >= 1, got 0"),
        ((4, 4, 3), {"min_hidden": 2.5}, TypeError, "expected min_hidden to be an int"),
        (
            (4, 4, 3),
            {"padding": "full"},
            ValueError,
            "DynamicConv2d expected padding to be an int, a pair of ints, 'same' or "
            "'valid', got 'full'",
        ),
    ],
)
def test_constructor_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        DynamicConv2d(*args, **kwargs)


@pytest.mark.parametrize(
    "x, error, message",
    [
        (
            [[1.0]],
            TypeError,
            "DynamicConv2d expected input to be a torch.Tensor, got list",
        ),
        (
            torch.zeros(4, 5),
            ValueError,
            r"DynamicConv2d expected input of shape \[N, C_in, H, W\] or "
            r"\[C_in, H, W\], got 2 dimensions",
        ),
        (
            torch.zeros(1, 1, 4, 5, 5),
            ValueError,
            r"\[C_in, H, W\], got 5 dimensions",
        ),
        (torch.zeros(3, 5, 5), ValueError, r"expected input with 4 channels, got 3"),
        (
            torch.zeros(1, 3, 5, 5),
            ValueError,
            r"DynamicConv2d expected input with 4 channels, got 3",
        ),
        (
            torch.zeros(1, 4, 5, 5, dtype=torch.int64),
            TypeError,
            "expected input with a floating-point dtype, got torch.int64",
        ),
        (
            torch.zeros(1, 4, 5, 5, dtype=torch.float64),
            TypeError,
            r"DynamicConv2d expected input of dtype torch.float32 \(the dtype of its "
            r"parameters\), got torch.float64",
        ),
        (
            torch.zeros(1, 4, 2, 5),
            ValueError,
            r"expected the padded input \(2\) to be at least the dilated kernel size "
            r"\(3\) along height",
        ),
        (torch.zeros(1, 4, 5, 1), ValueError, r"\(1\) .* along width"),
    ],
)
def test_forward_errors(x, error, message):
    m = DynamicConv2d(4, 4, 3)
    with pytest.raises(error, match=message):
        m(x)
    with pytest.raises(error, match=message):
        m.dynamic_tensors(x)


def test_functional_errors():
    x = torch.zeros(2, 4, 6, 6)
    w = torch.zeros(3, 6, 4, 3, 3)
    pi = torch.zeros(2, 3)
    b = torch.zeros(3, 6)
    for fn in (dynamic_conv2d, dynamic_conv2d_reference):
        name = fn.__name__
        with pytest.raises(
            ValueError,
            match=rf"{name} expected attention of shape "
            r"\[N, num_kernels\] = \(2, 3\), got \(2, 4\)",
        ):
            fn(x, torch.zeros(2, 4), w, b)
        with pytest.raises(ValueError, match="expected attention with 2 dimensions"):
            fn(x, torch.zeros(2), w, b)
        with pytest.raises(
            ValueError,
            match=r"expected bias of shape \[num_kernels, C_out\] = \(3, 6\), "
            r"got \(3, 5\)",
        ):
            fn(x, pi, w, torch.zeros(3, 5))
        with pytest.raises(ValueError, match="expected bias with 2 dimensions, got 1"):
            fn(x, pi, w, torch.zeros(6))
        with pytest.raises(
            ValueError,
            match=r"expected input with 2 channels \(C_in/groups = 2 in the "
            r"weight, times groups = 1\), got 4",
        ):
            fn(x, pi, torch.zeros(3, 6, 2, 3, 3), b)
        with pytest.raises(ValueError, match="expected weight with 5 dimensions"):
            fn(x, pi, torch.zeros(6, 4, 3, 3), b)
        with pytest.raises(
            TypeError,
            match=r"expected attention with the dtype of "
            r"the input \(torch.float32\), got torch.float64",
        ):
            fn(x, pi.double(), w, b)
        with pytest.raises(ValueError, match="expected groups to divide out_channels"):
            fn(x, pi, w, b, groups=4)
        with pytest.raises(TypeError, match="expected input to be a torch.Tensor"):
            fn(None, pi, w, b)


def test_hidden_width_errors():
    with pytest.raises(ValueError, match="DynamicConv2d expected reduction > 0, got 0"):
        hidden_width(8, 0, 4, owner="DynamicConv2d")
    with pytest.raises(
        TypeError, match="DynamicConv2d expected reduction to be a real number"
    ):
        hidden_width(8, "1/4", 4, owner="DynamicConv2d")
    with pytest.raises(ValueError, match="DynamicConv2d expected reduction to be fin"):
        hidden_width(8, math.nan, 4, owner="DynamicConv2d")
    with pytest.raises(ValueError, match="DynamicConv2d expected min_hidden >= 1, got"):
        hidden_width(8, 0.25, 0, owner="DynamicConv2d")
    with pytest.raises(TypeError, match="DynamicConv2d expected min_hidden to be an"):
        hidden_width(8, 0.25, 4.0, owner="DynamicConv2d")


# --- algorithms chosen by shape, forced by hand ---------------------------------------


@pytest.mark.parametrize("algorithm", ["auto", "grouped", "unfold", "outputs"])
@pytest.mark.parametrize("keep_kernels", [False, True])
def test_every_algorithm_equals_the_reference(algorithm, keep_kernels):
    x = randn(5, 4, 7, 6, seed=31, requires_grad=True)
    attention = torch.softmax(randn(5, 3, seed=32), dim=1).requires_grad_()
    weight = randn(3, 6, 4, 3, 3, seed=33, requires_grad=True)
    bias = randn(3, 6, seed=34, requires_grad=True)
    args = (x, attention, weight, bias, 1, (1, 2), 1, 1)
    out = dynamic_conv2d(*args, algorithm=algorithm, keep_kernels=keep_kernels)
    expected = dynamic_conv2d_reference(*args)
    torch.testing.assert_close(out, expected, **tolerance(torch.float64))
    grad = randn(*out.shape, seed=35)
    inputs = (x, attention, weight, bias)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tolerance(torch.float64))


@pytest.mark.parametrize("algorithm", ["grouped", "unfold", "outputs"])
def test_layer_algorithms_agree_in_value_and_gradient(algorithm):
    torch.manual_seed(0)
    kw = {"num_kernels": 3, "temperature": 1.0, "dtype": torch.float64}
    auto = DynamicConv2d(4, 6, 3, padding=1, **kw)
    forced = DynamicConv2d(4, 6, 3, padding=1, algorithm=algorithm, **kw)
    forced.load_state_dict(auto.state_dict())
    x = randn(3, 4, 6, 5, seed=36)
    outs = [auto(x), forced(x)]
    torch.testing.assert_close(outs[1], outs[0], **tolerance(torch.float64))
    grads = [
        torch.autograd.grad(o.sum(), m.weight) for o, m in zip(outs, (auto, forced))
    ]
    torch.testing.assert_close(grads[1], grads[0], **tolerance(torch.float64))
    assert f"algorithm={algorithm!r}" in forced.extra_repr()


def test_algorithm_errors():
    with pytest.raises(ValueError, match=r"DynamicConv2d expected algorithm to be"):
        DynamicConv2d(4, 6, 3, algorithm="Grouped")
    with pytest.raises(TypeError, match=r"DynamicConv2d expected keep_kernels to be"):
        DynamicConv2d(4, 6, 3, keep_kernels=1)
