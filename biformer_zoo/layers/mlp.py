"""Transformer MLP that keeps only the hidden pre-activation for backward.

A plain ``fc1 -> GELU -> fc2`` saves both the GELU input (for the GELU backward) and its output (for the ``fc2``
weight gradient): ``2 * hidden`` values per token, the largest activations of a block. ``RecomputeGeluMlp`` saves the
GELU input only and recomputes the GELU in backward, an elementwise op, so the saved MLP activations halve for a few
percent more work. Parameters and their names (``fc1``, ``fc2``) are those of timm's ``Mlp``.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .reference import use_reference_math

__all__ = ['RecomputeGeluMlp']


class _GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(hidden), weight, bias)`` saving ``hidden`` instead of the GELU output."""

    @staticmethod
    def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(F.gelu(hidden), weight, bias)  # under autocast: the same casts as an nn.Linear

    @staticmethod
    def setup_context(ctx, inputs: Tuple, output: torch.Tensor) -> None:  # separate, so torch.func transforms work
        hidden, weight, bias = inputs
        ctx.save_for_backward(hidden, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        act = F.gelu(hidden).to(grad_out.dtype)  # (..., hidden_features)
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out_features)
        grad_weight = (grad_rows.t() @ act.reshape(-1, act.shape[-1])).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else grad_rows.sum(0).to(ctx.bias_dtype)
        grad_act = grad_out @ weight.to(grad_out.dtype)
        grad_hidden = torch.ops.aten.gelu_backward(grad_act.to(hidden.dtype), hidden)
        return grad_hidden, grad_weight, grad_bias


@register_notrace_module
class RecomputeGeluMlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (timm's ``Mlp`` without dropout) that recomputes the GELU in backward.

    Args:
        in_features: Input and output channels (unless ``out_features`` is given).
        hidden_features: Channels between the two linear layers.
        out_features: Output channels; default ``in_features``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    @torch.jit.unused
    def _fc2_recomputing_gelu(self, hidden: torch.Tensor) -> torch.Tensor:
        return _GeluLinear.apply(hidden, self.fc2.weight, self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if torch.jit.is_scripting():
            return self.fc2(F.gelu(hidden))
        else:
            if use_reference_math() or not (torch.is_grad_enabled() and hidden.requires_grad):
                return self.fc2(F.gelu(hidden))
            return self._fc2_recomputing_gelu(hidden)
