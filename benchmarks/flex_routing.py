"""FlexAttention over a block mask made from BRA's routing, against the layer's own fine attention, side by side.

    python benchmarks/flex_routing.py --rounds 20                         # CPU: forward only
    python benchmarks/flex_routing.py --rounds 20 --in-model              # and whole biformer_small eval steps
    python benchmarks/flex_routing.py --device cuda --backward --rounds 20

At BiFormer-S's three routed stages (224x224 input, batch 8: 56x56 maps with 64-token regions and topk 1, 28x28
with 16-token regions and topk 4, 14x14 with 4-token regions and topk 16) both sides start from the projected
q, k, v in the layer's (B, H, W, C) layout and end with the attention output added to a row-major map, as the
layer adds LePE:

- ``layer``: ``BiLevelRoutingAttention.fine_attention``, i.e. what the layer runs (gathered rows + SDPA in stages
  1-2, masked dense SDPA in stage 3).
- ``flex``: q, k, v copied into region-major token order, ``flex_attention`` (compiled, unless ``--eager``) with a
  ``BlockMask`` whose key blocks are the routed regions (``_routed_flex.region_block_mask``, one block per region,
  all blocks full, so no mask function runs), and the output added back in row-major order. The layer's own
  ``attn_impl='flex'`` (its CUDA default) runs the same with CUDA kernel tiles; ``benchmarks/cuda_report.py``
  measures it on a GPU.

Rounds alternate the two (``bench.round_robin``); medians in ms, the flex/layer ratio, the largest difference of
the outputs relative to the largest output value, and the time of flex's first call (compilation). FlexAttention
has no backward on CPU in the torch versions this was written against; ``--backward`` there prints the error.
``--in-model [TOPK ...]`` also times biformer_small eval steps with flex in its layers of those topks (default 4,
the second stage) against the unchanged model, round-robin, and prints the paired median ratio.
"""
import argparse
import copy
import statistics
import time
from functools import partial
from typing import Callable, Dict, List, Tuple

import torch
from torch.nn.attention.flex_attention import flex_attention

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.bench import make_step, round_robin
from biformer_zoo.layers._routed_flex import region_block_mask, to_region_major
from biformer_zoo.layers.bra import BiLevelRoutingAttention, route_regions
from biformer_zoo.report import TextTable, create_model_for_size, tables_to_markdown

# (map side, channels, heads, topk) of BiFormer-S's routed stages at 224x224
STAGES: List[Tuple[int, int, int, int]] = [(56, 64, 2, 1), (28, 128, 4, 4), (14, 256, 8, 16)]


def flex_region_attention(layer: BiLevelRoutingAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          routed: torch.Tensor, flex: Callable[..., torch.Tensor]) -> torch.Tensor:
    """What ``layer.fine_attention`` computes, with flex over region-major tokens.

    (B, H, W, *) maps in; (B, n, rh, n, rw, heads, d) out, a view whose memory is in region order (the layer adds
    its row-major LePE map to it, as to its gather path's output).
    """
    B, H, W, _ = v.shape
    n, heads = layer.num_regions, layer.num_heads
    rh, rw = H // n, W // n
    tokens = rh * rw  # whole regions, no padding, at these sizes
    out = flex(*(to_region_major(x, n, heads, tokens) for x in (q, k, v)),
               block_mask=region_block_mask(routed, tokens, tokens), scale=layer.scale)  # (B, heads, H * W, d)
    return out.view(B, heads, n, n, rh, rw, -1).permute(0, 2, 4, 3, 5, 1, 6)


