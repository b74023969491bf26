"""Shared fixtures: devices, per-dtype tolerances, and random data drawn on the CPU."""

from __future__ import annotations

import pytest
import torch

# TF32 would make float32 matmuls and convolutions on Ampere+ GPUs agree with the
# float64 references only to about 1e-3; the tests compare exact arithmetic.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (rtol, atol) for comparing two implementations of the same operator.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every available device: the CPU always, CUDA when present."""
    return torch.device(request.param)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Keyword arguments for ``torch.testing.assert_close`` at ``dtype``."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def randn(
    *shape, seed: int = 0, dtype=torch.float64, device="cpu", requires_grad=False
):
    """Normal samples drawn on the CPU with a fixed seed, then moved to ``device``.

    Drawing on the CPU makes the CPU and CUDA runs of a test see the same numbers.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(
        device=device, dtype=dtype
    )
    return t.requires_grad_(requires_grad)


@pytest.fixture
def one_thread():
    """Run a test of many tiny ops (gradcheck, tiny-model training) on one thread.

    Thousands of operations of a few elements each spend their time in thread
    synchronisation on a busy machine; one thread is many times faster there.
    The previous thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rand():
    """The :func:`randn` helper as a fixture."""
    return randn
