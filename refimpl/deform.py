"""Deformable convolution: DCNv1 and DCNv2 (chapter 6).

A deformable convolution moves every tap of every output position by a learned,
fractional offset and reads the input there by bilinear interpolation; DCNv2 also
scales every tap by a learned modulation ("mask"). This module holds

* :func:`deform_conv2d`: the operator, with the signature, tensor layout and
  border rule of ``torchvision.ops.deform_conv2d``, written in plain PyTorch;
* :func:`deform_conv2d_reference`: a literal-loop reference written from the
  papers' equations, used by the tests and the chapter;
* :class:`DeformConv2d`: a drop-in replacement for ``nn.Conv2d`` that predicts
  its own offsets (and mask) with a zero-initialised convolution.

The vectorised operator builds the im2col "columns" of the deformed grid with
one ``embedding_bag`` call (four weighted rows of a channels-last copy of the
input per sampling point) and multiplies them with the weight, in chunks of
output positions so that the columns never occupy more than a fixed budget.
When the weight groups split the offset groups (depthwise layers among them)
it accumulates the output tap by tap instead, one sample of whole offset groups
per tap times that tap's weights (the rule, in ``_tap_by_tap``: more channel
groups than offset groups).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._conv import Conv2dBase, init_like_conv2d
from ._validation import (
    check_bool,
    check_float_tensor,
    check_positive_int,
    check_real,
    check_same_dtype,
    pair,
)

__all__ = [
    "DeformConv2d",
    "DeformSampling",
    "deform_conv2d",
    "deform_conv2d_reference",
]

_OWNER = "deform_conv2d"

# Largest number of column entries (rows x channels x taps) built at once; about
# 16 MB in float32. Larger inputs are processed in chunks of output positions.
COLUMN_BUDGET = 1 << 22

# Zero rows and columns added around the input so that every bilinear corner lands
# on a real pixel or on a zero: see ``_corners``.
_PAD = 2


# --- argument checks ----------------------------------------------------------------


def _check(input, offset, weight, bias, stride, padding, dilation, mask, owner):
    """Validate the arguments; return the parsed sizes (torchvision's rules)."""
    check_float_tensor(input, "input", owner=owner, ndim=4)
    check_float_tensor(offset, "offset", owner=owner, ndim=4)
    check_float_tensor(weight, "weight", owner=owner, ndim=4)
    stride = pair(stride, "stride", owner=owner)
    padding = pair(padding, "padding", owner=owner, minimum=0)
    dilation = pair(dilation, "dilation", owner=owner)
    n, c_in, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    if c_per_group == 0 or kh == 0 or kw == 0 or c_in % c_per_group:
        raise ValueError(
            f"{owner} expected weight of shape [C_out, C_in / groups, kh, kw] whose "
            f"second size divides C_in = {c_in}, got {tuple(weight.shape)}"
        )
    groups = c_in // c_per_group
    if c_out % groups:
        raise ValueError(
            f"{owner} expected the {groups} weight groups (C_in / weight.shape[1]) "
            f"to divide C_out = {c_out}, got weight of shape {tuple(weight.shape)}"
        )
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps):
        raise ValueError(
            f"{owner} expected offset with 2 * offset_groups * kh * kw channels, a "
            f"positive multiple of {2 * taps}, got {offset.shape[1]} "
            f"(shape {tuple(offset.shape)})"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if c_in % offset_groups:
        raise ValueError(
            f"{owner} expected the {offset_groups} offset groups to divide "
            f"C_in = {c_in}, got offset of shape {tuple(offset.shape)}"
        )
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"{owner} expected an output of at least 1x1, got {out_h}x{out_w} for "
            f"input {h}x{w}, kernel {kh}x{kw}, stride {stride}, padding {padding}, "
            f"dilation {dilation}"
        )
    expected = (n, 2 * offset_groups * taps, out_h, out_w)
    if tuple(offset.shape) != expected:
        raise ValueError(
            f"{owner} expected offset of shape {list(expected)} "
            f"([N, 2*offset_groups*kh*kw, H_out, W_out]), got {list(offset.shape)}"
        )
    if mask is not None:
        check_float_tensor(mask, "mask", owner=owner, ndim=4)
        expected = (n, offset_groups * taps, out_h, out_w)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"{owner} expected mask of shape {list(expected)} "
                f"([N, offset_groups*kh*kw, H_out, W_out]), got {list(mask.shape)}"
            )
    if bias is not None:
        check_float_tensor(bias, "bias", owner=owner, ndim=1)
        if bias.shape[0] != c_out:
            raise ValueError(
                f"{owner} expected bias of shape [{c_out}] (C_out), got "
                f"{list(bias.shape)}"
            )
    check_same_dtype(
        input, owner=owner, offset=offset, weight=weight, bias=bias, mask=mask
    )
    return stride, padding, dilation, groups, offset_groups, out_h, out_w


