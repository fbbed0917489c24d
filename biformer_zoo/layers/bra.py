"""Bi-Level Routing Attention (BRA), the attention of BiFormer's first three stages (its last stage:
``global_attention.AttentionLePE``).

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023, arXiv 2303.08810).

BRA splits a feature map into ``num_regions x num_regions`` regions. Each query region is routed to the
``topk`` regions whose mean key is most similar to its mean query (coarse level), then every query token
attends to all tokens of those routed regions (fine level). A depthwise conv on the values (LePE) is added
before the output projection.

The official code builds the routed keys/values with ``expand`` + ``gather``; its backward scatters into a
tensor ``num_regions**2`` times the key/value size. Here the plain math (``routed_attention``) gathers the rows of
the routed tokens with ``index_select`` and runs ``F.scaled_dot_product_attention``; the other executions compute the
same attention faster:

- ``'gather'``: the same forward, and in training a custom autograd Function (``_routed_gather``) that keeps only
  the projected tokens for backward (it gathers again, runs the attention backward, and sums the gradients with
  ``index_add_``) instead of ``topk`` copies of the routed keys/values.
- ``'dense'``: where the routing keeps a large share of the regions (BiFormer's third stage routes 16 of 49),
  gathering costs more than it saves: every token attends to the whole map through one
  ``scaled_dot_product_attention`` call with an additive mask (0 or -inf) that allows exactly the routed regions.
  Masked scores get zero weight, so only the wasted multiplications differ; FLOP counts use the routed path
  (``count_routed``).
- ``'triton'``: Triton kernels (``_routed_triton``) that read the routed regions' keys/values in place through the
  routing indices, forward and backward, with no gathered copies and no mask (CUDA; CPU tensors only under
  Triton's interpreter, for tests).

Every execution returns the attention as a (B, Hp, Wp, dim) map. Which one runs is chosen per call
(``attn_impl='auto'``) and never changes the result beyond rounding; the ``attn_impl`` argument and the
``routed_attention_impl`` context manager select one, ``'reference'`` being the plain math under ordinary autograd
(which ``layers.reference_math()`` also selects).

Maps whose sides are not multiples of ``num_regions`` are zero-padded at the bottom/right before the
projections and cropped afterwards, exactly like the official ``auto_pad=True`` path.
"""
from contextlib import contextmanager
from typing import ContextManager, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from . import _routed_triton
from ._routed_gather import GatheredAttentionFunction, gather_qkv
from .conv import DepthwiseConv2d
from .helpers import check_attention_args, check_feature_map, check_int_arg
from .padding import pad_to_multiple
from .reference import use_reference_math

__all__ = [
    'BiLevelRoutingAttention', 'ATTN_IMPLS', 'RegionRouter', 'route_regions', 'routed_attention',
    'routing_mask', 'routed_attention_impl', 'count_routed']

# executions of the fine level: chosen per call, or the plain math, or one of the fast paths
ATTN_IMPLS = ('auto', 'reference', 'gather', 'dense', 'triton')
# whether 'triton' can run at all (a module-level bool, a constant to TorchScript)
_TRITON_INSTALLED = _routed_triton.AVAILABLE


