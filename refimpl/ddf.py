"""DDF, decoupled dynamic filters: a per-pixel filter at a depthwise convolution's cost.

Zhou, Jampani, Pi, Liu and Yang, "Decoupled Dynamic Filter Networks", CVPR 2021,
arXiv:2104.14107; official code theFoxofSky/ddfnet. Chapter 5 of the book derives
everything in this module.

A dynamic filter that differs at every pixel and in every channel would cost
``C * k * k`` predicted numbers per pixel. DDF predicts two smaller filters and
combines them: a *spatial* filter per pixel, shared by the channels (of a head),
and a *channel* filter per channel, shared by the pixels. The operator is
depthwise; in index form, with padding ``p = (k - 1) * d // 2``::

    out[n, c, y, x] = sum_{u, v < k} input[n, c, y*s - p + u*d, x*s - p + v*d] * F
    F = channel[n, c, u, v] * spatial[n, g(c)*k*k + u*k + v, y, x]    ("mul")
    F = channel[n, c, u, v] + spatial[n, g(c)*k*k + u*k + v, y, x]    ("add")

where taps outside the image are skipped (zero padding) and ``g(c)`` is the head
of channel ``c``. :func:`ddf` computes it without ever holding the per-pixel
filter ``Tensor[N, C, k*k, H, W]`` or the unfolded input: it accumulates tap by tap
over blocks of channels small enough to stay in cache, and its backward recomputes
what it needs from the three operands instead of saving more (chapter 5 measures
the cost against a depthwise convolution).

What is new here and not in the official code: the operator runs on any device
(the official one needs four compiled CUDA extensions and raises "not implemented
on CPU") and in every float dtype (the official one computes in float32 only, and
upcasts float16); it accepts any stride, not only one that divides the input size
(see :func:`ddf_output_size`); and :class:`DDFConv2d` never fails where the
official ``DDFPack`` does. ``DDFUpPack`` (broken in the official code: its forward
passes ``head`` where the combination is expected) is not reproduced.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import Conv2dBase, hidden_width
from ._validation import (
    as_int,
    autocast_enabled,
    check_bool,
    check_float_tensor,
    check_positive_int,
    check_real,
    pair,
)
from .per_sample import _recording, _windows

__all__ = [
    "COMBINES",
    "DDFConv2d",
    "DDFFilters",
    "ddf",
    "ddf_output_size",
    "ddf_reference",
    "filter_norm",
]

COMBINES = ("mul", "add")

# Elements of one block of the tap-accumulation loop: at most about 2 MB in
# float32, so that a block of the padded input and its accumulator stay in a
# core's L2 cache while the k*k taps pass over them, and at most an eighth of the
# whole, so that the block's temporaries add little to the output's memory; but
# not much smaller than 2**16 elements, where the loop drowns in per-call
# overhead (measured on the book's 2-core CPU).
_BLOCK_ELEMENTS = 1 << 19
_MIN_BLOCK_ELEMENTS = 1 << 16
_GPU_BLOCK_ELEMENTS = 1 << 22


# --- sizes and checks ---------------------------------------------------------------


def ddf_output_size(size: int, stride: int) -> int:
    """Output size of DDF along one axis: ``(size - 1) // stride + 1``.

    It is ``nn.Conv2d``'s output size for DDF's padding ``(k - 1) * d / 2``, and
    equals the official ``size // stride`` whenever the stride divides the size.
    Where it does not, the official ``DDFPack`` fails (its spatial branch gives
    ``ceil(size / stride)`` rows, reshaped to ``floor``); here the operator and
    the module both give ``ceil(size / stride)``, whose first ``floor`` rows are
    the official operator's.
    """
    return (size - 1) // stride + 1


def _check_kernel_size(kernel_size: object, *, owner: str, minimum: int = 1) -> int:
    k = as_int(kernel_size)
    if k is None and isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2:
        a, b = (as_int(v) for v in kernel_size)
        if a is not None and a == b:
            k = a
        elif a is not None and b is not None:
            raise ValueError(
                f"{owner} expected a square kernel_size (k * k taps, as the official "
                f"operator), got {tuple(kernel_size)}"
            )
    if k is None:
        raise TypeError(
            f"{owner} expected kernel_size to be an int, got "
            f"{type(kernel_size).__name__} {kernel_size!r}"
        )
    if k < minimum or k % 2 == 0:
        raise ValueError(
            f"{owner} expected an odd kernel_size >= {minimum} (the padding "
            f"(k - 1) * dilation / 2 must be whole), got {k}"
        )
    return k


def _check_combine(combine: object, *, owner: str) -> str:
    if not isinstance(combine, str) or combine not in COMBINES:
        raise ValueError(f"{owner} expected combine 'mul' or 'add', got {combine!r}")
    return combine


def _check_operands(input, channel_filter, spatial_filter, k, stride, *, owner):
    """Shapes and dtypes of :func:`ddf`'s operands; returns the number of heads."""
    x = check_float_tensor(input, "input", owner=owner, ndim=4)
    check_float_tensor(channel_filter, "channel_filter", owner=owner, ndim=4)
    check_float_tensor(spatial_filter, "spatial_filter", owner=owner, ndim=4)
    n, c, h, w = x.shape
    if tuple(channel_filter.shape) != (n, c, k, k):
        raise ValueError(
            f"{owner} expected channel_filter of shape [N, C, k, k] = "
            f"{(n, c, k, k)}, got {tuple(channel_filter.shape)}"
        )
    h_out, w_out = ddf_output_size(h, stride[0]), ddf_output_size(w, stride[1])
    taps = spatial_filter.shape[1]
    heads = taps // (k * k)
    if (
        spatial_filter.shape[0] != n
        or tuple(spatial_filter.shape[2:]) != (h_out, w_out)
        or taps == 0
        or taps % (k * k)
    ):
        raise ValueError(
            f"{owner} expected spatial_filter of shape [N, heads * k * k, H_out, "
            f"W_out] = ({n}, heads * {k * k}, {h_out}, {w_out}), got "
            f"{tuple(spatial_filter.shape)}"
        )
    if c % heads:
        raise ValueError(
            f"{owner} expected the heads of spatial_filter ({heads} = "
            f"{taps} / {k * k}) to divide the input channels, got {c} channels"
        )
    if not autocast_enabled(x.device.type):
        for name, t in (
            ("channel_filter", channel_filter),
            ("spatial_filter", spatial_filter),
        ):
            if t.dtype != x.dtype:
                raise TypeError(
                    f"{owner} expected {name} with the dtype of the input "
                    f"({x.dtype}), got {t.dtype}"
                )
    return heads