# --- the vectorised operator --------------------------------------------------------


def _sampling_points(offset, kernel, stride, padding, dilation):
    """Rows ``Y`` and columns ``X`` of every sampling point (chapter 6, first equation).

    ``offset`` is ``Tensor[N, 2*G*kh*kw, H_out, W_out]`` with, per offset group,
    the taps in row-major order and ``(dy, dx)`` interleaved per tap. Returns
    two ``Tensor[N, H_out, W_out, G, kh*kw]``.
    """
    n, _, out_h, out_w = offset.shape
    kh, kw = kernel
    # torchvision computes coordinates in the input's precision; half precision
    # cannot even hold pixel indices beyond 256 exactly, so go to float32 at least.
    dtype = torch.promote_types(offset.dtype, torch.float32)
    groups = offset.shape[1] // (2 * kh * kw)
    off = offset.to(dtype).reshape(n, groups, kh * kw, 2, out_h, out_w)
    off = off.permute(3, 0, 4, 5, 1, 2)  # [2, N, H_out, W_out, G, taps]

    def arange(size):
        return torch.arange(size, device=offset.device, dtype=dtype)

    # p0 + pn: output position times stride, minus padding, plus the dilated tap
    tap_i = arange(kh).repeat_interleave(kw) * dilation[0]
    tap_j = arange(kw).repeat(kh) * dilation[1]
    grid_y = arange(out_h) * stride[0] - padding[0]
    grid_x = arange(out_w) * stride[1] - padding[1]
    y = off[0] + (grid_y[:, None, None, None] + tap_i)
    x = off[1] + (grid_x[:, None, None] + tap_j)
    return y, x


def _corners(y, x, height, width, subgroups):
    """Table rows and bilinear weights of the four neighbours of every point.

    The table is the input padded by ``_PAD`` zeros on every side, channels last,
    with its channels split into ``G' = subgroups`` rows per pixel. A point
    before ``-1`` or from ``size`` on, in either direction, reads zero with a
    zero gradient, as in torchvision: it is moved to ``(-2, -2)``, whose four
    corners are all padding. Any other point has its top-left corner in
    ``[-1, size - 1]``, so that corner and its ``+1`` neighbour both lie in the
    padded table, on zeros wherever they are outside the image. The value is
    zero on the line ``-1`` too (the image's corners have weight 0 there) and
    the gradients are those of torchvision (one-sided at integer points: the
    cell is always ``[floor(p), floor(p) + 1]``).

    A NaN coordinate is kept (and the other one, if not NaN, moved to ``-2``):
    the four weights are NaN, on rows of padding, so every output that reads
    the point is NaN and nothing else is. An infinite or huge coordinate is
    simply outside.

    Returns ``index`` (int64) and ``weight``, both ``Tensor[N, H_out, W_out, G',
    taps, 4]``; corners in the order (top-left, top-right, bottom-left,
    bottom-right).
    """
    n, _, _, groups, _ = y.shape
    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)  # False for NaN
    # where() before any arithmetic, so that no inf - inf reaches the gradient
    y = torch.where(inside | torch.isnan(y), y, -_PAD)
    x = torch.where(inside | torch.isnan(x), x, -_PAD)
    y0 = torch.nan_to_num(y.detach().floor(), nan=-_PAD)
    x0 = torch.nan_to_num(x.detach().floor(), nan=-_PAD)
    ly, lx = y - y0, x - x0  # the gradient w.r.t. the offset flows through these
    hy, hx = 1 - ly, 1 - lx
    weight = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=-1)
    row = y0.long() + _PAD
    col = x0.long() + _PAD
    padded_w = width + 2 * _PAD
    batch = torch.arange(n, device=y.device).view(n, 1, 1, 1, 1)
    pixel = (batch * (height + 2 * _PAD) + row) * padded_w + col
    # every offset group owns subgroups // groups consecutive sub-groups
    split = subgroups // groups
    sub = torch.arange(subgroups, device=y.device).view(groups, split, 1)
    index = pixel.unsqueeze(-2) * subgroups + sub  # [N, Ho, Wo, G, split, taps]
    # corner steps (0, 1, Wp, Wp + 1) in table rows, as tensor arithmetic so that
    # a symbolic width (torch.compile, torch.export) stays symbolic
    right = torch.tensor([0, 1, 0, 1], device=y.device)
    down = torch.tensor([0, 0, 1, 1], device=y.device)
    steps = (right + down * padded_w) * subgroups
    index = (index.unsqueeze(-1) + steps).flatten(3, 4)
    weight = weight.unsqueeze(-3).expand(-1, -1, -1, -1, split, -1, -1)
    return index, weight.flatten(3, 4)


