"""Tests for refimpl.deform: DCNv1/DCNv2 against the literal loops and torchvision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tv_ops  # a requirement: never skipped

import refimpl.deform as deform
from refimpl.deform import DeformConv2d, deform_conv2d, deform_conv2d_reference

from conftest import randn, tolerance

F64 = torch.float64


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _problem(
    n,
    c_in,
    c_out,
    hw,
    kernel,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    offset_groups=1,
    masked=True,
    scale=2.0,
    seed=0,
    device="cpu",
    dtype=F64,
):
    """Random inputs of every argument; offsets spread so that some points fall
    outside the image. Returns (tensors, kwargs)."""
    (h, w), (kh, kw) = hw, kernel
    s, p, d = (torch.nn.modules.utils._pair(v) for v in (stride, padding, dilation))
    ho, wo = _out_size(h, kh, s[0], p[0], d[0]), _out_size(w, kw, s[1], p[1], d[1])
    kw_ = {"device": device, "dtype": dtype, "requires_grad": True}
    x = randn(n, c_in, h, w, seed=seed, **kw_)
    weight = randn(c_out, c_in // groups, kh, kw, seed=seed + 1, **kw_)
    bias = randn(c_out, seed=seed + 2, **kw_)
    offset = scale * randn(n, 2 * offset_groups * kh * kw, ho, wo, seed=seed + 3)
    offset = offset.to(device=device, dtype=dtype).requires_grad_()
    mask = None
    if masked:
        mask = randn(n, offset_groups * kh * kw, ho, wo, seed=seed + 4).sigmoid()
        mask = mask.to(device=device, dtype=dtype).requires_grad_()
    return (x, offset, weight, bias, mask), {"stride": s, "padding": p, "dilation": d}


def _values_and_grads(fn, tensors, kwargs, seed=9):
    x, offset, weight, bias, mask = tensors
    out = fn(x, offset, weight, bias, mask=mask, **kwargs)
    inputs = [t for t in tensors if t is not None]
    grad_out = randn(*out.shape, seed=seed, dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, inputs, grad_out) if out.numel() else []
    return out, grads


def _assert_same(fn_a, fn_b, tensors, kwargs, tol):
    out_a, grads_a = _values_and_grads(fn_a, tensors, kwargs)
    out_b, grads_b = _values_and_grads(fn_b, tensors, kwargs)
    torch.testing.assert_close(out_a, out_b, **tol)
    names = ["input", "offset", "weight", "bias", "mask"]
    for name, ga, gb in zip(names, grads_a, grads_b):
        torch.testing.assert_close(
            ga, gb, **tol, msg=lambda m, n=name: f"grad {n}: {m}"
        )


# --- agreement with the literal reference and with torchvision ------------------------

LOOP_CASES = [
    # (n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, offset_groups,
    #  masked)
    (1, 4, 4, (4, 6), (2, 3), (2, 1), (1, 2), (1, 2), 2, 2, True),
    (1, 6, 3, (6, 5), (3, 1), 1, (2, 0), (2, 1), 3, 2, False),
    (2, 2, 2, (4, 4), (3, 3), 2, 1, 1, 1, 1, True),
]


@pytest.mark.parametrize("case", LOOP_CASES)
def test_matches_literal_loops(case):
    n, c_in, c_out, hw, k, s, p, d, g, og, masked = case
    tensors, kwargs = _problem(n, c_in, c_out, hw, k, s, p, d, g, og, masked)
    _assert_same(
        deform_conv2d, deform_conv2d_reference, tensors, kwargs, tolerance(F64)
    )


TV_CASES = [
    # non-square kernel, stride != dilation, weight groups finer than offset groups
    (3, 8, 6, (9, 7), (3, 2), (1, 2), (1, 0), (2, 1), 2, 1, True),
    # offset groups finer than weight groups, no mask (DCNv1)
    (2, 8, 4, (7, 8), (3, 3), 1, 1, 1, 2, 4, False),
    # groups and offset groups that do not nest (lcm = 6)
    (2, 6, 6, (6, 6), (2, 2), 1, 1, (1, 2), 3, 2, True),
    # depthwise
    (2, 4, 4, (6, 5), (3, 3), 2, 1, 1, 4, 1, True),
    # batch larger than torchvision's 32-image block, and an empty batch
    (33, 2, 3, (4, 4), (3, 3), 1, 1, 1, 1, 1, True),
    (0, 4, 4, (5, 5), (3, 3), 1, 1, 1, 1, 2, True),
    (0, 4, 6, (5, 5), (3, 3), 1, 1, 1, 2, 1, False),
]


@pytest.mark.parametrize("case", TV_CASES)
def test_matches_torchvision(case, device):
    n, c_in, c_out, hw, k, s, p, d, g, og, masked = case
    tensors, kwargs = _problem(
        n, c_in, c_out, hw, k, s, p, d, g, og, masked, scale=3.0, device=device
    )
    out = deform_conv2d(*tensors[:4], mask=tensors[4], **kwargs)
    plain = F.conv2d(tensors[0], tensors[2], groups=g, **kwargs)
    assert out.shape == plain.shape == (n, c_out) + plain.shape[2:]
    _assert_same(deform_conv2d, tv_ops.deform_conv2d, tensors, kwargs, tolerance(F64))


# --- agreement with an independent sampler: F.grid_sample ----------------------------


def _grid_sample_deform(x, offset, weight, bias, mask, stride, padding, dilation):
    """DCNv2 written with ``F.grid_sample`` (bilinear, zeros outside, align_corners)
    and one ``einsum``: a sampler independent of refimpl and of torchvision. Weight
    groups are handled by a block-diagonal dense weight."""
    n, c_in, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    groups = c_in // c_per_group
    ho, wo = offset.shape[2:]
    g_d = offset.shape[1] // (2 * kh * kw)
    a, b = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    rows = torch.arange(ho).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(wo).view(1, -1) * stride[1] - padding[1]
    off = offset.view(n, g_d, kh * kw, 2, ho, wo)
    py = rows + dilation[0] * a.reshape(-1, 1, 1) + off[:, :, :, 0]
    px = cols + dilation[1] * b.reshape(-1, 1, 1) + off[:, :, :, 1]
    # pixel -> [-1, 1] with align_corners=True; a size-1 axis maps its pixel to 0
    gy = 2 * py / (h - 1) - 1 if h > 1 else 2 * py
    gx = 2 * px / (w - 1) - 1 if w > 1 else 2 * px
    grid = torch.stack([gx, gy], dim=-1).reshape(n * g_d, kh * kw, ho * wo, 2)
    samples = F.grid_sample(
        x.reshape(n * g_d, c_in // g_d, h, w), grid, align_corners=True
    ).view(n, g_d, c_in // g_d, kh * kw, ho, wo)
    if mask is not None:
        samples = samples * mask.view(n, g_d, 1, kh * kw, ho, wo)
    dense = weight.new_zeros(c_out, c_in, kh * kw)
    per_out = c_out // groups
    for gi in range(groups):
        rows_o = slice(gi * per_out, (gi + 1) * per_out)
        cols_c = slice(gi * c_per_group, (gi + 1) * c_per_group)
        dense[rows_o, cols_c] = weight[rows_o].reshape(per_out, c_per_group, -1)
    out = torch.einsum(
        "nctyx,oct->noyx", samples.reshape(n, c_in, kh * kw, ho, wo), dense
    )
    return out + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("case", LOOP_CASES)
def test_matches_grid_sample(case):
    # grid_sample with align_corners=True and zero padding reads a point p of pixel
    # coordinates exactly as torchvision's deformable kernel does: the same four
    # corners, each kept only inside the image; the two agree in value and gradient
    n, c_in, c_out, hw, kernel, s, p, d, g, og, masked = case
    tensors, kwargs = _problem(n, c_in, c_out, hw, kernel, s, p, d, g, og, True)
    x, offset, weight, bias, mask = tensors
    if not masked:
        tensors = (x, offset, weight, bias, None)

    def reference(x, offset, weight, bias, mask, stride, padding, dilation):
        return _grid_sample_deform(
            x, offset, weight, bias, mask, stride, padding, dilation
        )

    _assert_same(deform_conv2d, reference, tensors, kwargs, tolerance(F64))


def test_empty_batch_has_zero_gradients():
    tensors, kwargs = _problem(0, 4, 4, (5, 5), (3, 3), padding=1)
    out = deform_conv2d(*tensors[:4], mask=tensors[4], **kwargs)
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert torch.equal(tensors[2].grad, torch.zeros_like(tensors[2]))


def test_borders_and_integer_points_match_torchvision():
    """Sampling points exactly on integers, on -1, 0, H-1, H, just inside and far
    outside: values and every gradient as torchvision (one-sided derivatives)."""
    h = w = 5
    kh = kw = 3
    ho = wo = 5  # padding 1
    targets = torch.tensor(
        [
            -100.0,
            -2.0,
            -1.5,
            -1.0,
            -0.5,
            0.0,
            0.25,
            1.0,
            2.5,
            3.0,
            4.0,
            4.5,
            5.0,
            5.5,
            6.0,
            100.0,
        ],
        dtype=F64,
    )
    g = torch.Generator().manual_seed(3)

    def pick():
        return targets[torch.randint(len(targets), (2, 9, ho, wo), generator=g)]

    ty, tx = pick(), pick()
    # base grid of tap (i, j) at output (y, x) with padding 1
    tap = torch.arange(3, dtype=F64) - 1
    rows = tap.repeat_interleave(3)[:, None, None]
    base_y = torch.arange(ho, dtype=F64)[:, None] + rows
    base_x = torch.arange(wo, dtype=F64)[None, :] + tap.repeat(3)[:, None, None]
    offset = torch.stack((ty - base_y, tx - base_x), dim=2).reshape(2, 18, ho, wo)
    x = randn(2, 3, h, w, seed=1, requires_grad=True)
    weight = randn(4, 3, kh, kw, seed=2, requires_grad=True)
    bias = randn(4, seed=3, requires_grad=True)
    mask = randn(2, 9, ho, wo, seed=4).requires_grad_()
    tensors = (x, offset.requires_grad_(), weight, bias, mask)
    kwargs = {"padding": 1}
    _assert_same(deform_conv2d, tv_ops.deform_conv2d, tensors, kwargs, tolerance(F64))


def test_noncontiguous_and_channels_last_input(device):
    tensors, kwargs = _problem(
        2, 4, 5, (6, 7), (3, 3), padding=1, offset_groups=2, device=device
    )
    x, offset, weight, bias, mask = tensors
    expected = tv_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
    strided = torch.cat([x, x], dim=1)[:, ::2]
    assert not strided.is_contiguous()
    expected_strided = tv_ops.deform_conv2d(
        strided, offset, weight, bias, mask=mask, **kwargs
    )
    torch.testing.assert_close(
        deform_conv2d(strided, offset, weight, bias, mask=mask, **kwargs),
        expected_strided,
        **tolerance(F64),
    )
    cl = x.detach().to(memory_format=torch.channels_last)
    out = deform_conv2d(
        cl,
        offset.transpose(2, 3).contiguous().transpose(2, 3),
        weight,
        bias,
        mask=mask,
        **kwargs,
    )
    torch.testing.assert_close(out, expected, **tolerance(F64))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_chunked_columns_agree(monkeypatch):
    """A tiny column budget forces many chunks; results must not change."""
    tensors, kwargs = _problem(
        3, 4, 6, (7, 6), (3, 2), padding=1, groups=2, offset_groups=2
    )
    expected = _values_and_grads(tv_ops.deform_conv2d, tensors, kwargs)
    monkeypatch.setattr(deform, "COLUMN_BUDGET", 50)
    out, grads = _values_and_grads(deform_conv2d, tensors, kwargs)
    torch.testing.assert_close(out, expected[0], **tolerance(F64))
    for a, b in zip(grads, expected[1]):
        torch.testing.assert_close(a, b, **tolerance(F64))


def test_no_grad_path_equals_grad_path():
    tensors, kwargs = _problem(2, 4, 4, (6, 6), (3, 3), padding=1)
    with torch.no_grad():
        a = deform_conv2d(*tensors[:4], mask=tensors[4], **kwargs)
    b = deform_conv2d(*tensors[:4], mask=tensors[4], **kwargs)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize(
    "c_in, c_out, groups",
    # groups = 1: the dense path; groups 4 > offset groups 2: the tap-by-tap path
    [(2, 2, 1), (4, 8, 4)],
    ids=["dense", "tap-by-tap"],
)
def test_gradcheck(masked, c_in, c_out, groups):
    tensors, kwargs = _problem(
        1,
        c_in,
        c_out,
        (3, 4),
        (2, 2),
        padding=(1, 0),
        dilation=(1, 2),
        groups=groups,
        offset_groups=2,
        masked=masked,
        scale=1.3,
        seed=5,
    )
    inputs = [t for t in tensors if t is not None]

    def fn(*args):
        x, offset, weight, bias = args[:4]
        return deform_conv2d(
            x, offset, weight, bias, mask=args[4] if masked else None, **kwargs
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


# --- identities ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, s, p, d, g", [((3, 3), 1, 1, 1, 1), ((2, 3), (2, 1), (0, 2), (2, 1), 2)]
)
def test_zero_offsets_is_plain_convolution(k, s, p, d, g, device):
    tensors, kwargs = _problem(
        2, 4, 6, (7, 8), k, s, p, d, g, offset_groups=2, masked=False, device=device
    )
    x, offset, weight, bias, _ = tensors
    out = deform_conv2d(x, torch.zeros_like(offset), weight, bias, **kwargs)
    expected = F.conv2d(x, weight, bias, groups=g, **kwargs)
    torch.testing.assert_close(out, expected, **tolerance(F64))
    ones = torch.ones(2, 2 * k[0] * k[1], *out.shape[2:], dtype=F64, device=device)
    out = deform_conv2d(x, torch.zeros_like(offset), weight, bias, mask=ones, **kwargs)
    torch.testing.assert_close(out, expected, **tolerance(F64))


def test_integer_offsets_shift_the_taps():
    """The same integer offset (dy, dx) on every tap and position reads the
    plain convolution of the zero-extended input at a translated window."""
    x = randn(2, 3, 8, 9, seed=0)
    weight = randn(4, 3, 3, 3, seed=1)
    pad = 5
    plain = F.conv2d(F.pad(x, (pad, pad, pad, pad)), weight)
    for dy, dx in [(1, -2), (-3, 0), (2, 2)]:
        offset = torch.tensor([float(dy), float(dx)], dtype=F64).repeat(9)
        offset = offset.view(1, 18, 1, 1).expand(2, 18, 8, 9)
        top, left = pad - 1 + dy, pad - 1 + dx  # padding 1 of the deformable conv
        torch.testing.assert_close(
            deform_conv2d(x, offset, weight, padding=1),
            plain[:, :, top : top + 8, left : left + 9],
            **tolerance(F64),
        )


def test_zero_mask_gives_the_bias():
    tensors, kwargs = _problem(2, 4, 5, (6, 6), (3, 3), padding=1, offset_groups=2)
    x, offset, weight, bias, mask = tensors
    out = deform_conv2d(x, offset, weight, bias, mask=torch.zeros_like(mask), **kwargs)
    torch.testing.assert_close(
        out, bias.detach().view(1, 5, 1, 1).expand_as(out), rtol=0, atol=0
    )


# --- layout of offsets and mask, pinned against torchvision ---------------------------


def _moved_taps(fn, channel, kind):
    """Which (offset group, tap, axis) a unit value in ``channel`` moves.

    The input holds ``1000*c + 100*row + col + 1``; a one-hot weight per (input
    channel, tap) makes each output channel the sample of one tap. At output
    position (0, 0) a tap moved one row down reads 100 more, one column right 1
    more; a zero mask removes it. Returns the set of (group, tap, axis) seen to
    change, axis 0 for rows, 1 for columns, None for a mask channel.
    """
    kh, kw, groups, c_in, h, w = 2, 3, 2, 4, 6, 7
    taps = kh * kw
    c, r, q = torch.meshgrid(
        torch.arange(c_in), torch.arange(h), torch.arange(w), indexing="ij"
    )
    x = (1000 * c + 100 * r + q + 1).to(F64)[None]
    weight = torch.zeros(c_in * taps, c_in, kh, kw, dtype=F64)
    for ch in range(c_in):
        for t in range(taps):
            weight[ch * taps + t, ch, t // kw, t % kw] = 1.0
    offset = torch.zeros(1, 2 * groups * taps, h - kh + 1, w - kw + 1, dtype=F64)
    mask = torch.ones(1, groups * taps, h - kh + 1, w - kw + 1, dtype=F64)
    base = fn(x, offset, weight, mask=mask)
    if kind == "offset":
        offset[0, channel] = 1.0
    else:
        mask[0, channel] = 0.0
    change = (fn(x, offset, weight, mask=mask) - base)[0, :, 0, 0]
    axis = {100.0: 0, 1.0: 1}
    found = set()
    for o in torch.nonzero(change).flatten().tolist():
        ch, t = divmod(o, taps)
        moved = axis[change[o].item()] if kind == "offset" else None
        found.add((ch // (c_in // groups), t, moved))
    return found


@pytest.mark.parametrize("kind", ["offset", "mask"])
def test_offset_and_mask_layout_pinned_against_torchvision(kind):
    taps, groups = 6, 2
    channels = 2 * groups * taps if kind == "offset" else groups * taps
    for channel in range(channels):
        if kind == "offset":
            group, rest = divmod(channel, 2 * taps)
            expected = {(group, rest // 2, rest % 2)}
        else:
            expected = {(channel // taps, channel % taps, None)}
        assert _moved_taps(tv_ops.deform_conv2d, channel, kind) == expected
        assert _moved_taps(deform_conv2d, channel, kind) == expected


def test_offset_channel_parity_is_dy_then_dx():
    """Even offset channels move rows (dy), odd ones move columns (dx)."""
    x = torch.arange(30, dtype=F64).view(1, 1, 5, 6)  # value = 6*row + col
    weight = torch.ones(1, 1, 1, 1, dtype=F64)
    for fn in (deform_conv2d, tv_ops.deform_conv2d):
        dy = torch.zeros(1, 2, 5, 6, dtype=F64)
        dy[:, 0] = 0.5
        dx = torch.zeros(1, 2, 5, 6, dtype=F64)
        dx[:, 1] = 0.5
        rows = fn(x, dy, weight)[0, 0, :4] - x[0, 0, :4]
        cols = fn(x, dx, weight)[0, 0, :, :5] - x[0, 0, :, :5]
        assert torch.allclose(rows, torch.full_like(rows, 3.0))  # half a row = 3
        assert torch.allclose(cols, torch.full_like(cols, 0.5))


# --- dtypes, autocast, compile -------------------------------------------------------


def test_autocast_cpu_bfloat16():
    tensors, kwargs = _problem(
        2,
        8,
        8,
        (9, 9),
        (3, 3),
        padding=1,
        offset_groups=2,
        dtype=torch.float32,
        scale=1.5,
    )
    x, offset, weight, bias, mask = tensors
    expected = tv_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=1e-1)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)

    layer = DeformConv2d(8, 8, 3, padding=1, modulated=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 8, 9, 9)


def test_float32_matches_torchvision():
    tensors, kwargs = _problem(
        2, 8, 8, (9, 9), (3, 3), padding=1, offset_groups=2, dtype=torch.float32
    )
    x, offset, weight, bias, mask = tensors
    torch.testing.assert_close(
        deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs),
        tv_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs),
        rtol=1e-4,
        atol=1e-4,
    )


def test_torch_compile_does_not_break_it():
    layer = DeformConv2d(4, 4, 3, padding=1, modulated=True).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.1)
    x = randn(2, 4, 6, 6, seed=0)
    compiled = torch.compile(layer, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x), **tolerance(F64))


# --- the module ----------------------------------------------------------------------


@pytest.mark.parametrize("modulated", [False, True])
def test_fresh_module_is_the_plain_convolution(modulated, device):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(
        6, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, dtype=F64
    )
    torch.manual_seed(0)
    layer = DeformConv2d(
        6,
        4,
        (3, 2),
        stride=(2, 1),
        padding=1,
        dilation=(1, 2),
        groups=2,
        offset_groups=3,
        modulated=modulated,
        dtype=F64,
    )
    # same initialisation, drawn in the same order
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    conv, layer = conv.to(device), layer.to(device)
    x = randn(3, 6, 9, 8, seed=1, device=device)
    torch.testing.assert_close(layer(x), conv(x), **tolerance(F64))


def test_mask_scale_one_halves_a_fresh_layer():
    """mmcv's sigmoid mask (mask_scale=1) starts at 0.5: half the convolution."""
    torch.manual_seed(0)
    layer = DeformConv2d(3, 5, 3, padding=1, modulated=True, mask_scale=1.0, dtype=F64)
    x = randn(2, 3, 6, 6, seed=1)
    plain = F.conv2d(x, layer.weight, None, padding=1)
    expected = 0.5 * plain + layer.bias.view(1, 5, 1, 1)
    torch.testing.assert_close(layer(x), expected, **tolerance(F64))


