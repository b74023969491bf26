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
    "ddf_resnet",
    "fdconv_resnet50",
    "is_bottleneck_3x3",
    "PUBLISHED_FDCONV_EXTRA_PARAMS",
    "PUBLISHED_DDF_RESNET_PARAMS",
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

#: Parameter counts in millions in the DDF authors' README (theFoxofSky/ddfnet,
#: table of ImageNet results); "mul" and "add" models have the same counts.
#: Precision: one decimal.
PUBLISHED_DDF_RESNET_PARAMS = {
    "ddf_mul_resnet50": 16.8,
    "ddf_add_resnet50": 16.8,
    "ddf_mul_resnet101": 28.1,
    "ddf_add_resnet101": 28.1,
}

#: Parameters FDConv adds to ResNet-50, in millions, in the FDConv README and the
#: paper's abstract (Linwei-Chen/FDConv; Chen et al., CVPR 2025). Precision: one
#: decimal.
PUBLISHED_FDCONV_EXTRA_PARAMS = 3.6

_BOTTLENECK_3X3 = re.compile(r"layer[1-4]\.\d+\.conv2")
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


def is_bottleneck_3x3(name: str, conv: nn.Conv2d) -> bool:
    """Whether ``name`` is ``conv2``, the 3x3 convolution, of a ResNet bottleneck.

    The layers the official DDF-ResNets replace (theFoxofSky/ddfnet,
    ``ddf_resnet.py``: the bottleneck's ``conv2`` becomes a ``DDFPack``, which
    carries the block's stride); everything else stays as it is.
    """
    return _BOTTLENECK_3X3.fullmatch(name) is not None


def ddf_resnet(
    depth: int = 50,
    combine: str = "mul",
    *,
    se_ratio: float = 0.2,
    num_classes: int = 1000,
) -> nn.Module:
    """The official DDF-ResNet (``ddf_{mul,add}_resnet{50,101}``), from torchvision.

    Builds ``torchvision.models.resnet50`` / ``resnet101`` (``weights=None``) and
    replaces the 3x3 ``conv2`` of every bottleneck (:func:`is_bottleneck_3x3`) by
    :class:`refimpl.ddf.DDFConv2d` with ``kernel_size=3``, the block's stride and
    ``se_ratio``, as theFoxofSky/ddfnet ``ddf_resnet.py`` does on timm's ResNet
    (whose layers and parameter count are torchvision's: stride on the 3x3, no
    anti-aliasing, dilation 1). Stem, 1x1 convolutions, shortcut projections and
    classifier are unchanged. The dense 3x3 becomes a depthwise dynamic filter, so
    nothing of it is preserved (``preserve=False``): the models train from scratch.

    Parameter counts equal the official builds': 16.8M (ResNet-50) and 28.1M
    (ResNet-101) in the authors' README, for either ``combine`` (chapter 5 counts
    them to the unit).

    Args:
        depth: 50 or 101.
        combine: ``"mul"`` or ``"add"``.
        se_ratio: hidden width of the channel branches over their channels.
        num_classes: size of the classifier.

    Returns:
        The network, in training mode, on the CPU in float32.
    """
    from torchvision.models import resnet50, resnet101  # only needed here

    from ._validation import check_positive_int
    from .ddf import DDFConv2d

    owner = "ddf_resnet"
    builders = {50: resnet50, 101: resnet101}
    if depth not in builders or isinstance(depth, bool):
        raise ValueError(f"{owner} expected depth 50 or 101, got {depth!r}")
    check_positive_int(num_classes, "num_classes", owner=owner)

    def factory(conv: nn.Conv2d) -> nn.Module:
        return DDFConv2d.from_conv2d(
            conv, preserve=False, combine=combine, se_ratio=se_ratio
        )

    model = builders[depth](weights=None, num_classes=num_classes)
    return convert_conv2d(model, factory, is_bottleneck_3x3)


def fdconv_resnet50(
    num_kernels: int = 64, *, num_classes: int = 1000, **options
) -> nn.Module:
    """ResNet-50 with the official FDConv placement, from torchvision.

    Every bottleneck convolution (conv1, conv2, conv3: 48 layers,
    :func:`is_bottleneck_conv`) becomes :class:`refimpl.fdconv.FDConv2d` with
    ``num_kernels`` frequency groups (64 in every published config; the class
    default is 4), FBM on the 3x3 ones; the stem and the shortcut projections stay
    plain, as the official ``ResNet_FDConv`` builds them (Linwei-Chen/FDConv,
    ``mmdet_custom/resnet.py``: the stem would fall back to ``nn.Conv2d`` under the
    official placement rule, :func:`refimpl.fdconv.fdconv_placement`, and the
    projections are built without the FDConv config). The layers are freshly
    initialised (``preserve=False``), as for training from scratch; use
    ``FDConv2d.from_conv2d`` with ``preserve=True`` to convert pretrained weights.

    Parameter count: the official build adds about 3.65M parameters to
    ResNet-50's 25.56M, published as "+3.6M" (chapter 7 breaks it down by part).

    Args:
        num_kernels: frequency groups per layer.
        num_classes: size of the classifier.
        options: further :class:`refimpl.fdconv.FDConv2d` options.

    Returns:
        The network, in training mode, on the CPU in float32.
    """
    from torchvision.models import resnet50  # only needed here

    from ._validation import check_positive_int
    from .fdconv import FDConv2d, fdconv_placement

    check_positive_int(num_kernels, "num_kernels", owner="fdconv_resnet50")
    check_positive_int(num_classes, "num_classes", owner="fdconv_resnet50")

    def factory(conv: nn.Conv2d) -> nn.Module:
        return FDConv2d.from_conv2d(
            conv, preserve=False, num_kernels=num_kernels, **options
        )

    def predicate(name: str, conv: nn.Conv2d) -> bool:
        return is_bottleneck_conv(name, conv) and fdconv_placement(name, conv)

    return convert_conv2d(
        resnet50(weights=None, num_classes=num_classes), factory, predicate
    )