def _skip_untouched(index, weight, table):
    """Point the corners of weight 0 that hold a non-finite pixel at a zero row.

    ``embedding_bag`` multiplies every listed row by its weight, and
    ``0 * inf`` is NaN: a pixel that the point does not touch (a corner of
    weight exactly 0, at an integer coordinate) would poison the sample.
    Row 0 of the table is padding. Corners on finite pixels are kept, since
    the one-sided gradient at integer points reads them.

    On a CPU in eager mode this bookkeeping (a gather per corner) would cost a
    fifth of the forward pass, so it runs only when one sum of the table says
    that it holds a non-finite value; on other devices and under
    ``torch.compile`` it always runs, without a data-dependent branch or a wait
    for the device.

    ``index``/``weight``: ``Tensor[..., 4]``; ``table``: ``Tensor[rows, C']``.
    Returns the new ``index``.
    """
    if table.device.type == "cpu" and not torch.compiler.is_compiling():
        wide = torch.promote_types(table.dtype, torch.float32)  # no fp16 overflow
        if torch.isfinite(table.detach().sum(dtype=wide)):
            return index
    nonfinite = ~torch.isfinite(table).all(dim=1)
    return index.masked_fill((weight == 0) & nonfinite[index], 0)


def _lcm(a, b):
    """Least common multiple of two channel counts, as a plain int.

    ``int()`` because under ``torch.compile(dynamic=True)`` the channel counts
    may be symbolic (the graph is then specialised to them, not to the batch or
    the spatial size); Euclid's loop because the compiler does not trace
    ``math.lcm``.
    """
    a, b = int(a), int(b)
    x, y = a, b
    while y:
        x, y = y, x % y
    return a // x * b