def test_module_uses_its_predicted_offsets_and_mask():
    layer = DeformConv2d(
        4, 6, 3, stride=2, padding=1, offset_groups=2, modulated=True, dtype=F64
    )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        layer.conv_offset.weight.normal_(0, 0.2, generator=gen)
        layer.conv_offset.bias.normal_(0, 0.5, generator=gen)
    x = randn(2, 4, 9, 9, seed=2)
    sampling = layer.dynamic_tensors(x)
    assert sampling._fields == ("offset", "mask")
    offset, mask = sampling
    assert offset.shape == (2, 2 * 2 * 9, 5, 5) and mask.shape == (2, 2 * 9, 5, 5)
    logits = layer.conv_offset(x)[:, 36:]
    torch.testing.assert_close(mask, 2 * torch.sigmoid(logits))
    expected = tv_ops.deform_conv2d(
        x, offset, layer.weight, layer.bias, stride=2, padding=1, mask=mask
    )
    torch.testing.assert_close(layer(x), expected, **tolerance(F64))
    assert DeformConv2d(4, 6, 3).dynamic_tensors(x.float()).mask is None


def test_module_state_dict_and_dtype():
    a = DeformConv2d(4, 4, 3, padding=1, modulated=True)
    b = DeformConv2d(4, 4, 3, padding=1, modulated=True)
    with torch.no_grad():
        a.conv_offset.weight.normal_()
    b.load_state_dict(a.state_dict())
    x = randn(1, 4, 5, 5, seed=0, dtype=torch.float32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert set(a.state_dict()) == {
        "weight",
        "bias",
        "conv_offset.weight",
        "conv_offset.bias",
    }
    assert a.double()(x.double()).dtype == F64
    # nn.Conv2d's rule: options at their default are left out
    assert "modulated=True" in repr(a) and "offset_groups" not in repr(a)
    assert "mask_scale" not in repr(a)
    text = repr(DeformConv2d(4, 4, 3, offset_groups=2, modulated=True, mask_scale=1.0))
    assert "offset_groups=2, modulated=True, mask_scale=1.0" in text


def test_module_backward_reaches_every_parameter():
    layer = DeformConv2d(4, 4, 3, padding=1, modulated=True)
    layer(randn(2, 4, 6, 6, seed=0, dtype=torch.float32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- errors --------------------------------------------------------------------------


def _good():
    x = torch.randn(2, 4, 6, 6)
    offset = torch.randn(2, 18, 6, 6)
    weight = torch.randn(4, 4, 3, 3)
    mask = torch.rand(2, 9, 6, 6)
    return x, offset, weight, mask


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda a: a.update(offset=torch.randn(2, 17, 6, 6)),
            r"offset with 2 \* offset_groups \* kh \* kw channels, a positive multiple "
            r"of 18, got 17",
        ),
        (
            lambda a: a.update(offset=torch.randn(2, 54, 6, 6)),
            r"3 offset groups to divide C_in = 4",
        ),
        (
            lambda a: a.update(offset=torch.randn(2, 18, 5, 6)),
            r"offset of shape \[2, 18, 6, 6\] .* got \[2, 18, 5, 6\]",
        ),
        (
            lambda a: a.update(offset=torch.randn(3, 18, 6, 6)),
            r"offset of shape \[2, 18, 6, 6\] .* got \[3, 18, 6, 6\]",
        ),
        (
            lambda a: a.update(mask=torch.rand(2, 18, 6, 6)),
            r"mask of shape \[2, 9, 6, 6\] .* got \[2, 18, 6, 6\]",
        ),
        (
            lambda a: a.update(mask=torch.rand(2, 9, 6)),
            r"mask with 4 dimensions, got 3",
        ),
        (
            lambda a: a.update(weight=torch.randn(4, 3, 3, 3)),
            r"second size divides C_in = 4, got \(4, 3, 3, 3\)",
        ),
        (
            lambda a: a.update(weight=torch.randn(3, 2, 3, 3)),
            r"2 weight groups .* to divide C_out = 3",
        ),
        (
            lambda a: a.update(bias=torch.randn(5)),
            r"bias of shape \[4\] \(C_out\), got \[5\]",
        ),
        (
            lambda a: a.update(
                x=torch.randn(2, 4, 1, 1),
                offset=torch.randn(2, 50, 1, 1),
                weight=torch.randn(4, 4, 5, 5),
                mask=None,
            ),
            r"output of at least 1x1, got -1x-1",
        ),
    ],
)
def test_bad_shapes_raise_value_error(change, match):
    x, offset, weight, mask = _good()
    args = {"x": x, "offset": offset, "weight": weight, "mask": mask, "bias": None}
    change(args)
    with pytest.raises(ValueError, match=match):
        deform_conv2d(
            args["x"],
            args["offset"],
            args["weight"],
            args["bias"],
            padding=1,
            mask=args["mask"],
        )
    with pytest.raises(ValueError, match=match):
        deform_conv2d_reference(
            args["x"],
            args["offset"],
            args["weight"],
            args["bias"],
            padding=1,
            mask=args["mask"],
        )


