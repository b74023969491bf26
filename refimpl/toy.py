"""A small, fast training experiment shared by the chapters on dynamic kernels.

Chapters 2 to 4 compare a static convolution with CondConv, DynamicConv and ODConv
on the same toy task, trained in seconds on a CPU. Three pieces:

* :func:`make_oriented_textures`: a synthetic image-classification data set of
  oriented gratings whose spatial frequency, phase and contrast vary from image
  to image (the class is the orientation only), drawn from a ``torch.Generator``;
* :class:`TinyCNN`: a four-layer CNN whose convolutions after the stem come from
  a ``conv_factory(in_channels, out_channels, kernel_size, stride, padding)``
  callable, so the same network is built with ``nn.Conv2d``, ``CondConv2d``,
  ``DynamicConv2d`` or ``ODConv2d``;
* :func:`train`: Adam on the cross-entropy, returning a :class:`History` of the
  training loss and test accuracy per epoch, with hooks for temperature
  schedules.

Typical use (chapter 3)::

    g = torch.Generator().manual_seed(0)
    data = make_oriented_textures(generator=g).to(device)
    torch.manual_seed(0)
    model = TinyCNN(DynamicConv2d, num_classes=data.num_classes).to(device)
    history = train(model, data, epochs=8, lr=3e-3, batch_size=64, generator=g,
                    on_iteration_start=lambda m, e: set_temperature(
                        m, temperature_schedule(e, anneal_epochs=4)))

Why this task: a grating of one orientation looks very different at a low and at
a high frequency, so a static filter bank must cover every frequency at once,
while an input-dependent kernel can adapt to the frequency it sees, which a
global average of the stem's features reveals. It is a plausible setting for
dynamic kernels, not evidence about ImageNet (chapter 3 discusses what it can
and cannot show).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_positive_int

__all__ = [
    "ToyData",
    "make_oriented_textures",
    "TinyCNN",
    "History",
    "train",
    "evaluate",
    "DenoisingData",
    "make_patchwork_denoising",
    "TinyDenoiser",
    "DenoisingHistory",
    "train_denoiser",
    "denoising_mse",
    "FREQUENCY_BANDS",
    "SegmentationData",
    "make_frequency_segmentation",
    "TinySegmenter",
    "SegmentationHistory",
    "segmentation_scores",
    "train_segmenter",
]


@dataclasses.dataclass
class ToyData:
    """A train/test split of images and integer labels.

    Attributes:
        train_x: ``Tensor[N_train, 1, S, S]``, float32.
        train_y: ``Tensor[N_train]``, int64 labels in ``[0, num_classes)``.
        test_x: ``Tensor[N_test, 1, S, S]``.
        test_y: ``Tensor[N_test]``.
        num_classes: the number of classes.
        train_frequency: ``Tensor[N_train]``, the spatial frequency (cycles per
            pixel) of each training grating, or ``None`` for data that has none.
        test_frequency: ``Tensor[N_test]``, the same for the test images.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    train_frequency: Tensor | None = None
    test_frequency: Tensor | None = None

    def to(self, device: torch.device | str) -> ToyData:
        """A copy with every tensor moved to ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
            train_frequency=move(self.train_frequency),
            test_frequency=move(self.test_frequency),
        )


def _gratings(
    labels: Tensor,
    size: int,
    num_classes: int,
    noise: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    n = labels.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    # orientations in [0, pi): a grating at theta and theta + pi is the same image
    step = math.pi / num_classes
    theta = labels * step + uniform(-0.2, 0.2) * step
    frequency = uniform(0.06, 0.42)  # cycles per pixel: 2 to 7 periods per image
    phase = uniform(0.0, 2 * math.pi)
    contrast = uniform(0.5, 1.5)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    along = xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None]
    images = contrast[:, None, None] * torch.cos(
        2 * math.pi * frequency[:, None, None] * along + phase[:, None, None]
    )
    images = images + noise * torch.randn(n, size, size, generator=generator)
    return images.unsqueeze(1), frequency


def make_oriented_textures(
    *,
    generator: torch.Generator,
    num_train: int = 2048,
    num_test: int = 1024,
    size: int = 16,
    num_classes: int = 8,
    noise: float = 0.8,
) -> ToyData:
    """Synthetic oriented-grating classification, drawn from ``generator``.

    Image ``i`` of class ``c`` is ``a cos(2 pi f <p, u(theta)> + phi) + noise``
    on a ``size x size`` grid centred at zero, where the orientation
    ``theta = c pi / num_classes`` (jittered by up to a fifth of the class
    spacing) is the only thing the label depends on; the frequency ``f`` (0.06
    to 0.42 cycles per pixel), phase ``phi`` and contrast ``a`` (0.5 to 1.5)
    are drawn anew for every image, and Gaussian pixel noise of standard
    deviation ``noise`` is added. Classes are balanced: label ``i`` is
    ``i % num_classes`` before shuffling, so counts differ by at most one.

    The tensors are created on the CPU (float32 images, int64 labels); move them
    with :meth:`ToyData.to`. The same generator state gives the same data. The
    frequency of every image is returned too (``train_frequency``,
    ``test_frequency``), to ask whether a layer's attention follows it
    (chapter 3).

    Args:
        generator: a CPU ``torch.Generator``; it is advanced.
        num_train: training images.
        num_test: test images.
        size: image side ``S`` in pixels (``>= 4``).
        num_classes: orientations, evenly spaced in ``[0, pi)`` (``>= 2``).
        noise: standard deviation of the pixel noise (``>= 0``).

    Returns:
        A :class:`ToyData` with ``train_x: Tensor[num_train, 1, S, S]`` etc.

    Raises:
        TypeError: if ``generator`` is not a ``torch.Generator`` or a count is
            not an int.
        ValueError: for counts or sizes out of range, or a negative noise.
    """
    owner = "make_oriented_textures"
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{owner} expected generator to be a torch.Generator, got "
            f"{type(generator).__name__}"
        )
    check_positive_int(num_train, "num_train", owner=owner)
    check_positive_int(num_test, "num_test", owner=owner)
    check_positive_int(size, "size", owner=owner, minimum=4)
    check_positive_int(num_classes, "num_classes", owner=owner, minimum=2)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise ValueError(f"{owner} expected noise >= 0, got {noise!r}")

    def split(n: int) -> tuple[Tensor, Tensor, Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        images, f = _gratings(labels, size, num_classes, float(noise), generator)
        return images, labels, f

    train_x, train_y, train_f = split(num_train)
    test_x, test_y, test_f = split(num_test)
    return ToyData(train_x, train_y, test_x, test_y, num_classes, train_f, test_f)


class TinyCNN(nn.Module):
    """A four-convolution CNN whose convolutions after the stem are pluggable.

    Layout for ``width = w`` on ``Tensor[N, in_channels, S, S]``::

        stem   nn.Conv2d(in, w, 3, 1, 1)            + BN + ReLU   S
        conv1  conv_factory(w, 2w, 3, 2, 1)         + BN + ReLU   S/2
        conv2  conv_factory(2w, 2w, 3, 1, 1)        + BN + ReLU   S/2
        conv3  conv_factory(2w, 4w, 3, 2, 1)        + BN + ReLU   S/4
        global average pooling, nn.Linear(4w, num_classes)

    The stem stays static, as in the DY-CNN paper, which makes every layer but
    the first dynamic. ``conv_factory`` is called positionally as
    ``conv_factory(in_channels, out_channels, kernel_size, stride, padding)``,
    so ``nn.Conv2d``, :class:`refimpl.condconv.CondConv2d`,
    :class:`refimpl.dynamic_conv.DynamicConv2d` or a ``functools.partial`` of
    them fit directly.

    Args:
        conv_factory: builds each non-stem convolution (default ``nn.Conv2d``).
        num_classes: outputs of the classifier.
        width: channels of the stem, ``w``.
        in_channels: image channels.

    Shapes:
        ``Tensor[N, in_channels, S, S] -> Tensor[N, num_classes]`` (logits).
    """

    def __init__(
        self,
        conv_factory: Callable[..., nn.Module] = nn.Conv2d,
        *,
        num_classes: int = 8,
        width: int = 8,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_factory(conv_factory, "conv_factory", owner)
        check_positive_int(num_classes, "num_classes", owner=owner)
        check_positive_int(width, "width", owner=owner)
        check_positive_int(in_channels, "in_channels", owner=owner)
        w = width

        def block(conv: nn.Module, channels: int) -> nn.Sequential:
            return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())

        self.features = nn.Sequential(
            block(nn.Conv2d(in_channels, w, 3, 1, 1), w),
            block(conv_factory(w, 2 * w, 3, 2, 1), 2 * w),
            block(conv_factory(2 * w, 2 * w, 3, 1, 1), 2 * w),
            block(conv_factory(2 * w, 4 * w, 3, 2, 1), 4 * w),
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, in_channels, S, S] -> Tensor[N, num_classes]``."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def _check_factory(factory, name: str, owner: str) -> None:
    # the networks' pluggable layer builders: one message for all of them
    if not callable(factory):
        raise TypeError(
            f"{owner} expected {name} to be callable, got {type(factory).__name__}"
        )


@dataclasses.dataclass
class History:
    """What :func:`train` records.

    Attributes:
        train_loss: mean training cross-entropy of each epoch.
        test_accuracy: test accuracy (a fraction in ``[0, 1]``) after each epoch.
        seconds: wall-clock time of the whole training.
    """

    train_loss: list[float]
    test_accuracy: list[float]
    seconds: float

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last epoch."""
        return self.test_accuracy[-1]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in evaluation mode, a float in ``[0, 1]``.

    The model's training/evaluation mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct = x.new_zeros((), dtype=torch.int64)
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        correct += (logits.argmax(dim=1) == y[i : i + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(x.shape[0], 1)


def train(
    model: nn.Module,
    data: ToyData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    on_iteration_start: Callable[[nn.Module, float], None] | None = None,
) -> History:
    """Train ``model`` on ``data`` with Adam and the cross-entropy loss.

    The learning rate starts at ``lr`` and decays to zero along a cosine over
    all steps. Each epoch shuffles the training set with ``generator`` (so a seeded
    generator and a seeded model give a reproducible run on the CPU), takes
    ``ceil(N_train / batch_size)`` Adam steps, then measures the test accuracy
    with :func:`evaluate`. ``data`` must already be on the model's device.

    Hooks, for temperature schedules (chapter 3):

    * ``on_epoch_start(model, epoch)`` before epoch ``epoch = 0, 1, ...``;
    * ``on_iteration_start(model, progress)`` before every step, where
      ``progress = epoch + i / steps_per_epoch`` is the fractional number of
      epochs done. ODConv's official code uses ``(i + 1)`` instead of ``i``;
      pass ``progress + 1 / steps_per_epoch`` to the schedule to match it.

    Args:
        model: the network, in any device and float dtype matching ``data``.
        data: the :class:`ToyData` to fit and test on.
        epochs: number of passes over the training set.
        lr: Adam learning rate.
        batch_size: samples per step.
        generator: CPU ``torch.Generator`` for the shuffling; it is advanced.
        on_epoch_start: optional hook, see above.
        on_iteration_start: optional hook, see above.

    Returns:
        A :class:`History`.

    Raises:
        TypeError, ValueError: for malformed arguments, before training starts.
    """
    history = History([], [], 0.0)

    def after_epoch() -> None:
        history.test_accuracy.append(evaluate(model, data.test_x, data.test_y))

    history.train_loss, history.seconds = _fit(
        "train",
        model,
        data,
        ToyData,
        F.cross_entropy,
        after_epoch,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        generator=generator,
        on_epoch_start=on_epoch_start,
        on_iteration_start=on_iteration_start,
    )
    return history


# --- a dense-prediction task: denoising a patchwork of oriented textures -------------


@dataclasses.dataclass
class DenoisingData:
    """Noisy and clean images of :func:`make_patchwork_denoising`.

    Attributes:
        train_x: ``Tensor[N_train, 1, S, S]``, noisy inputs (float32).
        train_y: ``Tensor[N_train, 1, S, S]``, the clean images to recover.
        test_x: ``Tensor[N_test, 1, S, S]``, noisy test inputs.
        test_y: ``Tensor[N_test, 1, S, S]``, clean test images.
        test_orientation: ``Tensor[N_test, S, S]``, the stripe orientation of
            every test pixel (radians in ``[0, pi)``), for looking at what a
            model does where.
        noise: the standard deviation of the added noise.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    test_orientation: Tensor
    noise: float

    def to(self, device: torch.device | str) -> DenoisingData:
        """A copy with every tensor moved to ``device``."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
            test_orientation=self.test_orientation.to(device),
        )


def _patchwork(n: int, size: int, regions: int, generator: torch.Generator):
    """Clean patchwork images ``Tensor[n, 1, S, S]`` and their orientation maps."""

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    # each image is cut into `regions` Voronoi cells around random centres; every
    # cell holds its own grating (orientation, frequency, phase, contrast)
    centres = uniform(0.0, size - 1.0, regions, 2)
    theta = uniform(0.0, math.pi, regions)
    frequency = uniform(0.1, 0.3, regions)  # cycles per pixel
    phase = uniform(0.0, 2 * math.pi, regions)
    contrast = uniform(0.6, 1.2, regions)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack((yy, xx), -1).reshape(1, size * size, 1, 2)
    distance = (grid - centres[:, None]).square().sum(-1)  # [n, S*S, regions]
    cell = distance.argmin(-1)  # [n, S*S]

    def per_pixel(values: Tensor) -> Tensor:
        return values.gather(1, cell).reshape(n, size, size)

    t, f = per_pixel(theta), per_pixel(frequency)
    along = xx * torch.cos(t) + yy * torch.sin(t)
    clean = per_pixel(contrast) * torch.cos(2 * math.pi * f * along + per_pixel(phase))
    return clean.unsqueeze(1), t


def make_patchwork_denoising(
    *,
    generator: torch.Generator,
    num_train: int = 512,
    num_test: int = 256,
    size: int = 24,
    regions: int = 4,
    noise: float = 0.6,
) -> DenoisingData:
    """Denoising of images whose texture direction changes from region to region.

    Each ``size x size`` image is a patchwork of ``regions`` Voronoi cells around
    random centres; cell ``r`` holds a grating ``a_r cos(2 pi f_r <p, u(theta_r)>
    + phi_r)`` with its own orientation ``theta_r`` (uniform in ``[0, pi)``),
    frequency ``f_r`` (0.1 to 0.3 cycles per pixel), phase and contrast ``a_r``
    (0.6 to 1.2). The input is the image plus Gaussian noise of standard deviation
    ``noise``; the target is the clean image.

    Why this task (chapter 5): the best local denoiser averages *along* the
    stripes and not across them, so the right filter depends on the orientation
    at that pixel, which changes across the image. A static filter is the same
    everywhere and must compromise; a per-pixel dynamic filter need not. It is a
    plausible setting for per-pixel filters, not evidence about natural images.

    The tensors are created on the CPU (float32); move them with
    :meth:`DenoisingData.to`. The same generator state gives the same data.

    Args:
        generator: a CPU ``torch.Generator``; it is advanced.
        num_train: training images.
        num_test: test images.
        size: image side ``S`` in pixels (``>= 4``).
        regions: Voronoi cells per image (``>= 1``).
        noise: standard deviation of the pixel noise (``> 0``).

    Returns:
        A :class:`DenoisingData`.

    Raises:
        TypeError: if ``generator`` is not a ``torch.Generator`` or a count is
            not an int.
        ValueError: for counts or sizes out of range, or a noise that is not
            positive.
    """
    owner = "make_patchwork_denoising"
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{owner} expected generator to be a torch.Generator, got "
            f"{type(generator).__name__}"
        )
    check_positive_int(num_train, "num_train", owner=owner)
    check_positive_int(num_test, "num_test", owner=owner)
    check_positive_int(size, "size", owner=owner, minimum=4)
    check_positive_int(regions, "regions", owner=owner)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise > 0:
        raise ValueError(f"{owner} expected noise > 0, got {noise!r}")

    def split(n: int) -> tuple[Tensor, Tensor, Tensor]:
        clean, theta = _patchwork(n, size, regions, generator)
        noisy = clean + noise * torch.randn(clean.shape, generator=generator)
        return noisy, clean, theta

    train_x, train_y, _ = split(num_train)
    test_x, test_y, test_theta = split(num_test)
    return DenoisingData(train_x, train_y, test_x, test_y, test_theta, float(noise))


