"""Latency and peak memory of every operator against ``nn.Conv2d``.

Run ``python -m refimpl.bench`` (``--help`` for options). For each operator it
measures, at one shape, the forward and the forward+backward latency with
``torch.utils.benchmark`` and the peak memory a forward+backward allocates, and
prints each as a ratio to a plain ``nn.Conv2d`` of the same shape (lower is
better; 1.00 means "as fast as a static convolution"). It runs on the CPU and,
when present, on CUDA. Speed targets of the book live here, not in timed tests.

Operators register themselves below with :func:`register`: a case is a function
``(spec, device, dtype) -> Case`` that builds the operator for the spec's shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["BenchSpec", "Case", "register", "CASES", "measure", "run", "main"]


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """The shape to benchmark: ``Tensor[batch, channels, size, size]``, k x k kernel."""

    batch: int = 32
    in_channels: int = 64
    out_channels: int = 64
    size: int = 56
    kernel_size: int = 3


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


CASES: dict[str, Callable[[BenchSpec, torch.device, torch.dtype], Case]] = {}


def register(name: str):
    """Decorator adding a case factory to :data:`CASES` under ``name``."""

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


# --- baseline ---------------------------------------------------------------------


@register("conv2d")
def _conv2d(spec: BenchSpec, device, dtype) -> Case:
    conv = nn.Conv2d(
        spec.in_channels,
        spec.out_channels,
        spec.kernel_size,
        padding=spec.kernel_size // 2,
        device=device,
        dtype=dtype,
    )
    return _module_case(conv, "nn.Conv2d, the baseline")


# --- chapter 1: convolution arithmetic -------------------------------------------


def _arithmetic_case(name: str, note: str):
    def factory(spec: BenchSpec, device, dtype) -> Case:
        from . import arithmetic

        conv = nn.Conv2d(
            spec.in_channels, spec.out_channels, spec.kernel_size,
            padding=spec.kernel_size // 2, device=device, dtype=dtype,
        )
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

    conv = CondConv2d(
        spec.in_channels,
        spec.out_channels,
        spec.kernel_size,
        padding=spec.kernel_size // 2,
        num_experts=8,
        device=device,
        dtype=dtype,
    )
    return _module_case(conv, "CondConv2d, 8 experts, routing computed inside")


def _per_sample_case(spec: BenchSpec, device, dtype, batched: bool) -> Case:
    from .per_sample import per_sample_conv2d, per_sample_conv2d_loop

    g = torch.Generator().manual_seed(0)
    k = spec.kernel_size
    # A fixed random kernel per sample: the seam every dynamic operator goes through.
    weight = torch.randn(
        spec.batch, spec.out_channels, spec.in_channels, k, k, generator=g
    ).mul_(1.0 / (spec.in_channels * k * k) ** 0.5)
    weight = weight.to(device=device, dtype=dtype).requires_grad_()
    fn = per_sample_conv2d if batched else per_sample_conv2d_loop
    note = (
        "per_sample_conv2d: batch folded into groups"
        if batched
        else "per_sample_conv2d_loop: one F.conv2d per sample"
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

    conv = DynamicConv2d(
        spec.in_channels,
        spec.out_channels,
        spec.kernel_size,
        padding=spec.kernel_size // 2,
        device=device,
        dtype=dtype,
    )
    return _module_case(conv, "DynamicConv2d, K=4 (attention + one grouped conv)")


# --- chapter 4: ODConv -------------------------------------------------------------


def _odconv_case(kernel_num: int):
    # Eval mode: inference latency is what a speed comparison of ODConv is about,
    # and it keeps the attention BatchNorm on running statistics (no batch
    # statistics, no running-average updates) in the backward timing as well.
    def factory(spec: BenchSpec, device, dtype) -> Case:
        from .odconv import ODConv2d

        layer = ODConv2d(
            spec.in_channels, spec.out_channels, spec.kernel_size,
            padding=spec.kernel_size // 2, kernel_num=kernel_num,
            device=device, dtype=dtype,
        ).eval()
        order = layer.resolve_order(
            (spec.batch, spec.in_channels, spec.size, spec.size)
        )
        return _module_case(layer, f"ODConv2d {kernel_num}x, eval, order={order}")

    return factory


register("odconv_1x")(_odconv_case(1))
register("odconv_4x")(_odconv_case(4))
# --- chapter 6: deformable convolution --------------------------------------------


def _deform_inputs(spec: BenchSpec, device, dtype):
    """Fixed random offsets (a few pixels) and sigmoid mask for a k x k, padding k//2
    deformable convolution; they require grad so that backward covers them."""
    g = torch.Generator().manual_seed(1)
    k, size = spec.kernel_size, spec.size
    offset = 2 * torch.randn(spec.batch, 2 * k * k, size, size, generator=g)
    mask = torch.rand(spec.batch, k * k, size, size, generator=g)
    return (offset.to(device=device, dtype=dtype).requires_grad_(),
            mask.to(device=device, dtype=dtype).requires_grad_())


def _deform_case(spec: BenchSpec, device, dtype, fn, note) -> Case:
    conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size,
                     padding=spec.kernel_size // 2, device=device, dtype=dtype)
    offset, mask = _deform_inputs(spec, device, dtype)
    pad = spec.kernel_size // 2

    def run(x):
        return fn(x, offset, conv.weight, conv.bias, padding=pad, mask=mask)

    return Case(fn=run, params=[conv.weight, conv.bias, offset, mask], note=note)


@register("deform_conv2d")
def _deform_conv2d(spec: BenchSpec, device, dtype) -> Case:
    from refimpl.deform import deform_conv2d

    return _deform_case(spec, device, dtype, deform_conv2d,
                        "refimpl deform_conv2d, random offsets, mask")


@register("deform_conv2d_torchvision")
def _deform_conv2d_torchvision(spec: BenchSpec, device, dtype) -> Case:
    from torchvision.ops import deform_conv2d

    return _deform_case(spec, device, dtype, deform_conv2d,
                        "torchvision.ops.deform_conv2d, same inputs")


@register("DeformConv2d")
def _deform_conv2d_module(spec: BenchSpec, device, dtype) -> Case:
    from refimpl.deform import DeformConv2d

    layer = DeformConv2d(spec.in_channels, spec.out_channels, spec.kernel_size,
                         padding=spec.kernel_size // 2, modulated=True,
                         device=device, dtype=dtype)
    return _module_case(layer, "refimpl DeformConv2d, modulated, predicts offsets")



# --- measurement ------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latency(stmt: Callable[[], object], device, min_run_time: float) -> float:
    """Median seconds per call of ``stmt``."""
    from torch.utils import benchmark

    stmt()  # warm-up: allocator, lazy init, kernels selection
    _sync(device)
    timer = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt})
    return timer.blocked_autorange(min_run_time=min_run_time).median


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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _rss_measure_available() -> bool:
    """Set up the resident-memory measure; ``False`` where it cannot work."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # Blocks of 64 KiB and more get their own mapping and go back to the OS
        # when freed, so the resident size follows the live tensors instead of
        # glibc's heap, whose high-water mark would hide later peaks.
        if libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) != 1:
            return False
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status("VmHWM:") is not None


