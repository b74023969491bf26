"""Tests of refimpl.frequency: spectra of kernels, frequency grids, band masks."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl.frequency import (
    band_mask,
    classic_kernels,
    frequency_grid,
    frequency_response,
    gaussian_kernel,
    radial_frequency,
)

from conftest import randn


def _explicit_dft_magnitude(kernel: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """|sum_{u,v} w[u,v] exp(-2 pi i (mu u / H + nu v / W))| by the definition."""
    kh, kw = kernel.shape
    out = torch.zeros(h, w, dtype=torch.float64)
    for mu in range(h):
        for nu in range(w):
            re = im = 0.0
            for u in range(kh):
                for v in range(kw):
                    angle = -2 * math.pi * (mu * u / h + nu * v / w)
                    re += float(kernel[u, v]) * math.cos(angle)
                    im += float(kernel[u, v]) * math.sin(angle)
            out[mu, nu] = math.hypot(re, im)
    return out


def test_matches_explicit_dft_sum(device):
    kernel = randn(3, 2, seed=1)
    expected = _explicit_dft_magnitude(kernel, 6, 5)
    got = frequency_response(kernel.to(device), (6, 5), centered=False)
    torch.testing.assert_close(got.cpu(), expected)
    # centred: DC moves to (H // 2, W // 2), the fftshift convention
    centred = frequency_response(kernel.to(device), (6, 5), centered=True)
    torch.testing.assert_close(centred.cpu(), expected.roll((3, 2), dims=(0, 1)))


def test_leading_dimensions_and_int_size(device):
    kernels = randn(4, 3, 3, 3, seed=2, device=device)
    out = frequency_response(kernels, 8)
    assert out.shape == (4, 3, 8, 8) and out.device == kernels.device
    torch.testing.assert_close(out[2, 1], frequency_response(kernels[2, 1], (8, 8)))


def test_dc_gain_is_sum_of_weights():
    kernels = classic_kernels(dtype=torch.float64)
    for name, kernel in {**kernels, "random": randn(3, 4, seed=3)}.items():
        dc = frequency_response(kernel, (16, 16), centered=False)[0, 0]
        torch.testing.assert_close(dc, kernel.sum().abs(), msg=name)
    box = frequency_response(kernels["box"], 12, centered=True)
    assert box[6, 6] == pytest.approx(1.0)  # centred DC; the mean has unit gain


def test_parseval():
    kernel = randn(3, 3, seed=4)
    h, w = 7, 9
    energy = frequency_response(kernel, (h, w)).square().sum()
    torch.testing.assert_close(energy, h * w * kernel.square().sum())


def test_classic_kernel_shapes_of_spectra():
    k = classic_kernels(dtype=torch.float64)
    lap = frequency_response(k["laplacian"], 16, centered=False)
    # 2cos(wx) + 2cos(wy) - 4: zero at DC, |-8| at the highest frequency (pi, pi)
    assert lap[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert lap[8, 8] == pytest.approx(8.0)
    assert lap.argmax() == 8 * 16 + 8
    sobel = frequency_response(k["sobel_x"], 16, centered=False)
    # derivative along x: zero for every horizontal frequency 0 and 1/2
    assert sobel[:, 0].abs().max() < 1e-12 and sobel[:, 8].abs().max() < 1e-12
    torch.testing.assert_close(
        frequency_response(k["sobel_y"], 16), frequency_response(k["sobel_x"], 16).T
    )
    # low-pass: the Gaussian's response falls monotonically away from DC
    gauss = frequency_response(k["gaussian"], 32, centered=False)[0, :17]
    assert (gauss[1:] < gauss[:-1]).all() and gauss[0] == pytest.approx(1.0)
    # the 3-tap box has a zero at 1/3 cycle per sample
    box = frequency_response(k["box"], 12, centered=False)
    assert box[0, 4] == pytest.approx(0.0, abs=1e-12)


def test_gaussian_kernel():
    g = gaussian_kernel(5, 1.0, dtype=torch.float64)
    assert g.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(g, g.T)
    torch.testing.assert_close(g, g.flip(0))
    assert g.argmax() == 12
    ratio = g[2, 3] / g[2, 2]
    assert ratio.item() == pytest.approx(math.exp(-0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_kernels(dtype):
    kernel = randn(3, 3, seed=5)
    out = frequency_response(kernel.to(dtype), 8)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), frequency_response(kernel, 8), rtol=2e-2, atol=2e-2
    )


def test_frequency_grid_layouts(device):
    fy, fx = frequency_grid((4, 6), device=device, dtype=torch.float64)
    torch.testing.assert_close(
        fy[:, 0].cpu(), torch.tensor([0, 0.25, -0.5, -0.25], dtype=torch.float64)
    )
    torch.testing.assert_close(fx[0].cpu(), torch.fft.fftfreq(6, dtype=torch.float64))
    cy, cx = frequency_grid((4, 6), centered=True, dtype=torch.float64)
    assert cy[2, 3] == 0 and cx[2, 3] == 0
    oy, ox = frequency_grid((4, 6), onesided=True, dtype=torch.float64)
    assert ox.shape == (4, 4) and (ox >= 0).all()


def test_radial_frequency():
    r = radial_frequency((8, 8), dtype=torch.float64)
    assert r[0, 0] == 0 and r[4, 4] == pytest.approx(math.sqrt(0.5))
    sq = radial_frequency((8, 8), square=True, dtype=torch.float64)
    assert sq.max() == pytest.approx(0.5) and (sq <= r).all()
    one = radial_frequency((8, 9), onesided=True, dtype=torch.float64)
    full = radial_frequency((8, 9), dtype=torch.float64)
    torch.testing.assert_close(one, full[:, :5])
    centred = radial_frequency((8, 9), centered=True, dtype=torch.float64)
    assert centred[4, 4] == 0


@pytest.mark.parametrize("square", [False, True])
def test_band_masks_partition_the_spectrum(square, device):
    edges = [0.0, 0.1, 0.25, math.inf]
    masks = torch.stack(
        [
            band_mask((12, 10), lo, hi, square=square, device=device)
            for lo, hi in zip(edges[:-1], edges[1:])
        ]
    )
    assert masks.dtype == torch.bool and masks.device.type == device.type
    assert (masks.sum(0) == 1).all()
    assert masks[0, 0, 0]  # DC is in the lowest band
    # splitting a spectrum into bands and summing them gives the image back
    x = randn(12, 10, seed=6, device=device)
    spectrum = torch.fft.fft2(x)
    parts = [torch.fft.ifft2(spectrum * m).real for m in masks]
    torch.testing.assert_close(sum(parts), x)


def test_band_mask_low_pass_of_a_constant_and_rfft_layout():
    x = torch.ones(8, 8, dtype=torch.float64) * 3
    low = band_mask(8, 0, 0.01, onesided=True)
    assert low.shape == (8, 5) and low.sum() == 1
    torch.testing.assert_close(torch.fft.irfft2(torch.fft.rfft2(x) * low, s=(8, 8)), x)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: frequency_response([[1.0]]),
            TypeError,
            r"^frequency_response expected kernel to be a torch.Tensor, got list",
        ),
        (
            lambda: frequency_response(torch.ones(3, 3, dtype=torch.int64)),
            TypeError,
            r"^frequency_response expected kernel with a floating-point dtype, got "
            r"torch.int64",
        ),
        (
            lambda: frequency_response(torch.ones(3)),
            ValueError,
            r"^frequency_response expected kernel with at least 2 dimensions "
            r"\[..., kH, kW\], got 1",
        ),
        (
            lambda: frequency_response(torch.ones(5, 3), (4, 8)),
            ValueError,
            r"^frequency_response expected size >= the kernel size \(5, 3\), got "
            r"\(4, 8\)",
        ),
        (
            lambda: frequency_response(torch.ones(3, 3), 0),
            ValueError,
            r"^frequency_response expected size >= 1, got 0",
        ),
        (
            lambda: frequency_response(torch.ones(3, 3), 8.0),
            TypeError,
            r"^frequency_response expected size to be an int or a pair",
        ),
        (
            lambda: band_mask(8, 0.3, 0.2),
            ValueError,
            r"^band_mask expected 0 <= low < high, got low=0.3, high=0.2",
        ),
        (lambda: band_mask(8, -0.1, 0.2), ValueError, r"^band_mask expected 0 <= low"),
        (
            lambda: band_mask(8, "0", 0.2),
            TypeError,
            r"^band_mask expected low to be a number, got '0'",
        ),
        (
            lambda: radial_frequency(0),
            ValueError,
            r"^frequency_grid expected size >= 1, got 0",
        ),
        (
            lambda: gaussian_kernel(5, 0.0),
            ValueError,
            r"^gaussian_kernel expected sigma > 0, got 0.0",
        ),
        (
            lambda: gaussian_kernel(0, 1.0),
            ValueError,
            r"^gaussian_kernel expected size >= 1, got 0",
        ),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_spectral_similarity_by_definition():
    from refimpl.frequency import spectral_similarity

    bank = randn(3, 2, 2, 3, 3)
    sim = spectral_similarity(bank, 8)
    spectra = [frequency_response(b, 8).flatten() for b in bank]
    for i in range(3):
        for j in range(3):
            expected = spectra[i] @ spectra[j] / (spectra[i].norm() * spectra[j].norm())
            assert math.isclose(sim[i, j].item(), expected.item(), rel_tol=1e-12)
    assert sim.dtype == torch.float64 and sim.shape == (3, 3)
    assert torch.allclose(sim, sim.T)
    assert torch.allclose(sim.diag(), torch.ones(3, dtype=torch.float64))
    # default size: the kernel size itself
    assert torch.allclose(
        spectral_similarity(bank), spectral_similarity(bank, (3, 3)), atol=0
    )


def test_spectral_similarity_invariances_and_disjoint_spectra():
    from refimpl.frequency import spectral_similarity

    kernel = randn(1, 1, 3, 3)
    bank = torch.stack([kernel, -2 * kernel, kernel.flip(-2, -1)])
    # magnitudes ignore the sign, the scale and a 180-degree turn (conjugate)
    assert torch.allclose(spectral_similarity(bank, 16), torch.ones(3, 3).double())
    # in the matrix layout, a constant matrix (DC only) and a cosine along
    # the rows (two bins) have disjoint spectra
    u = torch.arange(6, dtype=torch.float64)
    cosine = torch.cos(2 * math.pi * u / 3)[:, None].expand(6, 6)
    members = torch.stack([torch.ones(6, 6, dtype=torch.float64), cosine])
    bank = members.reshape(2, 2, 3, 2, 3).transpose(2, 3)  # from the matrix
    sim = spectral_similarity(bank, layout="matrix")
    assert abs(sim[0, 1].item()) < 1e-12
    # zero-padded, the 3x3 pieces of the two members overlap in frequency
    assert spectral_similarity(bank, 8, layout="kernel")[0, 1] > 0.1


def test_spectral_similarity_of_random_kernels_is_about_pi_over_4():
    from refimpl.frequency import spectral_similarity

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(2, 64, 64, 3, 3, generator=g, dtype=torch.float64)
    for layout in ("kernel", "matrix"):
        sim = spectral_similarity(bank, 8, layout=layout)[0, 1].item()
        assert abs(sim - math.pi / 4) < 0.02, (layout, sim)


@pytest.mark.parametrize(
    "bank, kwargs, error, match",
    [
        (torch.ones(2, 3, 3, dtype=torch.int64), {}, TypeError, "expected bank"),
        (torch.ones(3, 3), {}, ValueError, "at least 3"),
        (torch.ones(2, 3, 3), {"layout": "matrix"}, ValueError, "for layout"),
        (torch.ones(2, 3, 3), {"layout": "rows"}, ValueError, "layout 'kernel'"),
    ],
)
def test_spectral_similarity_errors(bank, kwargs, error, match):
    from refimpl.frequency import spectral_similarity

    with pytest.raises(error, match=r"^spectral_similarity .*" + match):
        spectral_similarity(bank, **kwargs)
