"""Dynamic convolution: softmax attention over ``K`` convolution kernels.

Chen, Dai, Liu, Chen, Yuan and Liu, "Dynamic Convolution: Attention over
Convolution Kernels", CVPR 2020, arXiv:1912.03458 (DY-CNN). Chapter 3 of the
book derives everything in this module.

A dynamic convolution owns ``K`` kernels ``W_k`` and biases ``b_k``. For every
sample it computes an attention vector ``pi(x)`` on the probability simplex and
convolves the sample with the aggregated kernel::

    pi(x) = softmax(z(x) / tau),   z(x) = W2 relu(W1 GAP(x)) + c2
    y     = (sum_k pi_k(x) W_k) * x + sum_k pi_k(x) b_k

The authors published no code. Every choice the paper leaves open is stated in
the docstring that makes it; none of the quirks of the unofficial port
(kaijieshi7/Dynamic-convolution-Pytorch) is copied:

* attention hidden width ``max(C_in // reduction, 4)``, not ``int(C_in / 4) + 1``;
* no BatchNorm in the attention branch, so a sample's output never depends on
  the rest of its batch and ``train()``/``eval()`` give the same result;
* the temperature is a validated attribute driven by :func:`temperature_schedule`
  (30 to 1, linear, any fractional epoch), not a counter stepped by 3 from 34;
* inputs are folded with ``reshape``, so ``channels_last`` and non-contiguous
  inputs work.
"""

from __future__ import annotations

import math
import numbers

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
from .condconv import mix_experts
from .per_sample import per_sample_conv2d

__all__ = [
    "MIN_HIDDEN",
    "DynamicConv2d",
    "attention_hidden_width",
    "dynamic_conv2d",
    "dynamic_conv2d_reference",
    "kernel_attention",
    "set_temperature",
    "temperature_schedule",
]

MIN_HIDDEN = 4
"""Smallest hidden width of the attention branch, see :func:`attention_hidden_width`."""


def attention_hidden_width(in_channels: int, reduction: int) -> int:
    """Hidden width of the attention branch: ``max(in_channels // reduction, 4)``.

    The paper squeezes ``C_in`` by 4 in the first fully connected layer
    (chapter 3). With ``in_channels < 4 * reduction`` the plain quotient would be
    tiny or zero (an RGB input gives ``3 // 4 == 0``), so the width never drops
    below :data:`MIN_HIDDEN`. Layers with ``in_channels >= 16`` are unaffected,
    which keeps the parameter counts of ResNet and MobileNetV2 recipes unchanged.

    Args:
        in_channels: channels of the layer input, ``C_in``.
        reduction: squeeze factor of the first fully connected layer.

    Returns:
        The hidden width, an int ``>= 4``.

    Raises:
        TypeError: if an argument is not an int.
        ValueError: if an argument is below 1.
    """
    owner = "attention_hidden_width"
    check_positive_int(in_channels, "in_channels", owner=owner)
    check_positive_int(reduction, "reduction", owner=owner)
    return max(in_channels // reduction, MIN_HIDDEN)


# --- temperature --------------------------------------------------------------------


def _check_real(value: object, name: str, *, owner: str, minimum: float,
                strict: bool) -> float:
    """Return ``value`` as a finite float above (or at) ``minimum``; raise otherwise."""
    word = "a positive" if strict else "a non-negative"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner} expected {name} to be {word} float, got "
            f"{type(value).__name__} {value!r}"
        )
    value = float(value)
    too_small = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or too_small:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{owner} expected {name} {bound} and finite, got {value!r}")
    return value