class TinyDenoiser(nn.Module):
    """A small residual denoiser whose spatial filters are pluggable.

    Layout for ``width = w`` on ``Tensor[N, 1, S, S]`` (every map keeps its size)::

        head   nn.Conv2d(1, w, 1) + ReLU
        depth x [ spatial_factory(w), nn.Conv2d(w, w, 1) + ReLU ]
        tail   nn.Conv2d(w, 1, 3, padding=1)
        output = input - tail(...)        (the network predicts the noise)

    ``spatial_factory(channels)`` builds a ``C -> C`` layer that keeps the map size:
    a depthwise ``nn.Conv2d(C, C, k, padding=k // 2, groups=C)`` for a static
    network, or :class:`refimpl.ddf.DDFConv2d` (depthwise too), so the networks
    differ only in how their per-channel spatial filters are made; the ``1x1``
    convolutions mix the channels. The head is ``1x1`` on purpose: every spatial
    filter before the tail is one of the pluggable layers.

    Args:
        spatial_factory: ``channels -> nn.Module``.
        width: channels ``w`` of the hidden maps.
        depth: number of spatial-and-pointwise blocks.
    """

    def __init__(
        self,
        spatial_factory: Callable[[int], nn.Module],
        *,
        width: int = 16,
        depth: int = 2,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_factory(spatial_factory, "spatial_factory", owner)
        w = check_positive_int(width, "width", owner=owner)
        depth = check_positive_int(depth, "depth", owner=owner)
        self.head = nn.Sequential(nn.Conv2d(1, w, 1), nn.ReLU())
        self.body = nn.Sequential(
            *(
                nn.Sequential(spatial_factory(w), nn.Conv2d(w, w, 1), nn.ReLU())
                for _ in range(depth)
            )
        )
        self.tail = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, 1, S, S] -> Tensor[N, 1, S, S]``, the denoised image."""
        return x - self.tail(self.body(self.head(x)))


@dataclasses.dataclass
class DenoisingHistory:
    """What :func:`train_denoiser` records.

    Attributes:
        train_loss: mean training squared error of each epoch.
        test_mse: mean squared error on the test set after each epoch.
        noise_mse: mean squared error of the noisy test inputs themselves.
        seconds: wall-clock time of the whole training.
    """

    train_loss: list[float]
    test_mse: list[float]
    noise_mse: float
    seconds: float

    @property
    def gain_db(self) -> float:
        """Final improvement over the noisy input, ``10 log10(noise_mse /
        test_mse)`` in decibels (the PSNR gain)."""
        return 10 * math.log10(self.noise_mse / self.test_mse[-1])


@torch.no_grad()
def denoising_mse(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256
) -> float:
    """Mean squared error of ``model(x)`` against ``y``, in evaluation mode.

    The model's training/evaluation mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total = x.new_zeros((), dtype=torch.float64)
    for i in range(0, x.shape[0], batch_size):
        error = model(x[i : i + batch_size]) - y[i : i + batch_size]
        total += error.double().square().sum()
    model.train(was_training)
    return total.item() / max(y.numel(), 1)


