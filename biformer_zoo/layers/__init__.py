"""Reusable layers: each works on NCHW feature maps of any size, without the models."""
from .bra import BiLevelRoutingAttention
from .c2f import AttentionBottleneck, C2fAttention, ConvBNAct
from .conv import DepthwiseConv2d, StridedConv2d
from .embed import CrossScaleEmbed, CrossScaleMerge
from .global_attention import AttentionLePE
from .helpers import check_image_input
from .lsda import DynamicPosBias, LSDAttention
from .mlp import RecomputeGeluMlp
from .reference import reference_math, use_reference_math
