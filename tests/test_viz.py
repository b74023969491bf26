"""Tests of refimpl.viz: source display and the shared plotting helpers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display in tests; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from refimpl import viz  # noqa: E402
from refimpl.arithmetic import conv2d_loops, conv_output_size  # noqa: E402

ROLES = ["input", "zero padding", "kernel taps", "output", "current output"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_show_source_contains_the_def_line():
    markdown = viz.show_source(conv2d_loops).data
    assert markdown.startswith("```python\n") and markdown.endswith("\n```")
    assert "def conv2d_loops(" in markdown
    assert '"""2-D cross-correlation by its definition' in markdown  # docstring kept
    short = viz.show_source(conv2d_loops, docstring=False).data
    assert "def conv2d_loops(" in short and '"""' not in short
    assert "for o in range(c_out):" in short


def test_source_of_rejects_builtins():
    with pytest.raises(
        TypeError,
        match=r"^show_source expected a function, class or "
        r"method defined in Python source",
    ):
        viz.source_of(torch.conv2d)


def test_use_book_style_sets_rcparams():
    viz.use_book_style()
    for key, value in viz.BOOK_STYLE.items():
        current = matplotlib.rcParams[key]
        assert (tuple(current) if isinstance(value, tuple) else current) == value


def test_sliding_window_figure_has_legend_and_right_output_grid():
    fig = viz.plot_sliding_window(7, 3, stride=2, padding=1, position=(1, 2))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ROLES
    assert "7x7 -> 4x4" in ax.get_title()
    # one patch per padded input cell, kernel tap and output cell
    h_out = conv_output_size(7, 3, 2, 1)
    assert len(ax.patches) == 9 * 9 + 3 * 3 + h_out * h_out


def test_sliding_window_rejects_position_outside_output():
    with pytest.raises(
        ValueError,
        match=r"^plot_sliding_window expected position "
        r"inside the 3x3 output, got \(3, 0\)",
    ):
        viz.plot_sliding_window(5, 3, position=(3, 0))


def test_image_grid_titles_and_colorbars():
    images = {f"k{i}": torch.randn(3, 3) for i in range(5)}
    fig = viz.plot_image_grid(
        images,
        ncols=3,
        suptitle="kernels",
        label="weight",
        symmetric=True,
        annotate=True,
    )
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in visible] == list(images)
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "weight"]
    assert len(colorbars) == 5
    assert fig._suptitle.get_text() == "kernels"


def test_heatmap_rejects_non_2d():
    with pytest.raises(
        ValueError,
        match=r"^plot_heatmap expected 2-D data, got 3 "
        r"dimensions",
    ):
        viz.plot_heatmap(torch.zeros(2, 3, 3))


def test_role_handles_and_heatmap_axes():
    labels = [h.get_label() for h in viz.role_handles()]
    assert labels == ROLES
    fig = viz.plot_heatmap(
        torch.ones(4, 4),
        extent=(-0.5, 0.5, 0.5, -0.5),
        xlabel="f_x",
        ylabel="f_y",
        label="|K|",
        title="t",
    )
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("f_x", "f_y", "t")
    assert len(ax.get_xticks()) > 0  # with an extent the ticks stay
    assert fig.axes[1].get_ylabel() == "|K|"  # the colour bar


def test_pixel_filters_marks_pixels_and_draws_their_filters():
    k, h, w = 3, 6, 7
    filters = torch.arange(k * k * h * w, dtype=torch.float64).reshape(k * k, h, w)
    pixels = [(0, 0), (2, 5), (5, 6)]
    fig = viz.plot_pixel_filters(torch.zeros(h, w), filters, pixels, suptitle="s")
    image_ax, *filter_axes = fig.axes[: 1 + len(pixels)]
    marks = [t.get_text() for t in image_ax.texts]
    assert marks == ["1", "2", "3"]
    assert [ax.get_title() for ax in filter_axes] == [
        "1: (0, 0)",
        "2: (2, 5)",
        "3: (5, 6)",
    ]
    for ax, (r, c) in zip(filter_axes, pixels):
        shown = ax.get_images()[0].get_array()
        assert shown.shape == (k, k)
        # tap (u, v) is channel u * k + v of the spatial filter
        assert shown[1, 2] == filters[1 * k + 2, r, c]
        assert ax.get_images()[0].norm.vmin == -ax.get_images()[0].norm.vmax
    assert fig.axes[-1].get_ylabel() == "filter tap"  # one shared colour bar
    assert fig._suptitle.get_text() == "s"


