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
from torch.utils.checkpoint import checkpoint

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

__all__ = [
    "ALGORITHMS",
    "BANK_ALGORITHMS",
    "KERNEL_BUDGET",
    "bank_costs",
    "choose_bank_algorithm",
    "mixed_conv2d",
    "per_sample_conv2d",
    "per_sample_conv2d_reference",
]

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


# --- kernel banks: the algorithms and their costs ------------------------------------

#: The values of the ``algorithm`` option of the kernel-bank layers (CondConv2d,
#: DynamicConv2d, ODConv2d) and of :func:`bank_costs`.
BANK_ALGORITHMS = ("auto", "grouped", "unfold", "outputs")

#: Elements of per-sample kernels alive at once in the memory-frugal path (8 MB in
#: float32). A larger batch is mixed and convolved in chunks of samples: buffers of
#: this size are recycled by the allocator instead of being faulted in afresh, which
#: at the deep ResNet stages costs more than the mixing arithmetic itself.
KERNEL_BUDGET = 1 << 21

#: Cost of one byte written (and read back) through memory, in multiply-adds, for
#: :func:`choose_bank_algorithm`: measured on a 2-core CPU, where a static convolution
#: runs at about 60 GMAC/s and a per-sample kernel costs several such MACs per byte
#: (written by the mixing, reordered and read by the grouped convolution).
BYTE_MACS = 28.0


def check_bank_algorithm(algorithm: object, owner: str) -> str:
    """``algorithm`` if it is one of :data:`BANK_ALGORITHMS`, else a clear error."""
    if not isinstance(algorithm, str):
        raise TypeError(
            f"{owner} expected algorithm to be a str, got "
            f"{type(algorithm).__name__} {algorithm!r}"
        )
    if algorithm not in BANK_ALGORITHMS:
        raise ValueError(
            f"{owner} expected algorithm to be one of "
            f"{', '.join(repr(a) for a in BANK_ALGORITHMS)}, got {algorithm!r}"
        )
    return algorithm