def _check_arguments(
    owner, x, channel, spatial, kernel_size, stride, dilation, combine
):
    """Every check of :func:`ddf` and :func:`ddf_reference`; returns ``(k, stride,
    dilation, combine, heads)`` parsed."""
    k = _check_kernel_size(kernel_size, owner=owner)
    stride = pair(stride, "stride", owner=owner)
    dilation = pair(dilation, "dilation", owner=owner)
    combine = _check_combine(combine, owner=owner)
    heads = _check_operands(x, channel, spatial, k, stride, owner=owner)
    return k, stride, dilation, combine, heads


# --- the literal reference ----------------------------------------------------------


def ddf_reference(
    input: Tensor,
    channel_filter: Tensor,
    spatial_filter: Tensor,
    kernel_size: int,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    combine: str = "mul",
) -> Tensor:
    """The DDF operator, literally: a loop over output pixels and taps.

    Follows the index form of the module docstring (the sum the official CUDA
    kernels compute), vectorised only over the batch and the channels: for every
    output pixel ``(y, x)`` and tap ``(u, v)`` whose input pixel lies inside the
    image, add the input pixel times the combined filter. Slow and obviously
    right; the tests check :func:`ddf` against it in float64, and chapter 5 shows
    it. Arguments as for :func:`ddf`.
    """
    k, stride, dilation, combine, heads = _check_arguments(
        "ddf_reference",
        input,
        channel_filter,
        spatial_filter,
        kernel_size,
        stride,
        dilation,
        combine,
    )
    n, c, h, w = input.shape
    h_out, w_out = spatial_filter.shape[2:]
    pad_h, pad_w = (k - 1) * dilation[0] // 2, (k - 1) * dilation[1] // 2
    head_of = torch.arange(c, device=input.device) // (c // heads)
    out = input.new_zeros(n, c, h_out, w_out)
    for y in range(h_out):
        for x in range(w_out):
            for u in range(k):
                for v in range(k):
                    row = y * stride[0] - pad_h + u * dilation[0]
                    col = x * stride[1] - pad_w + v * dilation[1]
                    if not (0 <= row < h and 0 <= col < w):
                        continue  # outside the image: zero padding
                    spatial = spatial_filter[:, head_of * k * k + u * k + v, y, x]
                    channel = channel_filter[:, :, u, v]
                    if combine == "mul":
                        weight = channel * spatial
                    else:
                        weight = channel + spatial
                    out[:, :, y, x] += input[:, :, row, col] * weight
    return out


# --- the tap-accumulation kernel ----------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision sums over k*k taps are kept in float32, as conv kernels do
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Geometry(NamedTuple):
    k: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    heads: int
    mul: bool


