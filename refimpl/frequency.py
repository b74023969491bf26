"""The frequency view of a kernel: spectra, frequency grids and band masks.

Chapter 1 introduces the vocabulary (a kernel is a filter with a frequency
response; box and Gaussian kernels are low-pass, Laplacian and Sobel kernels
suppress the lowest frequencies) and chapter 7 (FDConv) builds on it: FDConv
stores its weights as the spectrum of the reshaped ``(C_out k) x (C_in k)`` weight
matrix and modulates feature maps in square (Chebyshev) frequency bands, the
``square=True`` masks defined here.

Frequencies are in cycles per sample, in ``[-0.5, 0.5)`` along each axis, laid
out as ``torch.fft.fftfreq`` lays them out (DC first). ``centered=True`` moves
DC to the middle (``torch.fft.fftshift``), the layout for plots;
``onesided=True`` keeps the ``W // 2 + 1`` columns that ``torch.fft.rfft2``
returns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_float_tensor, check_positive_int, pair

__all__ = [
    "frequency_response",
    "frequency_grid",
    "radial_frequency",
    "band_mask",
    "gaussian_kernel",
    "classic_kernels",
    "spectral_similarity",
]


def frequency_response(
    kernel: Tensor,
    size: int | tuple[int, int] = (64, 64),
    centered: bool = True,
) -> Tensor:
    r"""Magnitude of the 2-D DFT of a kernel zero-padded to ``size``.

    .. math::

        |\hat W(u, v)| = \Bigl| \sum_{a, b} W[a, b]\,
        e^{-2\pi \mathrm{i} (u a / H + v b / W)} \Bigr|,

    with kernel taps ``(a, b)`` and frequency indices ``(u, v)``.

    Zero padding samples the kernel's continuous spectrum on a finer grid; it
    adds no information. The magnitude does not depend on where the kernel sits
    in the padded frame, so the origin convention does not matter. At DC
    (``u = v = 0``) the response is the sum of the weights: the gain on a
    constant image. Chapter 1 derives it; chapter 7 reuses it.

    Args:
        kernel: ``Tensor[..., kH, kW]``, floating point; leading dimensions (e.g.
            ``C_out, C_in``) are kept.
        size: DFT size ``(H, W)`` with ``H >= kH`` and ``W >= kW``, int or pair.
        centered: put DC in the middle (``fftshift``), the layout for plots;
            ``False`` keeps ``torch.fft.fft2``'s layout with DC at ``[0, 0]``.

    Returns:
        ``Tensor[..., H, W]``, real, in the kernel's dtype (half precision is
        transformed in float32).

    Raises:
        TypeError: if ``kernel`` is not a floating-point tensor or ``size`` is not
            an int or a pair of ints.
        ValueError: if ``kernel`` has fewer than 2 dimensions or is larger than
            ``size``.
    """
    owner = "frequency_response"
    check_float_tensor(kernel, "kernel", owner=owner)
    if kernel.dim() < 2:
        raise ValueError(
            f"{owner} expected kernel with at least 2 dimensions [..., kH, kW], got "
            f"{kernel.dim()} dimensions (shape {tuple(kernel.shape)})"
        )
    h, w = pair(size, "size", owner=owner)
    kh, kw = kernel.shape[-2:]
    if kh > h or kw > w:
        raise ValueError(
            f"{owner} expected size >= the kernel size ({kh}, {kw}), got {(h, w)}"
        )
    dtype = kernel.dtype
    if dtype in (torch.float16, torch.bfloat16):
        kernel = kernel.float()
    spectrum = torch.fft.fft2(kernel, s=(h, w)).abs()
    if centered:
        spectrum = torch.fft.fftshift(spectrum, dim=(-2, -1))
    return spectrum.to(dtype)


def frequency_grid(
    size: int | tuple[int, int],
    *,
    centered: bool = False,
    onesided: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Vertical and horizontal frequency of every DFT bin.

    Args:
        size: spatial size ``(H, W)`` of the signal, int or pair.
        centered: DC in the middle (``fftshift`` along both axes; along the
            vertical axis only when ``onesided``).
        onesided: only the ``W // 2 + 1`` non-negative horizontal frequencies, as
            ``torch.fft.rfft2`` returns them.
        device, dtype: of the result (default: the default float dtype).

    Returns:
        ``Tensor[2, H, W']`` holding ``(f_y, f_x)`` in cycles per sample, with
        ``W' = W`` or ``W // 2 + 1``.

    Raises:
        TypeError, ValueError: if ``size`` is not a positive int or pair.
    """
    h, w = pair(size, "size", owner="frequency_grid")
    dtype = dtype or torch.get_default_dtype()
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype)
    if onesided:
        fx = torch.fft.rfftfreq(w, device=device, dtype=dtype)
    else:
        fx = torch.fft.fftfreq(w, device=device, dtype=dtype)
    if centered:
        fy = torch.fft.fftshift(fy)
        if not onesided:
            fx = torch.fft.fftshift(fx)
    return torch.stack(torch.meshgrid(fy, fx, indexing="ij"))