@pytest.mark.parametrize(
    "image, filters, pixels, message",
    [
        ((2, 3, 3), (9, 3, 3), [(0, 0)], r"a 2-D image, got shape \(2, 3, 3\)"),
        (
            (3, 3),
            (8, 3, 3),
            [(0, 0)],
            r"spatial_filter of shape \[k \* k, 3, 3\], got \(8, 3, 3\)",
        ),
        (
            (3, 3),
            (9, 3, 4),
            [(0, 0)],
            r"spatial_filter of shape \[k \* k, 3, 3\], got \(9, 3, 4\)",
        ),
        ((3, 3), (9, 3, 3), [], "at least one pixel"),
        ((3, 3), (9, 3, 3), [(3, 0)], r"pixels inside the 3x3 image, got \(3, 0\)"),
    ],
)
def test_pixel_filters_errors(image, filters, pixels, message):
    with pytest.raises(ValueError, match="^plot_pixel_filters expected " + message):
        viz.plot_pixel_filters(torch.zeros(image), torch.zeros(filters), pixels)


@pytest.mark.parametrize("combine, sign", [("mul", "\u2299"), ("add", "+")])
def test_ddf_diagram_names_both_branches_and_the_combination(combine, sign):
    import matplotlib.pyplot as plt

    from refimpl.viz import draw_ddf_diagram

    fig = draw_ddf_diagram(combine)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("spatial branch" in t for t in texts)
    assert any("channel branch" in t for t in texts)
    assert any(f"channel {sign} spatial" in t for t in texts)
    assert any("never stored" in t for t in texts)
    assert repr(combine) in fig.axes[0].get_title()
    plt.close(fig)
    with pytest.raises(ValueError, match=r"^draw_ddf_diagram expected combine"):
        draw_ddf_diagram("cat")


def test_fdconv_diagram_names_the_three_parts():
    fig = viz.draw_fdconv_diagram()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for part in ("KSM global", "KSM local", "FDW", "FBM", "per-sample kernel"):
        assert any(part in t for t in texts), part
    assert any("never" not in t and "irfft2" in t for t in texts)
    assert "FDConv" in fig.axes[0].get_title()


def test_frequency_partition_plot_one_colour_per_group():
    from refimpl.fdconv import frequency_partition

    partition = frequency_partition(12, 10, 4)
    fig = viz.plot_frequency_partition(partition)
    ax = fig.axes[0]
    image = ax.images[0]
    shown = image.get_array()
    assert shown.shape == (12, 6)
    # DC (row 0 of the partition) is drawn in the middle row, group 0
    assert shown[6, 0] == 0 and int(shown.max()) == 3
    assert image.cmap.N == 4
    assert ax.get_title() == "4 groups over 12 x 6 bins"
    assert fig.axes[1].get_ylabel() == "group"
    _, ax2 = plt.subplots()
    assert viz.plot_frequency_partition(partition, ax=ax2, title="t") is ax2.figure
    assert ax2.get_title() == "t"


@pytest.mark.parametrize(
    "partition, message",
    [
        (torch.zeros(3), r"expected a 2-D partition"),
        (torch.full((2, 2), -1), r"expected non-negative integer group ids"),
        (torch.full((2, 2), 0.5), r"expected non-negative integer group ids"),
    ],
)
def test_frequency_partition_plot_errors(partition, message):
    with pytest.raises(ValueError, match=r"^plot_frequency_partition " + message):
        viz.plot_frequency_partition(partition)


# === chapter 1: arithmetic diagrams ==================================================


