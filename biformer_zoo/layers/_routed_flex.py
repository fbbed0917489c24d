"""The fine level of Bi-Level Routing Attention through FlexAttention: no gathered keys/values.

The plain math (``bra.routed_attention``) gathers the tokens of each query region's ``topk`` routed regions, so
keys and values exist ``topk`` times over, and their gradients are scattered back. Here the tokens are put in
region-major order instead (the tokens of each region consecutive, each region padded to a multiple of ``TILE``
tokens, a tile of the attention kernels), and a ``BlockMask`` built directly from the routing indices lets the
query block of each region read exactly the key blocks of its routed regions, in place. The same attention results
(padded keys are masked out, padded queries are dropped); FlexAttention's Triton kernels compute forward and backward
block-sparsely.

CUDA only: on the CPU, FlexAttention has no backward and its forward is not faster than the layer's own paths. On
an H200 it is not faster than the plain math inside BiFormer-S either (docs/performance.md), so the layer runs it
only when asked (``attn_impl='flex'``): it saves memory where regions are large and routed often. The function is
compiled once per process (``torch.compile(flex_attention, dynamic=False)``); every new input shape
compiles its kernels again (seconds), and after ``torch._dynamo.config.recompile_limit`` shapes dynamo falls back to
eager FlexAttention, which materialises the scores: fine for training at one size, not for a stream of new sizes.
"""
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = None

__all__ = ['region_block_mask', 'to_region_major', 'flex_routed_attention']

# tokens per region are padded to a multiple of this. On an H200 with torch 2.11 (docs/performance.md), bf16 backward
# kernels compiled for regions padded to 64 tokens with FlexAttention's own tiles; with 16- or 32-token tiles given
# as kernel options, regions that needed padding found no kernel (NoValidChoicesError)
TILE = 64


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention, dynamic=False)


def padded_region_tokens(region_tokens: int, tile: int = TILE) -> int:
    """Tokens per region after padding: a multiple of ``tile``."""
    return -(-region_tokens // tile) * tile


def region_block_mask(routed: torch.Tensor, region_tokens: int, padded_tokens: Optional[int] = None) -> 'BlockMask':
    """Block mask over region-major tokens letting query region i see the key regions ``routed[b, i]``.

    Args:
        routed: (B, regions, topk) region indices, as ``bra.route_regions`` returns them.
        region_tokens: Real tokens per region.
        padded_tokens: Tokens per region in the sequence (default ``padded_region_tokens(region_tokens)``); one
            block per region.

    Blocks are full (no mask applied) when regions need no padding; otherwise every routed block is partial and the
    mask hides the padded keys. The mask function also encodes the routing, so that eager FlexAttention, which
    applies it to every score, computes the same attention.
    """
    padded_tokens = padded_tokens or padded_region_tokens(region_tokens)
    batch, regions, topk = routed.shape
    num_blocks = torch.full((batch, 1, regions), topk, dtype=torch.int32, device=routed.device)
    indices = torch.zeros(batch, 1, regions, regions, dtype=torch.int32, device=routed.device)
    indices[..., :topk] = routed.sort(dim=-1).values.unsqueeze(1)  # ascending key blocks, the order flex walks
    none_num, none_indices = torch.zeros_like(num_blocks), torch.zeros_like(indices)
    allowed = torch.zeros(batch, regions, regions, dtype=torch.bool, device=routed.device).scatter_(2, routed, True)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_index: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
        routed_key = allowed[b, q_index // padded_tokens, kv_index // padded_tokens]
        return routed_key & (kv_index % padded_tokens < region_tokens)

    if padded_tokens == region_tokens:  # (partial blocks, full blocks)
        blocks = (none_num, none_indices, num_blocks, indices)
    else:
        blocks = (num_blocks, indices, none_num, none_indices)
    return BlockMask.from_kv_blocks(*blocks, BLOCK_SIZE=padded_tokens, mask_mod=mask_mod)


def to_region_major(x: torch.Tensor, num_regions: int, heads: int, padded_tokens: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, heads, regions * padded_tokens, C / heads): region by region, zero-padded."""
    B, H, W, C = x.shape
    n = num_regions
    rh, rw = H // n, W // n
    x = x.view(B, n, rh, n, rw, heads, C // heads).permute(0, 5, 1, 3, 2, 4, 6)  # (B, heads, n, n, rh, rw, d)
    x = x.reshape(B, heads, n * n, rh * rw, C // heads)
    if padded_tokens > rh * rw:
        x = F.pad(x, (0, 0, 0, padded_tokens - rh * rw))
    return x.view(B, heads, n * n * padded_tokens, C // heads)


def flex_routed_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        routed: torch.Tensor,
        num_regions: int,
        heads: int,
        scale: float,
        compiled: bool = True,
        tile: int = TILE,
) -> torch.Tensor:
    """Attention of every region's queries over the tokens of its routed regions, without gathering.

    Args:
        q, k, v: Projected (B, Hp, Wp, channels) maps, sides multiples of ``num_regions``.
        routed: (B, regions, topk) region indices.
        compiled: Run FlexAttention compiled (its Triton kernels on CUDA); eager elsewhere, e.g. tests on the CPU.
        tile: Regions are padded to a multiple of this many tokens.

    Returns:
        (B, n, rh, n, rw, heads, dim / heads): a view whose memory is in region order, which the layer adds to its
        row-major LePE map.
    """
    B, Hp, Wp, _ = v.shape
    n = num_regions
    rh, rw = Hp // n, Wp // n
    padded = padded_region_tokens(rh * rw, tile)
    block_mask = region_block_mask(routed, rh * rw, padded)
    # inside a compiled model dynamo compiles flex_attention with the rest of the graph
    flex = _compiled_flex() if compiled and not torch.compiler.is_compiling() else flex_attention
    out = flex(to_region_major(q, n, heads, padded), to_region_major(k, n, heads, padded),
               to_region_major(v, n, heads, padded), block_mask=block_mask, scale=scale)  # (B, heads, regions * padded, d)
    out = out.view(B, heads, n, n, padded, -1)[:, :, :, :, :rh * rw].unflatten(4, (rh, rw))
    return out.permute(0, 2, 4, 3, 5, 1, 6)  # (B, n, rh, n, rw, heads, d)
