"""Cross-scale embedding layers of CrossFormer (arXiv 2108.00154): several kernels, one stride, concatenated.

``CrossScaleEmbed`` is the first embedding (kernels 4/8/16/32, stride 4, LayerNorm after);
``CrossScaleMerge`` is the merging layer between stages (LayerNorm before, kernels 2/4, stride 2).
Every kernel ``k`` gets padding ``(k - stride) // 2``, so all branches give the same ``floor(H / stride)``
output and are concatenated along channels. Small kernels get more channels: with ``n`` kernels, kernel ``i``
gets ``out_chans / 2**(i+1)`` channels and the last one the remainder ``out_chans / 2**(n-1)``.

The branches are ``StridedConv2d`` (``conv.py``): on CPU the weight gradient of the large stem kernels (16 and 32 at
stride 4) goes through space-to-depth input, several times faster than oneDNN's strided weight gradient.
"""
from typing import List, Sequence, Type

import torch
import torch.nn as nn

from .conv import StridedConv2d
from .helpers import check_feature_map, check_int_arg
from .padding import pad_to_multiple

__all__ = ['CrossScaleEmbed', 'CrossScaleMerge', 'cross_scale_channels']


def cross_scale_channels(out_chans: int, num_kernels: int) -> List[int]:
    """Output channels of each kernel: halves for the small kernels, the remainder to the largest one."""
    chans = [out_chans // 2 ** (i + 1) for i in range(num_kernels - 1)] + [out_chans // 2 ** (num_kernels - 1)]
    if sum(chans) != out_chans:
        raise ValueError(
            f'out_chans ({out_chans}) cannot be split over {num_kernels} kernels as {chans}; '
            f'use a multiple of {2 ** (num_kernels - 1)}')
    return chans


def _multi_kernel_convs(in_chans: int, out_chans: int, kernel_sizes: Sequence[int], stride: int) -> nn.ModuleList:
    check_int_arg('in_chans', in_chans, fix='pass the channels of the input')
    check_int_arg('out_chans', out_chans, fix='pass the channels of the output')
    check_int_arg('stride', stride, fix='pass the downsampling factor, e.g. 4')
    if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Sequence) or not kernel_sizes:
        raise ValueError(f'kernel_sizes must be a non-empty sequence of ints, got {kernel_sizes!r}; pass e.g. (2, 4)')
    for k in kernel_sizes:
        check_int_arg('every kernel size', k, minimum=None, fix=f'pass ints >= the stride ({stride})')
        if k < stride or (k - stride) % 2:
            raise ValueError(
                f'every kernel size must be >= the stride ({stride}) and differ from it by an even number, '
                f'got {tuple(kernel_sizes)}')
    return nn.ModuleList([
        StridedConv2d(in_chans, chans, kernel_size=k, stride=stride, padding=(k - stride) // 2)
        for k, chans in zip(kernel_sizes, cross_scale_channels(out_chans, len(kernel_sizes)))
    ])


class CrossScaleEmbed(nn.Module):
    """Cross-scale patch embedding: (B, in_chans, H, W) image -> (B, H/stride, W/stride, out_chans).

    Args:
        in_chans: Image channels.
        out_chans: Embedding channels.
        kernel_sizes: Kernel of each conv branch, smallest first.
        stride: Stride of every branch (the patch size).
        norm_layer: Norm on the concatenated embedding; None for none.
        channels_last: Return (B, H', W', C) (True) or (B, C, H', W') (False).
    """

    def __init__(
            self,
            in_chans: int = 3,
            out_chans: int = 96,
            kernel_sizes: Sequence[int] = (4, 8, 16, 32),
            stride: int = 4,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            channels_last: bool = True,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.projs = _multi_kernel_convs(in_chans, out_chans, kernel_sizes, stride)
        self.norm = norm_layer(out_chans) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.projs[0]
        check_feature_map(x, conv.in_channels, conv.weight.dtype, None, 'CrossScaleEmbed', 'in_chans')
        branches = []
        for proj in self.projs:
            branches.append(proj(x))
        x = torch.cat(branches, dim=1)  # (B, out_chans, H / stride, W / stride)
        x = self.norm(x.permute(0, 2, 3, 1))
        return x if self.channels_last else x.permute(0, 3, 1, 2)


class CrossScaleMerge(nn.Module):
    """Cross-scale merging between stages: norm, then several stride-2 kernels, concatenated.

    Odd sides are zero-padded at the bottom/right (after the norm), so the output is ``ceil(H / 2)``; the
    official layer only accepts even sides, where both agree.

    Args:
        in_chans: Input channels.
        out_chans: Output channels.
        kernel_sizes: Kernel of each conv branch, smallest first.
        norm_layer: Norm applied to the input.
        channels_last: Take and return (B, H, W, C) (True) or (B, C, H, W) (False).
    """

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            kernel_sizes: Sequence[int] = (2, 4),
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            channels_last: bool = True,
    ):
        super().__init__()
        check_int_arg('in_chans', in_chans, fix='pass the channels of the input')  # before the norm is built on it
        self.channels_last = channels_last
        self.norm = norm_layer(in_chans)
        self.reductions = _multi_kernel_convs(in_chans, out_chans, kernel_sizes, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.reductions[0]
        check_feature_map(x, conv.in_channels, conv.weight.dtype, self.channels_last, 'CrossScaleMerge', 'in_chans')
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = pad_to_multiple(self.norm(x).permute(0, 3, 1, 2), 2, 2)  # (B, in_chans, H, W), H and W even
        branches = []
        for reduction in self.reductions:
            branches.append(reduction(x))
        x = torch.cat(branches, dim=1)  # (B, out_chans, H / 2, W / 2)
        return x.permute(0, 2, 3, 1) if self.channels_last else x
