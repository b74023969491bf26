"""Loading the official implementations' checkpoints: ``load_official_state_dict``.

Every operator loads the state dict of the implementation its chapter follows,
under the official parameter names and shapes:

* ``CondConv2d``: timm's ``CondConv2d`` (``weight [E, C_out*C_in/g*kH*kW]``,
  ``bias [E, C_out]``) and the routing layer of timm's ``CondConvResidual``
  block, ``routing_fn = nn.Linear(C_in, E)``;
* ``DynamicConv2d``: the PyTorch port kaijieshi7/Dynamic-convolution-Pytorch,
  ``Dynamic_conv2d`` (``weight [K, C_out, C_in/g, kH, kW]``, ``bias [K, C_out]``,
  ``attention.fc1`` and ``attention.fc2`` as 1x1 convolutions);
* ``ODConv2d``: OSVAI/ODConv, ``modules/odconv.py`` ``ODConv2d`` (no bias;
  ``attention.fc``, ``attention.bn`` and the four heads as 1x1 convolutions);
* ``DeformConv2d``: ``torchvision.ops.DeformConv2d`` (``weight``, ``bias``) with
  mmcv's offset branch ``conv_offset`` (``DeformConv2dPack``: ``2*G*kH*kW``
  channels; ``ModulatedDeformConv2dPack``: ``3*G*kH*kW``).

Each state dict is written here by hand from those facts, and each expected output
is an independent computation of the official forward from the official equations
(per-sample loops over ``F.conv2d`` and ``torchvision.ops.deform_conv2d``), in
float64 and, for ODConv's BatchNorm, in eval mode.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from refimpl import CondConv2d, DeformConv2d, DynamicConv2d, ODConv2d

from conftest import randn, tolerance

F64 = tolerance(torch.float64)
BN_EPS = 1e-5  # nn.BatchNorm2d's default, used by the official ODConv attention


# --- helpers --------------------------------------------------------------------


class _Draw:
    """Normal tensors from one seeded CPU generator, in float64."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 0.5) -> Tensor:
        return scale * torch.randn(*shape, generator=self.g, dtype=torch.float64)

    def positive(self, *shape: int) -> Tensor:
        return 0.5 + torch.rand(*shape, generator=self.g, dtype=torch.float64)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _gap(x: Tensor) -> Tensor:
    """Global average pooling: ``Tensor[N, C, H, W] -> Tensor[N, C]``."""
    return x.mean(dim=(2, 3))


def _fc(a: Tensor, sd: dict, name: str) -> Tensor:
    """A 1x1 convolution on pooled features, as a matrix product."""
    out = a @ sd[name + ".weight"].flatten(1).T
    if name + ".bias" in sd:
        out = out + sd[name + ".bias"]
    return out


def _assert_holds(layer: torch.nn.Module, official: dict) -> None:
    """Every official tensor is in the layer's state dict (reshaped), once each.

    The official tensors are random, so matching flattened values identifies each
    one; the element counts must agree too, so nothing of the layer is left
    unloaded.
    """
    ours = {k: v for k, v in layer.state_dict().items() if isinstance(v, Tensor)}
    assert sum(v.numel() for v in ours.values()) == sum(
        v.numel() for v in official.values()
    )
    free = dict(ours)
    for key, value in official.items():
        flat = value.reshape(-1).double()
        hits = [
            k
            for k, v in free.items()
            if v.numel() == value.numel() and torch.equal(v.reshape(-1).double(), flat)
        ]
        assert hits, f"official {key!r} not found in the loaded layer"
        del free[hits[0]]


def _conv(x, w, b, geometry):
    stride, padding, dilation, groups = geometry
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


# --- CondConv: timm's CondConv2d + the block's routing_fn ------------------------

# (c_in, c_out, kernel, stride, padding, dilation, groups, experts, bias)
CONDCONV_CASES = [
    (6, 4, 3, 1, 1, 1, 1, 4, True),
    (4, 6, (3, 5), (2, 1), (1, 2), 1, 2, 3, False),
    (6, 6, 3, 1, 2, 2, 6, 2, True),
]


