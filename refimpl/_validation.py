"""Argument checks shared by every operator.

Each check raises ``TypeError`` or ``ValueError`` *before* any computation, with a
message that names the owner, the argument, what was expected and what came, e.g.
``"ODConv2d expected input with 64 channels, got 32"``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "as_int",
    "check_bool",
    "check_real",
    "pair",
    "check_tensor",
    "check_float_tensor",
    "check_channels",
    "check_groups",
    "check_positive_int",
]


def as_int(value: object) -> int | None:
    """``value`` as a Python int if it is integer-like, else ``None``.

    Integer-like means what ``operator.index`` accepts (``int``, NumPy integers,
    integer 0-d tensors), as ``nn.Conv2d`` does; ``bool`` is refused because a
    ``True`` kernel size is almost surely a mistake.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, Tensor) and (value.dim() or value.is_floating_point()):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_int(value: object) -> bool:
    return as_int(value) is not None


def check_bool(value: object, name: str, *, owner: str) -> bool:
    """Return ``value`` if it is a bool (or NumPy bool); raise ``TypeError`` else.

    Strings such as ``"no"`` are refused rather than read by their truth value.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(
        f"{owner} expected {name} to be a bool, got {type(value).__name__} {value!r}"
    )


def check_real(
    value: object,
    name: str,
    *,
    owner: str,
    minimum: float | None = None,
    strict: bool = True,
) -> float:
    """Return ``value`` as a finite float (``> minimum``, or ``>=`` if not strict).

    Raises ``TypeError`` for anything but a real number (bools and tensors
    included) and ``ValueError`` for NaN, infinities and values out of range.
    """
    if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner} expected {name} to be a real number, got "
            f"{type(value).__name__} {value!r}"
        )
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{owner} expected {name} to be finite, got {value!r}")
    if minimum is not None:
        if strict and not result > minimum:
            raise ValueError(f"{owner} expected {name} > {minimum:g}, got {value!r}")
        if not strict and not result >= minimum:
            raise ValueError(f"{owner} expected {name} >= {minimum:g}, got {value!r}")
    return result


def pair(
    value: int | Sequence[int], name: str, *, owner: str, minimum: int = 1
) -> tuple[int, int]:
    """Return ``(value, value)`` for an int, or the two ints of a pair.

    Raises ``TypeError`` for anything but an int or a pair of ints, and
    ``ValueError`` for entries below ``minimum``.
    """
    if _is_int(value):
        result = (as_int(value), as_int(value))
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        result = (as_int(value[0]), as_int(value[1]))
    else:
        raise TypeError(
            f"{owner} expected {name} to be an int or a pair of ints, got {value!r}"
        )
    if min(result) < minimum:
        raise ValueError(f"{owner} expected {name} >= {minimum}, got {value!r}")
    return result


def check_positive_int(
    value: object, name: str, *, owner: str, minimum: int = 1
) -> int:
    """Return ``value`` as an int if it is integer-like and ``>= minimum``."""
    if not _is_int(value):
        raise TypeError(
            f"{owner} expected {name} to be an int, "
            f"got {type(value).__name__} {value!r}"
        )
    value = as_int(value)
    if value < minimum:
        raise ValueError(f"{owner} expected {name} >= {minimum}, got {value}")
    return value


def check_tensor(
    x: object, name: str, *, owner: str, ndim: int | None = None
) -> Tensor:
    """Check that ``x`` is a tensor with ``ndim`` dimensions (any dtype)."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{owner} expected {name} to be a torch.Tensor, got {type(x).__name__}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{owner} expected {name} with {ndim} dimensions, got {x.dim()} dimensions "
            f"(shape {tuple(x.shape)})"
        )
    return x


def check_float_tensor(
    x: object, name: str, *, owner: str, ndim: int | None = None
) -> Tensor:
    """Check that ``x`` is a floating-point tensor with ``ndim`` dimensions."""
    check_tensor(x, name, owner=owner, ndim=ndim)
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{owner} expected {name} with a floating-point dtype, got {x.dtype}"
        )
    return x


