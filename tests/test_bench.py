"""``python -m refimpl.bench``: every registered case runs and the table is sane.

The figures themselves are measured by running the benchmark, not here.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import math
import os

import pytest
import torch

from refimpl import bench

TINY = bench.BenchSpec(batch=2, in_channels=4, out_channels=4, size=8, kernel_size=3)
CPU = torch.device("cpu")
FRESH = pytest.mark.skipif(
    not bench._fresh_process_available(),
    reason="the resident-set measure needs Linux /proc",
)


def _sixty_four_mib_temporary():
    """Set-up run in the measuring process: a call with a 64 MiB temporary."""

    def stmt():
        t = torch.ones(16 * 2**20)  # 64 MiB of float32, touched
        return float(t[0])

    return stmt


def _fill_the_heap_and_free_it() -> torch.Tensor:
    """Leave 256 MiB of freed memory resident in this process; return the pin.

    Blocks under 64 KiB come from glibc's heap whatever its mmap threshold, and the
    block allocated on top of them keeps the heap from shrinking when they are
    freed: a later 64 MiB allocation in this process is then served from pages
    that are already resident, and a resident-set measure taken in this process
    sees no peak.
    """
    blocks = [torch.ones(2**13) for _ in range(2**13)]  # 8192 x 32 KiB
    pin = torch.ones(2**13)  # on top of the heap
    del blocks
    return pin


@pytest.fixture
def caller_untouched(monkeypatch):
    """Records every attempt of this process to reset its peak resident set
    (writing ``/proc/self/clear_refs``) or to load the C library (for ``mallopt``);
    the test fails if there was one."""
    attempts = []
    real_open, real_os_open, real_cdll = builtins.open, os.open, ctypes.CDLL

    def watched_open(file, *args, **kwargs):
        if "clear_refs" in str(file):
            attempts.append(("open", file))
        return real_open(file, *args, **kwargs)

    def watched_os_open(path, *args, **kwargs):
        if "clear_refs" in str(path):
            attempts.append(("os.open", path))
        return real_os_open(path, *args, **kwargs)

    def watched_cdll(name, *args, **kwargs):
        if name is None or os.path.basename(str(name)).startswith("libc.so"):
            attempts.append(("ctypes.CDLL", name))
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watched_open)
    monkeypatch.setattr(io, "open", watched_open)
    monkeypatch.setattr(os, "open", watched_os_open)
    monkeypatch.setattr(ctypes, "CDLL", watched_cdll)
    yield attempts
    assert attempts == [], "the caller's allocator or /proc settings were touched"


def test_every_case_runs_and_ratios_are_relative_to_the_baseline(caller_untouched):
    """Every case runs, peak memory included (in fresh processes on Linux), and
    the calling process never changes its own allocator or /proc settings."""
    # ddf_compiled would spend most of the test in Inductor; see its own test
    names = [n for n in bench.CASES if n not in ("conv2d", "ddf_compiled")]
    lines = []
    rows = bench.run(
        names, TINY, CPU, min_run_time=0.01, rounds=1, progress=lines.append
    )
    assert [r["name"] for r in rows] == ["conv2d"] + names
    assert [r["name"] for r in rows if r["skipped"] or r["peak_error"]] == []
    base = rows[0]
    assert base["forward_ratio"] == 1.0 and base["forward_backward_ratio"] == 1.0
    for row in rows:
        assert row["forward_s"] > 0 and row["forward_backward_s"] > 0
        assert row["peak_bytes"] >= 0
        assert math.isclose(row["forward_ratio"], row["forward_s"] / base["forward_s"])
        if bench._fresh_process_available():
            assert row["peak_method"] == "resident set, fresh process"
    n = len(rows)
    assert f"[1/{n}] cpu conv2d: latency, round 1/1" in lines
    last = f"[{n}/{n}] cpu {names[-1]}: peak memory"
    assert any(line.startswith(last) for line in lines)
    table = bench.format_table(rows, CPU, TINY)
    assert all(name in table for name in ["conv2d"] + names)
    assert "skipped" not in table


@FRESH
def test_cpu_peak_memory_sees_a_large_temporary_whatever_ran_before():
    """A 64 MiB temporary that lives only inside the call shows in the peak, even
    after this process freed a few hundred MiB that stay resident."""
    pin = _fill_the_heap_and_free_it()
    peak, method = bench._fresh_process_peak_memory(_sixty_four_mib_temporary)
    del pin
    assert method == "resident set, fresh process"
    assert 60 * 2**20 <= peak <= 80 * 2**20


def test_fresh_process_needs_a_module_level_function():
    with pytest.raises(ValueError, match="module-level function"):
        bench._fresh_process_peak_memory(lambda: lambda: None)


@FRESH
def test_fresh_process_reports_the_error_of_the_measured_call():
    with pytest.raises(RuntimeError, match="ValueError: BenchSpec expected batch"):
        bench._fresh_process_peak_memory(bench.BenchSpec, 0)


def test_dispatch_tracker_sees_op_outputs_and_their_release():
    """The fallback measure counts live storages made by ops, views only once."""

    def stmt():
        a = torch.ones(4 * 2**20)  # 16 MiB
        b = a.view(2, -1)  # a view: no new storage
        del a, b
        c = torch.zeros(2 * 2**20)  # 8 MiB, after the 16 MiB went away
        return c

    with bench._AllocationTracker() as tracker:
        stmt()
    assert tracker.peak == 16 * 2**20
    assert tracker.current == 0


def test_without_proc_the_peak_is_the_dispatcher_count(monkeypatch):
    monkeypatch.setattr(bench, "_fresh_process_available", lambda: False)
    peak, method = bench.peak_memory("conv2d", TINY, CPU)
    assert method == "dispatcher count"
    assert peak > 0


def _needs_cuda(spec, device, dtype):
    raise bench.SkipCase("needs CUDA")


def _fails_when_run(spec, device, dtype):
    def fn(x):
        raise TypeError("no kernel for this dtype")

    return bench.Case(fn=fn, params=[], note="fails when run")


def test_a_case_that_fails_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setitem(bench.CASES, "needs_cuda", _needs_cuda)
    monkeypatch.setitem(bench.CASES, "fails_when_run", _fails_when_run)
    lines = []
    rows = bench.run(
        ["needs_cuda", "fails_when_run", "conv2d_unfold"],
        TINY,
        CPU,
        min_run_time=0.01,
        rounds=2,
        memory=False,
        progress=lines.append,
    )
    by_name = {r["name"]: r for r in rows}
    assert by_name["needs_cuda"]["skipped"] == "needs CUDA"
    reason = "TypeError: no kernel for this dtype"
    assert by_name["fails_when_run"]["skipped"] == reason
    assert by_name["conv2d_unfold"]["skipped"] is None
    assert by_name["conv2d_unfold"]["forward_s"] > 0
    assert math.isnan(by_name["fails_when_run"]["forward_ratio"])
    assert "[2/4] cpu needs_cuda: skipped: needs CUDA" in lines
    assert "[3/4] cpu fails_when_run: latency, round 1/2" in lines
    assert "[3/4] cpu fails_when_run: latency, round 2/2" not in lines
    table = bench.format_table(rows, CPU, TINY)
    assert "skipped: needs CUDA" in table
    assert f"skipped: {reason}" in table


def test_a_skipped_baseline_leaves_the_ratios_undefined(monkeypatch):
    monkeypatch.setitem(bench.CASES, "needs_cuda", _needs_cuda)
    rows = bench.run(
        ["conv2d_unfold"],
        TINY,
        CPU,
        min_run_time=0.01,
        rounds=1,
        memory=False,
        baseline="needs_cuda",
    )
    assert rows[0]["skipped"] == "needs CUDA"
    assert rows[1]["forward_s"] > 0 and math.isnan(rows[1]["forward_ratio"])


def test_the_command_line_reports_progress_and_skipped_cases(monkeypatch, capsys):
    monkeypatch.setitem(bench.CASES, "needs_cuda", _needs_cuda)
    # The fresh processes are tested above; here they would only cost seconds.
    monkeypatch.setattr(bench, "_fresh_process_available", lambda: False)
    args = "--device cpu --batch 2 --in-channels 4 --out-channels 4 --size 8"
    args += " --min-run-time 0.01 --rounds 1 --ops needs_cuda"
    assert bench.main(args.split()) == 0
    out, err = capsys.readouterr()
    assert "[1/2] cpu conv2d: latency, round 1/1" in err
    assert "[2/2] cpu needs_cuda: skipped: needs CUDA" in err
    assert "needs_cuda                 skipped: needs CUDA" in out
    assert "nn.Conv2d, the baseline" in out


@pytest.mark.parametrize(
    "option, value",
    [
        ("--rounds", "0"),
        ("--rounds", "-2"),
        ("--batch", "0"),
        ("--batch", "-1"),
        ("--batch", "two"),
        ("--in-channels", "0"),
        ("--out-channels", "-4"),
        ("--size", "0"),
        ("--kernel-size", "0"),
        ("--min-run-time", "0"),
        ("--min-run-time", "-1"),
        ("--min-run-time", "nan"),
        ("--min-run-time", "inf"),
        ("--threads", "0"),
        ("--threads", "-1"),
    ],
)
def test_invalid_options_are_rejected(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a" in err
    assert repr(value) in err or value in err


def test_unknown_case_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--ops", "no_such_op", "--device", "cpu"])
    assert "unknown case" in capsys.readouterr().err


def test_run_checks_its_arguments():
    with pytest.raises(ValueError, match="run expected case names"):
        bench.run(["no_such_op"], TINY, CPU)
    with pytest.raises(ValueError, match="run expected rounds"):
        bench.run([], TINY, CPU, rounds=0)
    with pytest.raises(ValueError, match="run expected min_run_time > 0"):
        bench.run([], TINY, CPU, min_run_time=float("nan"))
    with pytest.raises(ValueError, match="BenchSpec expected batch"):
        bench.BenchSpec(batch=0)


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        bench.register("conv2d")(lambda spec, device, dtype: None)


def test_the_compiled_ddf_case_is_the_eager_one_compiled(monkeypatch):
    compiled, real_compile = [], torch.compile

    def fake_compile(fn, **kwargs):  # record, then compile without Inductor
        compiled.append(kwargs)
        return real_compile(fn, backend="eager", **kwargs)

    eager = bench.CASES["ddf"](TINY, CPU, torch.float32)
    monkeypatch.setattr(bench.torch, "compile", fake_compile)
    case = bench.CASES["ddf_compiled"](TINY, CPU, torch.float32)
    assert compiled == [{"dynamic": False}] and "torch.compile" in case.note
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(case.fn(x), eager.fn(x))
    torch._dynamo.reset()


def test_depthwise_cases_skip_other_shapes():
    spec = bench.BenchSpec(batch=2, in_channels=4, out_channels=6, size=8)
    for name in ("conv2d_depthwise", "ddf", "DDFConv2d", "ddf_pointwise"):
        with pytest.raises(bench.SkipCase, match="needs in_channels == out_channels"):
            bench.CASES[name](spec, CPU, torch.float32)


def test_counts_are_the_papers_macs_and_the_layers_parameters():
    spec = bench.BenchSpec(batch=2, in_channels=4, out_channels=6, size=8)
    params, macs = bench.counts(
        bench.CASES["conv2d"](spec, CPU, torch.float32), spec, CPU, torch.float32
    )
    # one multiply-add per weight and output pixel (padding 1 keeps 8 x 8)
    assert macs == 2 * 6 * 8 * 8 * 4 * 3 * 3
    assert params == 6 * 4 * 3 * 3 + 6
    square = bench.BenchSpec(batch=2, in_channels=4, out_channels=4, size=8)
    case = bench.CASES["ddf"](square, CPU, torch.float32)
    assert bench.counts(case, square, CPU, torch.float32) == (None, 2 * 4 * 64 * 9)
    layer = bench.CASES["DDFConv2d"](square, CPU, torch.float32)
    params, macs = bench.counts(layer, square, CPU, torch.float32)
    assert params == sum(p.numel() for p in layer.fn.parameters())
    # the filtering plus the branches' 1x1 convolution and linear layers
    branches = 2 * (9 * 4 * 64 + 4 * 1 + 1 * 36)
    assert macs == 2 * 4 * 64 * 9 + branches


def test_ddf_pointwise_is_ddf_then_a_1x1_convolution():
    square = bench.BenchSpec(batch=2, in_channels=4, out_channels=4, size=8)
    torch.manual_seed(0)
    case = bench.CASES["ddf_pointwise"](square, CPU, torch.float32)
    ddf_layer, pointwise = case.fn
    x = torch.randn(2, 4, 8, 8)
    expected = torch.nn.functional.conv2d(
        ddf_layer(x), pointwise.weight, pointwise.bias
    )
    torch.testing.assert_close(case.fn(x), expected)
    assert pointwise.weight.shape == (4, 4, 1, 1)
    # its counts are DDFConv2d's plus the 1x1 convolution's, computed by hand
    ddf_alone = bench.CASES["DDFConv2d"](square, CPU, torch.float32)
    p_ddf, m_ddf = bench.counts(ddf_alone, square, CPU, torch.float32)
    params, macs = bench.counts(case, square, CPU, torch.float32)
    assert params == p_ddf + 4 * 4 + 4
    assert macs == m_ddf + 2 * 64 * 4 * 4
    assert {id(p) for p in case.params} == {id(p) for p in case.fn.parameters()}


def test_in_process_memory_starts_no_process(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("a measuring process was started")

    monkeypatch.setattr(bench.subprocess, "run", no_process)
    rows = bench.run(
        ["ddf_pointwise"], TINY, CPU, min_run_time=0.01, rounds=1, fresh_process=False
    )
    assert [r["peak_method"] for r in rows] == ["dispatcher count"] * 2
    assert all(r["peak_bytes"] > 0 and r["peak_error"] is None for r in rows)
    # at least the float32 output Tensor[2, 4, 8, 8] is live at the peak
    assert rows[0]["peak_bytes"] >= 2 * 4 * 8 * 8 * 4
    with pytest.raises(TypeError, match="run expected fresh_process to be a bool"):
        bench.run([], TINY, CPU, fresh_process="no")


def test_stages_cover_every_shape_and_batch(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "RESNET50_STAGES", ((4, 8), (8, 4)))
    monkeypatch.setattr(bench, "_fresh_process_available", lambda: False)
    prefix = tmp_path / "stages"
    args = "--device cpu --stages --stage-batches 1 2 --ops conv2d_depthwise ddf"
    args += f" --min-run-time 0.01 --rounds 1 --output {prefix}"
    assert bench.main(args.split()) == 0
    table = (tmp_path / "stages_cpu.md").read_text()
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == 1 + 2 * 2 * 3  # header, then batches x stages x cases
    for batch, shape in [(1, "4, 8²"), (2, "8, 4²")]:
        assert f"| {batch} | {shape} | ddf |" in table
    assert (tmp_path / "stages_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_forced_algorithm_cases_say_what_auto_chose():
    for kind in ("condconv", "dynamic_conv", "odconv_4x"):
        for algorithm in ("auto", "grouped", "unfold", "outputs"):
            case = bench.CASES[f"{kind}_{algorithm}"](TINY, CPU, torch.float32)
            assert f"algorithm={algorithm} (" in case.note
            if algorithm != "auto":
                assert case.note.endswith(f"({algorithm})")
            x = torch.randn(TINY.batch, TINY.in_channels, TINY.size, TINY.size)
            assert case.fn(x).shape == x.shape


def test_stage_ratios_fit_a_page_and_list_every_case():
    rows = bench.run_stages(
        ["conv2d_depthwise"],
        CPU,
        stages=((4, 8), (8, 4)),
        batches=(2,),
        min_run_time=0.01,
        rounds=1,
        memory=False,
    )
    text = bench.format_stage_ratios(rows)
    lines = text.splitlines()
    assert len(lines) == 1 + 2 * 2 and all(len(line) <= 88 for line in lines)
    assert "  2    8    4²  conv2d_depthwise" in text
    assert lines[1].split()[-2:] == ["1.00x", "1.00x"]  # the baseline itself
