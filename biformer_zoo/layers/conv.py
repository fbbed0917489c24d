"""``nn.Conv2d`` variants with a faster CPU weight gradient; same parameters, same forward.

oneDNN computes some weight gradients far slower than the convolution itself. Two shapes matter here:

- ``StridedConv2d``: kernels of at least 4x the stride (CrossFormer's 16 and 32 stem kernels at stride 4). The
  weight gradient is that of a stride-1 conv over ``pixel_unshuffle(pad(x), stride)`` with the kernel regrouped the
  same way: the same sums, about 4x (kernel 16) and 7x (kernel 32) faster.
- ``DepthwiseConv2d``: depthwise "same" convs with 5-wide kernels (BiFormer's LePE). oneDNN's depthwise weight
  gradient is fast for kernels up to 3 wide and 5-10x slower for 5 wide, so the 5-wide gradient is assembled from
  two 3-wide ones over the input shifted one column left and right (about 2-4x faster at BiFormer's shapes).

Both only change backward, and only on CPU in training; elsewhere they are ``nn.Conv2d``.
"""
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .reference import use_reference_math

__all__ = ['StridedConv2d', 'DepthwiseConv2d', 'space_to_depth_weight_grad', 'column_split_weight_grad']

# (x, grad_out, weight, stride, padding) -> (weight gradient, bias gradient)
WeightGrad = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int, Tuple[int, int]], Tuple[torch.Tensor, torch.Tensor]]


def space_to_depth_weight_grad(
        x: torch.Tensor,
        grad_out: torch.Tensor,
        weight: torch.Tensor,
        stride: int,
        padding: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients of ``F.conv2d(x, weight, stride=stride, padding=padding)`` (square kernel, a
    multiple of the stride) as those of a stride-1 conv over ``pixel_unshuffle(pad(x), stride)`` with the kernel
    regrouped the same way."""
    out_chans, in_chans, k = weight.shape[0], weight.shape[1], weight.shape[2]
    blocks = k // stride
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
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


def column_split_weight_grad(
        x: torch.Tensor,
        grad_out: torch.Tensor,
        weight: torch.Tensor,
        stride: int,
        padding: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients of a stride-1 depthwise conv with a (kh, 5) kernel and padding (kh // 2, 2), as two
    (kh, 3) weight gradients: kernel columns 0-2 over the map shifted one column right, columns 2-4 over it shifted
    one column left.

    The map is copied once, into a buffer where each row gets one zero column on both sides and the rows are laid
    out flat (channels last) with one zero token before and after. Shifting the flat buffer by one token then shifts
    every row by one column and moves only zero columns from row to row, so both shifted maps are views of it.
    """
    B, C, H, W = x.shape
    row = W + 2
    flat = x.new_empty(B * H * row + 2, C)  # one zero token, the rows with their zero columns, one zero token
    rows = flat[1:-1].view(B, H, row, C)
    for zeros in (flat[0], flat[-1], rows[:, :, 0], rows[:, :, -1]):
        zeros.zero_()
    rows[:, :, 1:W + 1] = x.permute(0, 2, 3, 1)
    narrow = weight.new_empty(C, 1, weight.shape[2], 3)
    grads = []
    for start in (0, 2):  # token i of the view is token i - 1 (map shifted right) or i + 1 (shifted left)
        shifted = flat[start:start + B * H * row].view(B, H, row, C).permute(0, 3, 1, 2)  # (B, C, H, W + 2)
        grads.append(torch.ops.aten.convolution_backward(
            grad_out, shifted, narrow, [C], [1, 1], [padding[0], 0], [1, 1], False, [0, 0], C,
            [False, True, start == 0]))
    (_, left, grad_bias), (_, right, _) = grads
    return torch.cat([left, right[..., 1:]], dim=-1), grad_bias  # column 2 is in both; taken from the left


class _ConvWeightGrad(torch.autograd.Function):
    """``F.conv2d`` whose weight and bias gradients come from ``weight_grad``."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                padding: Tuple[int, int], groups: int, weight_grad: WeightGrad) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)

    @staticmethod
    def setup_context(ctx, inputs: Tuple, output: torch.Tensor) -> None:  # separate, so torch.func transforms work
        x, weight, bias, stride, padding, groups, weight_grad = inputs
        ctx.stride, ctx.padding, ctx.groups, ctx.weight_grad = stride, padding, groups, weight_grad
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        dtype = grad_out.dtype  # under autocast the conv ran in a lower precision than its inputs
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(
                x.shape, weight.to(dtype), grad_out, stride=ctx.stride, padding=ctx.padding,
                groups=ctx.groups).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = ctx.weight_grad(x.to(dtype), grad_out, weight.to(dtype), ctx.stride, ctx.padding)
            grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None


class _WeightGradConv2d(nn.Conv2d):
    """``nn.Conv2d`` that takes its CPU training weight gradient from ``weight_grad`` where ``uses_weight_grad``.

    A non-None ``identity`` buffer (the identity kernel) is added to the weight: the conv then also adds its input.
    """
    uses_weight_grad: bool = False
    identity: Optional[torch.Tensor]

    @staticmethod
    def weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, stride: int,
                    padding: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.jit.unused
    def _conv_autograd(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _ConvWeightGrad.apply(x, weight, self.bias, self.stride[0], self.padding, self.groups, self.weight_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, identity = self.weight, self.identity
        if identity is not None:
            weight = weight + identity
        if not torch.jit.is_scripting():
            cpu_training = x.device.type == 'cpu' and torch.is_grad_enabled() and self.weight.requires_grad \
                and x.numel() > 0  # an empty batch has no gradient to compute
            if self.uses_weight_grad and cpu_training and not use_reference_math():
                return self._conv_autograd(x, weight)
        return self._conv_forward(x, weight, self.bias)


@register_notrace_module
class StridedConv2d(_WeightGradConv2d):
    """``nn.Conv2d`` whose CPU weight gradient is computed on space-to-depth input where the kernel spans at least
    ``4 x stride`` (see the module doc)."""
    weight_grad = staticmethod(space_to_depth_weight_grad)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_buffer('identity', None, persistent=False)
        k, s, p = self.kernel_size, self.stride, self.padding
        self.uses_weight_grad = (
            isinstance(p, tuple) and k[0] == k[1] and s[0] == s[1] > 1 and p[0] == p[1] and k[0] % s[0] == 0
            and k[0] >= 4 * s[0] and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == 'zeros')


@register_notrace_module
class DepthwiseConv2d(_WeightGradConv2d):
    """Depthwise "same" conv, ``nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)``, whose CPU
    weight gradient for 5-wide kernels is assembled from two 3-wide ones (see the module doc).

    Args:
        dim: Channels of the input and output.
        kernel_size: Odd kernel side.
        bias: Learn a bias.
        residual: Return ``x + conv(x)``, computed as one conv with 1 added to the centre of every kernel (an
            identity kernel buffer, not in the state dict): no separate add, and no gradient sum in backward.
    """
    weight_grad = staticmethod(column_split_weight_grad)

    def __init__(self, dim: int, kernel_size: int, bias: bool = True, residual: bool = False):
        if kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd for a "same" depthwise conv, got {kernel_size}')
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)
        self.uses_weight_grad = kernel_size == 5
        identity = None
        if residual:
            identity = torch.zeros(dim, 1, kernel_size, kernel_size)
            identity[:, :, kernel_size // 2, kernel_size // 2] = 1.
        self.register_buffer('identity', identity, persistent=False)