def test_bad_types_raise_type_error():
    x, offset, weight, mask = _good()
    with pytest.raises(TypeError, match="expected input with a floating-point dtype"):
        deform_conv2d(x.long(), offset, weight, padding=1)
    with pytest.raises(TypeError, match="expected offset to be a torch.Tensor"):
        deform_conv2d(x, offset.tolist(), weight, padding=1)
    with pytest.raises(TypeError, match="expected stride to be an int or a pair"):
        deform_conv2d(x, offset, weight, stride=1.5)


def test_module_errors():
    with pytest.raises(ValueError, match="expected groups to divide in_channels"):
        DeformConv2d(6, 4, 3, groups=4)
    with pytest.raises(
        ValueError,
        match="DeformConv2d expected offset_groups to "
        "divide in_channels, got in_channels=6, offset_groups=4",
    ):
        DeformConv2d(6, 6, 3, offset_groups=4)
    with pytest.raises(ValueError, match="DeformConv2d expected mask_scale > 0"):
        DeformConv2d(4, 4, 3, modulated=True, mask_scale=0.0)
    with pytest.raises(TypeError, match="DeformConv2d expected modulated to be a bool"):
        DeformConv2d(4, 4, 3, modulated=1)
    layer = DeformConv2d(4, 4, 3)
    with pytest.raises(
        ValueError, match="DeformConv2d expected input with 4 channels, got 3"
    ):
        layer(torch.randn(1, 3, 5, 5))
    for bad in (torch.randn(4, 5), torch.randn(1, 1, 4, 5, 5)):
        with pytest.raises(
            ValueError,
            match=r"DeformConv2d expected input of shape \[N, C_in, H, W\] or "
            rf"\[C_in, H, W\], got {bad.dim()} dimensions",
        ):
            layer(bad)
    # the functional form takes batches only
    x, offset, weight, mask = _good()
    with pytest.raises(ValueError, match="deform_conv2d expected input with 4 dim"):
        deform_conv2d(x[0], offset, weight, padding=1, mask=mask)


