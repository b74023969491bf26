"""``python -m refimpl.bench``: every registered case runs and the table is sane.

The figures themselves are measured by running the benchmark, not here.
"""

from __future__ import annotations

import math

import pytest
import torch

from refimpl import bench

TINY = bench.BenchSpec(batch=2, in_channels=4, out_channels=4, size=8, kernel_size=3)


def test_every_case_runs_and_ratios_are_relative_to_the_baseline():
    names = [n for n in bench.CASES if n != "conv2d"]
    rows = bench.run(names, TINY, torch.device("cpu"), min_run_time=0.01, rounds=1)
    assert [r["name"] for r in rows] == ["conv2d"] + names
    base = rows[0]
    assert base["forward_ratio"] == 1.0 and base["forward_backward_ratio"] == 1.0
    for row in rows:
        assert row["forward_s"] > 0 and row["forward_backward_s"] > 0
        assert math.isclose(
            row["forward_ratio"], row["forward_s"] / base["forward_s"]
        )
    table = bench.format_table(rows, torch.device("cpu"), TINY)
    assert all(name in table for name in ["conv2d"] + names)


def test_cpu_peak_memory_sees_a_large_temporary():
    """A 64 MiB temporary that lives only inside the call must show in the peak."""

    def stmt():
        t = torch.ones(16 * 2**20)  # 64 MiB of float32, touched
        return float(t[0])

    peak = bench._peak_memory(stmt, torch.device("cpu"))
    assert 60 * 2**20 <= peak <= 80 * 2**20


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


def test_unknown_case_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--ops", "no_such_op", "--device", "cpu"])
    assert "unknown case" in capsys.readouterr().err


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        bench.register("conv2d")(lambda spec, device, dtype: None)
