"""Per-sample convolution: a different kernel for every sample of a batch.

Every weight-generating operator of the book (CondConv, DynamicConv, ODConv,
FDConv) ends here: it builds a kernel ``Tensor[N, C_out, C_in/groups, kH, kW]``
and hands it to :func:`per_sample_conv2d`, which runs the whole batch as *one*
grouped convolution by folding the batch into the groups (chapter 2 derives it).

The folded convolution has ``groups * N`` groups, so the batch size becomes a
hyper-parameter of the convolution: ``torch.compile`` with Inductor builds a new
graph for every batch size (a dynamic batch is specialised), and the ONNX exporter
cannot write a ``Conv`` whose ``group`` depends on the batch. While a graph is being
recorded (``torch.compile``, ``torch.export``, ONNX export, ``torch.jit.trace``)
:func:`per_sample_conv2d` therefore uses formulations whose only batch-dependent
quantity is a tensor dimension; in eager mode it keeps the folded convolution.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    check_conv_operands,
    check_float_tensor,
    check_same_dtype,
    check_shape,
)

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

_is_autocast_available = getattr(torch.amp, "is_autocast_available", None)

__all__ = ["ALGORITHMS", "per_sample_conv2d", "per_sample_conv2d_reference"]

_OWNER = "per_sample_conv2d"

#: The values of ``per_sample_conv2d(..., algorithm=)``.
ALGORITHMS = ("auto", "grouped", "unfold", "taps")


def _check(x, weight, bias, stride, padding, dilation, groups, owner):
    check_float_tensor(weight, "weight", owner=owner, ndim=5)
    parsed = check_conv_operands(
        x, weight.shape[1:], stride, padding, dilation, groups, owner=owner
    )
    n, c_out = x.shape[0], weight.shape[1]
    if weight.shape[0] != n:
        raise ValueError(
            f"{owner} expected one kernel per sample: weight.shape[0] == {n} "
            f"(the batch size), got {weight.shape[0]}"
        )
    if bias is not None:
        check_shape(bias, "bias", (n, c_out), owner=owner, layout="[N, C_out]")
    check_same_dtype(x, owner=owner, weight=weight, bias=bias)
    return parsed


def _check_algorithm(algorithm: object) -> str:
    if not isinstance(algorithm, str):
        raise TypeError(
            f"{_OWNER} expected algorithm to be a str, got "
            f"{type(algorithm).__name__} {algorithm!r}"
        )
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"{_OWNER} expected algorithm to be one of "
            f"{', '.join(repr(a) for a in ALGORITHMS)}, got {algorithm!r}"
        )
    return algorithm


def _recording() -> bool:
    """True while a graph is being recorded rather than the call being run.

    ``torch.compile`` and ``torch.export`` (hence the dynamo-based ONNX exporter)
    report ``is_compiling()``; the TorchScript-based ONNX exporter and
    ``torch.jit.trace`` do not, but they too bake a batch-dependent ``groups`` into
    the graph as a constant.
    """
    if _is_compiling() or torch.jit.is_tracing():
        return True
    # torch.onnx is imported lazily; until it is, no ONNX export can be running.
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _output_size(size, kernel, stride, padding, dilation):
    # conv_output_size without its checks; sizes may be symbolic while tracing.
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _windows(x, kernel, stride, padding, dilation, out_size):
    """The ``kH * kW`` strided windows of the zero-padded input, tap ``(i, j)`` first
    in row-major order, each ``Tensor[N, C_in, H_out, W_out]``.

    Window ``(i, j)`` holds ``x_pad[:, :, i * dH + s * sH, j * dW + t * sW]`` at
    ``(s, t)``: the input pixels that kernel tap ``(i, j)`` multiplies. Slicing keeps
    every size static except the batch (ONNX: ``Pad`` and ``Slice``).
    """
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    rows = stride[0] * (out_size[0] - 1) + 1
    cols = stride[1] * (out_size[1] - 1) + 1
    return [
        x[
            :,
            :,
            i * dilation[0] : i * dilation[0] + rows : stride[0],
            j * dilation[1] : j * dilation[1] + cols : stride[1],
        ]
        for i in range(kernel[0])
        for j in range(kernel[1])
    ]


def _grouped(x, weight, bias, stride, padding, dilation, groups):
    # The batch folded into the groups: one F.conv2d with groups * N groups.
    n, c_in, h, w = x.shape
    _, c_out, c_in_g, kh, kw = weight.shape
    if n == 0:
        # groups=0 is not a valid convolution; an empty batch still keeps the
        # graph to weight (and bias) so that backward() works as for nn.Conv2d.
        h_out = _output_size(h, kh, stride[0], padding[0], dilation[0])
        w_out = _output_size(w, kw, stride[1], padding[1], dilation[1])
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


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None):
    """The operands cast as autocast casts a convolution's, if autocast is on.

    The elementwise products, sums and ``torch.stack`` of ``"unfold"`` and
    ``"taps"`` are not autocast to lower precision (and ``stack`` fails on a float16
    operand under CPU bfloat16 autocast), so the cast is done once, up front:
    float64 stays as it is, other float dtypes become the autocast dtype.
    """
    device = x.device.type
    if _is_autocast_available is None or not _is_autocast_available(device):
        return x, weight, bias  # torch < 2.4, or a device without autocast (meta)
    if not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    x, weight, bias = (
        t if t is None or t.dtype == torch.float64 else t.to(dtype)
        for t in (x, weight, bias)
    )
    return x, weight, bias


def _prepare(x, weight, bias, stride, padding, dilation):
    """What ``"unfold"`` and ``"taps"`` share: the operands cast as autocast would
    cast them, the output size and the input windows of every tap."""
    _, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    h_out = _output_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = _output_size(w, kw, stride[1], padding[1], dilation[1])
    x, weight, bias = _autocast(x, weight, bias)
    windows = _windows(x, (kh, kw), stride, padding, dilation, (h_out, w_out))
    return weight, bias, windows, h_out, w_out


def _unfold(x, weight, bias, stride, padding, dilation, groups):
    # im2col from strided slices, then one batched matrix product per (sample, group).
    n = x.shape[0]
    _, c_out, c_in_g, kh, kw = weight.shape
    weight, bias, windows, h_out, w_out = _prepare(
        x, weight, bias, stride, padding, dilation
    )
    # Tensor[N, C_in, kH*kW, H_out, W_out]: rows ordered (channel, tap) like the
    # flattened kernel, so each group's rows are contiguous.
    cols = torch.stack(windows, dim=2)
    depth = c_in_g * kh * kw
    cols = cols.reshape(n * groups, depth, h_out * w_out)
    kernels = weight.reshape(n * groups, c_out // groups, depth)
    if bias is None:
        out = torch.bmm(kernels, cols)
    else:
        # one fused product and bias sum
        out = torch.baddbmm(bias.reshape(n * groups, c_out // groups, 1), kernels, cols)
    return out.reshape(n, c_out, h_out, w_out)


def _taps(x, weight, bias, stride, padding, dilation, groups):
    # Sum over the kernel taps of (per-sample kernel tap) x (strided window).
    n = x.shape[0]
    _, c_out, c_in_g, kh, kw = weight.shape
    weight, bias, windows, h_out, w_out = _prepare(
        x, weight, bias, stride, padding, dilation
    )
    kernels = weight.reshape(n, groups, c_out // groups, c_in_g, kh * kw)
    out = None
    for tap, window in enumerate(windows):
        window = window.reshape(n, groups, c_in_g, h_out * w_out)
        k = kernels[..., tap]  # Tensor[N, groups, C_out/groups, C_in/groups]
        # depthwise-like (one input channel per group): a broadcast product is
        # several times faster than a matrix product with an inner size of 1.
        term = k * window if c_in_g == 1 else torch.matmul(k, window)
        out = term if out is None else out + term
    out = out.reshape(n, c_out, h_out, w_out)
    return out if bias is None else out + bias.reshape(n, c_out, 1, 1)


def per_sample_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    algorithm: str = "auto",
) -> Tensor:
    """Convolve each sample with its own kernel, by default as one grouped convolution.

    Sample ``i`` of the output is ``F.conv2d(x[i:i+1], weight[i], bias[i], ...)``.
    The batch is folded into the channel axis, ``Tensor[1, N*C_in, H, W]``, and the
    kernels into ``Tensor[N*C_out, C_in/groups, kH, kW]``, so a single convolution
    with ``groups * N`` groups computes every sample at once.

    Args:
        input: ``Tensor[N, C_in, H, W]``.
        weight: ``Tensor[N, C_out, C_in/groups, kH, kW]``, one kernel per sample.
        bias: optional ``Tensor[N, C_out]``, one bias per sample.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.functional.conv2d``.
        groups: channel groups within each sample's convolution.
        algorithm: how the batch is computed, all with the same result:

            * ``"grouped"``: the batch folded into the groups, one ``F.conv2d``
              with ``groups * N`` groups. The fastest in eager mode, but the batch
              size is then an argument of the convolution: Inductor specialises it
              (a new graph per batch size) and ONNX cannot express it.
            * ``"unfold"``: im2col, ``Tensor[N*groups, C_in/groups*kH*kW,
              H_out*W_out]``, built from ``kH*kW`` strided slices of the padded
              input, then one batched matrix product (``torch.baddbmm``). The
              batch is only a tensor dimension; costs ``kH*kW`` times the input
              in memory.
            * ``"taps"``: the sum over the ``kH*kW`` kernel taps of each tap's
              per-sample kernel times its strided window of the input (a
              broadcast product when ``C_in/groups == 1``, a matrix product
              otherwise). No im2col buffer; under Inductor, several times faster
              than ``"unfold"`` for depthwise-like kernels.
            * ``"auto"`` (default): ``"grouped"`` in eager mode; while a graph is
              recorded (``torch.compile``, ``torch.export``, ONNX export,
              ``torch.jit.trace``), ``"taps"`` when ``C_in/groups == 1`` and
              ``"unfold"`` otherwise, so that the batch stays dynamic.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]`` with ``H_out`` given by
        :func:`refimpl.arithmetic.conv_output_size`.

    The folding uses ``reshape`` rather than ``view`` so that non-contiguous and
    ``channels_last`` inputs work (the folding trick appears in the CondConv,
    ODConv and FDConv codes, several of which break on such inputs). The checks
    branch on sizes only to raise errors, so a compiled or exported graph keeps
    the batch symbolic (batch 0 included for ``"unfold"`` and ``"taps"``).
    """
    algorithm = _check_algorithm(algorithm)
    stride, padding, dilation, groups = _check(
        input, weight, bias, stride, padding, dilation, groups, _OWNER
    )
    return _per_sample_conv2d(
        input, weight, bias, stride, padding, dilation, groups, algorithm
    )


def _per_sample_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    algorithm: str = "auto",
) -> Tensor:
    """:func:`per_sample_conv2d` without its checks, for the layers, which check
    their input once at their own boundary."""
    if algorithm == "auto":
        if not _recording():
            algorithm = "grouped"
        else:
            algorithm = "taps" if weight.shape[2] == 1 else "unfold"
    implementation = {"grouped": _grouped, "unfold": _unfold, "taps": _taps}
    return implementation[algorithm](x, weight, bias, stride, padding, dilation, groups)


def per_sample_conv2d_reference(
    input: Tensor,
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
        input, weight, bias, stride, padding, dilation, groups, _OWNER
    )
    outputs = [
        F.conv2d(
            input[i : i + 1],
            weight[i],
            None if bias is None else bias[i],
            stride,
            padding,
            dilation,
            groups,
        )
        for i in range(input.shape[0])
    ]
    if not outputs:
        return per_sample_conv2d(input, weight, bias, stride, padding, dilation, groups)
    return torch.cat(outputs, dim=0)
