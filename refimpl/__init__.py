"""Reference implementations for the book *Dynamic Convolution, Hands-On*.

Every operator is a drop-in replacement for ``torch.nn.Conv2d`` (same constructor
and shapes) backed by a functional form, a literal-loop reference and tests.
The chapter that derives each name is given in its module's docstring.

>>> from refimpl import ODConv2d
>>> layer = ODConv2d(64, 64, 3, padding=1)
"""

__version__ = "0.1.0"

from ._conv import set_temperature

# chapter 1: convolution arithmetic
from .arithmetic import (
    conv2d_fft,
    conv2d_loops,
    conv2d_unfold,
    conv_output_size,
    conv_transpose_output_size,
    receptive_field,
)

# chapter 2: CondConv
from .condconv import CondConv2d, condconv2d, condconv2d_reference

# chapter 5: DDF (the functional form is refimpl.ddf.ddf: the module keeps its name)
from .ddf import DDFConv2d

# chapter 6: deformable convolution
from .deform import DeformConv2d, deform_conv2d, deform_conv2d_reference

# chapter 3: attention over kernels
from .dynamic_conv import (
    DynamicConv2d,
    dynamic_conv2d,
    dynamic_conv2d_reference,
    temperature_schedule,
)

# chapter 7: FDConv (its parts are in refimpl.fdconv)
from .fdconv import FDConv2d
from .frequency import frequency_response

# chapter 8 (models; used from chapter 4 on): converting networks
from .models import (
    convert_conv2d,
    count_parameters,
    ddf_resnet,
    fdconv_resnet50,
    paper_resnet50,
)

# chapter 4: ODConv
from .odconv import ODConv2d, odconv2d, odconv2d_reference
from .per_sample import per_sample_conv2d, per_sample_conv2d_reference

__all__ = [
    "set_temperature",
    "per_sample_conv2d",
    "per_sample_conv2d_reference",
    "conv2d_fft",
    "conv2d_loops",
    "conv2d_unfold",
    "conv_output_size",
    "conv_transpose_output_size",
    "receptive_field",
    "frequency_response",
    "CondConv2d",
    "condconv2d",
    "condconv2d_reference",
    "DynamicConv2d",
    "dynamic_conv2d",
    "dynamic_conv2d_reference",
    "temperature_schedule",
    "ODConv2d",
    "odconv2d",
    "odconv2d_reference",
    "DDFConv2d",
    "DeformConv2d",
    "deform_conv2d",
    "FDConv2d",
    "deform_conv2d_reference",
    "convert_conv2d",
    "count_parameters",
    "ddf_resnet",
    "fdconv_resnet50",
    "paper_resnet50",
]
