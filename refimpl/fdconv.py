"""FDConv, frequency dynamic convolution: three parts, each usable and tested alone.

Chen, Gu, Li, Yan and Fu, "Frequency Dynamic Convolution for Dense Image
Prediction", CVPR 2025, arXiv:2503.18783; official code Linwei-Chen/FDConv
(``FDConv_detection/mmdet_custom/FDConv.py``). Chapter 7 of the book derives
everything in this module.

* :class:`FourierDisjointWeight` (FDW): one parameter budget stored as the 2-D
  spectrum of the weight reshaped to a ``(C_out*kH) x (C_in*kW)`` matrix, whose
  frequency bins are cut into ``n`` disjoint groups by their radius; each group,
  transformed back, is a kernel, and an attention mixes the ``n`` kernels.
* :class:`KernelSpatialModulation` (KSM): a global branch (ODConv-like: channel,
  filter, spatial and kernel attentions from the pooled input) and a local branch
  (a 1-D convolution along the channels giving a dense ``C_out x C_in x kH x kW``
  modulation).
* :class:`FrequencyBandModulation` (FBM): the input split into frequency bands,
  each band reweighted per pixel by a map computed from the input.

:class:`FDConv2d` composes them on the shared operator base:
``W_b = alpha_s * alpha_c * alpha_f * W_fdw,b * hr_b``, convolved with ``FBM(x)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import Conv2dBase, hidden_width, init_like_conv2d
from ._validation import (
    autocast_enabled,
    check_bool,
    check_positive_int,
    check_real,
)
from .per_sample import _per_sample_conv2d

__all__ = [
    "FDConv2d",
    "FDConvDynamic",
    "KSMAttentions",
    "apply_bands",
    "fdconv2d",
    "from_matrix",
    "to_matrix",
    "FourierDisjointWeight",
    "FrequencyBandModulation",
    "KernelSpatialModulation",
    "StarReLU",
    "band_masks",
    "fdconv_placement",
    "frequency_partition",
    "local_kernel_size",
    "lowpass_matrix",
    "fourier_basis",
]

# The official placement rule (Linwei-Chen/FDConv, FDConv.__init__ defaults):
# FDConv where min(C_in, C_out) > 16 and the kernel is 1x1 or 3x3; FBM on 3x3 only.
MIN_CHANNELS = 16
KERNEL_SIZES = (1, 3)
FBM_KERNEL_SIZES = (3,)
ORDERS = ("auto", "kernel", "io")


def _spectral_dtype(dtype: torch.dtype) -> torch.dtype:
    # FFTs in half precision are not supported on every device: upcast
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- Fourier disjoint weight ----------------------------------------------------------


def frequency_partition(
    height: int, width: int, groups: int, *, stable: bool = True, device=None
) -> Tensor:
    """The group of every bin of the real 2-D spectrum of a ``height x width`` matrix.

    ``torch.fft.rfft2`` of the matrix has ``height x (width // 2 + 1)`` bins; bin
    ``(i, j)`` has the frequencies ``fftfreq(height)[i]`` and
    ``rfftfreq(width)[j]`` and the L2 radius ``sqrt(f_i**2 + f_j**2)`` (as the
    official ``get_fft2freq``). Sorted by radius, low to high, the bins are cut
    into ``groups`` consecutive chunks: equal ones when ``groups`` divides the
    number of bins (the official code requires it), else the first chunks one bin
    larger.

    Radii tie massively (every ``+f`` has a ``-f``), so the order of tied bins
    decides which group a boundary bin joins. ``stable=True`` keeps tied bins in
    row-major order, the same on every device. The official code sorts with
    ``torch.sort``, whose order of ties is not specified (it differs from the
    stable one in a few bins); load the official order with
    :meth:`FourierDisjointWeight.load_official_indices` for bit-level parity.

    Returns:
        ``Tensor[height, width // 2 + 1]`` of ``int64`` group ids in ``[0, groups)``.
    """
    owner = "frequency_partition"
    height = check_positive_int(height, "height", owner=owner)
    width = check_positive_int(width, "width", owner=owner)
    groups = check_positive_int(groups, "groups", owner=owner)
    cols = width // 2 + 1
    if groups > height * cols:
        raise ValueError(
            f"{owner} expected at most {height * cols} groups (the bins of a "
            f"{height} x {width} real spectrum), got {groups}"
        )
    fh = torch.fft.fftfreq(height, dtype=torch.float32)
    fw = torch.fft.rfftfreq(width, dtype=torch.float32)
    # the official radius, computed as it does (float32 norm of the pair)
    radius = torch.stack(torch.meshgrid(fh, fw, indexing="ij"), -1).norm(dim=-1)
    order = torch.sort(radius.flatten(), stable=stable).indices
    sizes = [len(chunk) for chunk in torch.tensor_split(order, groups)]
    group = torch.empty(height * cols, dtype=torch.int64)
    group[order] = torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes))
    return group.reshape(height, cols).to(device)


def to_matrix(weight: Tensor) -> Tensor:
    """``Tensor[..., C_out, C_in, kH, kW] -> Tensor[..., C_out*kH, C_in*kW]`` with
    ``P[o*kH + u, c*kW + v] = W[o, c, u, v]`` (the official reshape)."""
    *lead, c_out, c_in, kh, kw = weight.shape
    return weight.transpose(-3, -2).reshape(*lead, c_out * kh, c_in * kw)


def from_matrix(matrix: Tensor, c_out: int, c_in: int, kh: int, kw: int) -> Tensor:
    """The inverse of :func:`to_matrix`."""
    lead = matrix.shape[:-2]
    return matrix.reshape(*lead, c_out, kh, c_in, kw).transpose(-3, -2)


class FourierDisjointWeight(nn.Module):
    """Fourier Disjoint Weight (FDW): ``n`` kernels from one spectrum, mixed per sample.

    The weight ``W0: Tensor[C_out, C_in, kH, kW]`` is reshaped to the matrix ``P``
    (:func:`to_matrix`), transformed by ``rfft2`` and stored, divided by
    ``m = min(C_out, C_in) // 2`` (at least 1), as the parameter ``dft_weight:
    Tensor[R, C_out*kH, C_in*kW // 2 + 1, 2]`` (real and imaginary parts, ``R =
    param_ratio`` copies): the official layout. The persistent buffer
    ``partition`` assigns every bin to one of ``n`` groups
    (:func:`frequency_partition`). For attentions ``a: Tensor[N, R*n]`` the kernel of
    sample ``b`` is::

        W[b] = irfft2( sum_{r, j} a[b, r*n + j] * alpha * 1_{G_j} * Theta_r )

    with ``alpha = m * n * R / param_reduction``; since ``irfft2`` is linear, FDW is
    a dynamic convolution over the ``R*n`` fixed kernels of :meth:`basis`, whose
    spectra are disjoint. At the uniform attention ``1 / (R*n)`` the kernel is
    ``W0`` (chapter 7 proves it).

    Deviations from the official storage: ``R > 1`` copies are stored divided by
    ``R`` so that the initial weight is ``W0`` (the official one starts at
    ``R * W0``; an official checkpoint loads as stored); ``n`` need not divide the
    number of bins; an odd ``C_in * kW`` works (``irfft2`` is given the width);
    ``param_reduction < 1`` (the official sparse storage) is not offered.
    """

    def __init__(
        self,
        out_channels: int,
        in_channels: int,
        kernel_size: tuple[int, int],
        num_kernels: int = 4,
        param_ratio: int = 1,
        param_reduction: float = 1.0,
        *,
        stable: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.out_channels = check_positive_int(
            out_channels, "out_channels", owner=owner
        )
        self.in_channels = check_positive_int(in_channels, "in_channels", owner=owner)
        self.kernel_size = tuple(kernel_size)
        self.num_kernels = check_positive_int(num_kernels, "num_kernels", owner=owner)
        self.param_ratio = check_positive_int(param_ratio, "param_ratio", owner=owner)
        self.param_reduction = check_real(
            param_reduction, "param_reduction", owner=owner, minimum=1.0, strict=False
        )
        kh, kw = self.kernel_size
        self.height, self.width = out_channels * kh, in_channels * kw
        self.divisor = max(min(out_channels, in_channels) // 2, 1)
        self.alpha = (
            self.divisor * self.num_kernels * self.param_ratio / self.param_reduction
        )
        cols = self.width // 2 + 1
        self.stable = check_bool(stable, "stable", owner=owner)
        self.dft_weight = nn.Parameter(
            torch.empty(param_ratio, self.height, cols, 2, device=device, dtype=dtype)
        )
        self.register_buffer(
            "partition",
            torch.empty(self.height, cols, dtype=torch.int64, device=device),
        )
        self.reset_partition()

    def reset_partition(self) -> None:
        """Recompute ``partition`` (:func:`frequency_partition`), e.g. after
        ``to_empty``."""
        if self.partition.device.type == "meta":
            return
        with torch.no_grad():
            self.partition.copy_(
                frequency_partition(
                    self.height, self.width, self.num_kernels, stable=self.stable
                )
            )

    def set_weight(self, weight: Tensor) -> None:
        """Store ``weight: Tensor[C_out, C_in, kH, kW]`` so that the uniform
        attention gives it back exactly (up to FFT round-off)."""
        with torch.no_grad():
            matrix = to_matrix(weight.to(_spectral_dtype(weight.dtype)))
            spectrum = torch.fft.rfft2(matrix)
            stored = torch.view_as_real(spectrum) / (self.divisor * self.param_ratio)
            self.dft_weight.copy_(stored.expand_as(self.dft_weight))

    def kernels(self, attention: Tensor) -> Tensor:
        """``Tensor[N, R*n] -> Tensor[N, C_out, C_in, kH, kW]``, the mixed kernels.

        Every bin takes the attention of its group (a gather, no scatter loop),
        so the mixed spectrum costs one pass over the bins per sample and one
        inverse FFT per sample, in float32 (float64 for float64 parameters).
        """
        n = attention.shape[0]
        kh, kw = self.kernel_size
        if n == 0:  # (no FFT of an empty batch) still a graph to the parameter
            shape = (0, self.out_channels, self.in_channels, kh, kw)
            return attention.new_zeros(shape) + self.dft_weight.sum() * 0
        dtype = _spectral_dtype(self.dft_weight.dtype)
        weights = attention.to(dtype).reshape(n, self.param_ratio, self.num_kernels)
        per_bin = weights[:, :, self.partition]  # [N, R, rows, cols]
        theta = self.dft_weight.to(dtype)
        real = (per_bin * theta[..., 0]).sum(1) * self.alpha
        imag = (per_bin * theta[..., 1]).sum(1) * self.alpha
        matrix = torch.fft.irfft2(
            torch.complex(real, imag), s=(self.height, self.width)
        )
        kernels = from_matrix(matrix, self.out_channels, self.in_channels, kh, kw)
        return kernels.to(self.dft_weight.dtype)

    def basis(self) -> Tensor:
        """``Tensor[R*n, C_out, C_in, kH, kW]``: the fixed kernels FDW mixes.

        Kernel ``r*n + j`` is ``alpha * irfft2(1_{G_j} * Theta_r)``; their spectra
        are disjoint, and :meth:`kernels` is ``sum_i a[:, i] * basis()[i]``.
        """
        count = self.param_ratio * self.num_kernels
        eye = torch.eye(count, device=self.dft_weight.device)
        return self.kernels(eye)

    def load_official_indices(self, indices: Tensor) -> None:
        """Use the partition of an official ``FDConv`` (its ``indices`` buffer).

        ``indices: Tensor[R, 2, n, bins / n]`` holds, for each group, the (row,
        column) of its bins, as the official ``convert2dftweight`` builds it (the
        buffer is not saved in official state dicts: read it from the module).
        """
        owner = f"{type(self).__name__}.load_official_indices"
        cols = self.width // 2 + 1
        bins = self.height * cols
        n = self.num_kernels
        expected = (self.param_ratio, 2, n, bins // n)
        if not isinstance(indices, Tensor) or tuple(indices.shape) != expected:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else indices
            raise ValueError(
                f"{owner} expected indices of shape [R, 2, n, bins / n] = {expected}, "
                f"got {shape}"
            )
        first = indices[0]
        if not all(torch.equal(first, copy) for copy in indices):
            raise ValueError(f"{owner} expected the same partition for every copy")
        group = torch.full((self.height, cols), -1, dtype=torch.int64)
        for j in range(n):
            group[first[0, j].long(), first[1, j].long()] = j
        if (group < 0).any():
            raise ValueError(f"{owner} expected the groups to cover every bin once")
        self.partition.copy_(group.to(self.partition.device))


# --- kernel spatial modulation --------------------------------------------------------


class StarReLU(nn.Module):
    """``scale * relu(x) ** 2 + bias`` with learnable scalars (init 1 and 0)."""

    def __init__(self, device=None, dtype=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.relu(x).square() + self.bias


def local_kernel_size(channels: int) -> int:
    """Kernel size of KSM's local 1-D convolution along ``channels`` (ECA's rule
    as the official code writes it): ``round(log2(C) / 2 + 0.5) // 2 * 2 + 1``,
    with Python's round (half to even); 5 for 64 channels."""
    return round(math.log2(channels) / 2 + 0.5) // 2 * 2 + 1


class KSMAttentions(NamedTuple):
    """What :class:`KernelSpatialModulation` predicts for a batch."""

    channel: Tensor
    """``Tensor[N, C_in]``, ``att_multi * sigmoid``."""
    filter: Tensor
    """``Tensor[N, C_out]``, ``att_multi * sigmoid``."""
    spatial: Tensor | None
    """``Tensor[N, kH, kW]`` (``None`` for a 1x1 kernel)."""
    kernel: Tensor
    """``Tensor[N, R*n]``, ``2 / (R*n) * sigmoid`` (all ones when ``R*n = 1``)."""
    local: Tensor | None
    """``Tensor[N, C_out, C_in, kH, kW]``, ``att_multi * sigmoid`` of the local
    branch (``None`` without it)."""


class KernelSpatialModulation(nn.Module):
    """Kernel Spatial Modulation (KSM): global attentions and a dense local one.

    Global branch, from the pooled input ``g = GAP(x): Tensor[N, C_in]``: ``a =
    StarReLU(BN(fc(g)))`` (``fc`` without bias, width ``max(floor(C_in *
    reduction), min_hidden)``), then four heads with bias: channel (``C_in``),
    filter (``C_out``) and spatial (``kH*kW``) as ``att_multi * sigmoid(z / t)``,
    and the kernel attention ``2 / (R*n) * sigmoid(z / t_k)``, a scaled sigmoid,
    not a softmax (it does not sum to 1). Local branch: ``LayerNorm(g)``, a
    ``Conv1d(1, C_out*kH*kW, ks)`` sliding along the channel axis
    (:func:`local_kernel_size`), ``att_multi * sigmoid``; output channel
    ``o*kH*kW + u*kW + v`` at position ``c`` modulates ``W[o, c, u, v]``.

    Initialisation as the official code: every head's weight ``N(0, 1e-6)`` and
    bias 0, so the attentions start at 1 (kernel: ``1/(R*n)``); the trunk
    Kaiming-normal (fan-out); the local convolution constant ``1e-6``. The filter
    head is the exception: the official guard that should re-initialise it tests
    a bound method against ``nn.Conv2d`` and never fires, so it keeps
    Kaiming-normal and the filter attention does not start at 1.
    ``filter_init="intended"`` (default) gives it the ``N(0, 1e-6)`` of the other
    heads; ``"official"`` keeps the official behaviour.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        num_kernels: int,
        *,
        reduction: float = 0.0625,
        min_hidden: int = 16,
        att_multi: float = 2.0,
        temperature: float = 1.0,
        kernel_temperature: float = 1.0,
        local: bool = True,
        filter_init: str = "intended",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        factory = {"device": device, "dtype": dtype}
        self.kernel_size = tuple(kernel_size)
        self.num_kernels = num_kernels
        self.hidden = hidden_width(in_channels, reduction, min_hidden, owner=owner)
        self.att_multi = check_real(att_multi, "att_multi", owner=owner, minimum=0.0)
        self.temperature = check_real(
            temperature, "temperature", owner=owner, minimum=0.0
        )
        self.kernel_temperature = check_real(
            kernel_temperature, "kernel_temperature", owner=owner, minimum=0.0
        )
        if filter_init not in ("intended", "official"):
            raise ValueError(
                f"{owner} expected filter_init 'intended' or 'official', got "
                f"{filter_init!r}"
            )
        self.filter_init = filter_init
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.fc = nn.Linear(in_channels, self.hidden, bias=False, **factory)
        self.bn = nn.BatchNorm1d(self.hidden, **factory)
        self.act = StarReLU(**factory)
        self.channel_fc = nn.Linear(self.hidden, in_channels, **factory)
        self.filter_fc = nn.Linear(self.hidden, out_channels, **factory)
        self.spatial_fc = nn.Linear(self.hidden, taps, **factory) if taps > 1 else None
        self.kernel_fc = (
            nn.Linear(self.hidden, num_kernels, **factory) if num_kernels > 1 else None
        )
        self.local = check_bool(local, "local", owner=owner)
        if self.local:
            size = local_kernel_size(in_channels)
            self.local_norm = nn.LayerNorm(in_channels, **factory)
            self.local_conv = nn.Conv1d(
                1,
                out_channels * taps,
                size,
                padding=(size - 1) // 2,
                bias=False,
                **factory,
            )
        self.reset_parameters()

    def _heads(self):
        return [
            m
            for m in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc)
            if m is not None
        ]

    def reset_parameters(self) -> None:
        """The official initialisation (see the class docstring)."""
        with torch.no_grad():
            for layer in (self.fc, *self._heads()):
                nn.init.kaiming_normal_(
                    layer.weight, mode="fan_out", nonlinearity="relu"
                )
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            self.bn.reset_parameters()
            self.bn.reset_running_stats()
            self.act.scale.fill_(1.0)
            self.act.bias.fill_(0.0)
            small = [self.channel_fc, self.spatial_fc, self.kernel_fc]
            if self.filter_init == "intended":
                small.append(self.filter_fc)
            for layer in small:
                if layer is not None:
                    nn.init.normal_(layer.weight, std=1e-6)
            if self.local:
                self.local_norm.reset_parameters()
                nn.init.constant_(self.local_conv.weight, 1e-6)

    def zero_(self) -> None:
        """Every attention exactly at its start value (1; kernels ``1/(R*n)``)."""
        with torch.no_grad():
            for layer in self._heads():
                layer.weight.zero_()
                layer.bias.zero_()
            if self.local:
                self.local_conv.weight.zero_()

    def forward(self, pooled: Tensor) -> KSMAttentions:
        """``pooled: Tensor[N, C_in]`` (the input averaged over its pixels)."""
        n = pooled.shape[0]
        t, m = self.temperature, self.att_multi
        a = self.act(self.bn(self.fc(pooled)))
        channel = torch.sigmoid(self.channel_fc(a) / t) * m
        filt = torch.sigmoid(self.filter_fc(a) / t) * m
        spatial = None
        if self.spatial_fc is not None:
            spatial = torch.sigmoid(self.spatial_fc(a) / t) * m
            spatial = spatial.reshape(n, *self.kernel_size)
        if self.kernel_fc is not None:
            z = self.kernel_fc(a) / self.kernel_temperature
            kernel = torch.sigmoid(z) * (2.0 / self.num_kernels)
        else:
            kernel = pooled.new_ones(n, 1)
        local = None
        if self.local:
            logits = self.local_conv(self.local_norm(pooled).unsqueeze(1))
            c_in = pooled.shape[1]
            kh, kw = self.kernel_size
            # [N, C_out*kH*kW, C_in] -> [N, C_out, C_in, kH, kW]
            c_out = self.local_conv.out_channels // (kh * kw)
            logits = logits.reshape(n, c_out, kh, kw, c_in).permute(0, 1, 4, 2, 3)
            local = torch.sigmoid(logits) * m
        return KSMAttentions(channel, filt, spatial, kernel, local)


# --- frequency band modulation --------------------------------------------------------


def _fftfreq(n: int, dtype) -> Tensor:
    # torch.fft.fftfreq written out (ONNX has no such operator; this folds away)
    i = torch.arange(n, dtype=torch.int64)
    return (torch.where(i < (n + 1) // 2, i, i - n)).to(dtype) / n


def _rfftfreq(n: int, dtype) -> Tensor:
    return torch.arange(n // 2 + 1, dtype=torch.int64).to(dtype) / n


def band_masks(
    height: int,
    width: int,
    k_list=(2, 4, 8),
    *,
    official: bool = False,
    device=None,
) -> Tensor:
    """Square (L-infinity) low-pass masks on the ``rfft2`` grid of an image.

    Mask ``b`` keeps the bins with ``max(|f_y|, |f_x|) < 0.5 / k_b + 1e-8``
    (frequencies in cycles per pixel, ``fftfreq(height)`` by ``rfftfreq(width)``),
    so for ``k_list = (2, 4, 8)`` the band edges are 1/4, 1/8 and 1/16.

    ``official=False`` (default) computes the masks at this size in float64, where
    the ``1e-8`` keeps the edge bins. ``official=True`` reproduces the official
    ``FrequencyBandModulation``: masks computed once on a 64 x 64 grid in
    float32 (where ``0.25 + 1e-8`` rounds to ``0.25``, so the 1/4 edge is left
    out while 1/8 and 1/16 are kept) and resized to this grid by nearest
    neighbour, which moves the edges at most sizes other than 64 x 64.

    Returns:
        ``Tensor[len(k_list), height, width // 2 + 1]`` of bools.
    """
    if official:
        fy, fx = _fftfreq(64, torch.float32), _rfftfreq(64, torch.float32)
    else:
        fy, fx = _fftfreq(height, torch.float64), _rfftfreq(width, torch.float64)
    grid = torch.maximum(fy.abs()[:, None], fx.abs()[None, :])
    masks = torch.stack([grid < 0.5 / k + 1e-8 for k in k_list])
    if official:
        resized = F.interpolate(
            masks[:, None].float(), size=(height, width // 2 + 1), mode="nearest"
        )
        masks = resized[:, 0] > 0.5
    return masks.to(device)


class FrequencyBandModulation(nn.Module):
    """Frequency Band Modulation (FBM): reweight the input's frequency bands per pixel.

    With ``X = rfft2(x, norm="ortho")``, the low-pass images ``L_b = irfft2(X *
    M_b)`` (:func:`band_masks`, ``L_0 = x``) split ``x`` into the bands ``L_{b-1}
    - L_b`` and the lowest band ``L_B``; each band ``b`` is multiplied by a map
    ``A_b = 2 * sigmoid(conv_b(x)): Tensor[N, 1, H, W]`` (a 3x3 convolution
    ``C_in -> 1`` of the input, one map shared by the channels), and the lowest
    band passes unmodulated::

        FBM(x) = sum_b A_b * (L_{b-1} - L_b) + L_B

    The convolutions start at ``N(0, 1e-6)`` weights and zero bias, so every
    ``A_b`` is 1 (to 1e-6) and the bands telescope back to ``x``: FBM starts as the
    identity. The FFTs run in float32 (float64 for float64 input) and the result
    is returned in the input's dtype (the official module returns float32).
    """

    def __init__(
        self,
        in_channels: int,
        k_list=(2, 4, 8),
        *,
        masks: str = "exact",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.k_list = tuple(
            check_positive_int(k, "k_list", owner=owner) for k in k_list
        )
        if masks not in ("exact", "official"):
            raise ValueError(
                f"{owner} expected masks 'exact' or 'official', got {masks!r}"
            )
        self.masks = masks
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, 1, 3, padding=1, device=device, dtype=dtype)
            for _ in self.k_list
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for conv in self.convs:
                nn.init.normal_(conv.weight, std=1e-6)
                nn.init.zeros_(conv.bias)

    def band_weights(self, x: Tensor) -> Tensor:
        """``Tensor[N, B, H, W]``: the map ``A_b`` of every modulated band."""
        # The B convolutions C_in -> 1 as one product: project every pixel on
        # the B * 9 (band, tap) filters, Tensor[N, B*9, H, W], then add the nine
        # shifted taps of each band (a convolution with few output channels is
        # slow in the CPU libraries).
        weight = torch.cat([conv.weight for conv in self.convs])  # [B, C, 3, 3]
        bias = torch.cat([conv.bias for conv in self.convs])
        bands, c = weight.shape[:2]
        taps = weight.permute(0, 2, 3, 1).reshape(bands * 9, c)
        n, _, h, w = x.shape
        projected = torch.matmul(taps, x.reshape(n, c, h * w))
        padded = F.pad(projected.reshape(n, bands, 9, h, w), (1, 1, 1, 1))
        logits = bias.reshape(1, bands, 1, 1).to(padded.dtype)
        for u in range(3):
            for v in range(3):  # tap (u, v) reads pixel (y + u - 1, x + v - 1)
                logits = logits + padded[:, :, 3 * u + v, u : u + h, v : v + w]
        return 2 * torch.sigmoid(logits)

    def forward(self, x: Tensor) -> Tensor:
        return apply_bands(x, self.band_weights(x), self.k_list, self.masks)


def lowpass_matrix(size: int, k: int, dtype=torch.float64, device=None) -> Tensor:
    """The real ``size x size`` matrix of the ideal low-pass ``|f| < 0.5 / k + 1e-8``
    along one axis (circular): ``A = Re(F^-1 diag(m) F)``, i.e.
    ``A[a, b] = (1/size) * sum over kept f of cos(2 pi f (a - b))``.

    A square (L-infinity) mask is the product of two such 1-D masks, so the exact
    low-pass image of :func:`band_masks` is ``A_H @ x @ A_W`` (``A`` is
    symmetric): two matrix products, which export everywhere and beat the FFTs
    at feature-map sizes (chapter 7).
    """
    f = _fftfreq(size, torch.float64).abs()
    keep = (f < 0.5 / k + 1e-8).to(torch.float64)
    t = torch.arange(size, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(t, t) / size
    cos, sin = torch.cos(angle), torch.sin(angle)
    matrix = (cos * keep) @ cos.T + (sin * keep) @ sin.T
    return (matrix / size).to(dtype=dtype, device=device)


def fourier_basis(size: int, dtype=torch.float64, device=None):
    """An orthonormal real Fourier basis of ``R^size``, ordered by frequency.

    Returns ``(U, f)``: ``U: Tensor[size, size - 1 + size % 2]`` with columns the
    constant ``1 / sqrt(size)``, then ``sqrt(2 / size) * cos(2 pi j t / size)`` and
    ``sqrt(2 / size) * sin(2 pi j t / size)`` for ``j = 1, 2, ...`` below the
    Nyquist frequency (which no band of FBM keeps), and ``f``, the list of the
    frequencies ``j / size`` of the columns, non-decreasing. The ideal low-pass keeping
    ``|f| < c`` is ``U[:, :r] @ U[:, :r].T`` with ``r = (f < c).sum()``: the same
    matrix as :func:`lowpass_matrix`, in factored form.
    """
    t = torch.arange(size, dtype=torch.float64)
    columns = [torch.full((size,), 1 / math.sqrt(size), dtype=torch.float64)]
    freqs = [0.0]
    for j in range(1, (size + 1) // 2):
        angle = 2 * math.pi * j * t / size
        columns += [math.sqrt(2 / size) * torch.cos(angle)]
        columns += [math.sqrt(2 / size) * torch.sin(angle)]
        freqs += [j / size, j / size]
    basis = torch.stack(columns, 1).to(dtype=dtype, device=device)
    return basis, freqs


def apply_bands(x: Tensor, weights: Tensor, k_list, masks: str = "exact") -> Tensor:
    """``FBM(x)`` for given band maps ``weights: Tensor[N, len(k_list), H, W]``.

    Rewritten by summation by parts, with ``A_b`` the map of band ``b`` and
    ``A_{B+1} = 1``, the sum of the class docstring is
    ``A_1 * x + sum_b (A_{b+1} - A_b) * L_b``: one multiply-add per band.

    With exact masks the low-pass images come from the factored form of
    :func:`lowpass_matrix` (:func:`fourier_basis`): the coefficients of ``x`` on
    the kept frequencies of the widest band are computed once, and each band
    keeps a leading block of them (the masks are nested), so the cost is a few
    matrix products on small blocks. Official masks, which a nearest resize can
    make asymmetric in ``+-f`` (not separable), use ``rfft2`` / ``irfft2`` as the
    official code does.
    """
    h, w = x.shape[-2:]
    if x.shape[0] == 0:  # no FFT of an empty batch; keep the graph to the maps
        return x + weights.sum() * 0
    spectral = x.to(_spectral_dtype(x.dtype))
    maps = weights.to(spectral.dtype)
    count = len(k_list)
    if masks == "official":
        spectrum = torch.fft.rfft2(spectral, norm="ortho")
        cuts = band_masks(h, w, k_list, official=True, device=x.device)
        lows = [
            torch.fft.irfft2(spectrum * cuts[b], s=(h, w), norm="ortho")
            for b in range(count)
        ]
    else:
        dtype, device = spectral.dtype, x.device
        rows, fh = fourier_basis(h, dtype, device)
        cols, fw = fourier_basis(w, dtype, device)
        # how many leading columns each band keeps (plain Python: no data-
        # dependent sizes when the graph is exported)
        cut = [0.5 / k + 1e-8 for k in k_list]
        keep = [(sum(f < c for f in fh), sum(f < c for f in fw)) for c in cut]
        top_h, top_w = max(r for r, _ in keep), max(r for _, r in keep)
        # coefficients on the kept frequencies of the widest band
        coefficients = rows[:, :top_h].T @ spectral @ cols[:, :top_w]
        lows = [
            rows[:, :rh] @ coefficients[..., :rh, :rw] @ cols[:, :rw].T
            for rh, rw in keep
        ]
    out = maps[:, :1] * spectral
    for b in range(count):
        following = maps[:, b + 1 : b + 2] if b + 1 < count else 1.0
        out = torch.addcmul(out, following - maps[:, b : b + 1], lows[b])
    return out.to(x.dtype)


# --- the layer ------------------------------------------------------------------------


def fdconv_placement(name: str, conv: nn.Conv2d) -> bool:
    """The official placement rule, as a ``convert_conv2d`` predicate.

    FDConv where ``min(C_in, C_out) > 16``, the kernel is 1x1 or 3x3 and
    ``groups == 1`` (the official module silently stays an ``nn.Conv2d`` in the
    first two cases and fails in the third); chapter 7 and
    :func:`refimpl.models.fdconv_resnet50` use it.
    """
    return (
        min(conv.in_channels, conv.out_channels) > MIN_CHANNELS
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.kernel_size[0] in KERNEL_SIZES
        and conv.groups == 1
    )


class FDConvDynamic(NamedTuple):
    """The input-dependent part of :class:`FDConv2d` (arguments of
    :func:`fdconv2d`, in its order)."""

    band_weights: Tensor | None
    """``Tensor[N, B, H, W]``, FBM's band maps (``None`` without FBM)."""
    channel_attention: Tensor
    """``Tensor[N, C_in]``."""
    filter_attention: Tensor
    """``Tensor[N, C_out]``."""
    spatial_attention: Tensor | None
    """``Tensor[N, kH, kW]`` (``None`` for a 1x1 kernel)."""
    kernels: Tensor
    """``Tensor[N, C_out, C_in, kH, kW]``, FDW's kernels times the local modulation."""


def _resolve_order(order: str, c_in: int, c_out: int, taps: int, h: int, w: int):
    if order != "auto":
        return order
    # the official rule: modulate the kernel when it is smaller than the input
    # and output maps, else scale the input and output channels
    return "kernel" if c_out * c_in * taps < (c_in + c_out) * h * w else "io"


def fdconv2d(
    input: Tensor,
    band_weights: Tensor | None,
    channel_attention: Tensor,
    filter_attention: Tensor,
    spatial_attention: Tensor | None,
    kernels: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    k_list=(2, 4, 8),
    masks: str = "exact",
    order: str = "auto",
) -> Tensor:
    """FDConv on given dynamic tensors (zero padding): ``W_b * FBM(x)_b + bias``.

    ``W_b = spatial_b * channel_b * filter_b * kernels_b`` (broadcast over
    ``[C_out, C_in, kH, kW]``), convolved sample by sample
    (:func:`refimpl.per_sample.per_sample_conv2d`) with ``FBM(x)`` computed from
    ``band_weights`` (:func:`apply_bands`; skipped when ``None``). ``order="io"``
    scales the input channels and the output channels instead of the kernel (the
    same function by linearity; the official module switches by shape, as
    ``"auto"`` does).
    """
    from ._validation import check_float_tensor, pair

    owner = "fdconv2d"
    check_float_tensor(input, "input", owner=owner, ndim=4)
    check_float_tensor(kernels, "kernels", owner=owner, ndim=5)
    if order not in ORDERS:
        raise ValueError(f"{owner} expected order in {ORDERS}, got {order!r}")
    for name, t in (
        ("channel_attention", channel_attention),
        ("filter_attention", filter_attention),
        ("kernels", kernels),
    ):
        if t.dtype != input.dtype and not autocast_enabled(input.device.type):
            raise TypeError(
                f"{owner} expected {name} with the dtype of the input "
                f"({input.dtype}), got {t.dtype}"
            )
    n, c_in, h, w = input.shape
    if kernels.shape[0] != n or kernels.shape[2] != c_in:
        raise ValueError(
            f"{owner} expected kernels of shape [N, C_out, C_in, kH, kW] with N={n}, "
            f"C_in={c_in}, got {tuple(kernels.shape)}"
        )
    return _fdconv2d(
        input,
        band_weights,
        channel_attention,
        filter_attention,
        spatial_attention,
        kernels,
        bias,
        pair(stride, "stride", owner=owner),
        pair(padding, "padding", owner=owner, minimum=0),
        pair(dilation, "dilation", owner=owner),
        tuple(k_list),
        masks,
        order,
    )


def _fdconv2d(
    x,
    bands,
    channel,
    filt,
    spatial,
    kernels,
    bias,
    stride,
    padding,
    dilation,
    k_list,
    masks,
    order,
    pre_pad=None,
):
    if bands is not None:
        x = apply_bands(x, bands, k_list, masks)
    if pre_pad is not None:
        x = pre_pad(x)
    n, c_in, h, w = x.shape
    _, c_out, _, kh, kw = kernels.shape
    weight = kernels
    if spatial is not None:
        weight = weight * spatial[:, None, None]
    order = _resolve_order(order, c_in, c_out, kh * kw, h, w)
    if order == "kernel":
        weight = weight * channel[:, None, :, None, None]
        weight = weight * filt[:, :, None, None, None]
        biases = None if bias is None else bias.expand(n, c_out)  # one per sample
        return _per_sample_conv2d(x, weight, biases, stride, padding, dilation, 1)
    x = x * channel[:, :, None, None].to(x.dtype)
    out = _per_sample_conv2d(x, weight, None, stride, padding, dilation, 1)
    # (under autocast the convolution's dtype is the result's, as nn.Conv2d's)
    out = out * filt[:, :, None, None].to(out.dtype)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out


class FDConv2d(Conv2dBase):
    """Frequency dynamic convolution (FDConv): FDW kernels, KSM, FBM.

    Drop-in replacement for ``torch.nn.Conv2d`` (``groups=1``): for each sample,
    the kernel ``W_b = alpha_s * alpha_c * alpha_f * W_fdw,b * hr_b``
    (:class:`FourierDisjointWeight` mixed by KSM's kernel attention, modulated by
    :class:`KernelSpatialModulation`) convolves ``FBM(x)``
    (:class:`FrequencyBandModulation`, on 3x3 layers by default), plus the bias.
    Paper: Chen et al., "Frequency Dynamic Convolution for Dense Image
    Prediction", CVPR 2025, arXiv:2503.18783; chapter 7.

    Defaults are the official class's (Linwei-Chen/FDConv): ``num_kernels=4``
    (every published config uses 64), ``param_ratio=1``, ``reduction=0.0625`` with
    ``min_hidden=16``, ``att_multi=2``, temperatures 1 (no annealing), the local
    branch on, FBM with ``k_list=(2, 4, 8)`` on 3x3 kernels.

    The official module turns itself into a plain ``nn.Conv2d`` where
    ``min(C_in, C_out) <= 16`` or the kernel is not 1x1 or 3x3. Here that rule is
    a placement policy (:func:`fdconv_placement`, for ``convert_conv2d``): with
    ``placement="official"`` (default) constructing the layer there raises, and
    ``placement="any"`` builds FDConv anyway (the method is defined at any size).

    Deviations from the official code, each with the option restoring it where
    one exists:

    * the frequency partition uses a stable sort and is saved in the state dict
      (official: ``torch.sort``'s order of ties, rebuilt at construction; load it
      with ``load_official_state_dict(..., indices=...)``);
    * FBM masks are exact for every input size (``fbm_masks="official"``: the
      64 x 64 float32 grid, nearest-resized);
    * the filter head starts near zero like the other heads
      (``filter_init="official"``: Kaiming-normal, the official guard never fires);
    * FBM returns the input's dtype and every dtype works (official: FBM casts to
      float32); the FFTs run in float32 (float64 for float64) internally;
    * ``padding_mode`` is honoured (official: ignored on the FDConv path);
    * ``param_ratio > 1`` starts at ``W0`` (official: ``param_ratio * W0``);
    * any ``C_in * kW`` and any ``num_kernels`` up to the number of bins work
      (official: an even width and a divisor of the bins).

    Args:
        conv_args: ``nn.Conv2d``'s arguments; ``groups`` must be 1.
        num_kernels: ``n``, the frequency groups (official ``kernel_num``).
        param_ratio: ``R``, copies of the spectrum (kernels ``R * n``).
        param_reduction: divides the FDW scale (>= 1).
        reduction, min_hidden: width of KSM's global trunk.
        att_multi: the factor of every ``sigmoid`` attention (2).
        temperature, kernel_temperature: divide the attention logits (1).
        local: KSM's local branch.
        fbm: FBM on the input (``None``: on 3x3 kernels, the official rule).
        fbm_k_list: FBM's band divisors; edges at ``0.5 / k``.
        fbm_masks: ``"exact"`` or ``"official"`` (see :func:`band_masks`).
        partition: ``"stable"`` (default) or ``"unstable"`` (``torch.sort``).
        filter_init: ``"intended"`` or ``"official"``.
        order: ``"auto"`` (the official shape rule), ``"kernel"`` or ``"io"``.
        placement: ``"official"`` or ``"any"``.
        device, dtype: factory keyword arguments.

    Shapes:
        ``Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]``, as
        ``nn.Conv2d``.
    """

    def __init__(
        self,
        *conv_args,
        num_kernels: int = 4,
        param_ratio: int = 1,
        param_reduction: float = 1.0,
        reduction: float = 0.0625,
        min_hidden: int = 16,
        att_multi: float = 2.0,
        temperature: float = 1.0,
        kernel_temperature: float = 1.0,
        local: bool = True,
        fbm: bool | None = None,
        fbm_k_list: tuple[int, ...] = (2, 4, 8),
        fbm_masks: str = "exact",
        partition: str = "stable",
        filter_init: str = "intended",
        order: str = "auto",
        placement: str = "official",
        **conv_kwargs,
    ) -> None:
        super().__init__(*conv_args, **conv_kwargs)
        owner = type(self).__name__
        if self.groups != 1:
            raise ValueError(
                f"{owner} expected groups=1 (FDW transforms the whole C_out x C_in "
                f"weight; the official module fails too), got groups={self.groups}"
            )
        if placement not in ("official", "any"):
            raise ValueError(
                f"{owner} expected placement 'official' or 'any', got {placement!r}"
            )
        kh, kw = self.kernel_size
        if placement == "official" and not (
            min(self.in_channels, self.out_channels) > MIN_CHANNELS
            and kh == kw
            and kh in KERNEL_SIZES
        ):
            raise ValueError(
                f"{owner} expected min(in_channels, out_channels) > {MIN_CHANNELS} "
                f"and a 1x1 or 3x3 kernel (the official placement rule; there the "
                f"official module silently stays an nn.Conv2d), got "
                f"{self.in_channels} -> {self.out_channels} channels, kernel_size="
                f"{self.kernel_size}; pass placement='any' to build FDConv anyway"
            )
        if partition not in ("stable", "unstable"):
            raise ValueError(
                f"{owner} expected partition 'stable' or 'unstable', got {partition!r}"
            )
        if order not in ORDERS:
            raise ValueError(f"{owner} expected order in {ORDERS}, got {order!r}")
        self.placement, self.partition, self.order = placement, partition, order
        if fbm is None:
            fbm = kh == kw and kh in FBM_KERNEL_SIZES
        fbm = check_bool(fbm, "fbm", owner=owner)
        self.num_kernels = check_positive_int(num_kernels, "num_kernels", owner=owner)
        self.param_ratio = check_positive_int(param_ratio, "param_ratio", owner=owner)
        factory = self.factory_kwargs
        self.fdw = FourierDisjointWeight(
            self.out_channels,
            self.in_channels,
            self.kernel_size,
            num_kernels,
            param_ratio,
            param_reduction,
            stable=partition == "stable",
            **factory,
        )
        self.bias = self.bias_parameter()
        self.ksm = KernelSpatialModulation(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.num_kernels * self.param_ratio,
            reduction=reduction,
            min_hidden=min_hidden,
            att_multi=att_multi,
            temperature=temperature,
            kernel_temperature=kernel_temperature,
            local=local,
            filter_init=filter_init,
            **factory,
        )
        self.fbm = (
            FrequencyBandModulation(
                self.in_channels, fbm_k_list, masks=fbm_masks, **factory
            )
            if fbm
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: FDW from an ``nn.Conv2d``-initialised
        weight (and bias), KSM and FBM as their docstrings say."""
        weight = torch.empty(
            self.out_channels,
            self.in_channels,
            *self.kernel_size,
            device=self.fdw.dft_weight.device,
            dtype=self.fdw.dft_weight.dtype,
        )
        init_like_conv2d(weight, self.bias)
        if weight.device.type != "meta":
            self.fdw.set_weight(weight)
        self.fdw.reset_partition()
        self.ksm.reset_parameters()
        if self.fbm is not None:
            self.fbm.reset_parameters()

    def _parameter_dtype(self) -> torch.dtype | None:
        return self.fdw.dft_weight.dtype

    def _options(self):
        yield "num_kernels", self.num_kernels, 4
        yield "param_ratio", self.param_ratio, 1
        yield "fbm", self.fbm is not None, self.kernel_size in ((3, 3),)
        yield "partition", self.partition, "stable"
        yield "order", self.order, "auto"
        yield "placement", self.placement, "official"

    def _dynamic(self, x: Tensor) -> FDConvDynamic:
        att = self.ksm(x.mean(dim=(2, 3)))
        kernels = self.fdw.kernels(att.kernel)
        if att.local is not None:
            kernels = kernels * att.local
        bands = None if self.fbm is None else self.fbm.band_weights(x)
        return FDConvDynamic(bands, att.channel, att.filter, att.spatial, kernels)

    def _forward(self, x: Tensor) -> Tensor:
        bands, channel, filt, spatial, kernels = self._dynamic(x)
        fbm = self.fbm
        return _fdconv2d(
            x,
            bands,
            channel,
            filt,
            spatial,
            kernels,
            self.bias,
            self.stride,
            self.op_padding,
            self.dilation,
            fbm.k_list if fbm is not None else (),
            fbm.masks if fbm is not None else "exact",
            self.order,
            pre_pad=self.pad,
        )

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """FDW stores ``weight`` exactly; every head, the local convolution and
        FBM's convolutions are zeroed, so every attention is exactly 1 (the
        kernel attention ``1/(R*n)``, which mixes the groups back to ``weight``)
        and FBM is the identity (its bands telescope)."""
        self.fdw.set_weight(weight)
        self.ksm.zero_()
        if self.fbm is not None:
            for conv in self.fbm.convs:
                conv.weight.zero_()
                conv.bias.zero_()
        if self.bias is not None:
            self.bias.copy_(bias)

    def _official_names(self):
        """``FDConv`` of Linwei-Chen/FDConv: ``dft_weight`` and ``bias`` as here;
        ``KSM_Global.{fc,channel_fc,filter_fc,spatial_fc,kernel_fc}`` (1x1
        convolutions, reshaped to the linear layers), ``KSM_Global.bn``,
        ``KSM_Global.relu.{scale,bias}``, ``KSM_Local.{norm,conv}`` and
        ``FBM.freq_weight_conv_list.<b>``."""
        c_in, c_out = self.in_channels, self.out_channels
        hid = self.ksm.hidden
        names = {"fdw.dft_weight": ("dft_weight", tuple(self.fdw.dft_weight.shape))}
        if self.bias is not None:
            names["bias"] = ("bias", (c_out,))
        g = "KSM_Global"
        names["ksm.fc.weight"] = (f"{g}.fc.weight", (hid, c_in, 1, 1))
        for stat in ("weight", "bias", "running_mean", "running_var"):
            names[f"ksm.bn.{stat}"] = (f"{g}.bn.{stat}", (hid,))
        names["ksm.bn.num_batches_tracked"] = (f"{g}.bn.num_batches_tracked", ())
        names["ksm.act.scale"] = (f"{g}.relu.scale", (1,))
        names["ksm.act.bias"] = (f"{g}.relu.bias", (1,))
        for head in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc"):
            layer = getattr(self.ksm, head)
            if layer is not None:
                out = layer.out_features
                names[f"ksm.{head}.weight"] = (f"{g}.{head}.weight", (out, hid, 1, 1))
                names[f"ksm.{head}.bias"] = (f"{g}.{head}.bias", (out,))
        if self.ksm.local:
            conv = self.ksm.local_conv
            names["ksm.local_conv.weight"] = (
                "KSM_Local.conv.weight",
                tuple(conv.weight.shape),
            )
            names["ksm.local_norm.weight"] = ("KSM_Local.norm.weight", (c_in,))
            names["ksm.local_norm.bias"] = ("KSM_Local.norm.bias", (c_in,))
        if self.fbm is not None:
            for b in range(len(self.fbm.convs)):
                key = f"FBM.freq_weight_conv_list.{b}"
                names[f"fbm.convs.{b}.weight"] = (f"{key}.weight", (1, c_in, 3, 3))
                names[f"fbm.convs.{b}.bias"] = (f"{key}.bias", (1,))
        return names

    def load_official_state_dict(self, state_dict, indices: Tensor | None = None):
        """Load an official ``FDConv`` state dict, and its partition if given.

        ``indices`` is the official module's ``indices`` buffer (not in its state
        dict); with it, this layer reproduces the official layer's output (with
        ``fbm_masks="official"`` and ``filter_init`` irrelevant once loaded).
        """
        super().load_official_state_dict(state_dict)
        if indices is not None:
            self.fdw.load_official_indices(indices)