def condconv_official_state_dict(case, seed=0) -> dict:
    c_in, c_out, kernel, _, _, _, groups, e, bias = case
    kh, kw = _pair(kernel)
    draw = _Draw(seed)
    sd = {
        "weight": draw(e, c_out * (c_in // groups) * kh * kw),
        "routing_fn.weight": draw(e, c_in),
        "routing_fn.bias": draw(e),
    }
    if bias:
        sd["bias"] = draw(e, c_out)
    return sd


def condconv_official_forward(x, sd, case):
    """timm: ``r = sigmoid(routing_fn(GAP(x)))``; ``W_i = (r_i @ weight).view(...)``."""
    c_in, c_out, kernel, stride, padding, dilation, groups, _, _ = case
    kh, kw = _pair(kernel)
    routing = torch.sigmoid(_fc(_gap(x), sd, "routing_fn"))
    outs = []
    for i in range(x.shape[0]):
        w = (routing[i] @ sd["weight"]).view(c_out, c_in // groups, kh, kw)
        b = routing[i] @ sd["bias"] if "bias" in sd else None
        outs.append(_conv(x[i : i + 1], w, b, (stride, padding, dilation, groups)))
    return torch.cat(outs), (routing,)


def condconv_layer(case, **options):
    *geometry, e, bias = (
        case  # (c_in, c_out, kernel, stride, padding, dilation, groups)
    )
    return CondConv2d(*geometry, bias, num_kernels=e, dtype=torch.float64, **options)


@pytest.mark.parametrize("case", CONDCONV_CASES)
def test_condconv_loads_timm(case):
    c_in, c_out, kernel, *_, groups, e, _ = case
    sd = condconv_official_state_dict(case)
    layer = condconv_layer(case)
    layer.load_official_state_dict(sd)
    # timm's layout: one expert per row, in PyTorch order (C_out, C_in/g, kH, kW)
    torch.testing.assert_close(
        layer.weight,
        sd["weight"].view(e, c_out, c_in // groups, *_pair(kernel)),
        rtol=0,
        atol=0,
    )
    if "bias" in sd:
        torch.testing.assert_close(layer.bias, sd["bias"], rtol=0, atol=0)
    _assert_holds(layer, sd)
    x = randn(3, c_in, 9, 10, seed=1)
    expected, dynamic = condconv_official_forward(x, sd, case)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, **F64)
        torch.testing.assert_close(layer.dynamic_tensors(x)[0], dynamic[0], **F64)


# --- DynamicConv: the kaijieshi7 port ---------------------------------------------

# (c_in, c_out, kernel, stride, padding, dilation, groups, K, bias, temperature)
DYNAMIC_CASES = [
    (8, 6, 3, 1, 1, 1, 1, 4, True, 34.0),
    (3, 4, 3, 2, 1, 1, 1, 4, True, 1.0),  # RGB input: the port's hidden width is K
    (12, 8, 3, 1, 2, 2, 4, 3, False, 4.0),
    (10, 6, 1, 2, 0, 1, 2, 2, True, 31.0),
]


def port_hidden_width(c_in: int, k: int, ratio: float = 0.25) -> int:
    """The port's rule: ``int(C_in * ratio) + 1``, or ``K`` when ``C_in == 3``."""
    return k if c_in == 3 else int(c_in * ratio) + 1


def dynamic_official_state_dict(case, seed=0) -> dict:
    c_in, c_out, kernel, _, _, _, groups, k, bias, _ = case
    kh, kw = _pair(kernel)
    h = port_hidden_width(c_in, k)
    draw = _Draw(seed)
    sd = {
        "weight": draw(k, c_out, c_in // groups, kh, kw),
        "attention.fc1.weight": draw(h, c_in, 1, 1, scale=1.0),
        "attention.fc2.weight": draw(k, h, 1, 1, scale=4.0),
        "attention.fc2.bias": draw(k, scale=4.0),
    }
    if bias:
        sd["bias"] = draw(k, c_out)
    return sd


def dynamic_official_forward(x, sd, case):
    """The port: ``pi = softmax(fc2(relu(fc1(GAP(x)))) / T)``, then
    ``W_i = sum_k pi_ik W_k`` and ``b_i = sum_k pi_ik b_k``."""
    _, _, _, stride, padding, dilation, groups, _, _, temperature = case
    a = F.relu(_fc(_gap(x), sd, "attention.fc1"))
    pi = torch.softmax(_fc(a, sd, "attention.fc2") / temperature, dim=1)
    outs = []
    for i in range(x.shape[0]):
        w = torch.einsum("k,k...->...", pi[i], sd["weight"])
        b = pi[i] @ sd["bias"] if "bias" in sd else None
        outs.append(_conv(x[i : i + 1], w, b, (stride, padding, dilation, groups)))
    return torch.cat(outs), (pi,)


def dynamic_layer(case, hidden=None, **options):
    *geometry, k, bias, temp = case
    if hidden is not None:
        # hidden = max(floor(C_in * reduction), min_hidden) == the port's width
        options = {"reduction": hidden / geometry[0], "min_hidden": 1, **options}
    return DynamicConv2d(
        *geometry, bias, num_kernels=k, temperature=temp, dtype=torch.float64, **options
    )


@pytest.mark.parametrize("case", DYNAMIC_CASES)
def test_dynamic_conv_loads_port(case):
    c_in, *_, k, _, temperature = case
    sd = dynamic_official_state_dict(case)
    layer = dynamic_layer(case, hidden=port_hidden_width(c_in, k))
    layer.load_official_state_dict(sd)
    torch.testing.assert_close(layer.weight, sd["weight"], rtol=0, atol=0)
    if "bias" in sd:
        torch.testing.assert_close(layer.bias, sd["bias"], rtol=0, atol=0)
    _assert_holds(layer, sd)
    # the port saves no temperature: loading keeps the layer's own
    assert layer.temperature == temperature
    x = randn(3, c_in, 8, 9, seed=1)
    expected, dynamic = dynamic_official_forward(x, sd, case)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, **F64)
        torch.testing.assert_close(layer.dynamic_tensors(x)[0], dynamic[0], **F64)


def test_dynamic_conv_default_width_differs_from_port():
    """The port's ``int(C_in/4) + 1`` is not the default ``max(C_in // 4, 4)``: a
    layer built with the defaults reports the attention shape mismatch."""
    case = (16, 8, 3, 1, 1, 1, 1, 4, True, 34.0)
    sd = dynamic_official_state_dict(case)
    assert sd["attention.fc1.weight"].shape == (5, 16, 1, 1)
    layer = dynamic_layer(case)
    with pytest.raises(ValueError, match=r"attention\.fc1\.weight") as info:
        layer.load_official_state_dict(sd)
    assert "(4, 16, 1, 1)" in str(info.value)
    assert "(5, 16, 1, 1)" in str(info.value)


# --- ODConv: OSVAI/ODConv ----------------------------------------------------------

# (c_in, c_out, k, stride, padding, dilation, groups, kernels, temperature)
ODCONV_CASES = [
    (8, 12, 3, 1, 1, 1, 1, 4, 1.0),  # every head
    (8, 8, 3, 2, 1, 1, 8, 4, 1.0),  # depthwise: no filter_fc
    (8, 12, 1, 1, 0, 1, 1, 1, 1.0),  # 1x1, one kernel: the official pw1x path
    (8, 12, 3, 1, 2, 2, 2, 1, 2.5),  # one kernel: no kernel_fc
    (8, 12, 1, 2, 0, 1, 4, 3, 30.0),  # 1x1: no spatial_fc
    (40, 16, 3, 1, 1, 1, 1, 2, 1.0),  # hidden = max(int(40/16), 16) = 16
]


def odconv_heads(case) -> list[tuple[str, int]]:
    """The official heads present for ``case``: ``(name, width)``."""
    c_in, c_out, k, _, _, _, groups, n, _ = case
    heads = [("channel_fc", c_in)]
    if not (c_in == groups and c_in == c_out):
        heads.append(("filter_fc", c_out))
    if k != 1:
        heads.append(("spatial_fc", k * k))
    if n != 1:
        heads.append(("kernel_fc", n))
    return heads


def odconv_official_state_dict(case, seed=0) -> dict:
    c_in, c_out, k, _, _, _, groups, n, _ = case
    h = max(int(c_in * 0.0625), 16)  # official min_channel=16, not a constructor arg
    draw = _Draw(seed)
    sd = {
        "weight": draw(n, c_out, c_in // groups, k, k),
        "attention.fc.weight": draw(h, c_in, 1, 1, scale=1.0),
        "attention.bn.weight": draw.positive(h),
        "attention.bn.bias": draw(h),
        "attention.bn.running_mean": draw(h, scale=0.1),
        "attention.bn.running_var": draw.positive(h),
        "attention.bn.num_batches_tracked": torch.tensor(7),
    }
    for name, width in odconv_heads(case):
        sd[f"attention.{name}.weight"] = draw(width, h, 1, 1, scale=1.0)
        sd[f"attention.{name}.bias"] = draw(width)
    return sd


def odconv_official_forward(x, sd, case):
    """The official forward (eval mode), in its own order: the channel attention
    scales the input, the filter attention the output."""
    _, _, k, stride, padding, dilation, groups, _, t = case
    a = _gap(x) @ sd["attention.fc.weight"].flatten(1).T
    bn = {p: sd["attention.bn." + p] for p in ("weight", "bias")}
    mean = sd["attention.bn.running_mean"]
    var = sd["attention.bn.running_var"]
    a = F.relu((a - mean) / torch.sqrt(var + BN_EPS) * bn["weight"] + bn["bias"])
    heads = dict(odconv_heads(case))
    nb = x.shape[0]
    ones = x.new_ones(nb, 1)

    def head(name):
        return _fc(a, sd, "attention." + name) / t

    channel = torch.sigmoid(head("channel_fc"))
    filt = torch.sigmoid(head("filter_fc")) if "filter_fc" in heads else None
    spatial = torch.sigmoid(head("spatial_fc")) if "spatial_fc" in heads else None
    kernel = torch.softmax(head("kernel_fc"), dim=1) if "kernel_fc" in heads else None
    outs = []
    for i in range(nb):
        ki = kernel[i] if kernel is not None else ones[i]
        w = torch.einsum("k,k...->...", ki, sd["weight"])
        if spatial is not None:
            w = w * spatial[i].view(k, k)
        xi = x[i : i + 1] * channel[i].view(1, -1, 1, 1)
        y = _conv(xi, w, None, (stride, padding, dilation, groups))
        if filt is not None:
            y = y * filt[i].view(1, -1, 1, 1)
        outs.append(y)
    spatial = None if spatial is None else spatial.view(nb, k, k)
    return torch.cat(outs), (channel, filt, spatial, kernel)


def odconv_layer(case, **options):
    c_in, c_out, k, stride, padding, dilation, groups, n, _ = case
    options = {"bias": False, **options}
    return ODConv2d(
        c_in,
        c_out,
        k,
        stride,
        padding,
        dilation,
        groups,
        num_kernels=n,
        dtype=torch.float64,
        **options,
    )


@pytest.mark.parametrize("case", ODCONV_CASES)
def test_odconv_loads_official(case):
    c_in, *_, temperature = case
    sd = odconv_official_state_dict(case)
    layer = odconv_layer(case).eval()
    layer.load_official_state_dict(sd)
    torch.testing.assert_close(layer.weight, sd["weight"], rtol=0, atol=0)
    assert layer.bias is None
    _assert_holds(layer, sd)
    # the official attention keeps its temperature outside the state dict
    assert layer.temperature == 1.0
    layer.temperature = temperature
    x = randn(3, c_in, 9, 8, seed=1)
    expected, dynamic = odconv_official_forward(x, sd, case)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, **F64)
        got = layer.dynamic_tensors(x)
    for name, ours, theirs in zip(
        ("channel", "filter", "spatial", "kernel"), got, dynamic
    ):
        if theirs is None:
            assert ours is None, name
        else:
            torch.testing.assert_close(ours, theirs, **F64, msg=name)


@pytest.mark.parametrize(
    "options, word",
    [({"bias": True}, "bias"), ({"attention_norm": None}, "attention_norm")],
)
def test_odconv_official_needs_official_layout(options, word):
    """The official module has no bias and always a BatchNorm: another layout
    cannot hold its checkpoint, and says which argument to change."""
    case = ODCONV_CASES[0]
    layer = odconv_layer(case, **options)
    with pytest.raises(ValueError, match=word):
        layer.load_official_state_dict(odconv_official_state_dict(case))


# --- Deformable: torchvision's DeformConv2d + mmcv's conv_offset -----------------

# (c_in, c_out, kernel, stride, padding, dilation, groups, offset_groups, modulated,
#  bias)
DEFORM_CASES = [
    (4, 6, 3, 1, 1, 1, 1, 1, True, True),  # mmcv DCNv2 (bias by default)
    (4, 6, 3, 2, 1, 1, 2, 2, True, False),
    (4, 6, 3, 1, 1, 1, 1, 1, False, False),  # mmcv DCNv1 (never a bias)
    (2, 4, (3, 2), 1, (2, 1), (2, 1), 1, 2, False, True),  # torchvision's bias
]


def deform_official_state_dict(case, seed=0) -> dict:
    c_in, c_out, kernel, _, _, _, groups, g, modulated, bias = case
    kh, kw = _pair(kernel)
    per_tap = 3 if modulated else 2
    draw = _Draw(seed)
    sd = {
        "weight": draw(c_out, c_in // groups, kh, kw),
        "conv_offset.weight": draw(per_tap * g * kh * kw, c_in, kh, kw, scale=0.3),
        "conv_offset.bias": draw(per_tap * g * kh * kw),
    }
    if bias:
        sd["bias"] = draw(c_out)
    return sd


def deform_official_forward(x, sd, case):
    """mmcv's packs: ``o1, o2, m = conv_offset(x).chunk(3)``, offset ``cat(o1, o2)``
    and mask ``sigmoid(m)`` (DCNv2), or all of ``conv_offset(x)`` as the offset
    (DCNv1); then torchvision's ``deform_conv2d`` (the same layout)."""
    stride, padding, dilation = case[3:6]
    out = F.conv2d(
        x, sd["conv_offset.weight"], sd["conv_offset.bias"], stride, padding, dilation
    )
    mask = None
    if case[8]:
        o1, o2, logits = torch.chunk(out, 3, dim=1)
        out, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(logits)
    y = tv_deform_conv2d(
        x, out, sd["weight"], sd.get("bias"), stride, padding, dilation, mask
    )
    return y, (out, mask)


def deform_layer(case, **options):
    *geometry, g, modulated, bias = case
    if modulated:
        options = {"mask_scale": 1.0, **options}  # mmcv's mask: a plain sigmoid
    return DeformConv2d(
        *geometry,
        bias,
        offset_groups=g,
        modulated=modulated,
        dtype=torch.float64,
        **options,
    )


@pytest.mark.parametrize("case", DEFORM_CASES)
def test_deform_loads_mmcv_and_torchvision(case):
    c_in = case[0]
    sd = deform_official_state_dict(case)
    layer = deform_layer(case)
    layer.load_official_state_dict(sd)
    torch.testing.assert_close(layer.weight, sd["weight"], rtol=0, atol=0)
    if "bias" in sd:
        torch.testing.assert_close(layer.bias, sd["bias"], rtol=0, atol=0)
    else:
        assert layer.bias is None
    _assert_holds(layer, sd)
    x = randn(2, c_in, 7, 8, seed=1)
    expected, (offset, mask) = deform_official_forward(x, sd, case)
    assert offset.abs().max() > 0.5  # the grid really moves
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, **F64)
        got = layer.dynamic_tensors(x)
    torch.testing.assert_close(got[0], offset, **F64)
    if mask is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], mask, **F64)


# --- every operator: strictness and errors ----------------------------------------


def _port_layer(case):
    return dynamic_layer(case, hidden=port_hidden_width(case[0], case[7]))


# name: (case, official state dict, matching layer, a key to break)
OPERATORS = {
    "CondConv2d": (
        CONDCONV_CASES[0],
        condconv_official_state_dict,
        condconv_layer,
        "routing_fn.weight",
    ),
    "DynamicConv2d": (
        DYNAMIC_CASES[0],
        dynamic_official_state_dict,
        _port_layer,
        "attention.fc2.weight",
    ),
    "ODConv2d": (
        ODCONV_CASES[0],
        odconv_official_state_dict,
        odconv_layer,
        "attention.spatial_fc.weight",
    ),
    "DeformConv2d": (
        DEFORM_CASES[0],
        deform_official_state_dict,
        deform_layer,
        "conv_offset.weight",
    ),
}


def _operator(name):
    case, make_sd, make_layer, key = OPERATORS[name]
    return make_sd(case), make_layer(case), key


def _snapshot(layer):
    state = layer.state_dict()
    return {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}


def _assert_unchanged(layer, before):
    after = _snapshot(layer)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("name", OPERATORS)
def test_missing_key_raises(name):
    sd, layer, key = _operator(name)
    del sd[key]
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=re.escape(key)):
        layer.load_official_state_dict(sd)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("name", OPERATORS)