def bank_costs(
    input_shape,
    weight_shape,
    output_size,
    *,
    itemsize: int = 4,
    keep_kernels: bool = False,
    taps_apart: bool = False,
    kernel_scalings: int = 0,
    feature_scalings: int = 0,
) -> dict[str, dict[str, int]]:
    """What each algorithm of a kernel-bank layer costs for one forward.

    A bank ``W: Tensor[n, C_out, C_in/g, kH, kW]`` is mixed per sample with
    weights ``a: Tensor[N, n]``; the layer computes ``y_j = (sum_i a_ji W_i) * x_j``.
    By linearity two orders give the same ``y`` (chapter 2):

    * ``"grouped"`` / ``"unfold"``: mix the kernels, ``N * n * P`` MACs for
      ``P = C_out * C_in/g * kH * kW``, writing ``N * P`` kernel entries, then one
      per-sample convolution (the batch folded into the groups, or im2col and a
      batched matrix product, which also writes ``N * C_in * kH * kW * H_out * W_out``
      columns);
    * ``"outputs"``: one static convolution with ``n * C_out`` output channels
      (``n`` times the MACs of the layer), writing ``N * n * C_out * H_out * W_out``
      outputs, then their mixture (as many MACs). With ``taps_apart`` (ODConv's
      spatial attention, which differs per sample and per tap) the convolution is
      split into ``kH * kW`` 1x1 convolutions, one per tap, each mixed on its own.

    MACs count one multiply-add once (the papers' convention).
    ``torch.utils.flop_counter`` counts two FLOPs per multiply-add of the
    convolutions and matrix products it sees, and nothing for the elementwise
    scalings, so its count halved is the ``"macs"`` here minus the elementwise
    terms (``kernel_scalings`` passes over the ``N * P`` kernels, ``feature_scalings``
    over ``N * C_in * H * W`` inputs or ``N * C_out * H_out * W_out`` outputs, as
    ODConv's attentions do).

    Args:
        input_shape: ``(N, C_in, H, W)`` (after any explicit padding).
        weight_shape: ``(n, C_out, C_in/g, kH, kW)``.
        output_size: ``(H_out, W_out)``.
        itemsize: bytes per element (4 for float32).
        keep_kernels: whether the per-sample kernels are kept for the backward
            (else they are recomputed there from ``a`` and ``W``).
        taps_apart: ``"outputs"`` splits the taps (see above).
        kernel_scalings, feature_scalings: elementwise passes of the mixing
            algorithms over kernels and over feature maps (ODConv's attentions).

    Returns:
        ``{algorithm: {"macs", "written_bytes", "saved_bytes"}}`` for
        ``"grouped"``, ``"unfold"`` and ``"outputs"``: multiply-adds,
        bytes of the intermediate tensors each writes (per-sample kernels,
        im2col columns, per-kernel outputs) and bytes the backward keeps besides
        the input, the parameters and the output.
    """
    n, c_in, h, w = input_shape
    k, c_out, c_in_g, kh, kw = weight_shape
    h_out, w_out = output_size
    taps = kh * kw
    kernel = c_out * c_in_g * taps  # P
    positions = h_out * w_out
    conv = n * c_out * c_in_g * taps * positions
    mix = n * k * kernel if k > 1 else 0
    scalings = (
        kernel_scalings * n * kernel
        + feature_scalings * n * (c_in * h * w + c_out * positions) // 2
    )
    kernels = n * kernel
    saved_kernels = kernels if keep_kernels else 0
    cols = n * c_in * taps * positions
    outputs = n * k * c_out * positions * (taps if taps_apart else 1)
    return {
        "grouped": {
            "macs": conv + mix + scalings,
            "written_bytes": kernels * itemsize,
            "saved_bytes": saved_kernels * itemsize,
        },
        "unfold": {
            "macs": conv + mix + scalings,
            "written_bytes": (kernels + cols) * itemsize,
            "saved_bytes": (saved_kernels + cols) * itemsize,
        },
        "outputs": {
            "macs": k * conv + outputs,
            "written_bytes": outputs * itemsize,
            "saved_bytes": (outputs + (cols if taps_apart else 0)) * itemsize,
        },
    }


def choose_bank_algorithm(costs: dict[str, dict[str, int]]) -> str:
    """The algorithm ``"auto"`` runs in eager mode: the least
    ``macs + BYTE_MACS * written_bytes`` of :func:`bank_costs` between
    ``"grouped"`` and ``"outputs"``.

    ``"unfold"`` is never chosen in eager mode: it does the work of ``"grouped"``
    and writes the im2col columns on top. (While a graph is recorded the
    per-sample convolution is always an ``"unfold"`` or ``"taps"`` form, see
    :func:`per_sample_conv2d`.)
    """

    def time(name):
        return costs[name]["macs"] + BYTE_MACS * costs[name]["written_bytes"]

    return "outputs" if time("outputs") < time("grouped") else "grouped"


# Output positions up to which the backward computes the kernel gradient by
# im2col and a batched product rather than by the grouped convolution's backward.
_UNFOLD_POSITIONS = 256


