"""Zero-padding a map at the bottom/right up to multiples of a tile size, as the layers that cut maps into regions,
groups or 2x2 patches do (BRA's regions, LSDA's groups, the cross-scale merge)."""
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ['pad_to_multiple']


@register_notrace_function  # FX: the padding depends on the input size
def pad_to_multiple(x: torch.Tensor, multiple_h: int, multiple_w: int, channels_last: bool = False) -> torch.Tensor:
    """``x`` zero-padded at the bottom/right so that its height is a multiple of ``multiple_h`` and its width of
    ``multiple_w``; (B, C, H, W), or (B, H, W, C) with ``channels_last``. ``x`` itself when nothing is missing."""
    height, width = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    pad_b = (multiple_h - height % multiple_h) % multiple_h
    pad_r = (multiple_w - width % multiple_w) % multiple_w
    if pad_b == 0 and pad_r == 0:
        return x
    return F.pad(x, [0, 0, 0, pad_r, 0, pad_b] if channels_last else [0, pad_r, 0, pad_b])
