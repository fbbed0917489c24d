"""Input checks shared by the model families."""
import torch
from timm.layers import register_notrace_function


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a ``ValueError`` naming the problem when ``x`` is not an image batch the model can take."""
    if x.dim() != 4:
        raise ValueError(
            f'expected a 4D image batch (B, C, H, W), got a {x.dim()}D tensor of shape {list(x.shape)}; '
            f'add a batch dimension with x.unsqueeze(0) for a single image')
    if not x.is_floating_point():
        raise ValueError(
            f'expected a floating point image tensor, got dtype {x.dtype}; convert it with x.float() '
            f'(and normalise it with the model\'s mean/std)')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'expected {in_chans} input channels, got {x.shape[1]} (input shape {list(x.shape)}); '
            f'create the model with in_chans={x.shape[1]} or convert the images')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'input of {x.shape[2]}x{x.shape[3]} pixels is too small: the model needs H and W of at least '
            f'{min_size}; resize or pad the images')
