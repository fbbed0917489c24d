"""Checks of user input at the boundaries: image batches into the models, feature maps and arguments into the layers.

Each raises a ``ValueError`` naming the expected and the received value and the fix. The per-call checks read shapes
and dtypes only, never data, so they cost a few attribute reads and trace under torch.compile without a graph break;
under TorchScript only the shape checks of ``check_image_input`` run, and the layer checks also skip torch.jit.trace.
"""
import numbers
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

__all__ = [
    'check_image_input', 'check_feature_map', 'check_int_arg', 'check_rate', 'check_attention_args', 'parameter_dtype']


@register_notrace_function
def parameter_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of ``module``'s first parameter (what its input should have), None if it has none."""
    param = next(module.parameters(), None)
    return None if param is None else param.dtype


def _autocast_covers(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether autocast is on for ``x``'s device and casts between ``x.dtype`` and ``dtype`` (it leaves float64)."""
    device_type = x.device.type
    return (x.is_floating_point() and torch.float64 not in (x.dtype, dtype)
            and torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type))


@torch.jit.unused
def _check_tensor_and_dtype(x: Any, what: str, dtype: Optional[torch.dtype]) -> None:
    """Raise for a non-tensor ``x``, or a dtype other than ``dtype`` outside autocast (the messages shared by the
    model and the layer checks)."""
    if not isinstance(x, torch.Tensor):
        kind = f'{type(x).__module__}.{type(x).__name__}'
        fix = 'torch.from_numpy(x)' if type(x).__module__ == 'numpy' else 'torch.as_tensor(x)'
        raise ValueError(f'{what} must be a torch.Tensor, got a {kind}; convert it with {fix}')
    to = 'x.float()' if dtype in (None, torch.float32) else f'x.to({dtype})'
    if not x.is_floating_point():
        raise ValueError(f'{what} must be a floating point tensor, got dtype {x.dtype}; convert it with {to}')
    if dtype is not None and x.dtype != dtype and not _autocast_covers(x, dtype):
        device_type = x.device.type
        autocast = (f', or run under torch.autocast({device_type!r})'
                    if torch.amp.is_autocast_available(device_type) and torch.float64 not in (x.dtype, dtype) else '')
        raise ValueError(f'{what} has dtype {x.dtype} but the weights have {dtype}; convert the input with '
                         f'x.to({dtype}), or the weights with model.to({x.dtype}){autocast}')


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, min_size: int, dtype: Optional[torch.dtype] = None) -> None:
    """Raise a ``ValueError`` naming the problem when ``x`` is not an image batch the model can take.

    ``dtype``: the model's parameter dtype; a floating input of another dtype is refused unless autocast is on.
    """
    if not torch.jit.is_scripting() and not isinstance(x, torch.Tensor):
        _check_tensor_and_dtype(x, 'the image batch', dtype)
    if x.dim() != 4:
        raise ValueError(
            f'expected a 4D image batch (B, C, H, W), got a {x.dim()}D tensor of shape {list(x.shape)}; '
            f'add a batch dimension with x.unsqueeze(0) for a single image')
    if not x.is_floating_point():
        raise ValueError(
            f'expected a floating point image tensor, got dtype {x.dtype}; convert it with x.float() '
            f'(and normalise it with the model\'s mean/std)')
    if not torch.jit.is_scripting() and dtype is not None and x.dtype != dtype:
        _check_tensor_and_dtype(x, 'the image batch', dtype)
    if x.shape[1] != in_chans:
        raise ValueError(
            f'expected {in_chans} input channels, got {x.shape[1]} (input shape {list(x.shape)}); '
            f'create the model with in_chans={x.shape[1]} or convert the images')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'input of {x.shape[2]}x{x.shape[3]} pixels is too small: the model needs H and W of at least '
            f'{min_size}; resize or pad the images')


