"""Dynamic convolution: softmax attention over ``n`` convolution kernels.

Chen, Dai, Liu, Chen, Yuan and Liu, "Dynamic Convolution: Attention over
Convolution Kernels", CVPR 2020, arXiv:1912.03458 (DY-CNN). Chapter 3 of the
book derives everything in this module.

A dynamic convolution owns ``n`` kernels ``W_i`` and biases ``b_i`` (``n`` is
``num_kernels``; the paper writes ``K``). For every sample it computes an
attention vector ``alpha(x)`` (the paper's ``pi(x)``) on the probability simplex
and convolves the sample with the aggregated kernel::

    alpha(x) = softmax(z(x) / tau),   z(x) = W2 relu(W1 GAP(x)) + c2
    y        = (sum_i alpha_i(x) W_i) * x + sum_i alpha_i(x) b_i

The authors published no code. Every choice the paper leaves open is stated in
the docstring that makes it; none of the quirks of the unofficial port
(kaijieshi7/Dynamic-convolution-Pytorch) is copied:

* attention hidden width ``max(floor(C_in * reduction), min_hidden)``, with
  ``reduction=0.25`` and ``min_hidden=4``, not ``int(C_in / 4) + 1``;
* no BatchNorm in the attention branch, so a sample's output never depends on
  the rest of its batch and ``train()``/``eval()`` give the same result;
* the temperature is a validated attribute driven by :func:`temperature_schedule`
  (30 to 1, linear, any fractional epoch), not a counter stepped by 3 from 34;
* inputs are folded with ``reshape``, so ``channels_last`` and non-contiguous
  inputs work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import (
    Conv2dBase,
    TemperatureMixin,
    hidden_width,
    init_like_conv2d,
    spread_kernel,
)

# chapter 3 drives the temperature with it; it lives with TemperatureMixin
from ._conv import set_temperature as set_temperature
from ._validation import check_bool, check_positive_int, check_real
from .condconv import bank_conv2d, bank_forward
from .per_sample import check_bank_algorithm

__all__ = [
    "DynamicConv2d",
    "KernelAttention",
    "dynamic_conv2d",
    "dynamic_conv2d_reference",
    "kernel_attention",
    "temperature_schedule",
]

# --- temperature --------------------------------------------------------------------


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
    over the first 10 epochs are attributed to it by secondary sources, but the
    paper text could not be consulted to confirm them. The exact linear form with
    these defaults is in ODConv's official code (OSVAI/ODConv, ``utils/misc.py``,
    ``get_temperature``), which updates it before every iteration ``i`` of epoch
    ``e`` with
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
    epoch = check_real(epoch, "epoch", owner=owner, minimum=0.0, strict=False)
    start = check_real(start, "start", owner=owner, minimum=0.0)
    end = check_real(end, "end", owner=owner, minimum=0.0)
    anneal_epochs = check_real(
        anneal_epochs, "anneal_epochs", owner=owner, minimum=0.0, strict=False
    )
    if epoch >= anneal_epochs:
        return end
    return start + (end - start) * epoch / anneal_epochs


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
    channels, ReLU, a fully connected layer with bias to ``n`` logits, and a
    softmax with temperature. There is no BatchNorm (the paper's text does not
    settle it; without it the attention of a sample depends on that sample
    only).

    Args:
        x: ``Tensor[N, C_in, H, W]``.
        fc1_weight: ``Tensor[hidden, C_in]``.
        fc2_weight: ``Tensor[n, hidden]``.
        fc2_bias: ``Tensor[n]`` or ``None``.
        temperature: softmax temperature ``tau > 0``; large values flatten the
            attention towards ``1 / n``, small ones sharpen it towards one-hot.

    Returns:
        ``Tensor[N, n]``, non-negative, each row summing to 1.
    """
    pooled = x.mean(dim=(2, 3))
    hidden = F.relu(F.linear(pooled, fc1_weight))
    logits = F.linear(hidden, fc2_weight, fc2_bias)
    return torch.softmax(logits / temperature, dim=1)


