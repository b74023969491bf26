"""Tests for refimpl.protocol: the controlled protocol of the book's experiments."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from refimpl.condconv import CondConv2d
from refimpl.ddf import DDFConv2d
from refimpl.dynamic_conv import DynamicConv2d, set_temperature
from refimpl.protocol import (
    HARD_TEXTURES,
    Arm,
    ArmResult,
    Task,
    count_macs,
    count_params,
    denoising_task,
    format_results,
    match_width,
    matched_static_arms,
    plot_results,
    run_protocol,
    segmentation_task,
    texture_task,
)
from refimpl.toy import (
    TinyCNN,
    TinyDenoiser,
    TinySegmenter,
    evaluate,
    make_frequency_segmentation,
    make_oriented_textures,
    make_patchwork_denoising,
)


def _textures(**kwargs):
    kwargs = {"num_train": 48, "num_test": 16, "size": 8, "num_classes": 4, **kwargs}
    return make_oriented_textures(generator=torch.Generator().manual_seed(0), **kwargs)


def _tiny_task(epochs=1):
    return texture_task(_textures(), epochs=epochs, batch_size=16)


def test_hard_textures_are_the_default_data():
    task = texture_task()
    assert task.data.train_x.shape == (HARD_TEXTURES["num_train"], 1, 16, 16)
    assert task.num_outputs == HARD_TEXTURES["num_classes"] == 16
    reference = make_oriented_textures(
        generator=torch.Generator().manual_seed(0), **HARD_TEXTURES
    )
    torch.testing.assert_close(task.data.train_x, reference.train_x)


def test_count_macs_of_a_plain_convolution_is_the_textbook_formula():
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False)
    x = torch.randn(1, 6, 9, 9)
    # 5 x 5 outputs, each 10 channels of a 6 * 3 * 3 dot product
    assert count_macs(conv, x) == 10 * 6 * 3 * 3 * 5 * 5


def test_count_macs_counts_kernel_mixing_and_restores_the_algorithm():
    layer = CondConv2d(8, 8, 3, padding=1, num_kernels=4, algorithm="outputs")
    x = torch.randn(1, 8, 6, 6)
    conv = 8 * 8 * 9 * 36
    grouped = count_macs(layer, x)
    # one convolution, the mixing of kernels (n |W|) and biases (n C_out), and the
    # routing layer (C_in n)
    assert grouped == conv + 4 * 8 * 8 * 9 + 4 * 8 + 8 * 4
    assert layer.algorithm == "outputs"
    # what the layer runs: a convolution with every kernel
    assert count_macs(layer, x, algorithm=None) >= 4 * conv
    layer.train()
    count_macs(layer, x)
    assert layer.training


def test_count_macs_counts_ddf_filtering_as_a_depthwise_convolution():
    layer = DDFConv2d(8, 3)  # hidden width of the channel branch: floor(0.2 * 8) = 1
    x = torch.randn(2, 8, 6, 6)
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_macs(depthwise, x) == 2 * 8 * 9 * 36
    spatial_branch = 8 * 9 * 36  # 1x1 convolution to k^2 filter taps per pixel
    channel_branch = 8 * 1 + 1 * 8 * 9  # two linear layers per sample
    filtering = 8 * 9 * 36  # as a depthwise convolution
    assert count_macs(layer, x) == 2 * (spatial_branch + channel_branch + filtering)


def test_count_macs_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    before = model[1].running_mean.clone()
    count_macs(model, torch.randn(1, 2, 5, 5) + 3)
    torch.testing.assert_close(model[1].running_mean, before)


def test_count_params_counts_only_trainable_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)
    assert count_params(model) == 12 + 8


def test_match_width_returns_the_closest_width():
    def build(w):
        return nn.Linear(w, w)  # w * w + w parameters

    assert match_width(build, 110, count_params) == 10  # exact
    assert match_width(build, 120, count_params) == 10  # 110 is closer than 132
    assert match_width(build, 125, count_params) == 11
    assert match_width(build, 1, count_params) == 1


def test_matched_static_arms_match_parameters_and_macs():
    task = _tiny_task()
    dynamic = TinyCNN(functools.partial(CondConv2d, num_kernels=4), num_classes=4)

    def static(w):
        return TinyCNN(nn.Conv2d, num_classes=4, width=w)

    by_params, by_macs = matched_static_arms(static, dynamic, task.example)
    target = count_params(dynamic)
    width = int(by_params.name.split("w=")[1].split(" ")[0])
    nearby = (width - 1, width, width + 1)
    gaps = [abs(count_params(static(w)) - target) for w in nearby]
    assert gaps[1] == min(gaps)
    assert "(params)" in by_params.name and "(MACs)" in by_macs.name
    target = count_macs(dynamic, task.example)
    width = int(by_macs.name.split("w=")[1].split(" ")[0])
    nearby = (width - 1, width, width + 1)
    gaps = [abs(count_macs(static(w), task.example) - target) for w in nearby]
    assert gaps[1] == min(gaps)
    # the dynamic network has more parameters per multiply-add than a static one
    assert int(by_params.name.split("w=")[1].split(" ")[0]) > width


def test_run_protocol_is_reproducible_and_reports_every_seed():
    task = _tiny_task()
    arms = [
        Arm("static", lambda: TinyCNN(nn.Conv2d, num_classes=4, width=4)),
        Arm("condconv", lambda: TinyCNN(CondConv2d, num_classes=4, width=4)),
    ]
    first = run_protocol(arms, task, seeds=(0, 1), threads=1)
    second = run_protocol(arms, task, seeds=(0, 1), threads=1)
    assert [r.name for r in first] == ["static", "condconv"]
    for a, b in zip(first, second):
        assert a.scores == b.scores and len(a.scores) == 2
        assert all(0 <= s <= 1 for s in a.scores)
        assert a.params == count_params(arms[first.index(a)].build())
        assert a.seconds_per_epoch > 0
        assert a.models == []  # not kept unless asked
        assert a.dynamic == (a.name == "condconv")


def test_run_protocol_calls_the_hook_before_every_step():
    task = _tiny_task(epochs=2)
    progress = []

    def hook(model, p):
        progress.append(p)
        set_temperature(model, 1.0)

    arm = Arm("dy", lambda: TinyCNN(DynamicConv2d, num_classes=4, width=4), hook)
    (result,) = run_protocol([arm], task, seeds=(0,), keep_models=True)
    (model,) = result.models
    # the kept network is the trained one: it scores what the protocol recorded
    accuracy = evaluate(model, task.data.test_x, task.data.test_y)
    assert accuracy == result.scores[0]
    # 48 images in batches of 16: three steps per epoch
    assert progress == pytest.approx([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3])


def test_run_protocol_restores_the_thread_count():
    before = torch.get_num_threads()
    arm = Arm("static", lambda: TinyCNN(nn.Conv2d, num_classes=4, width=2))
    run_protocol([arm], _tiny_task(), seeds=(0,), threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kind", ["denoising", "segmentation"])
def test_dense_tasks_train_and_score(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "denoising":
        data = make_patchwork_denoising(generator=g, num_train=16, num_test=8, size=8)
        task = denoising_task(data, epochs=1, batch_size=8)

        def build():
            return TinyDenoiser(lambda c: nn.Conv2d(c, c, 3, padding=1), width=4)
    else:
        data = make_frequency_segmentation(
            generator=g, num_train=16, num_test=8, size=8
        )
        task = segmentation_task(data, epochs=1, batch_size=8)

        def build():
            return TinySegmenter(num_classes=data.num_classes, width=4)

    (result,) = run_protocol([Arm(kind, build)], task, seeds=(0,))
    assert result.metric == task.metric
    assert result.macs > 0 and len(result.scores) == 1
    assert task.num_outputs == (1 if kind == "denoising" else data.num_classes)


def test_results_table_and_plot():
    results = [
        ArmResult("static, w=8", 1000, 2_000_000, [0.5, 0.7], 0.25, "test accuracy"),
        ArmResult("CondConv", 4000, 2_100_000, [0.6, 0.6, 0.9], 0.5, "test accuracy"),
    ]
    assert results[0].mean == pytest.approx(0.6)
    assert results[0].std == pytest.approx(0.1414213562)
    table = format_results(results)
    lines = table.splitlines()
    assert len(lines) == 3 and "(s/epoch)" in lines[0]
    assert lines[1].endswith("0.500 0.700 (0.25)")
    assert "0.600 ± 0.141" in lines[1] and "4k" in lines[2] and "2.1M" in lines[2]
    assert "s/epoch" not in format_results(results, timing=False)
    fig = plot_results(results, reference=0.5)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["static, w=8", "CondConv"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_errors_are_clear():
    data = _textures()
    with pytest.raises(ValueError, match="kind"):
        Task("video", data, 1, 1e-3, 8)
    with pytest.raises(TypeError, match="DenoisingData, got ToyData"):
        denoising_task(data)
    with pytest.raises(ValueError, match="lr > 0, got 0"):
        texture_task(data, lr=0)
    with pytest.raises(ValueError, match="epochs"):
        texture_task(data, epochs=0)
    arm = Arm("a", lambda: TinyCNN(num_classes=4, width=2))
    with pytest.raises(ValueError, match="unique arm names"):
        run_protocol([arm, arm], texture_task(data))
    with pytest.raises(TypeError, match="Task"):
        run_protocol([arm], data)
    with pytest.raises(ValueError, match="at least one seed"):
        run_protocol([arm], texture_task(data), seeds=())
    with pytest.raises(TypeError, match="nn.Module"):
        count_macs("conv", torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="at least one result"):
        format_results([])
