"""Networks with dynamic convolutions: converting ``nn.Conv2d`` layers, paper networks.

:func:`convert_conv2d` swaps the convolutions of any model for another operator,
in place and under the same names. The builders use it to rebuild, from
torchvision's ResNets (He, Zhang, Ren, Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016, arXiv:1512.03385) and MobileNetV2 (Sandler et al.,
"MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
arXiv:1801.04381), every network whose parameter count the book quotes, so that
the count can be checked against the published one:

* CondConv (chapter 2): :func:`condconv_resnet`, :func:`condconv_mobilenet_v2`;
* DY-CNN's dynamic convolution (chapter 3): :func:`dynamic_conv_resnet`,
  :func:`dynamic_conv_mobilenet_v2`;
* ODConv (chapter 4): :func:`paper_resnet50`, :func:`odconv_resnet`,
  :func:`odconv_mobilenet_v2`;
* DDF (chapter 5): :func:`ddf_resnet`; DCNv2 (chapter 6): :func:`dcnv2_resnet50`;
  FDConv (chapter 7): :func:`fdconv_resnet50`.

:data:`PUBLISHED_COUNTS` lists the published counts with their sources and the
recipe that reproduces each; :func:`reproduce_published_counts` builds every network
(on the ``meta`` device: no memory, a few seconds in all) and sets its count beside
the published one (chapter 8's table). Two networks need layers of their own, defined
here: one routing per block for CondConv (:class:`RoutedBlock`,
:class:`SharedRoutingCondConv2d`, :class:`CondConvLinear`) and BatchNorm in the
attention of the dynamic convolution (:class:`DynamicConv2dBN`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._conv import check_convertible, init_like_conv2d, spread_kernel
from ._validation import check_bool, check_positive_int
from .condconv import CondConv2d
from .deform import DeformConv2d
from .dynamic_conv import DynamicConv2d, KernelAttention
from .odconv import ODConv2d

__all__ = [
    "build_published",
    "condconv_mobilenet_v2",
    "condconv_resnet",
    "CondConvLinear",
    "dcnv2_resnet50",
    "dynamic_conv_mobilenet_v2",
    "dynamic_conv_resnet",
    "DynamicConv2dBN",
    "is_basic_block_conv",
    "is_mobilenet_v2_stem",
    "is_resnet_stem",
    "odconv_mobilenet_v2",
    "odconv_resnet",
    "PUBLISHED_COUNTS",
    "published_parameters",
    "PublishedCount",
    "reproduce_published_counts",
    "ReproducedCount",
    "RoutedBlock",
    "SharedRoutingCondConv2d",
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
#: ImageNet (README of OSVAI/ODConv, table "ResNet50"; the paper's totals,
#: read second-hand, agree). Precision: two decimals.
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
    check_positive_int(num_kernels, "num_kernels", owner="paper_resnet50")
    check_positive_int(num_classes, "num_classes", owner="paper_resnet50")
    return odconv_resnet(
        50,
        num_kernels,
        reduction=reduction,
        min_hidden=min_hidden,
        attention_norm=attention_norm,
        num_classes=num_classes,
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


# --- shared helpers of the builders ---------------------------------------------------

_RESNET_DEPTHS = (18, 34, 50, 101)
_BASIC_BLOCK_CONV = re.compile(r"layer[1-4]\.\d+\.conv[12]")


def _check_depth(depth: object, allowed: tuple[int, ...], owner: str) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth not in allowed:
        names = ", ".join(str(d) for d in allowed[:-1]) + f" or {allowed[-1]}"
        raise ValueError(f"{owner} expected depth {names}, got {depth!r}")
    return depth


def _check_norm(attention_norm: object, owner: str) -> str | None:
    if attention_norm not in ("batch", None):
        raise ValueError(
            f"{owner} expected attention_norm 'batch' or None, got {attention_norm!r}"
        )
    return attention_norm


def _torchvision_resnet(depth: int, num_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, f"resnet{depth}")(
        weights=None, num_classes=num_classes
    )


def _torchvision_mobilenet_v2(width_mult: float, num_classes: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)


def _resnet_blocks(model: nn.Module) -> list[tuple[nn.Sequential, int]]:
    """``(stage, index)`` of every residual block, in order."""
    return [
        (stage, i)
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
        for i in range(len(stage))
    ]


def is_resnet_stem(name: str, conv: nn.Conv2d) -> bool:
    """Whether ``name`` is ``conv1``, the 7x7 stem convolution of a torchvision
    ResNet (``features.0.0``, the first 3x3, for MobileNetV2 is
    :func:`is_mobilenet_v2_stem`): the layer DY-CNN and ODConv keep static."""
    return name == "conv1"


def is_mobilenet_v2_stem(name: str, conv: nn.Conv2d) -> bool:
    """Whether ``name`` is ``features.0.0``, the first (3x3, stride 2) convolution
    of torchvision's MobileNetV2, the one layer the dynamic MobileNetV2s keep
    static."""
    return name == "features.0.0"


# --- CondConv: one routing per block, a CondConv classifier (chapter 2) ---------------


class SharedRoutingCondConv2d(CondConv2d):
    """A :class:`refimpl.CondConv2d` without routing of its own: its block routes.

    The official CondConv code (tensorflow/tpu, ``efficientnet_model.py``) computes
    one routing vector per block, from the block input, and every CondConv of the
    block uses it; so does the MobileNetV2 port (d-li14/condconv.pytorch,
    ``cond_mobilenetv2.py``). The layer is :class:`refimpl.CondConv2d` (same
    arguments, experts, initialisation and ``forward(x, routing)``) without
    ``routing_fc``: ``forward`` must be given the ``Tensor[N, E]`` routing
    computed by the block (:class:`RoutedBlock`). This removes ``C_in * E + E``
    parameters per layer, which is what makes the "CondConv (8x)" counts
    (chapter 2, chapter 8).

    ``from_conv2d(conv, preserve=True)`` sets the experts to ``2 W / E`` plus
    zero-sum perturbations, as :class:`refimpl.CondConv2d` does; the block keeps the
    function when its routing layer is zero (every weight ``sigmoid(0) = 1/2``), which
    :class:`RoutedBlock` does with ``preserve=True``.
    """

    def __init__(self, *conv_args, **conv_kwargs) -> None:
        super().__init__(*conv_args, **conv_kwargs)
        del self.routing_fc

    def reset_parameters(self) -> None:
        """Initialise every expert like an ``nn.Conv2d`` (there is no routing)."""
        init_like_conv2d(self.weight, self.bias)

    def _dynamic(self, x: Tensor):
        raise ValueError(
            f"{type(self).__name__} expected a routing computed by its block "
            f"(forward(x, routing)), got none: the layer has no routing of its own"
        )

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Experts ``2 W / E`` plus zero-sum perturbations: with the block's routing
        at ``1/2`` for every expert, the mixed kernel is ``W``."""
        scale = 0.5 * self.num_kernels
        self.weight.copy_(spread_kernel(weight, self.weight, scale))
        if self.bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype).expand_as(self.bias) / scale)

    def _official_names(self):
        """timm's ``CondConv2d`` (``weight [E, C_out*C_in/g*kH*kW]``, ``bias
        [E, C_out]``); its routing belongs to the block, as here."""
        names = {"weight": ("weight", (self.num_kernels, self.weight[0].numel()))}
        if self.bias is not None:
            names["bias"] = ("bias", (self.num_kernels, self.out_channels))
        return names


