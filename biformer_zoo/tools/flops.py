"""FLOP and activation counting with fvcore, with handles for the operators fvcore leaves at zero.

FLOPs follow fvcore's convention: one multiply-add is one flop, and only the operators that have a handle are counted
(convolutions, matmuls, linear layers, norms, a few pooling/upsampling ops). fvcore alone silently counts
``scaled_dot_product_attention`` (and ``baddbmm``) as zero, which would hide the attention matmuls of every model that
uses a fused attention kernel; the handles here count exactly the two matmuls an unfused attention performs
(``q @ k^T`` and ``attn @ v``): ``batch * heads * Lq * Lk * (d_qk + d_v)``. BiFormer's routed attention is traced on
its plain routed math (``count_routed``).
"""
import math
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore scripts a loss function at import, which torch now warns about
    warnings.simplefilter('ignore', FutureWarning)
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from ..layers.bra import count_routed

__all__ = [
    'ATTENTION_OPS', 'SDPA_UNCOUNTED', 'DATA_MOVEMENT_OPS', 'attention_flop_jit', 'attention_activation_jit',
    'baddbmm_flop_jit', 'output_activation_jit', 'flop_analysis', 'activation_analysis']


ATTENTION_OPS = (
    'aten::scaled_dot_product_attention',
    'aten::_scaled_dot_product_attention_math',
    'aten::_scaled_dot_product_flash_attention',
    'aten::_scaled_dot_product_flash_attention_for_cpu',
    'aten::_scaled_dot_product_efficient_attention',
    'aten::_scaled_dot_product_cudnn_attention',
)

SDPA_UNCOUNTED = 'sdpa softmax/scale/mask'  # the non-matmul work inside scaled_dot_product_attention

# Operators that only move, view, index or create data: zero flops by any convention.
DATA_MOVEMENT_OPS = frozenset(f'aten::{op}' for op in (
    'Int', 'ScalarImplicit', 'size', 'numel', 'dim', 'arange', 'empty', 'empty_like', 'new_empty', 'new_full',
    'new_zeros', 'new_ones', 'zeros', 'zeros_like', 'ones', 'ones_like', 'full', 'full_like', 'linspace', 'meshgrid',
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'squeeze', 'unsqueeze', 'unsqueeze_',
    'permute', 'transpose', 't', 'contiguous', 'expand', 'expand_as', 'repeat', 'repeat_interleave', 'tile',
    'slice', 'select', 'narrow', 'chunk', 'split', 'split_with_sizes', 'unbind', 'cat', 'concat', 'stack',
    'roll', 'flip', 'unfold', 'pixel_shuffle', 'pixel_unshuffle', 'pad', 'constant_pad_nd', 'reflection_pad2d',
    'replication_pad2d', 'gather', 'index', 'index_select', 'take_along_dim', 'index_put_', 'scatter',
    'copy_', 'clone', 'detach', 'to', 'type_as', 'dropout', 'feature_dropout', 'alpha_dropout', 'lift_fresh',
    'nonzero', 'masked_select', 'movedim', 'as_strided', 'channel_shuffle',
    # in traces these two are Python-int shape arithmetic (window/padding sizes), not tensor compute
    'remainder', 'floor_divide',
))


def _shape(value: Any) -> List[int]:
    shape = get_shape(value)
    if shape is None:
        raise RuntimeError('fvcore could not read a tensor shape from the traced graph; trace the model with a '
                           'concrete input tensor (no dynamic shapes)')
    return list(shape)


def attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Flops of ``scaled_dot_product_attention(q, k, v)`` as the two matmuls of unfused attention.

    q: (..., Lq, d_qk), k: (..., Lk, d_qk), v: (..., Lk, d_v), out: (..., Lq, d_v) with broadcast batch dims
    (heads included; grouped-query attention broadcasts k/v over the query heads).
    """
    query, key, value, out = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]), _shape(outputs[0])
    batch_heads = math.prod(out[:-2])
    return batch_heads * query[-2] * key[-2] * (query[-1] + value[-1])


def attention_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Activations of attention as fvcore counts the unfused version: the score matrix plus the output."""
    query, key, value, out = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]), _shape(outputs[0])
    batch_heads = math.prod(out[:-2])
    return batch_heads * query[-2] * key[-2] + batch_heads * query[-2] * value[-1]


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Flops of ``baddbmm(bias, a, b)``: the batched matmul a (B, n, k) @ b (B, k, m); the bias add is elementwise."""
    batch1, batch2 = _shape(inputs[1]), _shape(inputs[2])
    return batch1[0] * batch1[1] * batch1[2] * batch2[2]


def output_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Activations as fvcore counts them for matmul-like ops: the elements of the output."""
    return math.prod(_shape(outputs[0]))


EXTRA_FLOP_HANDLES: Dict[str, Callable] = {
    **{op: attention_flop_jit for op in ATTENTION_OPS}, 'aten::baddbmm': baddbmm_flop_jit}
EXTRA_ACTIVATION_HANDLES: Dict[str, Callable] = {
    **{op: attention_activation_jit for op in ATTENTION_OPS}, 'aten::baddbmm': output_activation_jit}


def _quiet(analysis: Any) -> Any:
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings('none')
    return analysis


def _counting(handle: Callable, op: str, calls: Counter) -> Callable:
    def counted_handle(inputs: List[Any], outputs: List[Any]) -> int:
        calls[op] += 1
        return handle(inputs, outputs)
    return counted_handle


def _traced_without_grad(model: nn.Module, analysis: Any) -> Any:
    """Run the (lazy, cached) fvcore trace now, under ``no_grad``: models that wrap a kernel in an autograd Function
    only for training then trace their plain, countable path. BiFormer's routed attention is traced on its gather
    path (``count_routed``), not the masked dense shortcut that multiplies scores the routing discards."""
    with torch.no_grad(), count_routed(model):
        analysis.total()
    return analysis


def flop_analysis(model: nn.Module, inputs: torch.Tensor, calls: Optional[Counter] = None) -> FlopCountAnalysis:
    """fvcore ``FlopCountAnalysis`` with attention/baddbmm handles, traced under ``no_grad``.

    fvcore ignores some arithmetic ops by default (relu, clamp, max, masked_fill ...); here only data movement is
    ignored, so that ``unsupported_ops()`` lists every op that computes something and is not counted.
    ``calls``, if given, receives how often each of the extra handled ops ran. A custom ``torch.autograd.Function``
    traces as one opaque ``prim::PythonOp.<name>`` whose contents are not counted; it is listed as unsupported.
    """
    handles = EXTRA_FLOP_HANDLES if calls is None else {
        op: _counting(handle, op, calls) for op, handle in EXTRA_FLOP_HANDLES.items()}
    analysis = _quiet(FlopCountAnalysis(model, inputs).set_op_handle(**handles))
    analysis._ignored_ops = set(DATA_MOVEMENT_OPS)  # fvcore has no public way to un-ignore an op
    return _traced_without_grad(model, analysis)


def activation_analysis(model: nn.Module, inputs: torch.Tensor) -> ActivationCountAnalysis:
    """fvcore ``ActivationCountAnalysis`` with attention/baddbmm handles, traced under ``no_grad``."""
    analysis = ActivationCountAnalysis(model, inputs).set_op_handle(**EXTRA_ACTIVATION_HANDLES)
    return _traced_without_grad(model, _quiet(analysis))
