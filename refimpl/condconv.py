"""CondConv: conditionally parameterized convolution.

Yang, Bender, Le and Ngiam, "CondConv: Conditionally Parameterized Convolutions
for Efficient Inference", NeurIPS 2019, arXiv:1904.04971. Chapter 2 derives it.

A CondConv layer owns ``n`` expert kernels ``W_1 .. W_n`` of the shape of a plain
convolution kernel. For every sample it computes routing weights
``alpha = sigmoid(R GAP(x) + c)`` and convolves the sample with the *mixed* kernel
``alpha_1 W_1 + ... + alpha_n W_n``. By linearity this equals the mixture of the
``n`` expert convolutions, at the cost of a single convolution.

Three tiers compute the same thing:

* :func:`condconv2d_reference`, the literal mixture of experts: ``n`` convolutions,
  outputs mixed afterwards (slow, obviously right);
* :func:`condconv2d`, mix the kernels, then one per-sample convolution through
  :func:`refimpl.per_sample.per_sample_conv2d`;
* :class:`CondConv2d`, the module that owns the experts and the routing layer.

Expert storage: ``Tensor[n, C_out, C_in/groups, kH, kW]``, one ``nn.Conv2d`` kernel
per expert. The official TensorFlow code and the timm port store flattened
``[n, num_params]`` matrices instead; :func:`experts_to_flat` and
:func:`experts_from_flat` convert between the layouts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import Conv2dBase, init_like_conv2d, spread_kernel
from ._validation import (
    check_bool,
    check_conv_operands,
    check_float_tensor,
    check_positive_int,
    check_same_dtype,
    check_shape,
    check_tensor,
    pair,
)
from .per_sample import (
    _output_size,
    bank_costs,
    bank_outputs_conv2d,
    check_bank_algorithm,
    choose_bank_algorithm,
    mixed_conv2d,
)

__all__ = [
    "CondConv2d",
    "CondRouting",
    "bank_algorithm",
    "bank_conv2d",
    "bank_forward",
    "check_kernel_bank",
    "condconv2d",
    "condconv2d_reference",
    "experts_from_flat",
    "experts_to_flat",
    "mix_experts",
    "mixture_of_convolutions",
]

_LAYOUTS = ("timm", "tf")


def check_kernel_bank(
    owner: str,
    x: Tensor,
    mixing: Tensor,
    mixing_name: str,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups,
):
    """Checks of a functional form that mixes a bank of kernels per sample.

    ``x``: ``Tensor[N, C_in, H, W]``; ``mixing``: ``Tensor[N, n]`` (CondConv's
    routing, DY-CNN's attention); ``weight``: ``Tensor[n, C_out, C_in/g, kH, kW]``;
    ``bias``: ``Tensor[n, C_out]`` or ``None``. Returns the parsed ``(stride,
    padding, dilation, groups)``.
    """
    check_float_tensor(weight, "weight", owner=owner, ndim=5)
    parsed = check_conv_operands(
        x, weight.shape[1:], stride, padding, dilation, groups, owner=owner
    )
    k, c_out = weight.shape[:2]
    check_shape(
        mixing, mixing_name, (x.shape[0], k), owner=owner, layout="[N, num_kernels]"
    )
    if bias is not None:
        check_shape(
            bias, "bias", (k, c_out), owner=owner, layout="[num_kernels, C_out]"
        )
    check_same_dtype(x, owner=owner, **{mixing_name: mixing}, weight=weight, bias=bias)
    return parsed


def mix_experts(
    routing: Tensor, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Per-sample kernels and biases as routing-weighted sums of the experts.

    Computes ``W(x_j) = sum_i routing[j, i] * weight[i]`` (and the same for the
    bias) for every sample ``j`` as *one* matrix product
    ``routing @ weight.reshape(n, -1)``, the form of the official TensorFlow code.

    Args:
        routing: ``Tensor[N, n]``, the routing weights of each sample.
        weight: ``Tensor[n, C_out, C_in/groups, kH, kW]``, the expert kernels.
        bias: optional ``Tensor[n, C_out]``, the expert biases.

    Returns:
        ``(kernel, bias)``: ``Tensor[N, C_out, C_in/groups, kH, kW]`` and
        ``Tensor[N, C_out]`` (``None`` when ``bias`` is ``None``).
    """
    e = weight.shape[0]
    kernel = (routing @ weight.reshape(e, -1)).reshape(-1, *weight.shape[1:])
    return kernel, None if bias is None else routing @ bias


def condconv2d(
    input: Tensor,
    routing: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    algorithm: str = "auto",
    keep_kernels: bool = False,
) -> Tensor:
    """CondConv: convolve each sample with its routing-weighted mixture of experts.

    ``y_j = (sum_i routing[j, i] W_i) * x_j + sum_i routing[j, i] b_i``: by default
    the kernels are mixed first (:func:`mix_experts`), then the batch runs as one
    grouped convolution (:func:`refimpl.per_sample.per_sample_conv2d`); at deep
    layers the experts' convolutions are run at once and their outputs mixed
    (see ``algorithm``). Yang et al.,
    "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
    NeurIPS 2019, arXiv:1904.04971; chapter 2.

    Args:
        input: ``Tensor[N, C_in, H, W]``.
        routing: ``Tensor[N, n]``, routing weights (any real values; CondConv2d
            produces them in ``(0, 1)`` with a sigmoid).
        weight: ``Tensor[n, C_out, C_in/groups, kH, kW]``, the expert kernels.
        bias: optional ``Tensor[n, C_out]``, the expert biases.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.functional.conv2d``.
        groups: channel groups, as in ``torch.nn.functional.conv2d``.
        algorithm: ``"auto"`` (default, the cheapest for the shape by
            :func:`refimpl.per_sample.bank_costs`), ``"grouped"`` or ``"unfold"``
            (mix the kernels, then the batch folded into the groups, or im2col
            and a batched product), or ``"outputs"`` (one convolution with all
            ``n * C_out`` expert filters, then the outputs mixed).
        keep_kernels: keep the mixed kernels for the backward instead of mixing
            them again there (more memory, one pass less).

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, with the output size of a plain
        convolution of the same arguments.

    Raises:
        TypeError: for a non-tensor or non-floating argument, or (outside
            autocast) operands whose dtype differs from the input's.
        ValueError: for a routing that is not ``[N, n]``, an input whose channels do
            not match the experts, a bias that is not ``[n, C_out]``, an invalid
            convolution geometry, or an unknown ``algorithm``.
    """
    geometry = (stride, padding, dilation, groups)
    return bank_conv2d(
        "condconv2d",
        "routing",
        input,
        routing,
        weight,
        bias,
        geometry,
        algorithm=algorithm,
        keep_kernels=keep_kernels,
    )


def condconv2d_reference(
    input: Tensor,
    routing: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Literal mixture of experts: ``sum_i routing[:, i] * conv2d(x, W_i, b_i)``.

    Same arguments and result as :func:`condconv2d`, computed the expensive way the
    paper compares against (its Fig. 1b): one full convolution per expert, outputs
    mixed afterwards. It costs ``n`` convolutions instead of one; the tests and
    chapter 2 use it to check :func:`condconv2d`.

    Args:
        input: ``Tensor[N, C_in, H, W]``.
        routing: ``Tensor[N, n]``.
        weight: ``Tensor[n, C_out, C_in/groups, kH, kW]``.
        bias: optional ``Tensor[n, C_out]``.
        stride, padding, dilation, groups: as in :func:`condconv2d`.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``.

    Raises:
        TypeError, ValueError: as :func:`condconv2d`.
    """
    geometry = (stride, padding, dilation, groups)
    return bank_conv2d(
        "condconv2d_reference",
        "routing",
        input,
        routing,
        weight,
        bias,
        geometry,
        reference=True,
    )


def bank_conv2d(
    owner: str,
    mixing_name: str,
    x: Tensor,
    mixing: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    geometry: tuple,
    *,
    reference: bool = False,
    algorithm: str = "auto",
    keep_kernels: bool = False,
) -> Tensor:
    """The operator CondConv and DY-CNN share, checked once for ``owner``.

    Mixes the bank ``weight`` (and ``bias``) with the per-sample weights ``mixing``
    (CondConv's routing, DY-CNN's attention) and convolves
    (:func:`bank_forward`); with ``reference=True``, the literal mixture of
    convolutions instead (:func:`mixture_of_convolutions`). ``geometry`` is
    ``(stride, padding, dilation, groups)``.
    """
    algorithm = check_bank_algorithm(algorithm, owner)
    parsed = check_kernel_bank(owner, x, mixing, mixing_name, weight, bias, *geometry)
    if reference:
        return mixture_of_convolutions(x, mixing, weight, bias, *parsed)
    return bank_forward(x, mixing, weight, bias, *parsed, algorithm, keep_kernels)


def bank_algorithm(
    input_shape, weight_shape, stride, padding, dilation, itemsize: int = 4
) -> str:
    """The algorithm ``"auto"`` runs for a bank layer at this shape.

    :func:`refimpl.per_sample.choose_bank_algorithm` on the costs of
    :func:`refimpl.per_sample.bank_costs`. Every cost is proportional to the
    batch, so the choice is made for one sample: under ``torch.compile`` a
    dynamic batch then stays symbolic (no guard, no recompilation).
    """
    _, c_in, h, w = input_shape
    kh, kw = weight_shape[-2:]
    size = tuple(
        _output_size(s, k, stride[i], padding[i], dilation[i])
        for i, (s, k) in enumerate(((h, kh), (w, kw)))
    )
    costs = bank_costs((1, c_in, h, w), weight_shape, size, itemsize=itemsize)
    return choose_bank_algorithm(costs)


def _mix_kernels(weight: Tensor, mixing: Tensor) -> Tensor:
    # mix(weight, *dynamic) of refimpl.per_sample.mixed_conv2d
    return mix_experts(mixing, weight)[0]


# W_n = sum_k mixing[n, k] W_k: the mixing weights, and no other factor
_mix_kernels.coefficients = lambda weight, mixing: (mixing, None)


def bank_forward(
    x: Tensor,
    mixing: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    algorithm: str = "auto",
    keep_kernels: bool = False,
) -> Tensor:
    """Bank ``Tensor[n, C_out, C_in/g, kH, kW]`` mixed by ``mixing: Tensor[N, K]``,
    applied to ``x``, on checked arguments: the algorithm of ``algorithm``
    (``"auto"`` resolved by :func:`bank_algorithm`); the mixed kernels are not
    kept for the backward unless ``keep_kernels``."""
    if algorithm == "auto":
        algorithm = bank_algorithm(
            x.shape, weight.shape, stride, padding, dilation, x.element_size()
        )
    mixed_bias = None if bias is None else mixing @ bias
    if algorithm == "outputs":
        return bank_outputs_conv2d(
            x, mixing, weight, mixed_bias, stride, padding, dilation, groups
        )
    return mixed_conv2d(
        x,
        _mix_kernels,
        weight,
        (mixing,),
        mixed_bias,
        stride,
        padding,
        dilation,
        groups,
        algorithm=algorithm,
        keep_kernels=keep_kernels,
    )


def mixture_of_convolutions(
    x: Tensor,
    mixing: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """``sum_k mixing[:, k] * conv2d(x, weight[k], bias[k])``, one convolution per
    kernel: the literal reading shared by CondConv's and DY-CNN's references."""
    out = None
    for k in range(weight.shape[0]):
        y = F.conv2d(
            x,
            weight[k],
            None if bias is None else bias[k],
            stride,
            padding,
            dilation,
            groups,
        )
        term = mixing[:, k, None, None, None] * y
        out = term if out is None else out + term
    return out


def experts_to_flat(weight: Tensor, layout: str = "timm") -> Tensor:
    """Flatten a bank ``Tensor[n, C_out, C_in/g, kH, kW]`` to ``Tensor[n, P]``.

    ``P = C_out * C_in/g * kH * kW``. Two layouts exist:

    * ``"timm"`` (timm's ``CondConv2d.weight``): each row is one expert in
      PyTorch order ``(C_out, C_in/g, kH, kW)``, i.e. ``weight.reshape(n, -1)``.
      Any ``groups``.
    * ``"tf"`` (the official ``CondConv2D.condconv_kernel``): each row is one
      expert in TensorFlow order ``(kH, kW, C_in, C_out)``. Only dense
      convolutions (``groups=1``), as TensorFlow's ``CondConv2D``.

    Expert biases ``Tensor[n, C_out]`` need no conversion: all layouts agree.

    Args:
        weight: ``Tensor[n, C_out, C_in/g, kH, kW]``, e.g. ``CondConv2d.weight``.
        layout: ``"timm"`` or ``"tf"``.

    Returns:
        ``Tensor[n, P]``; load it with ``timm_module.weight.copy_(flat)``.

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
    """Inverse of :func:`experts_to_flat`: ``Tensor[n, P]`` to a 5-D expert bank.

    Args:
        flat: ``Tensor[n, P]`` in the ``"timm"`` or ``"tf"`` layout.
        out_channels: ``C_out``.
        in_channels_per_group: ``C_in/groups`` (``C_in`` for the ``"tf"`` layout).
        kernel_size: ``k`` or ``(kH, kW)``.
        layout: ``"timm"`` or ``"tf"``.

    Returns:
        ``Tensor[n, C_out, C_in/g, kH, kW]``, ready for
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


class CondRouting(NamedTuple):
    """The input-dependent part of :class:`CondConv2d`."""

    routing: Tensor
    """``Tensor[N, n]``, sigmoid routing weights in ``(0, 1)``."""


class CondConv2d(Conv2dBase):
    """Conditionally parameterized convolution, a drop-in for ``nn.Conv2d``.

    Every sample ``x_i`` is convolved with its own kernel, a routing-weighted sum of
    ``num_kernels`` expert kernels:

    ``alpha = sigmoid(R GAP(x_i) + c)``,
    ``y_j = (sum_i alpha_i W_i) * x_j + sum_i alpha_i b_i``.

    Yang, Bender, Le and Ngiam, "CondConv: Conditionally Parameterized
    Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971.
    Chapter 2 derives it and shows that it equals a mixture of ``num_kernels``
    convolutions at the cost of one.

    Faithful to the official TensorFlow code (``condconv_layers.py`` and the
    routing in ``efficientnet_model.py``):

    * routing is global average pooling, one ``Linear(C_in, num_kernels)`` with
      bias, and a sigmoid: no hidden layer, no softmax, no temperature, so the
      weights need not sum to 1; the routing layer is initialised like the
      official dense layer (Glorot-uniform weight, zero bias);
    * kernels *and* biases are mixed per sample before the convolution;
    * each expert is initialised independently, like an ``nn.Conv2d`` of the same
      shape (Kaiming-uniform with ``a = sqrt(5)``; bias uniform in
      ``+-1/sqrt(fan_in)``);
    * the official EfficientNet shares one routing vector among the convolutions of
      a block: compute it once with
      :meth:`~refimpl._conv.Conv2dBase.dynamic_tensors` and pass it to each
      layer's ``forward(x, routing)``.

    Deviations: the experts are stored as a 5-D bank, not the flattened
    ``[n, num_params]`` matrix of the official code and of timm (convert with
    :func:`experts_to_flat` / :func:`experts_from_flat`, or load a timm checkpoint
    with :meth:`~refimpl._conv.Conv2dBase.load_official_state_dict`); padding is
    ``nn.Conv2d``'s (numbers, ``"same"``, ``"valid"``, any ``padding_mode``), not
    TensorFlow's ``"same"``, which is asymmetric for even sizes. The layer has no
    batch normalisation, so a sample's output never depends on the rest of its
    batch.

    Args:
        conv_args: ``nn.Conv2d``'s arguments, ``in_channels`` to ``padding_mode``,
            with the same meaning; ``bias`` gives each expert a bias.
        num_kernels: ``n``, the number of expert kernels (the paper's
            ``num_experts``; 8 for the "CondConv (8x)" networks of later papers,
            the official EfficientNet uses 4 or 8).
        algorithm: how the batch is computed, see :func:`condconv2d`:
            ``"auto"`` (the cheapest for the input's shape), ``"grouped"``,
            ``"unfold"`` or ``"outputs"``.
        keep_kernels: keep the per-sample kernels for the backward (``False``:
            they are mixed again there, which saves ``N`` kernels of memory).
        device, dtype: factory keyword arguments for the parameters.

    Shapes:
        ``forward(Tensor[N, C_in, H, W], routing: Tensor[N, n] | None)`` returns
        ``Tensor[N, C_out, H_out, W_out]``; unbatched ``Tensor[C_in, H, W]`` too.

    Attributes:
        weight: ``Tensor[n, C_out, C_in/groups, kH, kW]``, the experts.
        bias: ``Tensor[n, C_out]`` or ``None``.
        routing_fc: the ``nn.Linear(C_in, n)`` of the routing function.
    """

    def __init__(
        self,
        *conv_args,
        num_kernels: int = 8,
        algorithm: str = "auto",
        keep_kernels: bool = False,
        **conv_kwargs,
    ) -> None:
        # nn.Conv2d's arguments are parsed once, by Conv2dBase; the signature
        # shown by help() and the docs is completed by Conv2dBase.__init_subclass__.
        super().__init__(*conv_args, **conv_kwargs)
        self.num_kernels = check_positive_int(
            num_kernels, "num_kernels", owner=type(self).__name__
        )
        self.algorithm = check_bank_algorithm(algorithm, type(self).__name__)
        self.keep_kernels = check_bool(
            keep_kernels, "keep_kernels", owner=type(self).__name__
        )
        factory = self.factory_kwargs
        self.weight = self.kernel_bank(self.num_kernels)
        self.bias = self.bias_parameter(self.num_kernels)
        self.routing_fc = nn.Linear(self.in_channels, self.num_kernels, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert like an ``nn.Conv2d`` and the routing like TF's."""
        init_like_conv2d(self.weight, self.bias)
        nn.init.xavier_uniform_(self.routing_fc.weight)
        nn.init.zeros_(self.routing_fc.bias)

    def _options(self):
        yield "num_kernels", self.num_kernels, 8
        yield "algorithm", self.algorithm, "auto"
        yield "keep_kernels", self.keep_kernels, False

    def _dynamic(self, x: Tensor) -> CondRouting:
        return CondRouting(torch.sigmoid(self.routing_fc(x.mean(dim=(2, 3)))))

    def _forward(self, x: Tensor, routing: Tensor | None = None) -> Tensor:
        if routing is None:
            (routing,) = self._dynamic(x)
        return bank_forward(
            self.pad(x),
            routing,
            self.weight,
            self.bias,
            self.stride,
            self.op_padding,
            self.dilation,
            self.groups,
            self.algorithm,
            self.keep_kernels,
        )

    def forward(self, input: Tensor, routing: Tensor | None = None) -> Tensor:
        """Apply CondConv to ``input``.

        Args:
            input: ``Tensor[N, C_in, H, W]`` or unbatched ``Tensor[C_in, H, W]``.
            routing: optional ``Tensor[N, n]`` (``Tensor[n]`` for an unbatched
                input) computed outside, e.g. by another layer's
                :meth:`~refimpl._conv.Conv2dBase.dynamic_tensors`, to share one
                routing vector per block as the official EfficientNet does.
                ``None`` computes it from ``input``.

        Returns:
            ``Tensor[N, C_out, H_out, W_out]``, the size of ``nn.Conv2d``'s output.

        Raises:
            TypeError: for a non-tensor or non-floating input or routing.
            ValueError: for an input without ``C_in`` channels or a routing that is
                not ``[N, n]``.
        """
        x, unbatched = self._check_input(input)
        if routing is not None:
            if unbatched:
                check_shape(
                    routing,
                    "routing",
                    (self.num_kernels,),
                    owner=type(self).__name__,
                    layout="[num_kernels]",
                )
                routing = routing.unsqueeze(0)
            check_shape(
                routing,
                "routing",
                (x.shape[0], self.num_kernels),
                owner=type(self).__name__,
                layout="[N, num_kernels]",
            )
            check_same_dtype(x, owner=type(self).__name__, routing=routing)
        return self._finish(self._forward(x, routing), x, unbatched)

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Function-preserving start: a zero routing matrix makes every
        ``alpha_i = sigmoid(0) = 1/2``, and the experts are ``2 W / n`` plus
        zero-sum perturbations (:func:`refimpl._conv.spread_kernel`), so the mixed
        kernel is ``W`` for every input. The routing bias stays zero."""
        scale = 0.5 * self.num_kernels
        nn.init.zeros_(self.routing_fc.weight)
        nn.init.zeros_(self.routing_fc.bias)
        self.weight.copy_(spread_kernel(weight, self.weight, scale))
        if self.bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype).expand_as(self.bias) / scale)

    def _official_names(self):
        """timm's ``CondConv2d`` (``weight [n, C_out*C_in/g*kH*kW]``, ``bias
        [n, C_out]``) and the routing layer of its block, ``routing_fn``
        (``nn.Linear(C_in, n)``)."""
        e, c_out = self.num_kernels, self.out_channels
        names = {
            "weight": ("weight", (e, self.weight[0].numel())),
            "routing_fc.weight": ("routing_fn.weight", (e, self.in_channels)),
            "routing_fc.bias": ("routing_fn.bias", (e,)),
        }
        if self.bias is not None:
            names["bias"] = ("bias", (e, c_out))
        return names