def temperature_schedule(
    epoch: float,
    *,
    start: float = 30.0,
    end: float = 1.0,
    anneal_epochs: float = 10.0,
) -> float:
    """Softmax temperature at a (possibly fractional) point of training.

    Linear from ``start`` at ``epoch == 0`` to ``end`` at
    ``epoch == anneal_epochs``, then constant ``end``::

        tau(e) = start + (end - start) * e / anneal_epochs   for e < anneal_epochs
        tau(e) = end                                         otherwise

    ``epoch`` may be fractional, ``iteration / iterations_per_epoch`` measured
    from the start of training, so the temperature can be updated every
    iteration (ODConv's convention) or once per epoch (integer ``epoch``).

    Sources. The paper (Chen et al., "Dynamic Convolution: Attention over
    Convolution Kernels", CVPR 2020, arXiv:1912.03458) anneals the softmax
    temperature so that the attention is near-uniform in the first epochs
    (third-party summaries of the paper agree on this); the values ``30 -> 1``
    over the first 10 epochs are attributed to it by the book's method
    reference sheet, but the paper text could not be consulted to confirm
    them. The exact linear form with these defaults is in ODConv's official code
    (OSVAI/ODConv, ``utils/misc.py``, ``get_temperature``), which updates it
    before every iteration ``i`` of epoch ``e`` with
    ``epoch = e + (i + 1) / iterations_per_epoch``. The unofficial DY-CNN port
    steps from 34 down by 3 per epoch instead; that is not reproduced here.
    Chapter 3 plots the schedule.

    Args:
        epoch: epochs of training done so far, ``>= 0``; fractional allowed.
        start: temperature at ``epoch == 0``, ``> 0``.
        end: temperature from ``epoch == anneal_epochs`` on, ``> 0``.
        anneal_epochs: length of the linear ramp in epochs, ``>= 0``; ``0``
            means no annealing (always ``end``).

    Returns:
        The temperature, a Python float.

    Raises:
        TypeError: if an argument is not a real number.
        ValueError: if an argument is out of range or not finite.
    """
    owner = "temperature_schedule"
    epoch = _check_real(epoch, "epoch", owner=owner, minimum=0.0, strict=False)
    start = _check_real(start, "start", owner=owner, minimum=0.0, strict=True)
    end = _check_real(end, "end", owner=owner, minimum=0.0, strict=True)
    anneal_epochs = _check_real(
        anneal_epochs, "anneal_epochs", owner=owner, minimum=0.0, strict=False
    )
    if epoch >= anneal_epochs:
        return end
    return start + (end - start) * epoch / anneal_epochs


def set_temperature(model: nn.Module, value: float) -> int:
    """Set ``temperature = value`` on every submodule that has a ``temperature``.

    Works for :class:`DynamicConv2d` and for any other module exposing a
    ``temperature`` attribute (ODConv's attention, chapter 4), so one call per
    iteration or epoch drives a whole network::

        set_temperature(model, temperature_schedule(epoch))

    Args:
        model: the network (``model`` itself is included in the search).
        value: the new temperature, a finite float ``> 0``.

    Returns:
        How many modules were updated.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``value`` not a real.
        ValueError: if ``value`` is not a finite positive number, or if no module
            of ``model`` has a ``temperature`` attribute (a silent no-op would
            hide a wrongly built network).
    """
    owner = "set_temperature"
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{owner} expected model to be a torch.nn.Module, got "
            f"{type(model).__name__}"
        )
    value = _check_real(value, "value", owner=owner, minimum=0.0, strict=True)
    count = 0
    for module in model.modules():
        if hasattr(module, "temperature"):
            module.temperature = value
            count += 1
    if count == 0:
        raise ValueError(
            f"{owner} expected model to contain a module with a temperature "
            f"attribute, found none in {type(model).__name__}"
        )
    return count


# --- functional form ----------------------------------------------------------------