def test_module_unbatched_input_is_a_batch_of_one():
    layer = DeformConv2d(
        4, 6, 3, stride=2, padding=1, offset_groups=2, modulated=True, dtype=F64
    )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        layer.conv_offset.weight.normal_(0, 0.2, generator=gen)
    x = randn(4, 9, 8, seed=3)
    out = layer(x)
    assert out.shape == (6, 5, 4)
    torch.testing.assert_close(out, layer(x[None])[0], **tolerance(F64))
    for got, want in zip(layer.dynamic_tensors(x), layer.dynamic_tensors(x[None])):
        torch.testing.assert_close(got, want, **tolerance(F64))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("modulated", [False, True])
def test_fresh_module_with_padding_strings_is_plain_conv(padding, modulated):
    # "same" pads kernel (2, 3) with dilation (2, 1) symmetrically, kernel (3, 2)
    # asymmetrically (one more column on the right), both as nn.Conv2d
    for kernel, dilation in (((2, 3), (2, 1)), ((3, 2), 1)):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(
            4, 6, kernel, padding=padding, dilation=dilation, groups=2, dtype=F64
        )
        torch.manual_seed(0)
        layer = DeformConv2d(
            4,
            6,
            kernel,
            padding=padding,
            dilation=dilation,
            groups=2,
            modulated=modulated,
            dtype=F64,
        )
        assert layer.padding == conv.padding
        x = randn(2, 4, 7, 6, seed=4)
        out = layer(x)
        assert out.shape == conv(x).shape
        torch.testing.assert_close(out, conv(x), **tolerance(F64))


