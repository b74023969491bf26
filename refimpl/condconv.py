"""CondConv: conditionally parameterized convolution.

Yang, Bender, Le and Ngiam, "CondConv: Conditionally Parameterized Convolutions
for Efficient Inference", NeurIPS 2019, arXiv:1904.04971. Chapter 2 derives it.

A CondConv layer owns ``n`` expert kernels ``W_1 .. W_n`` of the shape of a plain
convolution kernel. For every sample it computes routing weights
``alpha = sigmoid(R GAP(x) + c)`` and convolves the sample with the *mixed* kernel
``alpha_1 W_1 + ... + alpha_n W_n``. By linearity this equals the mixture of the
``n`` expert convolutions, at the cost of a single convolution.

Three tiers compute the same thing:

* :func:`condconv2d_experts`, the literal mixture of experts: ``n`` convolutions,
  outputs mixed afterwards (slow, obviously right);
* :func:`condconv2d`, mix the kernels, then one per-sample convolution through
  :func:`refimpl.per_sample.per_sample_conv2d`;
* :class:`CondConv2d`, the module that owns the experts and the routing layer.

Expert storage: ``Tensor[E, C_out, C_in/groups, kH, kW]``, one ``nn.Conv2d`` kernel
per expert. The official TensorFlow code and the timm port store flattened
``[E, num_params]`` matrices instead; :func:`experts_to_flat` and
:func:`experts_from_flat` convert between the layouts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import (
    check_channels,
    check_float_tensor,
    check_groups,
    check_positive_int,
    check_tensor,
    pair,
)
from .per_sample import per_sample_conv2d

__all__ = [
    "CondConv2d",
    "condconv2d",
    "condconv2d_experts",
    "experts_from_flat",
    "experts_to_flat",
    "mix_experts",
]

_LAYOUTS = ("timm", "tf")


def _check_dtypes(owner: str, x: Tensor, **tensors: Tensor | None) -> None:
    # Under autocast the matmul and the convolution cast their operands, so mixed
    # dtypes are legitimate there; outside it they would fail deep inside F.conv2d.
    if torch.is_autocast_enabled(x.device.type):
        return
    for name, t in tensors.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{owner} expected {name} with the dtype of the input ({x.dtype}), "
                f"got {t.dtype}"
            )


def _check_experts(
    owner: str,
    x: Tensor,
    routing: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> None:
    pair(stride, "stride", owner=owner)
    pair(padding, "padding", owner=owner, minimum=0)
    pair(dilation, "dilation", owner=owner)
    check_float_tensor(x, "input", owner=owner, ndim=4)
    check_float_tensor(routing, "routing", owner=owner, ndim=2)
    check_float_tensor(weight, "weight", owner=owner, ndim=5)
    groups = check_positive_int(groups, "groups", owner=owner)
    n, e = x.shape[0], weight.shape[0]
    if tuple(routing.shape) != (n, e):
        raise ValueError(
            f"{owner} expected routing of shape [N, num_experts] = {(n, e)}, got "
            f"{tuple(routing.shape)}"
        )
    c_in = weight.shape[2] * groups
    if x.shape[1] != c_in:
        raise ValueError(
            f"{owner} expected input with {c_in} channels (weight.shape[2] * groups), "
            f"got {x.shape[1]}"
        )
    if bias is not None:
        check_float_tensor(bias, "bias", owner=owner, ndim=2)
        if tuple(bias.shape) != (e, weight.shape[1]):
            raise ValueError(
                f"{owner} expected bias of shape [num_experts, C_out] = "
                f"{(e, weight.shape[1])}, got {tuple(bias.shape)}"
            )
    _check_dtypes(owner, x, routing=routing, weight=weight, bias=bias)


def mix_experts(
    routing: Tensor, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Per-sample kernels and biases as routing-weighted sums of the experts.

    Computes ``W(x_i) = sum_e routing[i, e] * weight[e]`` (and the same for the
    bias) for every sample ``i`` as *one* matrix product
    ``routing @ weight.reshape(E, -1)``, the form of the official TensorFlow code.

    Args:
        routing: ``Tensor[N, E]``, the routing weights of each sample.
        weight: ``Tensor[E, C_out, C_in/groups, kH, kW]``, the expert kernels.
        bias: optional ``Tensor[E, C_out]``, the expert biases.

    Returns:
        ``(kernel, bias)``: ``Tensor[N, C_out, C_in/groups, kH, kW]`` and
        ``Tensor[N, C_out]`` (``None`` when ``bias`` is ``None``).
    """
    e = weight.shape[0]
    kernel = (routing @ weight.reshape(e, -1)).reshape(-1, *weight.shape[1:])
    return kernel, None if bias is None else routing @ bias