@pytest.mark.parametrize(
    "h, k, s, p, a",
    [(3, 3, 2, 1, 0), (3, 3, 2, 1, 1), (2, 4, 3, 2, 2), (4, 3, 1, 0, 0)],
)
def test_transposed_convolution_diagram_counts_cells(h, k, s, p, a):
    fig = viz.draw_transposed_convolution(h, k, s, p, a, position=(0, 1))
    assert fig.get_size_inches()[0] <= 6.3
    ax = fig.axes[0]
    # the output size from the guide's relationship 14, not from refimpl
    h_out = s * (h - 1) + a + k - 2 * p
    texts = [t.get_text() for t in ax.texts]
    assert f"input\n{h}x{h}" in texts and f"output\n{h_out}x{h_out}" in texts
    assert any(f"k-p-1={k - p - 1} pad" in t for t in texts)
    assert any(f"s-1={s - 1} zero(s) between pixels" in t for t in texts)
    big = h_out + k - 1  # a stride-1 convolution with kernel k gives h_out
    faces = [patch.get_facecolor() for patch in ax.patches]
    white = matplotlib.colors.to_rgba("white")
    stretched = s * (h - 1) + 1
    assert faces.count(white) == stretched**2 - h**2  # inserted zeros
    hatched = [patch for patch in ax.patches if patch.get_hatch()]
    assert len(hatched) == big**2 - (big - a) ** 2  # output_padding cells
    # input, stretched grid, kernel taps, output
    assert len(ax.patches) == h * h + big * big + k * k + h_out * h_out
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [
        "input pixel",
        "inserted zero",
        "zero padding",
        "output_padding",
        "flipped kernel",
        "current output",
    ]
    assert "stride-1 conv" in fig._suptitle.get_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(padding=3), r"expected padding <= kernel_size - 1 = 2"),
        (dict(output_padding=2), r"expected output_padding < stride = 2"),
        (dict(position=(5, 0)), r"expected position inside the 5x5 output"),
        (dict(stride=0), r"expected stride >= 1"),
    ],
)
def test_transposed_convolution_diagram_errors(kwargs, message):
    with pytest.raises(ValueError, match=r"^draw_transposed_convolution " + message):
        viz.draw_transposed_convolution(3, 3, **{"stride": 2, "padding": 1, **kwargs})


def test_transposed_convolution_diagram_rejects_non_int():
    with pytest.raises(TypeError, match=r"^draw_transposed_convolution expected"):
        viz.draw_transposed_convolution(3.0)


# === chapter 2: CondConv diagrams ====================================================


