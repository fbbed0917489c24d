"""Figures in the papers' style (matplotlib): the routed regions of a query region, and attention heat maps.

Everything is drawn in input-image pixels: the image fills its ``input_size`` (its own size unless given, so a
larger picture of the same framing works too), map tokens cover ``stride`` pixels each, and what lies in a layer's
padding is clipped to the image.
"""
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config

from ..layers import BiLevelRoutingAttention
from .attention import AttentionMap, attention_map, default_layer, map_stride, query_token
from .record import RoutingRecord, attention_layers, record_routing

if TYPE_CHECKING:  # matplotlib is the [viz] extra: imported where a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ['ImageLike', 'load_image', 'plot_attention', 'plot_routing', 'preprocess', 'to_image', 'visualize']

ImageLike = Union[torch.Tensor, np.ndarray, Image.Image, str, Path]
QUERY_COLOR = 'red'


def load_image(path: Union[str, Path]) -> Image.Image:
    """An image file as an RGB PIL image; a ValueError naming the file if it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'image {str(path)!r} is not a file; pass the path of an image (PNG, JPEG, ...)')
    try:
        return Image.open(path).convert('RGB')
    # ImportError: once imported, Ultralytics patches Image.open to retry an unknown file with pi_heif, and raises
    # ModuleNotFoundError where that is not installed
    except (OSError, ImportError):
        raise ValueError(f'cannot read {str(path)!r} as an image; pass a PNG, JPEG or another format Pillow reads') \
            from None


def to_image(image: ImageLike, mean: Optional[Sequence[float]] = None,
             std: Optional[Sequence[float]] = None) -> np.ndarray:
    """An image to show, (H, W, 3) float in [0, 1], from a path, a PIL image, an (H, W, 3) array or a
    (1, 3, H, W) / (3, H, W) tensor. A tensor normalised with ``mean``/``std`` (e.g. the model's ``pretrained_cfg``
    values) is un-normalised with them; without them, one outside [0, 1] is rescaled to its range."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if torch.is_tensor(image):
        x = image.detach().float().cpu()
        x = x[0] if x.dim() == 4 else x
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f'an image tensor must be (1, 3, H, W) or (3, H, W), got {tuple(image.shape)}')
        if mean is not None and std is not None:
            x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        elif x.min() < 0 or x.max() > 1:
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        return x.clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f'an image must be a path, a PIL image, an (H, W, 3) array or an image tensor, got an array '
                         f'of shape {array.shape}')
    array = array[..., :3]
    return array.astype(np.float32) / 255. if array.dtype == np.uint8 else array.astype(np.float32).clip(0, 1)