def _table(input, subgroups):
    """The input, zero padded and channels last: ``Tensor[N*Hp*Wp*G', C_in/G']``."""
    n, c, h, w = input.shape
    table = input.new_zeros(n, h + 2 * _PAD, w + 2 * _PAD, c)
    table[:, _PAD : _PAD + h, _PAD : _PAD + w] = input.permute(0, 2, 3, 1)
    return table.reshape(table.numel() // c * subgroups, c // subgroups)


def _deform_rows(table, index, weight, wmat, bias):
    """Output rows of a chunk of positions: the deformed im2col times the weight.

    ``index``/``weight``: ``Tensor[R, G', taps, 4]`` for R output positions;
    ``wmat``: ``Tensor[groups, G'/groups * taps * C_in/G', C_out/groups]``.
    Returns ``Tensor[R, C_out]``.
    """
    rows = index.shape[0]
    # one weighted sum of four table rows per (position, sub-group, tap):
    # the columns [R, G' * taps * C_in/G'] of the deformed grid
    columns = F.embedding_bag(
        index.reshape(-1, 4),
        table,
        per_sample_weights=weight.reshape(-1, 4),
        mode="sum",
    )
    groups, per_group = wmat.shape[0], wmat.shape[1]
    if groups == 1:
        columns = columns.reshape(rows, per_group)
        if bias is None:
            return columns @ wmat[0]
        return torch.addmm(bias, columns, wmat[0])
    columns = columns.reshape(rows, groups, per_group).transpose(0, 1)
    out = torch.bmm(columns, wmat).transpose(0, 1).reshape(rows, groups * wmat.shape[2])
    return out if bias is None else out + bias


def _deform_rows_by_tap(table, index, weight, wmat, bias):
    """Output rows of a chunk of positions, accumulated tap by tap.

    The grouped counterpart of :func:`_deform_rows`, for weight groups that
    split the offset groups (``groups`` a multiple ``> 1`` of ``G``, the
    depthwise case ``groups == C_in`` among them): the table rows are whole
    offset groups, ``C_in/G`` channels wide, and every tap reads one sample
    ``Tensor[R, C_in]`` of them, multiplied by its own slice of the weight and
    added to the output, so that the ``kh*kw``-times-larger columns are never
    formed at once and no group ever multiplies a matrix one channel wide.

    ``index``/``weight``: ``Tensor[R, G, taps, 4]``; ``wmat``: ``Tensor[taps, G,
    groups/G, C_in/groups, C_out/groups]``. Returns ``Tensor[R, C_out]``.
    """
    rows, taps = index.shape[0], index.shape[2]
    offset_groups, per, c_in_g, c_out_g = wmat.shape[1:]
    out = bias
    for tap in range(taps):
        sample = F.embedding_bag(
            index[:, :, tap].reshape(-1, 4),
            table,
            per_sample_weights=weight[:, :, tap].reshape(-1, 4),
            mode="sum",
        ).reshape(rows, offset_groups, per, c_in_g)
        if c_in_g == 1:  # depthwise (times a channel multiplier): no sum at all
            term = sample * wmat[tap].reshape(offset_groups, per, c_out_g)
        else:
            term = torch.einsum("rgpc,gpco->rgpo", sample, wmat[tap])
        term = term.reshape(rows, offset_groups * per * c_out_g)
        out = term if out is None else out + term
    return out


def _tap_by_tap(groups, offset_groups):
    """Whether :func:`_deform_conv2d` accumulates tap by tap (the shape rule).

    Yes when the weight groups split the offset groups (``groups`` a multiple
    of ``offset_groups``, and larger): depthwise and other grouped layers with
    one set of offsets for several groups. The im2col path would then gather
    table rows only ``C_in/groups`` channels wide (one channel, depthwise) and
    multiply ``groups`` matrices that thin; measured on a CPU, it is several
    times slower than torchvision there, the tap-by-tap path several times
    faster. Otherwise (dense layers, or as many offset groups as weight groups
    or more) the rows are already as wide as the groups allow and one matmul
    per group is the fastest route.
    """
    return groups > offset_groups and groups % offset_groups == 0


def _chunked_rows(
    table, index, weight, wmat, bias, rows, columns_per_row, rows_fn=_deform_rows
):
    """``rows_fn`` (:func:`_deform_rows` or :func:`_deform_rows_by_tap`) in
    chunks of at most ``COLUMN_BUDGET`` column entries.

    Recomputing a chunk's columns in the backward pass (as torchvision does)
    keeps only the inputs alive between the passes, not the columns.
    Returns ``Tensor[R, C_out]``.
    """
    chunk = max(1, COLUMN_BUDGET // columns_per_row)
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (table, weight, wmat, bias)
    )
    outs = []
    for start in range(0, max(rows, 1), chunk):
        rows_part = slice(start, start + chunk)
        part = (table, index[rows_part], weight[rows_part], wmat, bias)
        if recompute:
            outs.append(checkpoint(rows_fn, *part, use_reentrant=False))
        else:
            outs.append(rows_fn(*part))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _refuse_tracing() -> None:
    """Raise under ``torch.jit.trace``, before any size is read as a constant."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"{_OWNER} does not support torch.jit.trace: the traced graph would "
            f"keep the sizes of the example input and give wrong results at any "
            f"other size. Use torch.export.export (with torch.export.Dim for the "
            f"dynamic sizes) or torch.compile instead"
        )


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Deformable convolution (DCNv1), modulated when ``mask`` is given (DCNv2).

    Computes, for every output position :math:`p_0` and kernel tap
    :math:`p_k` (row ``i``, column ``j``),

    .. math::

        y(p_0) = b + \sum_k w_k\, m_k(p_0)\, x\big(p_0 + p_k + \Delta p_k(p_0)\big),

    where :math:`x(\cdot)` is bilinear interpolation with zeros outside the
    image, as in *Deformable Convolutional Networks* (Dai et al., ICCV 2017,
    arXiv 1703.06211) and, with the modulation :math:`m_k`, *Deformable ConvNets
    v2: More Deformable, Better Results* (Zhu et al., CVPR 2019,
    arXiv 1811.11168). Chapter 6 derives it.

    Same signature, layout and results as ``torchvision.ops.deform_conv2d``
    (values and gradients agree to rounding, including at the image border and
    at integer sampling points), but written in plain PyTorch, so it runs on
    any device and dtype, under autocast, ``torch.compile`` and
    ``torch.export``. On a CPU it is several times faster than torchvision's
    kernel for dense kernels (forward 0.15x-0.41x of torchvision's time at ResNet
    stage shapes, k=3), but slower for depthwise ones (about 3.5x torchvision's
    time at N=8, C=96, 56x56, k=7, groups=96). Under ``torch.compile`` and
    ``torch.export`` the columns are built in one piece (no chunks, no
    recomputation in the backward), so that one graph serves every batch and
    spatial size. ``torch.jit.trace`` is refused:
    a traced graph would keep the sizes of the example input.

    Layout: offset group ``g`` covers input channels
    ``[g*C_in/G, (g+1)*C_in/G)``; its taps are in row-major order and the
    offset channel ``2*(g*kh*kw + i*kw + j)`` holds :math:`\Delta y` (rows),
    the next one :math:`\Delta x` (columns); mask channel ``g*kh*kw + i*kw + j``
    scales that tap. The sampling point of tap ``(i, j)`` at output ``(y, x)`` is
    ``(y*stride_h - pad_h + i*dil_h + dy, x*stride_w - pad_w + j*dil_w + dx)``.
    No activation is applied to ``mask`` (the caller applies its sigmoid).

    Non-finite values never raise, and reach only the outputs that read them:

    * an infinite (or huge) offset puts the point outside the image, where it
      reads zero: the output is finite, as in torchvision, and the gradient
      of that offset is 0 (torchvision's is NaN);
    * a NaN offset (either coordinate) leaves that sample undefined: NaN at
      exactly the outputs that read it (at that position, the output channels
      whose weight group holds channels of that offset group). torchvision's
      kernels convert a NaN coordinate to an integer index, which is undefined
      behaviour in C++ (it can read outside the image), so there is no meaning
      to follow there;
    * a NaN or infinite pixel enters a sample only where its bilinear weight is
      non-zero. Deviation: torchvision also multiplies the corners of weight
      exactly 0 inside the image (the lower or right neighbours of an integer
      sampling point, e.g. every tap at zero offsets), so ``0 * inf`` makes NaN
      outputs that do not depend on that pixel; here, as in
      :func:`deform_conv2d_reference` and in ``F.conv2d`` at zero offsets, they
      stay finite. Elsewhere the non-finite pattern is torchvision's.

    After sampling the arithmetic is IEEE's, as in torchvision: a mask or weight
    of 0 times an infinite sample is NaN.

    Args:
        input: ``Tensor[N, C_in, H, W]``.
        offset: ``Tensor[N, 2*G*kh*kw, H_out, W_out]``; the number of offset
            groups ``G`` is inferred from the channels and must divide ``C_in``.
        weight: ``Tensor[C_out, C_in/groups, kh, kw]``; ``groups`` is inferred
            as ``C_in / weight.shape[1]`` and must divide ``C_out``.
        bias: optional ``Tensor[C_out]``.
        stride: int or pair, as in ``nn.Conv2d``.
        padding: int or pair: zeros around the input.
        dilation: int or pair: spacing of the regular grid.
        mask: optional ``Tensor[N, G*kh*kw, H_out, W_out]``; ``None`` is DCNv1
            (every modulation 1).

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, ``H_out`` the plain-convolution size.

    Raises:
        TypeError: a tensor argument is not a floating-point tensor, or a size
            is not an int or pair of ints.
        ValueError: inconsistent shapes (offset or mask channels, groups that do
            not divide, offset/mask spatial size different from the output).
        RuntimeError: called under ``torch.jit.trace``.
    """
    _refuse_tracing()
    stride, padding, dilation, *_ = _check(
        input, offset, weight, bias, stride, padding, dilation, mask, _OWNER
    )
    return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


def _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask):
    """:func:`deform_conv2d` on checked arguments (sizes as pairs), for the layer,
    which checks its input once at its own boundary."""
    _refuse_tracing()
    n, c_in, h, w = input.shape
    c_out, c_in_g, kh, kw = weight.shape
    taps = kh * kw
    groups = c_in // c_in_g
    offset_groups = offset.shape[1] // (2 * taps)
    out_h, out_w = offset.shape[2], offset.shape[3]
    by_tap = _tap_by_tap(groups, offset_groups)
    # Channels are gathered in sub-groups fine enough to serve both groupings,
    # so that every weight group reads a contiguous slice of the columns; tap
    # by tap, in whole offset groups (every weight group lies inside one).
    subgroups = offset_groups if by_tap else _lcm(offset_groups, groups)
    y, x = _sampling_points(offset, (kh, kw), stride, padding, dilation)
    index, bil = _corners(y, x, h, w, subgroups)
    table = _table(input, subgroups)
    index = _skip_untouched(index, bil, table)
    if mask is not None:
        m = mask.reshape(n, offset_groups, 1, taps, out_h, out_w)
        m = m.permute(0, 4, 5, 1, 2, 3).to(bil.dtype)
        split = subgroups // offset_groups
        m = m.expand(-1, -1, -1, -1, split, -1).flatten(3, 4)
        bil = bil * m.unsqueeze(-1)
    rows = n * out_h * out_w
    index = index.reshape(rows, subgroups, taps, 4)
    bil = bil.reshape(rows, subgroups, taps, 4).to(input.dtype)
    if by_tap:
        # weight [C_out, C_in/groups, kh, kw]
        #     -> [tap, offset group, its weight groups, C_in/groups, C_out/groups]
        per = groups // offset_groups
        wmat = weight.reshape(offset_groups, per, c_out // groups, c_in_g, taps)
        wmat = wmat.permute(4, 0, 1, 3, 2)
        rows_fn = _deform_rows_by_tap
    else:
        # weight [C_out, C_in/groups, kh, kw]
        #     -> [groups, (sub-group, tap, channel), C_out/groups]
        per = subgroups // groups
        wmat = weight.reshape(groups, c_out // groups, per, c_in // subgroups, taps)
        wmat = wmat.permute(0, 2, 4, 3, 1).reshape(groups, -1, c_out // groups)
        rows_fn = _deform_rows

    if torch.compiler.is_compiling():
        # One chunk: a loop over the (symbolic) number of rows would make the
        # compiler specialise the graph to each batch and spatial size; the
        # compiler plans the memory of the columns itself.
        out = rows_fn(table, index, bil, wmat, bias)
    else:
        out = _chunked_rows(
            table, index, bil, wmat, bias, rows, c_in * taps, rows_fn=rows_fn
        )
    out = out.reshape(n, out_h, out_w, c_out).permute(0, 3, 1, 2)
    channels_last = input.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not input.is_contiguous():
        return out  # already channels last, like nn.Conv2d on such an input
    return out.contiguous()


# --- the literal reference ----------------------------------------------------------


def _bilinear_literal(image: Tensor, py: Tensor, px: Tensor) -> Tensor:
    r""":math:`x(p) = \sum_q G(q, p)\, x(q)` over every pixel ``q`` of the image,
    with :math:`G(q, p) = \max(0, 1-|q_y-p_y|)\max(0, 1-|q_x-p_x|)`.

    The terms with :math:`G = 0` are left out rather than multiplied, so that a
    NaN or infinite pixel reaches only the points it touches (``0 * inf`` is
    NaN); a NaN coordinate makes every :math:`G` NaN, hence a NaN sample.
    """
    h, w = image.shape
    qy = torch.arange(h, device=image.device, dtype=py.dtype)
    qx = torch.arange(w, device=image.device, dtype=px.dtype)
    gy = torch.clamp(1 - (qy - py).abs(), min=0)
    gx = torch.clamp(1 - (qx - px).abs(), min=0)
    g = gy[:, None] * gx[None, :]
    return (g * torch.where(g != 0, image, 0)).sum()


def deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Literal-loop deformable convolution, written from the papers' equations.

    One Python loop per index of

    .. math::

        y[n, o, p_0] = b_o + \sum_{c}\sum_{i,j} w[o, c, i, j]\; m\;
        \sum_q G(q, p)\, x[n, c, q],

        p = p_0 + p_{ij} + \Delta p_{ij},

    with the bilinear kernel :math:`G` of *Deformable Convolutional Networks*
    (Dai et al., ICCV 2017, arXiv 1703.06211) summed over every pixel ``q``
    (so points outside the image read zeros) and the modulation ``m`` of
    *Deformable ConvNets v2* (Zhu et al., CVPR 2019, arXiv 1811.11168).
    Same arguments, shapes and checks as :func:`deform_conv2d`; slow by design,
    for tests and for chapter 6. It is differentiable by autograd except where
    a sampling coordinate is an integer, where :math:`G` has a kink (there the
    vectorised operator, like torchvision, takes the derivative from the right).

    Args:
        input: ``Tensor[N, C_in, H, W]``.
        offset: ``Tensor[N, 2*G*kh*kw, H_out, W_out]``.
        weight: ``Tensor[C_out, C_in/groups, kh, kw]``.
        bias: optional ``Tensor[C_out]``.
        stride: int or pair.
        padding: int or pair.
        dilation: int or pair.
        mask: optional ``Tensor[N, G*kh*kw, H_out, W_out]``.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``.

    Raises:
        TypeError: as :func:`deform_conv2d`.
        ValueError: as :func:`deform_conv2d`.
    """
    (sh, sw), (ph, pw), (dh, dw), groups, offset_groups, out_h, out_w = _check(
        input,
        offset,
        weight,
        bias,
        stride,
        padding,
        dilation,
        mask,
        "deform_conv2d_reference",
    )
    n, c_in, _, _ = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    taps = kh * kw
    c_per_offset_group = c_in // offset_groups
    values = []
    for b in range(n):
        for o in range(c_out):
            group = o // (c_out // groups)
            for oy in range(out_h):
                for ox in range(out_w):
                    acc = bias[o] if bias is not None else input.new_zeros(())
                    for cl in range(c_per_group):
                        c = group * c_per_group + cl
                        g = c // c_per_offset_group
                        for i in range(kh):
                            for j in range(kw):
                                tap = g * taps + i * kw + j
                                dy = offset[b, 2 * tap, oy, ox]
                                dx = offset[b, 2 * tap + 1, oy, ox]
                                py = oy * sh - ph + i * dh + dy
                                px = ox * sw - pw + j * dw + dx
                                sample = _bilinear_literal(input[b, c], py, px)
                                if mask is not None:
                                    sample = sample * mask[b, tap, oy, ox]
                                acc = acc + weight[o, cl, i, j] * sample
                    values.append(acc)
    if not values:
        return input.new_zeros(n, c_out, out_h, out_w) + 0 * weight.sum()
    return torch.stack(values).reshape(n, c_out, out_h, out_w)


# --- the module ---------------------------------------------------------------------


class DeformSampling(NamedTuple):
    """The input-dependent part of :class:`DeformConv2d`."""

    offset: Tensor
    """``Tensor[N, 2*G*kh*kw, H_out, W_out]``, in torchvision's layout."""
    mask: Tensor | None
    """``Tensor[N, G*kh*kw, H_out, W_out]`` after the scaled sigmoid, or ``None``."""


class DeformConv2d(Conv2dBase):
    r"""Deformable convolution that predicts its own offsets: a drop-in ``nn.Conv2d``.

    A convolution ``conv_offset`` with the same kernel size, stride, padding and
    dilation reads the input and predicts ``2*G*kh*kw`` offsets per output
    position (and, with ``modulated=True``, ``G*kh*kw`` mask logits after them,
    as in the DCNv2 code); :func:`deform_conv2d` then applies ``weight`` on the
    deformed grid. *Deformable Convolutional Networks* (Dai et al., ICCV 2017,
    arXiv 1703.06211); *Deformable ConvNets v2* (Zhu et al., CVPR 2019,
    arXiv 1811.11168); chapter 6.

    ``conv_offset`` starts at zero (weight and bias, as in both official codes),
    so the offsets start at zero. The mask is ``mask_scale * sigmoid(logits)``:
    the default ``2.0`` is the official DCNv2 example
    (msracver/Deformable-ConvNets, ``DCNv2_op/example_symbol.py``), whose mask
    starts at exactly 1, so a fresh layer *is* the plain convolution, with or
    without modulation. ``mask_scale=1.0`` gives the paper's :math:`[0, 1]` range
    and mmcv's ``ModulatedDeformConv2dPack`` (mask 0.5 at the start, so the fresh
    layer is half the plain convolution). The official DCNv2 example trains the
    offset and mask convolution with ``lr_mult=0.1`` (the DCNv1 R-FCN code with
    the base rate); give ``conv_offset``'s parameters their own optimiser group,
    with a tenth of the learning rate, to do the same (chapter 6 shows how).

    ``weight`` and ``bias`` have ``nn.Conv2d``'s shapes and initialisation, drawn
    in the same order, so under the same seed they equal those of
    ``nn.Conv2d(in_channels, out_channels, kernel_size, ...)``. With a
    ``padding_mode`` other than zeros (or an asymmetric ``"same"``) the input is
    padded once and both ``conv_offset`` and the deformable sampling read the
    padded map; sampling points beyond it read zeros.

    Args:
        conv_args: ``nn.Conv2d``'s arguments, ``in_channels`` to ``padding_mode``,
            with the same meaning.
        offset_groups: ``G``, the number of channel groups with their own
            offsets (the papers' deformable groups); divides ``C_in``.
        modulated: DCNv2 (predict a mask) instead of DCNv1.
        mask_scale: factor of the sigmoid mask (2.0: official DCNv2; 1.0: mmcv).
        device, dtype: factory keyword arguments.

    Shapes:
        ``forward(Tensor[N, C_in, H, W]) -> Tensor[N, C_out, H_out, W_out]``.

    Raises:
        TypeError, ValueError: bad arguments or input, before any computation.
    """

    def __init__(
        self,
        *conv_args,
        offset_groups: int = 1,
        modulated: bool = False,
        mask_scale: float = 2.0,
        **conv_kwargs,
    ) -> None:
        # nn.Conv2d's arguments are parsed once, by Conv2dBase; the signature
        # shown by help() and the docs is completed by Conv2dBase.__init_subclass__.
        super().__init__(*conv_args, **conv_kwargs)
        owner = type(self).__name__
        self.offset_groups = check_positive_int(
            offset_groups, "offset_groups", owner=owner
        )
        if self.in_channels % self.offset_groups:
            raise ValueError(
                f"{owner} expected offset_groups to divide in_channels, got "
                f"in_channels={self.in_channels}, offset_groups={self.offset_groups}"
            )
        self.modulated = check_bool(modulated, "modulated", owner=owner)
        self.mask_scale = check_real(mask_scale, "mask_scale", owner=owner, minimum=0.0)
        factory = self.factory_kwargs
        kh, kw = self.kernel_size
        self.weight = self.kernel_bank()
        self.bias = self.bias_parameter()
        # nn.Conv2d's draws first, so that under one seed weight and bias equal
        # those of the nn.Conv2d this layer replaces
        init_like_conv2d(self.weight, self.bias)
        per_tap = 3 if self.modulated else 2
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            per_tap * self.offset_groups * kh * kw,
            self.kernel_size,
            self.stride,
            self.op_padding,
            self.dilation,
            bias=True,
            **factory,
        )
        self._reset_offset_parameters()

    def _reset_offset_parameters(self) -> None:
        # zero offsets (and mask logits): a fresh layer samples the regular grid
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def reset_parameters(self) -> None:
        """Re-draw ``weight``/``bias`` as ``nn.Conv2d`` does; zero ``conv_offset``."""
        init_like_conv2d(self.weight, self.bias)
        self._reset_offset_parameters()

    def _options(self):
        yield "offset_groups", self.offset_groups, 1
        yield "modulated", self.modulated, False
        if self.modulated:
            yield "mask_scale", self.mask_scale, 2.0

    def _sampling(self, x_padded: Tensor) -> DeformSampling:
        out = self.conv_offset(x_padded)
        if not self.modulated:
            return DeformSampling(out, None)
        n_offsets = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, logits = out[:, :n_offsets], out[:, n_offsets:]
        return DeformSampling(offset, self.mask_scale * torch.sigmoid(logits))

    def _dynamic(self, x: Tensor) -> DeformSampling:
        return self._sampling(self.pad(x))

    def _forward(self, x: Tensor) -> Tensor:
        x = self.pad(x)
        offset, mask = self._sampling(x)
        return _deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            self.stride,
            self.op_padding,
            self.dilation,
            mask,
        )

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Function-preserving start: zero offsets sample the regular grid, and
        the initial mask ``mask_scale / 2`` is divided out of the copied weight
        (nothing to divide with the default ``mask_scale=2``)."""
        self._reset_offset_parameters()
        scale = self.mask_scale / 2 if self.modulated else 1.0
        self.weight.copy_(weight / scale)
        if self.bias is not None:
            self.bias.copy_(bias)

    def _official_names(self):
        """torchvision's ``DeformConv2d`` (``weight``, ``bias``) with mmcv's offset
        branch ``conv_offset`` (``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``:
        offsets first, then the mask logits): the names and layouts are this
        layer's own. mmcv's mask is ``sigmoid``: build with ``mask_scale=1.0``."""
        if self.modulated and self.mask_scale != 1.0:
            raise ValueError(
                f"{type(self).__name__}.load_official_state_dict expected "
                f"mask_scale=1.0 (mmcv's mask is sigmoid(logits)), got "
                f"mask_scale={self.mask_scale}; the checkpoint would compute "
                f"another function"
            )
        return {
            key: (key, tuple(value.shape)) for key, value in self.state_dict().items()
        }
