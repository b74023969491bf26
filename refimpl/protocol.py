"""The one controlled protocol behind every experiment of the book.

A chapter's experiment compares *arms*: networks that differ only in their
convolutions. Every arm is trained from the same data, with the same optimiser and
schedule, once per seed, and reported with the spread over seeds, its parameters
and its multiply-adds. Two static arms are always part of the comparison, because a
dynamic layer adds parameters and (a little) work, and a gain over a static network
that is smaller on both counts says nothing about dynamism:

* a static network **matched in parameters**: the static network whose width
  gives the parameter count closest to the dynamic one's (:func:`match_width`;
  it can have a few more or a few fewer);
* a static network **matched in multiply-adds** (MACs): the same for MACs.

Pieces:

* :class:`Task`: a data set bound to its training loop and its score
  (:func:`texture_task`, :func:`denoising_task`, :func:`segmentation_task`);
  :data:`HARD_TEXTURES` is the classification setting of chapters 2 to 4
  (chapter 8, on a smaller budget, uses an easier one), chosen so that no
  method saturates (a static network of width 8 scores about
  0.75, one of width 16 about 0.87);
* :class:`Arm`: a name, a builder and an optional temperature hook;
* :func:`matched_static_arms`: the two static baselines for a dynamic network;
* :func:`run_protocol`: trains every arm for every seed and returns
  :class:`ArmResult` records; :func:`format_results` and :func:`plot_results`
  show them.

MACs are counted the papers' way, one multiply-add counted once, with
``torch.utils.flop_counter`` for one test sample (:func:`count_macs`).

Typical use (chapter 3)::

    task = texture_task(epochs=6).to(device)
    dynamic = Arm("DynamicConv", lambda: TinyCNN(DynamicConv2d, num_classes=16))
    params, macs = matched_static_arms(
        lambda w: TinyCNN(nn.Conv2d, num_classes=16, width=w),
        dynamic.build(), task.example)
    results = run_protocol([params, macs, dynamic], task, seeds=(0, 1, 2))
    print(format_results(results))
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._conv import Conv2dBase
from ._validation import check_positive_int
from .toy import (
    DenoisingData,
    SegmentationData,
    ToyData,
    make_oriented_textures,
    train,
    train_denoiser,
    train_segmenter,
)

__all__ = [
    "HARD_TEXTURES",
    "Task",
    "texture_task",
    "denoising_task",
    "segmentation_task",
    "Arm",
    "ArmResult",
    "count_macs",
    "count_params",
    "match_width",
    "matched_static_arms",
    "run_protocol",
    "format_results",
    "plot_results",
]

#: Keyword arguments of :func:`refimpl.toy.make_oriented_textures` for the book's
#: classification experiments: 16 orientations, noise of standard deviation 1,
#: 2048 training and 1024 test images of 16 x 16 pixels.
HARD_TEXTURES = {"num_classes": 16, "noise": 1.0, "num_train": 2048, "num_test": 1024}

Hook = Callable[[nn.Module, float], None]


_KINDS = {
    # kind: (data type, trainer, score of the trainer's history, metric name)
    "textures": (ToyData, train, lambda h: h.final_accuracy, "test accuracy"),
    "denoising": (DenoisingData, train_denoiser, lambda h: h.gain_db, "gain (dB)"),
    "segmentation": (
        SegmentationData,
        train_segmenter,
        lambda h: h.final_miou,
        "test mIoU",
    ),  # fmt: skip
}


@dataclasses.dataclass(frozen=True)
class Task:
    """A data set bound to its training loop and its score (higher is better).

    Build one with :func:`texture_task`, :func:`denoising_task` or
    :func:`segmentation_task`.

    Attributes:
        kind: ``"textures"``, ``"denoising"`` or ``"segmentation"``.
        data: the task's data set (a :mod:`refimpl.toy` data class).
        epochs: passes over the training set.
        lr: the initial Adam learning rate, decayed to zero along a cosine.
        batch_size: samples per step (batches are shuffled by the seed's
            generator).
    """

    kind: str
    data: ToyData | DenoisingData | SegmentationData
    epochs: int
    lr: float
    batch_size: int

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"Task expected kind in {sorted(_KINDS)}, got {self.kind!r}"
            )
        data_type = _KINDS[self.kind][0]
        if not isinstance(self.data, data_type):
            raise TypeError(
                f"Task of kind {self.kind!r} expected data to be a "
                f"{data_type.__name__}, got {type(self.data).__name__}"
            )
        owner = f"{self.kind} task"
        check_positive_int(self.epochs, "epochs", owner=owner)
        check_positive_int(self.batch_size, "batch_size", owner=owner)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"{owner} expected lr > 0, got {lr!r}")

    @property
    def metric(self) -> str:
        """The name of the score."""
        return _KINDS[self.kind][3]

    @property
    def example(self) -> Tensor:
        """``Tensor[1, C, S, S]``: the first test input, for counting MACs."""
        return self.data.test_x[:1]

    @property
    def num_outputs(self) -> int:
        """The number of classes (image channels for denoising) a network
        must output."""
        if self.kind == "denoising":
            return self.data.test_y.shape[1]
        return self.data.num_classes

    def to(self, device: torch.device | str) -> Task:
        """The same task with its data on ``device``."""
        return dataclasses.replace(self, data=self.data.to(device))

    def fit(
        self, model: nn.Module, generator: torch.Generator, hook: Hook | None = None
    ) -> float:
        """Train ``model`` (on the data's device) and return its final score."""
        _, trainer, score, _ = _KINDS[self.kind]
        history = trainer(
            model, self.data, epochs=self.epochs, lr=self.lr,
            batch_size=self.batch_size, generator=generator, on_iteration_start=hook,
        )  # fmt: skip
        return float(score(history))


def texture_task(
    data: ToyData | None = None,
    *,
    epochs: int = 6,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> Task:
    """Oriented-texture classification (:func:`refimpl.toy.train`), scored by
    test accuracy.

    ``data`` defaults to ``make_oriented_textures(**HARD_TEXTURES)`` drawn on the
    CPU from a generator seeded with ``seed``; move the task with
    :meth:`Task.to`.
    """
    if data is None:
        generator = torch.Generator().manual_seed(seed)
        data = make_oriented_textures(generator=generator, **HARD_TEXTURES)
    return Task("textures", data, epochs, lr, batch_size)


def denoising_task(
    data: DenoisingData, *, epochs: int = 10, lr: float = 3e-3, batch_size: int = 32
) -> Task:
    """Patchwork denoising (:func:`refimpl.toy.train_denoiser`), scored by the PSNR
    gain over the noisy input, in dB."""
    return Task("denoising", data, epochs, lr, batch_size)


def segmentation_task(
    data: SegmentationData, *, epochs: int = 6, lr: float = 3e-3, batch_size: int = 32
) -> Task:
    """Frequency segmentation (:func:`refimpl.toy.train_segmenter`), scored by the
    test mean IoU."""
    return Task("segmentation", data, epochs, lr, batch_size)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One network of a comparison.

    Attributes:
        name: the label in tables and plots.
        build: ``build() -> nn.Module``, a fresh network on the CPU; it is called
            after ``torch.manual_seed(seed)``, so the seed fixes the initialisation.
        hook: optional ``hook(model, progress)`` called before every training step
            (a temperature schedule, :func:`refimpl.dynamic_conv.temperature_schedule`).
    """

    name: str
    build: Callable[[], nn.Module]
    hook: Hook | None = None


@dataclasses.dataclass
class ArmResult:
    """The outcome of one arm over all seeds.

    Attributes:
        name: the arm's name.
        params: trainable parameters of the network.
        macs: multiply-adds of one forward pass for one sample (:func:`count_macs`).
        scores: the final score of every seed, in seed order.
        seconds_per_epoch: mean wall-clock seconds per training epoch (machine
            dependent).
        metric: the name of the score.
        dynamic: whether the network has a dynamic layer (an operator of
            ``refimpl``); plots colour static and dynamic arms apart.
        models: the trained networks, one per seed, when :func:`run_protocol`
            was asked to keep them (``keep_models=True``); empty otherwise.
    """

    name: str
    params: int
    macs: int
    scores: list[float]
    seconds_per_epoch: float
    metric: str
    dynamic: bool = False
    models: list[nn.Module] = dataclasses.field(default_factory=list, repr=False)

    @property
    def mean(self) -> float:
        """Mean score over the seeds."""
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        """Sample standard deviation of the scores (0 for a single seed)."""
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


def count_params(model: nn.Module) -> int:
    """Trainable parameters of ``model`` (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(
    model: nn.Module, example: Tensor, *, algorithm: str | None = "grouped"
) -> int:
    """Multiply-adds of ``model(example)``, each multiply-add counted once.

    ``torch.utils.flop_counter`` counts two FLOPs per multiply-add of every
    convolution and matrix product, so its total is halved; elementwise work
    (activations, normalisation, the broadcast mixing of kernels) is not
    counted, as in the papers' tables. The model runs in evaluation mode without
    gradients, so BatchNorm statistics are untouched; its mode is restored.

    Layers with a kernel bank choose their algorithm by speed
    (:func:`refimpl.per_sample.choose_bank_algorithm`), and at a small spatial size
    convolving with every kernel and mixing the outputs can be the faster one,
    with ``n`` times the multiply-adds. The papers count the kernel-mixing
    algorithm (mix, then one convolution), so by default every module with an
    ``algorithm`` attribute is counted with ``algorithm="grouped"``; pass
    ``algorithm=None`` to count what the layers would run.

    DDF's filtering is elementwise work the counter does not see, but it is the
    layer's convolution: one multiply-add per tap, channel and output pixel, as a
    depthwise convolution (chapter 5), which is added for every
    :class:`refimpl.ddf.DDFConv2d` (as :mod:`refimpl.bench` does).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, nn.Module):
        raise TypeError(f"count_macs expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example, Tensor):
        raise TypeError(
            f"count_macs expected example to be a Tensor, got {type(example).__name__}"
        )
    from .ddf import DDFConv2d  # imported here: chapter 5 builds on this module

    was_training = model.training
    banks = [m for m in model.modules() if hasattr(m, "algorithm")]
    taps = [0]

    def count_taps(module, inputs, output):
        # output: Tensor[N, C, H_out, W_out]; one multiply-add per tap and element
        taps[0] += output.numel() * module.kernel_size[0] * module.kernel_size[1]

    hooks = [
        m.register_forward_hook(count_taps)
        for m in model.modules()
        if isinstance(m, DDFConv2d)
    ]
    chosen = [m.algorithm for m in banks]
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        if algorithm is not None:
            for m in banks:
                m.algorithm = algorithm
        with torch.no_grad(), counter:
            model(example)
    finally:
        model.train(was_training)
        for m, a in zip(banks, chosen):
            m.algorithm = a
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() // 2 + taps[0]


def match_width(
    build: Callable[[int], nn.Module],
    target: int,
    measure: Callable[[nn.Module], int],
    widths: Iterable[int] = range(1, 257),
) -> int:
    """The width whose network ``build(width)`` comes closest to ``target``.

    ``measure`` is :func:`count_params` or a MAC count; ties go to the smaller
    width. The search stops once the measure passes ``target`` (it grows with
    the width).
    """
    best, best_gap = None, math.inf
    for width in widths:
        value = measure(build(width))
        gap = abs(value - target)
        if gap < best_gap:
            best, best_gap = width, gap
        if value > target:
            break
    if best is None:
        raise ValueError("match_width expected at least one width to try")
    return best


def matched_static_arms(
    build_static: Callable[[int], nn.Module],
    dynamic: nn.Module,
    example: Tensor,
    *,
    widths: Iterable[int] = range(1, 257),
) -> tuple[Arm, Arm]:
    """The two static baselines of a dynamic network.

    Args:
        build_static: ``build_static(width) -> nn.Module``, the static network.
        dynamic: the dynamic network to match.
        example: one input sample, ``Tensor[1, C, S, S]``, for the MAC counts.
        widths: the widths to try.

    Returns:
        ``(matched_in_params, matched_in_macs)``, two :class:`Arm`, named
        ``"static, w=<width> (params)"`` and ``"static, w=<width> (MACs)"``.
    """
    widths = list(widths)
    # the dynamic network is counted where it lives (it is not moved); the static
    # candidates are built and counted on the CPU
    where = next(dynamic.parameters(), example).device
    target_macs = count_macs(dynamic, example.to(where))
    example = example.to("cpu")
    p_width = match_width(build_static, count_params(dynamic), count_params, widths)
    m_width = match_width(
        build_static, target_macs, lambda m: count_macs(m, example), widths
    )
    return (
        Arm(f"static, w={p_width} (params)", lambda: build_static(p_width)),
        Arm(f"static, w={m_width} (MACs)", lambda: build_static(m_width)),
    )


def run_protocol(
    arms: Sequence[Arm],
    task: Task,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    device: torch.device | str | None = None,
    threads: int | None = 1,
    keep_models: bool = False,
) -> list[ArmResult]:
    """Train every arm once per seed on ``task`` and collect the scores.

    For seed ``s``: ``torch.manual_seed(s)``, ``arm.build()``, the model moved to
    the task's device, then ``task.fit`` with a ``torch.Generator`` seeded with
    ``s`` for the shuffling. Parameters and MACs are counted on the CPU before
    training.

    Args:
        arms: the networks to compare (names must be unique).
        task: a :class:`Task` (:func:`texture_task` and its kind).
        seeds: one training run per seed.
        device: where to train; the device of ``task.example`` by default.
        threads: CPU threads during training (tiny networks run faster on one;
            ``None`` keeps the current setting). Restored afterwards.
        keep_models: keep every trained network in :attr:`ArmResult.models`
            (to look inside them afterwards); by default they are dropped.

    Returns:
        One :class:`ArmResult` per arm, in the order of ``arms``.
    """
    if not isinstance(task, Task):
        raise TypeError(f"run_protocol expected a Task, got {type(task).__name__}")
    arms = list(arms)
    if not arms or not all(isinstance(a, Arm) for a in arms):
        raise TypeError("run_protocol expected a non-empty sequence of Arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"run_protocol expected unique arm names, got {names}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("run_protocol expected at least one seed")
    device = task.example.device if device is None else torch.device(device)
    example = task.example.to("cpu")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    results = []
    try:
        for arm in arms:
            torch.manual_seed(seeds[0])
            probe = arm.build()
            result = ArmResult(
                arm.name, count_params(probe), count_macs(probe, example), [], 0.0,
                task.metric, any(isinstance(m, Conv2dBase) for m in probe.modules()),
            )  # fmt: skip
            seconds = 0.0
            for seed in seeds:
                torch.manual_seed(seed)
                model = arm.build().to(device)
                generator = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                result.scores.append(task.fit(model, generator, arm.hook))
                seconds += time.perf_counter() - start
                if keep_models:
                    result.models.append(model)
            result.seconds_per_epoch = seconds / (len(seeds) * task.epochs)
            results.append(result)
    finally:
        torch.set_num_threads(previous)
    return results


def _si(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def format_results(
    results: Sequence[ArmResult], *, digits: int = 3, timing: bool = True
) -> str:
    """A text table of ``results``: parameters, MACs, mean ± std, per-seed scores.

    ``timing=False`` leaves out the seconds per epoch, the one column that depends
    on the machine.
    """
    if not results:
        raise ValueError("format_results expected at least one result")
    width = max(len(r.name) for r in results)
    scores = [f"{r.mean:.{digits}f} ± {r.std:.{digits}f}" for r in results]
    label = f"{results[0].metric}, mean ± std"
    score_width = max(len(label), *(len(t) for t in scores))
    header = f"{'arm':<{width}}  {'params':>6}  {'MACs':>6}  {label:>{score_width}}"
    header += "  seeds"
    if timing:
        header += " (s/epoch)"
    lines = [header]
    for r, score in zip(results, scores):
        seeds = " ".join(f"{s:.{digits}f}" for s in r.scores)
        line = (
            f"{r.name:<{width}}  {_si(r.params):>6}  {_si(r.macs):>6}  "
            f"{score:>{score_width}}  {seeds}"
        )
        if timing:
            line += f" ({r.seconds_per_epoch:.2f})"
        lines.append(line)
    return "\n".join(lines)


def plot_results(
    results: Sequence[ArmResult], ax=None, *, reference: float | None = None
):
    """Every seed's score as a cross and the mean ± std as a dot with an error bar,
    one row per arm (dynamic arms in :data:`refimpl.viz.COLORS` ``"dynamic"``,
    static ones in ``"static"``).

    No bars start from an arbitrary axis origin: each row shows the raw scores, so
    the spread is as visible as the gaps between arms. ``reference`` draws a
    vertical line (for example the chance level or the best static arm).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    from .viz import COLORS

    if not results:
        raise ValueError("plot_results expected at least one result")
    if ax is None:
        fig, ax = plt.subplots(
            figsize=(6.3, 0.45 * len(results) + 1.0), layout="constrained"
        )
    else:
        fig = ax.figure
    for row, r in enumerate(results):
        color = COLORS["dynamic"] if r.dynamic else COLORS["static"]
        ax.errorbar(r.mean, row, xerr=r.std, fmt="o", color=color, capsize=4, ms=7)
        ax.plot(r.scores, [row] * len(r.scores), "x", color="0.3", ms=6)
    if reference is not None:
        ax.axvline(reference, color="0.5", lw=1, ls="--")
    ax.set_yticks(range(len(results)), [r.name for r in results])
    ax.invert_yaxis()
    ax.set_xlabel(f"{results[0].metric} (o: mean ± std over seeds, x: each seed)")
    return fig