def kernel_attention(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    temperature: float,
) -> Tensor:
    """Attention over kernels: ``softmax(fc2(relu(fc1(GAP(x)))) / temperature)``.

    The squeeze-and-excitation shaped branch of DY-CNN (chapter 3): global
    average pooling, a fully connected layer without bias that squeezes the
    channels, ReLU, a fully connected layer with bias to ``K`` logits, and a
    softmax with temperature. There is no BatchNorm (the paper's text does not
    settle it; without it the attention of a sample depends on that sample
    only).

    Args:
        x: ``Tensor[N, C_in, H, W]``.
        fc1_weight: ``Tensor[hidden, C_in]``.
        fc2_weight: ``Tensor[K, hidden]``.
        fc2_bias: ``Tensor[K]`` or ``None``.
        temperature: softmax temperature ``tau > 0``; large values flatten the
            attention towards ``1 / K``, small ones sharpen it towards one-hot.

    Returns:
        ``Tensor[N, K]``, non-negative, each row summing to 1.
    """
    pooled = x.mean(dim=(2, 3))
    hidden = F.relu(F.linear(pooled, fc1_weight))
    logits = F.linear(hidden, fc2_weight, fc2_bias)
    return torch.softmax(logits / temperature, dim=1)


def _check_functional(x, attention, weight, bias, stride, padding, dilation, groups,
                      owner):
    check_float_tensor(x, "input", owner=owner, ndim=4)
    check_float_tensor(attention, "attention", owner=owner, ndim=2)
    check_float_tensor(weight, "weight", owner=owner, ndim=5)
    stride = pair(stride, "stride", owner=owner)
    padding = pair(padding, "padding", owner=owner, minimum=0)
    dilation = pair(dilation, "dilation", owner=owner)
    k, c_out, c_in_g, kh, kw = weight.shape
    check_groups(x.shape[1], c_out, groups, owner=owner)
    if c_in_g * groups != x.shape[1]:
        raise ValueError(
            f"{owner} expected weight of shape [K, C_out, C_in/groups, kH, kW] with "
            f"C_in/groups = {x.shape[1] // groups}, got {tuple(weight.shape)}"
        )
    if tuple(attention.shape) != (x.shape[0], k):
        raise ValueError(
            f"{owner} expected attention of shape {(x.shape[0], k)} ([N, K]), got "
            f"{tuple(attention.shape)}"
        )
    if bias is not None:
        check_float_tensor(bias, "bias", owner=owner, ndim=2)
        if tuple(bias.shape) != (k, c_out):
            raise ValueError(
                f"{owner} expected bias of shape {(k, c_out)} ([K, C_out]), got "
                f"{tuple(bias.shape)}"
            )
    _check_dtypes(x, owner, attention=attention, weight=weight, bias=bias)
    _check_size(x, (kh, kw), padding, dilation, owner)
    return stride, padding, dilation


def _check_dtypes(x, owner, **tensors):
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


def _check_size(x, kernel_size, padding, dilation, owner):
    for axis, name in ((0, "height"), (1, "width")):
        size = x.shape[2 + axis] + 2 * padding[axis]
        span = dilation[axis] * (kernel_size[axis] - 1) + 1
        if size < span:
            raise ValueError(
                f"{owner} expected the padded input ({size}) to be at least the "
                f"dilated kernel size ({span}) along {name}"
            )


