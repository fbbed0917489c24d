"""Helpers the layer and model tests share."""
import torch

from biformer_zoo.layers import LSDAttention
from biformer_zoo.layers.lsda import group_layout


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (norm weights around 1), so that no parameter can be silently ignored."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 and name.endswith('weight') else 0.1 * noise)
    return module


def reference_lsda(layer: LSDAttention, x: torch.Tensor) -> torch.Tensor:
    """SDA/LDA on a (B, C, H, W) map, one group at a time, using only the real tokens of each group.

    The dynamic position bias is evaluated at each pair's (dy, dx) offset inside the group.
    """
    B, C, H, W = x.shape
    group_h, group_w, interval = group_layout(
        H, W, layer.group_size, layer.interval, layer.long_distance, layer.group_rule)
    region_h, region_w = group_h * interval, group_w * interval
    heads, head_dim = layer.num_heads, C // layer.num_heads
    tokens = x.permute(0, 2, 3, 1)
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    for top in range(0, H, region_h):
        for left in range(0, W, region_w):
            for dy in range(interval):
                for dx in range(interval):
                    cells = [(a, b, top + dy + a * interval, left + dx + b * interval)
                             for a in range(group_h) for b in range(group_w)]
                    cells = [c for c in cells if c[2] < H and c[3] < W]  # drop padding
                    if not cells:
                        continue
                    ys, xs = [c[2] for c in cells], [c[3] for c in cells]
                    grid = torch.tensor([[c[0], c[1]] for c in cells], dtype=x.dtype)  # (n, 2) group coords
                    offsets = (grid[:, None] - grid[None]).reshape(-1, 2)
                    bias = layer.pos(offsets).view(len(cells), len(cells), heads).permute(2, 0, 1)
                    q, k, v = layer.qkv(tokens[:, ys, xs]).view(B, len(cells), 3, heads, head_dim).unbind(2)
                    scores = torch.einsum('bihd,bjhd->bhij', q, k) * layer.scale + bias
                    mixed = torch.einsum('bhij,bjhd->bihd', scores.softmax(-1), v).reshape(B, len(cells), C)
                    out[:, ys, xs] = layer.proj(mixed)
    return out.permute(0, 3, 1, 2)