def _run_routed(module: nn.Module, x: Tensor, routing: Tensor) -> Tensor:
    """``module(x)``, giving ``routing`` to every :class:`SharedRoutingCondConv2d`
    met while walking nested ``nn.Sequential`` containers."""
    if isinstance(module, SharedRoutingCondConv2d):
        return module(x, routing)
    if isinstance(module, nn.Sequential):
        for child in module:
            x = _run_routed(child, x, routing)
        return x
    return module(x)


class RoutedBlock(nn.Module):
    """A residual block whose CondConv layers share one routing vector.

    Built from a torchvision ``BasicBlock``, ``Bottleneck`` (ResNet) or
    ``InvertedResidual`` (MobileNetV2) whose convolutions have been replaced by
    :class:`SharedRoutingCondConv2d`; the block's sub-modules keep their names
    (``conv1``, ``bn1``, ..., ``downsample``; ``conv``), so the state-dict keys are
    torchvision's plus ``routing_fc``. The block computes

    ``alpha = sigmoid(routing_fc(GAP(x)))``, ``routing_fc = Linear(C_in, E)`` with
    bias,

    from its input ``x`` and gives ``alpha`` to each of its CondConv layers, then
    computes what the torchvision block computes (BN and activations after each
    convolution, the residual sum). One routing per block is the official code's
    (tensorflow/tpu, ``efficientnet_model.py``) and the MobileNetV2 port's
    (d-li14/condconv.pytorch); chapter 2.

    Args:
        block: the torchvision block, its convolutions already converted.
        num_kernels: ``E``, the experts of the block's layers.
        preserve: zero the routing layer (every ``alpha_e = 1/2``), so that a block
            converted with ``SharedRoutingCondConv2d.from_conv2d(conv,
            preserve=True)`` computes the original block; ``False`` initialises it
            like :class:`refimpl.CondConv2d`'s routing (Glorot-uniform weight, zero
            bias).
    """

    def __init__(self, block: nn.Module, num_kernels: int, *, preserve: bool) -> None:
        super().__init__()
        names = dict(block.named_children())
        if "conv" in names and hasattr(block, "use_res_connect"):
            self.kind = "inverted_residual"
            self.use_res_connect = bool(block.use_res_connect)
            first = next(
                m
                for m in block.conv.modules()
                if isinstance(m, (nn.Conv2d, CondConv2d))
            )
        elif "conv1" in names and "conv2" in names:
            self.kind = "bottleneck" if "conv3" in names else "basic"
            first = block.conv1
        else:
            raise TypeError(
                f"RoutedBlock expected a torchvision BasicBlock, Bottleneck or "
                f"InvertedResidual, got {type(block).__name__}"
            )
        for name, child in names.items():
            self.add_module(name, child)
        if self.kind != "inverted_residual" and "downsample" not in names:
            self.downsample = None
        weight = first.weight
        self.routing_fc = nn.Linear(
            first.in_channels, num_kernels, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            if preserve:
                nn.init.zeros_(self.routing_fc.weight)
            else:
                nn.init.xavier_uniform_(self.routing_fc.weight)
            nn.init.zeros_(self.routing_fc.bias)

    def routing(self, x: Tensor) -> Tensor:
        """``Tensor[N, E]``: ``sigmoid(routing_fc(GAP(x)))`` for the block input."""
        return torch.sigmoid(self.routing_fc(x.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """The torchvision block's computation, with the shared routing."""
        routing = self.routing(x)
        if self.kind == "inverted_residual":
            out = _run_routed(self.conv, x, routing)
            return x + out if self.use_res_connect else out
        out = self.relu(self.bn1(self.conv1(x, routing)))
        out = self.bn2(self.conv2(out, routing))
        if self.kind == "bottleneck":
            out = self.bn3(self.conv3(self.relu(out), routing))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CondConvLinear(CondConv2d):
    """A fully connected layer with ``E`` experts and its own routing.

    The classifier of the "CondConv (8x)" ResNets and MobileNetV2: a 1x1
    :class:`refimpl.CondConv2d` applied to the pooled features, as the
    MobileNetV2 port builds it (d-li14/condconv.pytorch, ``cond_mobilenetv2.py``:
    ``CondConv2d(1280, num_classes, 1, bias=False, num_experts=8)`` with its own
    routing ``Linear(1280, 8)``). For ``x: Tensor[N, C]``

    ``alpha = sigmoid(routing_fc(x))``, ``y = (sum_e alpha_e W_e) x (+ sum_e alpha_e
    b_e)``,

    with ``W_e: Tensor[out_features, in_features]`` initialised like ``nn.Linear``'s
    weight (Kaiming-uniform, ``a = sqrt(5)``, the same as a 1x1 ``nn.Conv2d``).
    ``bias=False`` is the port's (and what reproduces the published counts);
    ``bias=True`` gives each expert a bias.

    Attributes:
        weight: ``Tensor[E, out_features, in_features, 1, 1]``.
        bias: ``Tensor[E, out_features]`` or ``None``.
        routing_fc: ``nn.Linear(in_features, E)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        num_kernels: int = 8,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            1,
            bias=bias,
            num_kernels=num_kernels,
            device=device,
            dtype=dtype,
        )

    @property
    def in_features(self) -> int:
        """Size of each input sample (``nn.Linear``'s name)."""
        return self.in_channels

    @property
    def out_features(self) -> int:
        """Size of each output sample (``nn.Linear``'s name)."""
        return self.out_channels

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        preserve: bool = True,
        bias: bool | None = None,
        num_kernels: int = 8,
    ) -> CondConvLinear:
        """The CondConv classifier with the sizes of ``linear``.

        ``bias=None`` keeps ``linear``'s bias flag. With ``preserve=True`` the
        routing is zero and the experts ``2 W / E`` plus zero-sum perturbations, so
        the layer computes ``linear`` (which needs ``bias`` to match ``linear``'s).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
            ValueError: ``preserve=True`` with a bias flag other than ``linear``'s.
        """
        owner = f"{cls.__name__}.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"{owner} expected an nn.Linear, got {type(linear).__name__}"
            )
        check_bool(preserve, "preserve", owner=owner)
        has_bias = linear.bias is not None
        bias = has_bias if bias is None else check_bool(bias, "bias", owner=owner)
        if preserve and bias != has_bias:
            raise ValueError(
                f"{owner} cannot preserve an nn.Linear with bias={has_bias} as a "
                f"layer with bias={bias}: use preserve=False or the same bias flag"
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias,
            num_kernels=num_kernels,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        if preserve:
            with torch.no_grad():
                layer._preserve(
                    linear.weight.detach()[:, :, None, None],
                    None if linear.bias is None else linear.bias.detach(),
                )
        return layer.train(linear.training)

    def forward(self, input: Tensor, routing: Tensor | None = None) -> Tensor:
        """``Tensor[N, in_features] -> Tensor[N, out_features]``.

        Args:
            input: ``Tensor[N, in_features]``.
            routing: optional ``Tensor[N, E]`` computed outside (``None``: the
                layer's own routing).

        Raises:
            TypeError: a non-tensor input.
            ValueError: an input that is not 2-D, or without ``in_features``
                features.
        """
        owner = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{owner} expected input to be a Tensor, got {type(input).__name__}"
            )
        if input.dim() != 2:
            raise ValueError(
                f"{owner} expected input Tensor[N, in_features], got shape "
                f"{tuple(input.shape)}"
            )
        return super().forward(input[:, :, None, None], routing)[:, :, 0, 0]

    def extra_repr(self) -> str:
        """``nn.Linear``'s text and the number of experts."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, num_kernels={self.num_kernels}"
        )


def _condconv_blocks(
    model: nn.Module,
    targets: list[tuple[nn.Sequential, int]],
    num_kernels: int,
    shared_routing: bool,
    preserve: bool,
) -> None:
    """Convert every convolution of the ``(container, index)`` blocks (not the
    ResNet ``downsample`` shortcut) to CondConv, with one routing per block or
    one per layer."""
    cls = SharedRoutingCondConv2d if shared_routing else CondConv2d

    def factory(conv: nn.Conv2d) -> nn.Module:
        return cls.from_conv2d(conv, preserve=preserve, num_kernels=num_kernels)

    def predicate(name: str, conv: nn.Conv2d) -> bool:
        return not name.startswith("downsample.")

    for container, index in targets:
        block = convert_conv2d(container[index], factory, predicate)
        if shared_routing:
            block = RoutedBlock(block, num_kernels, preserve=preserve).train(
                block.training
            )
        container[index] = block


def _check_condconv_options(
    owner,
    num_kernels,
    num_classes,
    shared_routing,
    classifier,
    classifier_bias,
    preserve,
) -> None:
    check_positive_int(num_kernels, "num_kernels", owner=owner)
    check_positive_int(num_classes, "num_classes", owner=owner)
    for flag, name in (
        (shared_routing, "shared_routing"),
        (classifier, "classifier"),
        (classifier_bias, "classifier_bias"),
        (preserve, "preserve"),
    ):
        check_bool(flag, name, owner=owner)
    if preserve and classifier and not classifier_bias:
        raise ValueError(
            f"{owner} cannot preserve torchvision's classifier (it has a bias) "
            f"with classifier_bias=False: pass classifier_bias=True or preserve=False"
        )


def condconv_resnet(
    depth: int = 50,
    num_kernels: int = 8,
    *,
    shared_routing: bool = True,
    classifier: bool = True,
    classifier_bias: bool = False,
    num_classes: int = 1000,
    preserve: bool = False,
) -> nn.Module:
    """The "CondConv (8x)" ResNet-18 / ResNet-50 of later papers, from torchvision.

    CondConv: Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized
    Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971
    (chapter 2). The paper puts CondConv in the final blocks of ResNet-50 and in
    the classifier; its code covers EfficientNet only, so the placement is the
    recipe that reproduces the counts the ODConv paper (ICLR 2022) prints for
    "CondConv (8x)", 129.86M (ResNet-50), and the KernelWarehouse paper (ICML
    2024) for ResNet-18, 81.35M (both second-hand, :data:`PUBLISHED_COUNTS`):

    * every convolution of the final 3 residual blocks (ResNet-50: ``layer4.0-2``;
      ResNet-18: ``layer3.1``, ``layer4.0``, ``layer4.1``) has ``num_kernels``
      experts; the ``downsample`` shortcut stays static;
    * one routing per block (:class:`RoutedBlock`): GAP of the block input,
      ``Linear(C_in, E)`` with bias, sigmoid, shared by the block's convolutions,
      as in the official EfficientNet code;
    * the classifier ``fc`` becomes an ``E``-expert :class:`CondConvLinear` with
      its own routing and, like the MobileNetV2 port (d-li14/condconv.pytorch), no
      bias.

    Deviations and variants: ``shared_routing=False`` gives every convolution its
    own routing (a plain :class:`refimpl.CondConv2d`; ResNet-50: 129.89M, which
    matches no published figure); ``classifier_bias=True`` gives each classifier
    expert a bias (+8000 parameters: 129.87M for ResNet-50, so the published
    figure was counted without it). The experts are initialised like
    ``nn.Conv2d`` (the official code's per-expert initialiser).

    Args:
        depth: 18 or 50.
        num_kernels: experts per layer (8 for "CondConv (8x)").
        shared_routing: one routing per block (``True``) or per layer.
        classifier: replace the classifier by a :class:`CondConvLinear`
            (``False``: keep torchvision's; the "+90.0M" the FDConv README gives
            for the ResNet-50 detection backbone, which has no classifier).
        classifier_bias: give the classifier's experts a bias.
        num_classes: size of the classifier.
        preserve: convert function-preservingly
            (:meth:`refimpl.CondConv2d.from_conv2d`;
            the converted network computes torchvision's freshly initialised one);
            with the CondConv classifier it needs ``classifier_bias=True``, since
            torchvision's ``fc`` has a bias.
            ``False`` (the default) trains from scratch, as the papers do.

    Returns:
        The network, in training mode, on the current default device (build it
        under ``with torch.device("meta"):`` to count parameters for free).

    Raises:
        ValueError: a depth other than 18 or 50, ``num_kernels`` or
            ``num_classes`` below 1, ``preserve=True`` with the CondConv
            classifier and without ``classifier_bias``.
    """
    owner = "condconv_resnet"
    depth = _check_depth(depth, (18, 50), owner)
    _check_condconv_options(
        owner,
        num_kernels,
        num_classes,
        shared_routing,
        classifier,
        classifier_bias,
        preserve,
    )
    model = _torchvision_resnet(depth, num_classes)
    targets = _resnet_blocks(model)[-3:]
    _condconv_blocks(model, targets, num_kernels, shared_routing, preserve)
    if classifier:
        model.fc = CondConvLinear.from_linear(
            model.fc, preserve=preserve, bias=classifier_bias, num_kernels=num_kernels
        )
    return model


def condconv_mobilenet_v2(
    num_kernels: int = 8,
    *,
    shared_routing: bool = True,
    classifier: bool = True,
    classifier_bias: bool = False,
    width_mult: float = 1.0,
    num_classes: int = 1000,
    preserve: bool = False,
) -> nn.Module:
    """The "CondConv (8x)" MobileNetV2 of later papers, from torchvision.

    CondConv (Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized
    Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971;
    chapter 2) in the placement of the MobileNetV2 port (d-li14/condconv.pytorch,
    ``cond_mobilenetv2.py``), which reproduces the 22.88M the ODConv paper
    (ICLR 2022) prints for MobileNetV2 1.0 with "CondConv (8x)" (second-hand,
    :data:`PUBLISHED_COUNTS`):

    * expand, depthwise and project convolutions of the final 6 inverted residual
      blocks (``features.12`` to ``features.17``: 18 layers, all six blocks
      expand) are CondConv with one routing per block (:class:`RoutedBlock`);
    * the first convolution, the other blocks and the final 1x1 convolution to
      1280 channels (``features.18``) stay static;
    * the classifier ``classifier.1`` becomes a bias-free :class:`CondConvLinear`
      with its own routing (the dropout before it stays).

    Variants: ``shared_routing=False`` (22.95M), ``classifier_bias=True``
    (22.89M): neither matches the published figure.

    Args:
        num_kernels: experts per layer.
        shared_routing, classifier, classifier_bias, num_classes, preserve: as
            in :func:`condconv_resnet`.
        width_mult: torchvision's width multiplier (the published count is 1.0).

    Returns:
        The network, in training mode.

    Raises:
        ValueError: bad ``num_kernels`` / ``num_classes``, ``preserve=True``
            with the CondConv classifier and without ``classifier_bias``.
    """
    owner = "condconv_mobilenet_v2"
    _check_condconv_options(
        owner,
        num_kernels,
        num_classes,
        shared_routing,
        classifier,
        classifier_bias,
        preserve,
    )
    model = _torchvision_mobilenet_v2(width_mult, num_classes)
    targets = [(model.features, i) for i in range(12, 18)]
    _condconv_blocks(model, targets, num_kernels, shared_routing, preserve)
    if classifier:
        model.classifier[1] = CondConvLinear.from_linear(
            model.classifier[1],
            preserve=preserve,
            bias=classifier_bias,
            num_kernels=num_kernels,
        )
    return model


# --- DY-CNN: dynamic convolution in every layer but the stem (chapter 3) --------------


class DynamicConv2dBN(DynamicConv2d):
    """:class:`refimpl.DynamicConv2d` with BatchNorm in its attention branch.

    ``pi(x) = softmax(fc2(relu(BN(fc1(GAP(x))))) / tau)``: the attention of
    DY-CNN (Chen et al., "Dynamic Convolution: Attention over Convolution
    Kernels", CVPR 2020, arXiv:1912.03458; chapter 3) with a ``BatchNorm1d`` of
    the hidden width between the squeeze and the ReLU, as ODConv's and
    KernelWarehouse's official attentions have. DY-CNN has no official code and the
    book's layer has no BatchNorm; this variant exists because the "DY-Conv (4x)"
    ResNet-50 count later papers print (100.88M) is reproduced with it (100.87M
    without: ``2 * hidden`` parameters per layer). Everything else is
    :class:`refimpl.DynamicConv2d`'s (arguments, kernels, initialisation,
    temperature, ``from_conv2d``); the BatchNorm starts as the identity affine map
    (weight 1, bias 0).

    As with any BatchNorm, a sample's attention depends on the rest of its batch
    in training mode, and a batch of one sample cannot train.

    Raises:
        ValueError: a batch of one sample in training mode.
    """

    def __init__(self, *conv_args, **conv_kwargs) -> None:
        super().__init__(*conv_args, **conv_kwargs)
        self.bn = nn.BatchNorm1d(self.hidden, **self.factory_kwargs)

    def reset_parameters(self) -> None:
        """:class:`refimpl.DynamicConv2d`'s initialisation; BatchNorm weight 1,
        bias 0, fresh running statistics."""
        super().reset_parameters()
        if getattr(self, "bn", None) is not None:
            self.bn.reset_parameters()

    def _dynamic(self, x: Tensor) -> KernelAttention:
        if self.training and x.shape[0] == 1:
            raise ValueError(
                f"{type(self).__name__} cannot train on a batch of 1 sample: the "
                f"attention BatchNorm needs at least 2 samples. Use a batch of 2 or "
                f"more, call .eval(), or use refimpl.DynamicConv2d (no BatchNorm)"
            )
        hidden = F.relu(self.bn(self.fc1(x.mean(dim=(2, 3)))))
        logits = self.fc2(hidden)
        return KernelAttention(torch.softmax(logits / self.temperature, dim=1))

    def _official_names(self):
        raise ValueError(
            f"{type(self).__name__}.load_official_state_dict has no official "
            f"checkpoint to load: the PyTorch port has no attention BatchNorm; use "
            f"refimpl.DynamicConv2d"
        )


def _dynamic_factory(
    num_kernels: int,
    attention_norm: str | None,
    preserve: bool,
    options: dict,
) -> Callable[[nn.Conv2d], nn.Module]:
    cls = DynamicConv2dBN if attention_norm == "batch" else DynamicConv2d

    def factory(conv: nn.Conv2d) -> nn.Module:
        return cls.from_conv2d(
            conv, preserve=preserve, num_kernels=num_kernels, **options
        )

    return factory


def dynamic_conv_resnet(
    depth: int = 50,
    num_kernels: int = 4,
    *,
    attention_norm: str | None = "batch",
    num_classes: int = 1000,
    preserve: bool = False,
    **options,
) -> nn.Module:
    """The "DY-Conv (4x)" ResNet-18 / ResNet-50 of later papers, from torchvision.

    Dynamic convolution (Chen et al., "Dynamic Convolution: Attention over
    Convolution Kernels", CVPR 2020, arXiv:1912.03458; chapter 3) in every
    convolution except the stem, the paper's placement (second-hand), which
    reproduces the counts later papers print for "DY-Conv (4x)": ResNet-50
    100.88M (ODConv paper, ICLR 2022, and KernelWarehouse paper, ICML 2024) and
    ResNet-18 45.47M (KernelWarehouse paper), both second-hand
    (:data:`PUBLISHED_COUNTS`). The recipe:

    * every ``nn.Conv2d`` but ``conv1`` (:func:`is_resnet_stem`), the 1x1
      ``downsample`` shortcuts included, has ``num_kernels`` kernels (ResNet-50: 52
      layers; ResNet-18: 19); the classifier stays static;
    * attention ``GAP -> Linear(C_in, floor(C_in / 4), no bias) [-> BatchNorm] ->
      ReLU -> Linear(-> K, bias) -> softmax(/ tau)``.

    With ``attention_norm="batch"`` (:class:`DynamicConv2dBN`, the default)
    ResNet-50 has 100.88M parameters, the published figure; with ``None``
    (:class:`refimpl.DynamicConv2d`, the book's layer) 100.87M. ResNet-18 has
    45.47M either way. No official DY-CNN code exists, so which one the authors
    counted is unknown; the BatchNorm is the choice that reproduces the ResNet-50
    figure, while the MobileNetV2 figure fits no BatchNorm
    (:func:`dynamic_conv_mobilenet_v2`).

    Args:
        depth: 18 or 50.
        num_kernels: ``K``, kernels per layer (4 for "DY-Conv (4x)").
        attention_norm: ``"batch"`` or ``None``.
        num_classes: size of the classifier.
        preserve: convert function-preservingly (``from_conv2d(preserve=True)``).
        options: further :class:`refimpl.DynamicConv2d` options (``reduction``,
            ``temperature``, ...).

    Returns:
        The network, in training mode.

    Raises:
        ValueError: a depth other than 18 or 50, a bad ``attention_norm``,
            ``num_kernels`` or ``num_classes``.
    """
    owner = "dynamic_conv_resnet"
    depth = _check_depth(depth, (18, 50), owner)
    check_positive_int(num_kernels, "num_kernels", owner=owner)
    check_positive_int(num_classes, "num_classes", owner=owner)
    attention_norm = _check_norm(attention_norm, owner)
    factory = _dynamic_factory(num_kernels, attention_norm, preserve, options)
    return convert_conv2d(
        _torchvision_resnet(depth, num_classes),
        factory,
        lambda name, conv: not is_resnet_stem(name, conv),
    )


def dynamic_conv_mobilenet_v2(
    num_kernels: int = 4,
    *,
    attention_norm: str | None = None,
    width_mult: float = 1.0,
    num_classes: int = 1000,
    preserve: bool = False,
    **options,
) -> nn.Module:
    """The "DY-Conv (4x)" MobileNetV2 of later papers, from torchvision.

    Dynamic convolution (Chen et al., "Dynamic Convolution: Attention over
    Convolution Kernels", CVPR 2020, arXiv:1912.03458; chapter 3) in every
    convolution except the first (``features.0.0``,
    :func:`is_mobilenet_v2_stem`): expand, depthwise and project of all 17
    inverted residual blocks and the final 1x1 convolution to 1280 channels (51
    layers); the classifier stays static. Attention as in
    :func:`dynamic_conv_resnet` (hidden width ``floor(C_in / 4)``, 4 for the
    16-channel inputs).

    Published: 12.40M for MobileNetV2 1.0 (ODConv paper, ICLR 2022, second-hand).
    The default ``attention_norm=None`` reproduces it; with BatchNorm
    (``"batch"``) the network has 12.41M. This is the opposite of the ResNet-50
    figure, which needs the BatchNorm: the two published counts imply different
    conventions, and the default of each builder is the one that reproduces its
    figure.

    Args:
        num_kernels, attention_norm, num_classes, preserve, options: as in
            :func:`dynamic_conv_resnet`.
        width_mult: torchvision's width multiplier (the published count is 1.0).

    Returns:
        The network, in training mode.
    """
    owner = "dynamic_conv_mobilenet_v2"
    check_positive_int(num_kernels, "num_kernels", owner=owner)
    check_positive_int(num_classes, "num_classes", owner=owner)
    attention_norm = _check_norm(attention_norm, owner)
    factory = _dynamic_factory(num_kernels, attention_norm, preserve, options)
    return convert_conv2d(
        _torchvision_mobilenet_v2(width_mult, num_classes),
        factory,
        lambda name, conv: not is_mobilenet_v2_stem(name, conv),
    )


# --- ODConv (chapter 4) -------------------------------------------------------------


def is_basic_block_conv(name: str, conv: nn.Conv2d) -> bool:
    """Whether ``name`` is ``conv1`` or ``conv2``, a 3x3 convolution of a
    torchvision ResNet ``BasicBlock`` (ResNet-18/34): the layers the official
    ``od_resnet18`` builds as ODConv (OSVAI/ODConv, ``models/od_resnet.py``)."""
    return _BASIC_BLOCK_CONV.fullmatch(name) is not None


def _odconv_factory(num_kernels, reduction, min_hidden, attention_norm, preserve):
    def factory(conv: nn.Conv2d) -> nn.Module:
        return ODConv2d.from_conv2d(
            conv,
            preserve=preserve,
            num_kernels=num_kernels,
            reduction=reduction,
            min_hidden=min_hidden,
            attention_norm=attention_norm,
        )

    return factory


def odconv_resnet(
    depth: int = 50,
    num_kernels: int = 1,
    *,
    reduction: float = 0.0625,
    min_hidden: int = 16,
    attention_norm: str | None = "batch",
    num_classes: int = 1000,
    preserve: bool = False,
) -> nn.Module:
    """The official ODConv ResNets (``od_resnet{18,34,50,101}``), from torchvision.

    ODConv: Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022,
    arXiv:2209.07947 (chapter 4). The placement is the official code's
    (OSVAI/ODConv, ``models/od_resnet.py``): both 3x3 convolutions of every
    ``BasicBlock`` (ResNet-18/34, :func:`is_basic_block_conv`: 16 layers in
    ResNet-18) or the three convolutions of every ``Bottleneck`` (ResNet-50/101,
    :func:`is_bottleneck_conv`: 48 layers in ResNet-50; the network of
    :func:`paper_resnet50`); the stem, the ``downsample`` shortcuts and the
    classifier stay static. The counts equal the README's (OSVAI/ODConv):
    ResNet-18 11.94M (1x) / 44.90M (4x), ResNet-50 28.64M / 90.67M, ResNet-101
    50.82M (1x) / 90.44M (2x).

    Deviations from the official network (none changes the count): no dropout
    before the classifier, torchvision's classifier initialisation.

    Args:
        depth: 18, 34, 50 or 101.
        num_kernels: kernels per layer ("1x", "4x").
        reduction, min_hidden, attention_norm: see :class:`refimpl.ODConv2d`.
        num_classes: size of the classifier.
        preserve: convert function-preservingly (``from_conv2d(preserve=True)``).

    Returns:
        The network, in training mode.

    Raises:
        ValueError: a depth not in (18, 34, 50, 101), bad ``num_kernels`` or
            ``num_classes``.
    """
    owner = "odconv_resnet"
    depth = _check_depth(depth, _RESNET_DEPTHS, owner)
    check_positive_int(num_kernels, "num_kernels", owner=owner)
    check_positive_int(num_classes, "num_classes", owner=owner)
    factory = _odconv_factory(
        num_kernels, reduction, min_hidden, attention_norm, preserve
    )
    predicate = is_basic_block_conv if depth in (18, 34) else is_bottleneck_conv
    return convert_conv2d(_torchvision_resnet(depth, num_classes), factory, predicate)


def odconv_mobilenet_v2(
    num_kernels: int = 1,
    *,
    width_mult: float = 1.0,
    reduction: float = 0.0625,
    min_hidden: int = 16,
    attention_norm: str | None = "batch",
    num_classes: int = 1000,
    preserve: bool = False,
) -> nn.Module:
    """The official ODConv MobileNetV2 (``od_mobilenetv2_{050,075,100}``).

    ODConv (Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022,
    arXiv:2209.07947; chapter 4) in the official placement (OSVAI/ODConv,
    ``models/od_mobilenetv2.py``): expand, depthwise and project convolutions
    of every inverted residual block and the final 1x1 convolution to 1280
    channels (51 layers); the first convolution
    (:func:`is_mobilenet_v2_stem`) and the classifier stay static. The official
    network is torchvision's MobileNetV2 layer for layer, so it is built from
    ``torchvision.models.mobilenet_v2``. Counts equal the README's
    (OSVAI/ODConv): 1.0x 4.94M (1x) / 11.51M (4x); 0.75x 3.51M / 7.50M; 0.5x
    2.43M / 4.44M.

    Deviations (none changes the count): torchvision's initialisation of the
    static layers.

    Args:
        num_kernels: kernels per layer.
        width_mult: 1.0, 0.75 or 0.5 in the README (any value torchvision takes).
        reduction, min_hidden, attention_norm, num_classes, preserve: as in
            :func:`odconv_resnet`.

    Returns:
        The network, in training mode.
    """
    owner = "odconv_mobilenet_v2"
    check_positive_int(num_kernels, "num_kernels", owner=owner)
    check_positive_int(num_classes, "num_classes", owner=owner)
    factory = _odconv_factory(
        num_kernels, reduction, min_hidden, attention_norm, preserve
    )
    return convert_conv2d(
        _torchvision_mobilenet_v2(width_mult, num_classes),
        factory,
        lambda name, conv: not is_mobilenet_v2_stem(name, conv),
    )


# --- DCNv2 (chapter 6) --------------------------------------------------------------

_DCN_TARGET = re.compile(r"layer([1-4])(?:\.(\d+))?")


def dcnv2_resnet50(
    layers: tuple[str, ...] = ("layer2", "layer3", "layer4"),
    *,
    offset_groups: int = 1,
    mask_scale: float = 2.0,
    num_classes: int = 1000,
    preserve: bool = False,
) -> nn.Module:
    """ResNet-50 with modulated deformable convolution (DCNv2) in its 3x3 layers.

    Zhu, Hu, Lin, Dai, "Deformable ConvNets v2: More Deformable, Better Results",
    CVPR 2019, arXiv:1811.11168 (chapter 6). The paper puts DCNv2 in all 3x3
    convolutions of stages conv3-conv5 of ResNet-50 and calls them "12 layers"
    (second-hand); torchvision's ResNet-50 has 4 + 6 + 3 = 13 such layers (the
    ``conv2`` of every block of ``layer2`` to ``layer4``), and mmdetection's
    ``stage_with_dcn=(False, True, True, True)`` converts the same 13. The
    default converts the 13; ``layers`` chooses others: each item is a stage
    (``"layer3"``: the ``conv2`` of all its blocks) or a block (``"layer3.5"``: its
    ``conv2``), so twelve layers are e.g. the default minus one block.

    Each selected layer becomes :class:`refimpl.DeformConv2d` with
    ``modulated=True``: a zero-initialised offset convolution (same kernel,
    stride, padding, dilation; ``3 * G * 9`` output channels with bias) gives the
    offsets and the mask, ``mask_scale * sigmoid`` (2: the official MXNet DCNv2
    example; 1: mmcv and the paper's range). The stride stays on the 3x3
    (torchvision's ResNet v1.5). No author gives a parameter count for this
    network: :data:`PUBLISHED_COUNTS` lists the built one (about +0.87M for the
    13 layers) with no figure beside it.

    Args:
        layers: stages and blocks whose 3x3 convolution becomes DCNv2.
        offset_groups: ``G``, the deformable groups (1 in the paper's ResNet).
        mask_scale: see :class:`refimpl.DeformConv2d`.
        num_classes: size of the classifier.
        preserve: convert function-preservingly (``from_conv2d(preserve=True)``:
            zero offsets and the mask divided out of the copied weight).

    Returns:
        The network, in training mode.

    Raises:
        TypeError: ``layers`` is a string, not a collection of names.
        ValueError: an empty ``layers``, a name that is not ``"layerS"`` or
            ``"layerS.B"`` of ResNet-50, ``num_classes`` below 1.
    """
    owner = "dcnv2_resnet50"
    check_positive_int(num_classes, "num_classes", owner=owner)
    if isinstance(layers, str) or not hasattr(layers, "__iter__"):
        raise TypeError(
            f"{owner} expected layers to be a collection of names such as "
            f"('layer2', 'layer3.5'), got {layers!r}"
        )
    layers = tuple(layers)
    if not layers:
        raise ValueError(f"{owner} expected at least one stage or block, got none")
    model = _torchvision_resnet(50, num_classes)
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    selected: set[str] = set()
    for item in layers:
        match = _DCN_TARGET.fullmatch(item) if isinstance(item, str) else None
        stage = None if match is None else stages[int(match.group(1)) - 1]
        block = None if match is None or match.group(2) is None else int(match.group(2))
        if stage is None or (block is not None and block >= len(stage)):
            raise ValueError(
                f"{owner} expected stages 'layer1'-'layer4' or blocks such as "
                f"'layer3.5' of ResNet-50, got {item!r}"
            )
        blocks = range(len(stage)) if block is None else (block,)
        selected.update(f"layer{match.group(1)}.{b}.conv2" for b in blocks)

    def factory(conv: nn.Conv2d) -> nn.Module:
        return DeformConv2d.from_conv2d(
            conv,
            preserve=preserve,
            offset_groups=offset_groups,
            modulated=True,
            mask_scale=mask_scale,
        )

    return convert_conv2d(model, factory, lambda name, conv: name in selected)


# --- the published counts, with their provenance (chapter 8) -------------------------

_ODCONV_README = "README of OSVAI/ODConv (ImageNet table)"
_ODCONV_PAPER = (
    "ODConv paper (Li, Zhou, Yao, ICLR 2022), comparison table; second-hand, not "
    "checked against the paper's text"
)
_KW_PAPER = (
    "KernelWarehouse paper (Li, Yao, ICML 2024), comparison table; second-hand, not "
    "checked against the paper's text"
)
_FDCONV_README = "README of Linwei-Chen/FDConv"
_CONDCONV_RECIPE = (
    "8 experts in every conv of the final {blocks} (shortcut static), one routing "
    "per block (GAP, Linear with bias, sigmoid), classifier a bias-free 8-expert "
    "CondConv with its own routing"
)
_DY_RECIPE = (
    "4 kernels in every conv but the stem (shortcuts included), classifier static; "
    "attention Linear(C, floor(C/4), no bias){bn}, ReLU, Linear(4, bias)"
)


@dataclass(frozen=True)
class PublishedCount:
    """One published parameter count, its source and the call that rebuilds it.

    Attributes:
        key: a short unique name (``"condconv8x-resnet50"``), for
            :func:`reproduce_published_counts`.
        method: the method's label as published (``"CondConv (8x)"``).
        network: the network (``"ResNet-50"``; ``"ResNet-50, parameters added"``
            when the figure is an increase over the plain network).
        millions: the figure in millions, at the published precision, or ``None``
            where no author publishes one (DCNv2).
        source: where the figure is printed; "second-hand" marks a figure quoted
            from a later paper's comparison table, not checked in that paper's
            text.
        recipe_note: the placement and options that reproduce it, and its source.
        builder: the function that builds the network (a name in this module, or
            ``"torchvision.models.resnet50"`` style for a plain network).
        arguments: its keyword arguments, as ``(name, value)`` pairs.
        decimals: the published precision (digits after the point, in millions).
        extra: the figure counts the parameters *added* to the plain network of
            the same depth, not the total.
    """

    key: str
    method: str
    network: str
    millions: float | None
    source: str
    recipe_note: str
    builder: str
    arguments: tuple[tuple[str, object], ...] = ()
    decimals: int = 2
    extra: bool = False

    @property
    def builder_call(self) -> str:
        """The call that builds the network, as Python source."""
        args = ", ".join(f"{name}={value!r}" for name, value in self.arguments)
        return f"{self.builder}({args})"


def _row(key, method, network, millions, source, recipe, builder, decimals=2, **kw):
    extra = kw.pop("extra", False)
    return PublishedCount(
        key,
        method,
        network,
        millions,
        source,
        recipe,
        builder,
        tuple(kw.items()),
        decimals,
        extra,
    )


#: Every parameter count the book quotes, with its source and the recipe that
#: reproduces it; :func:`reproduce_published_counts` builds each network and
#: compares. Figures are in millions at the authors' precision (two decimals; one
#: for DDF and FDConv). Figures marked "second-hand" come from later papers'
#: comparison tables and were not checked against the papers' text.
#:
#: :meta hide-value:
PUBLISHED_COUNTS: tuple[PublishedCount, ...] = (
    _row(
        "resnet50",
        "baseline",
        "ResNet-50",
        25.56,
        _ODCONV_README,
        "torchvision's ResNet-50 (v1.5, stride on the 3x3)",
        "torchvision.models.resnet50",
    ),
    _row(
        "resnet18",
        "baseline",
        "ResNet-18",
        11.69,
        _ODCONV_README,
        "torchvision's ResNet-18",
        "torchvision.models.resnet18",
    ),
    _row(
        "resnet101",
        "baseline",
        "ResNet-101",
        44.55,
        _ODCONV_README,
        "torchvision's ResNet-101",
        "torchvision.models.resnet101",
    ),
    *(
        _row(
            "mobilenet_v2" + suffix,
            "baseline",
            f"MobileNetV2 {width}",
            millions,
            _ODCONV_README,
            "torchvision's MobileNetV2",
            "torchvision.models.mobilenet_v2",
            **({} if width == "1.0" else {"width_mult": float(width)}),
        )
        for suffix, width, millions in (
            ("", "1.0", 3.50),
            ("-0.75", "0.75", 2.64),
            ("-0.5", "0.5", 1.97),
        )
    ),
    _row(
        "condconv8x-resnet50",
        "CondConv (8x)",
        "ResNet-50",
        129.86,
        _ODCONV_PAPER,
        _CONDCONV_RECIPE.format(blocks="3 bottlenecks (layer4)")
        + "; recipe derived here by counting, classifier as in "
        "d-li14/condconv.pytorch",
        "condconv_resnet",
        depth=50,
        num_kernels=8,
    ),
    _row(
        "condconv8x-resnet18",
        "CondConv (8x)",
        "ResNet-18",
        81.35,
        _KW_PAPER,
        _CONDCONV_RECIPE.format(blocks="3 basic blocks (layer3.1, layer4)")
        + "; recipe derived here by counting",
        "condconv_resnet",
        depth=18,
        num_kernels=8,
    ),
    _row(
        "condconv8x-mobilenet_v2",
        "CondConv (8x)",
        "MobileNetV2 1.0",
        22.88,
        _ODCONV_PAPER,
        _CONDCONV_RECIPE.format(blocks="6 inverted residual blocks")
        + "; placement of the port d-li14/condconv.pytorch",
        "condconv_mobilenet_v2",
        num_kernels=8,
    ),
    _row(
        "dyconv4x-resnet50",
        "DY-Conv (4x)",
        "ResNet-50",
        100.88,
        _ODCONV_PAPER + "; also the KernelWarehouse paper (second-hand)",
        _DY_RECIPE.format(bn=", BatchNorm")
        + "; recipe derived here by counting: 100.87M without the BatchNorm",
        "dynamic_conv_resnet",
        depth=50,
        num_kernels=4,
        attention_norm="batch",
    ),
    _row(
        "dyconv4x-resnet18",
        "DY-Conv (4x)",
        "ResNet-18",
        45.47,
        _KW_PAPER,
        _DY_RECIPE.format(bn=", BatchNorm")
        + "; recipe derived here by counting: 45.47M with or without the BatchNorm",
        "dynamic_conv_resnet",
        depth=18,
        num_kernels=4,
        attention_norm="batch",
    ),
    _row(
        "dyconv4x-mobilenet_v2",
        "DY-Conv (4x)",
        "MobileNetV2 1.0",
        12.40,
        _ODCONV_PAPER,
        _DY_RECIPE.format(bn="")
        + "; recipe derived here by counting: 12.41M with a BatchNorm",
        "dynamic_conv_mobilenet_v2",
        num_kernels=4,
        attention_norm=None,
    ),
    *(
        _row(
            f"odconv{n}x-{net_key}",
            f"ODConv ({n}x)",
            network,
            millions,
            _ODCONV_README,
            f"{n} kernel(s) in {placement}; official code (OSVAI/ODConv, {file})",
            builder,
            **args,
            num_kernels=n,
        )
        for n, net_key, network, millions, placement, file, builder, args in (
            (
                1,
                "resnet50",
                "ResNet-50",
                28.64,
                "the 48 bottleneck convs",
                "od_resnet.py",
                "odconv_resnet",
                {"depth": 50},
            ),
            (
                4,
                "resnet50",
                "ResNet-50",
                90.67,
                "the 48 bottleneck convs",
                "od_resnet.py",
                "odconv_resnet",
                {"depth": 50},
            ),
            (
                1,
                "resnet18",
                "ResNet-18",
                11.94,
                "the 16 basic-block 3x3 convs",
                "od_resnet.py",
                "odconv_resnet",
                {"depth": 18},
            ),
            (
                4,
                "resnet18",
                "ResNet-18",
                44.90,
                "the 16 basic-block 3x3 convs",
                "od_resnet.py",
                "odconv_resnet",
                {"depth": 18},
            ),
            (
                1,
                "resnet101",
                "ResNet-101",
                50.82,
                "the 99 bottleneck convs",
                "od_resnet.py",
                "odconv_resnet",
                {"depth": 101},
            ),
            (
                2,
                "resnet101",
                "ResNet-101",
                90.44,
                "the 99 bottleneck convs",
                "od_resnet.py",
                "odconv_resnet",
                {"depth": 101},
            ),
            (
                1,
                "mobilenet_v2",
                "MobileNetV2 1.0",
                4.94,
                "the 51 convs after the first",
                "od_mobilenetv2.py",
                "odconv_mobilenet_v2",
                {},
            ),
            (
                4,
                "mobilenet_v2",
                "MobileNetV2 1.0",
                11.51,
                "the 51 convs after the first",
                "od_mobilenetv2.py",
                "odconv_mobilenet_v2",
                {},
            ),
            *(
                (
                    n,
                    f"mobilenet_v2-{width}",
                    f"MobileNetV2 {width}",
                    millions,
                    "the 51 convs after the first",
                    "od_mobilenetv2.py",
                    "odconv_mobilenet_v2",
                    {"width_mult": width},
                )
                for width, n, millions in (
                    (0.75, 1, 3.51),
                    (0.75, 4, 7.50),
                    (0.5, 1, 2.43),
                    (0.5, 4, 4.44),
                )
            ),
        )
    ),
    *(
        _row(
            f"ddf-resnet{depth}",
            "DDF",
            f"ResNet-{depth}",
            millions,
            "README of theFoxofSky/ddfnet (ImageNet table; 'mul' and 'add' alike)",
            "every bottleneck 3x3 a DDFPack (se_ratio 0.2); official code "
            "(theFoxofSky/ddfnet, ddf_resnet.py)",
            "ddf_resnet",
            decimals=1,
            depth=depth,
        )
        for depth, millions in ((50, 16.8), (101, 28.1))
    ),
    *(
        _row(
            f"{key}-resnet50-backbone",
            method,
            "ResNet-50, parameters added",
            millions,
            _FDCONV_README + "; COCO detection table (the backbone has no classifier)",
            recipe,
            builder,
            decimals=1,
            extra=True,
            **args,
        )
        for key, method, millions, recipe, builder, args in (
            (
                "condconv8x",
                "CondConv (8x)",
                90.0,
                "the CondConv ResNet-50 above, classifier static (layer4 only)",
                "condconv_resnet",
                {"depth": 50, "num_kernels": 8, "classifier": False},
            ),
            (
                "dyconv4x",
                "DY-Conv (4x)",
                75.3,
                "the DY-Conv ResNet-50 above (75.3M with or without the BatchNorm)",
                "dynamic_conv_resnet",
                {"depth": 50, "num_kernels": 4, "attention_norm": "batch"},
            ),
            (
                "odconv4x",
                "ODConv (4x)",
                65.1,
                "the ODConv (4x) ResNet-50 above",
                "odconv_resnet",
                {"depth": 50, "num_kernels": 4},
            ),
        )
    ),
    _row(
        "fdconv-resnet50",
        "FDConv",
        "ResNet-50, parameters added",
        3.6,
        _FDCONV_README + " and the FDConv paper's abstract (CVPR 2025)",
        "the 48 bottleneck convs FDConv with 64 frequency groups, FBM on the 3x3; "
        "official code (Linwei-Chen/FDConv, mmdet_custom/resnet.py)",
        "fdconv_resnet50",
        decimals=1,
        extra=True,
    ),
    _row(
        "dcnv2-resnet50",
        "DCNv2",
        "ResNet-50",
        None,
        "no published count (the DCNv2 paper, CVPR 2019, gives the placement only)",
        "modulated deformable conv in the 13 3x3 convs of layer2-layer4 (the paper "
        "says '12 layers', second-hand); +0.87M over ResNet-50",
        "dcnv2_resnet50",
    ),
)


class ReproducedCount(NamedTuple):
    """A network's built parameter count beside the published one."""

    method: str
    network: str
    built: float
    """The built count in millions, rounded to the published precision."""
    published: float | None
    """The published figure in millions, ``None`` where there is none."""
    source: str
    recipe: str
    """The recipe note, then the call that built the network."""

    @property
    def matches(self) -> bool | None:
        """Whether the built count equals the figure (``None``: no figure)."""
        return None if self.published is None else self.built == self.published

    @property
    def difference(self) -> float | None:
        """``built - published`` in millions (``None``: no figure)."""
        if self.published is None:
            return None
        return round(self.built - self.published, 6)


def _builders() -> dict[str, Callable[..., nn.Module]]:
    import torchvision

    plain = {
        f"torchvision.models.{name}": getattr(torchvision.models, name)
        for name in ("resnet18", "resnet50", "resnet101", "mobilenet_v2")
    }
    own = {
        f.__name__: f
        for f in (
            condconv_resnet,
            condconv_mobilenet_v2,
            dynamic_conv_resnet,
            dynamic_conv_mobilenet_v2,
            odconv_resnet,
            odconv_mobilenet_v2,
            ddf_resnet,
            fdconv_resnet50,
            dcnv2_resnet50,
        )
    }
    return {**plain, **own}


def build_published(record: PublishedCount) -> nn.Module:
    """Build the network of ``record`` (a :class:`PublishedCount`), on the current
    default device; inside ``with torch.device("meta"):`` it allocates nothing."""
    if not isinstance(record, PublishedCount):
        raise TypeError(
            f"build_published expected a PublishedCount, got {type(record).__name__}"
        )
    return _builders()[record.builder](**dict(record.arguments))


class _SkipRandomInitOnMeta(TorchFunctionMode):
    """Make ``normal_`` and ``uniform_`` on ``meta`` tensors no-ops.

    A ``meta`` tensor has no values, but PyTorch still runs the Python
    decomposition of these random in-place fills (milliseconds each, thousands of
    times in a ResNet-101 of ODConv layers); skipping them changes no shape and
    makes counting about eight times faster.
    """

    _SKIPPED = frozenset((Tensor.normal_, Tensor.uniform_))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextmanager
def _shapes_only():
    with torch.device("meta"), _SkipRandomInitOnMeta():
        yield


def published_parameters(record: PublishedCount) -> int:
    """The exact parameter count of ``record``'s network, built on the ``meta``
    device (shapes only: no memory, no initialisation); for an ``extra`` record,
    the parameters added to the plain ResNet of the same depth."""
    with _shapes_only():
        count = count_parameters(build_published(record))
        if record.extra:
            depth = dict(record.arguments).get("depth", 50)
            count -= count_parameters(_torchvision_resnet(depth, 1000))
    return count


def reproduce_published_counts(names=None) -> list[ReproducedCount]:
    """Build every network of :data:`PUBLISHED_COUNTS` and set its count beside
    the published one (chapter 8's table).

    The networks are built on the ``meta`` device (shapes only, no memory, no
    initialisation work): the whole table takes seconds.

    Args:
        names: keys of :data:`PUBLISHED_COUNTS` to build (``None``: all), in the
            table's order.

    Returns:
        One :class:`ReproducedCount` ``(method, network, built, published, source,
        recipe)`` per record; ``built`` is rounded to the published precision (two
        decimals where there is no figure).

    Raises:
        ValueError: an unknown key, naming the known ones.
    """
    keys = [record.key for record in PUBLISHED_COUNTS]
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [name for name in names if name not in keys]
        if unknown:
            raise ValueError(
                f"reproduce_published_counts expected keys of PUBLISHED_COUNTS "
                f"({', '.join(keys)}), got {unknown}"
            )
    rows = []
    for record in PUBLISHED_COUNTS:
        if names is not None and record.key not in names:
            continue
        built = round(published_parameters(record) / 1e6, record.decimals)
        rows.append(
            ReproducedCount(
                record.method,
                record.network,
                built,
                record.millions,
                record.source,
                f"{record.recipe_note}; {record.builder_call}",
            )
        )
    return rows
