"""Helpers the chapters share for showing code and drawing figures.

The book displays the tested source of ``refimpl`` with :func:`show_source`
instead of a copy of it, so the page can never drift from the code. The plotting
helpers give every chapter the same look: :func:`use_book_style` (fonts, layout,
colour map), :data:`COLORS` (one colour per role: input, padding, kernel,
output), :func:`plot_heatmap` and :func:`plot_image_grid` for kernels, spectra
and feature maps, and :func:`plot_sliding_window` for the geometry of a
convolution (chapter 1). Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Mapping

__all__ = [
    "show_source",
    "source_of",
    "COLORS",
    "BOOK_STYLE",
    "use_book_style",
    "plot_heatmap",
    "plot_image_grid",
    "plot_sliding_window",
    "role_handles",
    "plot_pixel_filters",
    "draw_ddf_diagram",
    "plot_frequency_partition",
    "draw_fdconv_diagram",
    # --- chapter 1: arithmetic
    "draw_transposed_convolution",
    # --- chapter 2: CondConv
    "draw_condconv_diagram",
    "draw_batch_folding_diagram",
    # --- chapter 3: attention over kernels
    "draw_dynamic_conv_diagram",
    # --- chapter 4: ODConv
    "draw_odconv_attentions",
    # --- chapter 6: deformable convolution
    "DEFORMABLE_GRID_KINDS",
    "deformable_offsets",
    "plot_deformable_grids",
    "plot_offset_layout",
    # --- chapter 8: side by side
    "COST_MEASURES",
    "plot_cost_matrix",
]


def source_of(obj: object) -> str:
    """Return the dedented source code of a function, class or method."""
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (TypeError, OSError) as err:
        raise TypeError(
            f"show_source expected a function, class or method defined in Python "
            f"source, got {obj!r}"
        ) from err


def show_source(obj: object, *, docstring: bool = True):
    """Display the source of ``obj`` in a notebook as a highlighted code block.

    Returns an ``IPython.display.Markdown`` object holding a fenced ``python``
    block; the book's renderer turns it into highlighted code. With
    ``docstring=False`` the docstring of a function or class is left out, which
    keeps long listings focused on the computation.
    """
    from IPython.display import Markdown  # IPython is only needed in notebooks

    source = source_of(obj)
    if not docstring:
        source = _strip_docstring(source, inspect.getdoc(obj))
    return Markdown(f"```python\n{source.rstrip()}\n```")


def _strip_docstring(source: str, doc: str | None) -> str:
    if not doc:
        return source
    lines = source.splitlines(keepends=True)
    for start, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(('"""', "'''", 'r"""')):
            quote = '"""' if '"""' in stripped else "'''"
            end = start
            # a one-line docstring closes on its own line
            if stripped.count(quote) < 2:
                end = next(i for i in range(start + 1, len(lines)) if quote in lines[i])
            return "".join(lines[:start] + lines[end + 1 :])
    return source


# --- figures ----------------------------------------------------------------------

COLORS = {
    "input": "#9ecae1",
    "padding": "#e0e0e0",
    "kernel": "#f28e2b",
    "output": "#a1d99b",
    "current": "#31a354",
    "static": "#7f7f7f",
    "dynamic": "#4e79a7",
}
"""One colour per role, shared by every geometric figure of the book."""

BOOK_STYLE = {
    "figure.dpi": 100,
    "figure.figsize": (6.4, 4.0),
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "image.cmap": "viridis",
    "image.interpolation": "nearest",
}
"""Matplotlib ``rcParams`` applied by :func:`use_book_style`."""


def use_book_style() -> None:
    """Apply :data:`BOOK_STYLE` to matplotlib, for every later figure.

    In a notebook it also stores figures as "retina" PNG: drawn at twice
    ``figure.dpi`` and displayed at the size of ``figure.figsize``, so they stay
    sharp on high-density screens.
    """
    import matplotlib as mpl

    mpl.rcParams.update(BOOK_STYLE)
    _use_retina_png()


def _use_retina_png() -> None:
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # not in IPython: nothing is displayed inline
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def _as_array(data):
    import numpy as np
    import torch

    if isinstance(data, torch.Tensor):
        # plotting is not a forward pass: a host copy is fine here
        return data.detach().to("cpu", torch.float64).numpy()
    return np.asarray(data, dtype=float)