def _blocks(n: int, heads: int, channels: int, rows: int, cols: int, device):
    """Channel ranges of one head, each holding a block of elements.

    On the CPU a block fits the cache (``_BLOCK_ELEMENTS``); on an accelerator,
    where every operation is a kernel launch and there is no cache to fit, a
    block is a quarter of the whole (at least ``_GPU_BLOCK_ELEMENTS``), which
    keeps the temporaries small next to the output with a few dozen launches.
    """
    per_channel = max(n * heads * rows * cols, 1)
    whole = per_channel * channels
    if device.type == "cpu":
        budget = min(_BLOCK_ELEMENTS, max(_MIN_BLOCK_ELEMENTS, whole // 8))
    else:
        budget = max(_GPU_BLOCK_ELEMENTS, whole // 4)
    size = max(1, min(channels, budget // per_channel))
    return [(start, min(start + size, channels)) for start in range(0, channels, size)]


def _padded(block: Tensor, geo: _Geometry) -> Tensor:
    """A block ``Tensor[N, G, c, H, W]`` zero-padded by ``p`` on every side, plus one
    spare row at the bottom so that every tap view below stays inside each image."""
    ph, pw = geo.padding
    return F.pad(block, (pw, pw, ph, ph + 1))


def _tap_view(padded: Tensor, u: int, v: int, out_size, width: int, geo) -> Tensor:
    """The input pixels that tap ``(u, v)`` multiplies, as a strided view.

    Element ``(y, x)`` of the view is ``padded[..., y*s + u*d, x*s + v*d]``, for
    ``x < width``. With ``width`` equal to the padded row (stride 1 along the
    width), consecutive rows join into one contiguous run, which is what makes the
    loop fast; the columns past ``W_out`` are then garbage, never used.
    """
    n, g, c, rows, row_len = padded.shape
    sn, sg, sc = padded.stride()[:3]
    offset = padded.storage_offset() + u * geo.dilation[0] * row_len
    offset += v * geo.dilation[1]
    return padded.as_strided(
        (n, g, c, out_size[0], width),
        (sn, sg, sc, geo.stride[0] * row_len, geo.stride[1]),
        offset,
    )


def _row_width(w: int, w_out: int, geo: _Geometry) -> int:
    # the whole padded row when the width stride is 1 (one contiguous run per
    # image), else exactly the output width
    return w + 2 * geo.padding[1] if geo.stride[1] == 1 else w_out


def _ddf_forward(x, channel, spatial, geo: _Geometry) -> Tensor:
    """``out`` of the index form, accumulated tap by tap over blocks of channels."""
    n, c, h, w = x.shape
    k, heads = geo.k, geo.heads
    h_out, w_out = spatial.shape[-2:]
    acc_dtype = _accumulation_dtype(x.dtype)
    width = _row_width(w, w_out, geo)
    cg = c // heads
    x5 = x.reshape(n, heads, cg, h, w)
    # the spatial filters laid out on the same (padded) rows as the views, zero in
    # the unused columns; channel filters as [N, G, C/G, k*k, 1, 1] to broadcast
    sp = F.pad(spatial, (0, width - w_out)).reshape(n, heads, 1, k * k, h_out, width)
    ch = channel.reshape(n, heads, cg, k * k, 1, 1)
    out = x.new_empty(n, heads, cg, h_out, w_out)
    rows = h + 2 * geo.padding[0] + 1
    for start, stop in _blocks(n, heads, cg, rows, w + 2 * geo.padding[1], x.device):
        padded = _padded(x5[:, :, start:stop], geo)
        acc = torch.zeros(
            n, heads, stop - start, h_out, width, dtype=acc_dtype, device=x.device
        )
        tmp = torch.empty_like(acc) if geo.mul else None
        for u in range(k):
            for v in range(k):
                t = u * k + v
                taps = _tap_view(padded, u, v, (h_out, w_out), width, geo)
                weight = ch[:, :, start:stop, t]
                if geo.mul:
                    torch.mul(taps, sp[:, :, :, t], out=tmp)
                    acc.addcmul_(tmp, weight)
                else:
                    acc.addcmul_(taps, sp[:, :, :, t])
                    acc.addcmul_(taps, weight)
        out[:, :, start:stop] = acc[..., :w_out]
        del padded, acc, tmp  # freed before the next block is allocated
    return out.reshape(n, c, h_out, w_out)


def _ddf_backward(grad, x, channel, spatial, geo: _Geometry, needs):
    """Gradients of the three operands, recomputing the tap views block by block.

    With ``T_t`` the input pixels of tap ``t`` (``(N, C, H_out, W_out)``) and
    ``P_t = grad * T_t``: ``d input`` scatters ``grad * F_t`` back through each tap;
    ``d channel[n, c, t] = sum_pixels P_t * spatial_t`` (``mul``) or
    ``sum_pixels P_t`` (``add``); ``d spatial[n, t] = sum_channels P_t * channel_t``
    (``mul``) or ``sum_channels P_t`` (``add``), summed over the head's channels.
    Only exact ``W_out``-wide views are used here, so pixels outside the output
    never enter a sum.
    """
    n, c, h, w = x.shape
    k, heads = geo.k, geo.heads
    h_out, w_out = spatial.shape[-2:]
    acc_dtype = _accumulation_dtype(x.dtype)
    cg = c // heads
    x5 = x.reshape(n, heads, cg, h, w)
    g5 = grad.reshape(n, heads, cg, h_out, w_out)
    sp = spatial.reshape(n, heads, 1, k * k, h_out, w_out).to(acc_dtype)
    ch = channel.reshape(n, heads, cg, k * k, 1, 1).to(acc_dtype)
    # tap-major copies for the batched products below (contiguous rows)
    ch_rows = ch.reshape(n * heads, cg, k * k).transpose(1, 2).contiguous()
    ph, pw = geo.padding
    grad_x = x.new_empty(n, heads, cg, h, w) if needs[0] else None
    grad_ch = torch.zeros(n, heads, cg, k * k, dtype=acc_dtype, device=x.device)
    grad_sp = torch.zeros(
        n, heads, k * k, h_out, w_out, dtype=acc_dtype, device=x.device
    )
    rows, pixels = h + 2 * ph + 1, h_out * w_out
    for start, stop in _blocks(n, heads, cg, rows, w + 2 * pw, x.device):
        padded = _padded(x5[:, :, start:stop], geo)
        gb = g5[:, :, start:stop].to(acc_dtype)
        grad_padded = torch.zeros(padded.shape, dtype=acc_dtype, device=x.device)
        product = torch.empty_like(gb)
        for u in range(k):
            for v in range(k):
                t = u * k + v
                weight = ch[:, :, start:stop, t]
                sp_t = sp[:, :, :, t]
                if needs[0]:
                    target = _tap_view(grad_padded, u, v, (h_out, w_out), w_out, geo)
                    if geo.mul:
                        target.addcmul_(gb * sp_t, weight)
                    else:
                        target.addcmul_(gb, sp_t)
                        target.addcmul_(gb, weight)
                if needs[1] or needs[2]:
                    taps = _tap_view(padded, u, v, (h_out, w_out), w_out, geo)
                    torch.mul(gb, taps, out=product)
                    flat = product.view(n * heads, stop - start, pixels)
                    if geo.mul:
                        # channel: sum over pixels of P_t * spatial_t, and spatial:
                        # sum over the block's channels of P_t * channel_t, both
                        # as batched matrix products (no temporary)
                        # (row vector times matrix: BLAS is slow for the
                        # matrix-times-column form of the same product)
                        by_pixel = sp_t.reshape(n * heads, 1, pixels)
                        by_channel = ch_rows[:, t : t + 1, start:stop]
                        grad_ch[:, :, start:stop, t] += torch.bmm(
                            by_pixel, flat.transpose(1, 2)
                        ).view(n, heads, stop - start)
                        grad_sp[:, :, t] += torch.bmm(by_channel, flat).view(
                            n, heads, h_out, w_out
                        )
                    else:
                        grad_ch[:, :, start:stop, t] += product.sum((-2, -1))
                        grad_sp[:, :, t] += product.sum(2)
        if grad_x is not None:
            grad_x[:, :, start:stop] = grad_padded[..., ph : ph + h, pw : pw + w]
        del padded, gb, grad_padded, product  # freed before the next block
    return (
        None if grad_x is None else grad_x.reshape(n, c, h, w),
        grad_ch.reshape(n, c, k, k).to(channel.dtype) if needs[1] else None,
        grad_sp.reshape(spatial.shape).to(spatial.dtype) if needs[2] else None,
    )


class _DDFFunction(torch.autograd.Function):
    """The tap-accumulation kernel with a backward that saves only its operands."""

    @staticmethod
    def forward(ctx, x, channel, spatial, geo):
        ctx.geo = geo
        ctx.save_for_backward(x, channel, spatial)
        return _ddf_forward(x, channel, spatial, geo)

    @staticmethod
    def backward(ctx, grad):
        x, channel, spatial = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = _ddf_backward(grad.contiguous(), x, channel, spatial, ctx.geo, needs)
        return (*grads, None)


def _ddf_graph(x, channel, spatial, geo: _Geometry) -> Tensor:
    """The same sum as plain differentiable tensor operations, for graph capture.

    ``torch.compile`` fuses the ``k * k`` terms into one loop (so nothing
    ``k * k`` times larger than the output is materialised there either), and
    ``torch.export`` / ONNX see only ``Pad``, ``Slice``, ``Mul`` and ``Add``.
    """
    n, c, h, w = x.shape
    k, heads = geo.k, geo.heads
    h_out, w_out = spatial.shape[-2:]
    cg = c // heads
    windows = _windows(x, (k, k), geo.stride, geo.padding, geo.dilation, (h_out, w_out))
    sp = spatial.reshape(n, heads, 1, k * k, h_out, w_out)
    ch = channel.reshape(n, heads, cg, k * k, 1, 1)
    out = None
    for t, window in enumerate(windows):
        taps = window.reshape(n, heads, cg, h_out, w_out)
        if geo.mul:
            term = taps * (ch[:, :, :, t] * sp[:, :, :, t])
        else:
            term = taps * (ch[:, :, :, t] + sp[:, :, :, t])
        out = term if out is None else out + term
    return out.reshape(n, c, h_out, w_out)


def ddf(
    input: Tensor,
    channel_filter: Tensor,
    spatial_filter: Tensor,
    kernel_size: int,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    combine: str = "mul",
) -> Tensor:
    """The decoupled dynamic filter operator (DDF, chapter 5), on any device.

    Computes the index form of the module docstring: a depthwise filtering in
    which the filter of channel ``c`` at output pixel ``(y, x)`` is the channel
    filter of ``c`` times (``"mul"``) or plus (``"add"``) the spatial filter of
    ``(y, x)``, with zero padding ``(k - 1) * dilation / 2`` and taps outside the
    image skipped, exactly as the official CUDA operator (theFoxofSky/ddfnet,
    ``ddf_mul_cuda_kernel.cu``, ``ddf_add_cuda_kernel.cu``).

    Memory: neither the per-pixel filter ``Tensor[N, C, k*k, H_out, W_out]`` nor
    the unfolded input is ever formed. The forward accumulates over the ``k * k``
    taps, block of channels by block of channels; the backward saves only the
    three operands and recomputes the tap views (a custom autograd function).
    Under ``torch.compile`` / ``torch.export`` the same sum is written as plain
    tensor operations, which the compiler fuses. Half-precision inputs are
    accumulated in float32 and returned in their dtype. Under ``torch.autocast``
    the three operands are cast to the autocast dtype, as a convolution's are.

    Args:
        input: ``Tensor[N, C, H, W]``.
        channel_filter: ``Tensor[N, C, k, k]``, one filter per sample and channel.
        spatial_filter: ``Tensor[N, G * k * k, H_out, W_out]``, one filter per
            sample, output pixel and head; channel ``(G * k * k)`` index
            ``g * k * k + u * k + v`` is tap ``(u, v)`` of head ``g``, and head
            ``g`` filters channels ``g * C / G`` to ``(g + 1) * C / G - 1``. The
            official operator takes ``G = 1`` (its module reshapes heads into the
            batch, which is the same thing).
        kernel_size: ``k``, odd (as the official operator asserts).
        stride, dilation: ints or pairs. ``H_out = (H - 1) // stride + 1``
            (:func:`ddf_output_size`): the official ``H // stride`` whenever the
            stride divides ``H``.
        combine: ``"mul"`` or ``"add"``.

    Returns:
        ``Tensor[N, C, H_out, W_out]``, in the dtype of ``input``.

    Raises:
        TypeError: non-tensors, non-float tensors, mismatched dtypes (outside
            autocast), a non-int ``kernel_size``.
        ValueError: an even ``kernel_size``, filter shapes that do not match the
            input, heads that do not divide the channels, a bad ``combine``.
    """
    k, stride, dilation, combine, heads = _check_arguments(
        "ddf",
        input,
        channel_filter,
        spatial_filter,
        kernel_size,
        stride,
        dilation,
        combine,
    )
    x, channel, spatial = input, channel_filter, spatial_filter
    if autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, channel, spatial = x.to(dtype), channel.to(dtype), spatial.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _ddf(x, channel, spatial, k, stride, dilation, heads, combine)
    return _ddf(x, channel, spatial, k, stride, dilation, heads, combine)


def _ddf(x, channel, spatial, k, stride, dilation, heads, combine) -> Tensor:
    """:func:`ddf` on checked operands of one dtype."""
    padding = ((k - 1) * dilation[0] // 2, (k - 1) * dilation[1] // 2)
    geo = _Geometry(k, stride, dilation, padding, heads, combine == "mul")
    if _recording() or x.device.type == "meta":
        return _ddf_graph(x, channel, spatial, geo)
    return _DDFFunction.apply(x, channel, spatial, geo)


# --- filter normalisation -----------------------------------------------------------


def filter_norm(filters: Tensor, dim: int, scale: Tensor | float) -> Tensor:
    """FilterNorm of the official code: standardise each filter over its taps.

    ``(D - mean(D)) / (std(D) + 1e-10) * scale``, with the mean and the *unbiased*
    standard deviation (divided by ``k*k - 1``) taken along ``dim``, the axis of
    the ``k * k`` taps, and ``1e-10`` added to the standard deviation (not to the
    variance), as theFoxofSky/ddfnet ``ddf.py`` ``FilterNorm`` does. ``scale`` is
    the fixed ``gain / k`` of spatial filters or the learnable per-(channel, tap)
    scale of channel filters (broadcast against ``filters``).

    Why (chapter 5): without it both filters are linear in the layer's input, so
    a ``"mul"`` layer's output grows much faster than its input's scale (chapter
    5 measures the exponent); normalised filters depend on the input's pattern
    only, and the layer scales like a convolution. The paper motivates it by the
    unstable training of unnormalised dynamic filters.
    """
    taps = filters.shape[dim]
    centred = filters - filters.mean(dim, keepdim=True)
    # the unbiased standard deviation written out (torch.std's definition), which
    # also holds for an empty batch without a degrees-of-freedom warning
    std = (centred.square().sum(dim, keepdim=True) / (taps - 1)).sqrt()
    return centred / (std + 1e-10) * scale


# --- module -------------------------------------------------------------------------


class DDFFilters(NamedTuple):
    """The input-dependent part of :class:`DDFConv2d`."""

    channel_filter: Tensor
    """``Tensor[N, C, k, k]``, normalised channel filters."""

    spatial_filter: Tensor
    """``Tensor[N, head * k * k, H_out, W_out]``, normalised spatial filters."""


class DDFConv2d(Conv2dBase):
    """DDF layer: the official ``DDFPack`` (two filter branches and the operator).

    ``DDFConv2d(channels, kernel_size=3, stride=1, dilation=1, *, head=1,
    se_ratio=0.2, nonlinearity="relu", combine="mul")`` maps
    ``Tensor[N, C, H, W]`` to ``Tensor[N, C, H_out, W_out]`` with
    ``H_out = (H - 1) // stride + 1`` (:func:`ddf_output_size`). Paper: Zhou et al.,
    "Decoupled Dynamic Filter Networks", CVPR 2021, arXiv:2104.14107; chapter 5.

    Branches, as ``DDFPack`` in theFoxofSky/ddfnet ``ddf/ddf.py``:

    * spatial: ``spatial`` (``nn.Conv2d(C, head * k * k, 1, stride)``, with bias and
      the layer's stride), then :func:`filter_norm` over the taps of every pixel
      and head with the fixed scale ``calculate_gain(nonlinearity) / k``;
    * channel: global average pooling, ``channel_fc1`` (``Linear(C, hidden)``,
      ``hidden = max(int(C * se_ratio), min_hidden)``), ReLU, ``channel_fc2``
      (``Linear(hidden, C * k * k)``), then :func:`filter_norm` over the taps of
      every channel with the learnable ``channel_scale`` (``Tensor[C, k * k]``,
      initialised ``N(0, 1) * gain / k`` as the official ``randn`` draw);

    and :func:`ddf` combines them. Every parameter is initialised as the official
    one (PyTorch's default initialisation of the 1x1 convolutions, which is
    ``nn.Linear``'s). The layer is depthwise: ``in_channels = out_channels =
    groups = channels``, ``padding = (k - 1) * dilation / 2`` and no bias, as
    the official layer (these are the ``nn.Conv2d`` attributes it reports).

    Deviations from the official code, all on purpose:

    * any device and float dtype (official: CUDA and float32 only);
    * any stride: where it does not divide the input size the official layer
      fails; here the output has ``ceil(H / stride)`` rows, as the spatial branch;
    * ``min_hidden`` (default 1) keeps the channel branch from having zero width
      below 5 channels (official: ``int(C * se_ratio)``, which is 0 there; at 5
      channels and more the two agree);
    * ``from_conv2d`` and state dicts with readable names; the official names are
      loaded by :meth:`~refimpl._conv.Conv2dBase.load_official_state_dict`.

    Args:
        channels: ``C``, input and output channels.
        kernel_size: odd ``k >= 3`` (official: asserted ``> 1``; odd in the op).
        stride, dilation: ints or pairs.
        head: spatial-filter heads ``G``, dividing ``C`` (official default 1).
        se_ratio: hidden width of the channel branch over ``C`` (the
            ``reduction`` of the other layers, under its official name).
        min_hidden: smallest hidden width of the channel branch.
        nonlinearity: name given to ``torch.nn.init.calculate_gain`` for the
            filters' scale (official default ``"relu"``).
        combine: ``"mul"`` (``ddf_mul_*`` models) or ``"add"`` (``ddf_add_*``).
        device, dtype: factory keyword arguments, as in ``torch.nn.Conv2d``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        stride: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        *,
        head: int = 1,
        se_ratio: float = 0.2,
        min_hidden: int = 1,
        nonlinearity: str = "relu",
        combine: str = "mul",
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        channels = check_positive_int(channels, "channels", owner=owner)
        k = _check_kernel_size(kernel_size, owner=owner, minimum=3)
        dilation = pair(dilation, "dilation", owner=owner)
        padding = ((k - 1) * dilation[0] // 2, (k - 1) * dilation[1] // 2)
        super().__init__(
            channels,
            channels,
            k,
            stride,
            padding,
            dilation,
            channels,
            False,
            device=device,
            dtype=dtype,
        )
        self.head = check_positive_int(head, "head", owner=owner)
        if channels % self.head:
            raise ValueError(
                f"{owner} expected head to divide channels, got channels={channels}, "
                f"head={self.head}"
            )
        se_ratio = check_real(se_ratio, "se_ratio", owner=owner, minimum=0.0)
        self.hidden = hidden_width(channels, se_ratio, min_hidden, owner=owner)
        self.se_ratio = float(se_ratio)
        self.min_hidden = int(min_hidden)
        if not isinstance(nonlinearity, str):
            raise TypeError(
                f"{owner} expected nonlinearity to be a str, got "
                f"{type(nonlinearity).__name__} {nonlinearity!r}"
            )
        try:
            self.gain = nn.init.calculate_gain(nonlinearity)
        except ValueError:
            raise ValueError(
                f"{owner} expected nonlinearity to be a name that "
                f"torch.nn.init.calculate_gain accepts (e.g. 'relu', 'linear'), "
                f"got {nonlinearity!r}"
            ) from None
        self.nonlinearity = nonlinearity
        self.combine = _check_combine(combine, owner=owner)
        factory = self.factory_kwargs
        taps = k * k
        self.register_parameter("bias", None)  # as nn.Conv2d(..., bias=False)
        self.spatial = nn.Conv2d(
            channels, self.head * taps, 1, stride=self.stride, **factory
        )
        self.channel_fc1 = nn.Linear(channels, self.hidden, **factory)
        self.channel_fc2 = nn.Linear(self.hidden, channels * taps, **factory)
        self.channel_scale = nn.Parameter(torch.empty(channels, taps, **factory))
        self.reset_parameters()

    @property
    def channels(self) -> int:
        """``C``, the input and output channels."""
        return self.in_channels

    def reset_parameters(self) -> None:
        """The official initialisation: default 1x1 convolutions and linear layers
        (Kaiming-uniform, ``a = sqrt(5)``), ``channel_scale ~ N(0, 1) * gain / k``."""
        self.spatial.reset_parameters()
        self.channel_fc1.reset_parameters()
        self.channel_fc2.reset_parameters()
        with torch.no_grad():
            self.channel_scale.normal_().mul_(self.gain / self.kernel_size[0])

    def _parameter_dtype(self) -> torch.dtype | None:
        return self.spatial.weight.dtype

    def _options(self):
        yield "head", self.head, 1
        yield "se_ratio", self.se_ratio, 0.2
        yield "min_hidden", self.min_hidden, 1
        yield "nonlinearity", self.nonlinearity, "relu"
        yield "combine", self.combine, "mul"

    def extra_repr(self) -> str:
        """``channels, kernel_size, stride, dilation`` (non-defaults), then options."""
        s = f"{self.channels}, kernel_size={self.kernel_size[0]}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        for name, value, default in self._options():
            if value != default:
                s += f", {name}={value!r}"
        return s

    def _dynamic(self, x: Tensor) -> DDFFilters:
        n, c = x.shape[:2]
        k = self.kernel_size[0]
        taps = k * k
        raw = self.spatial(x)
        h_out, w_out = raw.shape[-2:]
        spatial = filter_norm(
            raw.reshape(n, self.head, taps, h_out, w_out), 2, self.gain / k
        ).reshape(n, self.head * taps, h_out, w_out)
        pooled = x.mean(dim=(2, 3))
        hidden = F.relu(self.channel_fc1(pooled))
        channel = filter_norm(
            self.channel_fc2(hidden).reshape(n, c, taps), 2, self.channel_scale
        ).reshape(n, c, k, k)
        return DDFFilters(channel, spatial)

    def _forward(self, x: Tensor) -> Tensor:
        channel, spatial = self._dynamic(x)
        return ddf(
            x,
            channel,
            spatial,
            self.kernel_size[0],
            self.stride,
            self.dilation,
            self.combine,
        )

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, preserve: bool = True, **options):
        """A DDF layer in place of ``conv``; with ``preserve``, computing ``conv``.

        ``conv`` must map ``C`` channels to ``C`` with a square odd kernel,
        padding ``(k - 1) * dilation / 2`` (or ``"same"``) and zero padding mode.
        With ``preserve=False`` any such convolution is replaced by a freshly
        initialised layer of the same geometry: this is how the official
        DDF-ResNets replace a dense 3x3 (:func:`refimpl.models.ddf_resnet`).

        With ``preserve=True`` (the default), ``conv`` must be a depthwise
        convolution without bias and the layer must use ``combine="add"``: the
        spatial branch is zeroed, so every spatial filter is exactly 0, and the
        channel branch outputs a constant whose normalised taps, times
        ``channel_scale``, are ``conv.weight``. A ``"mul"`` layer cannot compute a
        static convolution (FilterNorm gives every spatial filter zero mean over
        its taps, so it can never be constant), and says so.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: a geometry DDF cannot take, or a convolution it cannot
                reproduce, naming what was expected.
        """
        name = f"{cls.__name__}.from_conv2d"
        from ._conv import check_convertible

        check_convertible(conv, owner=name)
        check_bool(preserve, "preserve", owner=name)
        kh, kw = conv.kernel_size
        dilation = conv.dilation
        expected = ((kh - 1) * dilation[0] // 2, (kw - 1) * dilation[1] // 2)
        if conv.in_channels != conv.out_channels or kh != kw or kh % 2 == 0:
            raise ValueError(
                f"{name} expected a convolution from C to C channels with a square "
                f"odd kernel, got {conv.in_channels} -> {conv.out_channels} "
                f"channels, kernel_size={conv.kernel_size}"
            )
        padding = expected if conv.padding == "same" else conv.padding
        if padding != expected or conv.padding_mode != "zeros":
            raise ValueError(
                f"{name} expected padding {expected} (DDF's (k - 1) * dilation / 2) "
                f"with padding_mode 'zeros', got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        layer = cls(
            conv.in_channels,
            kh,
            conv.stride,
            dilation,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **options,
        )
        if preserve:
            if conv.groups != conv.in_channels or conv.bias is not None:
                raise ValueError(
                    f"{name} expected a depthwise convolution without bias "
                    f"(groups={conv.in_channels}, bias=None) to preserve, got "
                    f"groups={conv.groups}, bias={conv.bias is not None}; pass "
                    f"preserve=False to replace it by a fresh DDF layer"
                )
            if layer.combine != "add":
                raise ValueError(
                    f"{name} expected combine='add' to preserve a convolution, got "
                    f"{layer.combine!r}: with 'mul' every spatial filter has zero "
                    f"mean (FilterNorm), so no static filter is reachable; pass "
                    f"preserve=False"
                )
            with torch.no_grad():
                layer._preserve(conv.weight.detach(), None)
        return layer.train(conv.training)

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Spatial filters exactly 0; channel filters equal to ``weight``.

        The constant ``pattern = (1, ..., 1, -(k*k - 1))`` has mean 0 and unbiased
        standard deviation ``k``, and no zero tap, so its FilterNorm ``e`` is
        ``pattern / k`` and ``channel_scale = weight / e`` makes the channel
        filter ``weight`` for every input.
        """
        c, k = self.channels, self.kernel_size[0]
        taps = k * k
        for p in (*self.spatial.parameters(), self.channel_fc2.weight):
            nn.init.zeros_(p)
        pattern = torch.ones(taps, dtype=torch.float64)
        pattern[-1] = 1 - taps
        normalised = filter_norm(pattern, 0, 1.0)
        self.channel_fc2.bias.copy_(pattern.repeat(c))
        scale = weight.reshape(c, taps).to(torch.float64) / normalised
        self.channel_scale.copy_(scale)

    def _official_names(self):
        """``DDFPack`` of theFoxofSky/ddfnet: ``spatial_branch.0`` (the 1x1
        convolution), ``channel_branch.1`` and ``channel_branch.3`` (1x1
        convolutions, reshaped to the linear layers) and ``channel_branch.4.std``
        (``Tensor[C * k * k]``, the learnable scale)."""
        c, k, h = self.channels, self.kernel_size[0], self.hidden
        taps = k * k
        return {
            "spatial.weight": ("spatial_branch.0.weight", (self.head * taps, c, 1, 1)),
            "spatial.bias": ("spatial_branch.0.bias", (self.head * taps,)),
            "channel_fc1.weight": ("channel_branch.1.weight", (h, c, 1, 1)),
            "channel_fc1.bias": ("channel_branch.1.bias", (h,)),
            "channel_fc2.weight": ("channel_branch.3.weight", (c * taps, h, 1, 1)),
            "channel_fc2.bias": ("channel_branch.3.bias", (c * taps,)),
            "channel_scale": ("channel_branch.4.std", (c * taps,)),
        }
