"""Plug-in blocks for convolutional detectors (YOLO-style necks and backbones), built on the zoo's attention layers.

The layers in ``biformer_zoo.layers`` run on maps of any size: ``BiLevelRoutingAttention`` (BiFormer's routed
attention) and ``LSDAttention`` (CrossFormer's short/long-distance attention) take and return (B, C, H, W) maps by
default; ``CrossScaleEmbed`` / ``CrossScaleMerge`` (CrossFormer's multi-kernel embedding and downsampling) do so with
``channels_last=False``. ``C2fAttention`` puts one of the attentions into the C2f block of YOLOv8-style networks::

    from biformer_zoo.layers import C2fAttention
    block = C2fAttention(256, 256, depth=1, attention='bra', num_heads=4, num_regions=8, topk=4)
    y = block(torch.randn(2, 256, 40, 40))  # (2, 256, 40, 40)
"""
from typing import Any, Callable

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from .bra import BiLevelRoutingAttention
from .lsda import LSDAttention
from .helpers import check_feature_map, check_int_arg, parameter_dtype

__all__ = ['ConvBNAct', 'AttentionBottleneck', 'C2fAttention', 'ATTENTIONS']

ATTENTIONS = ('bra', 'lsda')


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias), BatchNorm, SiLU: the ``Conv`` unit of YOLO-style networks."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.SiLU(inplace=True),
        )


def _attention_layer(attention: str, dim: int, num_heads: int, **kwargs: Any) -> nn.Module:
    if attention == 'bra':
        return BiLevelRoutingAttention(dim, num_heads=num_heads, **kwargs)
    if attention == 'lsda':
        return LSDAttention(dim, num_heads=num_heads, **kwargs)
    raise ValueError(f'attention must be one of {ATTENTIONS}, got {attention!r}')


class AttentionBottleneck(nn.Module):
    """Pre-norm attention then a 3x3 conv pair, each with a residual connection; (B, C, H, W) in and out.

    Args:
        dim: Channels.
        attention: 'bra' (``BiLevelRoutingAttention``) or 'lsda' (``LSDAttention``).
        num_heads: Attention heads; must divide ``dim``.
        conv_layer: Builds the conv units as ``conv_layer(in_chans, out_chans, kernel_size)``; ``ConvBNAct`` by
            default (Ultralytics' ``Conv`` in ``biformer_zoo.integrations.ultralytics``, so that ``fuse()`` folds
            their BatchNorm).
        **attention_kwargs: Passed to the attention layer (``num_regions``, ``topk`` for BRA; ``group_size``,
            ``interval``, ``long_distance`` for LSDA).
    """

    def __init__(
            self,
            dim: int,
            attention: str = 'bra',
            num_heads: int = 4,
            conv_layer: Callable[[int, int, int], nn.Module] = ConvBNAct,
            **attention_kwargs: Any,
    ):
        super().__init__()
        check_int_arg('dim', dim, fix='pass the channels of the input map')
        self.norm = LayerNorm2d(dim)
        self.attn = _attention_layer(attention, dim, num_heads, **attention_kwargs)
        self.conv = nn.Sequential(conv_layer(dim, dim, 3), conv_layer(dim, dim, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.norm.normalized_shape[0], self.norm.weight.dtype, None, 'AttentionBottleneck', 'dim')
        x = x + self.attn(self.norm(x))
        return x + self.conv(x)


class C2fAttention(nn.Module):
    """YOLOv8's C2f block with attention bottlenecks (e.g. the "C2f-BRA" block).

    A 1x1 conv splits the input into two halves; ``depth`` bottlenecks run one after another on the second half;
    the two halves and every bottleneck output are concatenated and fused by a 1x1 conv.

    Args:
        in_chans: Input channels.
        out_chans: Output channels.
        depth: Number of attention bottlenecks.
        attention: 'bra' or 'lsda'.
        num_heads: Heads of each attention; must divide ``int(out_chans * expansion)``.
        expansion: Hidden channels as a fraction of ``out_chans``.
        conv_layer: Builds the 1x1 and 3x3 conv units, ``conv_layer(in_chans, out_chans, kernel_size)``.
        **attention_kwargs: Passed to the attention layers.
    """

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            depth: int = 1,
            attention: str = 'bra',
            num_heads: int = 4,
            expansion: float = 0.5,
            conv_layer: Callable[[int, int, int], nn.Module] = ConvBNAct,
            **attention_kwargs: Any,
    ):
        super().__init__()
        check_int_arg('in_chans', in_chans, fix='pass the channels of the input map')
        check_int_arg('out_chans', out_chans, fix='pass the channels of the output map')
        check_int_arg('depth', depth, minimum=0, fix='pass the number of attention bottlenecks')
        check_int_arg('num_heads', num_heads, fix='pass a divisor of the hidden channels int(out_chans * expansion)')
        hidden = int(out_chans * expansion)
        if hidden < 1 or hidden % num_heads:
            raise ValueError(
                f'hidden channels int(out_chans * expansion) = {hidden} must be a positive multiple of '
                f'num_heads={num_heads}; change out_chans, expansion or num_heads')
        self.in_chans = in_chans
        self.hidden = hidden
        self.split_conv = conv_layer(in_chans, 2 * hidden, 1)
        self.blocks = nn.ModuleList([
            AttentionBottleneck(hidden, attention, num_heads, conv_layer, **attention_kwargs) for _ in range(depth)])
        self.fuse_conv = conv_layer((2 + depth) * hidden, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.in_chans, parameter_dtype(self.split_conv), None, 'C2fAttention', 'in_chans')
        parts = list(self.split_conv(x).chunk(2, dim=1))  # 2 x (B, hidden, H, W)
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.fuse_conv(torch.cat(parts, dim=1))  # (B, out_chans, H, W)
