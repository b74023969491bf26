"""Latency and peak memory of every operator against ``nn.Conv2d``.

Run ``python -m refimpl.bench`` (``--help`` for options). For each operator it
measures, at one shape, the forward and the forward+backward latency with
``torch.utils.benchmark`` and the peak memory a forward+backward allocates, and
prints each as a ratio to a plain ``nn.Conv2d`` of the same shape (lower is
better; 1.00 means "as fast as a static convolution"). It runs on the CPU and,
when present, on CUDA. Speed targets of the book live here, not in timed tests.

Peak memory on CUDA is the caching allocator's peak. On the CPU (Linux) it is the
peak resident set of a fresh Python process that builds the case and runs it, one
process per case, so that it does not depend on what the calling process ran
before; the calling process's allocator settings are never touched.

Operators register themselves below with :func:`register`: a case is a function
``(spec, device, dtype) -> Case`` that builds the operator for the spec's shape.
A case that does not support the options it is given is skipped, with the reason
in the table, instead of ending the run; a factory can say so itself by raising
:class:`SkipCase`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import importlib
import math
import os
import pickle
import subprocess
import sys
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._validation import check_bool, check_positive_int

__all__ = [
    "BenchSpec",
    "Case",
    "SkipCase",
    "register",
    "CASES",
    "measure",
    "counts",
    "peak_memory",
    "run",
    "RESNET50_STAGES",
    "STAGE_BATCHES",
    "run_stages",
    "format_stages",
    "format_stage_ratios",
    "plot_stages",
    "format_table",
    "main",
]


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """The shape to benchmark: ``Tensor[batch, channels, size, size]``, k x k kernel."""

    batch: int = 32
    in_channels: int = 64
    out_channels: int = 64
    size: int = 56
    kernel_size: int = 3

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_positive_int(getattr(self, field.name), field.name, owner="BenchSpec")


@dataclasses.dataclass
class Case:
    """One benchmarked callable.

    ``fn(x)`` computes the output; ``params`` are the tensors whose gradients a
    backward pass computes (besides the input's); ``note`` is printed beside it.
    """

    fn: Callable[[Tensor], Tensor]
    params: list[Tensor]
    note: str = ""
    input_grad: bool = True
    # MACs of one forward where torch.utils.flop_counter cannot see them (work
    # done by elementwise operations, as DDF's taps): a function of the spec
    macs: Callable[[BenchSpec], int] | None = None
    # the same computation uncompiled, counted in place of a compiled ``fn``
    eager: Callable[[Tensor], Tensor] | None = None


class SkipCase(Exception):
    """Raised by a case factory that does not support the options it was given.

    The message is the reason shown in the table (``"skipped: <reason>"``), e.g.
    ``raise SkipCase("needs CUDA")``.
    """


CASES: dict[str, Callable[[BenchSpec, torch.device, torch.dtype], Case]] = {}


def register(name: str):
    """Decorator adding a case factory to :data:`CASES` under ``name``.

    The CPU peak memory is measured in a fresh process, which finds the factory by
    importing the module that defines it; a factory defined in ``__main__`` or in
    a notebook is measured in the calling process with the dispatcher count
    instead (see :func:`peak_memory`).
    """

    def decorate(factory):
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} is registered twice")
        CASES[name] = factory
        return factory

    return decorate


def _module_case(module: nn.Module, note: str = "") -> Case:
    return Case(
        fn=module, params=[p for p in module.parameters() if p.requires_grad], note=note
    )


def _same_size(cls, spec: BenchSpec, device, dtype, **options) -> nn.Module:
    """``cls(C_in, C_out, k, padding=k // 2, ...)``: a layer of the spec's shape."""
    k = spec.kernel_size
    return cls(
        spec.in_channels,
        spec.out_channels,
        k,
        padding=k // 2,
        device=device,
        dtype=dtype,
        **options,
    )


# --- baseline ---------------------------------------------------------------------


@register("conv2d")
def _conv2d(spec: BenchSpec, device, dtype) -> Case:
    conv = _same_size(nn.Conv2d, spec, device, dtype)
    return _module_case(conv, "nn.Conv2d, the baseline")


# --- chapter 1: convolution arithmetic -------------------------------------------


def _arithmetic_case(name: str, note: str):
    def factory(spec: BenchSpec, device, dtype) -> Case:
        from . import arithmetic

        conv = _same_size(nn.Conv2d, spec, device, dtype)
        fn = getattr(arithmetic, name)
        pad = spec.kernel_size // 2
        return Case(
            fn=lambda x: fn(x, conv.weight, conv.bias, 1, pad),
            params=[conv.weight, conv.bias],
            note=note,
        )

    return factory


register("conv2d_unfold")(_arithmetic_case("conv2d_unfold", "im2col + one matmul"))
register("conv2d_fft")(_arithmetic_case("conv2d_fft", "convolution theorem, torch.fft"))


# --- chapter 2 and 3: CondConv, DynamicConv ---------------------------------------


@register("condconv")
def _condconv(spec: BenchSpec, device, dtype) -> Case:
    from .condconv import CondConv2d

    conv = _same_size(CondConv2d, spec, device, dtype, num_kernels=8)
    return _module_case(conv, "CondConv2d, 8 kernels, routing computed inside")


def _per_sample_case(spec: BenchSpec, device, dtype, batched: bool) -> Case:
    from .per_sample import per_sample_conv2d, per_sample_conv2d_reference

    g = torch.Generator().manual_seed(0)
    k = spec.kernel_size
    # A fixed random kernel per sample: the seam every dynamic operator goes through.
    weight = torch.randn(
        spec.batch, spec.out_channels, spec.in_channels, k, k, generator=g
    ).mul_(1.0 / (spec.in_channels * k * k) ** 0.5)
    weight = weight.to(device=device, dtype=dtype).requires_grad_()
    fn = per_sample_conv2d if batched else per_sample_conv2d_reference
    note = (
        "per_sample_conv2d: batch folded into groups"
        if batched
        else "per_sample_conv2d_reference: one F.conv2d per sample"
    )
    return Case(fn=lambda x: fn(x, weight, None, 1, k // 2), params=[weight], note=note)


@register("per_sample_loop")
def _per_sample_loop(spec: BenchSpec, device, dtype) -> Case:
    return _per_sample_case(spec, device, dtype, batched=False)


@register("per_sample_batched")
def _per_sample_batched(spec: BenchSpec, device, dtype) -> Case:
    return _per_sample_case(spec, device, dtype, batched=True)


@register("dynamic_conv")
def _dynamic_conv(spec: BenchSpec, device, dtype) -> Case:
    from .dynamic_conv import DynamicConv2d

    conv = _same_size(DynamicConv2d, spec, device, dtype)
    return _module_case(conv, "DynamicConv2d, n=4 (attention + one grouped conv)")


# --- chapter 4: ODConv -------------------------------------------------------------


def _odconv_case(num_kernels: int):
    # Eval mode: inference latency is what a speed comparison of ODConv is about,
    # and it keeps the attention BatchNorm on running statistics (no batch
    # statistics, no running-average updates) in the backward timing as well.
    def factory(spec: BenchSpec, device, dtype) -> Case:
        from .odconv import ODConv2d

        layer = _same_size(
            ODConv2d, spec, device, dtype, num_kernels=num_kernels
        ).eval()
        order = layer.resolve_order(
            (spec.batch, spec.in_channels, spec.size, spec.size)
        )
        return _module_case(layer, f"ODConv2d {num_kernels}x, eval, order={order}")

    return factory


register("odconv_1x")(_odconv_case(1))
register("odconv_4x")(_odconv_case(4))


# --- chapter 5: DDF ---------------------------------------------------------------


def _depthwise_channels(spec: BenchSpec) -> int:
    if spec.in_channels != spec.out_channels:
        raise SkipCase(
            f"depthwise: needs in_channels == out_channels, got "
            f"{spec.in_channels} -> {spec.out_channels}"
        )
    if spec.kernel_size % 2 == 0:
        raise SkipCase(f"needs an odd kernel size, got {spec.kernel_size}")
    return spec.in_channels


@register("conv2d_depthwise")
def _conv2d_depthwise(spec: BenchSpec, device, dtype) -> Case:
    c, k = _depthwise_channels(spec), spec.kernel_size
    conv = nn.Conv2d(
        c, c, k, padding=k // 2, groups=c, bias=False, device=device, dtype=dtype
    )
    return _module_case(conv, "nn.Conv2d, depthwise (groups=C), no bias")


def _ddf_case(combine: str, compiled: bool = False):
    # The operator alone, on fixed random filters that require grad (what the
    # two branches of DDFConv2d would predict), as the official test_time.py
    # times the raw op next to the layer.
    def factory(spec: BenchSpec, device, dtype) -> Case:
        from .ddf import ddf

        c, k = _depthwise_channels(spec), spec.kernel_size
        g = torch.Generator().manual_seed(2)
        channel = torch.randn(spec.batch, c, k, k, generator=g) / k
        spatial = torch.randn(spec.batch, k * k, spec.size, spec.size, generator=g) / k
        channel = channel.to(device=device, dtype=dtype).requires_grad_()
        spatial = spatial.to(device=device, dtype=dtype).requires_grad_()

        def run(x):
            return ddf(x, channel, spatial, k, combine=combine)

        note = f"refimpl.ddf.ddf, combine={combine!r}, fixed random filters"
        case = Case(fn=run, params=[channel, spatial], note=note, macs=_ddf_macs)
        if compiled:
            case.fn, case.eager = torch.compile(run, dynamic=False), run
            case.note += ", torch.compile"
        return case

    return factory


register("ddf")(_ddf_case("mul"))
register("ddf_add")(_ddf_case("add"))
register("ddf_compiled")(_ddf_case("mul", compiled=True))


def _ddf_macs(spec: BenchSpec) -> int:
    # one multiply-add per tap, channel and output pixel, as a depthwise
    # convolution (combining the two filters adds as many multiplications)
    return spec.batch * spec.in_channels * spec.size**2 * spec.kernel_size**2


@register("DDFConv2d")
def _ddf_module(spec: BenchSpec, device, dtype) -> Case:
    from .ddf import DDFConv2d

    layer = DDFConv2d(
        _depthwise_channels(spec), spec.kernel_size, device=device, dtype=dtype
    )
    case = _module_case(layer, "refimpl DDFConv2d, mul, predicts both filters")
    # the branches' 1x1 convolutions and linear layers are counted by the flop
    # counter; the filtering itself is added here
    case.macs = _ddf_macs
    return case


@register("ddf_pointwise")
def _ddf_pointwise(spec: BenchSpec, device, dtype) -> Case:
    """DDF followed by a 1x1 convolution: a full ``C -> C`` replacement of a k x k
    convolution (DDF alone is depthwise and mixes no channels), the block that
    chapter 8 times at the ResNet-50 stage shapes (its experiment trains the same
    block at a small width)."""
    from .ddf import DDFConv2d

    c = _depthwise_channels(spec)
    layer = nn.Sequential(
        DDFConv2d(c, spec.kernel_size, device=device, dtype=dtype),
        nn.Conv2d(c, spec.out_channels, 1, device=device, dtype=dtype),
    )
    case = _module_case(layer, "DDFConv2d then a 1x1 nn.Conv2d (mixes channels)")
    case.macs = _ddf_macs  # the 1x1 convolution is seen by the flop counter
    return case


# --- chapter 7: FDConv ------------------------------------------------------------


def _fdconv_case(num_kernels: int):
    # Eval mode, as for ODConv: the KSM trunk's BatchNorm on running statistics.
    def factory(spec: BenchSpec, device, dtype) -> Case:
        from .fdconv import FDConv2d

        layer = _same_size(
            FDConv2d, spec, device, dtype, num_kernels=num_kernels, placement="any"
        ).eval()
        fbm = "with FBM" if layer.fbm is not None else "no FBM"
        return _module_case(layer, f"FDConv2d, {num_kernels} groups, {fbm}, eval")

    return factory


register("fdconv")(_fdconv_case(4))
register("fdconv_64")(_fdconv_case(64))


# --- chapter 6: deformable convolution --------------------------------------------


def _deform_inputs(spec: BenchSpec, device, dtype):
    """Fixed random offsets (a few pixels) and sigmoid mask for a k x k, padding k//2
    deformable convolution; they require grad so that backward covers them."""
    g = torch.Generator().manual_seed(1)
    k, size = spec.kernel_size, spec.size
    offset = 2 * torch.randn(spec.batch, 2 * k * k, size, size, generator=g)
    mask = torch.rand(spec.batch, k * k, size, size, generator=g)
    return (
        offset.to(device=device, dtype=dtype).requires_grad_(),
        mask.to(device=device, dtype=dtype).requires_grad_(),
    )


def _deform_case(spec: BenchSpec, device, dtype, fn, note) -> Case:
    conv = _same_size(nn.Conv2d, spec, device, dtype)
    offset, mask = _deform_inputs(spec, device, dtype)
    pad = spec.kernel_size // 2

    def run(x):
        return fn(x, offset, conv.weight, conv.bias, padding=pad, mask=mask)

    return Case(fn=run, params=[conv.weight, conv.bias, offset, mask], note=note)


@register("deform_conv2d")
def _deform_conv2d(spec: BenchSpec, device, dtype) -> Case:
    from refimpl.deform import deform_conv2d

    return _deform_case(
        spec,
        device,
        dtype,
        deform_conv2d,
        "refimpl deform_conv2d, random offsets, mask",
    )


@register("deform_conv2d_torchvision")
def _deform_conv2d_torchvision(spec: BenchSpec, device, dtype) -> Case:
    from torchvision.ops import deform_conv2d

    return _deform_case(
        spec, device, dtype, deform_conv2d, "torchvision.ops.deform_conv2d, same inputs"
    )


@register("DeformConv2d")
def _deform_conv2d_module(spec: BenchSpec, device, dtype) -> Case:
    from refimpl.deform import DeformConv2d

    layer = _same_size(DeformConv2d, spec, device, dtype, modulated=True)
    return _module_case(layer, "refimpl DeformConv2d, modulated, predicts offsets")


# --- the algorithms of the kernel-bank layers, forced by hand ----------------------


def _resolved_algorithm(layer: nn.Module, spec: BenchSpec) -> str:
    """The algorithm ``layer`` runs at the spec's shape (``"auto"`` resolved)."""
    from .condconv import bank_algorithm

    shape = (spec.batch, spec.in_channels, spec.size, spec.size)
    if hasattr(layer, "resolve_algorithm"):  # ODConv2d
        return layer.resolve_algorithm(shape)
    if layer.algorithm != "auto":
        return layer.algorithm
    return bank_algorithm(
        shape,
        layer.weight.shape,
        layer.stride,
        layer.op_padding,
        layer.dilation,
        layer.weight.element_size(),
    )


def _bank_case(kind: str, algorithm: str):
    """CondConv2d (8 experts), DynamicConv2d (4) or ODConv2d (4, eval) with
    ``algorithm`` forced (or ``"auto"``), to check that ``"auto"`` is the fastest."""

    def factory(spec: BenchSpec, device, dtype) -> Case:
        from .condconv import CondConv2d
        from .dynamic_conv import DynamicConv2d
        from .odconv import ODConv2d

        cls, options = {
            "condconv": (CondConv2d, {"num_kernels": 8}),
            "dynamic_conv": (DynamicConv2d, {}),
            "odconv_4x": (ODConv2d, {"num_kernels": 4}),
        }[kind]
        layer = _same_size(cls, spec, device, dtype, algorithm=algorithm, **options)
        if cls is ODConv2d:
            layer.eval()  # as the odconv_4x case
        chosen = _resolved_algorithm(layer, spec)
        return _module_case(layer, f"{cls.__name__}, algorithm={algorithm} ({chosen})")

    return factory


for _kind in ("condconv", "dynamic_conv", "odconv_4x"):
    for _algorithm in ("auto", "grouped", "unfold", "outputs"):
        register(f"{_kind}_{_algorithm}")(_bank_case(_kind, _algorithm))


# --- measurement ------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls(
    case: Case, spec: BenchSpec, device, dtype
) -> tuple[Callable[[], object], Callable[[], None]]:
    """The forward and the forward+backward of ``case`` on one fixed input.

    The input is ``Tensor[batch, in_channels, size, size]``, drawn with a seeded
    CPU generator and then moved to ``device``, so that every case and every
    process sees the same numbers.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch, spec.in_channels, spec.size, spec.size, generator=g)
    x = x.to(device=device, dtype=dtype).requires_grad_(case.input_grad)

    def forward():
        with torch.no_grad():
            return case.fn(x)

    def forward_backward():
        for p in case.params:
            p.grad = None
        x.grad = None
        case.fn(x).sum().backward()

    return forward, forward_backward


def _timing_module():
    """``torch.utils.benchmark``, imported without its import-time warning.

    Importing it imports ``torch.utils.cpp_extension``, which logs a warning on
    machines without a CUDA toolkit; timing Python calls needs no compiler, and
    in a notebook the warning would land in the stored output.
    """
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


def _latency(stmt: Callable[[], object], device, min_run_time: float) -> float:
    """Median seconds per call of ``stmt``."""
    benchmark = _timing_module()
    stmt()  # warm-up: allocator, lazy init, kernels selection
    _sync(device)
    timer = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure(
    case: Case, spec: BenchSpec, device, dtype, min_run_time: float = 1.0
) -> dict:
    """Median forward and forward+backward latency of one case, in seconds.

    Returns ``{"forward_s": ..., "forward_backward_s": ...}``. The peak memory is
    measured separately, by :func:`peak_memory`.
    """
    device = torch.device(device)
    forward, forward_backward = _calls(case, spec, device, dtype)
    return {
        "forward_s": _latency(forward, device, min_run_time),
        "forward_backward_s": _latency(forward_backward, device, min_run_time),
    }


def counts(case: Case, spec: BenchSpec, device, dtype) -> tuple[int | None, int]:
    """``(parameters, MACs)`` of one forward of ``case`` at ``spec``.

    Parameters are those of the case's module (``None`` for a functional case,
    whose tensors are fixed inputs, not a layer's parameters). MACs follow the
    papers' convention, one multiply-add counted once: ``torch.utils.flop_counter``
    counts two FLOPs per multiply-add of the convolutions and matrix products it
    sees, so its count is halved; it does not see elementwise work (the mixing of
    kernels done by broadcasting, attention activations, DDF's taps), which a case
    adds through ``Case.macs`` where it is the bulk of the work.
    """
    from torch.utils.flop_counter import FlopCounterMode

    module = case.fn if isinstance(case.fn, nn.Module) else None
    params = None if module is None else sum(p.numel() for p in module.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch, spec.in_channels, spec.size, spec.size, generator=g)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        (case.eager or case.fn)(x.to(device=device, dtype=dtype))
    macs = counter.get_total_flops() // 2
    if case.macs is not None:
        macs += case.macs(spec)
    return params, macs


# --- peak memory ------------------------------------------------------------------

_RESIDENT = "resident set, fresh process"
_DISPATCH = "dispatcher count"
_CUDA = "CUDA allocator"


class _AllocationTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created by the ops it sees.

    The fallback CPU measure where ``/proc`` is not available: every new storage
    an op returns is added, and subtracted again when Python releases it.
    Backward ops pass through the dispatcher too, but scratch buffers allocated
    inside a C++ kernel (torchvision's ``deform_conv2d`` columns, say) do not, so
    this measure under-counts such kernels.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._live:
                continue  # empty, or a view of a storage already counted
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def _dispatch_peak_memory(stmt: Callable[[], object]) -> int:
    with _AllocationTracker() as tracker:
        stmt()
    return tracker.peak


def _cuda_peak_memory(stmt: Callable[[], object], device: torch.device) -> int:
    """Bytes the caching allocator holds at the peak of one call, above before it."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    stmt()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status(key: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def _fresh_process_available() -> bool:
    """Whether the resident-set measure can work here (Linux ``/proc``).

    It only looks: the calling process's allocator and ``/proc`` settings are
    left alone, since the measure itself runs in a child process.
    """
    return (
        bool(sys.executable)
        and sys.platform.startswith("linux")
        and os.path.exists("/proc/self/status")
        and os.access("/proc/self/clear_refs", os.W_OK)
    )


def _import_name(obj: object) -> str | None:
    """The name a fresh process imports to find ``obj``'s module, if it has one."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    name = getattr(getattr(module, "__spec__", None), "name", None)
    return None if name in (None, "__main__") else name


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

# The program of the fresh process. Before anything large is allocated, glibc is
# told to give every block of 64 KiB or more its own mapping, which goes back to
# the system when freed: the resident set then follows the live tensors instead of
# glibc's heap, whose pages stay resident and would hide later peaks. Then it reads
# the caller's sys.path and the request from stdin.
_CHILD_PROGRAM = f"""\
import ctypes, pickle, sys
try:
    malloc_configured = ctypes.CDLL("libc.so.6").mallopt(
        {_M_MMAP_THRESHOLD}, 64 * 1024
    ) == 1
except (OSError, AttributeError):
    malloc_configured = False
sys.path[:] = pickle.load(sys.stdin.buffer)
from refimpl.bench import _child_main
_child_main(malloc_configured)
"""


def _peak_here(stmt: Callable[[], object], malloc_configured: bool) -> tuple[int, str]:
    """In the fresh process: the peak of one call above the resident set before it."""
    if malloc_configured:
        try:
            # Writing 5 resets the peak resident set (VmHWM) to the current one.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _proc_status("VmRSS:")
            stmt()
            peak = _proc_status("VmHWM:")
        except OSError:
            pass
        else:
            if before is not None and peak is not None:
                return max(peak - before, 0), _RESIDENT
    return _dispatch_peak_memory(stmt), _DISPATCH


def _child_main(malloc_configured: bool) -> None:
    """Entry point of the process that :func:`_fresh_process_peak_memory` starts.

    Reads ``(module, qualname, args, threads)`` from stdin, calls the function to
    get a statement, runs it once to warm up, then measures a second call; writes
    ``("ok", bytes, method)`` or ``("error", reason)`` to what was stdout.
    """
    result = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the measured code prints goes to stderr
    try:
        module, qualname, args, threads = pickle.load(sys.stdin.buffer)
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        setup = importlib.import_module(module)
        for part in qualname.split("."):
            setup = getattr(setup, part)
        stmt = setup(*args)
        stmt()  # warm-up: lazy initialisation, code pages, kernel selection
        gc.collect()
        reply = ("ok", *_peak_here(stmt, malloc_configured))
    except Exception as error:
        reply = ("error", _reason(error))
    with result:
        pickle.dump(reply, result)


def _fresh_process_peak_memory(
    setup: Callable[..., Callable[[], object]], *args, threads: int | None = None
) -> tuple[int, str]:
    """Peak memory of ``setup(*args)()`` measured in a fresh Python process.

    ``setup`` is a module-level function, found in the child by importing its
    module with the caller's ``sys.path``; ``args`` are pickled to it. In the
    child, ``setup(*args)`` builds what the statement needs and returns it; the
    statement runs once to warm up, then once more while the peak resident set is
    recorded (or, where glibc or ``/proc`` refuse, the dispatcher count). The
    child uses ``threads`` torch threads, by default as many as the caller.

    Returns ``(bytes above the resident set before the call, method)``; raises
    ``RuntimeError`` with the child's reason if it fails.
    """
    module, qualname = _import_name(setup), getattr(setup, "__qualname__", "")
    if module is None or not qualname or "<locals>" in qualname:
        raise ValueError(
            "_fresh_process_peak_memory expected a module-level function of an "
            f"importable module, got {setup!r}"
        )
    request = pickle.dumps(list(sys.path)) + pickle.dumps(
        (module, qualname, args, threads or torch.get_num_threads())
    )
    done = subprocess.run(
        [sys.executable, "-c", _CHILD_PROGRAM],
        input=request,
        capture_output=True,
        check=False,
    )
    try:
        reply = pickle.loads(done.stdout)
    except Exception:
        reply = None
    if isinstance(reply, tuple) and reply[0] == "ok":
        return reply[1], reply[2]
    if isinstance(reply, tuple) and reply[0] == "error":
        raise RuntimeError(reply[1])
    tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError(
        f"the measuring process ended with status {done.returncode}: "
        + (" | ".join(tail) or "no output")
    )


def _case_forward_backward(
    name: str, module: str, spec: BenchSpec, dtype: torch.dtype
) -> Callable[[], None]:
    """In the fresh process: build case ``name`` on the CPU, return its
    forward+backward. Importing ``module`` registers the case."""
    importlib.import_module(module)
    if name not in CASES:
        raise KeyError(f"case {name!r} is not registered after importing {module}")
    cpu = torch.device("cpu")
    return _calls(CASES[name](spec, cpu, dtype), spec, cpu, dtype)[1]


def _measured_in_fresh_process(name: str, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and _fresh_process_available()
        and _import_name(CASES[name]) is not None
    )


def _case_peak_memory(
    name: str,
    spec: BenchSpec,
    device: torch.device,
    dtype,
    case: Case | None = None,
    threads: int | None = None,
    fresh_process: bool = True,
) -> tuple[int, str]:
    if fresh_process and _measured_in_fresh_process(name, device):
        module = _import_name(CASES[name])
        return _fresh_process_peak_memory(
            _case_forward_backward, name, module, spec, dtype, threads=threads
        )
    if case is None:
        case = CASES[name](spec, device, dtype)
    forward_backward = _calls(case, spec, device, dtype)[1]
    forward_backward()  # warm-up, as in the fresh process
    if device.type == "cuda":
        return _cuda_peak_memory(forward_backward, device), _CUDA
    return _dispatch_peak_memory(forward_backward), _DISPATCH


def peak_memory(
    name: str, spec: BenchSpec, device, dtype: torch.dtype = torch.float32
) -> tuple[int, str]:
    """Bytes allocated at the peak of one forward+backward of case ``name``.

    Measured after a warm-up call, above what existed before the call. CUDA: the
    caching allocator's peak statistics, in this process. CPU on Linux: the peak
    resident set of a fresh Python process that builds the case, so that it counts
    the scratch memory of C++ kernels and does not depend on what ran before in
    this one; the process imports the module that defines the case's factory.
    Elsewhere, or for a factory defined in ``__main__``: the storages counted at
    the dispatcher in this process, which miss C++ scratch buffers.

    Returns ``(bytes, method)``, the method being ``"CUDA allocator"``,
    ``"resident set, fresh process"`` or ``"dispatcher count"``.
    """
    if name not in CASES:
        raise ValueError(
            f"peak_memory expected a case name from {list(CASES)}, got {name!r}"
        )
    return _case_peak_memory(name, spec, torch.device(device), dtype)


# --- the run ----------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """One line saying why a case failed, for the table."""
    text = str(error).strip()
    if not isinstance(error, SkipCase):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    line = text.splitlines()[0] if text else "no reason given"
    return line if len(line) <= 120 else line[:117] + "..."


def _memory_workers(jobs: int) -> int:
    # A few processes at a time: each spends seconds importing torch, and the
    # resident set of one process does not depend on the others.
    return max(1, min(jobs, 4, os.cpu_count() or 1))


def run(
    names: list[str],
    spec: BenchSpec,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 1.0,
    baseline: str = "conv2d",
    rounds: int = 3,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
    fresh_process: bool = True,
) -> list[dict]:
    """Measure ``names`` and the baseline; return one row per case with ratios.

    Latencies are the best of ``rounds`` interleaved medians. The peak memory is
    taken once per case after the rounds (:func:`peak_memory`; on the CPU, one
    fresh process per case); ``memory=False`` leaves it out (NaN).
    ``fresh_process=False`` measures the CPU peak in this process with the
    dispatcher count instead (seconds faster per case, but blind to the scratch
    buffers of C++ kernels; see :func:`peak_memory`).

    A case that raises while it is built or run (an unsupported dtype, a missing
    optional package, :class:`SkipCase`) is skipped: its row has ``skipped`` set
    to the reason and NaN figures, and the other cases go on. A failed memory
    measure leaves the latencies and sets ``peak_error``. Ratios are to the
    baseline's figures, NaN where the baseline has none. ``progress``, if given,
    is called with one line per step, e.g.
    ``"[9/12] cpu odconv_4x: latency, round 1/3"``.
    """
    device = torch.device(device)
    order = list(dict.fromkeys([baseline, *names]))
    unknown = [n for n in order if n not in CASES]
    if unknown:
        raise ValueError(f"run expected case names from {list(CASES)}, got {unknown}")
    check_positive_int(rounds, "rounds", owner="run")
    check_bool(fresh_process, "fresh_process", owner="run")
    if not (isinstance(min_run_time, (int, float)) and 0 < min_run_time < math.inf):
        raise ValueError(f"run expected min_run_time > 0 seconds, got {min_run_time!r}")
    nan = float("nan")
    rows = {
        name: {
            "name": name,
            "note": "",
            "skipped": None,
            "forward_s": nan,
            "forward_backward_s": nan,
            "peak_bytes": nan,
            "peak_method": None,
            "peak_error": None,
            "params": None,
            "macs": None,
        }
        for name in order
    }
    index = {name: i for i, name in enumerate(order, 1)}

    def say(name: str, what: str) -> None:
        if progress is not None:
            progress(f"[{index[name]}/{len(order)}] {device.type} {name}: {what}")

    def skip(name: str, error: Exception) -> None:
        rows[name]["skipped"] = _reason(error)
        say(name, f"skipped: {rows[name]['skipped']}")

    torch.manual_seed(0)
    cases: dict[str, Case] = {}
    for name in order:
        try:
            cases[name] = CASES[name](spec, device, dtype)
        except Exception as error:
            skip(name, error)
            continue
        rows[name]["note"] = cases[name].note
        try:
            rows[name]["params"], rows[name]["macs"] = counts(
                cases[name], spec, device, dtype
            )
        except Exception:
            pass  # a case that fails when run is skipped by the latency phase
    # Rounds over all cases, keeping each case's best median: the clock of a
    # shared machine drifts over minutes, and interleaving spreads the drift
    # over every case instead of charging it to whichever ran at a slow moment.
    for round_ in range(rounds):
        for name in list(cases):
            say(name, f"latency, round {round_ + 1}/{rounds}")
            try:
                m = measure(cases[name], spec, device, dtype, min_run_time)
            except Exception as error:
                del cases[name]
                skip(name, error)
                continue
            row = rows[name]
            for key in ("forward_s", "forward_backward_s"):
                row[key] = m[key] if round_ == 0 else min(row[key], m[key])
    if memory:
        _memory_phase(cases, rows, spec, device, dtype, say, progress, fresh_process)
    base = rows[baseline]
    for row in rows.values():
        row["forward_ratio"] = row["forward_s"] / base["forward_s"]
        row["forward_backward_ratio"] = (
            row["forward_backward_s"] / base["forward_backward_s"]
        )
        # Below a megabyte the resident-size measure is page noise, not a peak;
        # the dispatcher count and the CUDA allocator are exact at any size.
        noisy = base.get("peak_method") == _RESIDENT and not base["peak_bytes"] >= 2**20
        exact = base["peak_bytes"] > 0  # NaN (not measured) compares False
        row["peak_ratio"] = (
            row["peak_bytes"] / base["peak_bytes"] if exact and not noisy else nan
        )
    return list(rows.values())


def _memory_phase(
    cases, rows, spec, device, dtype, say, progress, fresh_process=True
) -> None:
    """Fill ``peak_bytes`` and ``peak_method`` of the rows of ``cases``."""

    def record(name, job):
        try:
            peak, method = job()
        except Exception as error:
            rows[name]["peak_error"] = _reason(error)
            say(name, f"peak memory failed: {rows[name]['peak_error']}")
        else:
            rows[name]["peak_bytes"], rows[name]["peak_method"] = peak, method
            say(name, f"peak memory {peak / 2**20:.1f} MB ({method})")

    threads = torch.get_num_threads()  # read here: worker threads may differ

    def job(name):
        return lambda: _case_peak_memory(
            name, spec, device, dtype, cases[name], threads, fresh_process
        )

    fresh = [
        n for n in cases if fresh_process and _measured_in_fresh_process(n, device)
    ]
    for name in cases:
        if name not in fresh:
            record(name, job(name))  # in this process, one at a time
    if not fresh:
        return
    workers = _memory_workers(len(fresh))
    if progress is not None:
        progress(
            f"{device.type}: peak memory of {len(fresh)} case(s), one fresh "
            f"process each, {workers} at a time"
        )
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(job(name)): name for name in fresh}
        for future in concurrent.futures.as_completed(futures):
            record(futures[future], future.result)


def format_table(rows: list[dict], device: torch.device, spec: BenchSpec) -> str:
    """A plain-text table of the rows returned by :func:`run`."""
    methods = {r.get("peak_method") for r in rows} - {None}
    head = (
        f"device={torch.device(device).type}  N={spec.batch}  "
        f"C={spec.in_channels}->{spec.out_channels}  "
        f"{spec.size}x{spec.size}  k={spec.kernel_size}  (ratios to {rows[0]['name']}"
        + (f"; peak: {methods.pop()})" if len(methods) == 1 else ")")
    )
    lines = [
        head,
        f"{'case':<27}{'fwd ms':>9}{'ratio':>7}{'fwd+bwd ms':>12}{'ratio':>7}"
        f"{'peak MB':>9}{'ratio':>7}  note",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['name']:<27}skipped: {r['skipped']}")
            continue
        note = r["note"]
        if methods and r.get("peak_method"):
            note += f" [peak: {r['peak_method']}]"
        if r.get("peak_error"):
            note += f" [peak memory failed: {r['peak_error']}]"
        lines.append(
            f"{r['name']:<27}{r['forward_s'] * 1e3:>9.2f}{r['forward_ratio']:>7.2f}"
            f"{r['forward_backward_s'] * 1e3:>12.2f}{r['forward_backward_ratio']:>7.2f}"
            f"{r['peak_bytes'] / 2**20:>9.1f}{r['peak_ratio']:>7.2f}  {note}"
        )
    return "\n".join(lines)


# --- every stage of a ResNet-50 ----------------------------------------------------

#: ``(channels, size)`` of the 3x3 convolutions of the four ResNet-50 stages.
RESNET50_STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))
#: Batch sizes of ``--stages``: one image (latency) and a training batch.
STAGE_BATCHES = (1, 32)


def run_stages(
    names: list[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batches=STAGE_BATCHES,
    stages=None,
    kernel_size: int = 3,
    progress: Callable[[str], None] | None = None,
    **options,
) -> list[dict]:
    """:func:`run` at every ResNet-50 stage shape and batch size.

    For each batch ``N`` in ``batches`` and ``(C, size)`` in ``stages`` (default
    :data:`RESNET50_STAGES`), measures
    ``names`` against ``nn.Conv2d(C, C, kernel_size, padding=kernel_size // 2)``
    at ``Tensor[N, C, size, size]``: forward and forward+backward time, peak
    memory, parameters and MACs (:func:`counts`). ``options`` go to :func:`run`.
    Returns every row of every :func:`run`, each with ``batch``, ``channels`` and
    ``size`` added.
    """
    rows = []
    for batch in batches:
        for channels, size in RESNET50_STAGES if stages is None else stages:
            spec = BenchSpec(batch, channels, channels, size, kernel_size)

            def say(message: str, spec=spec) -> None:
                if progress is not None:
                    progress(
                        f"N={spec.batch} C={spec.in_channels} "
                        f"{spec.size}x{spec.size}: {message}"
                    )

            for row in run(names, spec, device, dtype, progress=say, **options):
                rows.append({**row, "batch": batch, "channels": channels, "size": size})
    return rows


def _number(value, scale: float, digits: int) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def format_stages(rows: list[dict], device: torch.device) -> str:
    """A Markdown table of the rows of :func:`run_stages` (ratios to the baseline
    of each shape, the first row of each)."""
    lines = [
        f"Every operator at the ResNet-50 stage shapes, {torch.device(device).type}; "
        "times in ms, peak in MB, ratios to the baseline at the same shape; "
        "MACs count one multiply-add once (papers' convention).",
        "",
        "| N | C, size | case | fwd ms | ratio | fwd+bwd ms | ratio | peak MB | "
        "ratio | params (k) | MACs (M) | note |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shape = f"{r['channels']}, {r['size']}²"
        if r.get("skipped"):
            lines.append(
                f"| {r['batch']} | {shape} | {r['name']} | | | | | | | | | "
                f"skipped: {r['skipped']} |"
            )
            continue
        lines.append(
            f"| {r['batch']} | {shape} | {r['name']} "
            f"| {r['forward_s'] * 1e3:.2f} | {r['forward_ratio']:.2f} "
            f"| {r['forward_backward_s'] * 1e3:.2f} "
            f"| {r['forward_backward_ratio']:.2f} "
            f"| {r['peak_bytes'] / 2**20:.1f} | {r['peak_ratio']:.2f} "
            f"| {_number(r['params'], 1e3, 1)} | {_number(r['macs'], 1e6, 1)} "
            f"| {r['note']} |"
        )
    return "\n".join(lines)


def format_stage_ratios(rows: list[dict]) -> str:
    """A compact text table of :func:`run_stages` rows: one line per case and
    shape, forward and forward+backward time as ratios to the baseline, and the
    case's note shortened to what ``"auto"`` chose (lines fit a book page)."""
    lines = [f"{'N':>3} {'C':>4} {'size':>5}  {'case':<22}{'fwd':>7}{'fwd+bwd':>9}"]
    for r in rows:
        if r.get("skipped"):
            continue
        lines.append(
            f"{r['batch']:>3} {r['channels']:>4} {r['size']:>4}²  {r['name']:<22}"
            f"{r['forward_ratio']:>6.2f}x{r['forward_backward_ratio']:>8.2f}x"
        )
    return "\n".join(lines)


def plot_stages(rows: list[dict], path) -> None:
    """Forward and forward+backward time ratios against the stage, one panel per
    batch size and measure, one line per case; saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    measures = [("forward_ratio", "forward"), ("forward_backward_ratio", "fwd+bwd")]
    fig, axes = plt.subplots(
        len(batches), 2, figsize=(9, 3.2 * len(batches)), squeeze=False, dpi=150
    )
    for i, batch in enumerate(batches):
        here = [r for r in rows if r["batch"] == batch and not r.get("skipped")]
        stages = list(dict.fromkeys((r["channels"], r["size"]) for r in here))
        labels = [f"{c}ch {s}²" for c, s in stages]
        for j, (key, title) in enumerate(measures):
            ax = axes[i][j]
            for name in dict.fromkeys(r["name"] for r in here):
                values = {
                    (r["channels"], r["size"]): r[key]
                    for r in here
                    if r["name"] == name
                }
                ys = [values.get(stage, float("nan")) for stage in stages]
                ax.plot(range(len(stages)), ys, marker="o", label=name)
            ax.set_yscale("log")
            ax.set_xticks(range(len(stages)), labels)
            ax.set_title(f"{title} time / baseline, N={batch}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- command line -----------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds, got {text!r}"
        ) from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f"expected a finite number of seconds > 0, got {text!r}"
        )
    return value


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m refimpl.bench --help``.

    Progress goes to stderr, one line per step; each device's table goes to
    stdout.
    """
    parser = argparse.ArgumentParser(
        prog="python -m refimpl.bench",
        description="Latency and peak memory of the operators, as ratios to nn.Conv2d.",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        default=None,
        help=f"cases to run (default: all): {', '.join(CASES)}",
    )
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--batch", type=_positive_int, default=BenchSpec.batch)
    parser.add_argument(
        "--in-channels", type=_positive_int, default=BenchSpec.in_channels
    )
    parser.add_argument(
        "--out-channels", type=_positive_int, default=BenchSpec.out_channels
    )
    parser.add_argument("--size", type=_positive_int, default=BenchSpec.size)
    parser.add_argument(
        "--kernel-size", type=_positive_int, default=BenchSpec.kernel_size
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64", "bfloat16", "float16"],
        default="float32",
    )
    parser.add_argument(
        "--min-run-time",
        type=_positive_seconds,
        default=1.0,
        help="seconds per measurement",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="interleaved rounds (best is kept)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads"
    )
    parser.add_argument(
        "--baseline",
        default="conv2d",
        help="case the ratios are taken to (default: conv2d; DDF is compared with "
        "conv2d_depthwise)",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="every case at the four ResNet-50 stage shapes (56²/64, 28²/128, "
        "14²/256, 7²/512; sizes and channels options are then ignored) and the "
        "batches of --stage-batches; writes a Markdown table and a plot",
    )
    parser.add_argument(
        "--stage-batches",
        type=_positive_int,
        nargs="+",
        default=list(STAGE_BATCHES),
        help="batch sizes of --stages (default: 1 32)",
    )
    parser.add_argument(
        "--output",
        default="bench_stages",
        help="path prefix of the --stages files: PREFIX_<device>.md and .png",
    )
    args = parser.parse_args(argv)
    names = args.ops or [n for n in CASES if n != args.baseline]
    unknown = [n for n in [*names, args.baseline] if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu", "cuda"]}[args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        parser.error("CUDA was asked for but is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    spec = BenchSpec(
        args.batch, args.in_channels, args.out_channels, args.size, args.kernel_size
    )

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for d in devices:
        device = torch.device(d)
        if args.stages:
            rows = run_stages(
                names,
                device,
                getattr(torch, args.dtype),
                batches=tuple(args.stage_batches),
                kernel_size=args.kernel_size,
                progress=progress,
                min_run_time=args.min_run_time,
                baseline=args.baseline,
                rounds=args.rounds,
            )
            table = format_stages(rows, device)
            with open(f"{args.output}_{device.type}.md", "w") as f:
                f.write(table + "\n")
            plot_stages(rows, f"{args.output}_{device.type}.png")
            print(table, flush=True)
            print(f"\nwrote {args.output}_{device.type}.md and .png\n")
            continue
        rows = run(
            names,
            spec,
            device,
            getattr(torch, args.dtype),
            args.min_run_time,
            baseline=args.baseline,
            rounds=args.rounds,
            progress=progress,
        )
        print(format_table(rows, device, spec), flush=True)
        print()
    return 0


if __name__ == "__main__":
    # Run the main of the imported module, so that the cases are registered in
    # refimpl.bench, where a fresh measuring process finds them, and not in a
    # second copy of this module named __main__.
    from refimpl import bench

    sys.exit(bench.main())