def train_denoiser(
    model: nn.Module,
    data: DenoisingData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    on_iteration_start: Callable[[nn.Module, float], None] | None = None,
) -> DenoisingHistory:
    """Train ``model`` on ``data`` with Adam and the mean squared error.

    The same protocol as :func:`train` (cosine decay of ``lr`` to zero over all
    steps, shuffling with ``generator``), with the squared error in place of the
    cross-entropy and the test error measured after every epoch by
    :func:`denoising_mse`. ``data`` must already be on the model's device.
    ``on_iteration_start(model, progress)`` is called before every step, as in
    :func:`train` (temperature schedules).

    Returns:
        A :class:`DenoisingHistory`.

    Raises:
        TypeError, ValueError: for malformed arguments, before training starts.
    """
    history = DenoisingHistory([], [], 0.0, 0.0)  # noise_mse set after training

    def evaluate() -> None:
        history.test_mse.append(denoising_mse(model, data.test_x, data.test_y))

    history.train_loss, history.seconds = _fit(
        "train_denoiser",
        model,
        data,
        DenoisingData,
        F.mse_loss,
        evaluate,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        generator=generator,
        on_iteration_start=on_iteration_start,
    )
    history.noise_mse = (data.test_x - data.test_y).double().square().mean().item()
    return history