def preprocess(model: nn.Module, image: Union[str, Path, Image.Image]) -> torch.Tensor:
    """A path or PIL image as the model takes it, (1, 3, H, W): timm's eval transform for the model's data config
    (``resolve_data_config``: resize, centre crop, normalise with its ``pretrained_cfg``)."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    transform = create_transform(**resolve_data_config({}, model=model))
    return transform(image.convert('RGB')).unsqueeze(0)


def _axes(ax: Optional['Axes']) -> 'Axes':
    if ax is not None:
        return ax
    from matplotlib.figure import Figure
    return Figure(figsize=(4, 4), layout='constrained').add_subplot()


def _show(ax: 'Axes', image: np.ndarray, input_size: Tuple[int, int]) -> None:
    height, width = input_size
    ax.imshow(image, extent=(0, width, height, 0), interpolation='bilinear')
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()


def _box(ax: 'Axes', box: Tuple[int, int, int, int], stride: Tuple[float, float], **kwargs) -> None:
    """A rectangle over map tokens (top, left, bottom, right), drawn in pixels and clipped to the axes."""
    from matplotlib.patches import Rectangle
    top, left, bottom, right = box
    ax.add_patch(Rectangle((left * stride[1], top * stride[0]), (right - left) * stride[1],
                           (bottom - top) * stride[0], **kwargs))


def _mark(ax: 'Axes', query: Tuple[int, int]) -> None:
    ax.plot(query[1] + 0.5, query[0] + 0.5, marker='*', markersize=12, color=QUERY_COLOR, markeredgecolor='white',
            gid='query')


def plot_routing(
        image: ImageLike,
        record: RoutingRecord,
        query: Sequence[int],
        batch_index: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        cmap: str = 'autumn',
        ax: Optional['Axes'] = None,
) -> 'Figure':
    """The image with the layer's region grid, the query's region outlined and its ``topk`` routed regions shaded
    by rank (the best routed region darkest, numbered 1..topk), as BiFormer's Figure 6.

    Args:
        image: The model's input image (path, PIL, array or tensor; see ``to_image`` for ``mean``/``std``).
        record: One layer's ``RoutingRecord`` (``record_routing``).
        query: (row, col) in input pixels.
        batch_index: Which image of the recorded batch.
        input_size: (H, W) of the model input in pixels; default the image's size.
        ax: Axes to draw into; default a new figure's.

    Returns the figure; the shaded regions are patches with gid ``'routed-<rank>'``, the outline ``'query-region'``.
    """
    import matplotlib
    picture = to_image(image, mean, std)
    input_size = input_size or picture.shape[:2]
    stride = (map_stride(input_size[0], record.map_size[0]), map_stride(input_size[1], record.map_size[1]))
    region = record.region_of(*query_token(query, input_size, record.map_size))
    ax = _axes(ax)
    _show(ax, picture, input_size)
    region_h, region_w = record.region_size
    for i in range(1, record.num_regions):
        ax.axhline(i * region_h * stride[0], color='white', linewidth=0.6, alpha=0.8)
        ax.axvline(i * region_w * stride[1], color='white', linewidth=0.6, alpha=0.8)
    colors = matplotlib.colormaps[cmap]
    routed = record.indices[batch_index, region].tolist()
    for rank, routed_region in enumerate(routed):
        color = colors(rank / max(len(routed) - 1, 1))
        _box(ax, record.region_box(routed_region), stride, facecolor=color, edgecolor='none', alpha=0.5,
             gid=f'routed-{rank}')
        top, left, bottom, right = record.region_box(routed_region)
        ax.text((left + right) / 2 * stride[1], (top + bottom) / 2 * stride[0], str(rank + 1), color='black',
                ha='center', va='center', fontsize=8, clip_on=True)
    _box(ax, record.region_box(region), stride, fill=False, edgecolor=QUERY_COLOR, linewidth=2, gid='query-region')
    _mark(ax, (int(query[0]), int(query[1])))
    ax.set_title(f'{len(routed)} routed regions of the query region', fontsize=9)
    return ax.figure


def plot_attention(
        image: ImageLike,
        weights: Union[AttentionMap, torch.Tensor],
        head: Optional[int] = None,
        query: Optional[Sequence[int]] = None,
        input_size: Optional[Tuple[int, int]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        cmap: str = 'jet',
        alpha: float = 0.5,
        ax: Optional['Axes'] = None,
) -> 'Figure':
    """The image with attention weights alpha-blended over it as a heat map (one map token = ``stride`` pixels).

    Args:
        image: The model's input image (path, PIL, array or tensor; see ``to_image`` for ``mean``/``std``).
        weights: An ``AttentionMap`` (its query is marked, a routed query's region outlined), or a (H, W) or
            (heads, H, W) tensor over a layer's map.
        head: Which head; None for the mean over heads.
        query: (row, col) in input pixels to mark; default the ``AttentionMap``'s.
        input_size: (H, W) of the model input in pixels; default the ``AttentionMap``'s, else the image's size.
    """
    picture = to_image(image, mean, std)
    if isinstance(weights, AttentionMap):
        amap, heat = weights, weights.weights
        input_size = input_size or amap.input_size
        query = amap.query if query is None else query
    else:
        amap, heat = None, weights.detach()
        input_size = input_size or picture.shape[:2]
    heat = heat.float().cpu()
    if heat.dim() == 3:
        heat = heat.mean(0) if head is None else heat[head]
    if heat.dim() != 2:
        raise ValueError(f'weights must be an AttentionMap or a (H, W) or (heads, H, W) tensor, got '
                         f'{tuple(weights.shape)}')
    map_h, map_w = heat.shape
    stride = (map_stride(input_size[0], map_h), map_stride(input_size[1], map_w))
    ax = _axes(ax)
    _show(ax, picture, input_size)
    heat = np.ma.masked_equal(heat.numpy(), 0.)  # keys the query cannot attend to stay uncoloured
    ax.imshow(heat, extent=(0, map_w * stride[1], map_h * stride[0], 0), cmap=cmap, alpha=alpha,
              interpolation='nearest', vmin=0, gid='attention')
    ax.set_xlim(0, input_size[1])
    ax.set_ylim(input_size[0], 0)
    if amap is not None and amap.kind == 'routed':
        padded_h, padded_w = amap.padded_weights.shape[1:]
        region_h, region_w = padded_h // amap.num_regions, padded_w // amap.num_regions
        top, left = (amap.region // amap.num_regions) * region_h, (amap.region % amap.num_regions) * region_w
        _box(ax, (top, left, top + region_h, left + region_w), stride, fill=False, edgecolor='white', linewidth=1.5,
             gid='query-region')
    if query is not None:
        _mark(ax, (int(query[0]), int(query[1])))
    kind = f'{amap.kind} attention' if amap is not None else 'attention'
    ax.set_title(f'{kind}, ' + ('mean of the heads' if head is None else f'head {head}'), fontsize=9)
    return ax.figure


def visualize(
        model: nn.Module,
        image: ImageLike,
        query: Sequence[int],
        layer: Optional[str] = None,
) -> 'Figure':
    """One figure for a query of one image: for a routed layer its routed regions and its attention map side by side,
    for the others the attention map. What ``biformer-zoo viz`` writes.

    Args:
        model: A model holding attention layers (``attention_map``).
        image: For a timm model, a path or PIL image (preprocessed with the model's data config: ``preprocess``) or a
            (1, 3, H, W) tensor normalised with it; for other models (a YOLO), the tensor the model takes.
        query: (row, col) in pixels of the model input (after the data config's resize and crop).
        layer: Module name of the layer; None for ``default_layer``.
    """
    from matplotlib.figure import Figure
    timm_model = getattr(model, 'pretrained_cfg', None) is not None
    if not torch.is_tensor(image) and not timm_model:
        raise ValueError(f'{type(model).__name__} has no pretrained_cfg (data config) to preprocess an image with; '
                         f'pass the (1, 3, H, W) tensor the model takes')
    images = image if torch.is_tensor(image) else preprocess(model, image)
    # how the shown image is un-normalised: the data config's mean/std, or none for models without one
    display = {k: v for k, v in resolve_data_config({}, model=model).items() if k in ('mean', 'std') and timm_model}
    name = default_layer(model) if layer is None else layer
    routed = isinstance(attention_layers(model).get(name), BiLevelRoutingAttention)
    if routed:
        with record_routing(model) as records:
            amap = attention_map(model, images, name, query)
    else:
        amap = attention_map(model, images, name, query)
    figure = Figure(figsize=(8 if routed else 4, 4.4), layout='constrained')
    axes = figure.subplots(1, 2 if routed else 1, squeeze=False)[0]
    if routed:
        plot_routing(images, records[name], query, ax=axes[0], **display)
    plot_attention(images, amap, ax=axes[-1], **display)
    figure.suptitle(f'{name or type(model).__name__}: query (row, col) = ({amap.query[0]}, {amap.query[1]}), '
                    f'map {amap.map_size[0]}x{amap.map_size[1]}, stride {amap.stride[0]:g}', fontsize=10)
    return figure
