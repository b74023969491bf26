"""Argument checks shared by every operator.

Each check raises ``TypeError`` or ``ValueError`` *before* any computation, with a
message that names the owner, the argument, what was expected and what came, e.g.
``"ODConv2d expected input with 64 channels, got 32"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "pair",
    "check_tensor",
    "check_float_tensor",
    "check_channels",
    "check_groups",
    "check_positive_int",
]


def _is_int(value: object) -> bool:
    # bool is an int subclass; a True kernel size is almost surely a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def pair(
    value: int | Sequence[int], name: str, *, owner: str, minimum: int = 1
) -> tuple[int, int]:
    """Return ``(value, value)`` for an int, or the two ints of a pair.

    Raises ``TypeError`` for anything but an int or a pair of ints, and
    ``ValueError`` for entries below ``minimum``.
    """
    if _is_int(value):
        result = (value, value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        result = (int(value[0]), int(value[1]))
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
    """Return ``value`` if it is an int ``>= minimum``; raise otherwise."""
    if not _is_int(value):
        raise TypeError(
            f"{owner} expected {name} to be an int, "
            f"got {type(value).__name__} {value!r}"
        )
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