def test_unexpected_key_raises(name):
    sd, layer, _ = _operator(name)
    sd["attention.extra.weight"] = torch.zeros(3, dtype=torch.float64)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=re.escape("attention.extra.weight")):
        layer.load_official_state_dict(sd)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("name", OPERATORS)
def test_refimpl_names_are_not_official(name):
    """A refimpl state dict is not an official one (the keys or layouts differ) and
    a prefixed official one is not either: both are refused, not guessed."""
    sd, layer, key = _operator(name)
    prefixed = {"layer1.0.conv2." + k: v for k, v in sd.items()}
    with pytest.raises(ValueError, match=re.escape("layer1.0.conv2." + key)):
        layer.load_official_state_dict(prefixed)
    ours = {k: v for k, v in layer.state_dict().items() if k != "_extra_state"}
    if set(ours) != set(sd) or any(ours[k].shape != sd[k].shape for k in sd):
        with pytest.raises(ValueError):
            layer.load_official_state_dict(ours)


@pytest.mark.parametrize("name", OPERATORS)
def test_wrong_shape_raises_and_loads_nothing(name):
    sd, layer, key = _operator(name)
    shape = tuple(sd[key].shape)
    wrong = (shape[0] + 1, *shape[1:])
    sd[key] = torch.zeros(wrong, dtype=torch.float64)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=re.escape(key)) as info:
        layer.load_official_state_dict(sd)
    assert str(shape) in str(info.value) and str(wrong) in str(info.value)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("name", OPERATORS)