def _proc_status(key: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def _peak_memory(stmt: Callable[[], object], device) -> int:
    """Bytes allocated at the peak of one call, above what existed before it.

    CUDA: the caching allocator's peak statistics. CPU on Linux: the peak
    resident set size during the call (reset through ``/proc/self/clear_refs``),
    which also counts the scratch memory of C++ kernels; elsewhere, the storages
    counted at the dispatcher (:class:`_AllocationTracker`).
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        stmt()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if _rss_measure_available():
        before = _proc_status("VmRSS:")
        stmt()
        return max(_proc_status("VmHWM:") - before, 0)
    with _AllocationTracker() as tracker:
        stmt()
    return tracker.peak


def measure(
    case: Case,
    spec: BenchSpec,
    device,
    dtype,
    min_run_time: float = 1.0,
    memory: bool = True,
) -> dict:
    """Forward latency, forward+backward latency and peak memory of one case."""
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

    return {
        "forward_s": _latency(forward, device, min_run_time),
        "forward_backward_s": _latency(forward_backward, device, min_run_time),
        "peak_bytes": _peak_memory(forward_backward, device) if memory else 0,
    }


def run(
    names: list[str],
    spec: BenchSpec,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 1.0,
    baseline: str = "conv2d",
    rounds: int = 3,
) -> list[dict]:
    """Measure ``names`` and the baseline; return one row per case with ratios.

    Latencies are the best of ``rounds`` interleaved medians; the peak memory is
    taken once per case.
    """
    torch.manual_seed(0)
    if device.type == "cpu":
        # Before the first large allocation, so that no block of any case comes
        # from glibc's heap, whose pages stay resident after a free.
        _rss_measure_available()
    results = {}
    order = [baseline] + [n for n in names if n != baseline]
    cases = {name: CASES[name](spec, device, dtype) for name in order}
    # Rounds over all cases, keeping each case's best median: the clock of a
    # shared machine drifts over minutes, and interleaving spreads the drift
    # over every case instead of charging it to whichever ran at a slow moment.
    for round_ in range(rounds):
        for name, case in cases.items():
            m = measure(case, spec, device, dtype, min_run_time, memory=round_ == 0)
            row = results.setdefault(name, {"name": name, "note": case.note, **m})
            for key in ("forward_s", "forward_backward_s"):
                row[key] = min(row[key], m[key])
    base = results[baseline]
    rows = []
    for row in results.values():
        row["forward_ratio"] = row["forward_s"] / base["forward_s"]
        row["forward_backward_ratio"] = (
            row["forward_backward_s"] / base["forward_backward_s"]
        )
        # Below a megabyte the resident-size measure is page noise, not a peak.
        small = base["peak_bytes"] < 2**20
        row["peak_ratio"] = (
            float("nan") if small else row["peak_bytes"] / base["peak_bytes"]
        )
        rows.append(row)
    return rows


def format_table(rows: list[dict], device: torch.device, spec: BenchSpec) -> str:
    """A plain-text table of the rows returned by :func:`run`."""
    head = (
        f"device={device.type}  N={spec.batch}  "
        f"C={spec.in_channels}->{spec.out_channels}  "
        f"{spec.size}x{spec.size}  k={spec.kernel_size}  (ratios to {rows[0]['name']})"
    )
    lines = [
        head,
        f"{'case':<27}{'fwd ms':>9}{'ratio':>7}{'fwd+bwd ms':>12}{'ratio':>7}"
        f"{'peak MB':>9}{'ratio':>7}  note",
    ]
    for r in rows:
        lines.append(
            f"{r['name']:<27}{r['forward_s'] * 1e3:>9.2f}{r['forward_ratio']:>7.2f}"
            f"{r['forward_backward_s'] * 1e3:>12.2f}{r['forward_backward_ratio']:>7.2f}"
            f"{r['peak_bytes'] / 2**20:>9.1f}{r['peak_ratio']:>7.2f}  {r['note']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--batch", type=int, default=BenchSpec.batch)
    parser.add_argument("--in-channels", type=int, default=BenchSpec.in_channels)
    parser.add_argument("--out-channels", type=int, default=BenchSpec.out_channels)
    parser.add_argument("--size", type=int, default=BenchSpec.size)
    parser.add_argument("--kernel-size", type=int, default=BenchSpec.kernel_size)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64", "bfloat16", "float16"],
        default="float32",
    )
    parser.add_argument(
        "--min-run-time", type=float, default=1.0, help="seconds per measurement"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (best is kept)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    names = args.ops or [n for n in CASES if n != "conv2d"]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = BenchSpec(
        args.batch, args.in_channels, args.out_channels, args.size, args.kernel_size
    )
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu", "cuda"]}[args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        parser.error("CUDA was asked for but is not available")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for d in devices:
        device = torch.device(d)
        rows = run(
            names, spec, device, getattr(torch, args.dtype), args.min_run_time,
            rounds=args.rounds,
        )
        print(format_table(rows, device, spec))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