def radial_frequency(
    size: int | tuple[int, int],
    *,
    square: bool = False,
    centered: bool = False,
    onesided: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Distance of every DFT bin from DC, in cycles per sample.

    ``sqrt(f_y**2 + f_x**2)`` (rings, up to about 0.707 in the corners), or with
    ``square=True`` the Chebyshev distance ``max(|f_y|, |f_x|)`` (squares, up to
    0.5), the band shape FDConv's frequency band modulation uses.

    Args:
        size: spatial size ``(H, W)``, int or pair.
        square: Chebyshev (square bands) instead of Euclidean (ring bands).
        centered, onesided, device, dtype: as in :func:`frequency_grid`.

    Returns:
        ``Tensor[H, W']``, ``W' = W`` or ``W // 2 + 1`` when ``onesided``.

    Raises:
        TypeError, ValueError: if ``size`` is not a positive int or pair.
    """
    fy, fx = frequency_grid(
        size, centered=centered, onesided=onesided, device=device, dtype=dtype
    )
    if square:
        return torch.maximum(fy.abs(), fx.abs())
    return torch.sqrt(fy**2 + fx**2)


def band_mask(
    size: int | tuple[int, int],
    low: float,
    high: float,
    *,
    square: bool = False,
    centered: bool = False,
    onesided: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask of the DFT bins with ``low <= radius < high``.

    The radius is :func:`radial_frequency` (Euclidean, or Chebyshev with
    ``square=True``) in cycles per sample. Bands with shared edges, e.g.
    ``[0, 0.1)``, ``[0.1, 0.25)``, ``[0.25, inf)``, partition the spectrum: every
    bin lies in exactly one. Multiply a spectrum by the mask to keep one band.

    Args:
        size: spatial size ``(H, W)``, int or pair.
        low: lower edge, ``>= 0`` (inclusive).
        high: upper edge, ``> low`` (exclusive); ``math.inf`` for "everything
            above ``low``".
        square, centered, onesided, device: as in :func:`radial_frequency`.

    Returns:
        ``Tensor[H, W']`` of dtype ``torch.bool``.

    Raises:
        TypeError: if ``low`` or ``high`` is not a real number.
        ValueError: unless ``0 <= low < high``.
    """
    owner = "band_mask"
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{owner} expected {name} to be a number, got {value!r}")
    if not 0 <= low < high:
        raise ValueError(
            f"{owner} expected 0 <= low < high, got low={low}, high={high}"
        )
    radius = radial_frequency(
        size,
        square=square,
        centered=centered,
        onesided=onesided,
        device=device,
        dtype=torch.float64,
    )
    return (radius >= low) & (radius < high)


def gaussian_kernel(
    size: int,
    sigma: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sampled 2-D Gaussian, normalised to sum 1 (unit gain at DC).

    Args:
        size: side length ``>= 1`` (odd sizes centre the peak on a pixel).
        sigma: standard deviation in pixels, ``> 0``.
        device, dtype: of the result (default: the default float dtype).

    Returns:
        ``Tensor[size, size]``.

    Raises:
        TypeError, ValueError: for a non-positive ``size`` or ``sigma``.
    """
    owner = "gaussian_kernel"
    size = check_positive_int(size, "size", owner=owner)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"{owner} expected sigma to be a number, got {sigma!r}")
    if not sigma > 0:
        raise ValueError(f"{owner} expected sigma > 0, got {sigma}")
    dtype = dtype or torch.get_default_dtype()
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def classic_kernels(
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Hand-designed kernels with well-known frequency responses.

    * ``"box"``: 3x3 mean, low-pass (DC gain 1, zeros at 1/3 cycle per sample);
    * ``"gaussian"``: 5x5, sigma 1, low-pass with no ripple;
    * ``"laplacian"``: 4-neighbour Laplacian, zero at DC, largest at the highest
      frequency: high-pass;
    * ``"sobel_x"``, ``"sobel_y"``: derivative along one axis times smoothing
      along the other; zero at DC and at the highest frequency of the derivative
      axis, so a band-pass that suppresses flat regions.

    Args:
        device, dtype: of the kernels (default: the default float dtype).

    Returns:
        ``dict`` mapping each name to a ``Tensor[kH, kW]``.
    """
    dtype = dtype or torch.get_default_dtype()

    def tensor(rows):
        return torch.tensor(rows, device=device, dtype=dtype)

    smooth, derivative = tensor([1.0, 2.0, 1.0]), tensor([-1.0, 0.0, 1.0])
    return {
        "box": torch.full((3, 3), 1 / 9, device=device, dtype=dtype),
        "gaussian": gaussian_kernel(5, 1.0, device=device, dtype=dtype),
        "laplacian": tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]),
        "sobel_x": smooth[:, None] * derivative[None, :],
        "sobel_y": derivative[:, None] * smooth[None, :],
    }


def spectral_similarity(
    bank: Tensor,
    size: int | tuple[int, int] | None = None,
    *,
    layout: str = "kernel",
) -> Tensor:
    r"""Pairwise cosine similarity of the magnitude spectra of a bank of kernels.

    Member ``i`` of ``bank`` is described by a non-negative vector
    :math:`s_i`, the magnitudes of its DFT bins, and the result is

    .. math::

        S_{ij} = \frac{\langle s_i, s_j\rangle}{\|s_i\|\,\|s_j\|}.

    Two members whose spectra occupy disjoint bins have similarity 0; members
    with the same magnitude spectrum (e.g. one a shifted or negated copy of
    the other) have similarity 1. Magnitudes of independent random kernels are
    far from orthogonal (about ``pi / 4`` for Gaussian weights), so compare a
    trained bank with a random one, not with 0.

    Two layouts of "spectrum" (chapter 7):

    * ``"kernel"``: every ``kH x kW`` filter of the member is transformed on
      its own, zero-padded to ``size`` (:func:`frequency_response`): the
      spatial frequency response that CondConv's and DynamicConv's kernels
      are usually compared by;
    * ``"matrix"``: the member ``[C_out, C_in, kH, kW]`` is reshaped to the
      matrix ``P[o kH + u, c kW + v] = W[o, c, u, v]`` and transformed by
      ``rfft2``: the spectrum in which FDConv's Fourier disjoint weight cuts
      its groups (``size`` is not used).

    Args:
        bank: ``Tensor[K, C_out, C_in, kH, kW]`` (``layout="kernel"`` also
            accepts any ``Tensor[K, ..., kH, kW]`` with at least 3 dimensions),
            floating point.
        size: DFT size for ``"kernel"`` (default: the kernel size itself).
        layout: ``"kernel"`` or ``"matrix"``.

    Returns:
        ``Tensor[K, K]``, symmetric, ones on the diagonal (for members that are
        not all zero), in float64.

    Raises:
        TypeError: if ``bank`` is not a floating-point tensor.
        ValueError: for an unknown ``layout`` or a bank of the wrong rank.
    """
    owner = "spectral_similarity"
    check_float_tensor(bank, "bank", owner=owner)
    if layout not in ("kernel", "matrix"):
        raise ValueError(
            f"{owner} expected layout 'kernel' or 'matrix', got {layout!r}"
        )
    bank = bank.double()
    if layout == "matrix":
        if bank.dim() != 5:
            raise ValueError(
                f"{owner} expected a bank [K, C_out, C_in, kH, kW] for layout "
                f"'matrix', got shape {tuple(bank.shape)}"
            )
        k, c_out, c_in, kh, kw = bank.shape
        matrix = bank.transpose(2, 3).reshape(k, c_out * kh, c_in * kw)
        spectra = torch.fft.rfft2(matrix).abs()
    else:
        if bank.dim() < 3:
            raise ValueError(
                f"{owner} expected a bank [K, ..., kH, kW] with at least 3 "
                f"dimensions, got shape {tuple(bank.shape)}"
            )
        spectra = frequency_response(
            bank, size if size is not None else tuple(bank.shape[-2:])
        )
    flat = spectra.reshape(spectra.shape[0], -1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.T