def _overlapping_texts(fig):
    """Pairs of non-empty texts (with their boxes) whose drawn extents intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    drawn = []
    for text in fig.axes[0].texts:
        if not text.get_text().strip():
            continue
        patch = text.get_bbox_patch()
        extent = (patch or text).get_window_extent(renderer)
        drawn.append((text.get_text(), extent))
    return [
        (a, b)
        for i, (a, ea) in enumerate(drawn)
        for b, eb in drawn[i + 1 :]
        if ea.overlaps(eb)
    ]


@pytest.mark.parametrize("n", [1, 3, 6])
def test_condconv_diagram_draws_the_data_path_and_n_experts(n):
    fig = viz.draw_condconv_diagram(n)
    assert fig.get_figwidth() <= 6.3
    texts = [t.get_text() for t in fig.axes[0].texts]
    for part in ("GAP", "routing FC", "sigmoid", "one convolution per sample",
                 "BN -> ReLU"):  # fmt: skip
        assert any(part in t for t in texts), part
    experts = [t for t in texts if t.startswith("$W_{")]
    assert experts == [f"$W_{{{i}}}$" for i in range(1, n + 1)]
    assert any(f"n = {n} static expert kernels" in t for t in texts)
    assert f"n = {n}" in fig.axes[0].get_title()
    assert _overlapping_texts(fig) == []


@pytest.mark.parametrize(
    "value, error, match",
    [(0, ValueError, r"num_kernels >= 1"), (7, ValueError, r"num_kernels <= 6"),
     (2.5, TypeError, r"num_kernels to be an int")],
)  # fmt: skip
def test_condconv_diagram_errors(value, error, match):
    with pytest.raises(error, match=r"^draw_condconv_diagram expected " + match):
        viz.draw_condconv_diagram(value)


@pytest.mark.parametrize(
    "n, g, c_in, c_out", [(2, 2, 4, 6), (3, 1, 5, 7), (4, 2, 8, 8)]
)
def test_batch_folding_diagram_writes_the_folded_shapes(n, g, c_in, c_out):
    from matplotlib.patches import Rectangle

    fig = viz.draw_batch_folding_diagram(n, g, c_in, c_out)
    ax = fig.axes[0]
    assert fig.get_figwidth() <= 6.3
    texts = "\n".join(t.get_text() for t in ax.texts)
    # the shapes of one grouped convolution over the folded batch, computed here
    assert f"= [1, {n * c_in}, H, W]" in texts
    assert f"= [{n * c_out}, {c_in // g}, k, k]" in texts
    assert f"= [1, {n * c_out}, H_out, W_out]" in texts
    assert f"= [{n}, {c_in}, H, W]" in texts
    assert f"= [{n}, {c_out}, H_out, W_out]" in texts
    assert f"groups = N·g = {n * g}" in texts
    blocks = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(blocks) == 3 * n * g  # input, kernel and output block of each group
    # each row pairs sample j's input, kernel and output blocks of group q
    for j in range(1, n + 1):
        for q in range(1, g + 1):
            for symbol in (f"$x_{{{j}}}$", f"$W(x_{{{j}}})$", f"$y_{{{j}}}$"):
                assert f"{symbol}, group {q}" in texts
    assert _overlapping_texts(fig) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batch=0), ValueError, r"batch >= 1"),
        (dict(groups=1.0), TypeError, r"groups to be an int"),
        (dict(groups=3), ValueError, r"in_channels divisible by groups=3, got 4"),
        (dict(out_channels=5), ValueError, r"out_channels divisible by groups=2"),
        (dict(batch=5), ValueError, r"batch \* groups <= 8 \(drawn\), got 10"),
    ],
)
def test_batch_folding_diagram_errors(kwargs, error, match):
    with pytest.raises(error, match=r"^draw_batch_folding_diagram expected " + match):
        viz.draw_batch_folding_diagram(**kwargs)


# === chapter 3: attention-over-kernels diagrams ======================================


def _box_extents(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_bbox_patch() for t in fig.axes[0].texts]
    return [b.get_window_extent(renderer) for b in boxes if b is not None]


@pytest.mark.parametrize("num_kernels", [1, 2, 4, 8])
def test_dynamic_conv_diagram_draws_the_attention_branch(num_kernels):
    fig = viz.draw_dynamic_conv_diagram(num_kernels, tau_start=20, tau_end=2)
    assert isinstance(fig, plt.Figure)
    assert fig.get_figwidth() <= 6.3
    texts = [t.get_text() for t in fig.axes[0].texts]
    for part in ("GAP", "C_in/4", "ReLU", "softmax}(z / \\tau)", "BN", "conv"):
        assert any(part in t for t in texts), part
    # the temperature schedule and the number of kernels are the arguments'
    assert any("$\\tau$: 20 \u2192 2" in t for t in texts)
    assert any(f"FC \u2192 {num_kernels}\n" in t for t in texts)
    assert any(t.startswith(f"{num_kernels} kernels") for t in texts)
    assert any(f"W_{{{num_kernels}}}" in t or f"W_{num_kernels}$" in t for t in texts)
    assert str(num_kernels) in fig.axes[0].get_title()
    plt.close(fig)


def test_dynamic_conv_diagram_boxes_do_not_overlap_and_stay_inside():
    fig = viz.draw_dynamic_conv_diagram()
    boxes = _box_extents(fig)
    assert len(boxes) == 11  # input, 4 attention steps, bank, mixing, 4 block steps
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    frame = fig.bbox
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1
    plt.close(fig)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_kernels": 0}, ValueError, r"num_kernels >= 1, got 0"),
        ({"num_kernels": 2.0}, TypeError, r"num_kernels to be an int, got float"),
        ({"num_kernels": True}, TypeError, r"num_kernels to be an int, got bool"),
        ({"tau_start": 0}, ValueError, r"tau_start > 0, got 0"),
        ({"tau_end": -1.0}, ValueError, r"tau_end > 0, got -1.0"),
        ({"tau_end": "1"}, TypeError, r"tau_end to be a number, got str"),
        ({"tau_start": 1, "tau_end": 30}, ValueError, r"tau_end <= tau_start"),
    ],
)
def test_dynamic_conv_diagram_errors(kwargs, error, message):
    with pytest.raises(error, match=r"^draw_dynamic_conv_diagram expected " + message):
        viz.draw_dynamic_conv_diagram(**kwargs)


# === chapter 4: ODConv diagrams ======================================================


def _text_boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [
        (t.get_text(), t.get_window_extent(renderer))
        for t in fig.axes[0].texts
        if t.get_text()
    ]


def test_odconv_attentions_diagram_labels_every_attention_and_its_axis():
    fig = viz.draw_odconv_attentions()
    assert fig.get_figwidth() <= 6.3
    texts = [t.get_text() for t in fig.axes[0].texts]
    for head, axis in [
        (r"\alpha_s", r"axes $k\times k$"),
        (r"\alpha_c", "axis $C_{\\mathrm{in}}$"),
        (r"\alpha_f", "axis $C_{\\mathrm{out}}$"),
        (r"\alpha_w", "axis $n$"),
    ]:
        assert any(head in t and axis in t for t in texts), head
    for part in ("GAP", "BN", "ReLU", "FC"):
        assert any(part in t for t in texts), part
    assert any("[n, C_{\\mathrm{out}}, C_{\\mathrm{in}}/g, k, k]" in t for t in texts)
    assert any("softmax" in t and r"\alpha_w" in t for t in texts)
    assert "$W_n$" in texts and "$W_{1}$" in texts


def test_odconv_attentions_diagram_texts_do_not_overlap_and_fit():
    fig = viz.draw_odconv_attentions()
    boxes = _text_boxes(fig)
    figure_box = fig.bbox
    for i, (text, box) in enumerate(boxes):
        assert figure_box.contains(box.x0, box.y0), text
        assert figure_box.contains(box.x1, box.y1), text
        for other, other_box in boxes[i + 1 :]:
            assert not box.overlaps(other_box), (text, other)


def test_odconv_attentions_diagram_draws_the_bank_it_is_asked_for():
    from matplotlib.patches import Rectangle

    colour = matplotlib.colors.to_rgba(viz.COLORS["kernel"])  # the spatial colour
    for n, c_out, c_in, k in [(3, 4, 3, 3), (2, 2, 5, 2), (4, 5, 2, 4)]:
        fig = viz.draw_odconv_attentions(n, c_out, c_in, k)
        cells = [
            p for p in fig.axes[0].patches if type(p) is Rectangle and p.get_fill()
        ]
        # one cell per tap of every kernel, filter and channel; one tap position
        # per k x k grid carries the spatial attention's colour
        assert len(cells) == n * c_out * c_in * k * k
        marked = [p for p in cells if p.get_facecolor() == colour]
        assert len(marked) == n * c_out * c_in
        labels = [t.get_text() for t in fig.axes[0].texts]
        assert [f"$W_{{{i}}}$" for i in range(1, n)] + ["$W_n$"] == [
            t for t in labels if t.startswith("$W_")
        ]
        plt.close(fig)


@pytest.mark.parametrize(
    "kwargs, name, shown",
    [
        ({"num_kernels": 1}, "num_kernels", "1"),
        ({"num_kernels": 5}, "num_kernels", "5"),
        ({"out_channels": 6}, "out_channels", "6"),
        ({"in_channels": 2.0}, "in_channels", "2.0"),
        ({"kernel_size": True}, "kernel_size", "True"),
        ({"kernel_size": 1}, "kernel_size", "1"),
    ],
)
def test_odconv_attentions_diagram_rejects_undrawable_sizes(kwargs, name, shown):
    with pytest.raises(
        ValueError,
        match=rf"^draw_odconv_attentions expected {name} an integer in \[\d, \d\], "
        rf"got {shown}$",
    ):
        viz.draw_odconv_attentions(**kwargs)


# === chapter 6: deformable-convolution diagrams ======================================


def test_deformable_offsets_special_cases_are_the_papers_grids():
    import math

    taps, zero = viz.deformable_offsets("regular")
    # row-major taps of a 3x3 kernel, rows first, centred on p_0
    assert taps[:3].tolist() == [[-1, -1], [-1, 0], [-1, 1]]
    assert taps[4].tolist() == [0, 0] and not zero.any()
    _, delta = viz.deformable_offsets("dilated", dilation=3)
    assert torch.equal(taps + delta, 3 * taps)
    _, delta = viz.deformable_offsets("scaled", scale=1.5)
    assert torch.allclose(taps + delta, 1.5 * taps)
    _, delta = viz.deformable_offsets("rotated", angle=90.0)
    turned = taps + delta
    # lengths kept; the tap to the right of p_0 (0, 1) goes up the page (-1, 0)
    assert torch.allclose(turned.norm(dim=1), taps.norm(dim=1))
    assert torch.allclose(turned[5], torch.tensor([-1.0, 0.0], dtype=torch.float64))
    _, delta = viz.deformable_offsets("rotated", angle=30.0)
    cos = (taps * (taps + delta)).sum(1)[taps.norm(dim=1) > 0]
    cos = cos / taps.norm(dim=1)[taps.norm(dim=1) > 0] ** 2
    assert torch.allclose(cos, torch.full_like(cos, math.cos(math.radians(30))))
    learned = torch.arange(18, dtype=torch.float64).view(9, 2) / 10
    assert torch.equal(viz.deformable_offsets("learned", offsets=learned)[1], learned)
    taps5, _ = viz.deformable_offsets("regular", kernel_size=5)
    assert taps5.shape == (25, 2) and taps5.abs().max() == 2


def test_deformable_offsets_are_torchvision_offsets():
    # fed to deform_conv2d as one offset group, the offsets move every tap to the
    # point the figure draws: on the image 100*row + col the sample of a tap is
    # 100*row + col of its point (bilinear interpolation is exact on a plane)
    from torchvision.ops import deform_conv2d

    size, centre = 9, 4
    rows, cols = torch.meshgrid(
        torch.arange(size, dtype=torch.float64),
        torch.arange(size, dtype=torch.float64),
        indexing="ij",
    )
    image = (100 * rows + cols)[None, None]
    weight = torch.eye(9, dtype=torch.float64).view(9, 1, 3, 3)
    for kind in viz.DEFORMABLE_GRID_KINDS:
        offsets = torch.tensor([[0.3, -0.4]] * 9, dtype=torch.float64)
        taps, delta = viz.deformable_offsets(kind, offsets=offsets)
        offset = delta.flatten().view(1, 18, 1, 1).expand(1, 18, size, size)
        out = deform_conv2d(image, offset.contiguous(), weight, padding=1)
        points = taps + delta + centre
        expected = 100 * points[:, 0] + points[:, 1]
        assert torch.allclose(out[0, :, centre, centre], expected), kind


def test_plot_deformable_grids_draws_five_labelled_panels():
    fig = viz.plot_deformable_grids(dilation=2, scale=1.6, angle=30)
    assert fig.get_size_inches()[0] <= 6.3
    titles = [ax.get_title() for ax in fig.axes[:5]]
    assert titles == [
        "(a) regular",
        "(b) dilated, d = 2",
        "(c) scaled by 1.6",
        "(d) rotated by 30°",
        "(e) learned: arbitrary offsets",
    ]
    legend = fig.axes[5].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[1] == "output location $p_0$" and labels[-1] == "offset $\\Delta p_t$"
    # the regular panel draws no arrows; every other one draws one per moved tap
    arrows = [sum(type(p).__name__ == "FancyArrow" for p in ax.patches)
              for ax in fig.axes[:5]]  # fmt: skip
    assert arrows[0] == 0 and arrows[1] == 8 and arrows[4] == 9
    assert "3×3" in fig._suptitle.get_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "sheared"}, r"expected kind in"),
        ({"kind": "regular", "kernel_size": 4}, r"expected an odd positive int"),
        ({"kind": "regular", "kernel_size": True}, r"expected an odd positive int"),
        ({"kind": "dilated", "dilation": 0}, r"expected dilation > 0"),
        ({"kind": "scaled", "scale": -1.0}, r"expected scale > 0"),
        ({"kind": "learned"}, r"expected offsets for kind='learned'"),
        (
            {"kind": "learned", "offsets": torch.zeros(9, 3)},
            r"expected offsets of shape \(9, 2\), got \(9, 3\)",
        ),
    ],
)
def test_deformable_offsets_errors(kwargs, message):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=r"^deformable_offsets " + message):
        viz.deformable_offsets(kind, **kwargs)


def _moved_by_channel(channel, kh, kw, groups):
    # which (group, row, column, axis) one offset channel moves, per torchvision:
    # one input channel per group holding 100*row + col, a one-hot weight per tap
    from torchvision.ops import deform_conv2d

    size = 6
    rows, cols = torch.meshgrid(
        torch.arange(size, dtype=torch.float64),
        torch.arange(size, dtype=torch.float64),
        indexing="ij",
    )
    image = (100 * rows + cols).expand(1, groups, size, size)
    weight = torch.zeros(groups * kh * kw, groups, kh, kw, dtype=torch.float64)
    for o in range(groups * kh * kw):
        group, t = divmod(o, kh * kw)
        weight[o, group, t // kw, t % kw] = 1.0
    ho, wo = size - kh + 1, size - kw + 1
    offset = torch.zeros(1, 2 * groups * kh * kw, ho, wo, dtype=torch.float64)
    base = deform_conv2d(image, offset, weight)
    offset[0, channel] = 0.5
    change = (deform_conv2d(image, offset, weight) - base)[0, :, 0, 0]
    (o,) = torch.nonzero(change).flatten().tolist()
    group, t = divmod(o, kh * kw)
    return group, t // kw, t % kw, "Δy" if change[o] == 50 else "Δx"


def test_plot_offset_layout_labels_agree_with_torchvision():
    kh, kw, groups = 2, 3, 2
    fig = viz.plot_offset_layout((kh, kw), offset_groups=groups)
    assert fig.get_size_inches()[0] <= 6.3
    panels = [ax for ax in fig.axes if ax.get_title().startswith("offset group")]
    assert len(panels) == groups
    seen = set()
    for group, ax in enumerate(panels):
        assert (
            ax.get_xlabel() == "kernel column b" and ax.get_ylabel() == "kernel row a"
        )
        for text in ax.texts:
            label = text.get_text()
            if label.startswith(("Δy", "Δx")):
                axis, channel = label[:2], int(label.split("ch ")[1])
                b, a = round(text.get_position()[0]), round(text.get_position()[1])
                assert _moved_by_channel(channel, kh, kw, groups) == (group, a, b, axis)
                seen.add(channel)
    assert seen == set(range(2 * groups * kh * kw))  # every channel labelled once
    assert "2×3 kernel, 2 offset groups" in fig._suptitle.get_text()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"offset_groups": 0}, ValueError, r"expected offset_groups in 1\.\.4"),
        ({"offset_groups": 5}, ValueError, r"expected offset_groups in 1\.\.4"),
        ({"kernel_size": 0}, ValueError, r""),
    ],
)
def test_plot_offset_layout_errors(kwargs, error, message):
    with pytest.raises(error, match=r"^plot_offset_layout " + message):
        viz.plot_offset_layout(**kwargs)


# === chapter 8: side-by-side figures =================================================


def _stage_rows():
    """Rows shaped like run_stages's: a baseline first at every shape."""
    rows = []
    for batch in (1, 4):
        for channels, size in ((8, 16), (16, 8)):
            shape = {"batch": batch, "channels": channels, "size": size}
            rows.append(
                {"name": "conv2d", "params": 100, "macs": 1000, **shape,
                 "forward_ratio": 1.0, "forward_backward_ratio": 1.0,
                 "peak_ratio": 1.0, "skipped": None}
            )  # fmt: skip
            rows.append(
                {"name": "op", "params": 400, "macs": 1500 * batch, **shape,
                 "forward_ratio": 2.5, "forward_backward_ratio": 0.5,
                 "peak_ratio": float("nan"), "skipped": None}
            )  # fmt: skip
            rows.append({"name": "gone", **shape, "skipped": "needs CUDA"})
    return rows


