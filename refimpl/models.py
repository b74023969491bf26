"""Networks with dynamic convolutions: converting ``nn.Conv2d`` layers, paper ResNets.

:func:`convert_conv2d` swaps the convolutions of any model for another operator,
in place and under the same names. :func:`paper_resnet50` uses it to rebuild the
ResNet-50 of the ODConv paper (Li, Zhou, Yao, "Omni-Dimensional Dynamic
Convolution", ICLR 2022, arXiv:2209.07947) from torchvision's ResNet-50 (He, Zhang,
Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv:1512.03385), so that its parameter count can be checked against the
published one (chapter 4; chapter 8 compares all operators).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ._conv import check_convertible

__all__ = [
    "convert_conv2d",
    "count_parameters",
    "is_bottleneck_conv",
    "paper_resnet50",
    "PUBLISHED_RESNET50_PARAMS",
]

#: Parameter counts in millions printed by the ODConv authors for ResNet-50 on
#: ImageNet (README of OSVAI/ODConv, table "ResNet50"; the paper prints the same
#: totals). Precision: two decimals.
PUBLISHED_RESNET50_PARAMS = {
    "ResNet-50": 25.56,
    "+ ODConv (1x)": 28.64,
    "+ ODConv (4x)": 90.67,
}

_BOTTLENECK = re.compile(r"layer[1-4]\.\d+\.conv[123]")


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in the parameters of ``model`` (buffers excluded)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"count_parameters expected a torch.nn.Module, got {type(model).__name__}"
        )
    return sum(p.numel() for p in model.parameters())


def convert_conv2d(
    model: nn.Module,
    factory: Callable[[nn.Conv2d], nn.Module],
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
) -> nn.Module:
    """Replace convolutions of ``model`` by ``factory(conv)``, in place.

    Every ``nn.Conv2d`` (subclasses included) whose qualified name ``name`` (as in
    ``model.named_modules()``, e.g. ``"layer1.0.conv2"``) satisfies
    ``predicate(name, conv)`` (all of them when ``predicate`` is ``None``) is
    replaced by ``factory(conv)`` under the same attribute name, so the state dict
    keys of the new layer start with the old prefix (``layer1.0.conv2.weight``).
    The new module is put in the train/eval mode of the old one. With a ``refimpl``
    operator's ``from_conv2d`` as the factory the converted network computes the
    same function as the original at conversion time. The replacements
    are not searched again, so a factory may return a module that contains the
    original convolution. A convolution registered under several names is
    replaced once and stays shared.

    Args:
        model: the network to modify.
        factory: ``nn.Conv2d -> nn.Module``, e.g. :meth:`refimpl.ODConv2d.from_conv2d`.
        predicate: optional ``(name, conv) -> bool`` selecting the layers.

    Returns:
        ``model`` itself, modified.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``factory`` or
            ``predicate`` not callable, or ``factory`` returns a non-module.
        ValueError: if ``model`` is itself an ``nn.Conv2d`` (it has no parent to
            put a replacement in: call ``factory`` directly); if a selected layer
            cannot be converted faithfully (an uninitialised lazy convolution, or a
            subclass with its own ``forward`` such as timm's ``Conv2dSame``, whose
            dynamic "same" padding a replacement would silently drop: exclude it
            with ``predicate``); or if a replacement reports a geometry other than
            the layer's (so nothing changes shape silently). Each names the layer.
    """
    owner = "convert_conv2d"
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{owner} expected model to be a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    if isinstance(model, nn.Conv2d):
        raise ValueError(
            f"{owner} expected a model containing convolutions, got a bare "
            f"{type(model).__name__}; call the factory on it directly"
        )
    if not callable(factory):
        raise TypeError(f"{owner} expected factory to be callable, got {factory!r}")
    if predicate is not None and not callable(predicate):
        raise TypeError(
            f"{owner} expected predicate to be callable or None, got {predicate!r}"
        )

    # Collect first, replace after: the module tree must not change while walked.
    # remove_duplicate=False lists a shared convolution under each of its names.
    targets = []
    inside_conv: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix + ".") for prefix in inside_conv):
            continue  # never look inside a convolution
        if isinstance(module, nn.Conv2d):
            inside_conv.append(name)
            parent_name, _, child_name = name.rpartition(".")
            targets.append((model.get_submodule(parent_name), child_name, name, module))
    replacements: dict[int, nn.Module | None] = {}
    for parent, child_name, name, conv in targets:
        if id(conv) not in replacements:
            if predicate is None or predicate(name, conv):
                check_convertible(conv, owner=owner, layer=name)
                new = factory(conv)
                if not isinstance(new, nn.Module):
                    raise TypeError(
                        f"{owner} expected factory to return an nn.Module for layer "
                        f"{name!r}, got {type(new).__name__}"
                    )
                _check_geometry(owner, name, conv, new)
                replacements[id(conv)] = new.train(conv.training)
            else:
                replacements[id(conv)] = None
        new = replacements[id(conv)]
        if new is not None:
            setattr(parent, child_name, new)
    return model


def _check_geometry(owner: str, name: str, conv: nn.Conv2d, new: nn.Module) -> None:
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
    ):
        if hasattr(new, attr) and getattr(new, attr) != getattr(conv, attr):
            raise ValueError(
                f"{owner} expected the replacement of layer {name!r} to keep "
                f"{attr}={getattr(conv, attr)!r}, got {getattr(new, attr)!r}"
            )


def is_bottleneck_conv(name: str, conv: nn.Conv2d) -> bool:
    """Whether ``name`` is conv1, conv2 or conv3 of a torchvision ResNet bottleneck.

    These are the 48 layers (ResNet-50) that the official ``od_resnet50`` builds as
    ODConv: the 1x1 reduce, the 3x3 (which carries the stride, ResNet v1.5, as in
    torchvision) and the 1x1 expand of every block. The stem convolution
    (``conv1``) and the 1x1 shortcut projections (``layerX.0.downsample.0``) stay
    static.
    """
    return _BOTTLENECK.fullmatch(name) is not None


def paper_resnet50(
    num_kernels: int = 1,
    *,
    reduction: float = 0.0625,
    min_hidden: int = 16,
    attention_norm: str | None = "batch",
    num_classes: int = 1000,
) -> nn.Module:
    """The ODConv ResNet-50 of the paper, built from ``torchvision.models.resnet50``.

    Builds ``torchvision.models.resnet50(weights=None)`` and converts the layers
    selected by :func:`is_bottleneck_conv` with :meth:`refimpl.ODConv2d.from_conv2d`
    (``preserve=False``: the official networks train from scratch).
    With the official defaults it has the parameters of the official
    ``od_resnet50`` (OSVAI/ODConv, ``models/od_resnet.py``): 28.64M for
    ``num_kernels=1`` and 90.67M for ``num_kernels=4`` (chapter 4 counts them).

    Differences from the official network, none of which changes the parameter
    count: the official model applies dropout (``--dropout``, 0.1 by default)
    before the classifier and initialises it with ``N(0, 0.01)``; torchvision has
    no dropout and its own classifier initialisation. The official
    ``_make_layer`` default ``reduction=0.625`` is never used (every call passes
    the model's 0.0625).

    Args:
        num_kernels: kernels per ODConv layer ("1x", "4x").
        reduction, min_hidden, attention_norm: see :class:`refimpl.ODConv2d`.
        num_classes: size of the classifier.

    Returns:
        The network, in training mode, on the CPU in float32.
    """
    from torchvision.models import resnet50  # torchvision only needed here

    from ._validation import check_positive_int
    from .odconv import ODConv2d

    check_positive_int(num_kernels, "num_kernels", owner="paper_resnet50")
    check_positive_int(num_classes, "num_classes", owner="paper_resnet50")

    def factory(conv: nn.Conv2d) -> nn.Module:
        return ODConv2d.from_conv2d(
            conv,
            preserve=False,
            num_kernels=num_kernels,
            reduction=reduction,
            min_hidden=min_hidden,
            attention_norm=attention_norm,
        )

    return convert_conv2d(
        resnet50(weights=None, num_classes=num_classes), factory, is_bottleneck_conv
    )
