"""Per-sample convolution: a different kernel for every sample of a batch.

Every weight-generating operator of the book (CondConv, DynamicConv, ODConv,
FDConv) ends here: it builds a kernel ``Tensor[N, C_out, C_in/groups, kH, kW]``
and hands it to :func:`per_sample_conv2d`, which runs the whole batch as *one*
grouped convolution by folding the batch into the groups (chapter 2 derives it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_float_tensor, check_positive_int, pair

__all__ = ["per_sample_conv2d", "per_sample_conv2d_loop"]

_OWNER = "per_sample_conv2d"


def _check(x, weight, bias, stride, padding, dilation, groups, owner):
    check_float_tensor(x, "input", owner=owner, ndim=4)
    check_float_tensor(weight, "weight", owner=owner, ndim=5)
    stride = pair(stride, "stride", owner=owner)
    padding = pair(padding, "padding", owner=owner, minimum=0)
    dilation = pair(dilation, "dilation", owner=owner)
    groups = check_positive_int(groups, "groups", owner=owner)
    n, c_in, h, w = x.shape
    n_w, c_out, c_in_g, kh, kw = weight.shape
    if n_w != n:
        raise ValueError(
            f"{owner} expected one kernel per sample: weight.shape[0] == {n} "
            f"(the batch size), got {n_w}"
        )
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"{owner} expected groups to divide the channels, got in_channels={c_in}, "
            f"out_channels={c_out}, groups={groups}"
        )
    if c_in_g * groups != c_in:
        raise ValueError(
            f"{owner} expected weight of shape [N, C_out, C_in/groups, kH, kW] with "
            f"C_in/groups = {c_in // groups}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_float_tensor(bias, "bias", owner=owner, ndim=2)
        if tuple(bias.shape) != (n, c_out):
            raise ValueError(
                f"{owner} expected bias of shape {(n, c_out)} ([N, C_out]), got "
                f"{tuple(bias.shape)}"
            )
    for axis, size, k in ((0, h, kh), (1, w, kw)):
        span = dilation[axis] * (k - 1) + 1
        if size + 2 * padding[axis] < span:
            raise ValueError(
                f"{owner} expected the padded input ({size + 2 * padding[axis]}) to "
                f"be at least the dilated kernel size ({span}) along "
                f"{'height' if axis == 0 else 'width'}"
            )
    return stride, padding, dilation, groups


def per_sample_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Convolve each sample with its own kernel, as one grouped convolution.

    Sample ``i`` of the output is ``F.conv2d(x[i:i+1], weight[i], bias[i], ...)``.
    The batch is folded into the channel axis, ``Tensor[1, N*C_in, H, W]``, and the
    kernels into ``Tensor[N*C_out, C_in/groups, kH, kW]``, so a single convolution
    with ``groups * N`` groups computes every sample at once.

    Args:
        x: ``Tensor[N, C_in, H, W]``.
        weight: ``Tensor[N, C_out, C_in/groups, kH, kW]``, one kernel per sample.
        bias: optional ``Tensor[N, C_out]``, one bias per sample.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.functional.conv2d``.
        groups: channel groups within each sample's convolution.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]`` with ``H_out`` given by
        :func:`refimpl.arithmetic.conv_output_size`.

    The folding uses ``reshape`` rather than ``view`` so that non-contiguous and
    ``channels_last`` inputs work (the folding trick appears in the CondConv,
    ODConv and FDConv codes, several of which break on such inputs).
    """
    stride, padding, dilation, groups = _check(
        x, weight, bias, stride, padding, dilation, groups, _OWNER
    )
    n, c_in, h, w = x.shape
    _, c_out, c_in_g, kh, kw = weight.shape
    if n == 0:
        # groups=0 is not a valid convolution; an empty batch still keeps the
        # graph to weight (and bias) so that backward() works as for nn.Conv2d.
        h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        out = x.new_zeros(0, c_out, h_out, w_out) + weight.sum() * 0
        return out if bias is None else out + bias.sum() * 0
    out = F.conv2d(
        x.reshape(1, n * c_in, h, w),
        weight.reshape(n * c_out, c_in_g, kh, kw),
        None if bias is None else bias.reshape(n * c_out),
        stride,
        padding,
        dilation,
        groups * n,
    )
    return out.reshape(n, c_out, out.shape[-2], out.shape[-1])


def per_sample_conv2d_loop(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Literal reference for :func:`per_sample_conv2d`: one ``F.conv2d`` per sample.

    Same arguments and result; slow on purpose, obviously right, used by the tests
    and shown in chapter 2 next to the batched version.
    """
    stride, padding, dilation, groups = _check(
        x, weight, bias, stride, padding, dilation, groups, _OWNER
    )
    outputs = [
        F.conv2d(
            x[i : i + 1],
            weight[i],
            None if bias is None else bias[i],
            stride,
            padding,
            dilation,
            groups,
        )
        for i in range(x.shape[0])
    ]
    if not outputs:
        return per_sample_conv2d(x, weight, bias, stride, padding, dilation, groups)
    return torch.cat(outputs, dim=0)
