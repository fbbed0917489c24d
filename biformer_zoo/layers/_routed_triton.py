"""BRA's routed attention as Triton kernels (``attn_impl='triton'``): no gathered keys/values, no mask, no copies.

The layer's projections are (B, Hp, Wp, C) maps cut into ``num_regions x num_regions`` regions of ``rh x rw``
tokens; ``routed`` (B, regions, topk) names the key regions of every query region. Three kernels compute the
attention of every query region over the tokens of its routed regions, reading the maps in place through the
routing indices:

- ``_forward_kernel``, one program per (image and query region, head, block of the region's tokens): loads its query
  tile, walks the routed regions' keys/values in blocks of ``BLOCK_N`` (a block may span several small regions:
  lane ``j`` of the walk is token ``j % tokens`` of routed region ``j // tokens``), keeps an online softmax, and
  writes the output into the (B, Hp, Wp, dim) map and the log-sum-exp of every query row.
- ``_grad_query_kernel``, the same programs and walk: recomputes the probabilities from the saved log-sum-exp and
  accumulates dQ; it also writes ``delta`` (the row sums of dO * O) that the next kernel needs.
- ``_grad_key_value_kernel``, one program per (image and key region, head, block of the region's tokens): walks
  the tokens of the query regions that routed to its key region (the inverse routing, ``inverse_routing``) and
  accumulates dK and dV in registers. Every gradient element is written by one program, once: no atomics, and the
  result does not depend on scheduling (deterministic).

Tiles are powers of two (at least 16, what ``tl.dot`` needs); lanes beyond the real tokens or head channels are
masked, so regions of any size (3 x 5 tokens, 1 token; larger than 64 tokens in several blocks) and head dims of
any width run. Products accumulate in fp32 for fp32, bf16 and fp16 inputs; fp32 inputs multiply in full fp32 unless
``torch.backends.cuda.matmul.allow_tf32``. Offsets are 32-bit: maps of 2**31 elements or more are refused.

Triton is optional: without it this module still imports (``AVAILABLE`` is False and the layer refuses
``attn_impl='triton'``). The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported: ``INTERPRETED``), which is how the CPU tests run them.
"""
import os
from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the package works without Triton; the layer says why 'triton' is refused
    triton = tl = None
    IMPORT_ERROR: Optional[str] = f'{type(e).__name__}: {e}'
else:
    IMPORT_ERROR = None

__all__ = ['AVAILABLE', 'IMPORT_ERROR', 'INTERPRETED', 'TritonRoutedAttentionFunction', 'inverse_routing', 'runs_on']

AVAILABLE = triton is not None