# --- a segmentation task: regions told apart by their texture frequency -------------

#: The frequency band (cycles per pixel) of each class of
#: :func:`make_frequency_segmentation`, low to high.
FREQUENCY_BANDS = ((0.04, 0.08), (0.12, 0.19), (0.26, 0.4))


@dataclasses.dataclass
class SegmentationData:
    """Images and per-pixel labels of :func:`make_frequency_segmentation`.

    Attributes:
        train_x: ``Tensor[N_train, 1, S, S]``, float32 images.
        train_y: ``Tensor[N_train, S, S]``, int64 label of every pixel.
        test_x: ``Tensor[N_test, 1, S, S]``.
        test_y: ``Tensor[N_test, S, S]``.
        num_classes: the number of classes (frequency bands).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    def to(self, device: torch.device | str) -> SegmentationData:
        """A copy with every tensor moved to ``device``."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


def _frequency_patchwork(
    n: int, size: int, regions: int, bands, noise: float, generator
) -> tuple[Tensor, Tensor]:
    def uniform(low, high, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    num_classes = len(bands)
    centres = uniform(0.0, size - 1.0, regions, 2)
    label = torch.randint(num_classes, (n, regions), generator=generator)
    low = torch.tensor([b[0] for b in bands])[label]
    high = torch.tensor([b[1] for b in bands])[label]
    frequency = low + (high - low) * torch.rand(n, regions, generator=generator)
    theta = uniform(0.0, math.pi, regions)
    phase = uniform(0.0, 2 * math.pi, regions)
    contrast = uniform(0.6, 1.2, regions)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack((yy, xx), -1).reshape(1, size * size, 1, 2)
    cell = (grid - centres[:, None]).square().sum(-1).argmin(-1)  # [n, S*S]

    def per_pixel(values: Tensor) -> Tensor:
        return values.gather(1, cell).reshape(n, size, size)

    t = per_pixel(theta)
    along = xx * torch.cos(t) + yy * torch.sin(t)
    image = per_pixel(contrast) * torch.cos(
        2 * math.pi * per_pixel(frequency) * along + per_pixel(phase)
    )
    image = image + noise * torch.randn(n, size, size, generator=generator)
    return image.unsqueeze(1), per_pixel(label)


def make_frequency_segmentation(
    *,
    generator: torch.Generator,
    num_train: int = 512,
    num_test: int = 256,
    size: int = 24,
    regions: int = 4,
    bands=FREQUENCY_BANDS,
    noise: float = 0.5,
) -> SegmentationData:
    """Segment an image into regions by the frequency of their texture.

    Each ``size x size`` image is cut into ``regions`` Voronoi cells around
    random centres. Cell ``r`` draws a class ``c_r`` uniformly from
    ``range(len(bands))`` and holds a grating ``a_r cos(2 pi f_r <p, u(theta_r)>
    + phi_r)`` whose frequency ``f_r`` is uniform in ``bands[c_r]`` (cycles per
    pixel); orientation ``theta_r`` (uniform in ``[0, pi)``), phase and contrast
    ``a_r`` (0.6 to 1.2) are free, so only the frequency tells the classes
    apart. Gaussian noise of standard deviation ``noise`` is added. The label of
    every pixel is the class of its cell.

    Why this task (chapter 7): it is a dense prediction whose answer is a
    frequency, the quantity FDConv's parts act on. A static network can solve it
    too (a bank of band-pass filters and a local energy), so it tests whether
    the frequency machinery helps at a small scale, not whether it is needed.

    The tensors are created on the CPU (float32 images, int64 labels); move them
    with :meth:`SegmentationData.to`. The same generator state gives the same
    data.

    Args:
        generator: a CPU ``torch.Generator``; it is advanced.
        num_train: training images.
        num_test: test images.
        size: image side ``S`` in pixels (``>= 4``).
        regions: Voronoi cells per image (``>= 1``).
        bands: ``(low, high)`` frequency range of each class, ``0 <= low < high
            <= 0.5``; at least two classes.
        noise: standard deviation of the pixel noise (``>= 0``).

    Returns:
        A :class:`SegmentationData`.

    Raises:
        TypeError: if ``generator`` is not a ``torch.Generator`` or a count is
            not an int.
        ValueError: for counts, sizes or bands out of range, or a negative noise.
    """
    owner = "make_frequency_segmentation"
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{owner} expected generator to be a torch.Generator, got "
            f"{type(generator).__name__}"
        )
    check_positive_int(num_train, "num_train", owner=owner)
    check_positive_int(num_test, "num_test", owner=owner)
    check_positive_int(size, "size", owner=owner, minimum=4)
    check_positive_int(regions, "regions", owner=owner)
    bands = tuple(tuple(float(f) for f in band) for band in bands)
    if len(bands) < 2 or any(len(b) != 2 or not 0 <= b[0] < b[1] <= 0.5 for b in bands):
        raise ValueError(
            f"{owner} expected at least two bands (low, high) with 0 <= low < "
            f"high <= 0.5, got {bands}"
        )
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise ValueError(f"{owner} expected noise >= 0, got {noise!r}")
    train_x, train_y = _frequency_patchwork(
        num_train, size, regions, bands, float(noise), generator
    )
    test_x, test_y = _frequency_patchwork(
        num_test, size, regions, bands, float(noise), generator
    )
    return SegmentationData(train_x, train_y, test_x, test_y, len(bands))