def plot_heatmap(
    data,
    *,
    ax=None,
    title: str | None = None,
    cmap: str | None = None,
    colorbar: bool = True,
    label: str | None = None,
    symmetric: bool = False,
    annotate: bool = False,
    extent: tuple[float, float, float, float] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
):
    """Draw a 2-D array as an image with a colour bar; return the figure.

    Args:
        data: ``Tensor[H, W]`` or array-like.
        ax: axes to draw into (default: a new figure).
        title: axes title.
        cmap: colour map (default: ``"RdBu_r"`` if ``symmetric`` else the style's).
        colorbar: add a colour bar, labelled ``label``.
        label: colour-bar label, e.g. ``"weight"`` or ``"|K|"``.
        symmetric: centre the colour scale on zero (for signed kernels).
        annotate: write each value in its cell (for small kernels).
        extent: ``(left, right, bottom, top)`` data coordinates of the image, e.g.
            frequencies; with it the axes keep their ticks.
        xlabel, ylabel: axis labels.

    Returns:
        The ``matplotlib.figure.Figure`` holding ``ax``.

    Raises:
        ValueError: if ``data`` is not 2-D.
    """
    import matplotlib.pyplot as plt

    values = _as_array(data)
    if values.ndim != 2:
        raise ValueError(
            f"plot_heatmap expected 2-D data, got {values.ndim} dimensions "
            f"(shape {values.shape})"
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 2.8))
    kwargs = {}
    if symmetric:
        bound = float(abs(values).max()) or 1.0
        kwargs = {"vmin": -bound, "vmax": bound}
    if extent is not None:
        kwargs["extent"] = extent
    image = ax.imshow(values, cmap=cmap or ("RdBu_r" if symmetric else None), **kwargs)
    if extent is None:
        ax.set_xticks([])
        ax.set_yticks([])
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if annotate:
        for (r, c), v in _enumerate2d(values):
            red, green, blue, _ = image.cmap(image.norm(v))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(
                c,
                r,
                f"{v:.2g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, shrink=0.85)
        if label:
            bar.set_label(label)
    return ax.figure


def _enumerate2d(values):
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            yield (r, c), values[r, c]


def plot_image_grid(
    images: Mapping[str, object],
    *,
    ncols: int | None = None,
    suptitle: str | None = None,
    label: str | None = None,
    symmetric: bool = False,
    cmap: str | None = None,
    annotate: bool = False,
    panel_size: float = 2.6,
):
    """Draw several 2-D arrays side by side, each titled and with a colour bar.

    Args:
        images: ``{title: Tensor[H, W]}``, drawn in order, row by row.
        ncols: panels per row (default: all in one row).
        suptitle: title of the whole figure.
        label, symmetric, cmap, annotate: as in :func:`plot_heatmap`.
        panel_size: inches per panel.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    import matplotlib.pyplot as plt

    if not images:
        raise ValueError("plot_image_grid expected at least one image, got none")
    n = len(images)
    ncols = ncols or n
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size * ncols * 1.15, panel_size * nrows),
        squeeze=False,
    )
    for ax, (title, data) in zip(axes.flat, images.items()):
        plot_heatmap(
            data,
            ax=ax,
            title=title,
            label=label,
            symmetric=symmetric,
            cmap=cmap,
            annotate=annotate,
        )
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_sliding_window(
    input_size,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    *,
    position: tuple[int, int] = (0, 0),
    ax=None,
    title: str | None = None,
    legend: bool = True,
):
    """Draw where one output pixel of a convolution takes its inputs from.

    Left: the input (blue) surrounded by its zero padding (grey), with the
    ``kH x kW`` kernel taps (orange) that output pixel ``position`` reads, spaced
    ``dilation`` apart and placed ``stride`` pixels per output step. Right: the
    output grid, whose size is :func:`refimpl.arithmetic.conv_output_size`, with
    that pixel highlighted. Chapter 1 uses it for padding, stride and dilation.

    Args:
        input_size, kernel_size, stride, padding, dilation: ints or pairs, as for
            ``nn.Conv2d``.
        position: ``(row, column)`` of the output pixel to highlight.
        ax: axes to draw into (default: a new figure).
        title: axes title (default: the layer's arguments and output size).
        legend: add the legend naming the four roles.

    Returns:
        The ``matplotlib.figure.Figure`` holding ``ax``.

    Raises:
        ValueError: if ``position`` lies outside the output.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ._validation import pair
    from .arithmetic import conv_output_size

    owner = "plot_sliding_window"
    h, w = pair(input_size, "input_size", owner=owner)
    kh, kw = pair(kernel_size, "kernel_size", owner=owner)
    sh, sw = pair(stride, "stride", owner=owner)
    ph, pw = pair(padding, "padding", owner=owner, minimum=0)
    dh, dw = pair(dilation, "dilation", owner=owner)
    h_out, w_out = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    row, col = position
    if not (0 <= row < h_out and 0 <= col < w_out):
        raise ValueError(
            f"{owner} expected position inside the {h_out}x{w_out} output, got "
            f"{position}"
        )
    if ax is None:
        width = 0.32 * (w + 2 * pw + w_out + 2)
        _, ax = plt.subplots(figsize=(width, 0.32 * (h + 2 * ph) + 1.2))

    def cell(r, c, color, **kwargs):
        ax.add_patch(
            Rectangle((c, r), 1, 1, facecolor=color, edgecolor="white", **kwargs)
        )

    hp, wp = h + 2 * ph, w + 2 * pw
    for r in range(hp):
        for c in range(wp):
            inside = ph <= r < ph + h and pw <= c < pw + w
            cell(r, c, COLORS["input"] if inside else COLORS["padding"])
    for u in range(kh):
        for v in range(kw):
            r, c = row * sh + u * dh, col * sw + v * dw
            ax.add_patch(
                Rectangle(
                    (c + 0.12, r + 0.12),
                    0.76,
                    0.76,
                    facecolor=COLORS["kernel"],
                    edgecolor="black",
                    linewidth=0.8,
                )
            )
    offset = wp + 1.5  # the output grid sits to the right of the input
    top = (hp - h_out) / 2
    for r in range(h_out):
        for c in range(w_out):
            current = (r, c) == (row, col)
            ax.add_patch(
                Rectangle(
                    (offset + c, top + r),
                    1,
                    1,
                    edgecolor="black" if current else "white",
                    facecolor=COLORS["current"] if current else COLORS["output"],
                )
            )
    ax.set_xlim(-0.5, offset + w_out + 0.5)
    ax.set_ylim(hp + 0.5, -0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(
        title
        or (
            f"k={_fmt(kh, kw)} s={_fmt(sh, sw)} p={_fmt(ph, pw)} d={_fmt(dh, dw)}: "
            f"{h}x{w} -> {h_out}x{w_out}"
        )
    )
    if legend:
        ax.legend(
            handles=role_handles(),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=3,
        )
    return ax.figure


def role_handles() -> list:
    """Legend entries for the roles of :data:`COLORS` (input, padding, ...).

    Pass them to ``fig.legend(handles=role_handles())`` to give a figure of
    several :func:`plot_sliding_window` panels one shared legend.
    """
    from matplotlib.patches import Patch

    return [
        Patch(facecolor=COLORS["input"], label="input"),
        Patch(facecolor=COLORS["padding"], label="zero padding"),
        Patch(facecolor=COLORS["kernel"], edgecolor="black", label="kernel taps"),
        Patch(facecolor=COLORS["output"], label="output"),
        Patch(facecolor=COLORS["current"], edgecolor="black", label="current output"),
    ]


def _fmt(a: int, b: int) -> str:
    return str(a) if a == b else f"({a},{b})"


def plot_pixel_filters(
    image,
    spatial_filter,
    pixels,
    *,
    suptitle: str | None = None,
    panel_size: float = 1.6,
):
    """Draw the per-pixel filters a dynamic layer predicts, at a few pixels.

    Left: ``image`` with each pixel of ``pixels`` marked by its number. Right: the
    ``k x k`` filter predicted at each of those pixels (tap ``(u, v)`` is channel
    ``u * k + v`` of ``spatial_filter``, as in :func:`refimpl.ddf.ddf`), on a colour
    scale centred on zero and shared by the panels. Chapter 5 uses it for the
    spatial filters of a trained DDF layer.

    Args:
        image: ``Tensor[H, W]``, the picture on which the pixels are marked (the
            input the filters were predicted from, or a clean version of it).
        spatial_filter: ``Tensor[k * k, H, W]``, one filter per pixel (one head of
            a DDF spatial filter, for one sample).
        pixels: ``(row, column)`` pairs, each inside the image.
        suptitle: title of the whole figure.
        panel_size: inches per filter panel.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: if ``image`` is not 2-D, ``spatial_filter`` is not
            ``[k * k, H, W]`` for a whole ``k``, ``pixels`` is empty, or a pixel
            lies outside the image.
    """
    import math

    import matplotlib.pyplot as plt

    owner = "plot_pixel_filters"
    picture, filters = _as_array(image), _as_array(spatial_filter)
    if picture.ndim != 2:
        raise ValueError(
            f"{owner} expected a 2-D image, got shape {tuple(picture.shape)}"
        )
    h, w = picture.shape
    k = math.isqrt(filters.shape[0]) if filters.ndim == 3 else 0
    if filters.ndim != 3 or k * k != filters.shape[0] or filters.shape[1:] != (h, w):
        raise ValueError(
            f"{owner} expected spatial_filter of shape [k * k, {h}, {w}], got "
            f"{tuple(filters.shape)}"
        )
    pixels = [tuple(int(v) for v in p) for p in pixels]
    if not pixels:
        raise ValueError(f"{owner} expected at least one pixel, got none")
    for r, c in pixels:
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(
                f"{owner} expected pixels inside the {h}x{w} image, got {(r, c)}"
            )
    n = len(pixels)
    fig, axes = plt.subplots(
        1,
        n + 1,
        figsize=(panel_size * (n + 2.2), panel_size * 1.6),
        gridspec_kw={"width_ratios": [2] + [1] * n},
    )
    axes[0].imshow(picture, cmap="gray")
    for i, (r, c) in enumerate(pixels, 1):
        axes[0].text(
            c,
            r,
            str(i),
            ha="center",
            va="center",
            fontsize=9,
            fontweight="bold",
            color="black",
            bbox={"boxstyle": "circle,pad=0.15", "facecolor": COLORS["kernel"]},
        )
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    axes[0].set_title("input")
    chosen = [filters[:, r, c].reshape(k, k) for r, c in pixels]
    bound = max(float(abs(f).max()) for f in chosen) or 1.0
    for i, (ax, f, (r, c)) in enumerate(zip(axes[1:], chosen, pixels), 1):
        shown = ax.imshow(f, cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{i}: ({r}, {c})")
    fig.colorbar(shown, ax=list(axes[1:]), shrink=0.8, label="filter tap")
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def _diagram_box(ax, x: float, y: float, text: str, *, color: str, dashed=False):
    """A rounded box centred at ``(x, y)`` (axes fraction) holding ``text``."""
    ax.text(
        x,
        y,
        text,
        ha="center",
        va="center",
        fontsize=8.5,
        transform=ax.transAxes,
        bbox={
            "boxstyle": "round,pad=0.45",
            "facecolor": color,
            "edgecolor": "0.3",
            "linestyle": "--" if dashed else "-",
        },
    )


def _diagram_arrow(ax, start, end) -> None:
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        xycoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "0.25", "lw": 1.2},
    )


def draw_ddf_diagram(combine: str = "mul"):
    """The data path of a DDF layer (chapter 5), as a box-and-arrow diagram.

    The input feeds two branches: the spatial branch (a 1x1 convolution with the
    layer's stride, then FilterNorm) predicts one ``k x k`` filter per output
    pixel, shared by the channels; the channel branch (global average pooling,
    two fully connected layers, FilterNorm with a learnable scale) predicts one
    ``k x k`` filter per channel, shared by the pixels. They are combined by a
    product (``"mul"``) or a sum (``"add"``) inside the depthwise filtering of
    the input, which :func:`refimpl.ddf.ddf` does tap by tap, so that the
    per-pixel, per-channel filter (dashed) is never stored.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: ``combine`` is not ``"mul"`` or ``"add"``.
    """
    import matplotlib.pyplot as plt

    if combine not in ("mul", "add"):
        raise ValueError(
            f"draw_ddf_diagram expected combine 'mul' or 'add', got {combine!r}"
        )
    sign = "\u2299" if combine == "mul" else "+"
    fig, ax = plt.subplots(figsize=(8.4, 3.4))
    ax.set_axis_off()
    data, branch, result = "#dbe9f6", "#fbe3c8", "#d9efd9"
    _diagram_box(ax, 0.07, 0.5, "input X\n[N, C, H, W]", color=data)
    _diagram_box(
        ax,
        0.33,
        0.82,
        "spatial branch\n1x1 conv (stride s)\n-> FilterNorm (gain/k)",
        color=branch,
    )
    _diagram_box(
        ax,
        0.33,
        0.18,
        "channel branch\nGAP -> FC -> ReLU -> FC\n-> FilterNorm (x scale)",
        color=branch,
    )
    _diagram_box(
        ax, 0.6, 0.82, "spatial filter\n[N, k*k, H', W']\nper pixel", color=data
    )
    _diagram_box(ax, 0.6, 0.18, "channel filter\n[N, C, k, k]\nper channel", color=data)
    _diagram_box(
        ax,
        0.6,
        0.5,
        f"per-pixel filter\nchannel {sign} spatial\n[N, C, k*k, H', W']"
        "\n(never stored)",
        color="white",
        dashed=True,
    )
    _diagram_box(
        ax,
        0.88,
        0.5,
        "depthwise filtering\nof X, tap by tap\n-> output [N, C, H', W']",
        color=result,
    )
    for start, end in [
        ((0.13, 0.56), (0.23, 0.78)),
        ((0.13, 0.44), (0.23, 0.22)),
        ((0.465, 0.82), (0.52, 0.82)),
        ((0.465, 0.18), (0.52, 0.18)),
        ((0.6, 0.72), (0.6, 0.63)),
        ((0.6, 0.28), (0.6, 0.37)),
        ((0.69, 0.5), (0.77, 0.5)),
        ((0.07, 0.38), (0.07, 0.04)),
    ]:
        _diagram_arrow(ax, start, end)
    ax.annotate(
        "",
        xy=(0.88, 0.37),
        xytext=(0.07, 0.04),
        xycoords="axes fraction",
        arrowprops={
            "arrowstyle": "->",
            "color": "0.25",
            "lw": 1.2,
            "connectionstyle": "angle,angleA=0,angleB=90,rad=0",
        },
    )
    ax.set_title(f"DDF ({combine!r}): two cheap branches, one depthwise filtering")
    return fig


def plot_frequency_partition(
    partition,
    *,
    ax=None,
    title: str | None = None,
):
    """Draw the group of every bin of a real 2-D spectrum (FDConv's partition).

    ``partition`` is the ``Tensor[H, W // 2 + 1]`` of group ids that
    :func:`refimpl.fdconv.frequency_partition` returns for the ``rfft2`` of an
    ``H x W`` matrix. Rows are shifted so that the vertical frequency runs from
    about -0.5 (top) to 0.5 (bottom) with DC in the middle; columns are the
    non-negative horizontal frequencies 0 to 0.5. One colour per group, low
    (dark) to high (bright) frequency.

    Args:
        partition: ``Tensor[H, W']`` or array-like of integer group ids.
        ax: axes to draw into (default: a new figure).
        title: axes title.

    Returns:
        The ``matplotlib.figure.Figure`` holding ``ax``.

    Raises:
        ValueError: if ``partition`` is not 2-D or holds negative or
            non-integer ids.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    values = _as_array(partition)
    if values.ndim != 2:
        raise ValueError(
            f"plot_frequency_partition expected a 2-D partition, got "
            f"{values.ndim} dimensions (shape {values.shape})"
        )
    if values.size and (values.min() < 0 or not np.all(values == np.round(values))):
        raise ValueError(
            "plot_frequency_partition expected non-negative integer group ids"
        )
    groups = int(values.max()) + 1 if values.size else 1
    height, cols = values.shape
    shifted = np.fft.fftshift(values, axes=0)
    fy = np.fft.fftshift(np.fft.fftfreq(height))
    step = 1.0 / height
    if ax is None:
        _, ax = plt.subplots(figsize=(3.6, 3.4))
    cmap = plt.get_cmap("viridis", groups)
    image = ax.imshow(
        shifted,
        cmap=cmap,
        vmin=-0.5,
        vmax=groups - 0.5,
        aspect="auto",
        extent=(
            -0.5 / (2 * (cols - 1) or 1),
            0.5 + 0.5 / (2 * (cols - 1) or 1),
            fy[-1] + step / 2,
            fy[0] - step / 2,
        ),
    )
    ax.set_xlabel("horizontal frequency (rfft)")
    ax.set_ylabel("vertical frequency")
    bar = ax.figure.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label("group")
    bar.set_ticks(list(range(groups)) if groups <= 8 else [0, groups - 1])
    ax.set_title(title or f"{groups} groups over {height} x {cols} bins")
    return ax.figure


def draw_fdconv_diagram():
    """The data path of an FDConv layer (chapter 7), as a box-and-arrow diagram.

    The pooled input drives Kernel Spatial Modulation: its global branch
    predicts the channel, filter, spatial and kernel attentions, its local
    branch a dense modulation of every weight. The kernel attention mixes the
    ``n`` disjoint-spectrum kernels of the Fourier disjoint weight (one stored
    spectrum, cut into frequency groups, each transformed back by ``irfft2``);
    the modulations multiply the mixed kernel. In parallel, Frequency Band
    Modulation splits the input into frequency bands and reweights each band
    pixel by pixel; the per-sample kernel convolves the result.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    ax.set_axis_off()
    data, branch, result = "#dbe9f6", "#fbe3c8", "#d9efd9"
    _diagram_box(ax, 0.07, 0.5, "input X\n[N, C_in, H, W]", color=data)
    _diagram_box(ax, 0.25, 0.86, "GAP\n[N, C_in]", color=data)
    _diagram_box(
        ax,
        0.47,
        0.86,
        "KSM global: FC-BN-StarReLU\nchannel, filter, spatial\n"
        "2 sigmoid; kernel 2/n sigmoid",
        color=branch,
    )
    _diagram_box(
        ax,
        0.47,
        0.6,
        "KSM local: LN, Conv1d\nalong channels, 2 sigmoid\n[N, C_out, C_in, k, k]",
        color=branch,
    )
    _diagram_box(
        ax,
        0.77,
        0.86,
        "FDW: one spectrum, n groups\nn kernels irfft2(1_Gj Theta)\n"
        "mixed by kernel attention",
        color=data,
    )
    _diagram_box(
        ax,
        0.77,
        0.6,
        "per-sample kernel\nW_b = a_s a_c a_f W_fdw hr\n[N, C_out, C_in, k, k]",
        color="white",
        dashed=True,
    )
    _diagram_box(
        ax,
        0.35,
        0.2,
        "FBM: rfft2 -> bands\n(L_b-1 - L_b), 3x3 conv maps\nA_b per pixel, sum + L_B",
        color=branch,
    )
    _diagram_box(
        ax,
        0.77,
        0.25,
        "per-sample convolution\nW_b * FBM(X)_b + bias\n-> [N, C_out, H', W']",
        color=result,
    )
    for start, end in [
        ((0.1, 0.6), (0.2, 0.8)),
        ((0.3, 0.86), (0.355, 0.86)),
        ((0.3, 0.82), (0.36, 0.66)),
        ((0.585, 0.86), (0.655, 0.86)),
        ((0.56, 0.79), (0.68, 0.68)),
        ((0.77, 0.77), (0.77, 0.69)),
        ((0.585, 0.6), (0.67, 0.6)),
        ((0.07, 0.38), (0.22, 0.24)),
        ((0.48, 0.2), (0.66, 0.23)),
        ((0.77, 0.51), (0.77, 0.34)),
    ]:
        _diagram_arrow(ax, start, end)
    ax.set_title("FDConv: frequency-disjoint kernels, modulated per sample and band")
    return fig


# === chapter 1: arithmetic diagrams ==================================================


def draw_transposed_convolution(
    input_size: int = 3,
    kernel_size: int = 3,
    stride: int = 2,
    padding: int = 1,
    output_padding: int = 0,
    *,
    position: tuple[int, int] = (0, 0),
):
    """A transposed convolution drawn as zero insertion plus a plain convolution.

    Dumoulin and Visin ("A guide to convolution arithmetic for deep learning",
    2016, arXiv:1603.07285, relationships 12 to 14) show that the transpose of a
    convolution with kernel ``k``, stride ``s`` and padding ``p`` equals a
    stride-1 convolution with the flipped kernel over a *stretched* input: ``s - 1``
    zeros inserted between neighbouring input pixels, ``k - p - 1`` zeros of
    padding on every side and ``output_padding`` (the guide's ``a``) more at the
    bottom and right. Left: the input of the transposed layer. Middle: the
    stretched, padded input with the ``k x k`` taps that output pixel ``position``
    reads. Right: the output, of size ``(H - 1)s - 2p + k + output_padding``
    (:func:`refimpl.arithmetic.conv_transpose_output_size`). Chapter 1 draws it
    and checks the equivalence numerically against ``F.conv_transpose2d``.

    Args:
        input_size: side ``H`` of the square input of the transposed layer.
        kernel_size: side ``k`` of the square kernel.
        stride: stride ``s`` of the convolution being transposed.
        padding: its padding ``p``, at most ``k - 1`` so that the equivalent
            padding ``k - p - 1`` is not negative.
        output_padding: extra rows and columns at the bottom and right, below
            ``stride``.
        position: ``(row, column)`` of the output pixel whose taps are drawn.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: if a size is not an int.
        ValueError: if a size is out of range, ``padding > kernel_size - 1``,
            ``output_padding >= stride`` or ``position`` lies outside the output.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    from ._validation import check_positive_int
    from .arithmetic import conv_transpose_output_size

    owner = "draw_transposed_convolution"
    h = check_positive_int(input_size, "input_size", owner=owner)
    k = check_positive_int(kernel_size, "kernel_size", owner=owner)
    s = check_positive_int(stride, "stride", owner=owner)
    p = check_positive_int(padding, "padding", owner=owner, minimum=0)
    a = check_positive_int(output_padding, "output_padding", owner=owner, minimum=0)
    if p > k - 1:
        raise ValueError(
            f"{owner} expected padding <= kernel_size - 1 = {k - 1} (the equivalent "
            f"convolution pads k - p - 1 >= 0), got padding={p}"
        )
    if a >= s:
        raise ValueError(
            f"{owner} expected output_padding < stride = {s}, got output_padding={a}"
        )
    h_out = conv_transpose_output_size(h, k, s, p, a)
    row, col = position
    if not (0 <= row < h_out and 0 <= col < h_out):
        raise ValueError(
            f"{owner} expected position inside the {h_out}x{h_out} output, got "
            f"{position}"
        )
    pad = k - p - 1
    stretched = (h - 1) * s + 1
    big = stretched + 2 * pad + a  # = h_out + k - 1
    gap = 2.0
    x_mid = h + gap
    x_out = x_mid + big + gap
    total = x_out + h_out
    width = min(6.3, 0.27 * total + 0.5)
    fig, ax = plt.subplots(figsize=(width, 0.27 * big + 1.9))

    def cell(x, y, face, edge="white", **kwargs):
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=face, edgecolor=edge, **kwargs))

    top_in = (big - h) / 2
    for r in range(h):
        for c in range(h):
            cell(c, top_in + r, COLORS["input"])
    inserted = {"facecolor": "white", "edgecolor": "0.6", "linewidth": 0.6}
    for r in range(big):
        for c in range(big):
            rr, cc = r - pad, c - pad
            on_grid = 0 <= rr < stretched and 0 <= cc < stretched
            if on_grid and rr % s == 0 and cc % s == 0:
                cell(x_mid + c, r, COLORS["input"])
            elif on_grid:
                ax.add_patch(Rectangle((x_mid + c, r), 1, 1, **inserted))
            elif r >= big - a or c >= big - a:
                cell(x_mid + c, r, COLORS["padding"], hatch="///")
            else:
                cell(x_mid + c, r, COLORS["padding"])
    for u in range(k):
        for v in range(k):
            ax.add_patch(
                Rectangle(
                    (x_mid + col + v + 0.12, row + u + 0.12),
                    0.76,
                    0.76,
                    facecolor=COLORS["kernel"],
                    edgecolor="black",
                    linewidth=0.8,
                )
            )
    top_out = (big - h_out) / 2
    for r in range(h_out):
        for c in range(h_out):
            current = (r, c) == (row, col)
            cell(
                x_out + c,
                top_out + r,
                COLORS["current"] if current else COLORS["output"],
                edge="black" if current else "white",
            )
    for x0, x1 in ((h + 0.25, x_mid - 0.25), (x_mid + big + 0.25, x_out - 0.25)):
        ax.annotate(
            "",
            xy=(x1, big / 2),
            xytext=(x0, big / 2),
            arrowprops={"arrowstyle": "->", "color": "0.25", "lw": 1.2},
        )
    below = big + 0.6
    captions = [
        (h / 2, f"input\n{h}x{h}"),
        (
            x_mid + big / 2,
            f"stretched and padded, {big}x{big}:\ns-1={s - 1} zero(s) between pixels,\n"
            f"k-p-1={pad} pad, output_padding={a}",
        ),
        (x_out + h_out / 2, f"output\n{h_out}x{h_out}"),
    ]
    for x, text in captions:
        ax.text(x, below, text, ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.3, total + 0.3)
    ax.set_ylim(big + 2.7, -0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle(
        f"Transposed conv (k={k}, s={s}, p={p}) = stride-1 conv with the\n"
        f"flipped kernel over the stretched input"
    )
    handles = [
        Patch(facecolor=COLORS["input"], label="input pixel"),
        Patch(label="inserted zero", **inserted),
        Patch(facecolor=COLORS["padding"], label="zero padding"),
        Patch(facecolor=COLORS["padding"], hatch="///", label="output_padding"),
        Patch(facecolor=COLORS["kernel"], edgecolor="black", label="flipped kernel"),
        Patch(facecolor=COLORS["current"], edgecolor="black", label="current output"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    return fig


# === chapter 2: CondConv diagrams ====================================================


def draw_condconv_diagram(num_kernels: int = 4):
    """The data path of a CondConv layer (chapter 2), as a box-and-arrow diagram.

    Following Yang et al. (NeurIPS 2019) and the official TensorFlow code: the
    input is pooled (GAP), a fully connected routing layer with bias and a
    sigmoid turn the pooled vector into ``num_kernels`` routing weights
    ``alpha_i(x)`` in ``(0, 1)``; they mix the ``n`` static expert kernels into one
    kernel per sample, and each sample goes through *one* convolution with its
    own kernel. Batch normalisation and the activation follow the layer (dashed:
    they belong to the network, conv -> BN -> activation).

    Args:
        num_kernels: ``n``, the number of expert boxes drawn (1 to 6).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: ``num_kernels`` is not an int.
        ValueError: ``num_kernels`` is outside 1 to 6.
    """
    import matplotlib.pyplot as plt

    from ._validation import check_positive_int

    owner = "draw_condconv_diagram"
    n = check_positive_int(num_kernels, "num_kernels", owner=owner)
    if n > 6:
        raise ValueError(f"{owner} expected num_kernels <= 6 (drawn), got {n}")
    fig, ax = plt.subplots(figsize=(6.3, 3.5))
    ax.set_axis_off()
    routing, mixed = "#dbe9f6", "white"
    _diagram_box(ax, 0.09, 0.86, "input x\n[N, C_in, H, W]", color=COLORS["input"])
    _diagram_box(ax, 0.29, 0.86, "GAP\n[N, C_in]", color=routing)
    _diagram_box(ax, 0.5, 0.86, "routing FC (R, c)\n+ sigmoid", color=routing)
    _diagram_box(
        ax, 0.82, 0.86, "routing weights\n$\\alpha_i(x) \\in (0, 1)$\n[N, n]",
        color=routing,
    )  # fmt: skip
    left, right = 0.16, 0.46
    xs = [left + (right - left) * i / max(n - 1, 1) for i in range(n)]
    if n == 1:
        xs = [(left + right) / 2]
    for i, x in enumerate(xs):
        _diagram_box(ax, x, 0.5, f"$W_{{{i + 1}}}$", color=COLORS["kernel"])
    ax.text(
        (left + right) / 2, 0.34, f"n = {n} static expert kernels\n"
        "each [C_out, C_in/g, k, k]", ha="center", va="center", fontsize=8,
        transform=ax.transAxes,
    )  # fmt: skip
    _diagram_box(
        ax, 0.74, 0.5, "mix once per sample\n"
        "$W(x) = \\Sigma_i\\, \\alpha_i(x)\\, W_i$\n[N, C_out, C_in/g, k, k]",
        color=mixed, dashed=True,
    )  # fmt: skip
    _diagram_box(
        ax, 0.5, 0.12, "one convolution per sample\n$y = W(x) * x + b(x)$\n"
        "[N, C_out, H_out, W_out]", color=COLORS["output"],
    )  # fmt: skip
    _diagram_box(
        ax, 0.87, 0.12, "BN -> ReLU\n(the network's,\nafter the layer)",
        color="white", dashed=True,
    )  # fmt: skip
    for start, end in [
        ((0.16, 0.86), (0.24, 0.86)),
        ((0.34, 0.86), (0.4, 0.86)),
        ((0.6, 0.86), (0.71, 0.86)),
        ((0.82, 0.76), (0.8, 0.61)),
        ((0.5, 0.5), (0.59, 0.5)),
        ((0.72, 0.39), (0.6, 0.22)),
        ((0.67, 0.12), (0.77, 0.12)),
    ]:
        _diagram_arrow(ax, start, end)
    ax.annotate(
        "",
        xy=(0.3, 0.12),
        xytext=(0.09, 0.78),
        xycoords="axes fraction",
        arrowprops={
            "arrowstyle": "->",
            "color": "0.25",
            "lw": 1.2,
            "connectionstyle": "angle,angleA=-90,angleB=0,rad=0",
        },
    )
    ax.set_title(f"CondConv with n = {n}: route, mix the kernels, convolve once")
    return fig


def draw_batch_folding_diagram(
    batch: int = 2, groups: int = 2, in_channels: int = 4, out_channels: int = 6
):
    """How a batch of per-sample kernels runs as one grouped convolution (chapter 2).

    The trick behind :func:`refimpl.per_sample.per_sample_conv2d` (used by CondConv,
    Yang et al., NeurIPS 2019, and every dynamic operator of the book): the input
    ``[N, C_in, H, W]`` is reshaped to ``[1, N*C_in, H, W]``, the ``N`` kernels
    ``[C_out, C_in/g, k, k]`` are stacked into ``[N*C_out, C_in/g, k, k]``, and one
    convolution with ``N*g`` groups pairs each block of input channels with the
    block of filters of the same position only, so every sample meets its own
    kernel and no other. Each row of the drawing is one group; colours alternate
    by sample. The shapes are written symbolically and for the given sizes.

    Args:
        batch: ``N``, the number of samples drawn.
        groups: ``g``, the groups of the layer.
        in_channels, out_channels: ``C_in`` and ``C_out`` (multiples of ``g``).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: an argument is not an int.
        ValueError: an argument is below 1, ``C_in`` or ``C_out`` is not a multiple
            of ``g``, or ``N*g`` exceeds 8 (too many rows to draw).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ._validation import check_positive_int

    owner = "draw_batch_folding_diagram"
    n = check_positive_int(batch, "batch", owner=owner)
    g = check_positive_int(groups, "groups", owner=owner)
    c_in = check_positive_int(in_channels, "in_channels", owner=owner)
    c_out = check_positive_int(out_channels, "out_channels", owner=owner)
    for name, value in (("in_channels", c_in), ("out_channels", c_out)):
        if value % g:
            raise ValueError(
                f"{owner} expected {name} divisible by groups={g}, got {value}"
            )
    if n * g > 8:
        raise ValueError(f"{owner} expected batch * groups <= 8 (drawn), got {n * g}")
    fig, ax = plt.subplots(figsize=(6.3, 4.0))
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    rows = n * g
    top, bottom = 0.66, 0.17
    height = (top - bottom) / rows
    columns = [
        (
            0.3, "input", "x reshaped", f"[1, N·C_in, H, W]\n= [1, {n * c_in}, H, W]",
            f"{rows} blocks of\nC_in/g = {c_in // g} channels", "x",
        ),
        (
            0.55, "kernel", "kernels stacked",
            f"[N·C_out, C_in/g, k, k]\n= [{n * c_out}, {c_in // g}, k, k]",
            f"{rows} blocks of\nC_out/g = {c_out // g} filters", "W(x",
        ),
        (
            0.8, "output", "output",
            f"[1, N·C_out, H_out, W_out]\n= [1, {n * c_out}, H_out, W_out]",
            f"{rows} blocks of\nC_out/g = {c_out // g} channels", "y",
        ),
    ]  # fmt: skip
    width = 0.17
    for x, role, name, shape, blocks, symbol in columns:
        ax.text(x, top + 0.02, blocks, ha="center", va="bottom", fontsize=7)
        ax.text(x, top + 0.11, f"{name}\n{shape}", ha="center", va="bottom",
                fontsize=7)  # fmt: skip
        for r in range(rows):
            j, q = divmod(r, g)
            y = top - (r + 1) * height
            ax.add_patch(
                Rectangle(
                    (x - width / 2, y), width, height, facecolor=COLORS[role],
                    edgecolor="0.3", alpha=1.0 if j % 2 == 0 else 0.5,
                )
            )  # fmt: skip
            close = ")" if symbol == "W(x" else ""
            label = f"${symbol}_{{{j + 1}}}{close}$, group {q + 1}"
            ax.text(x, y + height / 2, label, ha="center", va="center", fontsize=7.5)
    for r in range(rows):
        y = top - (r + 0.5) * height
        for start, end in (
            (0.3 + width / 2, 0.55 - width / 2),
            (0.55 + width / 2, 0.8 - width / 2),
        ):
            ax.annotate(
                "", xy=(end, y), xytext=(start, y),
                arrowprops={"arrowstyle": "->", "color": "0.25", "lw": 0.9},
            )  # fmt: skip
    ax.text(
        0.09, (top + bottom) / 2, f"x\n[N, C_in, H, W]\n= [{n}, {c_in}, H, W]\n\n"
        "reshape\n->", ha="center", va="center", fontsize=8,
    )  # fmt: skip
    ax.text(
        0.5, 0.08, f"one F.conv2d with groups = N·g = {rows}: each group (row) "
        "reads its input block\nwith its filter block only; reshape the output to "
        f"[N, C_out, H_out, W_out] = [{n}, {c_out}, H_out, W_out]",
        ha="center", va="center", fontsize=8,
    )  # fmt: skip
    ax.set_title(f"Batch folded into groups: N = {n} samples, g = {g}")
    return fig


# === chapter 3: attention-over-kernels diagrams ======================================


def draw_dynamic_conv_diagram(
    num_kernels: int = 4, *, tau_start: float = 30.0, tau_end: float = 1.0
):
    """A DynamicConv block of DY-CNN (chapter 3), as a box-and-arrow diagram.

    Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR
    2020. Top row, the attention branch: global average pooling of the input, a
    fully connected layer from ``C_in`` to ``C_in/4`` channels, ReLU, a fully
    connected layer to ``n`` logits ``z`` and a softmax of ``z / tau``, with the
    temperature annealed from ``tau_start`` to ``tau_end``. Middle row: the
    attention ``alpha_i`` mixes the ``n`` kernels and biases into one kernel and
    one bias per sample. Bottom row: the input is convolved with them, then
    BatchNorm and ReLU, as in every block of a DY-CNN network.

    Args:
        num_kernels: ``n``, the number of kernels drawn in the bank (``>= 1``).
        tau_start: temperature at the start of training (``> 0``).
        tau_end: temperature after annealing (``> 0``, at most ``tau_start``).

    Returns:
        The ``matplotlib.figure.Figure`` (6.3 x 3.9 inches).

    Raises:
        TypeError: ``num_kernels`` is not an int, or a temperature not a number.
        ValueError: ``num_kernels < 1``, a temperature is not positive, or
            ``tau_end > tau_start``.
    """
    import matplotlib.pyplot as plt

    owner = "draw_dynamic_conv_diagram"
    if isinstance(num_kernels, bool) or not isinstance(num_kernels, int):
        raise TypeError(
            f"{owner} expected num_kernels to be an int, got "
            f"{type(num_kernels).__name__}"
        )
    if num_kernels < 1:
        raise ValueError(f"{owner} expected num_kernels >= 1, got {num_kernels}")
    for name, value in (("tau_start", tau_start), ("tau_end", tau_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{owner} expected {name} to be a number, got {type(value).__name__}"
            )
        if not value > 0:
            raise ValueError(f"{owner} expected {name} > 0, got {value}")
    if tau_end > tau_start:
        raise ValueError(
            f"{owner} expected tau_end <= tau_start, got {tau_end} > {tau_start}"
        )
    n = num_kernels
    bank = (
        ", ".join(f"$W_{i}$" for i in range(1, n + 1))
        if n <= 3
        else (f"$W_1, \\dots, W_{{{n}}}$")
    )
    biases = (
        ", ".join(f"$b_{i}$" for i in range(1, n + 1))
        if n <= 3
        else (f"$b_1, \\dots, b_{{{n}}}$")
    )
    fig, ax = plt.subplots(figsize=(6.3, 3.9))
    ax.set_axis_off()
    data, branch, result = "#dbe9f6", "#fbe3c8", "#d9efd9"
    top, middle, bottom = 0.86, 0.5, 0.12
    _diagram_box(ax, 0.07, middle, "input $x$\n[N, C_in,\nH, W]", color=data)
    _diagram_box(ax, 0.2, top, "GAP\n[N, C_in]", color=branch)
    _diagram_box(ax, 0.41, top, "FC C_in \u2192 C_in/4\nReLU", color=branch)
    _diagram_box(ax, 0.62, top, f"FC \u2192 {n}\nlogits $z$", color=branch)
    _diagram_box(
        ax,
        0.86,
        top,
        "$\\alpha = \\mathrm{softmax}(z / \\tau)$\n"
        f"$\\tau$: {tau_start:g} \u2192 {tau_end:g}",
        color=branch,
    )
    _diagram_box(
        ax, 0.36, middle, f"{n} kernels {bank}\n{n} biases {biases}", color=data
    )
    _diagram_box(
        ax,
        0.78,
        middle,
        "$\\tilde W(x) = \\sum_i \\alpha_i W_i$\n"
        "$\\tilde b(x) = \\sum_i \\alpha_i b_i$",
        color="white",
        dashed=True,
    )
    _diagram_box(
        ax, 0.36, bottom, "conv  $\\tilde W(x) * x + \\tilde b(x)$", color=result
    )
    _diagram_box(ax, 0.64, bottom, "BN", color=result)
    _diagram_box(ax, 0.76, bottom, "ReLU", color=result)
    _diagram_box(ax, 0.92, bottom, "output $y$", color=data)
    for start, end in [
        ((0.09, 0.63), (0.17, 0.79)),
        ((0.25, top), (0.32, top)),
        ((0.51, top), (0.575, top)),
        ((0.675, top), (0.77, top)),
        ((0.86, 0.76), (0.82, 0.61)),
        ((0.48, middle), (0.705, middle)),
        ((0.74, 0.39), (0.45, 0.18)),
        ((0.09, 0.37), (0.25, 0.16)),
        ((0.48, bottom), (0.61, bottom)),
        ((0.67, bottom), (0.72, bottom)),
        ((0.8, bottom), (0.86, bottom)),
    ]:
        _diagram_arrow(ax, start, end)
    ax.set_title(f"DynamicConv: softmax attention over {n} kernels (DY-CNN)")
    return fig


# === chapter 4: ODConv diagrams ======================================================

#: One colour per ODConv attention in :func:`draw_odconv_attentions` (three of them
#: are roles of :data:`COLORS`).
_OD_COLORS = {
    "spatial": COLORS["kernel"],
    "channel": COLORS["dynamic"],
    "filter": COLORS["current"],
    "kernel": "#e15759",
}


def _od_box(ax, x0, y0, width, height, text, *, color, edge="0.3"):
    """A rounded box with lower-left corner ``(x0, y0)`` (data units), text centred."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x0, y0),
            width,
            height,
            boxstyle="round,pad=0,rounding_size=0.12",
            facecolor=color,
            edgecolor=edge,
            lw=1.0,
        )
    )
    ax.text(x0 + width / 2, y0 + height / 2, text, ha="center", va="center",
            fontsize=7.5)  # fmt: skip


def _od_arrow(ax, start, end, color="0.25", lw=1.1):
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops={"arrowstyle": "-|>", "color": color, "lw": lw, "shrinkA": 0,
                    "shrinkB": 0, "mutation_scale": 8},
    )  # fmt: skip


def draw_odconv_attentions(
    num_kernels: int = 3,
    out_channels: int = 4,
    in_channels: int = 3,
    kernel_size: int = 3,
):
    """ODConv's four attentions and the axis of the kernel bank each one scales.

    Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022; chapter 4.
    Top: the one attention trunk of a layer, global average pooling, a fully
    connected layer (a 1x1 convolution in the official code) to the hidden width
    ``h``, BatchNorm and ReLU. Middle: its four heads, each a linear map of the
    hidden vector squashed at temperature ``tau``: spatial ``alpha_s`` (``k x k``,
    sigmoid), input channel ``alpha_c`` (``C_in``, sigmoid), filter ``alpha_f``
    (``C_out``, sigmoid) and kernel-wise ``alpha_w`` (``n``, softmax). Bottom: the
    kernel bank ``[n, C_out, C_in/g, k, k]`` drawn as ``n`` panels of ``C_out``
    rows (filters) by ``C_in/g`` columns (input channels) of ``k x k`` taps; each
    attention's colour marks what one of its values scales: one tap position in
    every filter and channel (spatial), one column (channel), one row (filter),
    one whole kernel (kernel-wise). As in the official code, the spatial, channel
    and filter attentions are shared by the ``n`` kernels.

    Args:
        num_kernels, out_channels, in_channels, kernel_size: the sizes drawn
            (``n``, ``C_out``, ``C_in/g``, ``k``); small values keep it legible.

    Returns:
        The ``matplotlib.figure.Figure`` (6.3 x 4.4 inches).

    Raises:
        ValueError: a size is not an integer in its drawable range
            (``num_kernels`` 2 to 4, ``out_channels`` and ``in_channels`` 2 to 5,
            ``kernel_size`` 2 to 4).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    limits = {
        "num_kernels": (num_kernels, 2, 4),
        "out_channels": (out_channels, 2, 5),
        "in_channels": (in_channels, 2, 5),
        "kernel_size": (kernel_size, 2, 4),
    }
    for name, (value, low, high) in limits.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not low <= value <= high
        ):
            raise ValueError(
                f"draw_odconv_attentions expected {name} an integer in "
                f"[{low}, {high}], got {value!r}"
            )
    n, c_out, c_in, k = num_kernels, out_channels, in_channels, kernel_size
    fig, ax = plt.subplots(figsize=(6.3, 4.4))
    ax.set_xlim(0, 12.6)
    ax.set_ylim(0, 8.8)
    ax.set_aspect("equal")
    ax.set_axis_off()
    data, branch = "#dbe9f6", "#fbe3c8"

    # the shared trunk, left to right
    trunk = [
        ("input $x$\n$[N, C_{\\mathrm{in}}, H, W]$", 2.1, data),
        ("GAP\n$[N, C_{\\mathrm{in}}]$", 1.3, branch),
        ("FC, $C_{\\mathrm{in}}\\to h$\n(no bias)", 1.8, branch),
        ("BN", 0.8, branch),
        ("ReLU", 0.9, branch),
        ("$a$: $[N, h]$\n$h=\\max(C_{\\mathrm{in}}r, 16)$", 2.6, data),
    ]
    y0, height, gap = 7.35, 0.9, 0.38
    x = 0.15
    ends = []
    for text, width, color in trunk:
        _od_box(ax, x, y0, width, height, text, color=color)
        ends.append((x, x + width))
        x += width + gap
    for (_, right), (left, _) in zip(ends, ends[1:]):
        _od_arrow(ax, (right, y0 + height / 2), (left, y0 + height / 2))
    ax.text(0.15, y0 + height + 0.12, "one trunk per layer, shared by the four heads",
            fontsize=8, va="bottom", style="italic")  # fmt: skip

    # the four heads, fed by a bus from the hidden vector a
    heads = [
        ("filter", "$\\alpha_f$: filter, $\\sigma$\nscales axis $C_{\\mathrm{out}}$"),
        ("channel", "$\\alpha_c$: channel, $\\sigma$\nscales axis $C_{\\mathrm{in}}$"),
        ("spatial", "$\\alpha_s$: spatial, $\\sigma$\nscales axes $k\\times k$"),
        ("kernel", "$\\alpha_w$: kernel, softmax\nscales axis $n$"),
    ]
    hy, hh, hw = 5.25, 0.95, 2.75
    centres = [0.15 + hw / 2 + i * (hw + 0.4) for i in range(4)]
    a_mid = (ends[-1][0] + ends[-1][1]) / 2
    bus = 6.75
    ax.plot([a_mid, a_mid], [y0, bus], color="0.25", lw=1.1)
    span = [min(centres[0], a_mid), max(centres[-1], a_mid)]
    ax.plot(span, [bus, bus], color="0.25", lw=1.1)
    for (key, text), cx in zip(heads, centres):
        _od_box(ax, cx - hw / 2, hy, hw, hh, text, color="white",
                edge=_OD_COLORS[key])  # fmt: skip
        _od_arrow(ax, (cx, bus), (cx, hy + hh))
    ax.text(a_mid - 0.15, (y0 + bus) / 2, "heads: $z=W_*a+b_*$, $f(z/\\tau)$",
            fontsize=7.5, va="center", ha="right", color="0.25")  # fmt: skip

    # the kernel bank: n panels of c_out rows x c_in columns of k x k taps
    cell, inner = 0.2, 0.12
    group = k * cell
    panel_w = c_in * group + (c_in - 1) * inner
    panel_h = c_out * group + (c_out - 1) * inner
    scale = min(1.0, 3.2 / panel_h, 9.4 / (n * panel_w + (n - 1) * 0.8))
    cell, inner = cell * scale, inner * scale
    group = k * cell
    panel_w = c_in * group + (c_in - 1) * inner
    panel_h = c_out * group + (c_out - 1) * inner
    pgap = (9.4 - n * panel_w) / max(n - 1, 1)
    pgap = min(pgap, 1.2)
    left0 = 12.45 - n * panel_w - (n - 1) * pgap
    bottom = 1.05
    row_hl, col_hl, tap_hl = 0, 0, (0, k - 1)
    lefts = [left0 + i * (panel_w + pgap) for i in range(n)]
    for i, left in enumerate(lefts):
        for o in range(c_out):
            gy = bottom + (c_out - 1 - o) * (group + inner)
            for c in range(c_in):
                gx = left + c * (group + inner)
                for a in range(k):
                    for b in range(k):
                        face = _OD_COLORS["spatial"] if (a, b) == tap_hl else "#f2f2f2"
                        ax.add_patch(Rectangle(
                            (gx + b * cell, gy + (k - 1 - a) * cell), cell, cell,
                            facecolor=face, edgecolor="0.65", lw=0.4,
                        ))  # fmt: skip
        pad = 0.07
        row_y = bottom + (c_out - 1 - row_hl) * (group + inner)
        ax.add_patch(Rectangle(
            (left - pad, row_y - pad), panel_w + 2 * pad, group + 2 * pad,
            fill=False, edgecolor=_OD_COLORS["filter"], lw=1.6,
        ))  # fmt: skip
        col_x = left + col_hl * (group + inner)
        ax.add_patch(Rectangle(
            (col_x - pad, bottom - pad), group + 2 * pad, panel_h + 2 * pad,
            fill=False, edgecolor=_OD_COLORS["channel"], lw=1.6,
        ))  # fmt: skip
        if i == n - 1:
            ax.add_patch(Rectangle(
                (left - 2.2 * pad, bottom - 2.2 * pad), panel_w + 4.4 * pad,
                panel_h + 4.4 * pad, fill=False, edgecolor=_OD_COLORS["kernel"],
                lw=1.6, ls="--",
            ))  # fmt: skip
        label = f"$W_{{{i + 1}}}$" if i < n - 1 else "$W_n$"
        ax.text(left + panel_w / 2, bottom - 0.3, label, ha="center", va="top",
                fontsize=9)  # fmt: skip
    top = bottom + panel_h

    # arrows from each head to what one of its values scales
    row_y = bottom + (c_out - 1 - row_hl) * (group + inner) + group / 2
    targets = {
        "filter": (lefts[0] - 0.1, row_y),
        "channel": (lefts[0] + group / 2, top + 0.1),
        "spatial": (
            lefts[min(1, n - 1)] + (tap_hl[1] + 0.5) * cell,
            top - (tap_hl[0] + 0.5) * cell,
        ),
        "kernel": (lefts[-1] + panel_w / 2, top + 0.18),
    }
    for (key, _), cx in zip(heads, centres):
        _od_arrow(ax, (cx, hy), targets[key], color=_OD_COLORS[key], lw=1.4)
    ax.text(0.15, 0.3,
            "$\\tilde W(x)=\\alpha_f\\odot\\alpha_c\\odot\\alpha_s\\odot"
            "\\sum_i\\alpha_{wi}W_i$", fontsize=9, va="center")  # fmt: skip
    ax.text(0.15, 2.35,
            "kernel bank\n$[n, C_{\\mathrm{out}}, C_{\\mathrm{in}}/g, k, k]$\n"
            "rows: $C_{\\mathrm{out}}$ filters\n"
            "columns: $C_{\\mathrm{in}}/g$ channels\n"
            "cells: $k\\times k$ taps\n\none value of an attention\n"
            "scales its coloured part;\n$\\alpha_s,\\alpha_c,\\alpha_f$ are "
            "shared\nby the $n$ kernels",
            fontsize=7.5, va="center", color="0.2", linespacing=1.25)  # fmt: skip
    ax.set_title("ODConv: four attentions from one trunk, one per axis of the bank",
                 fontsize=10)  # fmt: skip
    return fig


# === chapter 6: deformable-convolution diagrams ======================================


#: The kinds of sampling grid :func:`deformable_offsets` knows, in panel order.
DEFORMABLE_GRID_KINDS = ("regular", "dilated", "scaled", "rotated", "learned")


def deformable_offsets(
    kind: str,
    *,
    kernel_size: int = 3,
    dilation: float = 2.0,
    scale: float = 1.6,
    angle: float = 30.0,
    offsets=None,
):
    r"""The offsets :math:`\Delta p_t` that turn a regular grid into another one.

    For a ``k x k`` kernel the regular tap offsets :math:`p_t` (rows first, taps in
    row-major order, centred on the output location :math:`p_0`) are moved to
    :math:`p_t + \Delta p_t`. The special cases of the DCNv1 paper's Figure 1
    (Dai et al., ICCV 2017) are fixed offsets: ``"dilated"``
    (:math:`\Delta p_t=(d-1)\,p_t`), ``"scaled"`` (:math:`(s-1)\,p_t`, a
    non-integer dilation) and ``"rotated"`` (:math:`R_\theta p_t - p_t`, turned
    anticlockwise on the page by ``angle`` degrees); ``"learned"`` returns
    ``offsets``, arbitrary ones such as a trained layer predicts. Chapter 6.

    Args:
        kind: one of :data:`DEFORMABLE_GRID_KINDS`.
        kernel_size: ``k``, an odd number of taps per side.
        dilation, scale: the factors of ``"dilated"`` and ``"scaled"`` (> 0).
        angle: the rotation of ``"rotated"``, in degrees.
        offsets: ``Tensor[k*k, 2]`` of ``(dy, dx)`` for ``"learned"``.

    Returns:
        ``(taps, delta)``: two ``Tensor[k*k, 2]`` (float64) of ``(row, column)``
        pairs, :math:`p_t` and :math:`\Delta p_t`. ``delta`` is in the order of
        ``torchvision.ops.deform_conv2d``'s offset channels: ``delta.flatten()``
        is one offset group's ``2*k*k`` channels.

    Raises:
        ValueError: an unknown ``kind``, an even or non-positive ``kernel_size``,
            a non-positive factor, or ``offsets`` missing or of the wrong shape.
    """
    import math

    import torch

    owner = "deformable_offsets"
    if kind not in DEFORMABLE_GRID_KINDS:
        raise ValueError(
            f"{owner} expected kind in {DEFORMABLE_GRID_KINDS}, got {kind!r}"
        )
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(
            f"{owner} expected an odd positive int kernel_size, got {kernel_size!r}"
        )
    for name, value in (("dilation", dilation), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{owner} expected {name} > 0, got {value!r}")
    half = (kernel_size - 1) // 2
    steps = torch.arange(-half, half + 1, dtype=torch.float64)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    taps = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    if kind == "regular":
        return taps, torch.zeros_like(taps)
    if kind == "dilated":
        return taps, (dilation - 1) * taps
    if kind == "scaled":
        return taps, (scale - 1) * taps
    if kind == "rotated":
        theta = math.radians(angle)
        c, s = math.cos(theta), math.sin(theta)
        # rows grow downwards, so an anticlockwise turn on the page is
        # (row, col) -> (c*row - s*col, s*row + c*col)
        turned = torch.stack(
            [c * taps[:, 0] - s * taps[:, 1], s * taps[:, 0] + c * taps[:, 1]], dim=1
        )
        return taps, turned - taps
    if offsets is None:
        raise ValueError(f"{owner} expected offsets for kind='learned', got None")
    delta = torch.as_tensor(offsets, dtype=torch.float64).cpu()
    if delta.shape != taps.shape:
        raise ValueError(
            f"{owner} expected offsets of shape {tuple(taps.shape)}, got "
            f"{tuple(delta.shape)}"
        )
    return taps, delta.clone()


def plot_deformable_grids(
    *,
    kernel_size: int = 3,
    dilation: float = 2.0,
    scale: float = 1.6,
    angle: float = 30.0,
    offsets=None,
    seed: int = 0,
):
    r"""Five sampling grids of a ``k x k`` kernel on a pixel grid, one per panel.

    After Figure 1 of the DCNv1 paper (Dai et al., ICCV 2017), drawn from
    :func:`deformable_offsets`: (a) the regular grid :math:`p_0 + p_t`, then the
    grids that fixed offsets give, (b) dilated, (c) scaled and (d) rotated, and
    (e) a learned grid, arbitrary offsets :math:`\Delta p_t`. Each panel shows the
    pixels (light squares), the output location :math:`p_0`, the regular taps
    (grey) and, for (b) to (e), each sampling point :math:`p_0+p_t+\Delta p_t`
    with an arrow from its regular tap. The sixth cell holds the legend. Chapter 6.

    Args:
        kernel_size, dilation, scale, angle: as in :func:`deformable_offsets`.
        offsets: ``Tensor[k*k, 2]`` for panel (e); by default Gaussian offsets of
            standard deviation 0.7 drawn from a generator seeded with ``seed``.
        seed: the seed of the default offsets.

    Returns:
        The ``matplotlib.figure.Figure`` (6.3 inches wide, three rows of two).

    Raises:
        ValueError: bad arguments (see :func:`deformable_offsets`).
    """
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrow, Rectangle

    if offsets is None:
        generator = torch.Generator().manual_seed(seed)
        offsets = 0.7 * torch.randn(
            kernel_size * kernel_size, 2, generator=generator, dtype=torch.float64
        )
    settings = {"dilation": dilation, "scale": scale, "angle": angle}
    grids = {
        kind: deformable_offsets(
            kind, kernel_size=kernel_size, offsets=offsets, **settings
        )
        for kind in DEFORMABLE_GRID_KINDS
    }
    titles = {
        "regular": "(a) regular",
        "dilated": f"(b) dilated, d = {dilation:g}",
        "scaled": f"(c) scaled by {scale:g}",
        "rotated": f"(d) rotated by {angle:g}°",
        "learned": "(e) learned: arbitrary offsets",
    }
    reach = max(float((taps + delta).abs().max()) for taps, delta in grids.values())
    half = int(reach) + 1
    fig, axes = plt.subplots(3, 2, figsize=(6.3, 8.6))
    for ax, kind in zip(axes.flat, DEFORMABLE_GRID_KINDS):
        taps, delta = grids[kind]
        for r in range(-half, half + 1):
            for c in range(-half, half + 1):
                ax.add_patch(
                    Rectangle(
                        (c - 0.5, r - 0.5), 1, 1, facecolor=COLORS["input"],
                        edgecolor="white", lw=1.0, alpha=0.45,
                    )
                )  # fmt: skip
        ax.plot(taps[:, 1], taps[:, 0], "o", ms=7, color=COLORS["static"], zorder=3)
        points = taps + delta
        if kind != "regular":
            for (r, c), (dr, dc) in zip(taps.tolist(), delta.tolist()):
                if dr * dr + dc * dc > 1e-6:
                    ax.add_patch(
                        FancyArrow(
                            c, r, dc, dr, width=0.02, head_width=0.16,
                            length_includes_head=True, color="0.35", zorder=4,
                        )
                    )  # fmt: skip
            ax.plot(
                points[:, 1], points[:, 0], "o", ms=7, color=COLORS["kernel"],
                markeredgecolor="black", zorder=5,
            )  # fmt: skip
        ax.plot(0, 0, "X", ms=9, color=COLORS["current"], zorder=6)
        ax.set_xlim(-half - 0.5, half + 0.5)
        ax.set_ylim(half + 0.5, -half - 0.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[kind])
    legend_ax = axes.flat[len(DEFORMABLE_GRID_KINDS)]
    legend_ax.axis("off")
    handles = [
        Line2D([], [], ls="", marker="s", ms=10, color=COLORS["input"], label="pixel"),
        Line2D([], [], ls="", marker="X", ms=9, color=COLORS["current"],
               label="output location $p_0$"),
        Line2D([], [], ls="", marker="o", ms=7, color=COLORS["static"],
               label="regular tap $p_0+p_t$"),
        Line2D([], [], ls="", marker="o", ms=7, color=COLORS["kernel"],
               markeredgecolor="black",
               label="sampling point\n$p_0+p_t+\\Delta p_t$"),
        Line2D([], [], color="0.35", label="offset $\\Delta p_t$"),
    ]  # fmt: skip
    legend_ax.legend(handles=handles, loc="center", fontsize=10, labelspacing=1.1)
    fig.suptitle(f"Sampling grids of a {kernel_size}×{kernel_size} kernel")
    return fig


def plot_offset_layout(kernel_size=(3, 3), offset_groups: int = 2):
    r"""Which channels of ``offset`` and ``mask`` belong to each kernel tap.

    One panel per offset group :math:`\gamma`: the ``k_H x k_W`` taps, each
    labelled with its number :math:`t` (row-major, from 1), its kernel row and
    column, and the channels of ``torchvision.ops.deform_conv2d``'s layout:
    :math:`\Delta y` in channel :math:`2(\gamma k_H k_W + t - 1)`, :math:`\Delta x`
    in the next one, the mask in :math:`\gamma k_H k_W + t - 1`. DCNv1 (Dai et al.,
    ICCV 2017) and DCNv2 (Zhu et al., CVPR 2019); chapter 6.

    Args:
        kernel_size: ``k`` or ``(k_H, k_W)``.
        offset_groups: :math:`g_\Delta`, one panel each (at most 4).

    Returns:
        The ``matplotlib.figure.Figure`` (5 inches wide, one row per group).

    Raises:
        ValueError: a non-positive kernel size, or ``offset_groups`` not in 1..4.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ._validation import pair

    owner = "plot_offset_layout"
    kh, kw = pair(kernel_size, "kernel_size", owner=owner)
    if kh < 1 or kw < 1:
        raise ValueError(
            f"{owner} expected a positive kernel_size, got {kernel_size!r}"
        )
    if (
        isinstance(offset_groups, bool)
        or not isinstance(offset_groups, int)
        or not 1 <= offset_groups <= 4
    ):
        raise ValueError(
            f"{owner} expected offset_groups in 1..4, got {offset_groups!r}"
        )
    taps = kh * kw
    fig, axes = plt.subplots(
        offset_groups, 1, figsize=(5.0, 1.25 * kh * offset_groups + 0.6), squeeze=False
    )
    for group, ax in enumerate(axes[:, 0]):
        for a in range(kh):
            for b in range(kw):
                t = a * kw + b + 1
                channel = 2 * (group * taps + t - 1)
                ax.add_patch(
                    Rectangle(
                        (b - 0.45, a - 0.45), 0.9, 0.9,
                        facecolor=COLORS["kernel"], alpha=0.15 + 0.15 * group,
                    )
                )  # fmt: skip
                ax.text(b, a - 0.2, f"tap {t} ({a},{b})", ha="center", fontsize=9)
                ax.text(b, a + 0.03, f"Δy: ch {channel}", ha="center", fontsize=9)
                ax.text(b, a + 0.23, f"Δx: ch {channel + 1}", ha="center", fontsize=9)
                ax.text(
                    b, a + 0.42, f"mask: ch {group * taps + t - 1}", ha="center",
                    fontsize=8, color=COLORS["dynamic"],
                )  # fmt: skip
        ax.set_xlim(-0.5, kw - 0.5)
        ax.set_ylim(kh - 0.5, -0.5)
        ax.set_xticks(range(kw))
        ax.set_yticks(range(kh))
        ax.set_xlabel("kernel column b")
        ax.set_ylabel("kernel row a")
        ax.set_title(f"offset group {group} (input channels of group {group})")
    fig.suptitle(
        f"Offset and mask channels of each tap\n"
        f"({kh}×{kw} kernel, {offset_groups} offset group"
        f"{'s' if offset_groups > 1 else ''})"
    )
    return fig


# === chapter 8: side-by-side figures =================================================

#: The panels :func:`plot_cost_matrix` can draw: key of a
#: :func:`refimpl.bench.run_stages` row -> panel title. ``params`` and ``macs``
#: are divided by the baseline's here; the others are ratios already.
COST_MEASURES = {
    "params": "parameters",
    "macs": "MACs",
    "forward_ratio": "forward time",
    "forward_backward_ratio": "forward+backward time",
    "peak_ratio": "peak memory (fwd+bwd)",
}


def _stage_ratio(row: dict, base: dict, key: str) -> float:
    value = row.get(key)
    if key not in ("params", "macs"):
        return float("nan") if value is None else float(value)
    if value is None or not base.get(key):
        return float("nan")
    return value / base[key]


def plot_cost_matrix(
    rows: list[dict],
    *,
    batch: int | None = None,
    measures=("params", "macs", "forward_backward_ratio", "peak_ratio"),
    title: str | None = None,
):
    """Draw every operator's cost against ``nn.Conv2d`` at every stage shape.

    One heatmap per measure (two per row of panels): one row per operator, one
    column per ``(channels, size)`` shape, each cell the operator's figure
    divided by the baseline's at the same shape and batch (1 = as costly as a
    static convolution), on a logarithmic colour scale from 1/10 (blue) to 10
    (red), with the ratio written in the cell (blank where it was not measured).
    The rows are those of :func:`refimpl.bench.run_stages`, whose first row at
    every shape is the baseline. Chapter 8 draws it for CondConv, DynamicConv,
    ODConv, DDF, DCNv2 and FDConv at the four ResNet-50 stage shapes.

    Args:
        rows: the rows of :func:`refimpl.bench.run_stages` (skipped rows are
            left out).
        batch: the batch size to draw (default: the largest in ``rows``).
        measures: keys of :data:`COST_MEASURES`, one panel each.
        title: the figure's title (default: says the batch).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: no rows, a batch that is not in ``rows``, an unknown or
            repeated measure, or no measure.
    """
    import math

    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    if not rows:
        raise ValueError("plot_cost_matrix expected rows from run_stages, got none")
    measures = list(measures)
    unknown = [m for m in measures if m not in COST_MEASURES]
    if not measures or unknown or len(set(measures)) != len(measures):
        raise ValueError(
            f"plot_cost_matrix expected distinct measures from "
            f"{list(COST_MEASURES)}, got {measures}"
        )
    batches = sorted({r["batch"] for r in rows})
    batch = batches[-1] if batch is None else batch
    if batch not in batches:
        raise ValueError(f"plot_cost_matrix expected batch in {batches}, got {batch!r}")
    here = [r for r in rows if r["batch"] == batch]
    stages = list(dict.fromkeys((r["channels"], r["size"]) for r in here))
    base = {}
    for r in here:  # the first row at each shape is the baseline
        base.setdefault((r["channels"], r["size"]), r)
    baseline = here[0]["name"]
    names = [
        n
        for n in dict.fromkeys(r["name"] for r in here if not r.get("skipped"))
        if n != baseline
    ]
    ncols = 2 if len(measures) > 1 else 1
    nrows = math.ceil(len(measures) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(6.3, 0.3 * len(names) * nrows + 1.3 * nrows + 0.6),
        squeeze=False,
        sharey=True,
    )
    norm = LogNorm(vmin=0.1, vmax=10.0)
    image = None
    for index, key in enumerate(measures):
        ax = axes[index // ncols][index % ncols]
        grid = np.full((len(names), len(stages)), np.nan)
        for r in here:
            if r.get("skipped") or r["name"] not in names:
                continue
            stage = (r["channels"], r["size"])
            value = _stage_ratio(r, base[stage], key)
            grid[names.index(r["name"]), stages.index(stage)] = value
        shown = np.where(grid > 0, grid, np.nan)
        image = ax.imshow(
            np.clip(shown, 0.1, 10.0), cmap="RdBu_r", norm=norm, aspect="auto"
        )
        for i in range(len(names)):
            for j in range(len(stages)):
                if np.isfinite(grid[i, j]):
                    v = grid[i, j]
                    text = f"{v:.2f}" if v < 10 else f"{v:.0f}"
                    dark = abs(math.log10(max(min(v, 10.0), 0.1))) > 0.6
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
        ax.set_xticks(range(len(stages)), [f"{c}ch\n{s}²" for c, s in stages])
        ax.set_yticks(range(len(names)), names)
        ax.tick_params(labelsize=7)
        ax.set_title(COST_MEASURES[key], fontsize=9)
    for extra in range(len(measures), nrows * ncols):
        axes[extra // ncols][extra % ncols].set_visible(False)
    bar = fig.colorbar(
        image, ax=axes.ravel().tolist(), orientation="horizontal", fraction=0.05
    )
    bar.set_label(f"ratio to {baseline} at the same shape (log scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(
        title or f"Cost of each operator against {baseline}, batch {batch}",
        fontsize=10,
    )
    return fig