def _interpreting() -> bool:
    """Whether ``triton.jit`` builds kernels for Triton's interpreter (``TRITON_INTERPRET``), as it decides."""
    knobs = getattr(triton, 'knobs', None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get('TRITON_INTERPRET', '0') == '1'  # Triton < 3.4


# the kernels below are built for the interpreter (CPU tensors) rather than compiled for a GPU: triton.jit decides
# when it decorates them, at this module's import
INTERPRETED = AVAILABLE and _interpreting()


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA with Triton, or any device under the interpreter."""
    return AVAILABLE and (INTERPRETED or device.type == 'cuda')


def _tile(size: int, cap: Optional[int] = None) -> int:
    """A power-of-two tile covering ``size`` (at least 16, the smallest ``tl.dot`` operand; at most ``cap``)."""
    tile = max(16, triton.next_power_of_2(size))
    return min(tile, cap) if cap else tile


if AVAILABLE:
    # Every kernel addresses contiguous (B, Hp, Wp, channels) maps by (image, region, token inside the region, head);
    # the map geometry travels as (num_regions, region_h, region_w): Hp = num_regions * region_h, likewise Wp.

    @triton.jit
    def _tile_offsets(image, region, token, valid, head, channels, num_regions, region_h, region_w,
                      HEAD: tl.constexpr, BLOCK: tl.constexpr):
        """Offsets and mask of a (lanes, BLOCK) tile: head ``head``'s channels of lane i's token ``token[i]``
        (row-major inside its region) of region ``region[i]`` (or one region for all lanes)."""
        rows = (region // num_regions) * region_h + token // region_w
        cols = (region % num_regions) * region_w + token % region_w
        channel = tl.arange(0, BLOCK)
        offsets = ((image * num_regions * region_h + rows) * num_regions * region_w + cols) * channels  # (lanes,)
        return (offsets[:, None] + head * HEAD + channel[None, :],
                valid[:, None] & (channel < HEAD)[None, :])  # (lanes, BLOCK) each

    @triton.jit
    def _load_tile(X, image, region, token, valid, head, channels, num_regions, region_h, region_w,
                   HEAD: tl.constexpr, BLOCK: tl.constexpr):
        """The (lanes, BLOCK) tile of ``_tile_offsets``, zero where masked."""
        offsets, mask = _tile_offsets(image, region, token, valid, head, channels, num_regions, region_h, region_w,
                                      HEAD, BLOCK)
        return tl.load(X + offsets, mask=mask, other=0.)

    @triton.jit
    def _store_tile(X, tile, image, region, token, valid, head, channels, num_regions, region_h, region_w,
                    HEAD: tl.constexpr, BLOCK: tl.constexpr):
        offsets, mask = _tile_offsets(image, region, token, valid, head, channels, num_regions, region_h, region_w,
                                      HEAD, BLOCK)
        tl.store(X + offsets, tile.to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def _program_tokens(num_regions, region_h, region_w, BLOCK: tl.constexpr):
        """What a program of the grid (B * regions, heads, token blocks) owns: its flat region (image * regions +
        region), head, image, region, and its block of the region's tokens with their mask (BLOCK,)."""
        flat_region = tl.program_id(0)
        regions = num_regions * num_regions
        token = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        return (flat_region, tl.program_id(1), flat_region // regions, flat_region % regions, token,
                token < region_h * region_w)

    @triton.jit
    def _load_routed_keys_values(K, V, Routed, flat_region, image, head, start, topk, qk_dim, dim, num_regions,
                                 region_h, region_w, HEAD_QK: tl.constexpr, HEAD_V: tl.constexpr,
                                 BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr):
        """Lanes start..start + BLOCK_N of the walk over a query region's routed keys/values: the topk routed
        regions' tokens one after the other, lane j being token j % tokens of routed slot j // tokens (a block can
        span several small regions). Returns keys (BLOCK_N, BLOCK_QK), values (BLOCK_N, BLOCK_V), valid lanes."""
        tokens = region_h * region_w
        lane = start + tl.arange(0, BLOCK_N)
        valid = lane < topk * tokens
        key_region = tl.load(Routed + flat_region * topk + lane // tokens, mask=valid, other=0)  # (BLOCK_N,)
        k = _load_tile(K, image, key_region, lane % tokens, valid, head, qk_dim, num_regions, region_h, region_w,
                       HEAD_QK, BLOCK_QK)
        v = _load_tile(V, image, key_region, lane % tokens, valid, head, dim, num_regions, region_h, region_w,
                       HEAD_V, BLOCK_V)
        return k, v, valid

    @triton.jit
    def _forward_kernel(Q, K, V, Routed, Out, Lse, scale, qk_dim, dim, heads, num_regions, region_h, region_w, topk,
                        HEAD_QK: tl.constexpr, HEAD_V: tl.constexpr, BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # a block of a query region's tokens (BLOCK_M,) and their queries (BLOCK_M, BLOCK_QK)
        flat_region, head, image, region, q_token, q_valid = _program_tokens(num_regions, region_h, region_w, BLOCK_M)
        q = _load_tile(Q, image, region, q_token, q_valid, head, qk_dim, num_regions, region_h, region_w, HEAD_QK,
                       BLOCK_QK)
        row_max = tl.full((BLOCK_M,), float('-inf'), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for start in range(0, topk * region_h * region_w, BLOCK_N):
            k, v, k_valid = _load_routed_keys_values(K, V, Routed, flat_region, image, head, start, topk, qk_dim, dim,
                                                     num_regions, region_h, region_w, HEAD_QK, HEAD_V, BLOCK_QK,
                                                     BLOCK_V, BLOCK_N)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N), fp32
            scores = tl.where(k_valid[None, :], scores, float('-inf'))
            new_max = tl.maximum(row_max, tl.max(scores, 1))  # finite: every block has a real key
            probs = tl.exp(scores - new_max[:, None])
            rescale = tl.exp(row_max - new_max)
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
            row_max = new_max
        _store_tile(Out, acc / row_sum[:, None], image, region, q_token, q_valid, head, dim, num_regions, region_h,
                    region_w, HEAD_V, BLOCK_V)
        # the log-sum-exp of every query row's scores, (B * regions, heads, tokens)
        tl.store(Lse + (flat_region * heads + head) * region_h * region_w + q_token, row_max + tl.log(row_sum),
                 mask=q_valid)

    @triton.jit
    def _grad_query_kernel(Q, K, V, Routed, Out, GradOut, Lse, Delta, GradQ, scale, qk_dim, dim, heads, num_regions,
                           region_h, region_w, topk, HEAD_QK: tl.constexpr, HEAD_V: tl.constexpr,
                           BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        flat_region, head, image, region, q_token, q_valid = _program_tokens(num_regions, region_h, region_w, BLOCK_M)
        q = _load_tile(Q, image, region, q_token, q_valid, head, qk_dim, num_regions, region_h, region_w, HEAD_QK,
                       BLOCK_QK)  # (BLOCK_M, BLOCK_QK)
        grad_out = _load_tile(GradOut, image, region, q_token, q_valid, head, dim, num_regions, region_h, region_w,
                              HEAD_V, BLOCK_V)  # (BLOCK_M, BLOCK_V)
        out = _load_tile(Out, image, region, q_token, q_valid, head, dim, num_regions, region_h, region_w, HEAD_V,
                         BLOCK_V)
        row = (flat_region * heads + head) * region_h * region_w + q_token  # (BLOCK_M,) rows of Lse and Delta
        lse = tl.load(Lse + row, mask=q_valid, other=0.)
        # delta = rowsum(dO * O): the softmax backward's correction term, shared with the key/value kernel
        delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)  # (BLOCK_M,)
        tl.store(Delta + row, delta, mask=q_valid)

        grad_q = tl.zeros((BLOCK_M, BLOCK_QK), tl.float32)
        for start in range(0, topk * region_h * region_w, BLOCK_N):
            k, v, k_valid = _load_routed_keys_values(K, V, Routed, flat_region, image, head, start, topk, qk_dim, dim,
                                                     num_regions, region_h, region_w, HEAD_QK, HEAD_V, BLOCK_QK,
                                                     BLOCK_V, BLOCK_N)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
            probs = tl.where(k_valid[None, :], tl.exp(scores - lse[:, None]), 0.)
            grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            grad_scores = probs * (grad_probs - delta[:, None])
            grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=PRECISION)
        _store_tile(GradQ, grad_q * scale, image, region, q_token, q_valid, head, qk_dim, num_regions, region_h,
                    region_w, HEAD_QK, BLOCK_QK)

    @triton.jit
    def _grad_key_value_kernel(Q, K, V, GradOut, Lse, Delta, QueryRegions, Offsets, GradK, GradV, scale, qk_dim, dim,
                               heads, num_regions, region_h, region_w, HEAD_QK: tl.constexpr, HEAD_V: tl.constexpr,
                               BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # a block of a key region's tokens (BLOCK_N,), its keys and values
        flat_region, head, image, region, k_token, k_valid = _program_tokens(num_regions, region_h, region_w, BLOCK_N)
        k = _load_tile(K, image, region, k_token, k_valid, head, qk_dim, num_regions, region_h, region_w, HEAD_QK,
                       BLOCK_QK)  # (BLOCK_N, BLOCK_QK)
        v = _load_tile(V, image, region, k_token, k_valid, head, dim, num_regions, region_h, region_w, HEAD_V,
                       BLOCK_V)  # (BLOCK_N, BLOCK_V)
        grad_k = tl.zeros((BLOCK_N, BLOCK_QK), tl.float32)
        grad_v = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        regions = num_regions * num_regions
        tokens = region_h * region_w
        # the query regions that routed to this key region: entries first..first + count of the inverse routing,
        # walked as count * tokens lanes (lane i: token i % tokens of the (i // tokens)-th of them)
        first = tl.load(Offsets + flat_region)
        count = tl.load(Offsets + flat_region + 1) - first
        for start in range(0, count * tokens, BLOCK_M):
            lane = start + tl.arange(0, BLOCK_M)
            q_valid = lane < count * tokens
            query_flat = tl.load(QueryRegions + first + lane // tokens, mask=q_valid, other=0)  # image * regions + r
            q = _load_tile(Q, image, query_flat % regions, lane % tokens, q_valid, head, qk_dim, num_regions,
                           region_h, region_w, HEAD_QK, BLOCK_QK)  # (BLOCK_M, BLOCK_QK)
            grad_out = _load_tile(GradOut, image, query_flat % regions, lane % tokens, q_valid, head, dim, num_regions,
                                  region_h, region_w, HEAD_V, BLOCK_V)  # (BLOCK_M, BLOCK_V)
            row = (query_flat * heads + head) * tokens + lane % tokens
            lse = tl.load(Lse + row, mask=q_valid, other=0.)
            delta = tl.load(Delta + row, mask=q_valid, other=0.)
            # transposed scores: keys along rows, so the sums over queries land in this program's tiles
            scores = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # (BLOCK_N, BLOCK_M)
            probs = tl.where(q_valid[None, :] & k_valid[:, None], tl.exp(scores - lse[None, :]), 0.)
            grad_v += tl.dot(probs.to(grad_out.dtype), grad_out, input_precision=PRECISION)
            grad_probs = tl.dot(v, tl.trans(grad_out), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
            grad_scores = probs * (grad_probs - delta[None, :])
            grad_k += tl.dot(grad_scores.to(q.dtype), q, input_precision=PRECISION)
        _store_tile(GradK, grad_k * scale, image, region, k_token, k_valid, head, qk_dim, num_regions, region_h,
                    region_w, HEAD_QK, BLOCK_QK)
        _store_tile(GradV, grad_v, image, region, k_token, k_valid, head, dim, num_regions, region_h, region_w,
                    HEAD_V, BLOCK_V)


def inverse_routing(routed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every key region, the query regions that routed to it.

    Args:
        routed: (B, regions, topk) key region indices of every query region.

    Returns:
        ``query_regions`` (B * regions * topk,) int32: flat query regions (image * regions + region), grouped by the
        flat key region they routed to, in ascending order within a group; ``offsets`` (B * regions + 1,) int32: the
        group of flat key region ``i`` is ``query_regions[offsets[i]:offsets[i + 1]]``. A stable sort and a search,
        both deterministic.
    """
    batch, regions, topk = routed.shape
    image = torch.arange(batch, device=routed.device).view(batch, 1, 1)
    key_flat = (routed + image * regions).flatten()  # (B * regions * topk,), entry e belongs to query e // topk
    key_sorted, order = torch.sort(key_flat, stable=True)
    query_regions = (order // topk).to(torch.int32)
    offsets = torch.searchsorted(key_sorted, torch.arange(batch * regions + 1, device=routed.device))
    return query_regions, offsets.to(torch.int32)


def _launch_settings(q: torch.Tensor, v: torch.Tensor, num_regions: int, heads: int) -> Tuple[dict, dict]:
    """The kernels' runtime geometry and compile-time sizes/precision, for (B, Hp, Wp, *) maps ``q`` and ``v``."""
    region_h, region_w = v.shape[1] // num_regions, v.shape[2] // num_regions
    head_qk, head_v = q.shape[-1] // heads, v.shape[-1] // heads
    full_fp32 = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    geometry = dict(qk_dim=q.shape[-1], dim=v.shape[-1], heads=heads, num_regions=num_regions, region_h=region_h,
                    region_w=region_w)
    meta = dict(HEAD_QK=head_qk, HEAD_V=head_v, BLOCK_QK=_tile(head_qk), BLOCK_V=_tile(head_v),
                BLOCK_M=_tile(region_h * region_w, 64), BLOCK_N=_tile(region_h * region_w, 64),
                PRECISION='ieee' if full_fp32 else 'tf32')
    return geometry, meta


def _grid(batch: int, num_regions: int, heads: int, tokens: int, block: int) -> Tuple[int, int, int]:
    """(B * regions, heads, token blocks of a region)."""
    return batch * num_regions * num_regions, heads, triton.cdiv(tokens, block)


class TritonRoutedAttentionFunction(torch.autograd.Function):
    """Routed attention of (B, Hp, Wp, C) projections through the Triton kernels above.

    ``apply(q, k, v, routed, num_regions, heads, scale)``: q, k (B, Hp, Wp, qk_dim), v (B, Hp, Wp, dim), routed
    (B, regions, topk) -> (B, Hp, Wp, dim). Saves the projections, the routing, the output and the (fp32)
    log-sum-exp for backward; the routing is not differentiable.
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor, num_regions: int,
                heads: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        q, k, v, routed = q.contiguous(), k.contiguous(), v.contiguous(), routed.contiguous()
        if max(q.numel(), v.numel()) >= 2 ** 31:
            raise ValueError(f"attn_impl='triton' addresses its maps with 32-bit offsets; got {tuple(v.shape)} values "
                             f"(2**31 elements or more): split the batch, or use attn_impl='gather'")
        geometry, meta = _launch_settings(q, v, num_regions, heads)
        tokens = geometry['region_h'] * geometry['region_w']
        out = torch.empty_like(v)  # (B, Hp, Wp, dim)
        lse = torch.empty(v.shape[0] * num_regions ** 2, heads, tokens, device=v.device, dtype=torch.float32)
        if v.shape[0] > 0:
            _forward_kernel[_grid(v.shape[0], num_regions, heads, tokens, meta['BLOCK_M'])](
                q, k, v, routed, out, lse, scale, **geometry, topk=routed.shape[-1], **meta)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs: Tuple, output: Tuple[torch.Tensor, torch.Tensor]) -> None:
        q, k, v, routed, num_regions, heads, scale = inputs
        out, lse = output
        ctx.num_regions, ctx.heads, ctx.scale = num_regions, heads, scale
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, routed, out, lse)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, unused_grad_lse: Optional[torch.Tensor]):
        q, k, v, routed, out, lse = (t.contiguous() for t in ctx.saved_tensors)
        grad_out = grad_out.to(v.dtype).contiguous()  # tl.dot multiplies operands of one dtype
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if v.shape[0] > 0:
            geometry, meta = _launch_settings(q, v, ctx.num_regions, ctx.heads)
            tokens = geometry['region_h'] * geometry['region_w']
            delta = torch.empty_like(lse)  # (B * regions, heads, tokens), written by the dQ kernel
            _grad_query_kernel[_grid(v.shape[0], ctx.num_regions, ctx.heads, tokens, meta['BLOCK_M'])](
                q, k, v, routed, out, grad_out, lse, delta, grad_q, ctx.scale, **geometry, topk=routed.shape[-1],
                **meta)
            query_regions, offsets = inverse_routing(routed)
            _grad_key_value_kernel[_grid(v.shape[0], ctx.num_regions, ctx.heads, tokens, meta['BLOCK_N'])](
                q, k, v, grad_out, lse, delta, query_regions, offsets, grad_k, grad_v, ctx.scale, **geometry, **meta)
        return grad_q, grad_k, grad_v, None, None, None, None
