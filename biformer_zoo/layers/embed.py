"""Cross-scale embedding layers of CrossFormer (arXiv 2108.00154): several kernels, one stride, concatenated.

``CrossScaleEmbed`` is the first embedding (kernels 4/8/16/32, stride 4, LayerNorm after);
``CrossScaleMerge`` is the merging layer between stages (LayerNorm before, kernels 2/4, stride 2).
Every kernel ``k`` gets padding ``(k - stride) // 2``, so all branches give the same ``floor(H / stride)``
output and are concatenated along channels. Small kernels get more channels: with ``n`` kernels, kernel ``i``
gets ``out_chans / 2**(i+1)`` channels and the last one the remainder ``out_chans / 2**(n-1)``.

On CPU the weight gradient of the large stem kernels (16 and 32 at stride 4) is computed as a stride-1 conv over
the space-to-depth input (``pixel_unshuffle`` by the stride); the same sums, about 4x (kernel 16) and 7x (kernel 32)
faster than oneDNN's strided weight gradient. The forward is the plain conv.
"""
from typing import Any, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module

__all__ = ['CrossScaleEmbed', 'CrossScaleMerge', 'cross_scale_channels']


def cross_scale_channels(out_chans: int, num_kernels: int) -> List[int]:
    """Output channels of each kernel: halves for the small kernels, the remainder to the largest one."""
    chans = [out_chans // 2 ** (i + 1) for i in range(num_kernels - 1)] + [out_chans // 2 ** (num_kernels - 1)]
    if sum(chans) != out_chans:
        raise ValueError(
            f'out_chans ({out_chans}) cannot be split over {num_kernels} kernels as {chans}; '
            f'use a multiple of {2 ** (num_kernels - 1)}')
    return chans


def space_to_depth_weight_grad(
        x: torch.Tensor,
        grad_out: torch.Tensor,
        weight: torch.Tensor,
        stride: int,
        padding: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients of ``F.conv2d(x, weight, stride=stride, padding=padding)``, kernel a multiple of
    the stride, as those of a stride-1 conv over ``pixel_unshuffle(pad(x), stride)`` with the kernel regrouped the
    same way."""
    out_chans, in_chans, k = weight.shape[0], weight.shape[1], weight.shape[2]
    blocks = k // stride
    x = F.pad(x, (padding, padding, padding, padding))
    # rows/columns past the last full stride block are never read by the strided conv
    x = x[:, :, :x.shape[2] // stride * stride, :x.shape[3] // stride * stride]
    x = F.pixel_unshuffle(x, stride)  # (B, in_chans * stride**2, H / stride, W / stride)
    # kernel (o, c, blocks * stride + dy, blocks * stride + dx) -> (o, c * stride**2 + dy * stride + dx, blocks, blocks)
    regrouped = weight.view(out_chans, in_chans, blocks, stride, blocks, stride).permute(0, 1, 3, 5, 2, 4)
    regrouped = regrouped.reshape(out_chans, in_chans * stride * stride, blocks, blocks)
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out, x, regrouped, [out_chans], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, True])
    grad_weight = grad_weight.view(out_chans, in_chans, stride, stride, blocks, blocks)
    return grad_weight.permute(0, 1, 4, 2, 5, 3).reshape(weight.shape), grad_bias


class _LargeKernelConv(torch.autograd.Function):
    """Strided conv whose weight gradient goes through ``space_to_depth_weight_grad``."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                padding: int) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs: Tuple, output: torch.Tensor) -> None:  # separate, so torch.func transforms work
        x, weight, bias, stride, padding = inputs
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        dtype = grad_out.dtype  # under autocast the conv ran in a lower precision than its inputs
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(
                x.shape, weight.to(dtype), grad_out, stride=ctx.stride, padding=ctx.padding).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = space_to_depth_weight_grad(
                x.to(dtype), grad_out, weight.to(dtype), ctx.stride, ctx.padding)
            grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None


@register_notrace_module
class StridedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and forward) whose CPU weight gradient is computed on space-to-depth input
    where the kernel spans at least ``4 x stride`` (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        k, s, p = self.kernel_size, self.stride, self.padding
        self.space_to_depth = (
            isinstance(p, tuple) and k[0] == k[1] and s[0] == s[1] > 1 and p[0] == p[1] and k[0] % s[0] == 0
            and k[0] >= 4 * s[0] and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == 'zeros')

    @torch.jit.unused
    def _conv_autograd(self, x: torch.Tensor) -> torch.Tensor:
        return _LargeKernelConv.apply(x, self.weight, self.bias, self.stride[0], self.padding[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.space_to_depth and x.device.type == 'cpu' and torch.is_grad_enabled() and self.weight.requires_grad:
                return self._conv_autograd(x)
        return self._conv_forward(x, self.weight, self.bias)


def _multi_kernel_convs(in_chans: int, out_chans: int, kernel_sizes: Sequence[int], stride: int) -> nn.ModuleList:
    for k in kernel_sizes:
        if k < stride or (k - stride) % 2:
            raise ValueError(
                f'every kernel size must be >= the stride ({stride}) and differ from it by an even number, '
                f'got {tuple(kernel_sizes)}')
    return nn.ModuleList([
        StridedConv2d(in_chans, chans, kernel_size=k, stride=stride, padding=(k - stride) // 2)
        for k, chans in zip(kernel_sizes, cross_scale_channels(out_chans, len(kernel_sizes)))
    ])


@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) map at the bottom/right so that H and W are multiples of ``multiple``."""
    pad_b = (multiple - x.shape[2] % multiple) % multiple
    pad_r = (multiple - x.shape[3] % multiple) % multiple
    if pad_b > 0 or pad_r > 0:
        x = F.pad(x, (0, pad_r, 0, pad_b))
    return x


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
        self.channels_last = channels_last
        self.norm = norm_layer(in_chans)
        self.reductions = _multi_kernel_convs(in_chans, out_chans, kernel_sizes, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = pad_to_multiple(self.norm(x).permute(0, 3, 1, 2), 2)  # (B, in_chans, H, W), H and W even
        branches = []
        for reduction in self.reductions:
            branches.append(reduction(x))
        x = torch.cat(branches, dim=1)  # (B, out_chans, H / 2, W / 2)
        return x.permute(0, 2, 3, 1) if self.channels_last else x
