"""The attention weights of one query token over a layer's map, from the plain math of the layer's own weights."""
import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import AttentionLePE, BiLevelRoutingAttention, LSDAttention
from ..layers.lsda import group_layout
from ..layers.padding import pad_to_multiple
from .record import attention_layers, layer_input

__all__ = ['AttentionMap', 'attention_map', 'check_query', 'default_layer', 'map_stride', 'query_token']

Size = Tuple[int, int]


@dataclass
class AttentionMap:
    """Attention weights of one query token over a layer's map.

    Attributes:
        layer: Module name of the layer.
        kind: ``'routed'`` (``BiLevelRoutingAttention``), ``'grouped'`` (``LSDAttention``: short- or long-distance
            group) or ``'global'`` (``AttentionLePE``).
        padded_weights: (heads, Hp, Wp), over the map as the layer pads it (BRA's routed regions include padded
            tokens, which are zeros before the projections and get weight; LSDA masks its padding out).
        allowed: (Hp, Wp) bool, the keys the query may attend to (its routed regions, its group, or everything).
        map_size: (H, W) of the layer's input map.
        input_size: (H, W) of the input image in pixels.
        stride: (rows, cols) of input pixels per map token.
        query: (row, col) of the query in input pixels, as given.
        token: (row, col) of the query token on the map.
        num_regions: Regions per side (routed only, else 0).
        region: The query token's region (routed only, else -1).
        routed: (topk,) int64, the regions routed to the query's region (routed only, else empty).
    """
    layer: str
    kind: str
    padded_weights: torch.Tensor
    allowed: torch.Tensor
    map_size: Size
    input_size: Size
    stride: Tuple[float, float]
    query: Size
    token: Size
    num_regions: int = 0
    region: int = -1
    routed: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    @property
    def weights(self) -> torch.Tensor:
        """(heads, H, W) over the layer's map, without padding."""
        return self.padded_weights[:, :self.map_size[0], :self.map_size[1]]

    @property
    def padding_weight(self) -> torch.Tensor:
        """(heads,) the weight the query gives to padded tokens; ``weights`` sums to 1 minus this."""
        return self.padded_weights.sum((1, 2)) - self.weights.sum((1, 2))