class TinySegmenter(nn.Module):
    """A small fully convolutional network that labels every pixel.

    Layout for ``width = w`` on ``Tensor[N, in_channels, S, S]`` (every map keeps
    its size)::

        stem   nn.Conv2d(in, w, 3, 1, 1)                 + BN + ReLU
        depth x conv_factory(w, w, 3, 1, 1)              + BN + ReLU
        head   nn.Conv2d(w, num_classes, 1)               (logits per pixel)

    As in :class:`TinyCNN`, the stem stays static and ``conv_factory`` is called
    positionally as ``conv_factory(in_channels, out_channels, kernel_size,
    stride, padding)``.

    Args:
        conv_factory: builds each body convolution (default ``nn.Conv2d``).
        num_classes: classes per pixel.
        width: channels ``w``.
        depth: body convolutions.
        in_channels: image channels.

    Shapes:
        ``Tensor[N, in_channels, S, S] -> Tensor[N, num_classes, S, S]``.
    """

    def __init__(
        self,
        conv_factory: Callable[..., nn.Module] = nn.Conv2d,
        *,
        num_classes: int = 3,
        width: int = 8,
        depth: int = 2,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_factory(conv_factory, "conv_factory", owner)
        num_classes = check_positive_int(num_classes, "num_classes", owner=owner)
        w = check_positive_int(width, "width", owner=owner)
        depth = check_positive_int(depth, "depth", owner=owner)
        in_channels = check_positive_int(in_channels, "in_channels", owner=owner)

        def block(conv: nn.Module) -> nn.Sequential:
            return nn.Sequential(conv, nn.BatchNorm2d(w), nn.ReLU())

        self.features = nn.Sequential(
            block(nn.Conv2d(in_channels, w, 3, 1, 1)),
            *(block(conv_factory(w, w, 3, 1, 1)) for _ in range(depth)),
        )
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, in_channels, S, S] -> Tensor[N, num_classes, S, S]``."""
        return self.head(self.features(x))


@dataclasses.dataclass
class SegmentationHistory:
    """What :func:`train_segmenter` records.

    Attributes:
        train_loss: mean training cross-entropy (per pixel) of each epoch.
        test_accuracy: fraction of test pixels labelled right after each epoch.
        test_miou: mean intersection over union of the classes after each epoch.
        seconds: wall-clock time of the whole training.
    """

    train_loss: list[float]
    test_accuracy: list[float]
    test_miou: list[float]
    seconds: float

    @property
    def final_accuracy(self) -> float:
        """Pixel accuracy after the last epoch."""
        return self.test_accuracy[-1]

    @property
    def final_miou(self) -> float:
        """Mean IoU after the last epoch."""
        return self.test_miou[-1]


@torch.no_grad()
def segmentation_scores(
    model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 256
) -> tuple[float, float]:
    """Pixel accuracy and mean IoU of ``model`` on ``(x, y)``, in evaluation mode.

    The IoU of class ``c`` is ``|pred = c and y = c| / |pred = c or y = c|``; the
    mean is over the classes present in ``y`` or in the prediction. The model's
    training/evaluation mode is restored afterwards.

    Returns:
        ``(accuracy, miou)``, floats in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(0, x.shape[0], batch_size):
        pred = model(x[i : i + batch_size]).argmax(dim=1)
        pair_index = y[i : i + batch_size] * num_classes + pred
        counts = torch.bincount(pair_index.flatten(), minlength=num_classes**2)
        confusion += counts.cpu().reshape(num_classes, num_classes)
    model.train(was_training)
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    accuracy = hits.sum().item() / max(confusion.sum().item(), 1)
    miou = (hits[present] / union[present]).mean().item() if present.any() else 0.0
    return accuracy, miou


