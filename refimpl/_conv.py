"""The operator base: what every dynamic convolution of the book shares.

In the spirit of PyTorch's ``_ConvNd``, :class:`Conv2dBase` holds the parts of a
layer that are not its method: the validated geometry (``kernel_size``, ``stride``,
``padding`` including ``"same"``/``"valid"``, ``dilation``, ``groups``), the bias
flag, ``padding_mode``, the factory keyword arguments, the input checks (batched
``Tensor[N, C_in, H, W]`` and unbatched ``Tensor[C_in, H, W]``), the memory format
of the output, ``extra_repr`` with ``nn.Conv2d``'s rule (defaults omitted),
``from_conv2d`` and ``load_official_state_dict``. :class:`TemperatureMixin` holds
the temperature of the attention-based layers and :func:`set_temperature` drives it.

A method module subclasses :class:`Conv2dBase` and writes only its method:
``_dynamic(x)`` (the input-dependent tensors, returned by the public
:meth:`Conv2dBase.dynamic_tensors`), ``_forward(x)`` (the computation on a checked,
batched input), ``_preserve(weight, bias)`` (how to compute a given static
convolution, for :meth:`Conv2dBase.from_conv2d`) and ``_official_names()`` (the
official checkpoint's parameter names).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import (
    autocast_enabled,
    check_bool,
    check_float_tensor,
    check_groups,
    check_positive_int,
    check_real,
    pair,
)

__all__ = [
    "PADDING_MODES",
    "Conv2dBase",
    "check_convertible",
    "TemperatureMixin",
    "hidden_width",
    "init_like_conv2d",
    "set_temperature",
    "spread_kernel",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def hidden_width(
    in_channels: int, reduction: float, min_hidden: int, *, owner: str
) -> int:
    """Hidden width of an attention branch: ``max(floor(C_in * reduction), min_hidden)``

    One meaning of ``reduction`` for every layer: the ratio of the hidden width to
    the input channels (DY-CNN squeezes by 4, ``reduction=0.25``; ODConv by 16,
    ``reduction=0.0625``), with an explicit minimum width so that narrow inputs (an
    RGB image) still get a usable branch.

    Raises:
        TypeError, ValueError: ``reduction`` not a finite real ``> 0``,
            ``min_hidden`` not an int ``>= 1``.
    """
    reduction = check_real(reduction, "reduction", owner=owner, minimum=0.0)
    min_hidden = check_positive_int(min_hidden, "min_hidden", owner=owner)
    # The tiny epsilon keeps ``C_in * (h / C_in)`` from flooring to ``h - 1``.
    return max(math.floor(in_channels * reduction + 1e-9), min_hidden)


def init_like_conv2d(weight: Tensor, bias: Tensor | None = None) -> None:
    """Initialise every kernel of a bank (and its bias) exactly as ``nn.Conv2d`` does.

    ``weight``: ``Tensor[..., C_out, C_in/g, kH, kW]``, any number of leading kernel
    axes; each kernel is drawn on its own (Kaiming-uniform, ``a = sqrt(5)``), since on
    the whole bank the fan-in would count the leading axes. ``bias``:
    ``Tensor[..., C_out]``, uniform in ``+-1/sqrt(C_in/g * kH * kW)``.
    """
    with torch.no_grad():
        # a view of the (freshly created, contiguous) bank: drawn in place
        for kernel in weight.view(-1, *weight.shape[-4:]).unbind(0):
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        if bias is not None:
            fan_in = weight.shape[-3] * weight.shape[-2] * weight.shape[-1]
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(bias, -bound, bound)


def spread_kernel(weight: Tensor, bank: Tensor, scale: float) -> Tensor:
    """A bank whose kernels mix back to ``weight``, for function-preserving conversion.

    Returns ``bank_k = weight / scale + (fresh_k - mean_j fresh_j)``, where
    ``fresh`` is ``bank`` as initialised: the zero-mean perturbations keep the
    kernels different from one another (identical kernels would receive identical
    gradients forever), while any mixture with equal weights ``scale / K`` sums
    exactly to ``weight``.

    Args:
        weight: ``Tensor[C_out, C_in/g, kH, kW]``, the static kernel.
        bank: ``Tensor[K, C_out, C_in/g, kH, kW]``, freshly initialised kernels.
        scale: ``sum_k`` of the (constant) mixing weights at conversion time.
    """
    fresh = bank - bank.mean(dim=0, keepdim=True)
    return weight.to(bank.dtype).unsqueeze(0) / scale + fresh


def check_convertible(conv: object, *, owner: str, layer: str | None = None) -> None:
    """Raise unless ``conv`` is an ``nn.Conv2d`` whose function can be reproduced.

    Refused: anything but an ``nn.Conv2d``; an uninitialised lazy convolution; a
    subclass with its own ``forward`` (timm's ``Conv2dSame`` pads dynamically, so a
    replacement would silently change the output shape). ``layer`` names the
    layer in the message (as ``convert_conv2d`` knows it).
    """
    where = "" if layer is None else f" for layer {layer!r}"
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            f"{owner} expected an nn.Conv2d{where}, got {type(conv).__name__}"
        )
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and (
        conv.has_uninitialized_params()
    ):
        raise ValueError(
            f"{owner} expected an initialised convolution{where}, got an "
            f"uninitialised {type(conv).__name__}; run one forward pass first"
        )
    if type(conv).forward is not nn.Conv2d.forward:
        raise ValueError(
            f"{owner} expected nn.Conv2d's own forward{where}, got "
            f"{type(conv).__name__}, which overrides it (e.g. dynamic 'same' "
            f"padding): its function cannot be reproduced faithfully; exclude it"
        )


class Conv2dBase(nn.Module):
    """The shared base of every operator: ``nn.Conv2d``'s surface, checked once.

    Subclasses call ``super().__init__`` with ``nn.Conv2d``'s arguments, create their
    parameters from ``self.factory_kwargs``, and implement ``_dynamic``,
    ``_forward``, ``_preserve``, ``_options`` and ``_official_names``.

    Its attributes are ``nn.Conv2d``'s: ``in_channels``, ``out_channels`` and
    ``groups`` (ints), ``kernel_size``, ``stride`` and ``dilation`` (pairs of
    ints), ``padding`` (a pair of ints, or ``"same"`` / ``"valid"``) and
    ``padding_mode``, plus ``has_bias`` and ``factory_kwargs``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(in_channels, "in_channels", owner=owner)
        self.out_channels = check_positive_int(
            out_channels, "out_channels", owner=owner
        )
        self.kernel_size = pair(kernel_size, "kernel_size", owner=owner)
        self.stride = pair(stride, "stride", owner=owner)
        self.dilation = pair(dilation, "dilation", owner=owner)
        self.groups = check_positive_int(groups, "groups", owner=owner)
        check_groups(self.in_channels, self.out_channels, self.groups, owner=owner)
        self.has_bias = check_bool(bias, "bias", owner=owner)
        if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
            raise ValueError(
                f"{owner} expected padding_mode in {PADDING_MODES}, got "
                f"{padding_mode!r}"
            )
        self.padding_mode = padding_mode
        self.padding, self._pad_lrtb = self._parse_padding(padding, owner)
        if dtype is not None and not (
            isinstance(dtype, torch.dtype) and dtype.is_floating_point
        ):
            raise TypeError(
                f"{owner} expected dtype to be a floating-point torch.dtype, got "
                f"{dtype!r}"
            )
        self.factory_kwargs = {"device": device, "dtype": dtype}

    def __init_subclass__(cls, **kwargs) -> None:
        # A subclass writes ``__init__(self, *conv_args, <own options>, **conv_kwargs)``
        # and passes nn.Conv2d's arguments on; here its signature is completed
        # to the full drop-in one (help(), the API page and IDEs at run time).
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        base = inspect.signature(Conv2dBase.__init__).parameters
        own = inspect.signature(init)
        if not any(p.kind is p.VAR_POSITIONAL for p in own.parameters.values()):
            return  # a signature of its own (DDF is depthwise: ``channels``)
        keyword = [p for p in own.parameters.values() if p.kind is p.KEYWORD_ONLY]
        if not keyword:
            return
        conv = [p for p in base.values() if p.kind is not p.KEYWORD_ONLY]
        factory = [base["device"], base["dtype"]]
        init.__signature__ = own.replace(parameters=conv + keyword + factory)

    # --- parameters -------------------------------------------------------------

    def kernel_bank(self, *leading: int) -> nn.Parameter:
        """An uninitialised ``Tensor[*leading, C_out, C_in/groups, kH, kW]``."""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return nn.Parameter(torch.empty(*leading, *shape, **self.factory_kwargs))

    def bias_parameter(self, *leading: int) -> nn.Parameter | None:
        """An uninitialised ``Tensor[*leading, C_out]``, or ``None`` without bias."""
        if not self.has_bias:
            return None
        shape = (*leading, self.out_channels)
        return nn.Parameter(torch.empty(shape, **self.factory_kwargs))

    # --- geometry ---------------------------------------------------------------

    def _parse_padding(self, padding, owner):
        """``(padding attribute, (left, right, top, bottom))`` as ``nn.Conv2d``."""
        if isinstance(padding, str):
            if padding == "valid":
                return "valid", (0, 0, 0, 0)
            if padding != "same":
                raise ValueError(
                    f"{owner} expected padding to be an int, a pair of ints, 'same' "
                    f"or 'valid', got {padding!r}"
                )
            if self.stride != (1, 1):
                raise ValueError(
                    f"{owner} expected stride 1 with padding='same' (as nn.Conv2d), "
                    f"got stride={self.stride}"
                )
            lrtb = []
            for axis in (1, 0):  # width first: F.pad's order
                total = self.dilation[axis] * (self.kernel_size[axis] - 1)
                lrtb += [total // 2, total - total // 2]
            return "same", tuple(lrtb)
        ph, pw = pair(padding, "padding", owner=owner, minimum=0)
        return (ph, pw), (pw, pw, ph, ph)

    @property
    def _pre_pad(self) -> bool:
        """Whether the input is padded before the operator (modes, odd "same")."""
        left, right, top, bottom = self._pad_lrtb
        return self.padding_mode != "zeros" or left != right or top != bottom

    @property
    def op_padding(self) -> tuple[int, int]:
        """The symmetric zero padding passed to the operator after :meth:`pad`."""
        if self._pre_pad:
            return (0, 0)
        return (self._pad_lrtb[2], self._pad_lrtb[0])

    def pad(self, x: Tensor) -> Tensor:
        """``x`` padded explicitly where the operator cannot (``padding_mode``,
        asymmetric ``"same"``); otherwise ``x`` itself."""
        if not self._pre_pad:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pad_lrtb, mode=mode)

    # --- input and output -------------------------------------------------------

    def _parameter_dtype(self) -> torch.dtype | None:
        weight = getattr(self, "weight", None)
        return weight.dtype if isinstance(weight, Tensor) else None

    def _check_input(self, input: object) -> tuple[Tensor, bool]:
        """Check ``input`` once, at the public boundary; return it batched.

        Returns ``(x, unbatched)``: ``x`` is ``Tensor[N, C_in, H, W]``, with a batch
        axis of one added to an unbatched ``Tensor[C_in, H, W]``.
        """
        owner = type(self).__name__
        x = check_float_tensor(input, "input", owner=owner)
        if x.dim() not in (3, 4):
            raise ValueError(
                f"{owner} expected input of shape [N, C_in, H, W] or [C_in, H, W], "
                f"got {x.dim()} dimensions (shape {tuple(x.shape)})"
            )
        unbatched = x.dim() == 3
        channels = x.shape[-3]
        if channels != self.in_channels:
            raise ValueError(
                f"{owner} expected input with {self.in_channels} channels, got "
                f"{channels} (shape {tuple(x.shape)})"
            )
        if unbatched:
            x = x.unsqueeze(0)
        dtype = self._parameter_dtype()
        if (
            dtype is not None
            and x.dtype != dtype
            and not autocast_enabled(x.device.type)
        ):
            raise TypeError(
                f"{owner} expected input of dtype {dtype} (the dtype of its "
                f"parameters), got {x.dtype}"
            )
        left, right, top, bottom = self._pad_lrtb
        for axis, name, before, after in (
            (0, "height", top, bottom),
            (1, "width", left, right),
        ):
            padded = x.shape[2 + axis] + before + after
            span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
            if padded < span:
                raise ValueError(
                    f"{owner} expected the padded input ({padded}) to be at least the "
                    f"dilated kernel size ({span}) along {name}"
                )
            # F.pad's own limits, raised here as nn.Conv2d's argument errors
            size, most = x.shape[2 + axis], max(before, after)
            if (self.padding_mode == "reflect" and most >= size) or (
                self.padding_mode == "circular" and most > size
            ):
                bound = "smaller than" if self.padding_mode == "reflect" else "at most"
                raise ValueError(
                    f"{owner} expected {self.padding_mode} padding ({most}) {bound} "
                    f"the input {name} ({size})"
                )
        return x, unbatched

    def _finish(self, out: Tensor, x: Tensor, unbatched: bool) -> Tensor:
        """Give ``out`` ``nn.Conv2d``'s memory format and drop an added batch axis."""
        if unbatched:
            return out.squeeze(0)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return out.contiguous(memory_format=torch.channels_last)
        return out

    def forward(self, input: Tensor) -> Tensor:
        """``Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]``.

        An unbatched ``Tensor[C_in, H, W]`` gives ``Tensor[C_out, H_out, W_out]``;
        a ``channels_last`` input gives a ``channels_last`` output; ``H_out`` is
        ``nn.Conv2d``'s output size for the same arguments.
        """
        x, unbatched = self._check_input(input)
        return self._finish(self._forward(x), x, unbatched)

    def dynamic_tensors(self, input: Tensor) -> tuple:
        """The input-dependent tensors of this layer for ``input``.

        A named tuple whose fields are the dynamic arguments of the layer's
        functional form, in its order, so that
        ``functional(x, *layer.dynamic_tensors(x), layer.weight, ...)`` is the
        layer (with zero padding). An unbatched input counts as a batch of one.
        """
        x, _ = self._check_input(input)
        return self._dynamic(x)

    def _dynamic(self, x: Tensor) -> tuple:
        raise NotImplementedError

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # --- memory format ----------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=channels_last) converts every 4-D *and* 5-D
        # tensor with a 4-D format, which PyTorch refuses for 5-D kernel banks.
        # A bank is a stack of 4-D kernels: convert each kernel instead.
        def convert(t):
            if t.dim() != 5:
                return fn(t)
            # also when converting back: PyTorch leaves a 5-D tensor with
            # per-kernel channels-last strides as it is for contiguous_format
            return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])

        return super()._apply(convert, recurse)

    # --- representation ---------------------------------------------------------

    def _options(self) -> Iterator[tuple[str, Any, Any]]:
        """``(name, value, default)`` of every method option, for ``extra_repr``."""
        return iter(())

    def extra_repr(self) -> str:
        """``nn.Conv2d``'s text, then the method's options that differ from default."""
        s = (
            f"{self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.has_bias:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        for name, value, default in self._options():
            if value != default:
                s += f", {name}={value!r}"
        return s

    # --- conversion from nn.Conv2d ----------------------------------------------

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, preserve: bool = True, **options):
        """The operator with the geometry of ``conv``, computing the same function.

        Copies ``conv``'s channels, kernel size, stride, padding (strings
        included), dilation, groups, bias flag, padding mode, device, dtype and
        train/eval mode; ``options`` go to the constructor (``num_kernels=4``, ...).
        With ``preserve=True`` (the default) the pretrained weight and bias are
        copied and the dynamic branch is set so that, at conversion time, the
        layer computes exactly ``conv(x)`` for every input (within float round-off);
        each operator's ``_preserve`` docstring says how. ``preserve=False`` keeps
        the fresh initialisation (training from scratch, as the papers do).

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: an uninitialised lazy convolution, or a subclass of
                ``nn.Conv2d`` with its own ``forward`` (e.g. timm's ``Conv2dSame``,
                whose dynamic "same" padding cannot be reproduced faithfully).
        """
        name = f"{cls.__name__}.from_conv2d"
        check_convertible(conv, owner=name)
        check_bool(preserve, "preserve", owner=name)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **options,
        )
        if preserve:
            with torch.no_grad():
                layer._preserve(
                    conv.weight.detach(),
                    None if conv.bias is None else conv.bias.detach(),
                )
        return layer.train(conv.training)

    def _preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        raise NotImplementedError

    # --- official checkpoints ---------------------------------------------------

    def _official_names(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{our key: (official key, official shape)}`` for every state-dict entry."""
        raise NotImplementedError

    def load_official_state_dict(self, state_dict) -> None:
        """Load a checkpoint of the official implementation this layer follows.

        Every key of the official module must be present with the official shape
        and nothing else; tensors are reshaped to this layer's layout (the map is
        given in each operator's docstring) and loaded in place.

        Raises:
            TypeError: ``state_dict`` is not a mapping of tensors.
            ValueError: a missing or unexpected key, or a tensor whose shape is not
                the official one, naming the key and both shapes.
        """
        owner = f"{type(self).__name__}.load_official_state_dict"
        if not hasattr(state_dict, "keys"):
            raise TypeError(
                f"{owner} expected a state dict (a mapping), got "
                f"{type(state_dict).__name__}"
            )
        names = self._official_names()
        official = {key: (ours, shape) for ours, (key, shape) in names.items()}
        missing = sorted(set(official) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(official))
        if missing or unexpected:
            raise ValueError(
                f"{owner} expected the official keys: missing {missing}, "
                f"unexpected {unexpected}"
            )
        ours = self.state_dict()
        mapped = {}
        for key, (our_key, shape) in official.items():
            value = state_dict[key]
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"{owner} expected {key!r} to be a tensor, got "
                    f"{type(value).__name__}"
                )
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"{owner} expected {key!r} of shape {tuple(shape)}, got "
                    f"{tuple(value.shape)}"
                )
            mapped[our_key] = value.reshape(ours[our_key].shape)
        self.load_state_dict(mapped, strict=False)


class TemperatureMixin:
    """A validated softmax/sigmoid temperature, saved with the parameters.

    ``temperature`` is a float ``> 0`` dividing the attention logits. It is stored
    in the state dict as extra state (a model saved after annealing evaluates at
    its temperature), but a strict load of a state dict *without* that entry (a
    checkpoint of an earlier version, or an official one) keeps the current value
    instead of failing. Drive it with :func:`set_temperature` and
    :func:`refimpl.dynamic_conv.temperature_schedule`.
    """

    @property
    def temperature(self) -> float:
        """The temperature ``T > 0`` dividing the attention logits."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_real(
            value, "temperature", owner=type(self).__name__, minimum=0.0
        )

    def get_extra_state(self) -> dict:
        """The temperature, saved in the state dict next to the parameters."""
        return {"temperature": self._temperature}

    def set_extra_state(self, state: dict) -> None:
        """Restore the temperature saved by :meth:`get_extra_state`."""
        if not isinstance(state, dict) or "temperature" not in state:
            raise ValueError(
                f"{type(self).__name__} expected extra state {{'temperature': float}}, "
                f"got {state!r}"
            )
        self.temperature = state["temperature"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, *args
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, *args
        )
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # keep the current temperature


def set_temperature(model: nn.Module, value: float) -> int:
    """Set ``temperature = value`` on every ``refimpl`` layer that has one.

    Only layers built on :class:`refimpl._conv.TemperatureMixin` (``DynamicConv2d``,
    ``ODConv2d``) are touched; other modules with an attribute of that name (a
    distillation loss, a user's own module) are left alone. One call per iteration
    or epoch drives a whole network::

        set_temperature(model, temperature_schedule(epoch))

    Args:
        model: the network (``model`` itself included).
        value: the new temperature, a finite float ``> 0``.

    Returns:
        How many layers were set (0 if there are none).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``value`` not a real.
        ValueError: ``value`` is not finite and positive.
    """
    owner = "set_temperature"
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{owner} expected model to be a torch.nn.Module, got "
            f"{type(model).__name__}"
        )
    value = check_real(value, "value", owner=owner, minimum=0.0)
    count = 0
    for module in model.modules():
        if isinstance(module, TemperatureMixin):
            module.temperature = value
            count += 1
    return count
