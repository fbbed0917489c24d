"""The gather path's training fast path: a custom autograd Function for BRA's routed attention that keeps only the
projected tokens for backward (``attn_impl='gather'``), and the row gathering it shares with the plain math.

Autograd through the plain math (``bra.routed_attention``) keeps the gathered keys/values, ``topk`` copies of every
token. The Function gathers them again in backward instead, and on the CPU calls the flash-attention kernels
directly so that backward reuses the forward's output and log-sum-exp.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['gather_heads', 'gather_qkv', 'GatheredAttentionFunction']


# the CPU flash-attention kernels, called directly so that forward can keep the log-sum-exp for backward
_flash_forward = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
_flash_backward = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu_backward', None)


def gather_heads(rows: torch.Tensor, index: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ``index`` (regions, tokens) of ``rows`` (B * H * W, C) as (regions, heads, tokens, C / heads)."""
    regions, tokens = index.shape[0], index.shape[1]  # -1 fails on empty batches
    return rows.index_select(0, index.flatten()).view(regions, tokens, heads, rows.shape[1] // heads).transpose(1, 2)


def gather_qkv(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_index: torch.Tensor,
        kv_index: torch.Tensor,
        heads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries of each region and keys/values of its routed regions, each (B * regions, heads, tokens, d)."""
    return gather_heads(q, q_index, heads), gather_heads(k, kv_index, heads), gather_heads(v, kv_index, heads)


def _attention_backward(
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``F.scaled_dot_product_attention`` w.r.t. q, k and v, recomputing its forward.

    Recomputing costs one more (fused) attention forward, and keeps SDPA's fused backward kernels (flash or
    memory-efficient attention on CUDA) instead of materialising the probabilities.
    """
    _, attention_vjp = torch.func.vjp(partial(F.scaled_dot_product_attention, scale=scale), q, k, v)
    return attention_vjp(grad_out)


class GatheredAttentionFunction(torch.autograd.Function):
    """``bra.routed_attention`` that saves only the projected tokens (and on CPU the output) for backward.

    Autograd would keep the routed keys/values, ``topk`` copies of every token (16 in BiFormer's third stage).
    Here backward gathers them again (with ``topk=1`` only the values: the gathered queries and keys are kept), runs
    the attention backward and sums the gradients of repeated keys/values back into their tokens (``index_add_``).
    On CPU (where qk_dim == dim), forward and backward call the flash-attention kernels directly, so backward reuses
    the forward's output and log-sum-exp instead of recomputing the probabilities.

    ``forward`` returns the attention output followed by the intermediates backward needs (non-differentiable), and
    ``setup_context`` saves them: the form ``torch.func`` transforms require. Callers use ``apply(...)[0]``.
    """

    @staticmethod
    def _uses_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
        # the CPU flash backward needs one head size for queries/keys and values (qk_dim == dim); otherwise the
        # SDPA backward through torch.func, which takes any
        return (q.device.type == 'cpu' and q.shape[-1] == v.shape[-1] and _flash_backward is not None
                and _flash_forward is not None)

    @staticmethod
    def _keeps_gathered(q_index: torch.Tensor, kv_index: torch.Tensor) -> bool:
        # with one routed region per query region (topk=1) the gathered queries and keys are no larger than the
        # tokens: keep them instead, so that backward only gathers the values (whose rows LePE keeps anyway)
        return kv_index.shape[1] == q_index.shape[1]

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_index: torch.Tensor, kv_index: torch.Tensor,
                heads: int, scale: float) -> Tuple[torch.Tensor, ...]:
        if not GatheredAttentionFunction._uses_flash(q, v):
            return (F.scaled_dot_product_attention(*gather_qkv(q, k, v, q_index, kv_index, heads), scale=scale),)
        q_routed, k_routed, v_routed = gather_qkv(q, k, v, q_index, kv_index, heads)
        out, lse = _flash_forward(q_routed, k_routed, v_routed, scale=scale)
        if GatheredAttentionFunction._keeps_gathered(q_index, kv_index):
            return out, lse, q_routed, k_routed
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs: Tuple, output: Tuple[torch.Tensor, ...]) -> None:
        q, k, v, q_index, kv_index, heads, scale = inputs
        ctx.heads, ctx.scale, ctx.rows_shapes = heads, scale, (q.shape, k.shape, v.shape)
        ctx.flash = len(output) > 1
        ctx.keep_gathered = len(output) > 2
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        if ctx.keep_gathered:
            q, k = output[2:]
        ctx.save_for_backward(q, k, v, q_index, kv_index, *(output[:2] if ctx.flash else ()))

    @staticmethod
    def backward(ctx, grad_out: Optional[torch.Tensor], *unused: Optional[torch.Tensor]):
        if grad_out is None:  # only non-differentiable outputs were used
            return None, None, None, None, None, None, None
        saved = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        q, k, v, q_index, kv_index = saved[:5]
        if ctx.flash and ctx.keep_gathered:
            v = gather_heads(v, kv_index, ctx.heads)
        else:
            q, k, v = gather_qkv(q, k, v, q_index, kv_index, ctx.heads)
        if ctx.flash:
            out, lse = saved[5:]
            grad_q, grad_k, grad_v = _flash_backward(grad_out, q, k, v, out, lse, 0.0, False, scale=ctx.scale)
        else:
            grad_q, grad_k, grad_v = _attention_backward(grad_out, q, k, v, ctx.scale)
        q_rows_index, kv_rows_index = q_index.flatten(), kv_index.flatten()

        def rows(grad: torch.Tensor) -> torch.Tensor:  # (B * regions, heads, tokens, d) -> (B * regions * tokens, C)
            return grad.transpose(1, 2).flatten(2).flatten(0, 1)

        # every token is the query of exactly one region; routed keys/values repeat, so they accumulate
        q_shape, k_shape, v_shape = ctx.rows_shapes
        grad_q_rows = grad_q.new_empty(q_shape).index_copy_(0, q_rows_index, rows(grad_q))
        # index_add_: parallel and deterministic on CPU; atomic adds on CUDA, which under
        # torch.use_deterministic_algorithms(True) becomes a deterministic accumulating index_put_
        grad_k_rows = grad_k.new_zeros(k_shape).index_add_(0, kv_rows_index, rows(grad_k))
        grad_v_rows = grad_v.new_zeros(v_shape).index_add_(0, kv_rows_index, rows(grad_v))
        return grad_q_rows, grad_k_rows, grad_v_rows, None, None, None, None