def condconv2d(
    x: Tensor,
    routing: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """CondConv: convolve each sample with its routing-weighted mixture of experts.

    ``y_i = (sum_e routing[i, e] W_e) * x_i + sum_e routing[i, e] b_e``: the kernels
    are mixed first (:func:`mix_experts`), then the batch runs as one grouped
    convolution (:func:`refimpl.per_sample.per_sample_conv2d`). Yang et al.,
    "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
    NeurIPS 2019, arXiv:1904.04971; chapter 2.

    Args:
        x: ``Tensor[N, C_in, H, W]``.
        routing: ``Tensor[N, E]``, routing weights (any real values; CondConv2d
            produces them in ``(0, 1)`` with a sigmoid).
        weight: ``Tensor[E, C_out, C_in/groups, kH, kW]``, the expert kernels.
        bias: optional ``Tensor[E, C_out]``, the expert biases.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.functional.conv2d``.
        groups: channel groups, as in ``torch.nn.functional.conv2d``.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, with the output size of a plain
        convolution of the same arguments.

    Raises:
        TypeError: for a non-tensor or non-floating argument, or (outside
            autocast) operands whose dtype differs from the input's.
        ValueError: for a routing that is not ``[N, E]``, an input whose channels do
            not match the experts, a bias that is not ``[E, C_out]``, or an invalid
            convolution geometry.
    """
    _check_experts(
        "condconv2d", x, routing, weight, bias, stride, padding, dilation, groups
    )
    kernel, mixed_bias = mix_experts(routing, weight, bias)
    return per_sample_conv2d(x, kernel, mixed_bias, stride, padding, dilation, groups)


def condconv2d_experts(
    x: Tensor,
    routing: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Literal mixture of experts: ``sum_e routing[:, e] * conv2d(x, W_e, b_e)``.

    Same arguments and result as :func:`condconv2d`, computed the expensive way the
    paper compares against (its Fig. 1b): one full convolution per expert, outputs
    mixed afterwards. It costs ``E`` convolutions instead of one; the tests and
    chapter 2 use it to check :func:`condconv2d`.

    Args:
        x: ``Tensor[N, C_in, H, W]``.
        routing: ``Tensor[N, E]``.
        weight: ``Tensor[E, C_out, C_in/groups, kH, kW]``.
        bias: optional ``Tensor[E, C_out]``.
        stride, padding, dilation, groups: as in :func:`condconv2d`.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``.

    Raises:
        TypeError, ValueError: as :func:`condconv2d`.
    """
    _check_experts(
        "condconv2d_experts",
        x,
        routing,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
    )
    out = None
    for e in range(weight.shape[0]):
        y = F.conv2d(
            x,
            weight[e],
            None if bias is None else bias[e],
            stride,
            padding,
            dilation,
            groups,
        )
        term = routing[:, e, None, None, None] * y
        out = term if out is None else out + term
    return out


def experts_to_flat(weight: Tensor, layout: str = "timm") -> Tensor:
    """Flatten a bank ``Tensor[E, C_out, C_in/g, kH, kW]`` to ``Tensor[E, P]``.

    ``P = C_out * C_in/g * kH * kW``. Two layouts exist:

    * ``"timm"`` (timm's ``CondConv2d.weight``): each row is one expert in
      PyTorch order ``(C_out, C_in/g, kH, kW)``, i.e. ``weight.reshape(E, -1)``.
      Any ``groups``.
    * ``"tf"`` (the official ``CondConv2D.condconv_kernel``): each row is one
      expert in TensorFlow order ``(kH, kW, C_in, C_out)``. Only dense
      convolutions (``groups=1``), as TensorFlow's ``CondConv2D``.

    Expert biases ``Tensor[E, C_out]`` need no conversion: all layouts agree.

    Args:
        weight: ``Tensor[E, C_out, C_in/g, kH, kW]``, e.g. ``CondConv2d.weight``.
        layout: ``"timm"`` or ``"tf"``.

    Returns:
        ``Tensor[E, P]``; load it with ``timm_module.weight.copy_(flat)``.

    Raises:
        ValueError: for an unknown layout or a weight that is not 5-D.
    """
    check_tensor(weight, "weight", owner="experts_to_flat", ndim=5)
    _check_layout("experts_to_flat", layout)
    if layout == "tf":
        weight = weight.permute(0, 3, 4, 2, 1)
    return weight.reshape(weight.shape[0], -1)


def experts_from_flat(
    flat: Tensor,
    out_channels: int,
    in_channels_per_group: int,
    kernel_size: int | tuple[int, int],
    layout: str = "timm",
) -> Tensor:
    """Inverse of :func:`experts_to_flat`: ``Tensor[E, P]`` to a 5-D expert bank.

    Args:
        flat: ``Tensor[E, P]`` in the ``"timm"`` or ``"tf"`` layout.
        out_channels: ``C_out``.
        in_channels_per_group: ``C_in/groups`` (``C_in`` for the ``"tf"`` layout).
        kernel_size: ``k`` or ``(kH, kW)``.
        layout: ``"timm"`` or ``"tf"``.

    Returns:
        ``Tensor[E, C_out, C_in/g, kH, kW]``, ready for
        ``CondConv2d.weight.copy_(...)``.

    Raises:
        ValueError: for an unknown layout, a tensor that is not 2-D, or ``P`` that
            does not match the given shape.
    """
    owner = "experts_from_flat"
    check_tensor(flat, "flat", owner=owner, ndim=2)
    _check_layout(owner, layout)
    kh, kw = pair(kernel_size, "kernel_size", owner=owner)
    c_out = check_positive_int(out_channels, "out_channels", owner=owner)
    c_in_g = check_positive_int(
        in_channels_per_group, "in_channels_per_group", owner=owner
    )
    if flat.shape[1] != c_out * c_in_g * kh * kw:
        raise ValueError(
            f"{owner} expected flat.shape[1] == out_channels * in_channels_per_group "
            f"* kH * kW = {c_out * c_in_g * kh * kw}, got {flat.shape[1]}"
        )
    e = flat.shape[0]
    if layout == "tf":
        return flat.reshape(e, kh, kw, c_in_g, c_out).permute(0, 4, 3, 1, 2)
    return flat.reshape(e, c_out, c_in_g, kh, kw)


def _check_layout(owner: str, layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"{owner} expected layout in {_LAYOUTS}, got {layout!r}")


class CondConv2d(nn.Module):
    """Conditionally parameterized convolution, a drop-in for ``nn.Conv2d``.

    Every sample ``x_i`` is convolved with its own kernel, a routing-weighted sum of
    ``num_experts`` expert kernels:

    ``alpha = sigmoid(R GAP(x_i) + c)``,
    ``y_i = (sum_e alpha_e W_e) * x_i + sum_e alpha_e b_e``.

    Yang, Bender, Le and Ngiam, "CondConv: Conditionally Parameterized
    Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971.
    Chapter 2 derives it and shows that it equals a mixture of ``num_experts``
    convolutions at the cost of one.

    Faithful to the official TensorFlow code (``condconv_layers.py`` and the
    routing in ``efficientnet_model.py``):

    * routing is global average pooling, one ``Linear(C_in, num_experts)`` with
      bias, and a sigmoid: no hidden layer, no softmax, no temperature, so the
      weights need not sum to 1; the routing layer is initialised like the
      official dense layer (Glorot-uniform weight, zero bias);
    * kernels *and* biases are mixed per sample before the convolution;
    * each expert is initialised independently, like an ``nn.Conv2d`` of the same
      shape (Kaiming-uniform with ``a = sqrt(5)``; bias uniform in
      ``+-1/sqrt(fan_in)``);
    * the official EfficientNet shares one routing vector among the convolutions of
      a block: compute it once with :meth:`routing` and pass it to each layer's
      ``forward(x, routing)``.

    Deviations: the experts are stored as a 5-D bank, not the flattened
    ``[E, num_params]`` matrix of the official code and of timm (convert with
    :func:`experts_to_flat` / :func:`experts_from_flat`); padding is explicit as in
    ``nn.Conv2d`` (no TensorFlow ``"same"`` padding, which is asymmetric for even
    sizes). The layer has no batch normalisation, so a sample's output never
    depends on the rest of its batch, in training and evaluation alike.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``k`` or ``(kH, kW)``.
        stride, padding, dilation: ints or pairs, as in ``nn.Conv2d``.
        groups: channel groups, as in ``nn.Conv2d``.
        bias: whether each expert has a bias.
        num_experts: ``E``, the number of expert kernels (8 for the "CondConv (8x)"
            networks of later papers; the official EfficientNet uses 4 or 8).
        device, dtype: factory keyword arguments for the parameters.

    Shapes:
        ``forward(Tensor[N, C_in, H, W], routing: Tensor[N, E] | None)`` returns
        ``Tensor[N, C_out, H_out, W_out]``.

    Attributes:
        weight: ``Tensor[E, C_out, C_in/groups, kH, kW]``, the experts.
        bias: ``Tensor[E, C_out]`` or ``None``.
        routing_fc: the ``nn.Linear(C_in, E)`` of the routing function.
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
        num_experts: int = 8,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(in_channels, "in_channels", owner=owner)
        self.out_channels = check_positive_int(
            out_channels, "out_channels", owner=owner
        )
        self.kernel_size = pair(kernel_size, "kernel_size", owner=owner)
        self.stride = pair(stride, "stride", owner=owner)
        self.padding = pair(padding, "padding", owner=owner, minimum=0)
        self.dilation = pair(dilation, "dilation", owner=owner)
        check_groups(in_channels, out_channels, groups, owner=owner)
        self.groups = groups
        self.num_experts = check_positive_int(num_experts, "num_experts", owner=owner)
        if not isinstance(bias, bool):
            raise TypeError(f"{owner} expected bias to be a bool, got {bias!r}")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(
                num_experts,
                out_channels,
                in_channels // groups,
                *self.kernel_size,
                **factory,
            )
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.routing_fc = nn.Linear(in_channels, num_experts, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert like an ``nn.Conv2d`` and the routing like TF's."""
        with torch.no_grad():
            for expert in self.weight:
                # One expert at a time: on the 5-D bank, fan_in would count C_out.
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            if self.bias is not None:
                fan_in = self.weight[0, 0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)
            nn.init.xavier_uniform_(self.routing_fc.weight)
            nn.init.zeros_(self.routing_fc.bias)

    def _check_input(self, x: object) -> Tensor:
        owner = type(self).__name__
        check_float_tensor(x, "input", owner=owner, ndim=4)
        check_channels(x, self.in_channels, owner=owner)
        if (
            not torch.is_autocast_enabled(x.device.type)
            and x.dtype != self.weight.dtype
        ):
            raise TypeError(
                f"{owner} expected input of dtype {self.weight.dtype} (the dtype of "
                f"its parameters), got {x.dtype}"
            )
        return x

    def routing(self, x: Tensor) -> Tensor:
        """Routing weights ``sigmoid(routing_fc(GAP(x)))``.

        Args:
            x: ``Tensor[N, C_in, H, W]``.

        Returns:
            ``Tensor[N, E]`` with entries in ``(0, 1)``.

        Raises:
            TypeError, ValueError: for an input that is not a floating
                ``Tensor[N, C_in, H, W]``.
        """
        x = self._check_input(x)
        return torch.sigmoid(self.routing_fc(x.mean(dim=(2, 3))))

    def forward(self, x: Tensor, routing: Tensor | None = None) -> Tensor:
        """Apply CondConv to ``x``.

        Args:
            x: ``Tensor[N, C_in, H, W]``.
            routing: optional ``Tensor[N, E]`` computed outside, e.g. by another
                layer's :meth:`routing` to share one routing vector per block as
                the official EfficientNet does. ``None`` computes it from ``x``.

        Returns:
            ``Tensor[N, C_out, H_out, W_out]``, the size of ``nn.Conv2d``'s output.

        Raises:
            TypeError: for a non-tensor or non-floating input or routing.
            ValueError: for an input without ``C_in`` channels or a routing that is
                not ``[N, E]``.
        """
        x = self._check_input(x)
        if routing is None:
            routing = self.routing(x)
        else:
            owner = type(self).__name__
            check_float_tensor(routing, "routing", owner=owner, ndim=2)
            expected = (x.shape[0], self.num_experts)
            if tuple(routing.shape) != expected:
                raise ValueError(
                    f"{owner} expected routing of shape [N, num_experts] = "
                    f"{expected}, got {tuple(routing.shape)}"
                )
        return condconv2d(
            x,
            routing,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", num_experts={self.num_experts}"