@register_notrace_function
def check_feature_map(
        x: torch.Tensor,
        channels: int,
        dtype: torch.dtype,
        channels_last: Optional[bool],
        layer: str,
        channels_arg: str,
) -> None:
    """Raise a ``ValueError`` naming the problem when ``x`` is not a feature map ``layer`` can take.

    The map is (B, C, H, W), or (B, H, W, C) with ``channels_last`` (None: a layer that takes only (B, C, H, W)),
    with ``channels`` channels (the layer's ``channels_arg``) and the dtype of the layer's weights (another floating
    dtype passes under autocast). A correct map costs one comparison of shape and dtype; the diagnosis runs only when
    it fails. Skipped under TorchScript and torch.jit.trace (a trace cannot record it, only warn that it is constant).
    """
    if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
        if (not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[3 if channels_last else 1] != channels
                or x.dtype != dtype):
            _diagnose_feature_map(x, channels, dtype, channels_last, layer, channels_arg)


@torch.jit.unused
def _diagnose_feature_map(
        x: Any, channels: int, dtype: torch.dtype, channels_last: Optional[bool], layer: str, channels_arg: str,
) -> None:
    what = f'the input of {layer}'
    _check_tensor_and_dtype(x, what, dtype)
    layout, axis = ('(B, H, W, C)', 3) if channels_last else ('(B, C, H, W)', 1)
    if x.dim() != 4:
        raise ValueError(
            f'{what} must be a 4D {layout} map, got a {x.dim()}D tensor of shape {list(x.shape)}; add a batch '
            f'dimension with x.unsqueeze(0), or reshape (B, N, C) tokens to a {layout} map')
    if x.shape[axis] == channels:
        return  # a floating dtype that autocast casts
    # the other layout: its channel axis, name, the permute that converts it, and the layer flag that takes it
    other_axis, other, permute, flag = (
        (1, '(B, C, H, W)', '(0, 2, 3, 1)', False) if channels_last else (3, '(B, H, W, C)', '(0, 3, 1, 2)', True))
    if x.shape[other_axis] == channels:
        or_flag = '' if channels_last is None else f', or build the layer with channels_last={flag}'
        raise ValueError(f'{what} must be a {layout} map, got shape {list(x.shape)}, which looks {other}; pass '
                         f'x.permute{permute}{or_flag}')
    raise ValueError(
        f'{what} must have {channels} channels ({channels_arg}={channels}) in a {layout} map, got {x.shape[axis]} '
        f'(shape {list(x.shape)}); build the layer with {channels_arg}={x.shape[axis]}, or project the input to '
        f'{channels} channels')


def check_int_arg(name: str, value: Any, minimum: Optional[int] = 1, fix: str = '') -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum`` (any int for None); ``fix``
    ends the message."""
    fix = fix or f'pass an int >= {minimum}'
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'{name} must be an int, got {value!r} ({type(value).__name__}); {fix}')
    if minimum is not None and value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value}; {fix}')


def check_rate(name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f'{name} must be a number in [0, 1) (a probability per sample), got {value!r}; '
                         f'stochastic depth and dropout rates used in training are 0.0-0.5')


def check_attention_args(dim: int, num_heads: int, side_dwconv: int, qk_dim: Optional[int] = None) -> None:
    """The arguments BiFormer's two attentions share (``bra``, ``global_attention``): widths, heads and the LePE
    kernel."""
    check_int_arg('dim', dim, fix='pass the channels of the input map')
    check_int_arg('num_heads', num_heads, fix=f'pass a divisor of dim={dim}')
    check_int_arg('side_dwconv', side_dwconv, minimum=0, fix='pass an odd kernel size, or 0 for no LePE')
    if side_dwconv > 0 and side_dwconv % 2 == 0:
        raise ValueError(f'side_dwconv must be odd or 0, got {side_dwconv}; pass an odd kernel size (e.g. 5), '
                         f'or 0 for no LePE')
    if qk_dim is not None:
        check_int_arg('qk_dim', qk_dim, fix='pass the channels of queries and keys, or None for dim')
    widths = f'dim ({dim})' if qk_dim is None else f'dim ({dim}) and qk_dim ({qk_dim})'
    if dim % num_heads or (qk_dim or dim) % num_heads:
        divisors = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0 and (qk_dim or dim) % h == 0]
        raise ValueError(f'{widths} must be divisible by num_heads ({num_heads}); use num_heads from {divisors}')
