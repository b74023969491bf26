"""Tests for refimpl.toy: the synthetic data set, the tiny CNN and the training loop."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from refimpl.dynamic_conv import DynamicConv2d, set_temperature, temperature_schedule
from refimpl.toy import (
    FREQUENCY_BANDS,
    DenoisingData,
    DenoisingHistory,
    History,
    SegmentationData,
    SegmentationHistory,
    TinyCNN,
    TinyDenoiser,
    TinySegmenter,
    ToyData,
    denoising_mse,
    evaluate,
    make_frequency_segmentation,
    make_oriented_textures,
    make_patchwork_denoising,
    segmentation_scores,
    train,
    train_denoiser,
    train_segmenter,
)


def _data(seed=0, **kwargs):
    kwargs = {"num_train": 64, "num_test": 32, **kwargs}
    return make_oriented_textures(
        generator=torch.Generator().manual_seed(seed), **kwargs
    )


# --- data ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _tiny_tensors_on_one_thread(one_thread):
    # The toy tensors are tiny: with two threads, the synchronisation of every
    # op costs more than the op, and far more on a busy machine.
    yield


def test_dataset_is_deterministic_for_a_seed():
    a, b, c = _data(3), _data(3), _data(4)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.train_x, c.train_x)


def test_dataset_shapes_and_dtypes():
    d = _data(num_train=40, num_test=24, size=12, num_classes=5)
    assert d.train_x.shape == (40, 1, 12, 12) and d.test_x.shape == (24, 1, 12, 12)
    assert d.train_y.shape == (40,) and d.test_y.shape == (24,)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.num_classes == 5
    assert torch.isfinite(d.train_x).all()
    assert 0 <= int(d.train_y.min()) and int(d.train_y.max()) < 5
    moved = d.to("cpu")
    assert isinstance(moved, ToyData) and torch.equal(moved.test_y, d.test_y)


def test_recorded_frequency_is_the_gratings_frequency():
    # noise-free 64 x 64 gratings: the peak of each image's spectrum sits at the
    # recorded frequency, to within the spectrum's bin spacing of 1/64
    d = _data(num_train=8, num_test=8, size=64, noise=0.0)
    assert d.train_frequency.shape == (8,) and d.test_frequency.shape == (8,)
    for images, frequency in (
        (d.train_x, d.train_frequency),
        (d.test_x, d.test_frequency),
    ):
        spectrum = torch.fft.fft2(images[:, 0]).abs()
        freqs = torch.fft.fftfreq(64)
        radius = (freqs[:, None] ** 2 + freqs[None, :] ** 2).sqrt()
        peak = radius.flatten()[spectrum.flatten(1).argmax(1)]
        assert ((peak - frequency).abs() <= 1.5 / 64).all()
    moved = d.to("cpu")
    assert torch.equal(moved.test_frequency, d.test_frequency)


@pytest.mark.parametrize("n, classes", [(2048, 8), (50, 8), (10, 3)])
def test_classes_balanced(n, classes):
    d = _data(num_train=n, num_test=n, num_classes=classes)
    for labels in (d.train_y, d.test_y):
        counts = torch.bincount(labels, minlength=classes)
        assert int(counts.sum()) == n
        assert int(counts.max() - counts.min()) <= 1
    # shuffled, not sorted by class
    assert not torch.equal(d.train_y, torch.arange(n) % classes)


def test_label_is_the_grating_orientation():
    # The dominant 2-D frequency of a noise-free image points along the grating
    # normal; its angle modulo pi must fall in the image's own class bin.
    classes = 4
    d = _data(num_train=200, num_test=1, size=64, num_classes=classes, noise=0.0)
    images = d.train_x[:, 0].double()
    window = torch.hann_window(64, periodic=False, dtype=torch.float64)
    power = torch.fft.fftshift(
        torch.fft.fft2(images * window.outer(window)), dim=(-2, -1)
    ).abs()
    flat = power.reshape(200, -1).argmax(dim=1)
    ky = (flat // 64 - 32).double()
    kx = (flat % 64 - 32).double()
    angle = torch.atan2(ky, kx) % math.pi
    step = math.pi / classes
    # distance on the circle of orientations (period pi) to the class centre
    diff = (angle - d.train_y.double() * step + math.pi / 2) % math.pi - math.pi / 2
    assert diff.abs().max() < step / 2


def test_contrast_and_noise_vary_the_images():
    d = _data(num_train=256, noise=0.0)
    amplitude = d.train_x.abs().amax(dim=(1, 2, 3))
    assert amplitude.min() < 0.8 and amplitude.max() > 1.2
    noisy = _data(num_train=256, noise=1.0)
    assert noisy.train_x.std() > d.train_x.std()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"generator": 0},
            TypeError,
            "make_oriented_textures expected generator to be a torch.Generator, "
            "got int",
        ),
        (
            {"num_train": 0},
            ValueError,
            "make_oriented_textures expected num_train >= 1",
        ),
        ({"size": 3}, ValueError, "make_oriented_textures expected size >= 4, got 3"),
        ({"num_classes": 1}, ValueError, "expected num_classes >= 2, got 1"),
        ({"noise": -0.1}, ValueError, r"expected noise >= 0, got -0.1"),
    ],
)
def test_dataset_errors(kwargs, error, message):
    kwargs = {"generator": torch.Generator(), **kwargs}
    with pytest.raises(error, match=message):
        make_oriented_textures(**kwargs)


# --- model --------------------------------------------------------------------------


def test_tiny_cnn_uses_the_factory_after_a_static_stem():
    calls = []

    def factory(*args):
        calls.append(args)
        return nn.Conv2d(*args)

    model = TinyCNN(factory, num_classes=5, width=3)
    assert calls == [(3, 6, 3, 2, 1), (6, 6, 3, 1, 1), (6, 12, 3, 2, 1)]
    assert type(model.features[0][0]) is nn.Conv2d
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 5)
    dynamic = TinyCNN(DynamicConv2d, num_classes=8)
    assert sum(isinstance(m, DynamicConv2d) for m in dynamic.modules()) == 3
    assert dynamic(torch.zeros(0, 1, 16, 16)).shape == (0, 8)


def test_tiny_cnn_errors():
    with pytest.raises(TypeError, match="TinyCNN expected conv_factory to be callable"):
        TinyCNN(3)
    with pytest.raises(ValueError, match="TinyCNN expected width >= 1, got 0"):
        TinyCNN(width=0)


# --- training -----------------------------------------------------------------------


def test_train_one_tiny_epoch_and_hooks():
    data = _data(num_train=20, num_test=12)
    torch.manual_seed(0)
    model = TinyCNN(functools.partial(DynamicConv2d, num_kernels=2), width=2)
    epochs_seen, progress_seen = [], []

    def on_epoch(m, epoch):
        assert m is model
        epochs_seen.append(epoch)

    def on_iteration(m, progress):
        progress_seen.append(progress)
        set_temperature(m, temperature_schedule(progress, anneal_epochs=2))

    history = train(
        model,
        data,
        epochs=2,
        lr=1e-2,
        batch_size=8,
        generator=torch.Generator().manual_seed(0),
        on_epoch_start=on_epoch,
        on_iteration_start=on_iteration,
    )
    assert isinstance(history, History)
    assert len(history.train_loss) == len(history.test_accuracy) == 2
    assert all(math.isfinite(v) and v > 0 for v in history.train_loss)
    assert all(0.0 <= a <= 1.0 for a in history.test_accuracy)
    assert history.final_accuracy == history.test_accuracy[-1]
    assert history.seconds > 0
    assert epochs_seen == [0, 1]
    steps = math.ceil(20 / 8)
    assert progress_seen == pytest.approx(
        [e + i / steps for e in range(2) for i in range(steps)]
    )
    last = 1 + (steps - 1) / steps
    assert model.features[1][0].temperature == pytest.approx(30 - 29 * last / 2)


def test_train_is_reproducible_and_learns():
    data = _data(num_train=128, num_test=64)

    def run():
        torch.manual_seed(0)
        model = TinyCNN(width=4)
        return model, train(
            model,
            data,
            epochs=3,
            lr=1e-2,
            batch_size=32,
            generator=torch.Generator().manual_seed(1),
        )

    (m1, h1), (_, h2) = run(), run()
    assert h1.train_loss == h2.train_loss and h1.test_accuracy == h2.test_accuracy
    assert h1.train_loss[-1] < h1.train_loss[0]
    m1.train()
    acc = evaluate(m1, data.test_x, data.test_y, batch_size=10)
    assert m1.training and acc == h1.final_accuracy


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"epochs": 0}, ValueError, "train expected epochs >= 1, got 0"),
        ({"batch_size": 2.0}, TypeError, "train expected batch_size to be an int"),
        ({"lr": 0.0}, ValueError, r"train expected lr > 0, got 0.0"),
        (
            {"generator": None},
            TypeError,
            "train expected generator to be a torch.Generator, got NoneType",
        ),
        ({"data": (1, 2)}, TypeError, "train expected data to be a ToyData, got tuple"),
        (
            {"on_epoch_start": 1},
            TypeError,
            "train expected on_epoch_start to be callable or None",
        ),
    ],
)
def test_train_errors(kwargs, error, message):
    args = {
        "data": _data(num_train=8, num_test=8),
        "epochs": 1,
        "lr": 1e-3,
        "batch_size": 4,
        "generator": torch.Generator(),
        **kwargs,
    }
    with pytest.raises(error, match=message):
        train(TinyCNN(width=1), **args)


# --- the denoising task -------------------------------------------------------------


def _denoising(seed=0, **kwargs):
    kwargs = {"num_train": 24, "num_test": 16, "size": 12, **kwargs}
    return make_patchwork_denoising(
        generator=torch.Generator().manual_seed(seed), **kwargs
    )


def _depthwise(channels):
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels)


def test_denoising_data_is_deterministic_and_shaped():
    a, b, c = _denoising(1), _denoising(1), _denoising(2)
    for name in ("train_x", "train_y", "test_x", "test_y", "test_orientation"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.train_y, c.train_y)
    assert a.train_x.shape == a.train_y.shape == (24, 1, 12, 12)
    assert a.test_x.shape == a.test_y.shape == (16, 1, 12, 12)
    assert a.test_orientation.shape == (16, 12, 12)
    assert a.train_x.dtype == a.train_y.dtype == torch.float32
    moved = a.to("cpu")
    assert isinstance(moved, DenoisingData) and torch.equal(moved.test_y, a.test_y)


def test_denoising_noise_and_patchwork():
    d = _denoising(num_train=400, num_test=8, size=16, noise=0.5, regions=3)
    # the input is the clean image plus noise of the requested deviation
    residual = d.train_x - d.train_y
    assert abs(residual.std().item() - 0.5) < 0.01
    assert abs(residual.mean().item()) < 0.01
    assert d.train_y.abs().max() <= 1.2 + 1e-6
    # at most `regions` orientations per image, constant on each cell
    theta = d.test_orientation
    assert ((theta >= 0) & (theta < math.pi)).all()
    counts = [len(torch.unique(t)) for t in theta]
    assert max(counts) <= 3 and min(counts) >= 1
    one = _denoising(regions=1, num_test=4)
    assert all(len(torch.unique(t)) == 1 for t in one.test_orientation)


def _roughness(img, direction):
    """Mean squared difference of pixels two steps apart along (dy, dx)."""
    size = img.shape[-1]
    dy, dx = (round(2 * v) for v in direction)
    a = img[max(dy, 0) : size + min(dy, 0), max(dx, 0) : size + min(dx, 0)]
    b = img[max(-dy, 0) : size + min(-dy, 0), max(-dx, 0) : size + min(-dx, 0)]
    return (a - b).square().mean().item()


def test_denoising_stripes_follow_the_orientation():
    # with one region the clean image is a grating whose phase grows along
    # (dy, dx) = (sin theta, cos theta): constant along (cos theta, -sin theta)
    d = _denoising(regions=1, num_test=6, size=32)
    for img, theta in zip(d.test_y[:, 0], d.test_orientation[:, 0, 0]):
        t = theta.item()
        along = (math.cos(t), -math.sin(t))
        across = (math.sin(t), math.cos(t))
        assert _roughness(img, along) < _roughness(img, across)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"generator": 0}, TypeError, "generator to be a torch.Generator"),
        ({"num_train": 0}, ValueError, "num_train >= 1"),
        ({"size": 3}, ValueError, "size >= 4"),
        ({"regions": 0}, ValueError, "regions >= 1"),
        ({"noise": 0.0}, ValueError, "noise > 0"),
        ({"num_test": 2.0}, TypeError, "num_test to be an int"),
    ],
)
def test_denoising_data_errors(kwargs, error, message):
    kwargs = {"generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(error, match="^make_patchwork_denoising expected " + message):
        make_patchwork_denoising(**kwargs)


def test_tiny_denoiser_layout():
    built = []

    def factory(channels):
        built.append(channels)
        return _depthwise(channels)

    model = TinyDenoiser(factory, width=6, depth=3)
    assert built == [6, 6, 6]
    assert model.head[0].kernel_size == (1, 1)
    x = torch.randn(2, 1, 9, 11)
    assert model(x).shape == x.shape
    # a zero tail makes the denoiser the identity: it predicts the noise
    nn.init.zeros_(model.tail.weight)
    nn.init.zeros_(model.tail.bias)
    assert torch.equal(model(x), x)
    with pytest.raises(TypeError, match="^TinyDenoiser expected spatial_factory"):
        TinyDenoiser(3)
    with pytest.raises(ValueError, match="^TinyDenoiser expected depth >= 1"):
        TinyDenoiser(_depthwise, depth=0)


def test_train_denoiser_learns_and_is_reproducible():
    data = _denoising(num_train=64, num_test=32, size=12)

    def run():
        torch.manual_seed(0)
        model = TinyDenoiser(_depthwise, width=8)
        history = train_denoiser(
            model,
            data,
            epochs=3,
            lr=1e-2,
            batch_size=16,
            generator=torch.Generator().manual_seed(0),
        )
        return model, history

    model, history = run()
    _, again = run()
    assert isinstance(history, DenoisingHistory)
    assert len(history.train_loss) == len(history.test_mse) == 3
    assert history.test_mse == again.test_mse
    assert history.test_mse[-1] < history.test_mse[0]
    expected = (data.test_x - data.test_y).double().square().mean().item()
    assert history.noise_mse == pytest.approx(expected)
    assert history.test_mse[-1] == pytest.approx(
        denoising_mse(model, data.test_x, data.test_y)
    )
    gain = 10 * math.log10(history.noise_mse / history.test_mse[-1])
    assert history.gain_db == pytest.approx(gain)
    assert model.training  # denoising_mse restores the mode


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"epochs": 0}, ValueError, "epochs >= 1"),
        ({"lr": 0.0}, ValueError, "lr > 0"),
        ({"generator": None}, TypeError, "generator to be a torch.Generator"),
        ({"data": "x"}, TypeError, "data to be a DenoisingData"),
    ],
)
def test_train_denoiser_errors(kwargs, error, message):
    kwargs = {
        "data": _denoising(),
        "epochs": 1,
        "lr": 1e-3,
        "batch_size": 8,
        "generator": torch.Generator(),
        **kwargs,
    }
    data = kwargs.pop("data")
    with pytest.raises(error, match="^train_denoiser expected " + message):
        train_denoiser(TinyDenoiser(_depthwise, width=4), data, **kwargs)


# --- frequency segmentation ----------------------------------------------------------


def _segmentation(seed=0, **kwargs):
    kwargs = {"num_train": 24, "num_test": 12, "size": 16, **kwargs}
    g = torch.Generator().manual_seed(seed)
    return make_frequency_segmentation(generator=g, **kwargs)


def test_segmentation_data_is_deterministic_and_shaped():
    a, b, c = _segmentation(), _segmentation(), _segmentation(seed=1)
    assert isinstance(a, SegmentationData) and a.num_classes == 3
    assert a.train_x.shape == (24, 1, 16, 16) and a.train_x.dtype == torch.float32
    assert a.train_y.shape == (24, 16, 16) and a.train_y.dtype == torch.int64
    assert a.test_x.shape == (12, 1, 16, 16) and a.test_y.shape == (12, 16, 16)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert set(a.train_y.unique().tolist()) == {0, 1, 2}
    moved = a.to("cpu")
    assert torch.equal(moved.train_y, a.train_y) and moved.num_classes == 3


def test_segmentation_label_is_the_local_frequency():
    """Noise-free, one region: the image's dominant frequency lies in the band
    of its label."""
    data = _segmentation(num_train=30, size=32, regions=1, noise=0.0)
    freq = torch.fft.fftfreq(32)
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    for image, label in zip(data.train_x[:, 0], data.train_y):
        assert (label == label[0, 0]).all()  # one region: one label
        spectrum = torch.fft.fft2(image).abs()
        peak = radius.flatten()[spectrum.flatten().argmax()].item()
        low, high = FREQUENCY_BANDS[label[0, 0].item()]
        # the grating is not periodic on the grid: allow one bin of leakage
        assert low - 1 / 32 <= peak <= high + 1 / 32


def test_segmentation_custom_bands_and_noise():
    data = _segmentation(bands=((0.05, 0.1), (0.3, 0.4)), noise=0.0, regions=2)
    assert data.num_classes == 2 and data.train_y.max() <= 1
    assert data.train_x.abs().max() <= 1.2 + 1e-6  # contrast at most 1.2
    noisy = _segmentation(bands=((0.05, 0.1), (0.3, 0.4)), noise=1.0, regions=2)
    assert noisy.train_x.std() > data.train_x.std()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"generator": 0}, TypeError, "expected generator"),
        ({"size": 3}, ValueError, "size"),
        ({"regions": 0}, ValueError, "regions"),
        ({"bands": ((0.1, 0.2),)}, ValueError, "at least two bands"),
        ({"bands": ((0.1, 0.2), (0.3, 0.6))}, ValueError, "at least two bands"),
        ({"noise": -1.0}, ValueError, "noise >= 0"),
    ],
)
def test_segmentation_data_errors(kwargs, error, message):
    kwargs = {"generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(error, match=message):
        make_frequency_segmentation(**kwargs)


def test_tiny_segmenter_layout():
    model = TinySegmenter(num_classes=4, width=6, depth=3)
    out = model(torch.randn(2, 1, 9, 9))
    assert out.shape == (2, 4, 9, 9)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 + 1 and convs[-1].kernel_size == (1, 1)
    calls = []

    def factory(*args):
        calls.append(args)
        return nn.Conv2d(*args)

    TinySegmenter(factory, width=5, depth=2)
    assert calls == [(5, 5, 3, 1, 1)] * 2
    with pytest.raises(TypeError, match="expected conv_factory to be callable"):
        TinySegmenter(3)


def test_segmentation_scores_by_hand():
    class Fixed(nn.Module):
        def forward(self, x):
            # class 0 on the left half, class 1 on the right half
            logits = torch.zeros(x.shape[0], 2, 2, 2)
            logits[:, 0, :, 0] = 1.0
            logits[:, 1, :, 1] = 1.0
            return logits

    y = torch.tensor([[[0, 1], [0, 0]]])
    accuracy, miou = segmentation_scores(Fixed(), torch.zeros(1, 1, 2, 2), y, 2)
    # hits: 2 zeros and 1 one; IoU(0) = 2 / 3, IoU(1) = 1 / 2
    assert accuracy == 0.75
    assert math.isclose(miou, (2 / 3 + 1 / 2) / 2)


def test_train_segmenter_learns_and_is_reproducible():
    data = _segmentation(num_train=64, num_test=32)

    def run():
        torch.manual_seed(0)
        model = TinySegmenter(width=4)
        return train_segmenter(
            model,
            data,
            epochs=3,
            lr=1e-2,
            batch_size=16,
            generator=torch.Generator().manual_seed(0),
        )

    first, second = run(), run()
    assert isinstance(first, SegmentationHistory)
    assert len(first.train_loss) == len(first.test_miou) == 3
    assert first.train_loss == second.train_loss
    assert first.final_accuracy == second.final_accuracy
    assert first.train_loss[-1] < first.train_loss[0]
    assert 0 <= first.final_miou <= 1 and 0 <= first.final_accuracy <= 1
    assert first.seconds > 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"lr": 0.0}, ValueError, "lr > 0"),
        ({"generator": 1}, TypeError, "expected generator"),
        ({"data": "data"}, TypeError, "expected data to be a SegmentationData"),
    ],
)
def test_train_segmenter_errors(kwargs, error, message):
    kwargs = {
        "data": _segmentation(num_train=4, num_test=2),
        "epochs": 1,
        "lr": 1e-3,
        "batch_size": 2,
        "generator": torch.Generator().manual_seed(0),
        **kwargs,
    }
    data = kwargs.pop("data")
    with pytest.raises(error, match=message):
        train_segmenter(TinySegmenter(width=2), data, **kwargs)