def dynamic_conv2d(
    x: Tensor,
    attention: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Convolve each sample with its attention-weighted sum of ``K`` kernels.

    Sample ``n`` is convolved with ``sum_k attention[n, k] * weight[k]`` and
    shifted by ``sum_k attention[n, k] * bias[k]`` (chapter 3, equation
    ``dy-aggregate``). The ``N`` aggregated kernels cost one small matrix
    product; the convolutions run as one grouped convolution through
    :func:`refimpl.per_sample.per_sample_conv2d`, so the cost is that of a
    static convolution plus ``N * K * |W|`` multiply-adds for the aggregation.

    Args:
        x: ``Tensor[N, C_in, H, W]``.
        attention: ``Tensor[N, K]``, usually from :func:`kernel_attention`. Any
            real weights are accepted: the aggregation is linear in them.
        weight: ``Tensor[K, C_out, C_in/groups, kH, kW]``.
        bias: optional ``Tensor[K, C_out]``.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.Conv2d``.
        groups: channel groups, as in ``torch.nn.Conv2d``.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, ``H_out`` as for ``torch.nn.Conv2d``.

    Raises:
        TypeError: for non-tensors, non-float tensors or malformed sizes.
        ValueError: for inconsistent shapes, with the expected and actual values.
    """
    stride, padding, dilation = _check_functional(
        x, attention, weight, bias, stride, padding, dilation, groups, "dynamic_conv2d"
    )
    # Mixing K kernels by attention is CondConv's mixing of experts (chapter 2);
    # only the weights that do the mixing differ.
    kernels, biases = mix_experts(attention, weight, bias)
    return per_sample_conv2d(x, kernels, biases, stride, padding, dilation, groups)


def dynamic_conv2d_reference(
    x: Tensor,
    attention: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Literal reference for :func:`dynamic_conv2d`: ``K`` convolutions, then mixed.

    Computes ``sum_k attention[:, k] * (conv(x, weight[k]) + bias[k])`` with one
    ``F.conv2d`` per kernel: the mixture-of-experts reading of the operator. By
    linearity of convolution it equals convolving with the aggregated kernel,
    which is what the tests check in float64. It costs ``K`` convolutions, so it
    only serves as the obviously-right reference (chapter 3 shows both).

    Args and returns as for :func:`dynamic_conv2d`.
    """
    stride, padding, dilation = _check_functional(
        x, attention, weight, bias, stride, padding, dilation, groups,
        "dynamic_conv2d_reference",
    )
    out = None
    for k in range(weight.shape[0]):
        expert = F.conv2d(
            x, weight[k], None if bias is None else bias[k],
            stride, padding, dilation, groups,
        )
        term = attention[:, k].reshape(-1, 1, 1, 1) * expert
        out = term if out is None else out + term
    return out


# --- module -------------------------------------------------------------------------


class DynamicConv2d(nn.Module):
    """Dynamic convolution (DY-CNN): softmax attention over ``K`` kernels.

    Drop-in replacement for ``torch.nn.Conv2d``: same constructor arguments and
    output shape, plus the keyword-only ``num_kernels``, ``reduction`` and
    ``temperature``. For every sample the attention branch of
    :func:`kernel_attention` weighs the ``K`` kernels and biases, and the sample
    is convolved with the aggregated kernel (:func:`dynamic_conv2d`). Paper:
    Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR
    2020, arXiv:1912.03458; derivation and experiments in chapter 3.

    Parameters: ``weight: Tensor[K, C_out, C_in/groups, kH, kW]``, each kernel
    initialised independently like ``nn.Conv2d`` (Kaiming-uniform, ``a=sqrt(5)``);
    ``bias: Tensor[K, C_out]`` (or ``None``), each row initialised like
    ``nn.Conv2d``'s bias; ``fc1`` (``Linear(C_in, hidden)``, no bias) and ``fc2``
    (``Linear(hidden, K)``, bias initialised to zero so that no kernel is
    favoured at the start), with ``hidden = max(C_in // reduction, 4)``.

    Deviations, all documented choices since there is no official code: no
    BatchNorm in the attention branch (so outputs do not depend on the batch
    or on ``train()``/``eval()``; a BN variant would add ``2 * hidden``
    parameters per layer); the hidden width above instead of the unofficial
    port's ``int(C_in / 4) + 1``; the temperature is saved in the state dict
    (as extra state), so a model loaded after annealing evaluates at the
    temperature it was saved with.

    ``channels_last`` inputs work. Converting the *module* with
    ``.to(memory_format=torch.channels_last)`` raises in PyTorch, as for
    ``nn.Conv3d``, because ``Module.to`` applies the 4-D memory format to every
    5-D parameter; the kernel bank is 5-D, so convert only the inputs.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: int or pair.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.Conv2d``
            (zero padding only).
        groups: channel groups; must divide both channel counts.
        bias: whether each of the ``K`` kernels has a bias.
        num_kernels: ``K``, the number of kernels (paper: 4).
        reduction: squeeze factor of the attention branch (paper: 4).
        temperature: initial softmax temperature (default 30, the start of
            :func:`temperature_schedule`; use ``1.0`` for no annealing).
        device, dtype: factory keyword arguments, as in ``torch.nn.Conv2d``.

    Shapes:
        ``Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]``, with
        ``H_out = (H + 2 * padding - dilation * (kH - 1) - 1) // stride + 1``.
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
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 30.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(in_channels, "in_channels", owner=owner)
        check_positive_int(out_channels, "out_channels", owner=owner)
        self.kernel_size = pair(kernel_size, "kernel_size", owner=owner)
        self.stride = pair(stride, "stride", owner=owner)
        self.padding = pair(padding, "padding", owner=owner, minimum=0)
        self.dilation = pair(dilation, "dilation", owner=owner)
        check_groups(in_channels, out_channels, groups, owner=owner)
        if not isinstance(bias, bool):
            raise TypeError(f"{owner} expected bias to be a bool, got {bias!r}")
        self.num_kernels = check_positive_int(num_kernels, "num_kernels", owner=owner)
        self.reduction = check_positive_int(reduction, "reduction", owner=owner)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.hidden_channels = attention_hidden_width(in_channels, reduction)

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(
                num_kernels, out_channels, in_channels // groups, *self.kernel_size,
                **factory,
            )
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.fc1 = nn.Linear(in_channels, self.hidden_channels, bias=False, **factory)
        self.fc2 = nn.Linear(self.hidden_channels, num_kernels, **factory)
        self.temperature = temperature
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every kernel and bias like ``nn.Conv2d``, the attention FCs
        like ``nn.Linear``, and ``fc2.bias`` to zero."""
        fan_in = self.weight[0].shape[1:].numel()
        bound = 1.0 / math.sqrt(fan_in)
        for k in range(self.num_kernels):
            # one call per kernel: on the 5-D bank the fan-in would be wrong
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        nn.init.zeros_(self.fc2.bias)

    @property
    def temperature(self) -> float:
        """Softmax temperature ``tau`` of the attention, a float ``> 0``.

        Setting it validates the value (``TypeError`` for non-reals, including
        tensors; ``ValueError`` unless finite and positive). Drive it with
        :func:`temperature_schedule` and :func:`set_temperature`.
        """
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_real(
            value, "temperature", owner=type(self).__name__, minimum=0.0, strict=True
        )

    def get_extra_state(self) -> dict:
        """The temperature, saved in the state dict next to the parameters."""
        return {"temperature": self._temperature}

    def set_extra_state(self, state: dict) -> None:
        """Restore the temperature saved by :meth:`get_extra_state`."""
        if not isinstance(state, dict) or "temperature" not in state:
            raise ValueError(
                f"{type(self).__name__} expected extra state {{'temperature': float}}, "
                f"got {state!r}"
            )
        self.temperature = state["temperature"]

    def _check_input(self, x: object) -> Tensor:
        owner = type(self).__name__
        check_float_tensor(x, "input", owner=owner, ndim=4)
        check_channels(x, self.in_channels, owner=owner)
        _check_dtypes(x, owner, weight=self.weight)
        _check_size(x, self.kernel_size, self.padding, self.dilation, owner)
        return x

    def _attention(self, x: Tensor) -> Tensor:
        bias = self.fc2.bias
        return kernel_attention(x, self.fc1.weight, self.fc2.weight, bias,
                                self._temperature)

    def attention(self, x: Tensor) -> Tensor:
        """Attention over the kernels for each sample of ``x``.

        Args:
            x: ``Tensor[N, C_in, H, W]``.

        Returns:
            ``Tensor[N, K]``: non-negative rows summing to 1.
        """
        return self._attention(self._check_input(x))

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]``."""
        self._check_input(x)
        return dynamic_conv2d(
            x, self._attention(x), self.weight, self.bias,
            self.stride, self.padding, self.dilation, self.groups,
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return (
            f"{text}, num_kernels={self.num_kernels}, reduction={self.reduction}, "
            f"temperature={self._temperature:g}"
        )