def test_same_numel_other_shape_raises(name):
    """A tensor with the right number of elements but another shape (e.g. a
    refimpl 2-D linear weight where the official 1x1 convolution is 4-D) is
    refused rather than silently reshaped."""
    sd, layer, key = _operator(name)
    sd[key] = sd[key].reshape(-1)
    with pytest.raises(ValueError, match=re.escape(key)):
        layer.load_official_state_dict(sd)


@pytest.mark.parametrize("name", OPERATORS)
def test_not_a_state_dict_raises(name):
    sd, layer, key = _operator(name)
    with pytest.raises(TypeError, match="load_official_state_dict"):
        layer.load_official_state_dict(list(sd.values()))
    sd[key] = sd[key].tolist()
    with pytest.raises(TypeError, match=re.escape(key)):
        layer.load_official_state_dict(sd)


@pytest.mark.parametrize("name", OPERATORS)
def test_load_keeps_dtype_and_parameters(name):
    """A float32 checkpoint loads into a float64 layer in place: the same
    ``Parameter`` objects, the layer's dtype, the checkpoint untouched."""
    sd, layer, _ = _operator(name)
    sd32 = {k: v.float() if v.is_floating_point() else v.clone() for k, v in sd.items()}
    copy = {k: v.clone() for k, v in sd32.items()}
    params = {k: id(p) for k, p in layer.named_parameters()}
    layer.load_official_state_dict(sd32)
    assert {k: id(p) for k, p in layer.named_parameters()} == params
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert sd32.keys() == copy.keys()
    assert all(torch.equal(sd32[k], copy[k]) for k in copy)
    torch.testing.assert_close(
        layer.weight.float().reshape(-1), sd32["weight"].reshape(-1), rtol=0, atol=0
    )


