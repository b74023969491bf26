"""Deformable convolution: DCNv1 and DCNv2 (chapter 6).

A deformable convolution moves every tap of every output position by a learned,
fractional offset and reads the input there by bilinear interpolation; DCNv2 also
scales every tap by a learned modulation ("mask"). This module holds

* :func:`deform_conv2d`: the operator, with the signature, tensor layout and
  border rule of ``torchvision.ops.deform_conv2d``, written in plain PyTorch;
* :func:`deform_conv2d_loops`: a literal-loop reference written from the
  papers' equations, used by the tests and the chapter;
* :class:`DeformConv2d`: a drop-in replacement for ``nn.Conv2d`` that predicts
  its own offsets (and mask) with a zero-initialised convolution.

The vectorised operator builds the im2col "columns" of the deformed grid with
one ``embedding_bag`` call (four weighted rows of a channels-last copy of the
input per sampling point) and multiplies them with the weight, in chunks of
output positions so that the columns never occupy more than a fixed budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._validation import (
    check_channels,
    check_float_tensor,
    check_groups,
    check_positive_int,
    pair,
)

__all__ = ["deform_conv2d", "deform_conv2d_loops", "DeformConv2d"]

_OWNER = "deform_conv2d"

# Largest number of column entries (rows x channels x taps) built at once; about
# 16 MB in float32. Larger inputs are processed in chunks of output positions.
COLUMN_BUDGET = 1 << 22

# Zero rows and columns added around the input so that every bilinear corner,
# after clamping, lands on a real pixel or on a zero: see ``_corners``.
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
    return stride, padding, dilation, groups, offset_groups, out_h, out_w


# --- the vectorised operator --------------------------------------------------------


def _sampling_points(offset, kernel, stride, padding, dilation):
    """Rows ``Y`` and columns ``X`` of every sampling point (chapter 6, deform-conv).

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
    with its channels split into ``G' = subgroups`` rows per pixel. A corner
    outside the image must read zero: clamping the top-left corner to
    ``[-2, size]`` keeps both it and its ``+1`` neighbour inside the padded
    table and on zeros whenever they are outside the image, without any mask.
    So the value is zero beyond ``(-1, size)``, as in torchvision, and the
    gradients are those of torchvision too (one-sided at integer points: the
    cell is always ``[floor(p), floor(p) + 1]``).

    Returns ``index`` (int64) and ``weight``, both ``Tensor[N, H_out, W_out, G',
    taps, 4]``; corners in the order (top-left, top-right, bottom-left,
    bottom-right).
    """
    n, _, _, groups, _ = y.shape
    y0 = y.detach().floor()
    x0 = x.detach().floor()
    ly, lx = y - y0, x - x0  # the gradient w.r.t. the offset flows through these
    hy, hx = 1 - ly, 1 - lx
    weight = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=-1)
    row = y0.clamp(-_PAD, height).long() + _PAD
    col = x0.clamp(-_PAD, width).long() + _PAD
    padded_w = width + 2 * _PAD
    batch = torch.arange(n, device=y.device).view(n, 1, 1, 1, 1)
    pixel = (batch * (height + 2 * _PAD) + row) * padded_w + col
    # every offset group owns subgroups // groups consecutive sub-groups
    split = subgroups // groups
    sub = torch.arange(subgroups, device=y.device).view(groups, split, 1)
    index = pixel.unsqueeze(-2) * subgroups + sub  # [N, Ho, Wo, G, split, taps]
    steps = torch.tensor(
        [0, 1, padded_w, padded_w + 1], device=y.device
    ) * subgroups
    index = (index.unsqueeze(-1) + steps).flatten(3, 4)
    weight = weight.unsqueeze(-3).expand(-1, -1, -1, -1, split, -1, -1)
    return index, weight.flatten(3, 4)


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
        index.reshape(-1, 4), table, per_sample_weights=weight.reshape(-1, 4),
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
    any device and dtype, under autocast and ``torch.compile``. On a CPU it is
    faster than torchvision's kernel, forward and backward.

    Layout: offset group ``g`` covers input channels
    ``[g*C_in/G, (g+1)*C_in/G)``; its taps are in row-major order and the
    offset channel ``2*(g*kh*kw + i*kw + j)`` holds :math:`\Delta y` (rows),
    the next one :math:`\Delta x` (columns); mask channel ``g*kh*kw + i*kw + j``
    scales that tap. The sampling point of tap ``(i, j)`` at output ``(y, x)`` is
    ``(y*stride_h - pad_h + i*dil_h + dy, x*stride_w - pad_w + j*dil_w + dx)``.
    No activation is applied to ``mask`` (the caller applies its sigmoid).

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
    """
    stride, padding, dilation, groups, offset_groups, out_h, out_w = _check(
        input, offset, weight, bias, stride, padding, dilation, mask, _OWNER
    )
    n, c_in, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    # Channels are gathered in sub-groups fine enough to serve both groupings,
    # so that every weight group reads a contiguous slice of the columns.
    subgroups = math.lcm(offset_groups, groups)
    y, x = _sampling_points(offset, (kh, kw), stride, padding, dilation)
    index, bil = _corners(y, x, h, w, subgroups)
    if mask is not None:
        m = mask.reshape(n, offset_groups, 1, taps, out_h, out_w)
        m = m.permute(0, 4, 5, 1, 2, 3).to(bil.dtype)
        split = subgroups // offset_groups
        m = m.expand(-1, -1, -1, -1, split, -1).flatten(3, 4)
        bil = bil * m.unsqueeze(-1)
    rows = n * out_h * out_w
    index = index.reshape(rows, subgroups, taps, 4)
    bil = bil.reshape(rows, subgroups, taps, 4).to(input.dtype)
    table = _table(input, subgroups)
    # weight [C_out, C_in/groups, kh, kw]
    #     -> [groups, (sub-group, tap, channel), C_out/groups]
    per = subgroups // groups
    wmat = weight.reshape(groups, c_out // groups, per, c_in // subgroups, taps)
    wmat = wmat.permute(0, 2, 4, 3, 1).reshape(groups, -1, c_out // groups)

    chunk = max(1, COLUMN_BUDGET // (c_in * taps))
    # Recomputing a chunk's columns in the backward pass (as torchvision does)
    # keeps only the inputs alive between the passes, not the columns.
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, offset, weight, bias, mask)
    )
    outs = []
    for start in range(0, max(rows, 1), chunk):
        rows_part = slice(start, start + chunk)
        part = (table, index[rows_part], bil[rows_part], wmat, bias)
        if recompute:
            outs.append(checkpoint(_deform_rows, *part, use_reentrant=False))
        else:
            outs.append(_deform_rows(*part))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    out = out.reshape(n, out_h, out_w, c_out).permute(0, 3, 1, 2)
    channels_last = input.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not input.is_contiguous():
        return out  # already channels last, like nn.Conv2d on such an input
    return out.contiguous()


# --- the literal reference ----------------------------------------------------------


def _bilinear_literal(image: Tensor, py: Tensor, px: Tensor) -> Tensor:
    r""":math:`x(p) = \sum_q G(q, p)\, x(q)` over every pixel ``q`` of the image,
    with :math:`G(q, p) = \max(0, 1-|q_y-p_y|)\max(0, 1-|q_x-p_x|)`."""
    h, w = image.shape
    qy = torch.arange(h, device=image.device, dtype=py.dtype)
    qx = torch.arange(w, device=image.device, dtype=px.dtype)
    gy = torch.clamp(1 - (qy - py).abs(), min=0)
    gx = torch.clamp(1 - (qx - px).abs(), min=0)
    return (gy[:, None] * gx[None, :] * image).sum()


def deform_conv2d_loops(
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
        \sum_q G(q, p)\, x[n, c, q],\qquad p = p_0 + p_{ij} + \Delta p_{ij},

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
        input, offset, weight, bias, stride, padding, dilation, mask,
        "deform_conv2d_loops",
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


class DeformConv2d(nn.Module):
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
    without modulation, and can replace a trained ``nn.Conv2d`` without changing
    the network. ``mask_scale=1.0`` gives the paper's :math:`[0, 1]` range and
    mmcv's ``ModulatedDeformConv2dPack`` (mask 0.5 at the start, so the fresh
    layer is half the plain convolution). The official codes train
    ``conv_offset`` with a 0.1x learning rate (DCNv2); give its parameters their
    own optimiser group to do the same.

    ``weight`` and ``bias`` have ``nn.Conv2d``'s shapes and initialisation, drawn
    in the same order, so under the same seed they equal those of
    ``nn.Conv2d(in_channels, out_channels, kernel_size, ...)``.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: int or pair ``(kh, kw)``.
        stride: int or pair.
        padding: int or pair (zeros).
        dilation: int or pair.
        groups: weight groups, dividing ``C_in`` and ``C_out``.
        bias: learn an additive bias.
        offset_groups: ``G``, the number of channel groups with their own
            offsets (the papers' deformable groups); divides ``C_in``.
        modulated: DCNv2 (predict a mask) instead of DCNv1.
        mask_scale: factor of the sigmoid mask (2.0: official DCNv2; 1.0: mmcv).
        device: parameter device.
        dtype: parameter dtype.

    Shapes:
        ``forward(Tensor[N, C_in, H, W]) -> Tensor[N, C_out, H_out, W_out]``.

    Raises:
        ValueError: groups or offset_groups that do not divide the channels, an
            input with the wrong number of channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        offset_groups: int = 1,
        modulated: bool = False,
        mask_scale: float = 2.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_groups(in_channels, out_channels, groups, owner=owner)
        check_positive_int(offset_groups, "offset_groups", owner=owner)
        if in_channels % offset_groups:
            raise ValueError(
                f"{owner} expected offset_groups to divide in_channels, got "
                f"in_channels={in_channels}, offset_groups={offset_groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", owner=owner)
        self.stride = pair(stride, "stride", owner=owner)
        self.padding = pair(padding, "padding", owner=owner, minimum=0)
        self.dilation = pair(dilation, "dilation", owner=owner)
        self.groups = groups
        self.offset_groups = offset_groups
        self.modulated = bool(modulated)
        self.mask_scale = float(mask_scale)
        factory = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, kh, kw, **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        # nn.Conv2d's draws first, so that under one seed weight and bias equal
        # those of the nn.Conv2d this layer replaces
        self._reset_conv_parameters()
        per_tap = 3 if self.modulated else 2
        self.conv_offset = nn.Conv2d(
            in_channels, per_tap * offset_groups * kh * kw, self.kernel_size,
            self.stride, self.padding, self.dilation, bias=True, **factory,
        )
        self._reset_offset_parameters()

    def _reset_conv_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _reset_offset_parameters(self) -> None:
        # zero offsets (and mask logits): a fresh layer samples the regular grid
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def reset_parameters(self) -> None:
        """Re-draw ``weight``/``bias`` as ``nn.Conv2d`` does; zero ``conv_offset``."""
        self._reset_conv_parameters()
        self._reset_offset_parameters()

    def offsets_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The predicted offsets and mask for ``input``.

        Args:
            input: ``Tensor[N, C_in, H, W]``.

        Returns:
            ``(offset, mask)``: ``Tensor[N, 2*G*kh*kw, H_out, W_out]`` in
            torchvision's layout and ``Tensor[N, G*kh*kw, H_out, W_out]`` (after
            the scaled sigmoid), or ``None`` when not ``modulated``.
        """
        check_float_tensor(input, "input", owner=type(self).__name__, ndim=4)
        check_channels(input, self.in_channels, owner=type(self).__name__)
        out = self.conv_offset(input)
        if not self.modulated:
            return out, None
        n_offsets = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, logits = out[:, :n_offsets], out[:, n_offsets:]
        return offset, self.mask_scale * torch.sigmoid(logits)

    def forward(self, input: Tensor) -> Tensor:
        """``Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]``."""
        offset, mask = self.offsets_and_mask(input)
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding,
            self.dilation, mask,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        s += f", offset_groups={self.offset_groups}, modulated={self.modulated}"
        if self.modulated:
            s += f", mask_scale={self.mask_scale}"
        return s
