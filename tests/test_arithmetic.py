"""Tests of refimpl.arithmetic: sizes, receptive fields, three convolutions."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refimpl.arithmetic import (
    ReceptiveField,
    conv2d_fft,
    conv2d_loops,
    conv2d_unfold,
    conv_output_size,
    conv_transpose_output_size,
    receptive_field,
)

from conftest import randn, tolerance

CONVS = [conv2d_loops, conv2d_unfold, conv2d_fft]

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
CONFIGS = [
    (2, 3, 4, 7, 7, 3, 1, 0, 1, 1),  # plain
    (1, 2, 3, 6, 9, (2, 3), 1, 1, 1, 1),  # non-square kernel and image
    (2, 4, 6, 9, 8, 3, 2, 1, 1, 2),  # stride, groups
    (1, 3, 3, 8, 7, 3, (2, 3), (1, 0), (2, 1), 1),  # pairs everywhere
    (2, 4, 4, 7, 7, 3, 1, 2, 2, 4),  # depthwise, dilated
    (1, 2, 6, 5, 6, (3, 1), 1, (0, 2), 1, 2),  # channel multiplier 3 per group
    (1, 3, 2, 5, 5, 5, 1, 0, 1, 1),  # kernel as large as the input
    (1, 2, 2, 4, 3, 4, 3, 2, 1, 1),  # kernel larger than the image, fits padding
    (3, 1, 1, 11, 10, 1, 3, 0, 1, 1),  # 1x1, big stride, odd sizes
]


def _args(cfg, device, dtype=torch.float64, seed=0):
    n, c_in, c_out, h, w, k, s, p, d, g = cfg
    kh, kw = (k, k) if isinstance(k, int) else k
    x = randn(n, c_in, h, w, seed=seed, dtype=dtype, device=device)
    weight = randn(c_out, c_in // g, kh, kw, seed=seed + 1, dtype=dtype, device=device)
    bias = randn(c_out, seed=seed + 2, dtype=dtype, device=device)
    return x, weight, bias, dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("conv", CONVS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_agrees_with_f_conv2d_float64(conv, cfg, device):
    x, weight, bias, kw = _args(cfg, device)
    expected = F.conv2d(x, weight, bias, **kw)
    torch.testing.assert_close(conv(x, weight, bias, **kw), expected)
    torch.testing.assert_close(conv(x, weight, None, **kw), F.conv2d(x, weight, **kw))


@pytest.mark.parametrize("conv", CONVS, ids=lambda f: f.__name__)
def test_output_shape_is_conv_output_size(conv, device):
    x, weight, _, kw = _args(CONFIGS[3], device)
    out = conv(x, weight, **kw)
    size = conv_output_size(
        tuple(x.shape[2:]),
        tuple(weight.shape[2:]),
        kw["stride"],
        kw["padding"],
        kw["dilation"],
    )
    assert tuple(out.shape) == (x.shape[0], weight.shape[0], *size)


def test_cross_correlation_not_convolution():
    # an impulse reproduces the kernel flipped: PyTorch does not flip the kernel
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 2, 2] = 1.0
    w = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3)
    out = conv2d_loops(x, w)
    torch.testing.assert_close(out[0, 0], w[0, 0].flip(-2, -1))


@pytest.mark.parametrize("conv", [conv2d_unfold, conv2d_fft], ids=lambda f: f.__name__)
def test_gradcheck(conv):
    x = randn(1, 2, 5, 4, seed=3, requires_grad=True)
    w = randn(4, 1, 2, 3, seed=4, requires_grad=True)
    b = randn(4, seed=5, requires_grad=True)

    def fn(x, w, b):
        return conv(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_loops_gradient_matches_f_conv2d():
    x = randn(1, 2, 5, 5, seed=6, requires_grad=True)
    w = randn(2, 2, 3, 3, seed=7, requires_grad=True)
    grads = torch.autograd.grad(conv2d_loops(x, w, padding=1).square().sum(), (x, w))
    expected = torch.autograd.grad(F.conv2d(x, w, padding=1).square().sum(), (x, w))
    torch.testing.assert_close(grads, expected)


@pytest.mark.parametrize("conv", CONVS, ids=lambda f: f.__name__)
def test_empty_batch(conv, device):
    x = randn(0, 4, 6, 6, device=device)
    w = randn(2, 2, 3, 3, device=device, requires_grad=True)
    out = conv(x, w, stride=2, groups=2)
    assert out.shape == F.conv2d(x, w, stride=2, groups=2).shape
    out.sum().backward()
    assert w.grad is not None and not w.grad.any()


@pytest.mark.parametrize("conv", [conv2d_unfold, conv2d_fft], ids=lambda f: f.__name__)
def test_channels_last_and_non_contiguous(conv, device):
    x = randn(2, 4, 8, 9, device=device)
    w = randn(4, 2, 3, 3, seed=1, device=device)
    expected = F.conv2d(x, w, padding=1, groups=2)
    torch.testing.assert_close(
        conv(x.to(memory_format=torch.channels_last), w, padding=1, groups=2), expected
    )
    x_t = x.transpose(-2, -1).contiguous().transpose(-2, -1)  # same values, strided
    assert not x_t.is_contiguous()
    torch.testing.assert_close(conv(x_t, w, padding=1, groups=2), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv", [conv2d_unfold, conv2d_fft], ids=lambda f: f.__name__)
def test_lower_precision(conv, dtype):
    x = randn(1, 4, 10, 10, dtype=dtype)
    w = randn(4, 4, 3, 3, seed=1, dtype=dtype)
    out = conv(x, w, padding=1)
    assert out.dtype == dtype
    expected = F.conv2d(x.double(), w.double(), padding=1)
    # 36 products per output of unit variance: scale the tolerance by their size
    tol = tolerance(dtype)
    torch.testing.assert_close(
        out.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * 6
    )


def test_fft_under_autocast():
    x = randn(2, 3, 9, 9, dtype=torch.float32)
    w = randn(4, 3, 3, 3, seed=1, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv2d_fft(x, w, padding=1)
    # the spectra stay in float32: the result is float32-accurate
    expected = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


# --- sizes ------------------------------------------------------------------------


def test_conv_output_size_sweep_against_nn_conv2d():
    checked = 0
    for h, k, s, p, d in itertools.product(
        range(1, 9), range(1, 5), range(1, 4), range(0, 3), range(1, 4)
    ):
        w_in, kw = h + 2, max(1, k - 1)  # non-square image and kernel
        # the meta device computes shapes (and shape errors) without data
        conv = nn.Conv2d(
            1, 1, (k, kw), (s, 1), (p, 0), (d, 1), bias=False, device="meta"
        )
        x = torch.empty(1, 1, h, w_in, device="meta")
        try:
            expected = tuple(conv(x).shape[2:])
        except RuntimeError:
            with pytest.raises(ValueError, match="larger than the input"):
                conv_output_size((h, w_in), (k, kw), (s, 1), (p, 0), (d, 1))
            continue
        assert conv_output_size((h, w_in), (k, kw), (s, 1), (p, 0), (d, 1)) == expected
        checked += 1
    assert checked > 500


def test_conv_output_size_form_and_special_case():
    assert conv_output_size(5, 3, 2, 1) == 3  # Dumoulin & Visin's worked example
    assert conv_output_size(6, 3, 2, 1) == 3  # ... and its many-to-one twin
    assert conv_output_size((224, 224), 7, 2, 3) == (112, 112)  # ResNet stem
    assert conv_output_size(32, (3, 5), padding=(1, 2)) == (32, 32)  # "same"
    for w, f, p, s in [(227, 11, 0, 4), (32, 5, 2, 1), (7, 3, 1, 2)]:
        assert conv_output_size(w, f, s, p) == (w - f + 2 * p) // s + 1


def test_conv_transpose_output_size_sweep_against_nn():
    checked = 0
    for i, k, s, p, d in itertools.product(
        range(1, 6), range(1, 4), range(1, 4), range(0, 3), range(1, 3)
    ):
        for a in range(max(s, d) + 1):
            layer = nn.ConvTranspose2d(1, 1, k, s, p, a, dilation=d, bias=False)
            x = torch.zeros(1, 1, i, i + 2)
            try:
                expected = tuple(layer(x).shape[2:])
            except RuntimeError as err:
                message = str(err)
                match = "output_padding" if "output padding" in message else "positive"
                with pytest.raises(ValueError, match=match):
                    conv_transpose_output_size((i, i + 2), k, s, p, a, d)
                continue
            if 0 in expected:
                # PyTorch allows one empty axis; refimpl asks for a positive size
                with pytest.raises(ValueError, match="positive output size, got 0"):
                    conv_transpose_output_size((i, i + 2), k, s, p, a, d)
                continue
            got = conv_transpose_output_size((i, i + 2), k, s, p, a, d)
            assert got == expected
            checked += 1
    assert checked > 300


def test_transpose_inverts_the_size_of_a_strided_conv():
    # output_padding picks which of the s inputs a strided conv merged
    for i in range(5, 12):
        o = conv_output_size(i, 3, 2, 1)
        a = (i + 2 * 1 - 3) % 2
        assert conv_transpose_output_size(o, 3, 2, 1, output_padding=a) == i


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(size=0, kernel_size=3), ValueError, r"expected size >= 1, got 0"),
        (
            dict(size=5, kernel_size=-1),
            ValueError,
            r"expected kernel_size >= 1, got -1",
        ),
        (dict(size=5, kernel_size=3, stride=0), ValueError, r"expected stride >= 1"),
        (
            dict(size=5, kernel_size=3, padding=-1),
            ValueError,
            r"expected padding >= 0, got -1",
        ),
        (
            dict(size=5, kernel_size=3, dilation=(1, 0)),
            ValueError,
            r"expected dilation >= 1, got \(1, 0\)",
        ),
        (
            dict(size=3, kernel_size=5),
            ValueError,
            r"expected the dilated kernel \(size 5\) to fit in the padded input "
            r"\(size 3\), got a kernel larger than the input",
        ),
        (
            dict(size=5, kernel_size=3, dilation=3),
            ValueError,
            r"expected the dilated kernel \(size 7\)",
        ),
        (
            dict(size=5.0, kernel_size=3),
            TypeError,
            r"expected size to be an int or a pair of ints, got 5.0",
        ),
        (
            dict(size=5, kernel_size=(3, 3, 3)),
            TypeError,
            r"expected kernel_size to be an int or a pair of ints, got \(3, 3, 3\)",
        ),
        (
            dict(size=5, kernel_size=True),
            TypeError,
            r"expected kernel_size to be an int or a pair of ints, got True",
        ),
    ],
)
def test_conv_output_size_errors(kwargs, error, match):
    with pytest.raises(error, match=f"^conv_output_size {match}"):
        conv_output_size(**kwargs)


def test_conv_transpose_output_size_errors():
    with pytest.raises(
        ValueError,
        match=r"output_padding < max\(stride, dilation\) "
        r"= 2, got output_padding=2",
    ):
        conv_transpose_output_size(4, 3, stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"positive output size, got -1"):
        conv_transpose_output_size(1, 1, padding=1)
    with pytest.raises(ValueError, match=r"expected output_padding >= 0"):
        conv_transpose_output_size(4, 3, output_padding=-1)
    with pytest.raises(TypeError, match=r"expected stride to be an int or a pair"):
        conv_transpose_output_size(4, 3, stride="2")


# --- receptive field --------------------------------------------------------------


def _gradient_support(stack: nn.Module, size: int, pixel: tuple[int, int]):
    """Rows and columns of the input that output ``pixel`` depends on."""
    # ones, not zeros: the ReLUs must pass the gradient
    x = torch.ones(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    out = stack(x)
    (grad,) = torch.autograd.grad(out[0, 0, pixel[0], pixel[1]], x)
    rows = grad[0, 0].abs().sum(1).nonzero().flatten()
    cols = grad[0, 0].abs().sum(0).nonzero().flatten()
    return rows, cols


def _ones_stack(layers) -> nn.Sequential:
    modules = []
    for k, s, d in layers:
        if d == "avg":
            modules.append(nn.AvgPool2d(k, s))
            continue
        conv = nn.Conv2d(1, 1, k, s, dilation=d, bias=False, dtype=torch.float64)
        nn.init.ones_(conv.weight)  # positive weights: no cancellation in the support
        modules.append(conv)
        modules.append(nn.ReLU())
    return nn.Sequential(*modules)


@pytest.mark.parametrize(
    "layers",
    [
        [(3, 1, 1)] * 3,
        [(3, 2, 1), (3, 1, 1), (2, 2, "avg"), (3, 1, 2)],
        [(5, 1, 1), (3, 2, 2), (3, 3, 1), (1, 1, 1)],
        [(3, 1, 1), (3, 1, 2), (3, 1, 4)],
        [(7, 2, 1), (3, 2, "avg"), (3, 1, 1), (3, 2, 1)],
    ],
)
def test_receptive_field_matches_gradient_support(layers):
    stack = _ones_stack(layers)
    rf = receptive_field(stack)
    size = rf.size[0] + 3 * rf.jump[0] + 4
    out_size = stack(torch.zeros(1, 1, size, size, dtype=torch.float64)).shape[-1]
    assert out_size >= 2
    rows, cols = _gradient_support(stack, size, (0, 0))
    assert int(rows.max() - rows.min()) + 1 == rf.size[0]
    assert int(cols.max() - cols.min()) + 1 == rf.size[1]
    rows_next, _ = _gradient_support(stack, size, (1, 0))
    assert int(rows_next.min() - rows.min()) == rf.jump[0]
    # tuples with "avg" replaced by dilation 1 give the same ints
    triples = [(k, s, 1 if d == "avg" else d) for k, s, d in layers]
    assert receptive_field(triples) == ReceptiveField(rf.size[0], rf.jump[0])


def test_receptive_field_known_values():
    # n stacked 3x3 convs see 2n + 1 pixels (Simonyan & Zisserman's argument)
    for n in range(1, 6):
        assert receptive_field([(3, 1, 1)] * n) == (2 * n + 1, 1)
    # dilations 1, 2, 4 grow the field exponentially: 15 (Yu & Koltun)
    assert receptive_field([(3, 1, 1), (3, 1, 2), (3, 1, 4)]).size == 15
    assert receptive_field([((3, 1), 1, 1)]) == ((3, 1), (1, 1))
    # the ResNet stem (7x7/2 conv, 3x3/2 max pool) sees 11x11 pixels, 4 apart;
    # pointwise modules do not count and modules give pairs
    stem = [
        nn.Conv2d(3, 8, 7, 2, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    assert receptive_field(stem) == ((11, 11), (4, 4))
    assert receptive_field(nn.Sequential(*stem)) == ((11, 11), (4, 4))


def test_receptive_field_errors():
    with pytest.raises(
        TypeError,
        match=r"receptive_field expected Conv2d, MaxPool2d, "
        r"AvgPool2d or a pointwise module at "
        r"layers\[1\], got Linear",
    ):
        receptive_field([nn.Conv2d(1, 1, 3), nn.Linear(2, 2)])
    with pytest.raises(
        TypeError,
        match=r"expected layers\[0\] to be a \(kernel_size, "
        r"stride, dilation\) tuple or a module, got "
        r"\(3, 1\)",
    ):
        receptive_field([(3, 1)])
    with pytest.raises(TypeError, match=r"expected layers to be a sequence"):
        receptive_field(3)
    with pytest.raises(ValueError, match=r"^receptive_field expected stride >= 1"):
        receptive_field([(3, 0, 1)])


# --- argument validation of the convolutions -------------------------------------


@pytest.mark.parametrize("conv", CONVS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (
            lambda: (randn(3, 4, 4), randn(2, 3, 3, 3)),
            {},
            ValueError,
            r"expected input with 4 dimensions, got 3 dimensions",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 3)),
            {},
            ValueError,
            r"expected weight with 4 dimensions, got 3",
        ),
        (
            lambda: (randn(1, 3, 4, 4).long(), randn(2, 3, 3, 3)),
            {},
            TypeError,
            r"expected input with a floating-point dtype, got torch.int64",
        ),
        (
            lambda: ([[1.0]], randn(2, 3, 3, 3)),
            {},
            TypeError,
            r"expected input to be a torch.Tensor, got list",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 3, 3).float()),
            {},
            TypeError,
            r"expected weight with the dtype of input \(torch.float64\), got "
            r"torch.float32",
        ),
        (
            lambda: (randn(1, 4, 4, 4), randn(2, 3, 3, 3)),
            {},
            ValueError,
            r"expected input with 3 channels, got 4",
        ),
        (
            lambda: (randn(1, 4, 4, 4), randn(3, 2, 3, 3)),
            {"groups": 2},
            ValueError,
            r"expected groups to divide out_channels, got out_channels=3, groups=2",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 1, 3, 3)),
            {"groups": 2},
            ValueError,
            r"expected groups to divide in_channels, got in_channels=3, groups=2",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 3, 3)),
            {"groups": 0},
            ValueError,
            r"expected groups >= 1, got 0",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 3, 3)),
            {"stride": 0},
            ValueError,
            r"expected stride >= 1",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 3, 3)),
            {"padding": "same"},
            TypeError,
            r"expected padding to be an int or a pair of ints, got 'same'",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 5, 3)),
            {},
            ValueError,
            r"expected the dilated kernel \(size 5\) to fit in the padded input "
            r"\(size 4\) along height",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 3, 3)),
            {"dilation": (1, 2)},
            ValueError,
            r"expected the dilated kernel \(size 5\) to fit in the padded "
            r"input \(size 4\) along width",
        ),
        (
            lambda: (randn(1, 3, 0, 4), randn(2, 3, 1, 1)),
            {},
            ValueError,
            r"expected input \[N, C_in, H, W\] with C_in, H, W >= 1",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(0, 3, 1, 1)),
            {},
            ValueError,
            r"expected weight \[C_out, C_in/groups, kH, kW\] with sizes >= 1",
        ),
        (
            lambda: (randn(1, 3, 4, 4), randn(2, 3, 1, 1)),
            {"bias": randn(3)},
            ValueError,
            r"expected bias of shape \(2,\) and dtype torch.float64, got "
            r"shape \(3,\)",
        ),
    ],
)
def test_conv_errors(conv, make, kwargs, error, match):
    x, w = make()
    with pytest.raises(error, match=f"^{conv.__name__} {match}"):
        conv(x, w, **kwargs)


def test_fast_fft_size():
    from refimpl.arithmetic import _fast_fft_size

    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 300):
        m = _fast_fft_size(n)
        assert m >= n and smooth(m) and not any(smooth(j) for j in range(n, m))
