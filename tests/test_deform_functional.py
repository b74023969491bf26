"""Tests for refimpl.deform.deform_conv2d: non-finite values, compile, export, trace.

Offsets are drawn on a grid of eighths shifted by 1/16, so that no sampling
point is an integer (where torchvision multiplies a zero bilinear weight by the
pixel, see ``deform_conv2d``'s docstring) and every point is exact in float16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tv_ops  # a requirement: never skipped

import refimpl.deform as deform
from refimpl.deform import DeformConv2d, deform_conv2d, deform_conv2d_reference

from conftest import randn

F32, F16, F64 = torch.float32, torch.float16, torch.float64
INF, NAN = float("inf"), float("nan")
# float16 sums of 18 products of O(1) terms, against torchvision's own float16
TOL = {F32: {"rtol": 1e-4, "atol": 1e-4}, F16: {"rtol": 1e-2, "atol": 3e-2}}


def _problem(dtype, groups=2, offset_groups=2, hw=5, n=2, c_in=4, c_out=6, seed=0):
    """``[x, offset, weight, bias, mask]`` for a 3x3 kernel with padding 1."""
    taps = 9
    offset = randn(n, 2 * offset_groups * taps, hw, hw, seed=seed + 3)
    offset = (offset * 12).round() / 8 + 1 / 16  # about 1.5 px, some points outside
    tensors = [
        randn(n, c_in, hw, hw, seed=seed),
        offset,
        randn(c_out, c_in // groups, 3, 3, seed=seed + 1),
        randn(c_out, seed=seed + 2),
        randn(n, offset_groups * taps, hw, hw, seed=seed + 4).sigmoid(),
    ]
    return [t.to(dtype) for t in tensors]


def _run(fn, tensors, grads=True):
    """Output and the gradients of every tensor argument (loss: sum of the
    squared finite outputs)."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(grads) for t in tensors
    ]
    x, offset, weight, bias, mask = leaves
    out = fn(x, offset, weight, bias, padding=1, mask=mask)
    if not grads:
        return out.detach(), None
    finite = torch.isfinite(out)
    torch.where(finite, out, 0).square().sum().backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _reference(tensors):
    """The literal loops in float64."""
    x, offset, weight, bias, mask = (None if t is None else t.to(F64) for t in tensors)
    return deform_conv2d_reference(x, offset, weight, bias, padding=1, mask=mask)


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, **tol)