def dynamic_conv2d(
    input: Tensor,
    attention: Tensor,
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
    """Convolve each sample with its attention-weighted sum of ``n`` kernels.

    Sample ``n`` is convolved with ``sum_k attention[n, k] * weight[k]`` and
    shifted by ``sum_k attention[n, k] * bias[k]`` (chapter 3, equation
    ``dy-aggregate``). The ``N`` aggregated kernels cost one small matrix
    product; the convolutions run as one grouped convolution through
    :func:`refimpl.per_sample.per_sample_conv2d`, so the cost is that of a
    static convolution plus ``N * n * |W|`` multiply-adds for the aggregation,
    and the ``N`` aggregated kernels written to memory. Where few output
    positions share each kernel (deep layers) writing them costs more than ``n``
    convolutions, and ``algorithm="auto"`` runs the ``n`` kernels as one static
    convolution and mixes the outputs instead (:func:`refimpl.per_sample.bank_costs`).

    Args:
        input: ``Tensor[N, C_in, H, W]``.
        attention: ``Tensor[N, n]``, usually from :func:`kernel_attention`. Any
            real weights are accepted: the aggregation is linear in them.
        weight: ``Tensor[n, C_out, C_in/groups, kH, kW]``.
        bias: optional ``Tensor[n, C_out]``.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.Conv2d``.
        groups: channel groups, as in ``torch.nn.Conv2d``.
        algorithm: ``"auto"``, ``"grouped"``, ``"unfold"`` or ``"outputs"``, as
            for :func:`refimpl.condconv.condconv2d`.
        keep_kernels: keep the aggregated kernels for the backward instead of
            aggregating them again there.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, ``H_out`` as for ``torch.nn.Conv2d``.

    Raises:
        TypeError: for non-tensors, non-float tensors or malformed sizes.
        ValueError: for inconsistent shapes or an unknown ``algorithm``, with the
            expected and actual values.
    """
    # Mixing n kernels by attention is CondConv's mixing of experts (chapter 2);
    # only the weights that do the mixing differ.
    geometry = (stride, padding, dilation, groups)
    return bank_conv2d(
        "dynamic_conv2d",
        "attention",
        input,
        attention,
        weight,
        bias,
        geometry,
        algorithm=algorithm,
        keep_kernels=keep_kernels,
    )


def dynamic_conv2d_reference(
    input: Tensor,
    attention: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Literal reference for :func:`dynamic_conv2d`: ``n`` convolutions, then mixed.

    Computes ``sum_k attention[:, k] * (conv(x, weight[k]) + bias[k])`` with one
    ``F.conv2d`` per kernel: the mixture-of-experts reading of the operator. By
    linearity of convolution it equals convolving with the aggregated kernel,
    which is what the tests check in float64. It costs ``n`` convolutions, so it
    only serves as the obviously-right reference (chapter 3 shows both).

    Args and returns as for :func:`dynamic_conv2d`.
    """
    # the same mixture of n convolutions as CondConv's reference (chapter 2)
    geometry = (stride, padding, dilation, groups)
    return bank_conv2d(
        "dynamic_conv2d_reference",
        "attention",
        input,
        attention,
        weight,
        bias,
        geometry,
        reference=True,
    )


# --- module -------------------------------------------------------------------------


class KernelAttention(NamedTuple):
    """The input-dependent part of :class:`DynamicConv2d`."""

    attention: Tensor
    """``Tensor[N, n]``, softmax attention over the kernels (rows sum to 1)."""


class DynamicConv2d(TemperatureMixin, Conv2dBase):
    """Dynamic convolution (DY-CNN): softmax attention over ``n`` kernels.

    Drop-in replacement for ``torch.nn.Conv2d``: same constructor arguments and
    output shape, plus the keyword-only ``num_kernels``, ``reduction``,
    ``min_hidden`` and ``temperature``. For every sample the attention branch of
    :func:`kernel_attention` weighs the ``n`` kernels and biases, and the sample
    is convolved with the aggregated kernel (:func:`dynamic_conv2d`). Paper:
    Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR
    2020, arXiv:1912.03458; derivation and experiments in chapter 3.

    Parameters: ``weight: Tensor[n, C_out, C_in/groups, kH, kW]``, each kernel
    initialised independently like ``nn.Conv2d`` (Kaiming-uniform, ``a=sqrt(5)``);
    ``bias: Tensor[n, C_out]`` (or ``None``), each row initialised like
    ``nn.Conv2d``'s bias; ``fc1`` (``Linear(C_in, hidden)``, no bias) and ``fc2``
    (``Linear(hidden, n)``, bias initialised to zero so that no kernel is
    favoured at the start), with ``hidden = max(floor(C_in * reduction),
    min_hidden)``.

    Deviations, all documented choices since there is no official code: no
    BatchNorm in the attention branch (so outputs do not depend on the batch
    or on ``train()``/``eval()``; a BN variant would add ``2 * hidden``
    parameters per layer); the hidden width above instead of the unofficial
    port's ``int(C_in / 4) + 1`` (build with ``reduction=h / C_in`` to load a
    port checkpoint of hidden width ``h``); the temperature is saved in the state
    dict (as extra state), so a model loaded after annealing evaluates at the
    temperature it was saved with.

    Args:
        conv_args: ``nn.Conv2d``'s arguments, ``in_channels`` to ``padding_mode``,
            with the same meaning; ``bias`` gives each of the ``n`` kernels a bias.
        num_kernels: ``n``, the number of kernels (paper: 4).
        reduction: hidden width of the attention branch as a fraction of
            ``C_in`` (paper: 1/4).
        min_hidden: smallest hidden width (4: an RGB input would otherwise get 0).
        temperature: initial softmax temperature (default 30, the start of
            :func:`temperature_schedule`; use ``1.0`` for no annealing).
        algorithm: ``"auto"`` (the cheapest for the input's shape),
            ``"grouped"``, ``"unfold"`` or ``"outputs"``, see
            :func:`dynamic_conv2d`.
        keep_kernels: keep the aggregated kernels for the backward (``False``:
            they are aggregated again there, saving ``N`` kernels of memory).
        device, dtype: factory keyword arguments, as in ``torch.nn.Conv2d``.

    Shapes:
        ``Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]``, with
        ``H_out = (H + 2 * padding - dilation * (kH - 1) - 1) // stride + 1``.
    """

    def __init__(
        self,
        *conv_args,
        num_kernels: int = 4,
        reduction: float = 0.25,
        min_hidden: int = 4,
        temperature: float = 30.0,
        algorithm: str = "auto",
        keep_kernels: bool = False,
        **conv_kwargs,
    ) -> None:
        # nn.Conv2d's arguments are parsed once, by Conv2dBase; the signature
        # shown by help() and the docs is completed by Conv2dBase.__init_subclass__.
        super().__init__(*conv_args, **conv_kwargs)
        owner = type(self).__name__
        self.num_kernels = check_positive_int(num_kernels, "num_kernels", owner=owner)
        self.hidden = hidden_width(self.in_channels, reduction, min_hidden, owner=owner)
        self.reduction = float(reduction)
        self.min_hidden = int(min_hidden)
        self.temperature = temperature
        self.algorithm = check_bank_algorithm(algorithm, owner)
        self.keep_kernels = check_bool(keep_kernels, "keep_kernels", owner=owner)
        factory = self.factory_kwargs
        self.weight = self.kernel_bank(self.num_kernels)
        self.bias = self.bias_parameter(self.num_kernels)
        self.fc1 = nn.Linear(self.in_channels, self.hidden, bias=False, **factory)
        self.fc2 = nn.Linear(self.hidden, self.num_kernels, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every kernel and bias like ``nn.Conv2d``, the attention FCs
        like ``nn.Linear``, and ``fc2.bias`` to zero."""
        init_like_conv2d(self.weight, self.bias)
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        nn.init.zeros_(self.fc2.bias)

    def _options(self):
        yield "num_kernels", self.num_kernels, 4
        yield "reduction", self.reduction, 0.25
        yield "min_hidden", self.min_hidden, 4
        yield "temperature", self.temperature, 30.0
        yield "algorithm", self.algorithm, "auto"
        yield "keep_kernels", self.keep_kernels, False

    def _dynamic(self, x: Tensor) -> KernelAttention:
        return KernelAttention(
            kernel_attention(
                x, self.fc1.weight, self.fc2.weight, self.fc2.bias, self.temperature
            )
        )

    def _forward(self, x: Tensor) -> Tensor:
        (attention,) = self._dynamic(x)
        return bank_forward(
            self.pad(x),
            attention,
            self.weight,
            self.bias,
            self.stride,
            self.op_padding,
            self.dilation,
            self.groups,
            self.algorithm,
            self.keep_kernels,
        )

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Function-preserving start: a zero ``fc2`` gives the uniform attention
        ``1/n`` at any temperature, and the kernels are ``W`` plus zero-sum
        perturbations (:func:`refimpl._conv.spread_kernel`), so the aggregated
        kernel is ``W`` for every input."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.weight.copy_(spread_kernel(weight, self.weight, 1.0))
        if self.bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype).expand_as(self.bias))

    def _official_names(self):
        """The PyTorch port's ``Dynamic_conv2d`` (kaijieshi7/Dynamic-convolution-
        Pytorch): ``weight``, ``bias`` as here; ``attention.fc1.weight [h, C_in, 1,
        1]`` and ``attention.fc2.weight [n, h, 1, 1]``, ``attention.fc2.bias [n]``
        (1x1 convolutions, reshaped to the linear layers)."""
        k, h = self.num_kernels, self.hidden
        names = {
            "weight": ("weight", tuple(self.weight.shape)),
            "fc1.weight": ("attention.fc1.weight", (h, self.in_channels, 1, 1)),
            "fc2.weight": ("attention.fc2.weight", (k, h, 1, 1)),
            "fc2.bias": ("attention.fc2.bias", (k,)),
        }
        if self.bias is not None:
            names["bias"] = ("bias", (k, self.out_channels))
        return names