def _plus_base(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` (B, H, W, C) plus an attention output in any of the layouts above, row-major, as the layer adds LePE."""
    return (base.view(out.shape) + out).view(base.shape)


def model_ratio(name: str = 'biformer_small', topks: Tuple[int, ...] = (4,), batch_size: int = 8, img_size: int = 224,
                rounds: int = 20, warmup: int = 2, compiled: bool = True,
                device: str = 'cpu') -> Tuple[float, float, float, float]:
    """Eval step time of ``name`` with flex in its BRA layers of the given ``topks`` over the unchanged model's.

    Returns the paired median ratio, its lower and upper quartiles, and the largest logit difference relative to the
    largest logit.
    """
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    model = create_model_for_size(name, (img_size, img_size)).eval().to(device)
    patched = copy.deepcopy(model)
    for module in patched.modules():
        if isinstance(module, BiLevelRoutingAttention) and module.topk in topks:
            module.fine_attention = partial(flex_region_attention, module, flex=flex)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    with torch.inference_mode():
        reference = model(x)
        difference = ((patched(x) - reference).abs().max() / reference.abs().max()).item()
    samples = round_robin({'layer': make_step(model, x, 'infer'), 'flex': make_step(patched, x, 'infer')}, rounds,
                          device, warmup=warmup)
    ratios = sorted(f / m for f, m in zip(samples['flex'], samples['layer']))
    return ratios[len(ratios) // 2], ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4], difference


def measure(batch_size: int = 8, rounds: int = 10, warmup: int = 2, device: str = 'cpu', backward: bool = False,
            compiled: bool = True, stages: List[Tuple[int, int, int, int]] = STAGES) -> List[List[str]]:
    """Rows: stage, mode, layer ms, flex ms, flex / layer, max |difference| / max |output|, flex first call (s)."""
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    rows = []
    for side, dim, heads, topk in stages:
        layer = BiLevelRoutingAttention(dim, heads, 7, topk, channels_last=True).to(device)
        q, k, v, base = (torch.randn(batch_size, side, side, dim, device=device) for _ in range(4))
        routed = route_regions(torch.randn(batch_size, 49, dim, device=device),
                               torch.randn(batch_size, 49, dim, device=device), topk)
        label = f'{batch_size}x{side}x{side}x{dim}, {heads} heads, topk {topk}'
        functions: Dict[str, Callable[..., torch.Tensor]] = {
            'layer': lambda *t: _plus_base(layer.fine_attention(*t, routed), base),
            'flex': lambda *t: _plus_base(flex_region_attention(layer, *t, routed, flex), base)}
        for mode in (('forward', 'forward + backward') if backward else ('forward',)):
            inputs = [x.detach().requires_grad_(mode != 'forward') for x in (q, k, v)]

            def step(fn: Callable[..., torch.Tensor]) -> torch.Tensor:
                if mode == 'forward':
                    with torch.inference_mode():
                        return fn(*inputs)
                out = fn(*inputs)
                out.sum().backward()
                return out

            try:
                begin = time.perf_counter()
                flex_out = step(functions['flex'])
                first_s = time.perf_counter() - begin
            except Exception as e:  # e.g. no flex backward on CPU, block sizes a device does not take
                rows.append([label, mode, '', '', f'flex failed: {type(e).__name__}: {str(e).splitlines()[0]}', '',
                             ''])
                continue
            layer_out = step(functions['layer'])
            difference = ((flex_out - layer_out).abs().max() / layer_out.abs().max()).item()
            samples = round_robin({name: lambda fn=fn: step(fn) for name, fn in functions.items()}, rounds, device,
                                  warmup=warmup)
            ms = {name: statistics.median(values) for name, values in samples.items()}
            rows.append([label, mode, f'{ms["layer"]:.2f}', f'{ms["flex"]:.2f}', f'{ms["flex"] / ms["layer"]:.2f}x',
                         f'{difference:.1e}', f'{first_s:.1f}'])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--threads', type=int, default=2, help='torch threads (CPU)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--backward', action='store_true', help='also time forward + backward')
    parser.add_argument('--eager', action='store_true', help='run flex_attention without torch.compile')
    parser.add_argument('--in-model', type=int, nargs='*', metavar='TOPK',
                        help='also time biformer_small eval steps with flex in its layers of these topks (default 4)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.batch_size, args.rounds, device=args.device, backward=args.backward, compiled=not args.eager)
    title = (f'BiFormer-S routed stages at 224x224, {args.device}, {args.threads} threads, median of {args.rounds} '
             f'rounds, flex {"eager" if args.eager else "compiled"}')
    columns = ['stage shape', 'mode', 'layer (ms)', 'flex (ms)', 'flex / layer', 'max difference',
               'flex first call (s)']
    print(tables_to_markdown([TextTable(title, columns, rows)]))
    if args.in_model is not None:
        topks = tuple(args.in_model or (4,))
        ratio, low, high, difference = model_ratio(topks=topks, batch_size=args.batch_size, rounds=args.rounds,
                                                   compiled=not args.eager, device=args.device)
        print(f'biformer_small eval step (batch {args.batch_size}) with flex in its topk {topks} layers / unchanged: '
              f'{ratio:.3f}x paired median (quartiles {low:.3f}-{high:.3f}) over {args.rounds} rounds; logits differ '
              f'by {difference:.1e} of the largest')


if __name__ == '__main__':
    main()