def route_regions(query: torch.Tensor, key: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Routing scores of every query region over the key regions, and the indices of its ``topk`` best.

    Args:
        query: Region-mean queries, scaled, (B, regions, C).
        key: Region-mean keys, (B, regions, C).
        topk: Number of routed regions per query region.

    Returns:
        (B, regions, regions) scores and (B, regions, topk) int64 region indices.
    """
    # routing is not differentiable in BiFormer (the official code detaches q and k)
    affinity = query.detach() @ key.detach().transpose(-2, -1)  # (B, regions, regions)
    return affinity, torch.topk(affinity, k=topk, dim=-1).indices


class RegionRouter(nn.Module):
    """BRA's coarse level as a module without parameters: region-mean queries and keys in, routing scores and the
    ``topk`` routed regions out (``route_regions``). Being a module, it lets forward hooks see the routing of each
    call whatever execution runs the fine level (``biformer_zoo.viz.record_routing``)."""

    def __init__(self, topk: int, scale: float):
        super().__init__()
        self.topk = topk
        self.scale = scale

    def extra_repr(self) -> str:
        return f'topk={self.topk}'

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, regions, C) region means -> (B, regions, regions) scores, (B, regions, topk) indices."""
        return route_regions(query * self.scale, key, self.topk)


def region_token_index(num_regions: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat (row-major) token positions of each region of a (height, width) map, (num_regions**2, tokens)."""
    rh, rw = height // num_regions, width // num_regions
    rows = torch.arange(height, device=device).view(num_regions, rh, 1, 1)
    cols = torch.arange(width, device=device).view(1, 1, num_regions, rw)
    return (rows * width + cols).permute(0, 2, 1, 3).reshape(num_regions * num_regions, rh * rw)


def routing_mask(
        routed: torch.Tensor,
        num_regions: int,
        height: int,
        width: int,
        dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Attention mask over the tokens of a (height, width) map that allows exactly the routed regions' keys.

    Args:
        routed: (B, regions, topk) region indices from ``route_regions``.
        dtype: None for a boolean mask (True where allowed); a float dtype for the additive mask that SDPA would
            make of it (0 where allowed, -inf elsewhere), which spares SDPA that conversion in forward and backward.

    Returns:
        (B, 1, height * width, height * width), tokens in row-major order.
    """
    regions = num_regions * num_regions
    rows = torch.arange(height, device=routed.device) // (height // num_regions)
    cols = torch.arange(width, device=routed.device) // (width // num_regions)
    token_region = (rows.view(-1, 1) * num_regions + cols.view(1, -1)).flatten()  # (H * W,)
    # (value elsewhere, value where routed): False/True as a boolean mask, -inf/0 as an additive one
    blocked, kept = (0., 1.) if dtype is None else (float('-inf'), 0.)
    dtype = torch.bool if dtype is None else dtype
    allowed = torch.full((routed.shape[0], regions, regions), blocked, dtype=dtype, device=routed.device)
    allowed.scatter_(2, routed, torch.full_like(routed, kept, dtype=dtype))  # a Tensor source traces with jit
    return allowed.index_select(1, token_region).index_select(2, token_region).unsqueeze(1)


def routed_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_index: torch.Tensor,
        kv_index: torch.Tensor,
        heads: int,
        scale: float,
) -> torch.Tensor:
    """Attention of every query region over the tokens of its routed regions.

    Args:
        q: Projected queries of all tokens of the batch, (B * H * W, qk_dim).
        k: Projected keys, (B * H * W, qk_dim).
        v: Projected values, (B * H * W, dim).
        q_index: Rows holding each region's queries, (B * regions, tokens).
        kv_index: Rows holding the keys/values of each region's routed regions, (B * regions, topk * tokens).
        heads: Attention heads.
        scale: Attention temperature.

    Returns:
        (B * regions, heads, tokens, dim / heads)
    """
    q, k, v = gather_qkv(q, k, v, q_index, kv_index, heads)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


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
        attn_impl: How the fine level runs; the result is the same up to rounding. ``'reference'``: the plain math
            (``routed_attention``: gathered routed tokens, SDPA, ordinary autograd). ``'gather'``: the same
            forward with a custom backward that keeps only the projected tokens. ``'dense'``: every token over the
            whole map, masked to its routed regions. ``'triton'``: Triton kernels that read the routed keys/values
            in place, forward and backward (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; a
            ``ValueError`` elsewhere, or at construction where Triton is not installed). ``'auto'`` (default):
            ``'triton'`` on CUDA where Triton is installed (no GPU measurement of it yet: docs/performance.md);
            elsewhere ``'dense'`` where it wastes little, else ``'gather'``; ``'reference'`` when scripting or
            tracing.

    Attributes ``dense_max_ratio`` and ``dense_max_tokens`` tune ``'auto'``: the masked dense path runs when it
    computes at most ``dense_max_ratio`` times the routed attention scores (``num_regions**2 <= dense_max_ratio *
    topk``) and the padded map has at most ``dense_max_tokens`` tokens.
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
            attn_impl: str = 'auto',
    ):
        super().__init__()
        qk_dim = qk_dim or dim
        _check_impl(attn_impl)
        check_attention_args(dim, num_heads, side_dwconv, qk_dim)
        check_int_arg('num_regions (n_win)', num_regions, fix='pass the number of regions per side, e.g. 7')
        check_int_arg('topk', topk, fix=f'pass an int between 1 and num_regions**2 = {num_regions ** 2}')
        if not 1 <= topk <= num_regions ** 2:
            raise ValueError(
                f'topk must be between 1 and num_regions**2 = {num_regions ** 2} (num_regions={num_regions}), '
                f'got {topk}; lower topk or raise num_regions (n_win)')
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.num_regions = num_regions
        self.topk = topk
        self.scale = qk_scale or qk_dim ** -0.5
        self.channels_last = channels_last
        self.attn_impl = attn_impl
        self.dense_max_ratio = 4.0
        self.dense_max_tokens = 1024

        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.router = RegionRouter(topk, self.scale)
        self.lepe = DepthwiseConv2d(dim, side_dwconv) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, num_regions={self.num_regions}, topk={self.topk}'

    @torch.jit.unused
    def _routed_attention_autograd(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_index: torch.Tensor,
                                   kv_index: torch.Tensor) -> torch.Tensor:
        return GatheredAttentionFunction.apply(q, k, v, q_index, kv_index, self.num_heads, self.scale)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.dim, self.qkv.weight.dtype, self.channels_last, 'BiLevelRoutingAttention', 'dim')
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        B, H, W, _ = x.shape
        n = self.num_regions
        x = pad_to_multiple(x, n, n, channels_last=True)  # before the projections, as the official auto_pad does
        Hp, Wp = x.shape[1], x.shape[2]
        rh, rw = Hp // n, Wp // n

        # one projection, computed as three so that q, k and v each come out contiguous
        q_weight, k_weight, v_weight = self.qkv.weight.split([self.qk_dim, self.qk_dim, self.dim])
        q_bias, k_bias, v_bias = self.qkv.bias.split([self.qk_dim, self.qk_dim, self.dim])
        q = F.linear(x, q_weight, q_bias)  # (B, Hp, Wp, qk_dim)
        k = F.linear(x, k_weight, k_bias)  # (B, Hp, Wp, qk_dim)
        v = F.linear(x, v_weight, v_bias)  # (B, Hp, Wp, dim)

        # coarse level: route each region by the mean of its queries and keys (a reshape and a mean rather than a
        # pooling kernel computed from the map size, so that the TorchScript-based ONNX exporter traces it)
        q_regions = q.detach().view(B, n, rh, n, rw, self.qk_dim).mean((2, 4)).flatten(1, 2)  # (B, regions, qk_dim)
        k_regions = k.detach().view(B, n, rh, n, rw, self.qk_dim).mean((2, 4)).flatten(1, 2)  # (B, regions, qk_dim)
        _, routed = self.router(q_regions, k_regions)  # (B, regions, topk)

        lepe = None if self.lepe is None else self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, Hp, Wp, dim)
        out = self.proj(self.fine_attention(q, k, v, routed, lepe))
        if Hp > H or Wp > W:
            out = out[:, :H, :W].contiguous()
        if not self.channels_last:
            out = out.permute(0, 3, 1, 2)
        return out

    def fine_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token attention of projected (B, Hp, Wp, *) maps within the routed regions, as ``attn_impl`` says, plus
        ``residual`` (B, Hp, Wp, dim) if given (the LePE map); (B, Hp, Wp, dim) from every execution."""
        if torch.jit.is_scripting():
            impl = self.auto_impl(v)
        else:
            impl = self._resolve_impl(v)
        if impl == 'dense':
            Hp, Wp = v.shape[1], v.shape[2]
            out = self._masked_dense_attention(q, k, v, routing_mask(routed, self.num_regions, Hp, Wp, q.dtype))
        elif impl == 'triton':
            out = self._triton_attention(q, k, v, routed)
        else:  # the gathered paths add the residual while putting their region-order output in row-major order
            return self._gathered_attention(q, k, v, routed, residual, custom_backward=impl == 'gather')
        return out if residual is None else out + residual

    @torch.jit.unused
    def _resolve_impl(self, v: torch.Tensor) -> str:
        """The execution this call runs: ``attn_impl``, ``'auto'`` resolved, or ``'reference'`` under
        ``reference_math()``."""
        if use_reference_math():
            return 'reference'
        if self.attn_impl == 'auto':
            return self.auto_impl(v)
        if self.attn_impl == 'triton' and not _routed_triton.runs_on(v.device):
            raise ValueError(
                f"attn_impl='triton' runs Triton kernels on CUDA tensors, got tensors on {v.device}; move the layer "
                f"and its input to a CUDA device, use attn_impl='auto' (it picks the fastest execution for the "
                f"device), or set TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's "
                f"interpreter (slow: for tests)")
        return self.attn_impl

    @torch.jit.unused
    def _triton_attention(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return _routed_triton.TritonRoutedAttentionFunction.apply(
            q, k, v, routed, self.num_regions, self.num_heads, self.scale)[0]

    def auto_impl(self, v: torch.Tensor) -> str:
        """What ``'auto'`` runs for projected values ``v`` (B, Hp, Wp, dim): ``'triton'`` on CUDA with Triton installed,
        else ``'dense'`` where it wastes little (``dense_max_ratio``, ``dense_max_tokens``), else ``'gather'``."""
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return 'reference'  # what TorchScript, ONNX export and FLOP counters can follow
        if v.is_cuda and _TRITON_INSTALLED:
            return 'triton'
        n = self.num_regions
        if n * n <= self.dense_max_ratio * self.topk and v.shape[1] * v.shape[2] <= self.dense_max_tokens:
            return 'dense'
        return 'gather'

    def _masked_dense_attention(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every token over the whole map, masked to its routed regions; (B, Hp, Wp, *) -> (B, Hp, Wp, dim)."""
        B, Hp, Wp, _ = v.shape
        heads = self.num_heads
        q = q.reshape(B, Hp * Wp, heads, self.qk_dim // heads).transpose(1, 2)
        k = k.reshape(B, Hp * Wp, heads, self.qk_dim // heads).transpose(1, 2)
        v = v.reshape(B, Hp * Wp, heads, self.dim // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, heads, Hp * Wp, d)
        return out.transpose(1, 2).reshape(B, Hp, Wp, self.dim)

    def _gathered_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor,
                            residual: Optional[torch.Tensor] = None, custom_backward: bool = True) -> torch.Tensor:
        """Every region's queries over the gathered tokens of its routed regions, plus ``residual`` if given;
        (B, Hp, Wp, *) -> (B, Hp, Wp, dim).

        ``custom_backward``: when gradients are needed, the autograd Function that keeps only the projected tokens
        for backward.
        """
        B, Hp, Wp, _ = v.shape
        n = self.num_regions
        rh, rw = Hp // n, Wp // n
        # token rows of each region's queries and of its routed regions' keys/values
        tokens = region_token_index(n, Hp, Wp, v.device)  # (regions, tokens)
        batch_offset = torch.arange(B, device=v.device).view(B, 1, 1) * (Hp * Wp)
        q_index = (tokens.unsqueeze(0) + batch_offset).flatten(0, 1)  # (B * regions, tokens)
        kv_index = (tokens[routed].flatten(2) + batch_offset).flatten(0, 1)  # (B * regions, topk * tokens)

        # fine level: token attention within the routed regions
        rows = B * Hp * Wp
        q, k, v = q.reshape(rows, self.qk_dim), k.reshape(rows, self.qk_dim), v.reshape(rows, self.dim)
        if torch.jit.is_scripting() or not custom_backward or not (
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            out = routed_attention(q, k, v, q_index, kv_index, self.num_heads, self.scale)
        else:
            out = self._routed_attention_autograd(q, k, v, q_index, kv_index)
        # (B * regions, heads, tokens, d) in region order -> (B, n, rh, n, rw, heads, d), still in region order
        heads = self.num_heads
        out = out.view(B, n, n, heads, rh, rw, self.dim // heads).permute(0, 1, 4, 2, 5, 3, 6)
        if residual is not None:
            # the row-major residual first: the sum takes its layout, so adding is also the reordering pass
            out = residual.view(out.shape) + out
        return out.reshape(B, Hp, Wp, self.dim)  # free after the sum (row-major already), else one copy


def _check_impl(attn_impl: str) -> None:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
    if attn_impl == 'triton' and not _TRITON_INSTALLED:
        raise ValueError(
            f"attn_impl='triton' needs the triton package, which does not import here "
            f"({_routed_triton.IMPORT_ERROR}); install it (pip install triton, Linux with a CUDA GPU) or use "
            f"attn_impl='auto'")


@contextmanager
def routed_attention_impl(model: nn.Module, attn_impl: str) -> Iterator[nn.Module]:
    """Run every ``BiLevelRoutingAttention`` of ``model`` with ``attn_impl`` inside the block, then restore them.

    ``with routed_attention_impl(model, 'reference'):`` runs the plain math, e.g. to check a fast path against it.
    """
    _check_impl(attn_impl)
    layers = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    saved = [m.attn_impl for m in layers]
    for m in layers:
        m.attn_impl = attn_impl
    try:
        yield model
    finally:
        for m, value in zip(layers, saved):
            m.attn_impl = value


def count_routed(model: nn.Module) -> ContextManager[nn.Module]:
    """Run every ``BiLevelRoutingAttention`` of ``model`` on the plain routed math inside the block.

    FLOP counters count what runs; the masked dense path multiplies scores that the routing then discards, so
    counts meant to describe BiFormer (the paper's and the official fvcore numbers) are taken under this.
    """
    return routed_attention_impl(model, 'reference')
