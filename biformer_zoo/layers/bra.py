"""Bi-Level Routing Attention (BRA) and the LePE global attention of BiFormer.

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023, arXiv 2303.08810).

BRA splits a feature map into ``num_regions x num_regions`` regions. Each query region is routed to the
``topk`` regions whose mean key is most similar to its mean query (coarse level), then every query token
attends to all tokens of those routed regions (fine level). A depthwise conv on the values (LePE) is added
before the output projection.

The official code builds the routed keys/values with ``expand`` + ``gather``; its backward scatters into a
tensor ``num_regions**2`` times the key/value size. Here the routed regions are picked with one
``index_select`` over the flattened (batch, region) axis, whose backward is an ``index_add`` of the routed
size, and attention runs through ``F.scaled_dot_product_attention``.

Maps whose sides are not multiples of ``num_regions`` are zero-padded at the bottom/right before the
projections and cropped afterwards, exactly like the official ``auto_pad=True`` path.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['BiLevelRoutingAttention', 'AttentionLePE', 'route_regions']


def route_regions(query: torch.Tensor, key: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` key regions for every query region.

    Args:
        query: Region-mean queries, (B, regions, C).
        key: Region-mean keys, (B, regions, C).
        topk: Number of routed regions per query region.

    Returns:
        (B, regions, topk) int64 region indices.
    """
    # routing is not differentiable in BiFormer (the official code detaches q and k)
    affinity = query.detach() @ key.detach().transpose(-2, -1)  # (B, regions, regions)
    return torch.topk(affinity, k=topk, dim=-1).indices


@register_notrace_module
class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention on (B, C, H, W) maps, or (B, H, W, C) maps with ``channels_last=True``.

    Args:
        dim: Channels of the input and output.
        num_heads: Attention heads; must divide ``dim`` and ``qk_dim``.
        num_regions: Regions per side (``n_win`` in the official code); the map is cut into
            ``num_regions**2`` regions.
        topk: Routed regions per query region, 1 <= topk <= num_regions**2.
        qk_dim: Channels of queries and keys (default ``dim``).
        qk_scale: Attention temperature; default ``qk_dim ** -0.5`` (over all heads, as in the official code).
        side_dwconv: Kernel of the LePE depthwise conv on the values; 0 disables it.
        channels_last: Take and return (B, H, W, C) tensors instead of (B, C, H, W).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            num_regions: int = 7,
            topk: int = 4,
            qk_dim: Optional[int] = None,
            qk_scale: Optional[float] = None,
            side_dwconv: int = 5,
            channels_last: bool = False,
    ):
        super().__init__()
        qk_dim = qk_dim or dim
        if num_regions < 1:
            raise ValueError(f'num_regions (n_win) must be >= 1, got {num_regions}')
        if not 1 <= topk <= num_regions ** 2:
            raise ValueError(
                f'topk must be between 1 and num_regions**2 = {num_regions ** 2} (num_regions={num_regions}), '
                f'got {topk}; lower topk or raise num_regions (n_win)')
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f'dim ({dim}) and qk_dim ({qk_dim}) must be divisible by num_heads ({num_heads})')
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.num_regions = num_regions
        self.topk = topk
        self.scale = qk_scale or qk_dim ** -0.5
        self.channels_last = channels_last

        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, num_regions={self.num_regions}, topk={self.topk}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        B, H, W, _ = x.shape
        n = self.num_regions
        pad_b, pad_r = (n - H % n) % n, (n - W % n) % n
        if pad_b > 0 or pad_r > 0:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        rh, rw = Hp // n, Wp // n
        num_regions, region_len = n * n, rh * rw
        qk_dim, heads = self.qk_dim, self.num_heads

        qkv_map = self.qkv(x)  # (B, Hp, Wp, 2 * qk_dim + dim)
        # group the tokens of each region together
        qkv = qkv_map.view(B, n, rh, n, rw, -1).transpose(2, 3).reshape(B, num_regions, region_len, -1)
        q, kv = qkv.split([qk_dim, qk_dim + self.dim], dim=-1)  # (B, regions, tokens, C)

        # coarse level: route each query region to its topk key regions
        routed = route_regions(q.mean(2) * self.scale, kv[..., :qk_dim].mean(2), self.topk)  # (B, regions, topk)
        offsets = torch.arange(B, device=x.device).view(B, 1, 1) * num_regions
        kv = kv.reshape(B * num_regions, region_len, -1).index_select(0, (routed + offsets).flatten())
        kv = kv.view(B * num_regions, self.topk * region_len, -1)  # (B * regions, routed tokens, qk_dim + dim)
        k = kv[..., :qk_dim].unflatten(-1, (heads, -1))  # (B * regions, routed tokens, heads, d_qk)
        v = kv[..., qk_dim:].unflatten(-1, (heads, -1))  # (B * regions, routed tokens, heads, d_v)

        # fine level: token attention within the routed regions
        q = q.reshape(B * num_regions, region_len, heads, -1).transpose(1, 2)  # (B * regions, heads, tokens, d)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), scale=self.scale)
        # (B * regions, heads, tokens, d) -> (B, Hp, Wp, dim)
        out = out.transpose(1, 2).reshape(B, n, n, rh, rw, self.dim).transpose(2, 3).reshape(B, Hp, Wp, self.dim)

        if self.lepe is not None:
            value_map = qkv_map[..., 2 * qk_dim:].permute(0, 3, 1, 2)  # (B, dim, Hp, Wp)
            out = out + self.lepe(value_map).permute(0, 2, 3, 1)
        out = self.proj(out)
        if pad_b > 0 or pad_r > 0:
            out = out[:, :H, :W].contiguous()
        if not self.channels_last:
            out = out.permute(0, 3, 1, 2)
        return out


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
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.lepe_on_value = lepe_on_value
        self.channels_last = channels_last
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
