"""The operator contract: every layer against ``nn.Conv2d``'s whole surface.

One parametrised table of operators (:data:`ROWS`), in the spirit of torchvision's
``RoIOpTester`` and kornia's ``BaseTester``: every check below runs for every row.
Adding an operator to the book is one row here plus its own numerical tests in its
``test_<module>.py``.

Each layer is built with its dynamic branch *randomised* (:func:`make`), so that a
check cannot pass because the branch is inert at initialisation (zero offsets, a
uniform attention). ODConv's attention BatchNorm is in eval mode (running
statistics) wherever samples are compared one by one.

DDF is depthwise by nature (``DDFConv2d(channels, kernel_size, stride, dilation)``,
padding ``(k - 1) * dilation / 2``, no bias, no padding modes): its row is marked
``depthwise`` and :func:`build` maps ``nn.Conv2d``'s arguments onto its own, with
``out_channels = groups = in_channels``. The checks of surface it does not have
(other channel counts, padding modes, bias, ``nn.Conv2d``'s constructor) are
not generated for it; ``tests/test_ddf.py`` checks its own constructor and errors.
FDConv transforms the whole ``C_out x C_in`` weight, so it has no ``groups``: its
rows are marked ``grouped=False`` and see only the geometries with ``groups=1``.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refimpl
from refimpl import CondConv2d, DDFConv2d, DeformConv2d, DynamicConv2d, ODConv2d
from refimpl._conv import PADDING_MODES, Conv2dBase
from refimpl.fdconv import FDConv2d
from refimpl.models import convert_conv2d

from conftest import DEVICES, randn, tolerance

F64 = tolerance(torch.float64)


@dataclasses.dataclass(frozen=True)
class Row:
    """One operator of the contract: its class and the options it is tested with."""

    cls: type
    options: dict
    # standard deviation of the random dynamic-branch parameters (see ``make``)
    branch_scale: float = 0.5
    id: str = ""
    # DDF: C -> C, groups = C, padding (k - 1) * dilation / 2, no bias
    depthwise: bool = False
    # the parameter that must receive a gradient (the main kernel)
    main: str = "weight"
    # whether the operator takes groups > 1
    grouped: bool = True

    def __str__(self) -> str:
        return self.id or self.cls.__name__


ROWS = [
    Row(CondConv2d, {"num_kernels": 3}, id="CondConv2d"),
    Row(DynamicConv2d, {"num_kernels": 3, "temperature": 2.0}, id="DynamicConv2d"),
    Row(ODConv2d, {"num_kernels": 2}, id="ODConv2d"),
    Row(ODConv2d, {"num_kernels": 1, "attention_norm": None}, id="ODConv2d-1x"),
    Row(DeformConv2d, {"modulated": True}, branch_scale=0.05, id="DeformConv2d"),
    Row(
        FDConv2d,
        {"num_kernels": 2, "placement": "any"},
        branch_scale=0.3,
        main="fdw.dft_weight",
        grouped=False,
        id="FDConv2d",
    ),
    Row(
        FDConv2d,
        {"num_kernels": 3, "fbm": True, "order": "io", "placement": "any"},
        branch_scale=0.3,
        main="fdw.dft_weight",
        grouped=False,
        id="FDConv2d-io",
    ),
    Row(DDFConv2d, {"head": 2}, depthwise=True, main="spatial.weight", id="DDFConv2d"),
    Row(
        DDFConv2d,
        {"combine": "add"},
        branch_scale=0.3,
        depthwise=True,
        main="spatial.weight",
        id="DDFConv2d-add",
    ),
]
CONV2D_ROWS = [row for row in ROWS if not row.depthwise]

# Constructor errors that every operator must raise the same way:
# (override of the arguments (4, 6, 3), error type, message after the class name)
COMMON_ERRORS = [
    ({"in_channels": 0}, ValueError, r"expected in_channels >= 1, got 0"),
    ({"out_channels": 2.0}, TypeError, r"expected out_channels to be an int"),
    ({"kernel_size": (3,)}, TypeError, r"expected kernel_size to be an int or a pair"),
    ({"kernel_size": True}, TypeError, r"expected kernel_size to be an int or a pair"),
    ({"stride": 0}, ValueError, r"expected stride >= 1, got 0"),
    ({"padding": -1}, ValueError, r"expected padding >= 0, got -1"),
    ({"padding": "full"}, ValueError, r"expected padding to be an int, a pair of"),
    (
        {"padding": "same", "stride": 2},
        ValueError,
        r"expected stride 1 with padding='same'",
    ),
    ({"dilation": (0, 1)}, ValueError, r"expected dilation >= 1"),
    ({"groups": 3}, ValueError, r"expected groups to divide in_channels"),
    ({"groups": 4}, ValueError, r"expected groups to divide out_channels"),
    ({"groups": 0}, ValueError, r"expected groups >= 1, got 0"),
    ({"bias": "yes"}, TypeError, r"expected bias to be a bool, got str 'yes'"),
    ({"padding_mode": "mirror"}, ValueError, r"expected padding_mode in \('zeros'"),
    ({"dtype": torch.int64}, TypeError, r"expected dtype to be a floating-point"),
]

# Errors of each operator's own options.
OWN_ERRORS = {
    CondConv2d: [
        ({"num_kernels": 0}, ValueError, r"expected num_kernels >= 1, got 0"),
        ({"num_kernels": 2.5}, TypeError, r"expected num_kernels to be an int"),
    ],
    DynamicConv2d: [
        ({"num_kernels": 0}, ValueError, r"expected num_kernels >= 1, got 0"),
        ({"reduction": float("nan")}, ValueError, r"expected reduction to be finite"),
        ({"reduction": 0}, ValueError, r"expected reduction > 0, got 0"),
        ({"reduction": "4"}, TypeError, r"expected reduction to be a real number"),
        ({"min_hidden": 0}, ValueError, r"expected min_hidden >= 1, got 0"),
        ({"temperature": math.inf}, ValueError, r"expected temperature to be finite"),
        ({"temperature": -1.0}, ValueError, r"expected temperature > 0, got -1.0"),
        ({"temperature": True}, TypeError, r"expected temperature to be a real"),
    ],
    ODConv2d: [
        ({"num_kernels": -1}, ValueError, r"expected num_kernels >= 1, got -1"),
        ({"reduction": -0.5}, ValueError, r"expected reduction > 0, got -0.5"),
        ({"min_hidden": 1.5}, TypeError, r"expected min_hidden to be an int"),
        ({"attention_norm": "layer"}, ValueError, r"expected attention_norm 'batch'"),
        ({"order": "fast"}, ValueError, r"expected order in \('auto', 'kernel'"),
        ({"temperature": math.nan}, ValueError, r"expected temperature to be finite"),
    ],
    DeformConv2d: [
        ({"offset_groups": 3}, ValueError, r"expected offset_groups to divide"),
        ({"offset_groups": 0}, ValueError, r"expected offset_groups >= 1, got 0"),
        ({"modulated": "no"}, TypeError, r"expected modulated to be a bool, got str"),
        ({"mask_scale": math.nan}, ValueError, r"expected mask_scale to be finite"),
        ({"mask_scale": 0.0}, ValueError, r"expected mask_scale > 0, got 0.0"),
    ],
}


_CONV2D_ARGS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)


def build(row: Row, *args, **kwargs) -> Conv2dBase:
    """The row's layer from ``nn.Conv2d``'s arguments (fresh initialisation).

    A depthwise row takes ``in_channels``, ``kernel_size``, ``stride`` and
    ``dilation``; ``out_channels`` and ``groups`` become ``in_channels``, and a
    padding, bias or padding mode it cannot have fails the test that asks.
    """
    if not row.depthwise:
        return row.cls(*args, **{**row.options, **kwargs})
    conv = dict(zip(_CONV2D_ARGS, args))
    for name in _CONV2D_ARGS:
        if name in kwargs:
            conv[name] = kwargs.pop(name)
    c, k = conv["in_channels"], conv["kernel_size"]
    stride, dilation = conv.get("stride", 1), conv.get("dilation", 1)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    natural = ((k - 1) * dh // 2, (k - 1) * dw // 2)
    padding = conv.get("padding", natural)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if padding != natural or conv.get("padding_mode", "zeros") != "zeros":
        raise AssertionError(f"{row} cannot take padding {padding!r}")
    return row.cls(c, k, stride, dilation, **{**row.options, **kwargs})


def make(
    row: Row, *args, seed: int = 0, dtype=torch.float64, device="cpu", **kwargs
) -> Conv2dBase:
    """The row's layer, in eval mode, with every parameter drawn at random.

    The main kernels keep their scale; the dynamic branch (routing, attention,
    offsets) gets ``N(0, branch_scale^2)`` entries so that it really depends on the
    input. BatchNorm statistics are set to non-trivial values too.
    """
    layer = build(row, *args, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name in ("weight", "bias"):
                p.copy_(noise * 0.3)
            else:
                p.copy_(noise * row.branch_scale)
        for name, b in layer.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
    return layer.to(device).eval()


rows = pytest.mark.parametrize("row", ROWS, ids=str)
conv2d_rows = pytest.mark.parametrize("row", CONV2D_ROWS, ids=str)

# (in, out, kernel, stride, padding, dilation, groups, padding_mode, size)
GEOMETRIES = [
    (4, 6, 3, 1, 1, 1, 1, "zeros", (7, 8)),
    (4, 6, (3, 2), (2, 1), (1, 0), 1, 2, "zeros", (9, 7)),
    (6, 4, (1, 3), 1, (0, 2), (1, 2), 2, "reflect", (6, 9)),
    (4, 4, 3, 1, "same", 2, 4, "zeros", (8, 7)),
    (4, 6, (2, 4), 1, "same", 1, 1, "circular", (7, 9)),
    (4, 2, 3, (1, 2), "valid", 1, 2, "replicate", (6, 8)),
    (2, 4, 3, 3, 2, 1, 1, "replicate", (11, 10)),
]
# depthwise geometries for DDF: C -> C, groups C, padding (k - 1) * d / 2
DEPTHWISE_GEOMETRIES = [
    (4, 4, 3, 1, 1, 1, 4, "zeros", (7, 8)),
    (4, 4, 3, 2, 2, 2, 4, "zeros", (9, 7)),  # the stride divides neither size
    (2, 2, 5, (1, 3), (2, 2), 1, 2, "zeros", (6, 9)),
    (6, 6, 3, (2, 1), (1, 2), (1, 2), 6, "zeros", (8, 5)),
]


def _row_geometries(row: Row) -> list:
    if row.depthwise:
        return DEPTHWISE_GEOMETRIES
    return [g for g in GEOMETRIES if row.grouped or g[6] == 1]


ROW_GEOMETRIES = [
    pytest.param(row, geometry, id=f"{row}-{geometry}")
    for row in ROWS
    for geometry in _row_geometries(row)
]
rows_and_geometries = pytest.mark.parametrize("row, geometry", ROW_GEOMETRIES)


def _conv(geometry, dtype=torch.float64) -> nn.Conv2d:
    c_in, c_out, k, s, p, d, g, mode, _ = geometry
    return nn.Conv2d(c_in, c_out, k, s, p, d, g, padding_mode=mode, dtype=dtype)


def _layer(row, geometry, **kwargs):
    c_in, c_out, k, s, p, d, g, mode, _ = geometry
    return make(row, c_in, c_out, k, s, p, d, g, not row.depthwise, mode, **kwargs)


# --- shapes and batching --------------------------------------------------------------


@rows_and_geometries
def test_output_shape_is_conv2d_shape(row, geometry):
    layer = _layer(row, geometry)
    x = randn(2, geometry[0], *geometry[-1])
    assert layer(x).shape == _conv(geometry)(x).shape


@rows
@pytest.mark.parametrize("n", [0, 1, 33])
def test_batch_sizes_compute_every_sample_on_its_own(row, n):
    layer = make(row, 4, 6, 3, padding=1)
    x = randn(n, 4, 5, 6, seed=n)
    out = layer(x)
    assert out.shape == (n, layer.out_channels, 5, 6)
    if n:
        one_by_one = torch.cat([layer(x[i : i + 1]) for i in range(n)])
        torch.testing.assert_close(out, one_by_one, **F64)
    else:
        out.sum().backward()  # the graph reaches the parameters, as nn.Conv2d's
        assert layer.get_parameter(row.main).grad is not None


@rows_and_geometries
def test_unbatched_input_is_a_batch_of_one(row, geometry):
    layer = _layer(row, geometry)
    x = randn(geometry[0], *geometry[-1], seed=3)
    out = layer(x)
    assert out.dim() == 3
    torch.testing.assert_close(out, layer(x.unsqueeze(0)).squeeze(0), **F64)


@rows
def test_channels_last_and_non_contiguous_inputs(row):
    layer = make(row, 4, 6, 3, padding=1)
    x = randn(3, 4, 7, 6, seed=4)
    expected = layer(x)
    cl = x.to(memory_format=torch.channels_last)
    out = layer(cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, **F64)
    wide = randn(3, 8, 7, 12, seed=4)
    sliced = wide[:, ::2, :, ::2]  # non-contiguous in two axes
    assert not sliced.is_contiguous()
    torch.testing.assert_close(layer(sliced), layer(sliced.contiguous()), **F64)


@rows
def test_module_to_channels_last(row):
    layer = make(row, 4, 6, 3, padding=1)
    x = randn(2, 4, 6, 6, seed=5)
    expected = layer(x)
    layer = layer.to(memory_format=torch.channels_last)
    main = layer.get_parameter(row.main)
    kernels = main.flatten(0, main.dim() - 4)
    assert kernels.is_contiguous(memory_format=torch.channels_last)
    if kernels.shape[1] > 1 and kernels.shape[-1] * kernels.shape[-2] > 1:
        assert not kernels.is_contiguous()  # the conversion really happened
    out = layer(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, **F64)
    layer = layer.to(memory_format=torch.contiguous_format)  # and back, as nn.Conv2d
    assert all(p.is_contiguous() for p in layer.parameters())
    torch.testing.assert_close(layer(x), expected, **F64)


# --- dtypes, autocast, gradients ------------------------------------------------------


@rows
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_agree_with_float64(row, device, dtype):
    layer64 = make(row, 4, 6, 3, padding=1)
    x = randn(2, 4, 6, 5, seed=6)
    expected = layer64(x)
    layer = make(row, 4, 6, 3, padding=1, dtype=dtype, device=device)
    out = layer(x.to(device=device, dtype=dtype))
    assert out.dtype == dtype and out.device.type == device
    scale = expected.abs().max().item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    assert (out.double().cpu() - expected).abs().max().item() <= tol * scale


@rows
def test_autocast_on_cpu(row):
    layer = make(row, 4, 6, 3, padding=1, dtype=torch.float32)
    x = randn(2, 4, 6, 6, seed=7, dtype=torch.float32)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 8e-2 * scale


@rows
def test_gradcheck(row, one_thread):
    layer = make(row, 2, 3, 3, padding=1, stride=(1, 2))
    x = randn(2, 2, 4, 5, seed=8, requires_grad=True)
    params = [p for p in layer.parameters()]

    def fn(x, *ps):
        for p, value in zip(params, ps):
            p.data = value.data
        return torch.func.functional_call(
            layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x,)
        )

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# --- state dicts, conversion, meta ----------------------------------------------------


@rows
def test_state_dict_round_trip(row):
    layer = make(row, 4, 6, 3, padding=1, seed=1)
    if hasattr(layer, "temperature"):
        layer.temperature = 3.5
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(row, 4, 6, 3, padding=1, seed=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = randn(2, 4, 5, 5, seed=9)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    if hasattr(layer, "temperature"):
        assert fresh.temperature == 3.5


@rows
def test_strict_load_without_the_temperature_entry(row):
    layer = make(row, 4, 6, 3, padding=1, seed=1)
    state = {k: v for k, v in layer.state_dict().items() if "_extra_state" not in k}
    fresh = make(row, 4, 6, 3, padding=1, seed=2)
    before = getattr(fresh, "temperature", None)
    fresh.load_state_dict(state, strict=True)  # an older or official checkpoint
    assert getattr(fresh, "temperature", None) == before
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**state, "surprise": torch.zeros(1)}, strict=True)


@rows_and_geometries
@pytest.mark.parametrize("bias", [True, False])
def test_from_conv2d_preserves_the_function(row, geometry, bias):
    torch.manual_seed(0)
    c_in, c_out, k, s, p, d, g, mode, size = geometry
    if row.depthwise and bias:
        # DDF has no bias: converting a convolution with one must say so
        conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, True, mode, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"without bias"):
            row.cls.from_conv2d(conv, **{**row.options, "combine": "add"})
        return
    if row.options.get("combine", "mul") == "mul" and row.depthwise:
        # with 'mul' no static filter is reachable (zero-mean spatial filters)
        conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, False, mode, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"expected combine='add' to preserve"):
            row.cls.from_conv2d(conv, **row.options)
        return
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, bias, mode, dtype=torch.float64)
    layer = row.cls.from_conv2d(conv, **row.options).eval()
    assert isinstance(layer, row.cls)
    x = randn(3, c_in, *size, seed=10)
    torch.testing.assert_close(layer(x), conv(x), **F64)
    # the kernels differ from one another, so training can tell them apart
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.dim() == 5 and weight.shape[0] > 1:
        assert not torch.allclose(weight[0], weight[1])


@rows
def test_from_conv2d_in_float32_and_convert_conv2d(row):
    torch.manual_seed(1)
    if row.depthwise:
        _convert_depthwise(row)
        return
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding="same", bias=False, padding_mode="reflect"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, stride=2),
    ).eval()
    x = randn(2, 3, 9, 9, seed=11, dtype=torch.float32)
    expected = model(x)
    convert_conv2d(model, lambda conv: row.cls.from_conv2d(conv, **row.options))
    assert all(isinstance(model[i], row.cls) for i in (0, 2, 5))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def _convert_depthwise(row):
    # the depthwise convolutions of a small network, converted function-preserving
    # where the method can be ('add'), else replaced by fresh layers
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False),
    ).eval()
    x = randn(2, 3, 9, 9, seed=11, dtype=torch.float32)
    expected = model(x)
    preserve = row.options.get("combine", "mul") == "add"

    def factory(conv):
        return row.cls.from_conv2d(conv, preserve=preserve, **row.options)

    convert_conv2d(model, factory, lambda name, conv: conv.groups > 1)
    assert isinstance(model[0], nn.Conv2d)
    assert all(isinstance(model[i], row.cls) for i in (2, 5))
    out = model(x)
    assert out.shape == expected.shape
    if preserve:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@rows
def test_meta_device(row):
    layer = build(row, 4, 6, 3, padding=1, device="meta").eval()
    assert all(p.is_meta for p in layer.parameters())
    out = layer(torch.empty(2, 4, 7, 5, device="meta"))
    c_out = layer.out_channels
    assert out.is_meta and out.shape == (2, c_out, 7, 5)
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer(torch.zeros(1, 4, 3, 3)).shape == (1, c_out, 3, 3)


@rows
def test_integer_likes_are_accepted(row):
    if row.depthwise:
        layer = row.cls(np.int64(4), np.int32(3), stride=np.int16(1), **row.options)
    else:
        layer = row.cls(
            np.int64(4),
            np.int32(6),
            (np.int64(3), 3),
            stride=np.int16(1),
            padding=np.int64(1),
            **row.options,
        )
    layer = layer.eval()
    assert layer.kernel_size == (3, 3) and type(layer.in_channels) is int
    assert layer(torch.zeros(1, 4, 5, 5)).shape == (1, layer.out_channels, 5, 5)


@conv2d_rows
def test_extra_repr_follows_conv2d(row):
    layer = row.cls(32, 48, 3)  # wide enough for every default placement rule
    conv = nn.Conv2d(32, 48, 3)
    assert layer.extra_repr() == conv.extra_repr()  # defaults are omitted
    g = 2 if row.grouped else 1
    layer = row.cls(4, 6, (3, 1), 2, "valid", 1, g, False, "reflect", **row.options)
    conv = nn.Conv2d(4, 6, (3, 1), 2, "valid", 1, g, False, "reflect")
    text = layer.extra_repr()
    assert text.startswith(conv.extra_repr())
    for name, value in row.options.items():
        default = row.cls.__init__.__kwdefaults__[name]
        assert (f"{name}={value!r}" in text) == (value != default)


# --- compiler and deployment ----------------------------------------------------------


@rows
def test_compile_with_a_dynamic_batch_does_not_recompile(row):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = make(row, 4, 6, 3, padding=1, dtype=torch.float32)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for n in range(2, 13):
        x = randn(n, 4, 6, 5, seed=n, dtype=torch.float32)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@rows
def test_export_with_a_dynamic_batch(row):
    layer = make(row, 4, 6, 3, padding=1, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=64)
    x = randn(2, 4, 6, 5, dtype=torch.float32)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    for n in (3, 7):
        x = randn(n, 4, 6, 5, seed=n, dtype=torch.float32)
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-4, atol=1e-5)


@rows
def test_onnx_export_with_a_dynamic_batch(row, tmp_path):
    import onnxruntime

    layer = make(row, 4, 6, 3, padding=1, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=64)
    x = randn(2, 4, 6, 5, dtype=torch.float32)
    program = torch.onnx.export(
        layer, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
    )
    path = tmp_path / "layer.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    for n in (3, 7):
        x = randn(n, 4, 6, 5, seed=n, dtype=torch.float32)
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(
            torch.from_numpy(out), layer(x).detach(), rtol=1e-4, atol=1e-5
        )


# --- bad input ------------------------------------------------------------------------


@rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_pixels_never_raise_and_stay_in_their_sample(row, dtype, value):
    layer = make(row, 4, 6, 3, padding=1, dtype=dtype)
    x = randn(2, 4, 6, 6, seed=12, dtype=dtype)
    clean = layer(x)
    x[0, 1, 2, 3] = value
    out = layer(x)
    assert not torch.isfinite(out[0]).all()  # the bad pixel reaches its outputs
    torch.testing.assert_close(out[1], clean[1], rtol=0, atol=0)


@conv2d_rows
@pytest.mark.parametrize("override, error, match", COMMON_ERRORS, ids=str)
def test_constructor_errors_are_the_same_for_every_operator(
    row, override, error, match
):
    kwargs = {
        "in_channels": 4,
        "out_channels": 6,
        "kernel_size": 3,
        **row.options,
        **override,
    }
    with pytest.raises(error, match=rf"^{row.cls.__name__} {match}"):
        row.cls(**kwargs)


@pytest.mark.parametrize(
    "cls, override, error, match",
    [(cls, *case) for cls, cases in OWN_ERRORS.items() for case in cases],
    ids=str,
)
def test_constructor_errors_of_each_operator(cls, override, error, match):
    kwargs = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, **override}
    with pytest.raises(error, match=rf"^{cls.__name__} {match}"):
        cls(**kwargs)


@rows
def test_forward_errors(row):
    if row.depthwise:  # DDF pads by (k - 1) * d / 2: any size >= 1 is enough
        layer = build(row, 4, 4, 3, dilation=2, padding=2)
    else:
        layer = build(row, 4, 6, 3, dilation=2)
    name = row.cls.__name__
    cases = [
        ([1.0], TypeError, r"expected input to be a torch\.Tensor, got list"),
        (
            torch.zeros(2, 4, 7, 7, dtype=torch.int32),
            TypeError,
            r"expected input with a floating-point dtype, got torch\.int32",
        ),
        (
            torch.zeros(4, 7),
            ValueError,
            r"expected input of shape \[N, C_in, H, W\] or \[C_in, H, W\], got 2 dim",
        ),
        (
            torch.zeros(1, 2, 4, 7, 7),
            ValueError,
            r"expected input of shape \[N, C_in, H, W\] or \[C_in, H, W\], got 5 dim",
        ),
        (torch.zeros(2, 3, 7, 7), ValueError, r"expected input with 4 channels, got 3"),
        (
            torch.zeros(2, 4, 7, 7, dtype=torch.float64),
            TypeError,
            r"expected input of dtype torch\.float32 \(the dtype of its parameters\), "
            r"got torch\.float64",
        ),
        (
            torch.zeros(2, 4, 4, 7),
            ValueError,
            r"expected the padded input \(4\) to be at least the dilated kernel size "
            r"\(5\) along height",
        ),
    ]
    if row.depthwise:
        cases = cases[:-1]
    for value, error, match in cases:
        with pytest.raises(error, match=rf"^{name} {match}"):
            layer(value)
        with pytest.raises(error, match=rf"^{name} {match}"):
            layer.dynamic_tensors(value)
    meta = build(row, 4, 6, 3, device="meta", padding=1).eval()
    with pytest.raises(TypeError, match=rf"^{name} expected input of dtype"):
        meta(torch.empty(2, 4, 5, 5, device="meta", dtype=torch.float64))
    if row.depthwise:
        return  # no padding modes
    reflect = row.cls(4, 6, 3, padding=3, padding_mode="reflect", **row.options)
    with pytest.raises(
        ValueError,
        match=rf"^{name} expected reflect padding \(3\) smaller than the input "
        r"height \(3\)",
    ):
        reflect(torch.zeros(4, 3, 9))


# --- the dynamic part and the temperature ---------------------------------------------


@rows
def test_dynamic_tensors_feed_the_functional_form(row):
    layer = make(row, 4, 6, 3, padding=1)
    x = randn(3, 4, 6, 5, seed=13)
    dynamic = layer.dynamic_tensors(x)
    assert isinstance(dynamic, tuple) and hasattr(dynamic, "_fields")
    functional = {
        CondConv2d: refimpl.condconv2d_reference,
        DynamicConv2d: refimpl.dynamic_conv2d_reference,
        ODConv2d: refimpl.odconv2d_reference,
    }
    if row.cls is DeformConv2d:
        offset, mask = dynamic
        out = refimpl.deform_conv2d(x, offset, layer.weight, layer.bias, 1, 1, 1, mask)
    elif row.cls is DDFConv2d:
        out = refimpl.ddf.ddf_reference(x, *dynamic, 3, 1, 1, layer.combine)
    elif row.cls is FDConv2d:
        k_list = layer.fbm.k_list if layer.fbm is not None else ()
        out = refimpl.fdconv.fdconv2d(
            x, *dynamic, layer.bias, 1, 1, 1, k_list=k_list, order=layer.order
        )
    else:
        out = functional[row.cls](x, *dynamic, layer.weight, layer.bias, 1, 1, 1, 1)
    torch.testing.assert_close(out, layer(x), **F64)


def test_set_temperature_touches_only_refimpl_layers():
    class Distiller(nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.tensor(4.0))

    model = nn.Sequential(
        DynamicConv2d(4, 4, 3), ODConv2d(4, 4, 3), CondConv2d(4, 4, 3), Distiller()
    )
    assert refimpl.set_temperature(model, 7.0) == 2
    assert model[0].temperature == 7.0 and model[1].temperature == 7.0
    assert model[3].temperature.item() == 4.0  # a user's parameter is left alone
    assert refimpl.set_temperature(nn.Sequential(nn.Conv2d(1, 1, 1)), 2.0) == 0
    with pytest.raises(ValueError, match=r"^set_temperature expected value > 0"):
        refimpl.set_temperature(model, 0.0)
    with pytest.raises(TypeError, match=r"^set_temperature expected model to be"):
        refimpl.set_temperature([model], 1.0)


@conv2d_rows
@pytest.mark.parametrize(
    "mode", ["zeros", "reflect", "replicate", "circular", "constant", "mirror", ""]
)
def test_padding_modes_are_exactly_nn_conv2d_modes(row, mode):
    # nn.Conv2d is the judge: a mode it accepts is accepted and computes the same
    # function after from_conv2d, a mode it refuses is refused with ValueError
    try:
        conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode=mode, dtype=torch.float64)
    except ValueError:
        assert mode not in PADDING_MODES
        with pytest.raises(ValueError, match=r"expected padding_mode in"):
            row.cls(4, 6, 3, padding=1, padding_mode=mode, **row.options)
        return
    assert mode in PADDING_MODES
    layer = row.cls.from_conv2d(conv, **row.options).eval()
    x = randn(2, 4, 6, 7, seed=16)
    torch.testing.assert_close(layer(x), conv(x), **F64)


def test_functional_padding_is_conv2d_padding():
    # the base pads exactly as nn.Conv2d: checked against F.conv2d for "same"
    # with an even kernel, where the extra row and column go to the bottom/right
    conv = nn.Conv2d(2, 2, (2, 4), padding="same", dtype=torch.float64)
    x = randn(1, 2, 5, 6, seed=14)
    reference = F.conv2d(F.pad(x, (1, 2, 0, 1)), conv.weight, conv.bias)
    for row in CONV2D_ROWS:
        layer = row.cls.from_conv2d(conv, **row.options).eval()
        torch.testing.assert_close(layer(x), reference, **F64)


@rows
def test_functional_forms_check_dtypes_and_take_input_by_name(row):
    layer = make(row, 4, 6, 3, padding=1, dtype=torch.float32)
    x = randn(2, 4, 5, 5, seed=15, dtype=torch.float32)
    dynamic = layer.dynamic_tensors(x)
    if row.cls is FDConv2d:
        k_list = layer.fbm.k_list if layer.fbm is not None else ()

        def call(input, kernels):
            return refimpl.fdconv.fdconv2d(
                input=input,
                band_weights=dynamic.band_weights,
                channel_attention=dynamic.channel_attention,
                filter_attention=dynamic.filter_attention,
                spatial_attention=dynamic.spatial_attention,
                kernels=kernels,
                bias=layer.bias,
                padding=1,
                k_list=k_list,
                order=layer.order,
            )

        torch.testing.assert_close(call(x, dynamic.kernels), layer(x))
        with pytest.raises(
            TypeError,
            match=r"^fdconv2d expected kernels with the dtype of the input "
            r"\(torch\.float32\), got torch\.float64",
        ):
            call(x, dynamic.kernels.double())
        return
    if row.cls is DDFConv2d:
        name = "ddf"

        def call(input, weight, dynamic=dynamic):
            return refimpl.ddf.ddf(
                input=input,
                channel_filter=weight,
                spatial_filter=dynamic.spatial_filter,
                kernel_size=3,
                combine=layer.combine,
            )

        torch.testing.assert_close(call(x, dynamic.channel_filter), layer(x))
        with pytest.raises(
            TypeError,
            match=rf"^{name} expected channel_filter with the dtype of the input "
            r"\(torch\.float32\), got torch\.float64",
        ):
            call(x, dynamic.channel_filter.double())
        return
    if row.cls is DeformConv2d:
        fn, name = refimpl.deform_conv2d, "deform_conv2d"

        def call(input, weight, dynamic=dynamic):
            return fn(
                input=input,
                offset=dynamic.offset,
                weight=weight,
                bias=layer.bias,
                padding=1,
                mask=dynamic.mask,
            )
    else:
        fn = {
            CondConv2d: refimpl.condconv2d,
            DynamicConv2d: refimpl.dynamic_conv2d,
            ODConv2d: refimpl.odconv2d,
        }[row.cls]
        name = fn.__name__

        def call(input, weight):
            return fn(input, *dynamic, weight, layer.bias, 1, 1)

    torch.testing.assert_close(call(input=x, weight=layer.weight), layer(x))
    with pytest.raises(
        TypeError,
        match=rf"^{name} expected weight with the dtype of the input "
        r"\(torch\.float32\), got torch\.float64",
    ):
        call(x, layer.weight.double())
