"""Tests of the shared per-sample convolution: the batch folded into the groups, and
the export-friendly forms used while torch.compile or an exporter records a graph."""

from __future__ import annotations

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import refimpl.per_sample as per_sample_module
from refimpl.per_sample import (
    ALGORITHMS,
    per_sample_conv2d,
    per_sample_conv2d_reference,
)

from conftest import randn, tolerance

# (c_in, c_out, kernel, stride, padding, dilation, groups, size)
GEOMETRIES = [
    (3, 4, (3, 3), 1, 0, 1, 1, (7, 7)),
    (4, 6, (3, 3), 2, 1, 1, 2, (9, 8)),
    (6, 6, (3, 5), (1, 2), (2, 1), (2, 1), 3, (10, 11)),
    (4, 8, (1, 1), 1, 0, 1, 4, (5, 5)),
    (2, 3, (5, 2), 3, (0, 2), 1, 1, (12, 6)),
    (4, 4, (2, 3), 1, 1, (1, 2), 4, (6, 9)),
]


def _data(
    n,
    c_in,
    c_out,
    kernel,
    groups,
    size,
    dtype=torch.float64,
    device="cpu",
    grad=False,
    bias=True,
):
    x = randn(n, c_in, *size, seed=1, dtype=dtype, device=device, requires_grad=grad)
    w = randn(
        n,
        c_out,
        c_in // groups,
        *kernel,
        seed=2,
        dtype=dtype,
        device=device,
        requires_grad=grad,
    )
    b = (
        randn(n, c_out, seed=3, dtype=dtype, device=device, requires_grad=grad)
        if bias
        else None
    )
    return x, w, b


def _per_sample_reference(x, w, b, stride, padding, dilation, groups):
    """Independent reference: plain F.conv2d on each sample, written out here."""
    outs = []
    for i in range(x.shape[0]):
        bi = None if b is None else b[i]
        outs.append(F.conv2d(x[i : i + 1], w[i], bi, stride, padding, dilation, groups))
    return torch.cat(outs)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_batched_equals_loop_and_conv2d(geometry, bias, device):
    c_in, c_out, kernel, stride, padding, dilation, groups, size = geometry
    x, w, b = _data(3, c_in, c_out, kernel, groups, size, device=device, bias=bias)
    args = (stride, padding, dilation, groups)
    expected = _per_sample_reference(x, w, b, *args)
    batched = per_sample_conv2d(x, w, b, *args)
    loop = per_sample_conv2d_reference(x, w, b, *args)
    torch.testing.assert_close(batched, expected, **tolerance(torch.float64))
    torch.testing.assert_close(loop, expected, **tolerance(torch.float64))


def test_samples_really_use_their_own_kernel():
    # Swapping two samples' kernels must change exactly those two outputs.
    x, w, b = _data(4, 3, 5, (3, 3), 1, (6, 6))
    out = per_sample_conv2d(x, w, b, padding=1)
    swapped = per_sample_conv2d(x, w[[1, 0, 2, 3]], b[[1, 0, 2, 3]], padding=1)
    assert not torch.allclose(out[:2], swapped[:2])
    torch.testing.assert_close(out[2:], swapped[2:], rtol=0, atol=0)


@pytest.mark.parametrize("n", [0, 1, 33])
def test_batch_sizes(n, device):
    x, w, b = _data(n, 4, 6, (3, 3), 2, (5, 6), device=device)
    out = per_sample_conv2d(x, w, b, 1, 1, 1, 2)
    assert out.shape == (n, 6, 5, 6)
    torch.testing.assert_close(
        out,
        _per_sample_reference(x, w, b, 1, 1, 1, 2) if n else out.new_zeros(0, 6, 5, 6),
        **tolerance(torch.float64),
    )
    torch.testing.assert_close(
        per_sample_conv2d_reference(x, w, b, 1, 1, 1, 2),
        out,
        **tolerance(torch.float64),
    )