def test_cost_matrix_shows_each_ratio_to_the_baseline():
    fig = viz.plot_cost_matrix(_stage_rows(), batch=4)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "parameters",
        "MACs",
        "forward+backward time",
        "peak memory (fwd+bwd)",
    ]
    assert fig.get_figwidth() <= 6.3
    for ax in panels[::2]:  # the skipped case and the baseline are not rows
        assert [t.get_text() for t in ax.get_yticklabels()] == ["op"]
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["8ch\n16²", "16ch\n8²"]
    texts = [[t.get_text() for t in ax.texts] for ax in panels]
    assert texts[0] == ["4.00", "4.00"]  # 400 / 100 parameters
    assert texts[1] == ["6.00", "6.00"]  # 1500 * 4 / 1000 MACs at batch 4
    assert texts[2] == ["0.50", "0.50"]
    assert texts[3] == []  # not measured: blank cells
    assert "batch 4" in fig._suptitle.get_text()
    # the largest batch by default, one panel per measure asked for
    fig = viz.plot_cost_matrix(_stage_rows(), measures=["macs"])
    assert [t.get_text() for t in fig.axes[0].texts] == ["6.00", "6.00"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch": 2}, r"expected batch in \[1, 4\], got 2"),
        ({"measures": ["time"]}, r"expected distinct measures"),
        ({"measures": ["macs", "macs"]}, r"expected distinct measures"),
        ({"measures": []}, r"expected distinct measures"),
    ],
)
def test_cost_matrix_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=r"^plot_cost_matrix " + message):
        viz.plot_cost_matrix(_stage_rows(), **kwargs)
    with pytest.raises(ValueError, match=r"^plot_cost_matrix expected rows"):
        viz.plot_cost_matrix([])
