"""Recording the routing of every ``BiLevelRoutingAttention`` of a model during its forward passes."""
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from ..layers import AttentionLePE, BiLevelRoutingAttention, LSDAttention

__all__ = ['RoutingRecord', 'record_routing', 'attention_layers', 'layer_input', 'routed_layers']

ATTENTION_TYPES = (BiLevelRoutingAttention, LSDAttention, AttentionLePE)


@dataclass
class RoutingRecord:
    """The routing one ``BiLevelRoutingAttention`` call used.

    Attributes:
        indices: (B, regions, topk) int64, the routed regions of every query region (row-major region numbers).
        scores: (B, regions, regions), the routing scores the top-k came from.
        num_regions: Regions per side.
        map_size: (H, W) of the layer's input map.
        padded_size: (Hp, Wp), the map zero-padded to multiples of ``num_regions``.
    """
    indices: torch.Tensor
    scores: torch.Tensor
    num_regions: int
    map_size: Tuple[int, int]
    padded_size: Tuple[int, int]

    @property
    def topk(self) -> int:
        return self.indices.shape[-1]

    @property
    def region_size(self) -> Tuple[int, int]:
        """(rows, cols) of map tokens per region."""
        return self.padded_size[0] // self.num_regions, self.padded_size[1] // self.num_regions

    def region_of(self, row: int, col: int) -> int:
        """The region number of map token (row, col)."""
        region_h, region_w = self.region_size
        return (row // region_h) * self.num_regions + col // region_w

    def region_box(self, region: int) -> Tuple[int, int, int, int]:
        """(top, left, bottom, right) map tokens of a region, bottom/right exclusive, in the padded map."""
        region_h, region_w = self.region_size
        top, left = (region // self.num_regions) * region_h, (region % self.num_regions) * region_w
        return top, left, top + region_h, left + region_w


def attention_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every ``BiLevelRoutingAttention``, ``LSDAttention`` and ``AttentionLePE`` of ``model`` by module name (a layer
    alone is named ``''``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)}


def routed_layers(model: nn.Module) -> Dict[str, BiLevelRoutingAttention]:
    """Every ``BiLevelRoutingAttention`` of ``model`` by module name; a ValueError naming the fix if there is none."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BiLevelRoutingAttention)}
    if not layers:
        raise ValueError(
            f'{type(model).__name__} has no BiLevelRoutingAttention layer, so there is no routing to record; pass a '
            f'BiFormer model (biformer_*), a network holding the layer (e.g. biformer_zoo.layers.C2fAttention with '
            f"attention='bra', Ultralytics' C2fBRA) or the layer itself; attention_map draws the other attentions")
    return layers


def layer_input(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
    """The map an attention layer's forward got, passed by position or as ``x=``."""
    return args[0] if args else kwargs['x']


def _on_input(name: str, layer: BiLevelRoutingAttention, sizes: Dict[str, Tuple], module: nn.Module,
              args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Forward pre-hook on the layer: the size of its input map, before the router runs."""
    x = layer_input(args, kwargs)
    height, width = (x.shape[1], x.shape[2]) if layer.channels_last else (x.shape[2], x.shape[3])
    n = layer.num_regions
    sizes[name] = (int(height), int(width)), (-(-int(height) // n) * n, -(-int(width) // n) * n)


def _on_route(name: str, layer: BiLevelRoutingAttention, sizes: Dict[str, Tuple],
              records: Dict[str, RoutingRecord], module: nn.Module, args: Tuple[Any, ...],
              output: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """Forward hook on the layer's router: the scores and indices it returned."""
    if name not in sizes:  # the router called on its own, outside the layer's forward
        return
    map_size, padded_size = sizes.pop(name)
    scores, indices = output
    records[name] = RoutingRecord(indices.detach(), scores.detach(), layer.num_regions, map_size, padded_size)


@contextmanager
def record_routing(model: nn.Module) -> Iterator[Dict[str, RoutingRecord]]:
    """Record the routing of every ``BiLevelRoutingAttention`` of ``model`` during the forwards inside the block.

    Yields a dict that each forward fills with ``{module name: RoutingRecord}`` (a layer alone is named ``''``; a layer
    called more than once per forward keeps its last call). Forward hooks on each layer's ``router`` see the routing
    the layer used whatever ``attn_impl`` runs; outputs do not change, ``torch.inference_mode`` works, and the hooks
    are removed when the block ends, also on an exception. Outside the block nothing is hooked. ::

        with record_routing(model) as routing:
            model(images)
        routing['stages.2.blocks.0.attn'].indices  # (B, regions, topk)
    """
    layers = routed_layers(model)
    records: Dict[str, RoutingRecord] = {}
    sizes: Dict[str, Tuple] = {}
    handles: List[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(partial(_on_input, name, layer, sizes), with_kwargs=True))
            handles.append(layer.router.register_forward_hook(partial(_on_route, name, layer, sizes, records)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