def map_stride(input_size: int, map_size: int) -> float:
    """Input pixels per map token along one side: the power of two ``s`` for which a stride-``s`` network (padding
    odd sides up, ``ceil``, or cropping them, ``floor``) turns ``input_size`` into ``map_size``; else the ratio."""
    stride = 1
    while stride <= input_size:
        if map_size in (-(-input_size // stride), input_size // stride):
            return float(stride)
        stride *= 2
    return input_size / map_size


def check_query(query: Sequence[int], input_size: Size) -> Size:
    """(row, col) in input pixels as ints; a ValueError naming the valid range for a query outside the image."""
    def is_int(v) -> bool:
        return isinstance(v, numbers.Integral) or (torch.is_tensor(v) and v.numel() == 1 and not v.is_floating_point())

    if not hasattr(query, '__len__') or len(query) != 2 or not all(is_int(v) for v in query):
        raise ValueError(f'query must be (row, col), two ints in input pixels, got {query!r}')
    row, col = int(query[0]), int(query[1])
    height, width = input_size
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f'query (row, col) = ({row}, {col}) is outside the {height}x{width} input image; pass row in '
                         f'[0, {height - 1}] and col in [0, {width - 1}] (input pixels, row first)')
    return row, col


def query_token(query: Sequence[int], input_size: Size, map_size: Size) -> Size:
    """(row, col) in input pixels -> (row, col) of the map token that covers it (``check_query`` first)."""
    row, col = check_query(query, input_size)
    height, width = input_size
    token_row = min(int(row // map_stride(height, map_size[0])), map_size[0] - 1)
    token_col = min(int(col // map_stride(width, map_size[1])), map_size[1] - 1)
    return token_row, token_col


def default_layer(model: nn.Module) -> str:
    """The layer drawn when none is named: the last routed attention, else the last attention of any kind."""
    layers = _find_layers(model)
    routed = [name for name, m in layers.items() if isinstance(m, BiLevelRoutingAttention)]
    return routed[-1] if routed else list(layers)[-1]


def _find_layers(model: nn.Module) -> Dict[str, nn.Module]:
    layers = attention_layers(model)
    if not layers:
        raise ValueError(
            f'{type(model).__name__} has no BiLevelRoutingAttention, LSDAttention or AttentionLePE layer to draw; pass '
            f'a zoo model (biformer_*, crossformer*), a network holding one of the layers (biformer_zoo.layers.'
            f'C2fAttention, the Ultralytics blocks) or a layer itself; for other models use Grad-CAM (README, '
            f'"Visualising attention")')
    return layers


class _LayerInput(Exception):
    """Raised by the capturing hook to stop the forward once the layer has run."""


def _capture_input(model: nn.Module, name: str, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input the layer gets (at its first call) when ``model`` runs on ``images``; the forward stops right after
    the layer."""
    captured = []

    def hook(module: nn.Module, args: Tuple, kwargs: Dict, output: torch.Tensor) -> None:
        captured.append(layer_input(args, kwargs).detach())
        raise _LayerInput

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # the weights of the eval-mode model: no attention dropout, no BatchNorm statistics updated
    try:
        model(images)
    except _LayerInput:
        pass
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    if not captured:
        raise ValueError(f'layer {name!r} did not run in the forward of {type(model).__name__}; name a layer that '
                         f'the forward uses')
    return captured[0]


def attention_map(
        model: nn.Module,
        images: torch.Tensor,
        layer: Optional[str],
        query: Sequence[int],
) -> AttentionMap:
    """The attention weights of the token at ``query`` over the map of ``layer``, from the layer's own weights.

    Args:
        model: Any model holding ``BiLevelRoutingAttention``, ``LSDAttention`` or ``AttentionLePE`` layers, or one
            such layer.
        images: (1, C, H, W) or (C, H, W), as the model takes it (normalised); a layer alone takes its feature map.
        layer: Module name of the layer (``attention_layers(model)`` lists them); None for ``default_layer``.
        query: (row, col) in input pixels, mapped to the layer's map by its stride.

    BRA: the query token over the tokens of its region's routed regions (zero elsewhere; the routing recomputed as
    the layer computes it). LSDA: over the query's short- or long-distance group, with the dynamic position bias.
    ``AttentionLePE`` (BiFormer's last stage): over the whole map. Each head's weights sum to 1 over the padded map.
    The forward runs in eval mode (each module's mode is restored afterwards) and stops after the layer.
    """
    layers = _find_layers(model)
    name = default_layer(model) if layer is None else layer
    if name not in layers:
        raise ValueError(f'unknown layer {name!r} for {type(model).__name__}; valid names: '
                         f'{", ".join(repr(n) for n in layers)}')
    module = layers[name]
    if not torch.is_tensor(images) or images.dim() not in (3, 4):
        raise ValueError(f'images must be a (1, C, H, W) or (C, H, W) tensor, got '
                         f'{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}; '
                         f'biformer_zoo.viz.preprocess makes one from a path or PIL image')
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.shape[0] != 1:
        raise ValueError(f'attention_map takes one image, got a batch of {images.shape[0]}; pass images[i:i + 1]')
    # a layer alone may take (B, H, W, C); everything else takes images (B, C, H, W)
    input_size = (images.shape[1], images.shape[2]) if module is model and getattr(module, 'channels_last', False) \
        else (images.shape[-2], images.shape[-1])
    query = check_query(query, input_size)  # before the forward
    with torch.no_grad():
        x = _capture_input(model, name, module, images)[0]
        if not getattr(module, 'channels_last', False):
            x = x.permute(1, 2, 0)  # (H, W, C)
        map_size = (x.shape[0], x.shape[1])
        stride = (map_stride(input_size[0], map_size[0]), map_stride(input_size[1], map_size[1]))
        token = query_token(query, input_size, map_size)
        common = dict(layer=name, map_size=map_size, input_size=input_size, stride=stride, query=query, token=token)
        if isinstance(module, BiLevelRoutingAttention):
            return _routed_map(module, x, token, common)
        if isinstance(module, LSDAttention):
            return _grouped_map(module, x, token, common)
        return _global_map(module, x, token, common)


def _softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per-head softmax over the allowed keys; (heads, keys) -> (heads, keys)."""
    return logits.masked_fill(~allowed, float('-inf')).softmax(-1)


def _routed_map(layer: BiLevelRoutingAttention, x: torch.Tensor, token: Size, common: Dict) -> AttentionMap:
    n = layer.num_regions
    x = pad_to_multiple(x.unsqueeze(0), n, n, channels_last=True)[0]  # as the layer pads: (Hp, Wp, C)
    padded_h, padded_w = x.shape[0], x.shape[1]
    q, k, _ = layer.qkv(x).split([layer.qk_dim, layer.qk_dim, layer.dim], dim=-1)  # (Hp, Wp, *)
    region_h, region_w = padded_h // n, padded_w // n
    q_regions = q.reshape(n, region_h, n, region_w, layer.qk_dim).mean((1, 3)).flatten(0, 1)  # (regions, qk_dim)
    k_regions = k.reshape(n, region_h, n, region_w, layer.qk_dim).mean((1, 3)).flatten(0, 1)  # (regions, qk_dim)
    # forward, not a call: this recomputation is not a routing the layer used, so record_routing's hooks skip it
    _, routed = layer.router.forward(q_regions.unsqueeze(0), k_regions.unsqueeze(0))  # (1, regions, topk)
    row, col = token
    region = (row // region_h) * n + col // region_w
    token_region = ((torch.arange(padded_h) // region_h).view(-1, 1) * n
                    + (torch.arange(padded_w) // region_w).view(1, -1))  # (Hp, Wp)
    allowed = torch.isin(token_region, routed[0, region].cpu()).to(x.device)  # (Hp, Wp)
    heads, head_dim = layer.num_heads, layer.qk_dim // layer.num_heads
    query = q[row, col].view(heads, 1, head_dim)
    keys = k.reshape(padded_h * padded_w, heads, head_dim).transpose(0, 1)  # (heads, Hp * Wp, head_dim)
    logits = (query @ keys.transpose(1, 2)).squeeze(1) * layer.scale  # (heads, Hp * Wp)
    weights = _softmax(logits, allowed.flatten()).view(heads, padded_h, padded_w)
    return AttentionMap(kind='routed', padded_weights=weights, allowed=allowed, num_regions=n, region=region,
                        routed=routed[0, region], **common)


def _grouped_map(layer: LSDAttention, x: torch.Tensor, token: Size, common: Dict) -> AttentionMap:
    height, width, channels = x.shape
    group_h, group_w, interval = group_layout(
        height, width, layer.group_size, layer.interval, layer.long_distance, layer.group_rule)
    span_h, span_w = group_h * interval, group_w * interval  # map tokens covered by one set of interleaved groups
    x = pad_to_multiple(x.unsqueeze(0), span_h, span_w, channels_last=True)[0]  # as the layer pads
    padded_h, padded_w = x.shape[0], x.shape[1]
    heads = layer.num_heads
    qkv = layer.qkv(x).view(padded_h, padded_w, 3, heads, channels // heads)
    row, col = token
    # the query's group: the tokens `interval` apart from it within its span, starting at its phase
    rows = (row // span_h) * span_h + row % interval + interval * torch.arange(group_h, device=x.device)
    cols = (col // span_w) * span_w + col % interval + interval * torch.arange(group_w, device=x.device)
    keys = qkv[rows][:, cols][:, :, 1].reshape(group_h * group_w, heads, -1).transpose(0, 1)  # (heads, N, head_dim)
    query = qkv[row, col, 0].unsqueeze(1)  # (heads, 1, head_dim)
    position = ((row % span_h) // interval) * group_w + (col % span_w) // interval  # the query's place in its group
    bias = layer.compute_position_bias(group_h, group_w)[:, position]  # (heads, N)
    logits = (query * layer.scale @ keys.transpose(1, 2)).squeeze(1) + bias  # (heads, N)
    real = ((rows < height).view(-1, 1) & (cols < width).view(1, -1)).flatten()  # padded keys are masked out
    group_weights = _softmax(logits, real).view(heads, group_h, group_w)
    weights = x.new_zeros(heads, padded_h, padded_w)
    weights[:, rows.view(-1, 1), cols.view(1, -1)] = group_weights
    allowed = torch.zeros(padded_h, padded_w, dtype=torch.bool, device=x.device)
    allowed[rows.view(-1, 1), cols.view(1, -1)] = True
    return AttentionMap(kind='grouped', padded_weights=weights, allowed=allowed, **common)


def _global_map(layer: AttentionLePE, x: torch.Tensor, token: Size, common: Dict) -> AttentionMap:
    height, width, channels = x.shape
    heads = layer.num_heads
    qkv = layer.qkv(x).view(height * width, 3, heads, channels // heads)
    query = qkv[token[0] * width + token[1], 0].unsqueeze(1)  # (heads, 1, head_dim)
    keys = qkv[:, 1].transpose(0, 1)  # (heads, H * W, head_dim)
    weights = ((query @ keys.transpose(1, 2)).squeeze(1) * layer.scale).softmax(-1).view(heads, height, width)
    allowed = torch.ones(height, width, dtype=torch.bool, device=x.device)
    return AttentionMap(kind='global', padded_weights=weights, allowed=allowed, **common)