def test_odconv_depthwise_has_no_filter_head():
    """The official depthwise ODConv (``C_in == groups == C_out``) has no
    ``filter_fc``: a checkpoint with one is refused."""
    case = ODCONV_CASES[1]
    sd = odconv_official_state_dict(case)
    assert "attention.filter_fc.weight" not in sd
    h, c_out = sd["attention.fc.weight"].shape[0], case[1]
    sd["attention.filter_fc.weight"] = torch.zeros(c_out, h, 1, 1, dtype=torch.float64)
    sd["attention.filter_fc.bias"] = torch.zeros(c_out, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("attention.filter_fc.weight")):
        odconv_layer(case).load_official_state_dict(sd)


def test_deform_v1_checkpoint_into_modulated_layer_raises():
    """mmcv's DCNv1 ``conv_offset`` (2*G*k*k channels) does not fit a modulated
    layer (3*G*k*k): the shape error names the key."""
    v1 = DEFORM_CASES[2]
    v2 = v1[:8] + (True,) + v1[9:]
    sd = deform_official_state_dict(v1)
    with pytest.raises(ValueError, match=re.escape("conv_offset.weight")):
        deform_layer(v2).load_official_state_dict(sd)


def test_deform_mmcv_checkpoint_needs_the_sigmoid_mask():
    """mmcv's mask is ``sigmoid``: a modulated layer with the DCNv2-example scale 2
    would compute another function, so the load is refused and names the fix."""
    case = DEFORM_CASES[0]
    layer = deform_layer(case, mask_scale=2.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"expected mask_scale=1\.0 .* got mask_scale=2"
    ):
        layer.load_official_state_dict(deform_official_state_dict(case))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])