def test_empty_batch_backward_reaches_weight():
    x, w, b = _data(0, 4, 6, (3, 3), 1, (5, 5), grad=True)
    per_sample_conv2d(x, w, b, padding=1).sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    assert b.grad is not None and b.grad.shape == b.shape


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_channels_last_and_non_contiguous(layout, device):
    x, w, b = _data(3, 4, 6, (3, 2), 2, (7, 9), device=device)
    if layout == "channels_last":
        xi = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        # same values, stored with H and W swapped
        xi = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        big = torch.zeros(3, 8, 7, 18, dtype=x.dtype, device=device)
        big[:, ::2, :, ::2] = x
        xi = big[:, ::2, :, ::2]
    assert not xi.is_contiguous()
    w_nc = w.transpose(3, 4).contiguous().transpose(3, 4)  # non-contiguous kernels too
    expected = _per_sample_reference(x, w, b, 2, 1, 1, 2)
    torch.testing.assert_close(
        per_sample_conv2d(xi, w_nc, b, 2, 1, 1, 2), expected, **tolerance(torch.float64)
    )


def test_float32_matches_float64():
    x, w, b = _data(4, 4, 4, (3, 3), 1, (8, 8))
    ref = per_sample_conv2d(x, w, b, padding=1)
    out = per_sample_conv2d(x.float(), w.float(), b.float(), padding=1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_gradcheck(one_thread):
    x, w, b = _data(2, 4, 2, (2, 3), 2, (5, 4), grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: per_sample_conv2d(x, w, b, (2, 1), 1, (1, 2), 2), (x, w, b)
    )


def test_gradients_match_loop():
    x, w, b = _data(3, 4, 6, (3, 3), 2, (6, 6), grad=True)
    grads = torch.autograd.grad(
        per_sample_conv2d(x, w, b, 1, 1, 1, 2).square().sum(), (x, w, b)
    )
    ref = torch.autograd.grad(
        _per_sample_reference(x, w, b, 1, 1, 1, 2).square().sum(), (x, w, b)
    )
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


def test_autocast_bfloat16_cpu():
    x, w, b = _data(2, 4, 4, (3, 3), 1, (8, 8), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = per_sample_conv2d(x, w, b, padding=1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), per_sample_conv2d(x, w, b, padding=1), rtol=5e-2, atol=1e-1
    )


ERRORS = [
    (
        {"x": [1.0]},
        TypeError,
        r"per_sample_conv2d expected input to be a torch\.Tensor",
    ),
    (
        {"x": torch.zeros(2, 4, 5)},
        ValueError,
        r"expected input with 4 dimensions, got 3",
    ),
    (
        {"x": torch.zeros(2, 4, 5, 5, dtype=torch.long)},
        TypeError,
        r"expected input with a floating-point dtype, got torch\.int64",
    ),
    ({"w": torch.zeros(2, 6, 4, 3)}, ValueError, r"expected weight with 5 dimensions"),
    (
        {"w": torch.zeros(3, 6, 4, 3, 3)},
        ValueError,
        r"one kernel per sample: weight\.shape\[0\] == 2 \(the batch size\), got 3",
    ),
    (
        {"w": torch.zeros(2, 6, 3, 3, 3)},
        ValueError,
        r"expected input with 3 channels \(C_in/groups = 3 in the weight, times "
        r"groups = 1\), got 4",
    ),
    ({"groups": 3}, ValueError, r"expected input with 12 channels \(C_in/groups = 4"),
    ({"groups": 4}, ValueError, r"expected groups to divide out_channels"),
    ({"groups": 0}, ValueError, r"expected groups >= 1, got 0"),
    ({"groups": 1.0}, TypeError, r"expected groups to be an int"),
    (
        {"b": torch.zeros(2, 5)},
        ValueError,
        r"expected bias of shape \[N, C_out\] = \(2, 6\)",
    ),
    ({"b": torch.zeros(6)}, ValueError, r"expected bias with 2 dimensions"),
    ({"stride": 0}, ValueError, r"expected stride >= 1, got 0"),
    ({"stride": (1, 2, 3)}, TypeError, r"expected stride to be an int or a pair"),
    ({"padding": -1}, ValueError, r"expected padding >= 0, got -1"),
    ({"dilation": (1, 0)}, ValueError, r"expected dilation >= 1"),
    (
        {"dilation": 3},
        ValueError,
        r"padded input \(5\) to be at least the dilated kernel size \(7\) along height",
    ),
]


@pytest.mark.parametrize("fn", [per_sample_conv2d, per_sample_conv2d_reference])
@pytest.mark.parametrize("override, error, match", ERRORS)
def test_errors(fn, override, error, match):
    args = {
        "x": torch.zeros(2, 4, 5, 5),
        "w": torch.zeros(2, 6, 4, 3, 3),
        "b": torch.zeros(2, 6),
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
    }
    args.update(override)
    with pytest.raises(error, match=match):
        fn(
            args["x"],
            args["w"],
            args["b"],
            args["stride"],
            args["padding"],
            args["dilation"],
            args["groups"],
        )


# --- algorithms: the folded grouped convolution and the export-friendly forms ----

EXPLICIT = [a for a in ALGORITHMS if a != "auto"]


@pytest.mark.parametrize("algorithm", EXPLICIT)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_algorithms_equal_reference(geometry, bias, algorithm, device):
    c_in, c_out, kernel, stride, padding, dilation, groups, size = geometry
    x, w, b = _data(3, c_in, c_out, kernel, groups, size, device=device, bias=bias)
    args = (stride, padding, dilation, groups)
    torch.testing.assert_close(
        per_sample_conv2d(x, w, b, *args, algorithm=algorithm),
        per_sample_conv2d_reference(x, w, b, *args),
        **tolerance(torch.float64),
    )


@pytest.mark.parametrize("algorithm", EXPLICIT)
@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("groups", [2, 4])  # C_in/groups = 2, and depthwise
def test_algorithms_small_batches(n, groups, algorithm):
    x, w, b = _data(n, 4, 8, (3, 2), groups, (5, 6), grad=True)
    out = per_sample_conv2d(x, w, b, 1, (1, 0), 1, groups, algorithm=algorithm)
    assert out.shape == (n, 8, 5, 5)
    if n:
        torch.testing.assert_close(
            out,
            _per_sample_reference(x, w, b, 1, (1, 0), 1, groups),
            **tolerance(torch.float64),
        )
    out.sum().backward()  # an empty batch still reaches the kernels
    assert w.grad is not None and w.grad.shape == w.shape
    assert b.grad is not None and b.grad.shape == b.shape


@pytest.mark.parametrize("algorithm", EXPLICIT)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("groups", [2, 4])
def test_algorithms_low_precision(dtype, groups, algorithm, device):
    x, w, b = _data(2, 4, 8, (3, 3), groups, (6, 7), device=device)
    expected = per_sample_conv2d_reference(x, w, b, 2, 1, 1, groups)
    out = per_sample_conv2d(
        x.to(dtype), w.to(dtype), b.to(dtype), 2, 1, 1, groups, algorithm=algorithm
    )
    assert out.dtype == dtype
    # a few roundings to the dtype's precision on sums of about ten products
    rtol, atol = {torch.float32: (1e-5, 1e-5)}.get(dtype, (4e-2, 4e-2))
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("groups", [2, 4])
def test_algorithms_autocast_bfloat16_cpu(groups, algorithm):
    x, w, b = _data(2, 4, 8, (3, 3), groups, (6, 7), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = per_sample_conv2d(x, w, b, 1, 1, 1, groups, algorithm=algorithm)
    assert out.dtype == torch.bfloat16  # as F.conv2d under autocast
    torch.testing.assert_close(
        out.float(),
        per_sample_conv2d(x, w, b, 1, 1, 1, groups),
        rtol=5e-2,
        atol=1e-1,
    )


@pytest.mark.parametrize("algorithm", ["unfold", "taps"])
@pytest.mark.parametrize("groups", [2, 4])
def test_algorithms_gradcheck(groups, algorithm, one_thread):
    x, w, b = _data(2, 4, 4, (2, 3), groups, (5, 4), grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: per_sample_conv2d(
            x, w, b, (2, 1), 1, (1, 2), groups, algorithm=algorithm
        ),
        (x, w, b),
    )


def test_auto_is_grouped_in_eager(monkeypatch):
    # the fast eager path is kept: "auto" folds the batch into the groups
    calls = []
    grouped = per_sample_module._grouped
    monkeypatch.setattr(
        per_sample_module, "_grouped", lambda *args: calls.append(1) or grouped(*args)
    )
    x, w, b = _data(2, 4, 6, (3, 3), 2, (5, 5))
    per_sample_conv2d(x, w, b, 1, 1, 1, 2)
    assert calls == [1]


@pytest.mark.parametrize(
    "algorithm, error, match",
    [
        ("im2col", ValueError, r"algorithm to be one of 'auto', 'grouped', 'unfold'"),
        (None, TypeError, r"per_sample_conv2d expected algorithm to be a str, got"),
    ],
)
def test_algorithm_errors(algorithm, error, match):
    x, w, b = _data(2, 4, 6, (3, 3), 1, (5, 5))
    with pytest.raises(error, match=match):
        per_sample_conv2d(x, w, b, algorithm=algorithm)


# --- compile and export with a dynamic batch --------------------------------------

# The batch is the only size that changes, and no other size equals the first batch
# size traced (2): torch.compile(dynamic=True) gives equal sizes one symbol.
# (c_in, c_out, kernel, stride, padding, dilation, groups, size)
DYNAMIC_GEOMETRIES = {
    "dense": (9, 12, (3, 5), (1, 2), (2, 1), (2, 1), 3, (10, 11)),  # C_in/groups = 3
    "depthwise": (9, 18, (3, 3), 1, 1, 1, 9, (7, 8)),
}


def _dynamic_data(n, geometry, dtype=torch.float64):
    c_in, c_out, kernel, _, _, _, groups, size = geometry
    x, w, b = _data(n, c_in, c_out, kernel, groups, size, dtype=dtype)
    return x, w, b


class _PerSample(torch.nn.Module):
    def __init__(self, geometry):
        super().__init__()
        self.args = geometry[3:7]

    def forward(self, x, w, b):
        return per_sample_conv2d(x, w, b, *self.args)


@pytest.fixture
def fresh_dynamo():
    """Compile caches cleared before and after a compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", DYNAMIC_GEOMETRIES)
def test_compile_dynamic_batch_compiles_once(name, fresh_dynamo):
    geometry = DYNAMIC_GEOMETRIES[name]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    counter = CompileCounterWithBackend(backend)
    eager = _PerSample(geometry)
    # fullgraph: the argument checks must not break the graph either
    compiled = torch.compile(eager, backend=counter, dynamic=True, fullgraph=True)
    for n in range(2, 13):
        x, w, b = _dynamic_data(n, geometry)
        torch.testing.assert_close(
            compiled(x, w, b), eager(x, w, b), **tolerance(torch.float64)
        )
    assert counter.frame_count == 1  # no recompilation for batch sizes 3..12
    # what made the batch dynamic: no convolution whose groups depend on it
    targets = {node.target for node in graphs[0].graph.nodes}
    assert F.conv2d not in targets and torch.conv2d not in targets


def test_export_dynamic_batch(fresh_dynamo):
    geometry = DYNAMIC_GEOMETRIES["dense"]
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        _PerSample(geometry),
        _dynamic_data(3, geometry),
        dynamic_shapes={"x": {0: batch}, "w": {0: batch}, "b": {0: batch}},
    )
    for n in (0, 1, 6):
        x, w, b = _dynamic_data(n, geometry)
        torch.testing.assert_close(
            program.module()(x, w, b),
            per_sample_conv2d(x, w, b, *geometry[3:7]),
            **tolerance(torch.float64),
        )


# the exporter notes that the three batch axes share one name
@pytest.mark.filterwarnings("ignore:.*axis name. batch will not be used:UserWarning")
@pytest.mark.parametrize("name", DYNAMIC_GEOMETRIES)
def test_onnx_export_dynamic_batch(name, fresh_dynamo):
    geometry = DYNAMIC_GEOMETRIES[name]
    batch = torch.export.Dim("batch")
    onnx_program = torch.onnx.export(
        _PerSample(geometry).eval(),
        _dynamic_data(3, geometry, torch.float32),
        dynamo=True,
        dynamic_shapes={"x": {0: batch}, "w": {0: batch}, "b": {0: batch}},
        verbose=False,
    )
    session = onnxruntime.InferenceSession(
        onnx_program.model_proto.SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    names = [i.name for i in session.get_inputs()]
    for n in (2, 5):
        inputs = _dynamic_data(n, geometry, torch.float32)
        (out,) = session.run(None, {k: t.numpy() for k, t in zip(names, inputs)})
        torch.testing.assert_close(
            torch.from_numpy(out),
            per_sample_conv2d(*inputs, *geometry[3:7]),
            **tolerance(torch.float32),
        )


# --- kernel banks: algorithms, costs and the memory-frugal backward -------------------


def _bank_data(n=5, k=3, c_in=4, c_out=6, kernel=(3, 2), groups=2, size=(7, 6)):
    x = randn(n, c_in, *size, seed=11, requires_grad=True)
    a = randn(n, k, seed=12, requires_grad=True)
    w = randn(k, c_out, c_in // groups, *kernel, seed=13, requires_grad=True)
    b = randn(n, c_out, seed=14, requires_grad=True)
    return x, a, w, b


def _mix(weight, mixing):
    return (mixing @ weight.reshape(weight.shape[0], -1)).reshape(-1, *weight.shape[1:])


def _literal_bank(x, a, w, b, geometry):
    """sum_k a[:, k] conv2d(x, W_k) + b, one F.conv2d per kernel."""
    out = b[:, :, None, None]
    for k in range(w.shape[0]):
        out = out + a[:, k, None, None, None] * F.conv2d(x, w[k], None, *geometry)
    return out


@pytest.mark.parametrize("algorithm", ["grouped", "unfold"])
@pytest.mark.parametrize("keep_kernels", [False, True])
@pytest.mark.parametrize("unfold_positions", [0, 10**6])
@pytest.mark.parametrize("budget", [1, 150, 1 << 21])
def test_mixed_conv2d_values_and_gradients_equal_the_literal_bank(
    algorithm, keep_kernels, unfold_positions, budget, monkeypatch
):
    # budget 1 and 150: one and two samples per chunk; unfold_positions: the
    # kernel gradient by the grouped convolution's backward or by im2col
    monkeypatch.setattr(per_sample_module, "KERNEL_BUDGET", budget)
    monkeypatch.setattr(per_sample_module, "_UNFOLD_POSITIONS", unfold_positions)
    x, a, w, b = _bank_data()
    geometry = ((2, 1), (1, 0), (1, 2), 2)
    _mix.coefficients = lambda weight, mixing: (mixing, None)
    out = per_sample_module.mixed_conv2d(
        x, _mix, w, (a,), b, *geometry, algorithm=algorithm, keep_kernels=keep_kernels
    )
    expected = _literal_bank(x, a, w, b, geometry)
    torch.testing.assert_close(out, expected, **tolerance(torch.float64))
    grad = randn(*out.shape, seed=15)
    got = torch.autograd.grad(out, (x, a, w, b), grad)
    want = torch.autograd.grad(expected, (x, a, w, b), grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tolerance(torch.float64))


def test_recomputed_backward_equals_the_materialising_one_without_coefficients(
    monkeypatch,
):
    # a mix without the in-place bank-gradient shortcut goes through autograd
    monkeypatch.setattr(per_sample_module, "KERNEL_BUDGET", 150)
    x, a, w, b = _bank_data()

    def mix(weight, mixing):
        return _mix(weight, mixing)

    geometry = ((1, 1), (1, 1), (1, 1), 2)
    outs = [
        per_sample_module.mixed_conv2d(x, mix, w, (a,), b, *geometry, keep_kernels=k)
        for k in (False, True)
    ]
    grad = randn(*outs[0].shape, seed=16)
    frugal, kept = (torch.autograd.grad(o, (x, a, w, b), grad) for o in outs)
    torch.testing.assert_close(outs[0], outs[1], **tolerance(torch.float64))
    for g, e in zip(frugal, kept):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def _saved_numel(fn):
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_kernels_are_not_saved_for_the_backward_unless_asked():
    x, a, w, b = _bank_data(n=8)
    geometry = ((1, 1), (1, 1), (1, 1), 2)
    kernels = 8 * w[0].numel()

    def run(keep):
        return lambda: per_sample_module.mixed_conv2d(
            x, _mix, w, (a,), b, *geometry, keep_kernels=keep
        )

    frugal, kept = _saved_numel(run(False)), _saved_numel(run(True))
    assert kept - frugal >= kernels
    # the frugal path keeps only its inputs: x, the bank and the mixing weights
    assert frugal <= x.numel() + w.numel() + a.numel()


def test_bank_outputs_conv2d_equals_the_literal_bank():
    x, a, w, b = _bank_data()
    geometry = ((2, 1), (1, 0), (1, 2), 2)
    out = per_sample_module.bank_outputs_conv2d(x, a, w, b, *geometry)
    expected = _literal_bank(x, a, w, b, geometry)
    torch.testing.assert_close(out, expected, **tolerance(torch.float64))
    grad = randn(*out.shape, seed=17)
    got = torch.autograd.grad(out, (x, a, w, b), grad)
    want = torch.autograd.grad(expected, (x, a, w, b), grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tolerance(torch.float64))


def test_bank_costs_count_every_term():
    # N=2, C_in=4 -> C_out=6, groups 2, 3x3, 5x5 output, K=3
    costs = per_sample_module.bank_costs((2, 4, 5, 5), (3, 6, 2, 3, 3), (5, 5))
    p = 6 * 2 * 9  # one kernel
    conv = 2 * 6 * 2 * 9 * 25
    assert costs["grouped"] == {
        "macs": conv + 2 * 3 * p,
        "written_bytes": 2 * p * 4,
        "saved_bytes": 0,
    }
    cols = 2 * 4 * 9 * 25
    assert costs["unfold"]["written_bytes"] == (2 * p + cols) * 4
    outputs = 2 * 3 * 6 * 25
    assert costs["outputs"] == {
        "macs": 3 * conv + outputs,
        "written_bytes": outputs * 4,
        "saved_bytes": outputs * 4,
    }
    kept = per_sample_module.bank_costs(
        (2, 4, 5, 5), (3, 6, 2, 3, 3), (5, 5), keep_kernels=True, itemsize=8
    )
    assert kept["grouped"]["saved_bytes"] == 2 * p * 8


def test_choose_bank_algorithm_follows_positions_per_kernel():
    # many positions share each kernel: mix the kernels; a 1x1 map with many
    # channels: every kernel is used once, convolving with the bank is cheaper
    early = per_sample_module.bank_costs((1, 64, 56, 56), (4, 64, 64, 3, 3), (56, 56))
    late = per_sample_module.bank_costs((1, 512, 1, 1), (2, 512, 512, 3, 3), (1, 1))
    assert per_sample_module.choose_bank_algorithm(early) == "grouped"
    assert per_sample_module.choose_bank_algorithm(late) == "outputs"


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("fast", ValueError, r"expected algorithm to be one of 'auto', 'grouped'"),
        (3, TypeError, r"expected algorithm to be a str, got int 3"),
    ],
)
def test_check_bank_algorithm_errors(value, error, match):
    with pytest.raises(error, match="owner " + match):
        per_sample_module.check_bank_algorithm(value, "owner")