def train_segmenter(
    model: nn.Module,
    data: SegmentationData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    on_iteration_start: Callable[[nn.Module, float], None] | None = None,
) -> SegmentationHistory:
    """Train ``model`` on ``data`` with Adam and the per-pixel cross-entropy.

    The protocol of :func:`train` (cosine decay of ``lr`` to zero over all steps,
    shuffling with ``generator``), with the test pixel accuracy and mean IoU
    measured after every epoch by :func:`segmentation_scores`. ``data`` must
    already be on the model's device. ``on_iteration_start(model, progress)`` is
    called before every step, as in :func:`train` (temperature schedules).

    Returns:
        A :class:`SegmentationHistory`.

    Raises:
        TypeError, ValueError: for malformed arguments, before training starts.
    """
    history = SegmentationHistory([], [], [], 0.0)

    def evaluate() -> None:
        accuracy, miou = segmentation_scores(
            model, data.test_x, data.test_y, data.num_classes
        )
        history.test_accuracy.append(accuracy)
        history.test_miou.append(miou)

    history.train_loss, history.seconds = _fit(
        "train_segmenter",
        model,
        data,
        SegmentationData,
        F.cross_entropy,
        evaluate,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        generator=generator,
        on_iteration_start=on_iteration_start,
    )
    return history


