"""Convolution arithmetic: output sizes, receptive fields and three convolutions.

Chapter 1 of the book derives everything here. The size rules follow
"A guide to convolution arithmetic for deep learning" (Dumoulin and Visin, 2016,
arXiv:1603.07285) in the form PyTorch documents for ``nn.Conv2d`` and
``nn.ConvTranspose2d``. The three convolutions compute exactly what
``torch.nn.functional.conv2d`` computes (a cross-correlation) in three ways:

* :func:`conv2d_loops`: one output pixel at a time, the literal definition;
* :func:`conv2d_unfold`: im2col, i.e. every patch as a column of one matrix, then a
  single (grouped) matrix product;
* :func:`conv2d_fft`: the convolution theorem, a product of spectra.

They take the arguments of ``F.conv2d`` (sizes as ints or pairs; string padding
such as ``"same"`` is not accepted); the tests check numerically that they equal it
in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import (
    check_channels,
    check_float_tensor,
    check_groups,
    check_positive_int,
    pair,
)

__all__ = [
    "conv_output_size",
    "conv_transpose_output_size",
    "ReceptiveField",
    "receptive_field",
    "conv2d_loops",
    "conv2d_unfold",
    "conv2d_fft",
]

IntOrPair = int | tuple[int, int]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same_form(values: tuple[int, int], *args: object) -> IntOrPair:
    # Like PyTorch: ints in, int out; any pair in, pair out.
    return values[0] if all(_is_int(a) for a in args) else values


# --- sizes ------------------------------------------------------------------------


def conv_output_size(
    size: IntOrPair,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> IntOrPair:
    r"""Spatial output size of a convolution (or pooling) layer.

    Computes, per axis, PyTorch's rule for ``nn.Conv2d``

    .. math::

        H_{\text{out}} = \left\lfloor \frac{H + 2p - d(k - 1) - 1}{s} \right\rfloor
        + 1,

    which is relationship 15 of Dumoulin and Visin, "A guide to convolution
    arithmetic for deep learning" (2016, arXiv:1603.07285), who write ``i`` and
    ``o`` for the sizes; with ``d = 1`` it is the familiar
    :math:`(H - k + 2p)/s + 1`. Chapter 1 derives it.

    Args:
        size: input size ``H``, an int or a pair ``(H, W)``.
        kernel_size: kernel size ``k``, int or pair.
        stride: stride ``s`` >= 1, int or pair.
        padding: zero padding ``p`` >= 0 on each side, int or pair.
        dilation: dilation ``d`` >= 1, int or pair.

    Returns:
        An int if every argument is an int, else a pair ``(H_out, W_out)``.

    Raises:
        TypeError: if an argument is not an int or a pair of ints.
        ValueError: if a size is not positive (padding negative) or the dilated
            kernel ``d(k - 1) + 1`` is larger than the padded input ``H + 2p``.
    """
    owner = "conv_output_size"
    i = pair(size, "size", owner=owner)
    k = pair(kernel_size, "kernel_size", owner=owner)
    s = pair(stride, "stride", owner=owner)
    p = pair(padding, "padding", owner=owner, minimum=0)
    d = pair(dilation, "dilation", owner=owner)
    out = []
    for axis in range(2):
        span = d[axis] * (k[axis] - 1) + 1
        padded = i[axis] + 2 * p[axis]
        if padded < span:
            raise ValueError(
                f"{owner} expected the dilated kernel (size {span}) to fit in the "
                f"padded input (size {padded}), got a kernel larger than the input"
            )
        out.append((padded - span) // s[axis] + 1)
    return _same_form(tuple(out), size, kernel_size, stride, padding, dilation)


def conv_transpose_output_size(
    size: IntOrPair,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    output_padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> IntOrPair:
    r"""Spatial output size of a transposed convolution (``nn.ConvTranspose2d``).

    Computes, per axis, PyTorch's rule

    .. math::

        H'_{\text{out}} = (H' - 1)s - 2p + d(k - 1) + q + 1,

    with ``q = output_padding`` (the guide's ``a``). A strided convolution maps the
    ``s`` input sizes ``H, H + 1, ..., H + s - 1`` to one output size; ``q`` picks
    which of them the transposed convolution returns (relationship 14 of Dumoulin
    and Visin, 2016, arXiv:1603.07285, for ``d = 1``; the guide gives no dilated
    form). Chapter 1 derives it.

    Args:
        size: input size ``H'`` of the transposed convolution, int or pair.
        kernel_size: kernel size ``k``, int or pair.
        stride: stride ``s`` >= 1, int or pair.
        padding: padding ``p`` >= 0 of the convolution being transposed.
        output_padding: extra size ``q`` >= 0 added at the bottom/right; PyTorch
            requires ``q < max(s, d)``.
        dilation: dilation ``d`` >= 1, int or pair.

    Returns:
        An int if every argument is an int, else a pair ``(H_out, W_out)``.

    Raises:
        TypeError: if an argument is not an int or a pair of ints.
        ValueError: if a size is not positive, ``output_padding >= max(stride,
            dilation)``, or the result would be smaller than 1. This is stricter
            than PyTorch, which returns an empty axis (size 0) as long as the
            other axis is not empty.
    """
    owner = "conv_transpose_output_size"
    i = pair(size, "size", owner=owner)
    k = pair(kernel_size, "kernel_size", owner=owner)
    s = pair(stride, "stride", owner=owner)
    p = pair(padding, "padding", owner=owner, minimum=0)
    a = pair(output_padding, "output_padding", owner=owner, minimum=0)
    d = pair(dilation, "dilation", owner=owner)
    out = []
    for axis in range(2):
        limit = max(s[axis], d[axis])
        if a[axis] >= limit:
            raise ValueError(
                f"{owner} expected output_padding < max(stride, dilation) = {limit}, "
                f"got output_padding={a[axis]}"
            )
        o = (i[axis] - 1) * s[axis] - 2 * p[axis] + d[axis] * (k[axis] - 1)
        o += a[axis] + 1
        if o < 1:
            raise ValueError(
                f"{owner} expected a positive output size, got {o} (padding "
                f"{p[axis]} removes more than the layer produces)"
            )
        out.append(o)
    return _same_form(
        tuple(out), size, kernel_size, stride, padding, output_padding, dilation
    )


# --- receptive field --------------------------------------------------------------


class ReceptiveField(NamedTuple):
    """Result of :func:`receptive_field`, ints or pairs ``(H, W)``.

    ``size`` is the number of input pixels (per axis) that one output pixel
    depends on; ``jump`` is the distance in input pixels between two neighbouring
    output pixels, the effective stride of the stack.
    """

    size: int | tuple[int, int]
    jump: int | tuple[int, int]


# Layers that act on each pixel on its own leave the receptive field unchanged.
_POINTWISE = (
    nn.Identity,
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.Dropout,
    nn.Dropout2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
)


def _layer_triples(layers, owner: str) -> list[tuple[object, object, object]]:
    if isinstance(layers, nn.Module):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(
            f"{owner} expected layers to be a sequence of (kernel_size, stride, "
            f"dilation) tuples or modules, got {type(layers).__name__}"
        )
    triples = []
    for index, layer in enumerate(layers):
        if isinstance(layer, (nn.Sequential, nn.ModuleList)):
            triples.extend(_layer_triples(list(layer), owner))
        elif isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            # a pooling module may hold ints; pairs make every module 2-D
            triples.append(
                (
                    pair(layer.kernel_size, "kernel_size", owner=owner),
                    pair(layer.stride, "stride", owner=owner),
                    pair(layer.dilation, "dilation", owner=owner),
                )
            )
        elif isinstance(layer, nn.AvgPool2d):
            stride = layer.stride if layer.stride is not None else layer.kernel_size
            triples.append(
                (
                    pair(layer.kernel_size, "kernel_size", owner=owner),
                    pair(stride, "stride", owner=owner),
                    (1, 1),
                )
            )
        elif isinstance(layer, _POINTWISE):
            continue
        elif isinstance(layer, nn.Module):
            raise TypeError(
                f"{owner} expected Conv2d, MaxPool2d, AvgPool2d or a pointwise "
                f"module at layers[{index}], got {type(layer).__name__}"
            )
        elif (
            isinstance(layer, Sequence)
            and not isinstance(layer, str)
            and (len(layer) == 3)
        ):
            triples.append(tuple(layer))
        else:
            raise TypeError(
                f"{owner} expected layers[{index}] to be a (kernel_size, stride, "
                f"dilation) tuple or a module, got {layer!r}"
            )
    return triples


def receptive_field(layers) -> ReceptiveField:
    r"""Receptive field size and jump (effective stride) of a stack of layers.

    With ``r_0 = 1`` and ``j_0 = 1``, layer ``l`` with kernel ``k_l``, stride
    ``s_l`` and dilation ``d_l`` gives

    .. math::

        r_l = r_{l-1} + (k_l - 1)\, d_l\, j_{l-1}, \qquad
        j_l = j_{l-1}\, s_l = \prod_{i \le l} s_i,

    the closed form used by Araujo, Norris and Sim, "Computing Receptive Fields of
    Convolutional Neural Networks" (Distill, 2019). Padding shifts the field but
    does not change its size. Chapter 1 derives the recurrence and checks it
    against the support of a gradient.

    Args:
        layers: the stack, first layer first: ``(kernel_size, stride, dilation)``
            tuples (ints or pairs), or modules: ``nn.Conv2d``, ``nn.MaxPool2d``,
            ``nn.AvgPool2d``, pointwise modules (activations, normalisation,
            dropout; skipped) and ``nn.Sequential`` containers of them.

    Returns:
        :class:`ReceptiveField` ``(size, jump)``: ints if every tuple entry is an
        int, pairs ``(H, W)`` as soon as one entry is a pair or a module is given.

    Raises:
        TypeError: for an unsupported layer or a non-integer entry.
        ValueError: for a zero or negative kernel size, stride or dilation.
    """
    owner = "receptive_field"
    triples = _layer_triples(layers, owner)
    # modules contribute pairs, so one module is enough to make the answer 2-D
    two_d = any(not _is_int(v) for t in triples for v in t)
    size, jump = [1, 1], [1, 1]
    for k, s, d in triples:
        k = pair(k, "kernel_size", owner=owner)
        s = pair(s, "stride", owner=owner)
        d = pair(d, "dilation", owner=owner)
        for axis in range(2):
            size[axis] += (k[axis] - 1) * d[axis] * jump[axis]
            jump[axis] *= s[axis]
    if two_d:
        return ReceptiveField(tuple(size), tuple(jump))
    return ReceptiveField(size[0], jump[0])


# --- three convolutions -----------------------------------------------------------


def _check_conv(x, weight, bias, stride, padding, dilation, groups, owner):
    """Validate ``F.conv2d`` arguments; return normalised stride/padding/dilation."""
    check_float_tensor(x, "input", owner=owner, ndim=4)
    check_float_tensor(weight, "weight", owner=owner, ndim=4)
    if weight.dtype != x.dtype:
        raise TypeError(
            f"{owner} expected weight with the dtype of input ({x.dtype}), got "
            f"{weight.dtype}"
        )
    if weight.device != x.device:
        raise ValueError(
            f"{owner} expected weight on the device of input ({x.device}), got "
            f"{weight.device}"
        )
    stride = pair(stride, "stride", owner=owner)
    padding = pair(padding, "padding", owner=owner, minimum=0)
    dilation = pair(dilation, "dilation", owner=owner)
    groups = check_positive_int(groups, "groups", owner=owner)
    c_out, c_in_g, kh, kw = weight.shape
    if min(c_out, c_in_g, kh, kw) < 1:
        raise ValueError(
            f"{owner} expected weight [C_out, C_in/groups, kH, kW] with sizes >= 1, "
            f"got shape {tuple(weight.shape)}"
        )
    if min(x.shape[1:]) < 1:
        raise ValueError(
            f"{owner} expected input [N, C_in, H, W] with C_in, H, W >= 1, got shape "
            f"{tuple(x.shape)}"
        )
    check_groups(x.shape[1], c_out, groups, owner=owner)
    check_channels(x, c_in_g * groups, owner=owner)
    if bias is not None:
        check_float_tensor(bias, "bias", owner=owner, ndim=1)
        if bias.shape[0] != c_out or bias.dtype != x.dtype:
            raise ValueError(
                f"{owner} expected bias of shape ({c_out},) and dtype {x.dtype}, got "
                f"shape {tuple(bias.shape)} and dtype {bias.dtype}"
            )
    for axis, (size, k) in enumerate(zip(x.shape[2:], (kh, kw))):
        span = dilation[axis] * (k - 1) + 1
        if size + 2 * padding[axis] < span:
            raise ValueError(
                f"{owner} expected the dilated kernel (size {span}) to fit in the "
                f"padded input (size {size + 2 * padding[axis]}) along "
                f"{'height' if axis == 0 else 'width'}, got a kernel larger than "
                f"the input"
            )
    return stride, padding, dilation, groups


def conv2d_loops(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    r"""2-D cross-correlation by its definition, one output pixel at a time.

    For sample ``j``, output channel ``o`` in group
    ``gamma = o // (C_out / groups)`` and output pixel ``(h, w)``, with kernel taps
    ``(a, b)``:

    .. math::

        \begin{aligned}
        y[j, o, h, w] = {} & \mathrm{bias}[o] \\
        & + \sum_{c, a, b} W[o, c, a, b]\,
        \tilde x[j, \gamma C_g + c,\; h s_H + a d_H,\; w s_W + b d_W],
        \end{aligned}

    with :math:`C_g = C_{\text{in}} / g` and :math:`\tilde x` the
    zero-padded input. This is what
    ``torch.nn.functional.conv2d`` computes: the kernel is *not* flipped. It is the
    slow, obviously right reference the other implementations are tested against
    (chapter 1).

    Args:
        x: ``Tensor[N, C_in, H, W]``, floating point.
        weight: ``Tensor[C_out, C_in/groups, kH, kW]``.
        bias: optional ``Tensor[C_out]``.
        stride, padding, dilation: ints or pairs, as in ``F.conv2d``.
        groups: number of channel groups; divides ``C_in`` and ``C_out``.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, sizes from :func:`conv_output_size`.

    Raises:
        TypeError, ValueError: for invalid arguments, before computing.
    """
    (sh, sw), (ph, pw), (dh, dw), groups = _check_conv(
        x, weight, bias, stride, padding, dilation, groups, "conv2d_loops"
    )
    c_out, c_in_g, kh, kw = weight.shape
    out_per_group = c_out // groups
    h_out, w_out = conv_output_size(
        tuple(x.shape[2:]), (kh, kw), (sh, sw), (ph, pw), (dh, dw)
    )
    xp = F.pad(x, (pw, pw, ph, ph))  # zeros around the image
    y = x.new_zeros(x.shape[0], c_out, h_out, w_out)
    for o in range(c_out):
        c0 = (o // out_per_group) * c_in_g  # first input channel of o's group
        for h in range(h_out):
            for w in range(w_out):
                # the kH x kW taps that output pixel (h, w) sees, d apart
                patch = xp[
                    :,
                    c0 : c0 + c_in_g,
                    h * sh : h * sh + dh * (kh - 1) + 1 : dh,
                    w * sw : w * sw + dw * (kw - 1) + 1 : dw,
                ]
                y[:, o, h, w] = (patch * weight[o]).sum(dim=(1, 2, 3))
    if bias is not None:
        y = y + bias.reshape(1, c_out, 1, 1)
    return y


def conv2d_unfold(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    r"""2-D cross-correlation as one matrix product (im2col).

    ``F.unfold`` copies every receptive-field patch into a column,
    ``Tensor[N, C_in*kH*kW, L]`` with ``L = H_out*W_out``. A convolution is then
    the product of the ``Tensor[C_out, C_in*kH*kW]`` weight matrix with that
    column matrix; with groups, the rows and columns split into ``groups``
    independent blocks and one batched ``matmul`` multiplies them all. The patch
    matrix holds about ``kH*kW`` copies of the input, which is the price of turning
    convolution into the fastest kernel there is (Chellapilla, Puri and Simard,
    "High Performance Convolutional Neural Networks for Document Processing",
    IWFHR 2006). Chapter 1 derives it.

    Args:
        x: ``Tensor[N, C_in, H, W]``, floating point.
        weight: ``Tensor[C_out, C_in/groups, kH, kW]``.
        bias: optional ``Tensor[C_out]``.
        stride, padding, dilation: ints or pairs, as in ``F.conv2d``.
        groups: number of channel groups; divides ``C_in`` and ``C_out``.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, equal to ``F.conv2d`` with the same
        arguments.

    Raises:
        TypeError, ValueError: for invalid arguments, before computing.
    """
    stride, padding, dilation, groups = _check_conv(
        x, weight, bias, stride, padding, dilation, groups, "conv2d_unfold"
    )
    n = x.shape[0]
    c_out, c_in_g, kh, kw = weight.shape
    h_out, w_out = conv_output_size(
        tuple(x.shape[2:]), (kh, kw), stride, padding, dilation
    )
    # rows of the patch matrix run over (channel, a, b), channel outermost, so
    # the rows of one group are contiguous
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(n, groups, c_in_g * kh * kw, h_out * w_out)
    w = weight.reshape(groups, c_out // groups, c_in_g * kh * kw)
    y = torch.matmul(w, cols)  # [N, groups, C_out/groups, L]
    y = y.reshape(n, c_out, h_out, w_out)
    if bias is not None:
        y = y + bias.reshape(1, c_out, 1, 1)
    return y


def _fast_fft_size(n: int) -> int:
    """Smallest integer >= ``n`` whose only prime factors are 2, 3 and 5."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def conv2d_fft(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    r"""2-D cross-correlation through the convolution theorem.

    A cross-correlation is a convolution with the flipped kernel, and a
    convolution is a pointwise product of discrete Fourier transforms, provided
    both signals are zero-padded to at least the *linear* convolution size
    ``H_p + k_h - 1`` (``H_p`` the padded input, ``k_h`` the dilated kernel);
    with less, the DFT computes a circular convolution whose ends wrap around.
    The transform size is rounded up to a product of 2, 3 and 5, which FFT
    libraries handle fastest; extra zeros change nothing. From the full linear
    result the valid window is cropped, then subsampled by the stride.
    Dilation inserts ``d - 1`` zeros between kernel taps; groups contract the
    spectra channel by channel within each group. The cost does not
    grow with the kernel size, which is why FFT convolution pays off for large
    kernels (Mathieu, Henaff and LeCun, "Fast Training of Convolutional Networks
    through FFTs", ICLR 2014, arXiv:1312.5851). Chapter 1 derives it.

    Half-precision inputs are computed in float32 (the FFT has no half-precision
    CPU kernel and loses accuracy there) and returned in their own dtype.

    Args:
        x: ``Tensor[N, C_in, H, W]``, floating point.
        weight: ``Tensor[C_out, C_in/groups, kH, kW]``.
        bias: optional ``Tensor[C_out]``.
        stride, padding, dilation: ints or pairs, as in ``F.conv2d``.
        groups: number of channel groups; divides ``C_in`` and ``C_out``.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, equal to ``F.conv2d`` with the same
        arguments up to floating-point rounding.

    Raises:
        TypeError, ValueError: for invalid arguments, before computing.
    """
    (sh, sw), (ph, pw), (dh, dw), groups = _check_conv(
        x, weight, bias, stride, padding, dilation, groups, "conv2d_fft"
    )
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x, weight = x.float(), weight.float()
    n = x.shape[0]
    c_out, c_in_g, kh, kw = weight.shape
    # dilation: the kernel with d - 1 zeros between taps
    kh_d, kw_d = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    w_d = weight.new_zeros(c_out, c_in_g, kh_d, kw_d)
    w_d[:, :, ::dh, ::dw] = weight
    xp = F.pad(x, (pw, pw, ph, ph))
    hp, wp = xp.shape[-2:]
    # linear (not circular) convolution needs room for the whole result; any
    # larger size gives the same values, so round up to one the FFT does fast
    size = (_fast_fft_size(hp + kh_d - 1), _fast_fft_size(wp + kw_d - 1))
    if n == 0:
        # oneMKL rejects an empty FFT batch; keep the graph to the weight
        h_out = (hp - kh_d) // sh + 1
        w_out = (wp - kw_d) // sw + 1
        y = xp.new_zeros(0, c_out, h_out, w_out) + w_d.sum() * 0
        return y if bias is None else (y + bias.sum() * 0).to(dtype)
    x_f = torch.fft.rfft2(xp, s=size)
    w_f = torch.fft.rfft2(w_d.flip(-2, -1), s=size)
    x_f = x_f.reshape(n, groups, c_in_g, *x_f.shape[-2:])
    w_f = w_f.reshape(groups, c_out // groups, c_in_g, *w_f.shape[-2:])
    y_f = torch.einsum("ngcyx,gocyx->ngoyx", x_f, w_f)
    y_full = torch.fft.irfft2(y_f, s=size).reshape(n, c_out, *size)
    # entry kh_d - 1 of the full convolution is the first valid position; the
    # entries past the linear size are zeros and never read
    y = y_full[:, :, kh_d - 1 : hp : sh, kw_d - 1 : wp : sw]
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(1, c_out, 1, 1)
    return y.to(dtype)
