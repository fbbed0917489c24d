"""One switch from the layers' fast paths to their plain math.

The layers compute the same function two ways: readable plain math, and fast paths for training (custom autograd
Functions that save less or use other kernels: BRA's routed attention, the MLP that recomputes its GELU, the convs
with CPU weight gradients of their own). ``with reference_math():`` makes every layer of this package run its plain
math inside the block, e.g. to check a fast path against it or to debug; ``BiLevelRoutingAttention`` also takes
``attn_impl='reference'`` per layer. Like timm's ``set_fused_attn``, the setting is process-wide (not per thread).
"""
from contextlib import contextmanager
from typing import Iterator

__all__ = ['reference_math', 'use_reference_math']

_REFERENCE_MATH = False


def use_reference_math() -> bool:
    """Whether the layers run their plain math (inside ``reference_math()``)."""
    return _REFERENCE_MATH


@contextmanager
def reference_math(enabled: bool = True) -> Iterator[None]:
    """Run every layer of ``biformer_zoo.layers`` on its plain math inside the block (``enabled=False``: the fast
    paths, e.g. inside an outer ``reference_math()``); the previous setting is restored on exit."""
    global _REFERENCE_MATH
    previous, _REFERENCE_MATH = _REFERENCE_MATH, bool(enabled)
    try:
        yield
    finally:
        _REFERENCE_MATH = previous
