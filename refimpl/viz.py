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
    #
    #
    # --- chapter 2: CondConv
    #
    #
    # --- chapter 3: attention over kernels
    #
    #
    # --- chapter 4: ODConv
    #
    #
    # --- chapter 6: deformable convolution
    #
    #
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


# (end of chapter 1 diagrams)


# === chapter 2: CondConv diagrams ====================================================


# (end of chapter 2 diagrams)


# === chapter 3: attention-over-kernels diagrams ======================================


# (end of chapter 3 diagrams)


# === chapter 4: ODConv diagrams ======================================================


# (end of chapter 4 diagrams)


# === chapter 6: deformable-convolution diagrams ======================================


# (end of chapter 6 diagrams)


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


# (end of chapter 8 figures)
