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


# (end of chapter 1 diagram tests)


# === chapter 2: CondConv diagrams ====================================================


# (end of chapter 2 diagram tests)


# === chapter 3: attention-over-kernels diagrams ======================================


# (end of chapter 3 diagram tests)


# === chapter 4: ODConv diagrams ======================================================


# (end of chapter 4 diagram tests)


# === chapter 6: deformable-convolution diagrams ======================================


# (end of chapter 6 diagram tests)


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


# (end of chapter 8 figure tests)