# --- non-finite values ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16])
def test_infinite_offsets_read_zero_like_torchvision(dtype):
    tensors = _problem(dtype)
    far = [t.clone() for t in tensors]
    offset = tensors[1]
    # one coordinate, the other one, both, both signs, in both offset groups
    for (b, ch, i, j), value in [
        ((0, 0, 1, 1), INF),
        ((0, 3, 2, 2), -INF),
        ((1, 20, 4, 4), INF),
        ((1, 21, 4, 4), -INF),
        ((1, 30, 0, 3), -INF),
        ((1, 31, 0, 3), -INF),
    ]:
        offset[b, ch, i, j] = value
        far[1][b, ch, i, j] = 1e4 if value > 0 else -1e4
    out, grads = _run(deform_conv2d, tensors)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads)
    # infinitely far away is outside the image, like any point far away
    _close(out, _run(deform_conv2d, far, grads=False)[0], **TOL[dtype])
    expected, tv_grads = _run(tv_ops.deform_conv2d, tensors, grads=dtype == F32)
    _close(out, expected, **TOL[dtype])
    if dtype == F32:
        _close(out, _reference(tensors), **TOL[dtype])
        for name, g, g_tv in zip(
            ["input", "offset", "weight", "bias", "mask"], grads, tv_grads
        ):
            if name == "offset":
                # torchvision's offset gradient is NaN at an infinite offset;
                # the point is outside, so the gradient there is 0
                assert (g[~torch.isfinite(offset)] == 0).all()
                keep = torch.isfinite(g_tv)
                _close(g[keep], g_tv[keep], **TOL[dtype])
            else:
                _close(g, g_tv, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dy, dx", [(NAN, None), (None, NAN), (NAN, -INF)])
def test_nan_offset_is_nan_exactly_where_it_is_read(dtype, groups, dy, dx):
    tensors = _problem(dtype, groups=groups, offset_groups=2)
    clean = [t.clone() for t in tensors]
    # offset group 1 (input channels 2, 3), tap 2 = (0, 2), sample 1, position (3, 2)
    tap = 9 + 2
    for coordinate, value in enumerate((dy, dx)):
        if value is not None:
            tensors[1][1, 2 * tap + coordinate, 3, 2] = value
    out, grads = _run(deform_conv2d, tensors)
    # the output channels whose weight group holds channels 2, 3
    rows = slice(3, 6) if groups == 2 else slice(None)
    readers = _at(out, (1, rows, 3, 2))
    assert torch.equal(torch.isnan(out), readers)
    assert torch.isfinite(out[~readers]).all()
    unchanged = _run(deform_conv2d, clean, grads=False)[0]
    assert torch.equal(out[~readers], unchanged[~readers])
    if dtype == F32:
        _close(out, _reference(tensors), **TOL[dtype])
        g_input, g_offset, g_weight, g_bias, g_mask = grads
        assert torch.isfinite(g_input).all() and torch.isfinite(g_bias).all()
        bad = ~torch.isfinite(g_offset)
        assert not bad[~_at(g_offset, (1, [2 * tap, 2 * tap + 1], 3, 2))].any()
        bad = ~torch.isfinite(g_mask)
        assert not bad[~_at(g_mask, (1, tap, 3, 2))].any()
        # weight[o, c, 0, 2] of the outputs above and the channels of group 1
        cols = slice(None) if groups == 2 else slice(2, 4)
        bad = ~torch.isfinite(g_weight)
        assert not bad[~_at(g_weight, (rows, cols, 0, 2))].any()


def _at(t, index):
    """A boolean tensor like ``t``, True at ``t[index]``."""
    where = torch.zeros_like(t, dtype=torch.bool)
    where[index] = True
    return where


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("value", [INF, -INF, NAN])
def test_nonfinite_pixels_match_torchvision_and_the_reference(dtype, value):
    tensors = _problem(dtype)
    x = tensors[0]
    # inside, on the border, in the corner; one sample and channel each
    x[0, 1, 2, 3] = x[1, 2, 0, 0] = x[1, 3, 4, 2] = x[0, 0, 4, 4] = value
    out, grads = _run(deform_conv2d, tensors)
    assert 0 < (~torch.isfinite(out)).sum() < out.numel() // 2  # local
    expected, tv_grads = _run(tv_ops.deform_conv2d, tensors, grads=dtype == F32)
    _close(out, expected, **TOL[dtype])
    _close(out, _reference(tensors), **TOL[dtype])
    if dtype == F32:
        for name, g, g_tv in zip(
            ["input", "offset", "weight", "bias", "mask"], grads, tv_grads
        ):
            _close(g, g_tv, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
    else:  # the same pattern as in float32
        out32 = _run(deform_conv2d, [t.float() for t in tensors], grads=False)[0]
        assert torch.equal(torch.isnan(out), torch.isnan(out32))
        assert torch.equal(torch.isinf(out), torch.isinf(out32))


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("value", [INF, NAN])
def test_nonfinite_pixel_at_integer_points_reaches_only_its_readers(dtype, value):
    # Zero offsets: every point is an integer, and the neighbours below and to
    # the right of it have bilinear weight 0. They must not turn inf into NaN:
    # the result is the plain convolution's, non-finite pattern included.
    x, offset, weight, bias, mask = _problem(F32)
    x[0, 1, 2, 3] = x[1, 2, 0, 0] = x[1, 3, 4, 4] = value
    offset = torch.zeros_like(offset)
    args = [t.to(dtype) for t in (x, offset, weight, bias)]
    out, grads = _run(deform_conv2d, args + [None])
    conv = F.conv2d(x, weight, bias, padding=1, groups=2)
    _close(out, conv, **TOL[dtype])
    if dtype == F32:
        _close(out, _reference(args + [None]), **TOL[dtype])
    assert torch.isfinite(grads[0]).all()
    # Only the corner pixel (0, 0) is untouched by torchvision's zero weights
    # (its zero-weight readers lie on the line -1, which torchvision skips).
    x_corner = x.clone()
    x_corner[0, 1, 2, 3] = x_corner[1, 3, 4, 4] = 0.0
    args = [t.to(dtype) for t in (x_corner, offset, weight, bias)] + [None]
    out = _run(deform_conv2d, args, grads=False)[0]
    _close(out, _run(tv_ops.deform_conv2d, args, grads=False)[0], **TOL[dtype])


@pytest.mark.parametrize("modulated", [False, True])
def test_module_with_a_nan_pixel_is_nan_only_around_it(modulated):
    # A fresh layer predicts its offsets from the input: NaN offsets around the
    # pixel (this used to raise an index error in embedding_bag).
    torch.manual_seed(0)
    layer = DeformConv2d(4, 6, 3, padding=1, modulated=modulated)
    x = randn(2, 4, 7, 7, dtype=F32, requires_grad=True)
    with torch.no_grad():
        x[1, 2, 3, 5] = NAN
    out = layer(x)
    window = torch.zeros(2, 7, 7, dtype=torch.bool)
    window[1, 2:5, 4:7] = True
    assert torch.equal(torch.isnan(out).any(1), window)
    assert torch.isnan(out[1, :, 2:5, 4:7]).all()
    torch.where(torch.isnan(out), 0, out).sum().backward()


# --- torch.compile, torch.export, torch.jit.trace -------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_with_dynamic_batch_and_size_compiles_once(fresh_dynamo, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    # eager runs in many chunks; the compiled graph in one
    monkeypatch.setattr(deform, "COLUMN_BUDGET", 2048)
    # groups=1: no size of the first call equals another one (duck sizing would
    # tie them together, and a later batch of that size would recompile)
    weight, bias = randn(6, 4, 3, 3, seed=1, dtype=F32), randn(6, seed=2, dtype=F32)

    def fn(x, offset, mask):
        return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(fn, backend=counter, dynamic=True)
    for hw in (7, 10):
        for n in range(2, 13):
            x, offset, _, _, mask = _problem(F32, groups=1, hw=hw, n=n, seed=n)
            torch.testing.assert_close(compiled(x, offset, mask), fn(x, offset, mask))
    assert counter.frame_count == 1
    # the single-chunk graph has the gradients of the chunked eager path
    x, offset, _, _, mask = (
        t.requires_grad_() for t in _problem(F32, groups=1, hw=7, n=3, seed=3)
    )
    grads = torch.autograd.grad(compiled(x, offset, mask).sum(), (x, offset, mask))
    expected = torch.autograd.grad(fn(x, offset, mask).sum(), (x, offset, mask))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert counter.frame_count == 2  # one more graph: inputs that require grad


class _Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(randn(6, 2, 3, 3, seed=1, dtype=F32))
        self.bias = torch.nn.Parameter(randn(6, seed=2, dtype=F32))

    def forward(self, x, offset, mask):
        return deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask)


@pytest.mark.parametrize("spatial", [False, True])
def test_export_with_a_dynamic_batch(fresh_dynamo, spatial):
    module = _Wrapper()
    x, offset, _, _, mask = _problem(F32, n=3, hw=6)
    dims = {0: torch.export.Dim("batch")}
    if spatial:
        dims |= {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    program = torch.export.export(
        module, (x, offset, mask), dynamic_shapes=(dims, dims, dims)
    )
    for n, hw in ((2, 6), (5, 6)) + (((4, 9),) if spatial else ()):
        x, offset, _, _, mask = _problem(F32, n=n, hw=hw, seed=n)
        torch.testing.assert_close(
            program.module()(x, offset, mask), module(x, offset, mask)
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_jit_trace_is_refused_with_the_supported_routes():
    x, offset, weight, bias, mask = _problem(F32)
    match = r"deform_conv2d does not support torch\.jit\.trace.*torch\.export"

    def fn(x, offset):
        return deform_conv2d(x, offset, weight, bias, padding=1)

    with pytest.raises(RuntimeError, match=match):
        torch.jit.trace(fn, (x, offset))
    with pytest.raises(RuntimeError, match=match):
        torch.jit.trace(_Wrapper(), (x, offset, mask))


# --- the tap-by-tap path (weight groups inside offset groups) ------------------------


@pytest.mark.parametrize("groups, offset_groups, c_out", [(4, 1, 8), (4, 2, 4)])
@pytest.mark.parametrize("value", [INF, NAN])
def test_tap_by_tap_nonfinite_values_match_torchvision(
    groups, offset_groups, c_out, value
):
    assert deform._tap_by_tap(groups, offset_groups)
    tensors = _problem(F32, groups, offset_groups, c_out=c_out)
    x = tensors[0]
    x[0, 1, 2, 3] = x[1, 2, 0, 0] = x[1, 3, 4, 2] = value
    out, grads = _run(deform_conv2d, tensors)
    assert 0 < (~torch.isfinite(out)).sum() < out.numel() // 2  # local
    expected, tv_grads = _run(tv_ops.deform_conv2d, tensors)
    _close(out, expected, **TOL[F32])
    _close(out, _reference(tensors), **TOL[F32])
    for name, g, g_tv in zip(
        ["input", "offset", "weight", "bias", "mask"], grads, tv_grads
    ):
        _close(g, g_tv, **TOL[F32], msg=lambda m, n=name: f"{n}: {m}")
    # a NaN coordinate (torchvision does not take one): NaN exactly where read
    tensors[1][1, 2 * (9 * (offset_groups - 1) + 4), 3, 2] = NAN  # centre tap, dy
    out = _run(deform_conv2d, tensors, grads=False)[0]
    _close(out, _reference(tensors), **TOL[F32])
    # integer points: the zero-weight neighbours of a non-finite pixel stay
    # untouched, and the result is the plain grouped convolution's
    x, offset, weight, bias, _ = tensors
    offset = torch.zeros_like(offset)
    out = _run(deform_conv2d, [x, offset, weight, bias, None], grads=False)[0]
    _close(out, F.conv2d(x, weight, bias, padding=1, groups=groups), **TOL[F32])


@pytest.mark.parametrize("spatial", [False, True])
def test_tap_by_tap_export_with_dynamic_sizes(fresh_dynamo, spatial):
    class Depthwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(randn(4, 1, 3, 3, seed=1, dtype=F32))

        def forward(self, x, offset, mask):
            return deform_conv2d(x, offset, self.weight, padding=1, mask=mask)

    module = Depthwise()
    x, offset, _, _, mask = _problem(F32, groups=4, c_out=4, n=3, hw=6)
    dims = {0: torch.export.Dim("batch")}
    if spatial:
        dims |= {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    program = torch.export.export(
        module, (x, offset, mask), dynamic_shapes=(dims, dims, dims)
    )
    for n, hw in ((2, 6), (5, 6)) + (((4, 9),) if spatial else ()):
        x, offset, _, _, mask = _problem(F32, groups=4, c_out=4, n=n, hw=hw, seed=n)
        torch.testing.assert_close(
            program.module()(x, offset, mask), module(x, offset, mask)
        )
