"""Grouped self-attention of CrossFormer: short- and long-distance attention (SDA / LDA) with a dynamic position bias.

CrossFormer (Wang et al., ICLR 2022, arXiv 2108.00154) and CrossFormer++ (arXiv 2303.06908) alternate two kinds of
grouped attention. Short-distance attention (SDA) groups each ``G x G`` window of adjacent tokens. Long-distance
attention (LDA) groups tokens sampled every ``interval`` positions. Both add a bias computed by a small MLP (the
dynamic position bias, DPB) from the relative offsets of the tokens inside a group, so any group shape works.

One grouping covers both: the (padded) map is cut into regions of ``(group_h * interval) x (group_w * interval)``
tokens, and inside a region the tokens ``interval`` apart form a group of ``group_h x group_w`` tokens. SDA is
``interval = 1``.

How the group shape follows the map size (``group_layout``) is the rule of the official code:

- ``'crossformer'`` (the old ``crossformer`` branch, detection backbone): LDA keeps the interval fixed and a group
  spans the whole map, ``ceil(H / interval) x ceil(W / interval)``.
- ``'crossformerpp'`` (``main`` branch): LDA groups are ``G x G`` tokens ``interval`` apart, tiled over the map.
- In both, a map whose shorter side is at most ``G`` gets SDA with one square group of side ``min(H, W)``
  (CrossFormer) or ``max(H, W)`` (CrossFormer++).

Maps that do not tile are zero-padded at the bottom/right; padded tokens are masked out as keys, so they do not
change the result of the real tokens, and are cropped afterwards. Unlike the official code, nothing about the
layout is stored on the module, so a call never changes the next one.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module

from .helpers import check_feature_map, check_int_arg
from .padding import pad_to_multiple

__all__ = [
    'DynamicPosBias', 'LSDAttention', 'group_layout', 'group_tokens', 'ungroup_heads',
    'relative_position_inputs', 'padding_mask', 'explicit_attention',
]

GROUP_RULES = ('crossformer', 'crossformerpp')
_BIAS_CACHE_SIZE = 8  # group shapes kept per layer
_BIAS_CACHE_MAX_BYTES = 4 << 20  # larger biases are computed per call instead of held


def group_layout(
        height: int,
        width: int,
        group_size: int,
        interval: int,
        long_distance: bool,
        group_rule: str = 'crossformer',
) -> Tuple[int, int, int]:
    """Group shape and interval for a ``height x width`` map, following the official code.

    Returns:
        ``(group_h, group_w, interval)``; the map is padded to multiples of ``group_h * interval`` and
        ``group_w * interval``.
    """
    if min(height, width) <= group_size:
        side = min(height, width) if group_rule == 'crossformer' else max(height, width)
        return side, side, 1
    if not long_distance:
        return group_size, group_size, 1
    if group_rule == 'crossformer':
        return -(-height // interval), -(-width // interval), interval
    return group_size, group_size, interval


def group_tokens(x: torch.Tensor, group_h: int, group_w: int, interval: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B, groups, group_h * group_w, C), Hp and Wp multiples of the region size."""
    B, Hp, Wp, C = x.shape
    rows, cols = Hp // (group_h * interval), Wp // (group_w * interval)
    x = x.view(B, rows, group_h, interval, cols, group_w, interval, C)
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)  # (B, rows, cols, interval, interval, group_h, group_w, C)
    return x.reshape(B, rows * cols * interval * interval, group_h * group_w, C)


def ungroup_heads(x: torch.Tensor, Hp: int, Wp: int, group_h: int, group_w: int, interval: int) -> torch.Tensor:
    """Inverse of ``group_tokens`` for per-head outputs: (B, groups, heads, N, head_dim) -> (B, Hp, Wp, C).

    Merges the heads and returns the tokens to their places in one copy.
    """
    B, heads, head_dim = x.shape[0], x.shape[2], x.shape[4]
    rows, cols = Hp // (group_h * interval), Wp // (group_w * interval)
    x = x.view(B, rows, cols, interval, interval, heads, group_h, group_w, head_dim)
    x = x.permute(0, 1, 6, 3, 2, 7, 4, 5, 8)  # (B, rows, group_h, interval, cols, group_w, interval, heads, hd)
    return x.reshape(B, Hp, Wp, heads * head_dim)


