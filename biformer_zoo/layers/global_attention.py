"""BiFormer's global attention with a depthwise-conv position term (LePE), as in its last stage.

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023, arXiv 2303.08810); the routed
attention of the other stages is ``bra.BiLevelRoutingAttention``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .conv import DepthwiseConv2d
from .helpers import check_attention_args, check_feature_map

__all__ = ['AttentionLePE']


@register_notrace_module
class AttentionLePE(nn.Module):
    """Global multi-head self-attention plus a depthwise-conv position term (LePE), as in BiFormer's last stage.

    Args:
        dim: Channels of the input and output.
        num_heads: Attention heads.
        side_dwconv: Kernel of the LePE depthwise conv; 0 disables it.
        lepe_on_value: Apply LePE to the values (the official ``nchw`` STL model) instead of the input
            (the other official BiFormer models).
        channels_last: Take and return (B, H, W, C) tensors instead of (B, C, H, W).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            side_dwconv: int = 5,
            lepe_on_value: bool = False,
            channels_last: bool = False,
    ):
        super().__init__()
        check_attention_args(dim, num_heads, side_dwconv)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.lepe_on_value = lepe_on_value
        self.channels_last = channels_last
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lepe = DepthwiseConv2d(dim, side_dwconv) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.qkv.in_features, self.qkv.weight.dtype, self.channels_last, 'AttentionLePE', 'dim')
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        qkv = self.qkv(x)  # (B, H, W, 3 * C)
        q, k, v = qkv.view(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, H * W, C / heads)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            lepe_input = qkv[..., 2 * C:] if self.lepe_on_value else x
            out = out + self.lepe(lepe_input.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.proj(out)
        if not self.channels_last:
            out = out.permute(0, 3, 1, 2)
        return out
