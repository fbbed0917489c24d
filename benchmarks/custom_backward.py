"""Layer-level A/B timing of the zoo's CPU training paths against the plain ones, side by side in one process.

    python benchmarks/custom_backward.py --threads 2 --rounds 10

- ``BiLevelRoutingAttention`` forward + backward at BiFormer-S's stage 1 and 2 shapes (batch 8, 224 input, gather
  path): ``attn_impl='reference'`` (gathered keys/values under ordinary autograd) against ``'gather'``, the custom
  backward that keeps only the projected tokens and runs the CPU flash-attention backward (the default on CPU).
- CrossFormer's grouped attention with a position bias that needs a gradient (training), at CrossFormer-S's stage
  1-4 shapes (batch 8, 224 input): ``F.scaled_dot_product_attention`` (its math path on CPU) against
  ``lsda.explicit_attention``, what the layer runs there.
- CrossFormer's large stem kernels (16 and 32, stride 4, batch 8 of 224x224 images) forward + weight gradient:
  ``nn.Conv2d`` (oneDNN's strided weight gradient) against ``StridedConv2d`` (the space-to-depth weight gradient).
- BiFormer's 5x5 LePE depthwise conv at BiFormer-S's four stage shapes (batch 8, 224 input, channels-last maps)
  forward + weight gradient: ``nn.Conv2d`` against ``DepthwiseConv2d`` (two 3-wide weight gradients).
- The BiFormer-S and CrossFormer-S stems (batch 8, 224) forward + weight gradients, with their output in the
  blocks' (B, H, W, C) layout: NCHW input against the channels-last input the models give their stems.

Rounds alternate the two variants (``bench.round_robin``); medians in ms. These are layers in a warm cache: inside
a model, where the tensors are cold, they take longer (see docs/performance.md, "Speed and memory on CPU").
"""
import argparse
import statistics
from typing import Callable, Dict

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.tools.bench import round_robin
from biformer_zoo.layers import bra, lsda
from biformer_zoo.layers.conv import DepthwiseConv2d, StridedConv2d


def _median_ms(steps: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, float]:
    return {label: statistics.median(ms) for label, ms in round_robin(steps, rounds, warmup=1).items()}


def routed_rows(rounds: int):
    for size, channels, heads, topk in [(56, 64, 2, 1), (28, 128, 4, 4)]:
        layer = bra.BiLevelRoutingAttention(channels, heads, 7, topk, channels_last=True)
        x = torch.randn(8, size, size, channels, requires_grad=True)

        def step(attn_impl: str):
            with bra.routed_attention_impl(layer, attn_impl):
                return torch.autograd.grad(layer(x).sum(), x)

        t = _median_ms({'reference': lambda: step('reference'), 'gather': lambda: step('gather')}, rounds)
        yield f'BRA fwd+bwd, 8x{size}x{size}x{channels}, topk {topk}', t['reference'], t['gather']


def attention_rows(rounds: int):
    for groups, heads in [(512, 3), (128, 6), (32, 12), (8, 24)]:
        q, k, v = (torch.randn(groups, heads, 49, 32, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, heads, 49, 49, requires_grad=True)
        inputs = [q, k, v, bias]

        def step(explicit: bool):
            if explicit:
                out = lsda.explicit_attention(q, k, v, bias, 32 ** -0.5)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=32 ** -0.5)
            return torch.autograd.grad(out.sum(), inputs)

        t = _median_ms({'sdpa': lambda: step(False), 'explicit': lambda: step(True)}, rounds)
        yield f'LSDA attention fwd+bwd, {groups}x{heads}x49x32, bias grad', t['sdpa'], t['explicit']


def stem_rows(rounds: int):
    x = torch.randn(8, 3, 224, 224)
    for kernel, channels in [(16, 12), (32, 12)]:
        fast = StridedConv2d(3, channels, kernel, stride=4, padding=(kernel - 4) // 2)
        plain = nn.Conv2d(3, channels, kernel, stride=4, padding=(kernel - 4) // 2)
        plain.load_state_dict(fast.state_dict())

        def step(conv: nn.Conv2d):
            return torch.autograd.grad(conv(x).sum(), conv.weight)

        t = _median_ms({'plain': lambda: step(plain), 'fast': lambda: step(fast)}, rounds)
        yield f'stem conv fwd+weight grad, 3->{channels}, kernel {kernel}, stride 4', t['plain'], t['fast']


def depthwise_rows(rounds: int):
    for size, channels in [(56, 64), (28, 128), (14, 256), (7, 512)]:
        fast = DepthwiseConv2d(channels, 5)
        plain = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        plain.load_state_dict(fast.state_dict())
        x = torch.randn(8, size, size, channels).permute(0, 3, 1, 2)  # (B, C, H, W) view of a (B, H, W, C) map

        def step(conv: nn.Conv2d):
            return torch.autograd.grad(conv(x).sum(), conv.weight)

        t = _median_ms({'plain': lambda: step(plain), 'fast': lambda: step(fast)}, rounds)
        yield f'LePE depthwise 5x5 fwd+weight grad, 8x{size}x{size}x{channels}', t['plain'], t['fast']


def stem_layout_rows(rounds: int):
    x = torch.randn(8, 3, 224, 224)
    for name in ('biformer_small', 'crossformer_small'):
        stem = timm.create_model(name).stem.train()

        def step(channels_last: bool):
            out = stem(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            out = out.permute(0, 2, 3, 1).contiguous()  # what the first stage does: (B, H, W, C) for the blocks
            return torch.autograd.grad(out.sum(), list(stem.parameters()))

        t = _median_ms({'nchw': lambda: step(False), 'channels_last': lambda: step(True)}, rounds)
        yield f'{name} stem fwd+weight grads, 8x3x224x224 NCHW vs channels-last input', t['nchw'], t['channels_last']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {args.threads} threads, median of {args.rounds} rounds')
    print('| layer, forward + backward | plain ms | zoo ms | zoo / plain |')
    print('|---|---|---|---|')
    for rows in (routed_rows(args.rounds), attention_rows(args.rounds), stem_rows(args.rounds),
                 depthwise_rows(args.rounds), stem_layout_rows(args.rounds)):
        for label, before, after in rows:
            print(f'| {label} | {before:.2f} | {after:.2f} | {after / before:.2f}x |', flush=True)


if __name__ == '__main__':
    main()