# --- the tap-by-tap path (weight groups inside offset groups) ------------------------

BY_TAP_CASES = [
    # (n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, offset_groups,
    #  masked)
    # depthwise, groups == C_in
    (2, 3, 3, (5, 4), (3, 3), 1, 1, 1, 3, 1, True),
    # depthwise with a channel multiplier of 2, two offset groups, every size
    # argument a non-square pair
    (1, 4, 8, (5, 6), (2, 3), (2, 1), (1, 2), (2, 1), 4, 2, True),
    # 1 < groups < C_in (three channels per group), DCNv1
    (1, 6, 4, (5, 4), (3, 2), 1, (1, 0), (1, 2), 2, 1, False),
    # two weight groups in each of two offset groups, stride 2
    (2, 8, 8, (4, 5), (2, 2), 2, 1, 1, 4, 2, True),
]


@pytest.mark.parametrize(
    "groups, offset_groups, expected",
    [
        (1, 1, False),  # dense
        (2, 1, True),
        (96, 1, True),  # depthwise
        (4, 2, True),
        (2, 2, False),  # as many offset groups as weight groups
        (2, 4, False),
        (3, 2, False),  # not nested
    ],
)
def test_tap_by_tap_rule(groups, offset_groups, expected):
    assert deform._tap_by_tap(groups, offset_groups) is expected


