"""FDConv (chapter 7): each part against a literal restatement in float64, the
init identities, the placement policy, and the layer against the official
``FDConv`` forward restated from an official state dict."""

from __future__ import annotations

import decimal
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refimpl.fdconv import (
    FDConv2d,
    FourierDisjointWeight,
    FrequencyBandModulation,
    KernelSpatialModulation,
    apply_bands,
    band_masks,
    fdconv2d,
    fdconv_placement,
    frequency_partition,
    from_matrix,
    local_kernel_size,
    to_matrix,
)
from refimpl.models import (
    PUBLISHED_FDCONV_EXTRA_PARAMS,
    count_parameters,
    fdconv_resnet50,
    is_bottleneck_conv,
)

from conftest import randn, tolerance

F64 = tolerance(torch.float64)


# --- Fourier disjoint weight ----------------------------------------------------------


def radii(height, width):
    """The L2 radius of every rfft2 bin, written out with numbers, not fftfreq."""
    out = torch.empty(height, width // 2 + 1, dtype=torch.float64)
    for i in range(height):
        fi = (i if i < (height + 1) // 2 else i - height) / height
        for j in range(width // 2 + 1):
            out[i, j] = math.hypot(fi, j / width)
    return out


@pytest.mark.parametrize("height, width, groups", [(12, 8, 4), (9, 12, 5), (6, 7, 3)])
def test_partition_cuts_the_bins_by_radius_into_disjoint_groups(height, width, groups):
    part = frequency_partition(height, width, groups)
    assert part.shape == (height, width // 2 + 1)
    r = radii(height, width)
    sizes = torch.bincount(part.flatten(), minlength=groups)
    assert sizes.sum() == part.numel() and sizes.max() - sizes.min() <= 1
    for g in range(groups - 1):  # low to high frequency, group after group
        assert r[part == g].max() <= r[part == g + 1].min() + 1e-7
    # stable: ties in row-major order, as a lexicographic sort says
    flat = r.flatten().to(torch.float32)
    order = sorted(range(flat.numel()), key=lambda i: (flat[i].item(), i))
    expected = torch.empty(flat.numel(), dtype=torch.int64)
    for g, chunk in enumerate(torch.tensor_split(torch.tensor(order), groups)):
        expected[chunk] = g
    assert torch.equal(part.flatten(), expected)


def test_unstable_partition_differs_only_among_equal_radii():
    stable = frequency_partition(48, 48, 8)
    unstable = frequency_partition(48, 48, 8, stable=False)
    r = radii(48, 48).to(torch.float32)
    for g in range(8):  # the same multiset of radii in every group
        a, b = r[stable == g].sort().values, r[unstable == g].sort().values
        assert torch.equal(a, b)


def test_matrix_reshape_is_the_official_index_map():
    w = randn(3, 4, 2, 5, seed=1)
    p = to_matrix(w)
    for o, c, u, v in [(0, 0, 0, 0), (2, 3, 1, 4), (1, 2, 0, 3)]:
        assert p[o * 2 + u, c * 5 + v] == w[o, c, u, v]
    assert torch.equal(from_matrix(p, 3, 4, 2, 5), w)


def literal_fdw(fdw: FourierDisjointWeight, attention):
    """FDW bin by bin: every bin takes alpha times the attention of its group."""
    n_samples = attention.shape[0]
    theta = torch.view_as_complex(fdw.dft_weight.detach().double().contiguous())
    rows, cols = fdw.partition.shape
    spectrum = torch.zeros(n_samples, rows, cols, dtype=torch.complex128)
    for b in range(n_samples):
        for i in range(rows):
            for j in range(cols):
                g = fdw.partition[i, j].item()
                for r in range(fdw.param_ratio):
                    a = attention[b, r * fdw.num_kernels + g]
                    spectrum[b, i, j] += a * fdw.alpha * theta[r, i, j]
    matrix = torch.fft.irfft2(spectrum, s=(fdw.height, fdw.width))
    c_out, c_in = fdw.out_channels, fdw.in_channels
    return from_matrix(matrix, c_out, c_in, *fdw.kernel_size)


@pytest.mark.parametrize(
    "c_out, c_in, k, n, ratio", [(4, 6, (3, 3), 4, 1), (5, 3, (1, 3), 3, 2)]
)
def test_fdw_kernels_equal_the_literal_mix_and_start_at_w0(c_out, c_in, k, n, ratio):
    fdw = FourierDisjointWeight(c_out, c_in, k, n, ratio, dtype=torch.float64)
    w0 = randn(c_out, c_in, *k, seed=2)
    fdw.set_weight(w0)
    uniform = torch.full((1, n * ratio), 1.0 / (n * ratio), dtype=torch.float64)
    torch.testing.assert_close(fdw.kernels(uniform)[0], w0, **F64)
    with torch.no_grad():  # away from the initial copies
        fdw.dft_weight.add_(randn(*fdw.dft_weight.shape, seed=3) * 0.1)
    att = randn(2, n * ratio, seed=4)
    ours = fdw.kernels(att)
    torch.testing.assert_close(ours, literal_fdw(fdw, att), **F64)
    basis = fdw.basis()
    torch.testing.assert_close(ours, torch.einsum("bi,i...->b...", att, basis), **F64)


def test_basis_spectra_are_disjoint_up_to_conjugate_pairs():
    fdw = FourierDisjointWeight(8, 6, (3, 3), 4, dtype=torch.float64)
    fdw.set_weight(randn(8, 6, 3, 3, seed=5))
    basis = fdw.basis()
    torch.testing.assert_close(basis.sum(0) / 4, randn(8, 6, 3, 3, seed=5), **F64)
    spectra = torch.fft.rfft2(to_matrix(basis)).abs()
    support = spectra > 1e-9 * spectra.max()
    # A real matrix has a conjugate-symmetric spectrum: in the first and the
    # Nyquist column, bin (i, j) and bin (-i, j) are one pair. A group holding
    # one bin of a pair without the other gives a kernel on both: the only
    # place where the groups can overlap.
    part = fdw.partition
    rows, cols = part.shape
    coupled = torch.zeros_like(support[0])
    for j in (0, cols - 1):
        partner = part[(-torch.arange(rows)) % rows, j]
        coupled[:, j] = part[:, j] != partner
    assert support.sum(0)[~coupled].max() == 1  # elsewhere no bin in two kernels
    for g in range(4):  # kernel g lives on group g (and partners of its bins)
        assert not support[g][(part != g) & ~coupled].any()
    assert support.any(0).all()


def test_official_indices_load_as_the_partition():
    fdw = FourierDisjointWeight(4, 4, (3, 3), 4)
    rows, cols = fdw.partition.shape
    other = frequency_partition(12, 12, 4, stable=False)
    # the official layout: for each group its (row, column) pairs, R copies
    per_group = [torch.nonzero(other == g).T for g in range(4)]
    indices = torch.stack(per_group, 1)[None]  # [1, 2, n, bins / n]
    fdw.load_official_indices(indices)
    assert torch.equal(fdw.partition, other)
    with pytest.raises(ValueError, match=r"expected indices of shape \[R, 2, n"):
        fdw.load_official_indices(indices[:, :, :3])


# --- kernel spatial modulation --------------------------------------------------------


def test_local_kernel_size_is_the_eca_rule_with_half_to_even():
    def rule(c):
        x = decimal.Decimal(math.log2(c) / 2 + 0.5)
        rounded = int(x.quantize(0, rounding=decimal.ROUND_HALF_EVEN))
        return rounded // 2 * 2 + 1

    assert [local_kernel_size(c) for c in (16, 64, 256, 1024)] == [3, 5, 5, 7]
    for c in (17, 32, 100, 128, 512, 2048):
        assert local_kernel_size(c) == rule(c)


@pytest.mark.parametrize("filter_init", ["intended", "official"])
def test_ksm_heads_start_at_one_except_the_official_filter(filter_init):
    torch.manual_seed(0)
    ksm = KernelSpatialModulation(32, 24, (3, 3), 4, filter_init=filter_init).eval()
    att = ksm(randn(5, 32, seed=6, dtype=torch.float32))
    assert att.channel.shape == (5, 32) and att.filter.shape == (5, 24)
    assert att.spatial.shape == (5, 3, 3) and att.kernel.shape == (5, 4)
    assert att.local.shape == (5, 24, 32, 3, 3)
    for t in (att.channel, att.spatial, att.local):
        assert (t - 1).abs().max() < 1e-3
    assert (att.kernel - 0.25).abs().max() < 1e-4  # 2 / n * sigmoid(0)
    far = (att.filter - 1).abs().max().item()
    assert (far < 1e-3) == (filter_init == "intended")


def test_ksm_ranges_and_the_local_branch_literally():
    torch.manual_seed(1)
    ksm = KernelSpatialModulation(10, 3, (3, 1), 6, min_hidden=4, dtype=torch.float64)
    for p in ksm.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    ksm.eval()
    pooled = randn(2, 10, seed=7)
    att = ksm(pooled)
    assert (att.kernel > 0).all() and (att.kernel < 2 / 6).all()
    for t in (att.channel, att.filter, att.spatial, att.local):
        assert (t > 0).all() and (t < 2).all()
    # local: output channel o*kH*kW + u*kW + v of a 1-D conv along the channels
    ln = F.layer_norm(pooled, (10,), ksm.local_norm.weight, ksm.local_norm.bias)
    w = ksm.local_conv.weight  # [C_out*kH*kW, 1, ks]
    ks = w.shape[-1]
    pad = (ks - 1) // 2
    for o, c, u in [(0, 0, 0), (2, 9, 2), (1, 4, 1)]:
        j = o * 3 + u
        total = sum(
            w[j, 0, t] * ln[:, c + t - pad] for t in range(ks) if 0 <= c + t - pad < 10
        )
        torch.testing.assert_close(att.local[:, o, c, u, 0], 2 * torch.sigmoid(total))


# --- frequency band modulation --------------------------------------------------------


def test_exact_masks_are_square_low_passes_and_official_ones_come_from_64():
    m = band_masks(10, 12)
    assert m.shape == (3, 10, 7) and m.dtype == torch.bool
    for b, k in enumerate((2, 4, 8)):
        for i in range(10):
            fi = abs((i if i < 5 else i - 10) / 10)
            for j in range(7):
                assert m[b, i, j] == (max(fi, j / 12) <= 0.5 / k)
    official = band_masks(64, 64, official=True)
    exact = band_masks(64, 64)
    # at 64 x 64 they differ only on the 1/4 edge, which float32 drops
    edge = torch.zeros_like(exact)
    fy = torch.fft.fftfreq(64).abs()[:, None]
    fx = torch.fft.rfftfreq(64)[None, :]
    edge[0] = torch.maximum(fy, fx) == 0.25
    assert torch.equal(exact ^ official, edge)
    assert not torch.equal(band_masks(56, 56, official=True), band_masks(56, 56))


def literal_bands(x, weights, k_list):
    """FBM with full complex FFTs and explicit masks: each band weighted."""
    h, w = x.shape[-2:]
    spectrum = torch.fft.fft2(x)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).abs()[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64).abs()[None, :]
    grid = torch.maximum(fy, fx)
    previous, out = x, 0
    for b, k in enumerate(k_list):
        low = torch.fft.ifft2(spectrum * (grid <= 0.5 / k)).real
        out = out + weights[:, b : b + 1] * (previous - low)
        previous = low
    return out + previous


@pytest.mark.parametrize("size", [(8, 8), (9, 14), (16, 11)])
def test_bands_equal_the_literal_split_and_telescope(size):
    x = randn(2, 3, *size, seed=8)
    weights = torch.rand(2, 3, *size, dtype=torch.float64) * 2
    torch.testing.assert_close(
        apply_bands(x, weights, (2, 4, 8)), literal_bands(x, weights, (2, 4, 8)), **F64
    )
    ones = torch.ones(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(apply_bands(x, ones, (2, 4, 8)), x, **F64)


def test_fbm_starts_as_the_identity_and_keeps_the_dtype():
    torch.manual_seed(2)
    fbm = FrequencyBandModulation(4)
    x = randn(2, 4, 12, 10, seed=9, dtype=torch.float32)
    torch.testing.assert_close(fbm(x), x, rtol=1e-4, atol=1e-4)
    assert fbm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^FrequencyBandModulation expected masks"):
        FrequencyBandModulation(4, masks="round")


# --- the layer ------------------------------------------------------------------------


def official_state(layer: FDConv2d) -> dict:
    """``layer``'s state under the official names and shapes (1x1 convolutions)."""
    out = {}
    state = layer.state_dict()
    for ours, (key, shape) in layer._official_names().items():
        out[key] = state[ours].reshape(shape).clone()
    return out


def official_forward(state, partition, x, c_out, k, n, fbm, padding, stride):
    """Linwei-Chen/FDConv ``FDConv.forward`` restated from its state dict (eval)."""
    b, c_in, h, w = x.shape
    g = "KSM_Global"
    pooled = x.mean((2, 3))
    a = F.linear(pooled, state[f"{g}.fc.weight"].flatten(1))
    a = F.batch_norm(
        a,
        state[f"{g}.bn.running_mean"],
        state[f"{g}.bn.running_var"],
        state[f"{g}.bn.weight"],
        state[f"{g}.bn.bias"],
    )
    a = state[f"{g}.relu.scale"] * F.relu(a) ** 2 + state[f"{g}.relu.bias"]

    def head(name):
        return F.linear(
            a, state[f"{g}.{name}.weight"].flatten(1), state[f"{g}.{name}.bias"]
        )

    ch = 2 * torch.sigmoid(head("channel_fc"))
    fi = 2 * torch.sigmoid(head("filter_fc"))
    sp = 2 * torch.sigmoid(head("spatial_fc")).reshape(b, k, k)
    ka = torch.sigmoid(head("kernel_fc")) * 2 / n
    ln = F.layer_norm(
        pooled, (c_in,), state["KSM_Local.norm.weight"], state["KSM_Local.norm.bias"]
    )
    conv = state["KSM_Local.conv.weight"]
    logits = F.conv1d(ln[:, None], conv, padding=(conv.shape[-1] - 1) // 2)
    hr = 2 * torch.sigmoid(logits.reshape(b, c_out, k, k, c_in).permute(0, 1, 4, 2, 3))
    theta = torch.view_as_complex(state["dft_weight"][0].contiguous())
    alpha = min(c_out, c_in) // 2 * n
    spectrum = alpha * ka[:, partition] * theta
    mats = torch.fft.irfft2(spectrum, s=(c_out * k, c_in * k))
    kernels = mats.reshape(b, c_out, k, c_in, k).permute(0, 1, 3, 2, 4)
    weight = sp[:, None, None] * ch[:, None, :, None, None] * fi[:, :, None, None, None]
    weight = weight * kernels * hr
    if fbm:
        maps = torch.cat(
            [
                2
                * torch.sigmoid(
                    F.conv2d(
                        x,
                        state[f"FBM.freq_weight_conv_list.{i}.weight"],
                        state[f"FBM.freq_weight_conv_list.{i}.bias"],
                        padding=1,
                    )
                )
                for i in range(3)
            ],
            1,
        )
        x = literal_bands(x, maps, (2, 4, 8))
    out = torch.cat(
        [
            F.conv2d(x[i : i + 1], weight[i], state["bias"], stride, padding)
            for i in range(b)
        ]
    )
    return out


@pytest.mark.parametrize(
    "c_in, c_out, stride, size, order",
    [(6, 4, 1, (9, 8), "kernel"), (4, 5, 2, (7, 10), "io"), (4, 4, 1, (6, 6), "auto")],
)
def test_layer_is_the_official_forward(c_in, c_out, stride, size, order):
    torch.manual_seed(3)
    kwargs = {"num_kernels": 3, "placement": "any", "order": order}
    layer = FDConv2d(c_in, c_out, 3, stride, 1, dtype=torch.float64, **kwargs)
    state = official_state(layer)
    g = torch.Generator().manual_seed(4)
    for key, value in state.items():
        if value.is_floating_point() and "running_var" not in key:
            value.copy_(
                torch.randn(value.shape, generator=g, dtype=torch.float64) * 0.4
            )
    fresh = FDConv2d(c_in, c_out, 3, stride, 1, dtype=torch.float64, **kwargs).eval()
    fresh.load_official_state_dict(state)
    x = randn(2, c_in, *size, seed=10)
    expected = official_forward(
        state, fresh.fdw.partition, x, c_out, 3, 3, True, 1, stride
    )
    torch.testing.assert_close(fresh(x), expected, **F64)
    round_trip = official_state(fresh)
    assert all(torch.equal(round_trip[k], v) for k, v in state.items())


def test_orders_agree_and_the_functional_checks_its_order():
    torch.manual_seed(4)
    kernel = FDConv2d(20, 24, 3, padding=1, order="kernel", dtype=torch.float64).eval()
    io = FDConv2d(20, 24, 3, padding=1, order="io", dtype=torch.float64).eval()
    io.load_state_dict(kernel.state_dict())
    x = randn(2, 20, 7, 7, seed=11)
    torch.testing.assert_close(kernel(x), io(x), **F64)
    with pytest.raises(ValueError, match=r"^fdconv2d expected order in"):
        fdconv2d(x, None, *kernel.dynamic_tensors(x)[1:], order="fast")


def test_placement_policy_and_errors():
    assert fdconv_placement("a", nn.Conv2d(32, 64, 3))
    assert fdconv_placement("a", nn.Conv2d(64, 32, 1))
    assert not fdconv_placement("a", nn.Conv2d(3, 64, 7))
    assert not fdconv_placement("a", nn.Conv2d(16, 64, 3))
    assert not fdconv_placement("a", nn.Conv2d(64, 64, 5))
    assert not fdconv_placement("a", nn.Conv2d(64, 64, 3, groups=2))
    cases = [
        ((16, 32, 3), {}, r"expected min\(in_channels, out_channels\) > 16"),
        ((32, 32, 5), {}, r"and a 1x1 or 3x3 kernel"),
        ((32, 32, 3), {"groups": 2}, r"expected groups=1"),
        ((32, 32, 3), {"placement": "all"}, r"expected placement 'official' or"),
        ((32, 32, 3), {"partition": "random"}, r"expected partition 'stable' or"),
        ((32, 32, 3), {"order": "fast"}, r"expected order in"),
        ((32, 32, 3), {"filter_init": "zero"}, r"expected filter_init 'intended'"),
        ((32, 32, 3), {"num_kernels": 0}, r"expected num_kernels >= 1, got 0"),
        ((32, 32, 3), {"param_reduction": 0.5}, r"expected param_reduction >= 1"),
        ((32, 32, 3), {"fbm": "yes"}, r"expected fbm to be a bool"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            FDConv2d(*args, **kwargs)
    assert FDConv2d(16, 32, 5, placement="any").fbm is None  # FBM on 3x3 only
    assert FDConv2d(32, 32, 3).fbm is not None


def test_fdconv_resnet50_adds_the_published_parameters():
    torch.manual_seed(0)
    model = fdconv_resnet50()
    layers = [m for m in model.modules() if isinstance(m, FDConv2d)]
    assert len(layers) == 48 and sum(m.fbm is not None for m in layers) == 16
    assert all(m.num_kernels == 64 for m in layers)
    assert type(model.conv1) is nn.Conv2d
    assert type(model.layer1[0].downsample[0]) is nn.Conv2d

    def official_layer(c_in, c_out, k):
        """Parameters of the official FDConv (bias=False, kernel_num=64),
        read off its modules."""
        a = max(int(c_in * 0.0625), 16)
        dft = c_out * k * (c_in * k // 2 + 1) * 2
        ksm = a * c_in + 2 * a + 2 + (a + 1) * (c_in + c_out + 64)
        if k > 1:
            ksm += (a + 1) * k * k
        local = c_out * k * k * local_kernel_size(c_in) + 2 * c_in
        fbm = 3 * (c_in * 9 + 1) if k == 3 else 0
        return dft + ksm + local + fbm

    extra = 0
    for name, module in model.named_modules():
        if isinstance(module, FDConv2d):
            assert is_bottleneck_conv(name, module)
            c_in, c_out, k = (
                module.in_channels,
                module.out_channels,
                module.kernel_size[0],
            )
            extra += official_layer(c_in, c_out, k) - c_out * c_in * k * k
    count = count_parameters(model)
    assert count == 25_557_032 + extra
    assert round((count - 25_557_032) / 1e6, 1) == PUBLISHED_FDCONV_EXTRA_PARAMS


def test_dtypes_fft_upcast_and_autocast():
    torch.manual_seed(5)
    layer = FDConv2d(20, 20, 3, padding=1).eval()
    x = randn(2, 20, 8, 8, seed=12, dtype=torch.float32)
    expected = layer(x)
    for dtype in (torch.float16, torch.bfloat16):
        out = layer.to(dtype)(x.to(dtype))
        assert out.dtype == dtype
        scale = expected.abs().max().item()
        assert (out.float() - expected).abs().max().item() < 5e-2 * scale
    layer = layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