def check_channels(
    x: Tensor, expected: int, *, owner: str, name: str = "input"
) -> None:
    """Check the channel dimension (dim 1) of an ``[N, C, ...]`` tensor."""
    if x.shape[1] != expected:
        raise ValueError(
            f"{owner} expected {name} with {expected} channels, got {x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )


def check_groups(
    in_channels: int, out_channels: int, groups: int, *, owner: str
) -> None:
    """Check that ``groups`` divides both channel counts."""
    check_positive_int(groups, "groups", owner=owner)
    if in_channels % groups:
        raise ValueError(
            f"{owner} expected groups to divide in_channels, "
            f"got in_channels={in_channels}, "
            f"groups={groups}"
        )
    if out_channels % groups:
        raise ValueError(
            f"{owner} expected groups to divide out_channels, "
            f"got out_channels={out_channels}, "
            f"groups={groups}"
        )


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``False`` where it cannot be,
    such as the meta device, on which ``torch.is_autocast_enabled`` raises)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def check_same_dtype(x: Tensor, *, owner: str, **tensors: Tensor | None) -> None:
    """Check that every tensor has the dtype of the input ``x``.

    Skipped under autocast, where the matmuls and convolutions cast their
    operands, so mixed dtypes are legitimate; outside it they would fail deep
    inside ``F.conv2d``.
    """
    if autocast_enabled(x.device.type):
        return
    for name, t in tensors.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{owner} expected {name} with the dtype of the input ({x.dtype}), "
                f"got {t.dtype}"
            )


def check_shape(
    t: object, name: str, expected: Sequence[int], *, owner: str, layout: str
) -> Tensor:
    """Check that ``t`` is a floating tensor of shape ``expected`` (``layout``
    names the axes in the message, e.g. ``"[N, K]"``)."""
    check_float_tensor(t, name, owner=owner, ndim=len(expected))
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"{owner} expected {name} of shape {layout} = {tuple(expected)}, got "
            f"{tuple(t.shape)}"
        )
    return t


def check_conv_operands(
    x: object,
    kernel_shape: Sequence[int],
    stride,
    padding,
    dilation,
    groups,
    *,
    owner: str,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """The checks every functional convolution shares; returns the parsed sizes.

    ``x`` must be a floating ``Tensor[N, C_in, H, W]``; ``kernel_shape`` is the
    kernel's ``(C_out, C_in/groups, kH, kW)`` (the trailing axes of a bank), and
    ``groups`` must divide ``C_out`` with ``C_in = C_in/groups * groups``; the
    padded input must hold the dilated kernel. Returns ``(stride, padding,
    dilation, groups)`` as pairs and an int.
    """
    check_float_tensor(x, "input", owner=owner, ndim=4)
    stride = pair(stride, "stride", owner=owner)
    padding = pair(padding, "padding", owner=owner, minimum=0)
    dilation = pair(dilation, "dilation", owner=owner)
    groups = check_positive_int(groups, "groups", owner=owner)
    c_out, c_in_g, kh, kw = kernel_shape
    if c_out % groups:
        raise ValueError(
            f"{owner} expected groups to divide out_channels, got "
            f"out_channels={c_out}, groups={groups}"
        )
    if x.shape[1] != c_in_g * groups:
        raise ValueError(
            f"{owner} expected input with {c_in_g * groups} channels (C_in/groups = "
            f"{c_in_g} in the weight, times groups = {groups}), got {x.shape[1]}"
        )
    for axis, name, k in ((0, "height", kh), (1, "width", kw)):
        padded = x.shape[2 + axis] + 2 * padding[axis]
        span = dilation[axis] * (k - 1) + 1
        if padded < span:
            raise ValueError(
                f"{owner} expected the padded input ({padded}) to be at least the "
                f"dilated kernel size ({span}) along {name}"
            )
    return stride, padding, dilation, groups