def relative_position_inputs(
        group_h: int,
        group_w: int,
        device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the dynamic position bias for a ``group_h x group_w`` group.

    Returns:
        offsets: ((2 group_h - 1) * (2 group_w - 1), 2) float (dy, dx) of every possible relative offset.
        index: (N, N) int64, the row of ``offsets`` for each (query, key) pair, N = group_h * group_w.
    """
    dy = torch.arange(1 - group_h, group_h, device=device)
    dx = torch.arange(1 - group_w, group_w, device=device)
    offsets = torch.stack(torch.meshgrid(dy, dx, indexing='ij'), dim=-1).reshape(-1, 2).float()
    ys = torch.arange(group_h, device=device).repeat_interleave(group_w)  # (N,) row of each token
    xs = torch.arange(group_w, device=device).repeat(group_h)  # (N,) column of each token
    index = (ys[:, None] - ys[None, :] + group_h - 1) * (2 * group_w - 1) + (xs[:, None] - xs[None, :] + group_w - 1)
    return offsets, index


@register_notrace_function
def padding_mask(
        height: int,
        width: int,
        Hp: int,
        Wp: int,
        group_h: int,
        group_w: int,
        interval: int,
        dtype: torch.dtype,
        device: torch.device,
) -> torch.Tensor:
    """Additive key mask, (groups, 1, 1, N): a large negative value where a key is padding, else 0."""
    value = -1e6 if dtype != torch.float16 else -3.0e4  # the official value; float16 cannot hold it
    mask = torch.zeros(1, Hp, Wp, 1, dtype=dtype, device=device)
    mask[:, height:] = value
    mask[:, :, width:] = value
    mask = group_tokens(mask, group_h, group_w, interval)  # (1, groups, N, 1)
    return mask.view(mask.shape[1], 1, 1, mask.shape[2])


def explicit_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
        dropout_p: float = 0.,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` as matmuls, for a bias that needs a gradient on CPU.

    No fused CPU kernel of ``F.scaled_dot_product_attention`` gives the mask a gradient, so it runs its math path:
    the same ops plus a guard for rows that are masked out entirely. The padding mask here is finite, so that guard
    is not needed; without it forward + backward is about 10% faster (``benchmarks/custom_backward.py``).
    """
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


class DynamicPosBias(nn.Module):
    """Dynamic position bias: an MLP from a relative offset (dy, dx) to one bias per head.

    Layers: ``pos_proj`` (2 -> pos_dim), then three (LayerNorm, ReLU, Linear) steps ``pos1``, ``pos2``
    (pos_dim -> pos_dim) and ``pos3`` (pos_dim -> num_heads); ``residual`` adds skips around ``pos1``/``pos2``.
    """

    def __init__(self, pos_dim: int, num_heads: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = self._step(pos_dim, pos_dim)
        self.pos2 = self._step(pos_dim, pos_dim)
        self.pos3 = self._step(pos_dim, num_heads)

    @staticmethod
    def _step(dim: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        """(P, 2) offsets -> (P, num_heads) biases."""
        pos = self.pos_proj(offsets)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = pos + self.pos2(pos)
        else:
            pos = self.pos2(self.pos1(pos))
        return self.pos3(pos)


@register_notrace_module
class LSDAttention(nn.Module):
    """CrossFormer's short-/long-distance grouped attention on (B, C, H, W) maps of any size.

    Args:
        dim: Channels of the input and output.
        num_heads: Attention heads; must divide ``dim``.
        group_size: Group side ``G`` (SDA windows; LDA groups for CrossFormer++).
        interval: Sampling interval of LDA; unused by SDA.
        long_distance: LDA if True, SDA otherwise.
        group_rule: ``'crossformer'`` or ``'crossformerpp'``, how the group follows the map size (see module doc).
        qkv_bias: Bias in the query/key/value projection.
        qk_scale: Attention temperature; default ``head_dim ** -0.5``.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        dpb_residual: Residual connections inside the dynamic position bias MLP (False in the official models).
        channels_last: Take and return (B, H, W, C) tensors instead of (B, C, H, W).

    Attention runs through ``F.scaled_dot_product_attention`` with the position bias (plus the padding mask) as
    ``attn_mask``; on CPU, when the bias needs a gradient (training), as explicit matmuls and softmax instead.
    The position bias is computed once per call for the group shape in use. In eval mode with autograd off it is
    cached per (group shape, device, dtype, autocast dtype, parameter storage and version), so loading weights,
    optimizer steps and EMA updates all invalidate it; writes through ``.data`` bypass version counters, so after
    those call ``clear_position_bias_cache()``. Biases over 4 MiB (LDA across a whole detection-size map) are
    recomputed instead of held.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            group_size: int = 7,
            interval: int = 8,
            long_distance: bool = False,
            group_rule: str = 'crossformer',
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            dpb_residual: bool = False,
            channels_last: bool = False,
    ):
        super().__init__()
        check_int_arg('dim', dim, minimum=16, fix='pass the channels of the input map (the position bias MLP has '
                                                  'dim // 16 channels)')
        check_int_arg('num_heads', num_heads, fix=f'pass a divisor of dim={dim}')
        if dim % num_heads:
            divisors = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads}); use num_heads from '
                             f'{divisors}')
        if group_rule not in GROUP_RULES:
            raise ValueError(f'group_rule must be one of {GROUP_RULES}, got {group_rule!r}')
        check_int_arg('group_size', group_size, minimum=None, fix='pass the group side as an int, e.g. 7')
        check_int_arg('interval', interval, minimum=None, fix='pass the long-distance interval as an int, e.g. 8')
        if group_size < 1 or interval < 1:
            raise ValueError(f'group_size and interval must be >= 1, got {group_size} and {interval}; pass '
                             f'positive sizes (the official models use group_size=7 and interval 8, 4, 2, 1)')
        for name, p in (('attn_drop', attn_drop), ('proj_drop', proj_drop)):
            if not 0. <= p < 1.:
                raise ValueError(f'{name} must be a probability in [0, 1), got {p!r}; pass e.g. 0.0 or 0.1')
        self.num_heads = num_heads
        self.group_size = group_size
        self.interval = interval
        self.long_distance = long_distance
        self.group_rule = group_rule
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.channels_last = channels_last
        self.attn_drop = attn_drop

        self.pos = DynamicPosBias(dim // 16, num_heads, residual=dpb_residual)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: Dict[Tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        kind = 'LDA' if self.long_distance else 'SDA'
        return f'{kind}, num_heads={self.num_heads}, group_size={self.group_size}, interval={self.interval}, ' \
               f'group_rule={self.group_rule}'

    def __getstate__(self) -> Dict:
        # pickles and deep copies (torch.save of the module, checkpoints, EMA copies) start with an empty cache: its
        # entries are keyed by the storage of this instance's parameters, so a copy would never hit them
        state = super().__getstate__()
        state['_bias_cache'] = {}
        return state

    @torch.jit.unused
    def clear_position_bias_cache(self) -> None:
        """Forget the cached position biases (needed only after weights were written through ``.data``)."""
        self._bias_cache = {}

    @property
    @torch.jit.unused
    def cached_position_biases(self) -> int:
        """How many position biases the eval-mode cache holds."""
        return len(self._bias_cache)

    def compute_position_bias(self, group_h: int, group_w: int) -> torch.Tensor:
        """(num_heads, N, N) bias for a ``group_h x group_w`` group, N = group_h * group_w."""
        weight = self.pos.pos_proj.weight
        offsets, index = relative_position_inputs(group_h, group_w, weight.device)
        table = self.pos(offsets.to(weight.dtype))  # (P, heads)
        n = group_h * group_w
        # gathered head-major, so the (heads, N, N) result is contiguous without a second N*N copy
        return table.t().index_select(1, index.view(-1)).view(-1, n, n)

    @torch.jit.unused
    def _cached_position_bias(self, group_h: int, group_w: int) -> torch.Tensor:
        params = list(self.pos.parameters())
        if any(p.is_inference() for p in params):  # made under inference_mode: no version counter to key a cache on
            return self.compute_position_bias(group_h, group_w)
        device = params[0].device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (group_h, group_w, device, params[0].dtype, autocast) + tuple((p.data_ptr(), p._version) for p in params)
        bias = self._bias_cache.get(key)
        if bias is None:
            bias = self.compute_position_bias(group_h, group_w)
            if bias.numel() * bias.element_size() > _BIAS_CACHE_MAX_BYTES:
                return bias  # e.g. LDA over a whole detection-size map: recomputing is cheap, holding it is not
            # replace the dict instead of mutating it, so concurrent readers always see a complete one
            kept = list(self._bias_cache.items())[-(_BIAS_CACHE_SIZE - 1):]
            self._bias_cache = dict(kept + [(key, bias)])
        return bias

    def position_bias(self, group_h: int, group_w: int) -> torch.Tensor:
        """The bias for one call: cached in eval mode without autograd, computed otherwise (and under torch.compile,
        whose graph computes it once per call without a graph break, and under torch.jit.trace, so that a trace holds
        the computation rather than a cached tensor and two traces agree)."""
        if not torch.jit.is_scripting():
            if not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing()):
                return self._cached_position_bias(group_h, group_w)
        return self.compute_position_bias(group_h, group_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(
            x, self.qkv.in_features, self.qkv.weight.dtype, self.channels_last, 'LSDAttention', 'dim')
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        group_h, group_w, interval = group_layout(
            H, W, self.group_size, self.interval, self.long_distance, self.group_rule)
        x = pad_to_multiple(x, group_h * interval, group_w * interval, channels_last=True)
        Hp, Wp = x.shape[1], x.shape[2]
        padded = Hp > H or Wp > W

        tokens = group_tokens(x, group_h, group_w, interval)  # (B, groups, N, C)
        num_groups, n = tokens.shape[1], tokens.shape[2]
        head_dim = C // self.num_heads
        qkv = self.qkv(tokens).view(B, num_groups, n, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, groups, heads, N, head_dim)

        bias = self.position_bias(group_h, group_w).to(x.dtype)  # (heads, N, N)
        # groups fold into the batch axis: (B * groups, heads, N, head_dim), views of qkv
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        if padded:
            # one mask per group, repeated over the batch: (B * groups, heads, N, N), a view for B = 1; half the
            # size of copying q, k and v into a layout where one mask per group would broadcast
            mask = padding_mask(H, W, Hp, Wp, group_h, group_w, interval, x.dtype, x.device)
            attn_mask = (bias.unsqueeze(0) + mask).expand(B, -1, -1, -1, -1)
            attn_mask = attn_mask.reshape(B * num_groups, self.num_heads, n, n)  # explicit sizes: B may be 0
        else:
            attn_mask = bias.unsqueeze(0)  # (1, heads, N, N), one mask for all groups
        dropout_p = self.attn_drop if self.training else 0.
        if attn_mask.requires_grad and x.device.type == 'cpu':
            out = explicit_attention(q, k, v, attn_mask, self.scale, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale)

        out = ungroup_heads(out.reshape(B, num_groups, self.num_heads, n, head_dim), Hp, Wp, group_h, group_w, interval)
        if padded:
            out = out[:, :H, :W]
        out = self.proj_drop(self.proj(out))  # (B, H, W, C)
        if not self.channels_last:
            out = out.permute(0, 3, 1, 2)
        return out