def _samples_per_chunk(kernel_numel: int) -> int:
    return max(1, KERNEL_BUDGET // max(kernel_numel, 1))


class _RecomputedKernels(torch.autograd.Function):
    """Mix per-sample kernels and convolve, chunk of samples by chunk, keeping
    only the mixing's inputs for the backward, which mixes each chunk again.

    ``forward(mix, geometry, x, bias, weight, *dynamic)``: ``mix(weight,
    *dynamic_chunk)`` returns the chunk's kernels ``Tensor[n, C_out, C_in/g, kH,
    kW]``; ``dynamic`` are per-sample tensors ``Tensor[N, ...]`` (or ``None``);
    ``bias`` is an optional per-sample ``Tensor[N, C_out]``. The backward runs
    ``aten.convolution_backward`` on each chunk's folded convolution (so the
    convolution itself is not run again) and back-propagates the kernel gradient
    through ``mix`` with autograd.
    """

    @staticmethod
    def forward(ctx, mix, geometry, x, bias, weight, *dynamic):
        stride, padding, dilation, groups = geometry
        n = x.shape[0]
        per = _samples_per_chunk(weight[0].numel())
        outs = []
        for start in range(0, n, per):
            part = slice(start, start + per)
            kernel = mix(weight, *(None if d is None else d[part] for d in dynamic))
            b = None if bias is None else bias[part]
            outs.append(_grouped(x[part], kernel, b, stride, padding, dilation, groups))
        ctx.mix, ctx.geometry, ctx.per = mix, geometry, per
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *dynamic)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight, *dynamic = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        needs = ctx.needs_input_grad  # (mix, geometry, x, bias, weight, *dynamic)
        need_x, need_w, need_d = needs[2], needs[4], needs[5:]
        need_kernel = need_w or any(need_d)
        n, c_in, h, w = x.shape
        grad_x = [] if need_x else None
        grad_w = None
        grad_d = [[] if need else None for need in need_d]
        for start in range(0, n, ctx.per):
            part = slice(start, start + ctx.per)
            with torch.enable_grad():
                wt = weight.detach().requires_grad_(need_w)
                dt = [
                    None if d is None else d[part].detach().requires_grad_(need)
                    for d, need in zip(dynamic, need_d)
                ]
                kernel = ctx.mix(wt, *dt)
            m, c_out = kernel.shape[:2]
            g = grad[part]
            positions = g.shape[2] * g.shape[3]
            # Few output positions per kernel: the grouped convolution's own
            # weight gradient is several times slower than im2col and a batched
            # product (measured: 4.5x at 7x7, 1.5x at 14x14, slower at 28x28).
            by_unfold = need_kernel and positions <= _UNFOLD_POSITIONS
            gx, gk, _ = torch.ops.aten.convolution_backward(
                g.reshape(1, m * c_out, g.shape[2], g.shape[3]),
                x[part].reshape(1, m * c_in, h, w),
                kernel.detach().reshape(m * c_out, *kernel.shape[2:]),
                None,
                stride,
                padding,
                dilation,
                False,
                (0, 0),
                groups * m,
                (need_x, need_kernel and not by_unfold, False),
            )
            if by_unfold:
                cols = F.unfold(x[part], kernel.shape[-2:], dilation, padding, stride)
                cols = cols.reshape(m, groups, -1, positions).transpose(2, 3)
                gk = g.reshape(m, groups, c_out // groups, positions) @ cols
            if need_x:
                grad_x.append(gx.reshape(m, c_in, h, w))
            if need_kernel:
                gk = gk.reshape(kernel.shape)
                coefficients = getattr(ctx.mix, "coefficients", None)
                if need_w and coefficients is not None:
                    # The kernels are linear in the bank, W_n = sum_k a_nk s_n W_k:
                    # accumulate sum_n a_nk (s_n gk_n) in place, one buffer for
                    # all chunks, instead of a fresh bank-sized gradient per chunk.
                    a, scale = coefficients(wt, *dt)
                    if grad_w is None:
                        grad_w = torch.zeros_like(weight)
                    scaled = gk if scale is None else gk * scale
                    grad_w.view(weight.shape[0], -1).addmm_(
                        a.detach().to(gk.dtype).t(), scaled.reshape(m, -1)
                    )
                    wt.requires_grad_(False)
                inputs = [t for t in (wt, *dt) if t is not None and t.requires_grad]
                grads = list(torch.autograd.grad(kernel, inputs, gk)) if inputs else []
                if wt.requires_grad:
                    gw = grads.pop(0)
                    grad_w = gw if grad_w is None else grad_w + gw
                for i, t in enumerate(dt):
                    if t is not None and t.requires_grad:
                        grad_d[i].append(grads.pop(0))
        if need_x:
            grad_x = torch.cat(grad_x)
        grad_d = [None if parts is None else torch.cat(parts) for parts in grad_d]
        grad_bias = grad.sum(dim=(2, 3)) if needs[3] else None
        return (None, None, grad_x, grad_bias, grad_w, *grad_d)


def _autocasting(device_type: str) -> bool:
    if _is_autocast_available is None or not _is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def mixed_conv2d(
    x: Tensor,
    mix,
    weight: Tensor,
    dynamic: tuple,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    algorithm: str = "grouped",
    keep_kernels: bool = False,
) -> Tensor:
    """Mix per-sample kernels from a bank, then convolve each sample with its own.

    ``mix(weight, *dynamic)`` returns the kernels ``Tensor[N, C_out, C_in/g, kH,
    kW]`` from the bank ``weight`` and the per-sample tensors ``dynamic``
    (``Tensor[N, ...]`` each, or ``None``); ``bias`` is ``Tensor[N, C_out]`` or
    ``None``; the geometry is checked and parsed. ``algorithm`` is ``"grouped"``
    or ``"unfold"`` (see :func:`per_sample_conv2d`).

    Memory: by default (``keep_kernels=False``) the kernels are not kept for the
    backward, which mixes them again from ``dynamic`` and ``weight``. In eager
    mode ``"grouped"`` also mixes and convolves in chunks of samples whose
    kernels hold at most :data:`KERNEL_BUDGET` elements, so the ``N`` kernels
    never exist at once, in the forward or in the backward. ``"unfold"`` recomputes
    through ``torch.utils.checkpoint``. While a graph is recorded, under
    autocast, and for an empty batch, the kernels are mixed in one piece and left
    to autograd (the compiler plans the memory of a recorded graph itself).
    ``keep_kernels=True`` always does so: one pass, more memory.
    """
    eager = not (_recording() or _autocasting(x.device.type))
    if keep_kernels or not eager or x.shape[0] == 0:
        kernel = mix(weight, *dynamic)
        if not eager:
            algorithm = "auto"  # the recording-friendly per-sample form
        return _per_sample_conv2d(
            x, kernel, bias, stride, padding, dilation, groups, algorithm
        )
    geometry = (stride, padding, dilation, groups)
    if algorithm == "grouped":
        return _RecomputedKernels.apply(mix, geometry, x, bias, weight, *dynamic)

    def run(x, bias, weight, *dynamic):
        kernel = mix(weight, *dynamic)
        return _per_sample_conv2d(x, kernel, bias, *geometry, algorithm)

    if torch.is_grad_enabled():
        return checkpoint(run, x, bias, weight, *dynamic, use_reentrant=False)
    return run(x, bias, weight, *dynamic)


def bank_outputs_conv2d(
    x: Tensor,
    mixing: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """Convolve with every kernel of the bank at once, then mix the outputs.

    ``y_j = sum_i mixing[j, i] (W_i * x_j) + bias_j``: one static ``F.conv2d`` with
    ``n * C_out`` output channels (the bank ``Tensor[n, C_out, C_in/g, kH, kW]``
    reordered so that each group's output channels stay together), then one
    batched ``Tensor[1, n] @ Tensor[n, C_out/g * H_out * W_out]`` product per
    sample and group. ``n`` times the multiply-adds of the layer, but no
    per-sample kernel: at deep layers (few positions, many channels) the cheaper
    algorithm, and the batch is only a tensor dimension. ``bias`` is the mixed
    per-sample ``Tensor[N, C_out]`` or ``None``.
    """
    n = x.shape[0]
    k, c_out, c_in_g, kh, kw = weight.shape
    per_group = c_out // groups
    bank = weight.reshape(k, groups, per_group, c_in_g, kh, kw).transpose(0, 1)
    y = F.conv2d(
        x,
        bank.reshape(groups * k * per_group, c_in_g, kh, kw),
        None,
        stride,
        padding,
        dilation,
        groups,
    )
    h_out, w_out = y.shape[-2:]
    y = y.reshape(n, groups, k, per_group * h_out * w_out)
    a = mixing.to(y.dtype).reshape(n, 1, 1, k).expand(n, groups, 1, k)
    out = torch.matmul(a, y).reshape(n, c_out, h_out, w_out)
    return out if bias is None else out + bias.to(out.dtype).reshape(n, c_out, 1, 1)