@pytest.mark.parametrize("case", BY_TAP_CASES)
def test_tap_by_tap_matches_literal_loops(case, monkeypatch):
    n, c_in, c_out, hw, k, s, p, d, g, og, masked = case
    calls = []

    def spy(*args):
        calls.append(args[1].shape)
        return by_tap(*args)

    by_tap = deform._deform_rows_by_tap
    monkeypatch.setattr(deform, "_deform_rows_by_tap", spy)
    tensors, kwargs = _problem(n, c_in, c_out, hw, k, s, p, d, g, og, masked)
    _assert_same(
        deform_conv2d, deform_conv2d_reference, tensors, kwargs, tolerance(F64)
    )
    assert calls  # the values and gradients above are the tap-by-tap path's


@pytest.mark.parametrize("case", BY_TAP_CASES)
def test_tap_by_tap_matches_torchvision(case, device):
    n, c_in, c_out, hw, k, s, p, d, g, og, masked = case
    tensors, kwargs = _problem(
        n, c_in, c_out, hw, k, s, p, d, g, og, masked, scale=3.0, device=device
    )
    _assert_same(deform_conv2d, tv_ops.deform_conv2d, tensors, kwargs, tolerance(F64))


def test_tap_by_tap_chunks_and_no_grad_agree(monkeypatch):
    tensors, kwargs = _problem(
        3, 4, 8, (7, 6), (3, 2), padding=1, groups=4, offset_groups=2
    )
    expected = _values_and_grads(tv_ops.deform_conv2d, tensors, kwargs)
    monkeypatch.setattr(deform, "COLUMN_BUDGET", 50)
    out, grads = _values_and_grads(deform_conv2d, tensors, kwargs)
    torch.testing.assert_close(out, expected[0], **tolerance(F64))
    for a, b in zip(grads, expected[1]):
        torch.testing.assert_close(a, b, **tolerance(F64))
    with torch.no_grad():
        again = deform_conv2d(*tensors[:4], mask=tensors[4], **kwargs)
    torch.testing.assert_close(again, out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("n", [0, 2])
def test_tap_by_tap_zero_offsets_and_empty_batch(n):
    tensors, kwargs = _problem(n, 6, 12, (5, 5), (3, 3), padding=1, groups=6)
    x, offset, weight, bias, mask = tensors
    offset = torch.zeros_like(offset)
    out = deform_conv2d(x, offset, weight, bias, padding=1)
    plain = F.conv2d(x, weight, bias, padding=1, groups=6)
    torch.testing.assert_close(out, plain, **tolerance(F64))
    (g_x, g_w) = torch.autograd.grad(out.sum(), (x, weight))
    assert g_x.shape == x.shape and g_w.shape == weight.shape
    if n == 0:
        assert not g_w.any()


def test_tap_by_tap_module_and_compile():
    layer = DeformConv2d(4, 8, 3, padding=1, groups=4, offset_groups=2)
    layer = layer.double()
    x = randn(2, 4, 6, 5, seed=0)
    conv = F.conv2d(x, layer.weight, layer.bias, padding=1, groups=4)
    torch.testing.assert_close(layer(x), conv, **tolerance(F64))  # fresh layer
    layer = DeformConv2d(4, 4, 3, padding=1, groups=4, modulated=True).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(
            0, 0.3, generator=torch.Generator().manual_seed(1)
        )
    offset, mask = layer._dynamic(x)
    expected = deform_conv2d_reference(
        x, offset, layer.weight, layer.bias, padding=1, mask=mask
    )
    torch.testing.assert_close(layer(x), expected, **tolerance(F64))
    compiled = torch.compile(layer, backend="eager")
    torch.testing.assert_close(compiled(x), expected, **tolerance(F64))
