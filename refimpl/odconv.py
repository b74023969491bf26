"""ODConv: omni-dimensional dynamic convolution (chapter 4).

Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022 (arXiv:2209.07947);
official code OSVAI/ODConv (``modules/odconv.py``).

Attention over kernels (chapter 3) gives each of the ``n`` kernels one scalar per
sample. ODConv adds three more attentions computed by the same squeeze branch, one
for each remaining axis of the kernel bank ``Tensor[n, C_out, C_in/g, kH, kW]``:

* channel ``alpha_c``: one value per input channel, ``Tensor[N, C_in]``;
* filter ``alpha_f``: one value per output channel, ``Tensor[N, C_out]``;
* spatial ``alpha_s``: one value per kernel tap, ``Tensor[N, kH, kW]``;
* kernel ``alpha_w``: a softmax over the ``n`` kernels, ``Tensor[N, n]``.

As in the official code, ``alpha_c``, ``alpha_f`` and ``alpha_s`` are shared by the
``n`` kernels; only ``alpha_w`` tells the kernels apart. The per-sample kernel is::

    W(x) = alpha_f * alpha_c * alpha_s * sum_i alpha_w[i] W_i

and, because a convolution is linear, ``alpha_c`` may scale the input and
``alpha_f`` the output instead of the kernel. :func:`odconv2d` implements both
orders and picks the cheaper one from the shapes (:func:`choose_order`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import Conv2dBase, TemperatureMixin, hidden_width, spread_kernel
from ._validation import (
    check_bool,
    check_conv_operands,
    check_float_tensor,
    check_positive_int,
    check_same_dtype,
    check_shape,
)
from .per_sample import _output_size as output_size
from .per_sample import (
    _windows,
    bank_costs,
    bank_outputs_conv2d,
    check_bank_algorithm,
    choose_bank_algorithm,
    mixed_conv2d,
)

__all__ = [
    "ODAttentions",
    "ODAttention",
    "ODConv2d",
    "odconv2d",
    "odconv2d_reference",
    "choose_algorithm",
    "choose_order",
    "order_costs",
]

_FN = "odconv2d"
_ORDERS = ("auto", "kernel", "feature")


class ODAttentions(NamedTuple):
    """The four attentions of one ODConv forward pass.

    ``None`` marks an attention the layer does not have (it acts as 1): filter for
    depthwise layers, spatial for 1x1 kernels, kernel for a single kernel.
    """

    channel: Tensor | None
    """``Tensor[N, C_in]``, sigmoid, scales the input channels."""
    filter: Tensor | None
    """``Tensor[N, C_out]``, sigmoid, scales the output channels (filters)."""
    spatial: Tensor | None
    """``Tensor[N, kH, kW]``, sigmoid, scales every kernel tap."""
    kernel: Tensor | None
    """``Tensor[N, n]``, softmax over the ``n`` kernels."""


# --- the order of application -----------------------------------------------------


def order_costs(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_size: Sequence[int],
    *,
    channel: bool = True,
    filter: bool = True,
) -> dict[str, int]:
    """Elementwise multiplications the channel and filter attentions cost.

    ``"kernel"``: scaling the per-sample kernels ``Tensor[N, C_out, C_in/g, kH, kW]``
    once per attention present. ``"feature"``: scaling the input
    ``Tensor[N, C_in, H, W]`` (channel) and the output
    ``Tensor[N, C_out, H_out, W_out]`` (filter). Everything else (mixing the
    kernels, the convolution itself) is the same in both orders.

    Args:
        input_shape: ``(N, C_in, H, W)``.
        weight_shape: ``(n, C_out, C_in/g, kH, kW)``.
        output_size: ``(H_out, W_out)``.
        channel, filter: whether the layer has these attentions.

    Returns:
        ``{"kernel": int, "feature": int}``.
    """
    # No int(): under torch.compile the sizes are symbolic, and int() would pin
    # the batch size into the graph.
    n, c_in, h, w = input_shape
    _, c_out, c_in_g, kh, kw = weight_shape
    h_out, w_out = output_size
    kernel_elems = n * c_out * c_in_g * kh * kw
    return {
        "kernel": kernel_elems * (int(channel) + int(filter)),
        "feature": int(channel) * n * c_in * h * w
        + int(filter) * n * c_out * h_out * w_out,
    }


def choose_order(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_size: Sequence[int],
    *,
    channel: bool = True,
    filter: bool = True,
    spatial: bool = True,
    kernel: bool = True,
) -> str:
    """The cheaper order for the channel and filter attentions: ``order="auto"``.

    1. If the mixed kernel does not depend on the sample (no spatial and no kernel
       attention: a 1x1 ODConv with one kernel), return ``"feature"``: the layer is
       then one ordinary batched convolution between two rescalings, the official
       code's ``_forward_impl_pw1x`` path.
    2. Otherwise both orders run the same per-sample convolution; return
       ``"kernel"`` if scaling the per-sample kernels costs fewer multiplications
       than scaling the feature maps (see :func:`order_costs`), else ``"feature"``.

    Early layers (large maps, few channels) fold the attentions into the kernel;
    late layers (small maps, many channels) apply them to the feature maps.

    Args:
        input_shape, weight_shape, output_size: as for :func:`order_costs`.
        channel, filter, spatial, kernel: which attentions the layer has.

    Returns:
        ``"kernel"`` or ``"feature"``.
    """
    if not (spatial or kernel):
        return "feature"
    costs = order_costs(
        input_shape, weight_shape, output_size, channel=channel, filter=filter
    )
    return "kernel" if costs["kernel"] < costs["feature"] else "feature"


def choose_algorithm(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_size: Sequence[int],
    *,
    spatial: bool = True,
    itemsize: int = 4,
) -> str:
    """The algorithm ``algorithm="auto"`` runs: ``"grouped"`` or ``"outputs"``.

    :func:`refimpl.per_sample.choose_bank_algorithm` on
    :func:`refimpl.per_sample.bank_costs`, computed for one sample (every cost is
    proportional to the batch, so a dynamic batch stays symbolic under
    ``torch.compile``). With a spatial attention ``"outputs"`` must convolve tap
    by tap (``taps_apart``), since ``alpha_s`` differs per sample and per tap.
    """
    _, c_in, h, w = input_shape
    costs = bank_costs(
        (1, c_in, h, w),
        weight_shape,
        output_size,
        itemsize=itemsize,
        taps_apart=spatial,
        kernel_scalings=int(spatial),
    )
    return choose_bank_algorithm(costs)


# --- functional form ----------------------------------------------------------------


def _output_size(h, w, kh, kw, stride, padding, dilation):
    """``(H_out, W_out)`` of a convolution (sizes already checked)."""
    return tuple(
        output_size(size, k, stride[axis], padding[axis], dilation[axis])
        for axis, (size, k) in enumerate(((h, kh), (w, kw)))
    )


def _check_functional(x, weight, atts, bias, stride, padding, dilation, groups, owner):
    check_float_tensor(weight, "weight", owner=owner, ndim=5)
    stride, padding, dilation, groups = check_conv_operands(
        x, weight.shape[1:], stride, padding, dilation, groups, owner=owner
    )
    n, c_in, h, w = x.shape
    num_kernels, c_out, _, kh, kw = weight.shape
    shapes = {
        "channel_attention": ((n, c_in), "[N, C_in]"),
        "filter_attention": ((n, c_out), "[N, C_out]"),
        "spatial_attention": ((n, kh, kw), "[N, kH, kW]"),
        "kernel_attention": ((n, num_kernels), "[N, num_kernels]"),
    }
    for (name, (shape, layout)), att in zip(shapes.items(), atts):
        if att is not None:
            check_shape(att, name, shape, owner=owner, layout=layout)
    if atts[3] is None and num_kernels != 1:
        raise ValueError(
            f"{owner} expected kernel_attention of shape {(n, num_kernels)} to mix "
            f"{num_kernels} kernels, got None"
        )
    if bias is not None:
        check_shape(bias, "bias", (c_out,), owner=owner, layout="[C_out]")
    names = ("channel_attention", "filter_attention", "spatial_attention")
    check_same_dtype(
        x,
        owner=owner,
        **dict(zip(names, atts)),
        kernel_attention=atts[3],
        weight=weight,
        bias=bias,
    )
    size = _output_size(h, w, kh, kw, stride, padding, dilation)
    return stride, padding, dilation, groups, size


def _mix(weight: Tensor, spatial: Tensor | None, kernel: Tensor | None) -> Tensor:
    """``alpha_s * sum_i alpha_w[i] W_i``: ``Tensor[N, C_out, C_in/g, kH, kW]``.

    Returns the shared ``Tensor[C_out, C_in/g, kH, kW]`` when neither attention
    exists, since the kernel is then the same for every sample.
    """
    num_kernels, c_out, c_in_g, kh, kw = weight.shape
    if kernel is None:
        mixed = weight[0]
    else:
        # alpha_s is shared by the kernels, so it can scale their mixture once
        # instead of each kernel (the official code scales each, then sums).
        mixed = (kernel @ weight.reshape(num_kernels, -1)).reshape(
            -1, c_out, c_in_g, kh, kw
        )
    if spatial is not None:
        mixed = mixed * spatial.reshape(-1, 1, 1, kh, kw)
    return mixed


def _batch(*tensors):
    # the batch size, from the per-sample tensors present
    return next(t.shape[0] for t in tensors if t is not None)


def _scale(weight, channel, filter, spatial):
    """``alpha_f * alpha_c * alpha_s``, each if present, broadcastable to the
    kernels ``Tensor[n, C_out, C_in/g, kH, kW]`` (``None`` when none is present):
    every factor of a kernel entry besides the kernel attention. Channel ``c``
    of group ``q`` is input channel ``q * C_in/g + c``, so the channel attention
    follows the grouping."""
    _, c_out, c_in_g, kh, kw = weight.shape
    factor = None
    if filter is not None:
        factor = filter.reshape(-1, c_out, 1, 1, 1)
    if channel is not None:
        groups = channel.shape[1] // c_in_g
        c = channel.reshape(-1, groups, 1, c_in_g, 1, 1)
        c = c.expand(-1, groups, c_out // groups, c_in_g, 1, 1)
        c = c.reshape(-1, c_out, c_in_g, 1, 1)
        factor = c if factor is None else factor * c
    if spatial is not None:
        s = spatial.reshape(-1, 1, 1, kh, kw)
        factor = s if factor is None else factor * s
    return factor


def _mix_feature(weight, spatial, kernel):
    # mix(weight, *dynamic) of refimpl.per_sample.mixed_conv2d, feature order:
    # alpha_s * sum_i alpha_w[i] W_i
    mixed = _mix(weight, spatial, kernel)
    if mixed.dim() == 4:
        mixed = mixed.expand(_batch(spatial, kernel), *mixed.shape)
    return mixed


def _mix_kernel(weight, channel, filter, spatial, kernel):
    # mix(weight, *dynamic) of refimpl.per_sample.mixed_conv2d, kernel order:
    # alpha_f * alpha_c * alpha_s * sum_i alpha_w[i] W_i
    mixed = _mix(weight, spatial, kernel)
    factor = _scale(weight, channel, filter, None)
    if factor is not None:
        mixed = mixed * factor
    if mixed.dim() == 4:
        mixed = mixed.expand(_batch(channel, filter, spatial, kernel), *mixed.shape)
    return mixed


def _kernel_weights(kernel, *others):
    # alpha_w, or the weight 1 of a single kernel
    if kernel is not None:
        return kernel
    present = next(t for t in others if t is not None)
    return present.new_ones(present.shape[0], 1)


# Every kernel is linear in the bank, W_n = sum_i alpha_w[n, i] s_n W_i: the
# backward of refimpl.per_sample.mixed_conv2d accumulates the bank's gradient
# from (alpha_w, s) in place.
_mix_feature.coefficients = lambda weight, spatial, kernel: (
    _kernel_weights(kernel, spatial),
    _scale(weight, None, None, spatial),
)
_mix_kernel.coefficients = lambda weight, channel, filter, spatial, kernel: (
    _kernel_weights(kernel, channel, filter, spatial),
    _scale(weight, channel, filter, spatial),
)


def _outputs(x, spatial, kernel, weight, stride, padding, dilation, groups):
    """Convolve with every kernel (and, with a spatial attention, every tap)
    as static convolutions, then mix: ``sum_t sum_i alpha_s[t] alpha_w[i]
    (W_i[:, :, t] * x)``. ``K`` times the multiply-adds of the layer, no
    per-sample kernel."""
    a = _kernel_weights(kernel, spatial, x)
    if spatial is None:
        return bank_outputs_conv2d(
            x, a, weight, None, stride, padding, dilation, groups
        )
    n = x.shape[0]
    k, c_out, c_in_g, kh, kw = weight.shape
    per_group = c_out // groups
    size = _output_size(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
    # one weight per (sample, kernel, tap): alpha_w[i] * alpha_s[t]
    beta = a.unsqueeze(2) * spatial.reshape(n, 1, kh * kw).to(a.dtype)
    bank = weight.reshape(k, groups, per_group, c_in_g, kh * kw).transpose(0, 1)
    bank = bank.reshape(groups * k * per_group, c_in_g, kh * kw, 1, 1)
    out = None
    windows = _windows(x, (kh, kw), stride, padding, dilation, size)
    for tap, window in enumerate(windows):
        y = F.conv2d(window, bank[:, :, tap], None, 1, 0, 1, groups)
        y = y.reshape(n, groups, k, per_group * size[0] * size[1])
        b = beta[:, :, tap].to(y.dtype).reshape(n, 1, 1, k).expand(n, groups, 1, k)
        term = torch.matmul(b, y)
        out = term if out is None else out + term
    return out.reshape(n, c_out, *size)


def odconv2d(
    input: Tensor,
    channel_attention: Tensor | None,
    filter_attention: Tensor | None,
    spatial_attention: Tensor | None,
    kernel_attention: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    order: str = "auto",
    algorithm: str = "auto",
    keep_kernels: bool = False,
) -> Tensor:
    """Convolve with a kernel bank modulated by the four ODConv attentions.

    Computes, for every sample ``b``::

        y[b] = (alpha_f[b] * alpha_c[b] * alpha_s[b] * sum_i alpha_w[b, i] W_i) * x[b]

    with ``*`` a 2-D convolution and the three attentions broadcast along the
    output-channel, input-channel and tap axes of the kernel (equation ``odconv-code``
    of chapter 4). A missing attention (``None``) counts as 1. A static ``bias``,
    if given, is added last (the official module has none).

    Two orders give the same result (the convolution is linear in its input and
    its kernel):

    * ``"kernel"``: multiply ``alpha_c`` and ``alpha_f`` into the per-sample kernel,
      then run one per-sample convolution;
    * ``"feature"``: ``x * alpha_c``, convolve with ``alpha_s * sum_i alpha_w[i] W_i``,
      multiply the output by ``alpha_f`` (the official code's order). For a 1x1
      kernel bank with one kernel the convolution is then an ordinary batched
      ``F.conv2d``.
    * ``"auto"`` picks one with :func:`choose_order`.

    ``algorithm`` says how the per-sample kernels meet the input:
    ``"grouped"`` or ``"unfold"`` mix them (in the order above) and run one
    per-sample convolution (:func:`refimpl.per_sample.mixed_conv2d`; by default
    the kernels are mixed again in the backward instead of being kept, unless
    ``keep_kernels``); ``"outputs"`` convolves with every kernel, tap by tap when
    there is a spatial attention, as static convolutions and mixes the outputs
    with ``alpha_w * alpha_s`` (feature order, ``K`` times the multiply-adds, no
    per-sample kernel); ``"auto"`` picks with :func:`choose_algorithm`.

    Args:
        input: ``Tensor[N, C_in, H, W]``.
        channel_attention: ``Tensor[N, C_in]`` or ``None``.
        filter_attention: ``Tensor[N, C_out]`` or ``None``.
        spatial_attention: ``Tensor[N, kH, kW]`` or ``None``.
        kernel_attention: ``Tensor[N, n]``; may be ``None`` only when ``n == 1``.
        weight: kernel bank ``Tensor[n, C_out, C_in/groups, kH, kW]``.
        bias: optional static ``Tensor[C_out]``.
        stride, padding, dilation: ints or pairs, as in ``F.conv2d``.
        groups: channel groups.
        order: ``"auto"``, ``"kernel"`` or ``"feature"``.
        algorithm: ``"auto"``, ``"grouped"``, ``"unfold"`` or ``"outputs"``.
        keep_kernels: keep the per-sample kernels for the backward.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, ``H_out`` as for ``nn.Conv2d``.

    Raises:
        TypeError: non-tensor or non-float inputs, non-int sizes.
        ValueError: inconsistent shapes, bad ``order``, an input smaller than the
            dilated kernel.
    """
    atts = (channel_attention, filter_attention, spatial_attention, kernel_attention)
    stride, padding, dilation, groups, size = _check_functional(
        input, weight, atts, bias, stride, padding, dilation, groups, _FN
    )
    if order not in _ORDERS:
        raise ValueError(f"{_FN} expected order in {_ORDERS}, got {order!r}")
    algorithm = check_bank_algorithm(algorithm, _FN)
    check_bool(keep_kernels, "keep_kernels", owner=_FN)
    if algorithm == "auto":
        algorithm = choose_algorithm(
            input.shape,
            weight.shape,
            size,
            spatial=spatial_attention is not None,
            itemsize=input.element_size(),
        )
    if order == "auto":
        order = choose_order(
            input.shape,
            weight.shape,
            size,
            channel=channel_attention is not None,
            filter=filter_attention is not None,
            spatial=spatial_attention is not None,
            kernel=kernel_attention is not None,
        )
    return _odconv2d(
        input,
        *atts,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        order,
        algorithm,
        keep_kernels,
    )


def _odconv2d(
    x: Tensor,
    channel_attention: Tensor | None,
    filter_attention: Tensor | None,
    spatial_attention: Tensor | None,
    kernel_attention: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    order: str,
    algorithm: str = "grouped",
    keep_kernels: bool = False,
) -> Tensor:
    """:func:`odconv2d` on checked arguments with the order (``"kernel"`` or
    ``"feature"``) and the algorithm (``"grouped"``, ``"unfold"`` or
    ``"outputs"``) resolved: the algorithm itself, and what the layer calls."""
    n = x.shape[0]
    c_out = weight.shape[1]
    geometry = (stride, padding, dilation, groups)
    per_sample = spatial_attention is not None or kernel_attention is not None

    if order == "kernel" and algorithm != "outputs":
        dynamic = (channel_attention, filter_attention, spatial_attention)
        dynamic = (*dynamic, kernel_attention)
        if not any(t is not None for t in dynamic):  # one static kernel
            return F.conv2d(x, weight[0], bias, *geometry)
        # The static bias rides along in the convolution: a separate addition
        # would cost a full pass over the output (about a tenth of the layer).
        if bias is not None:
            bias = bias.to(x.dtype).expand(n, c_out)
        return mixed_conv2d(
            x,
            _mix_kernel,
            weight,
            dynamic,
            bias,
            *geometry,
            algorithm=algorithm,
            keep_kernels=keep_kernels,
        )

    # Feature order (and "outputs"): alpha_c scales the input, alpha_f the
    # output, and the bias comes after the filter attention.
    if channel_attention is not None:
        x = x * channel_attention.reshape(n, x.shape[1], 1, 1)
    if algorithm == "outputs":
        out = _outputs(x, spatial_attention, kernel_attention, weight, *geometry)
    elif not per_sample:
        out = F.conv2d(x, weight[0], None, *geometry)
    else:
        out = mixed_conv2d(
            x,
            _mix_feature,
            weight,
            (spatial_attention, kernel_attention),
            None,
            *geometry,
            algorithm=algorithm,
            keep_kernels=keep_kernels,
        )
    if filter_attention is not None:
        out = out * filter_attention.reshape(n, c_out, 1, 1)
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(1, c_out, 1, 1)
    return out


def odconv2d_reference(
    input: Tensor,
    channel_attention: Tensor | None,
    filter_attention: Tensor | None,
    spatial_attention: Tensor | None,
    kernel_attention: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Literal reference for :func:`odconv2d`, written as the paper's sum.

    For every sample and every kernel ``i`` it forms
    ``alpha_w[i] * alpha_f[o] * alpha_c[c] * alpha_s * W_i[o, c]`` filter by filter
    and input channel by input channel (tracking which input channel of the layer
    channel ``c`` of group ``q`` is), sums over ``i``, and convolves the sample with
    ``F.conv2d``. Slow on purpose; used by the tests and chapter 4.

    Args and returns as for :func:`odconv2d` (without ``order``).
    """
    atts = (channel_attention, filter_attention, spatial_attention, kernel_attention)
    stride, padding, dilation, groups, _ = _check_functional(
        input,
        weight,
        atts,
        bias,
        stride,
        padding,
        dilation,
        groups,
        "odconv2d_reference",
    )
    num_kernels, c_out, c_in_g, kh, kw = weight.shape
    per_group = c_out // groups
    outputs = []
    for b in range(input.shape[0]):
        filters = []
        for o in range(c_out):
            q = o // per_group  # the group of filter o
            rows = []
            for c in range(c_in_g):
                tap = torch.zeros_like(weight[0, 0, 0])
                for i in range(num_kernels):
                    a = weight[i, o, c]
                    if kernel_attention is not None:
                        a = kernel_attention[b, i] * a
                    if filter_attention is not None:
                        a = filter_attention[b, o] * a
                    if channel_attention is not None:
                        a = channel_attention[b, q * c_in_g + c] * a
                    if spatial_attention is not None:
                        a = spatial_attention[b] * a
                    tap = tap + a
                rows.append(tap)
            filters.append(torch.stack(rows))
        kernel_b = torch.stack(filters)
        outputs.append(
            F.conv2d(
                input[b : b + 1], kernel_b, bias, stride, padding, dilation, groups
            )
        )
    if not outputs:
        return odconv2d(input, *atts, weight, bias, stride, padding, dilation, groups)
    return torch.cat(outputs)


# --- the attention branch ----------------------------------------------------------


class ODAttention(nn.Module):
    """The shared squeeze branch and the four heads of ODConv.

    ``GAP -> Linear(C_in, h, no bias) -> BatchNorm -> ReLU`` gives ``a``, then

    * channel: ``sigmoid(Linear(h, C_in)(a) / tau)``;
    * filter: ``sigmoid(Linear(h, C_out)(a) / tau)``, absent for a depthwise layer
      (``C_in == groups == C_out``);
    * spatial: ``sigmoid(Linear(h, kH*kW)(a) / tau)``, absent for a 1x1 kernel;
    * kernel: ``softmax(Linear(h, n)(a) / tau)`` over the kernels, absent for ``n = 1``;

    with hidden width ``h`` (:func:`refimpl._conv.hidden_width`). Parameter
    names follow the official ``Attention`` module (``fc``, ``bn``, ``channel_fc``,
    ``filter_fc``, ``spatial_fc``, ``kernel_fc``); the official code uses 1x1
    convolutions on ``Tensor[N, C, 1, 1]``, here they are ``nn.Linear`` on
    ``Tensor[N, C]`` (same parameters, official 4-D weights reshape to 2-D), which
    also keeps :func:`refimpl.models.convert_conv2d` away from them.

    With ``norm=None`` the BatchNorm is left out and ``fc`` gets a bias instead
    (the shift BatchNorm would have provided): then no sample depends on the
    others, and batch size 1 trains.

    Args:
        in_channels, out_channels: channels of the convolution.
        kernel_size: ``(kH, kW)``.
        groups: groups of the convolution (for the depthwise test).
        num_kernels: number of kernels ``n``.
        hidden: hidden width ``h``.
        norm: ``"batch"`` or ``None``.
        device, dtype: factory keyword arguments.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        groups: int,
        num_kernels: int,
        hidden: int,
        norm: str | None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.hidden = hidden
        self.fc = nn.Linear(in_channels, self.hidden, bias=norm is None, **kw)
        self.bn = nn.BatchNorm1d(self.hidden, **kw) if norm == "batch" else None
        self.channel_fc = nn.Linear(self.hidden, in_channels, **kw)
        depthwise = in_channels == groups and in_channels == out_channels
        self.filter_fc = (
            None if depthwise else nn.Linear(self.hidden, out_channels, **kw)
        )
        taps = kernel_size[0] * kernel_size[1]
        self.kernel_size = kernel_size
        self.spatial_fc = None if taps == 1 else nn.Linear(self.hidden, taps, **kw)
        self.kernel_fc = (
            None if num_kernels == 1 else nn.Linear(self.hidden, num_kernels, **kw)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Kaiming-normal (fan_out, ReLU), zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, temperature: float = 1.0) -> ODAttentions:
        """``Tensor[N, C_in, H, W]`` -> :class:`ODAttentions` at temperature ``tau``."""
        a = self.fc(x.mean(dim=(2, 3)))
        if self.bn is not None:
            a = self.bn(a)
        a = F.relu(a)

        def squash(head):
            return None if head is None else torch.sigmoid(head(a) / temperature)

        spatial = squash(self.spatial_fc)
        if spatial is not None:
            spatial = spatial.reshape(-1, *self.kernel_size)
        kernel = None
        if self.kernel_fc is not None:
            kernel = torch.softmax(self.kernel_fc(a) / temperature, dim=1)
        return ODAttentions(
            squash(self.channel_fc), squash(self.filter_fc), spatial, kernel
        )


# --- the module --------------------------------------------------------------------


class ODConv2d(TemperatureMixin, Conv2dBase):
    """Omni-dimensional dynamic convolution, a drop-in for ``nn.Conv2d``.

    Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022,
    arXiv:2209.07947; derived in chapter 4. A bank of ``num_kernels`` kernels
    ``Tensor[n, C_out, C_in/groups, kH, kW]`` is modulated per sample by four
    attentions from one squeeze branch (:class:`ODAttention`) and applied by
    :func:`odconv2d`.

    Defaults are the official code's: ``num_kernels=4`` (the official
    ``kernel_num``), ``reduction=1/16``, hidden width at least ``min_hidden=16``
    (the official ``min_channel``), BatchNorm in the attention branch, kernels
    initialised Kaiming-normal (fan_out, ReLU) one by one, temperature 1.

    Temperature: :attr:`~refimpl._conv.TemperatureMixin.temperature` divides
    every attention logit. The official training anneals it per iteration from
    30 to 1 over the first 10 epochs
    (:func:`refimpl.dynamic_conv.temperature_schedule`) and evaluates at 1. Set
    it with ``layer.temperature = value`` or :func:`refimpl.set_temperature`.

    BatchNorm in the attention branch (``attention_norm="batch"``, the official
    design) has two consequences: in training mode a sample's attentions, hence
    its output, depend on the other samples of the batch; and a batch of one
    sample cannot be normalised. The official code then fails inside PyTorch;
    this module raises a ``ValueError`` that names the way out,
    ``attention_norm=None``, which drops the BatchNorm (and gives ``fc`` a bias):
    every sample is then computed on its own, in any mode and at any batch size.
    In eval mode both variants are batch independent.

    Deviations from the official code: ``bias=True`` adds a static bias after the
    filter attention (the official module has no bias; a ResNet converted with
    :func:`refimpl.models.convert_conv2d` keeps its convolutions' ``bias=False``);
    rectangular kernels, padding strings and padding modes are accepted; the order
    in which the channel and filter attentions are applied is chosen from the
    shapes (``order``), the official code always uses ``"feature"``; the attention
    FCs are ``nn.Linear`` (official 1x1-convolution weights load through
    :meth:`~refimpl._conv.Conv2dBase.load_official_state_dict`).

    Args:
        conv_args: ``nn.Conv2d``'s arguments, ``in_channels`` to ``padding_mode``,
            with the same meaning (see above for the bias).
        num_kernels: number of kernels ``n`` (the "1x" and "4x" of the paper).
        reduction: hidden width of the attention branch as a fraction of
            ``in_channels``.
        min_hidden: smallest hidden width.
        attention_norm: ``"batch"`` (official) or ``None``.
        temperature: initial temperature (official: 1.0).
        order: ``"auto"``, ``"kernel"`` or ``"feature"``, see :func:`odconv2d`.
        algorithm: ``"auto"`` (the cheapest for the input's shape),
            ``"grouped"``, ``"unfold"`` or ``"outputs"``, see :func:`odconv2d`.
        keep_kernels: keep the per-sample kernels for the backward (``False``:
            they are mixed again there, saving ``N`` kernels of memory).
        device, dtype: factory keyword arguments, as in ``nn.Conv2d``.

    Shapes:
        ``Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]``.

    Raises:
        TypeError, ValueError: bad arguments or input (before any computation);
            ``ValueError`` for a batch of one sample in training mode with
            ``attention_norm="batch"``.
    """

    def __init__(
        self,
        *conv_args,
        num_kernels: int = 4,
        reduction: float = 0.0625,
        min_hidden: int = 16,
        attention_norm: str | None = "batch",
        temperature: float = 1.0,
        order: str = "auto",
        algorithm: str = "auto",
        keep_kernels: bool = False,
        **conv_kwargs,
    ) -> None:
        # nn.Conv2d's arguments are parsed once, by Conv2dBase; the signature
        # shown by help() and the docs is completed by Conv2dBase.__init_subclass__.
        super().__init__(*conv_args, **conv_kwargs)
        owner = type(self).__name__
        self.num_kernels = check_positive_int(num_kernels, "num_kernels", owner=owner)
        hidden = hidden_width(self.in_channels, reduction, min_hidden, owner=owner)
        self.reduction = float(reduction)
        self.min_hidden = int(min_hidden)
        if attention_norm not in ("batch", None):
            raise ValueError(
                f"{owner} expected attention_norm 'batch' or None, got "
                f"{attention_norm!r}"
            )
        self.attention_norm = attention_norm
        if order not in _ORDERS:
            raise ValueError(f"{owner} expected order in {_ORDERS}, got {order!r}")
        self.order = order
        self.algorithm = check_bank_algorithm(algorithm, owner)
        self.keep_kernels = check_bool(keep_kernels, "keep_kernels", owner=owner)
        self.temperature = temperature
        factory = self.factory_kwargs
        self.attention = ODAttention(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.groups,
            self.num_kernels,
            hidden,
            attention_norm,
            **factory,
        )
        self.weight = self.kernel_bank(self.num_kernels)
        self.bias = self.bias_parameter()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation; the static bias (an addition) starts at zero."""
        for kernel in self.weight.unbind(0):
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.reset_parameters()

    def _options(self):
        yield "num_kernels", self.num_kernels, 4
        yield "reduction", self.reduction, 0.0625
        yield "min_hidden", self.min_hidden, 16
        yield "attention_norm", self.attention_norm, "batch"
        yield "temperature", self.temperature, 1.0
        yield "order", self.order, "auto"
        yield "algorithm", self.algorithm, "auto"
        yield "keep_kernels", self.keep_kernels, False

    def resolve_algorithm(self, input_shape: Sequence[int]) -> str:
        """``"grouped"``, ``"unfold"`` or ``"outputs"``: the algorithm a forward on
        this shape uses (:func:`choose_algorithm` for ``"auto"``)."""
        if self.algorithm != "auto":
            return self.algorithm
        n, c, h, w = input_shape
        if self._pre_pad:
            left, right, top, bottom = self._pad_lrtb
            h, w = h + top + bottom, w + left + right
        size = _output_size(
            h, w, *self.kernel_size, self.stride, self.op_padding, self.dilation
        )
        itemsize = self.weight.element_size()
        spatial = self.attention.spatial_fc is not None
        return choose_algorithm(
            (n, c, h, w), self.weight.shape, size, spatial=spatial, itemsize=itemsize
        )

    def resolve_order(self, input_shape: Sequence[int]) -> str:
        """``"kernel"`` or ``"feature"``: the order a forward on this shape uses."""
        if self.order != "auto":
            return self.order
        n, c, h, w = input_shape
        if self._pre_pad:  # the channel attention then scales the padded input
            left, right, top, bottom = self._pad_lrtb
            h, w = h + top + bottom, w + left + right
        size = _output_size(
            h, w, *self.kernel_size, self.stride, self.op_padding, self.dilation
        )
        a = self.attention
        return choose_order(
            (n, c, h, w),
            self.weight.shape,
            size,
            channel=True,
            filter=a.filter_fc is not None,
            spatial=a.spatial_fc is not None,
            kernel=a.kernel_fc is not None,
        )

    def _check_input(self, input):
        x, unbatched = super()._check_input(input)
        if self.training and self.attention.bn is not None and x.shape[0] == 1:
            raise ValueError(
                f"{type(self).__name__} with attention_norm='batch' cannot train on "
                f"a batch of 1 sample: the attention BatchNorm needs at least 2 "
                f"samples to compute batch statistics. Use a batch of 2 or more, "
                f"call .eval(), or build the layer with attention_norm=None (no "
                f"BatchNorm in the attention)"
            )
        return x, unbatched

    def _dynamic(self, x: Tensor) -> ODAttentions:
        return self.attention(x, self.temperature)

    def _forward(self, x: Tensor) -> Tensor:
        return _odconv2d(
            self.pad(x),
            *self._dynamic(x),
            self.weight,
            self.bias,
            self.stride,
            self.op_padding,
            self.dilation,
            self.groups,
            self.resolve_order(x.shape),
            self.resolve_algorithm(x.shape),
            self.keep_kernels,
        )

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Function-preserving start: zero head weights and biases make every
        sigmoid attention ``1/2`` and the kernel attention ``1/n`` at any
        temperature, so the kernels are ``W`` divided by the product of the
        sigmoid halves, plus zero-sum perturbations
        (:func:`refimpl._conv.spread_kernel`); the static bias is ``conv``'s."""
        a = self.attention
        scale = 1.0
        for head in (a.channel_fc, a.filter_fc, a.spatial_fc, a.kernel_fc):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
                if head is not a.kernel_fc:
                    scale *= 0.5
        self.weight.copy_(spread_kernel(weight, self.weight, scale))
        if self.bias is not None:
            self.bias.copy_(bias)

    def _official_names(self):
        """OSVAI/ODConv's ``ODConv2d``: ``weight`` as here (no bias); the
        attention's 1x1 convolutions ``attention.fc.weight [h, C_in, 1, 1]``,
        ``attention.{channel,filter,spatial,kernel}_fc.weight [out, h, 1, 1]`` and
        ``.bias [out]``, and ``attention.bn.*`` (weight, bias, running statistics,
        ``num_batches_tracked``), reshaped to the linear layers."""
        if self.bias is not None or self.attention_norm is None:
            raise ValueError(
                f"{type(self).__name__}.load_official_state_dict expected a layer "
                f"built like the official one (bias=False, attention_norm='batch'), "
                f"got bias={self.bias is not None}, "
                f"attention_norm={self.attention_norm!r}"
            )
        names = {"weight": ("weight", tuple(self.weight.shape))}
        for key, value in self.attention.state_dict().items():
            shape = tuple(value.shape)
            if key.endswith("fc.weight"):
                shape = (*shape, 1, 1)
            names["attention." + key] = ("attention." + key, shape)
        return names