def _fit(
    owner,
    model,
    data,
    data_type,
    loss_fn,
    evaluate,
    *,
    epochs,
    lr,
    batch_size,
    generator,
    on_epoch_start=None,
    on_iteration_start=None,
):
    """The training loop of :func:`train`, :func:`train_denoiser` and
    :func:`train_segmenter`.

    Checks the arguments, then trains with Adam and a cosine decay of ``lr`` to
    zero over all steps (so the last epochs settle instead of hopping around),
    shuffling with ``generator``, and calls ``evaluate()`` after every epoch (and,
    when given, ``on_epoch_start(model, epoch)`` before every epoch and
    ``on_iteration_start(model, progress)`` before every step). Returns the mean
    training loss of every epoch and the seconds spent.
    """
    check_positive_int(epochs, "epochs", owner=owner)
    check_positive_int(batch_size, "batch_size", owner=owner)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{owner} expected lr > 0, got {lr!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{owner} expected generator to be a torch.Generator, got "
            f"{type(generator).__name__}"
        )
    if not isinstance(data, data_type):
        raise TypeError(
            f"{owner} expected data to be a {data_type.__name__}, got "
            f"{type(data).__name__}"
        )
    for name, hook in (
        ("on_epoch_start", on_epoch_start),
        ("on_iteration_start", on_iteration_start),
    ):
        if hook is not None and not callable(hook):
            raise TypeError(f"{owner} expected {name} to be callable or None")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = data.train_x.shape[0]
    steps = math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps)
    losses = []
    start = time.perf_counter()
    for epoch in range(epochs):
        if on_epoch_start is not None:
            on_epoch_start(model, epoch)
        model.train()
        order = torch.randperm(n, generator=generator).to(data.train_x.device)
        total = data.train_x.new_zeros((), dtype=torch.float64)
        for i in range(steps):
            if on_iteration_start is not None:
                on_iteration_start(model, epoch + i / steps)
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = loss_fn(model(data.train_x[idx]), data.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach().double() * idx.shape[0]
        losses.append(total.item() / n)
        evaluate()
    return losses, time.perf_counter() - start
