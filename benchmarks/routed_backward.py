"""Layer-level A/B timing of the routed-attention backward on CPU, side by side in one process.

    python benchmarks/routed_backward.py --threads 2 --rounds 10

Forward + backward of ``BiLevelRoutingAttention`` at BiFormer-S's stage 1 and 2 shapes (batch 8, 224 input, gather
path), with the explicit attention backward (recomputed probabilities, bmm; what runs off CPU) against the CPU
flash-attention backward that is the default on CPU.

Rounds alternate the two variants; medians in ms. These are layers in a warm cache: inside a model, where the
tensors are cold, they take longer (see README, "Speed and memory on CPU").
"""
import argparse
import statistics
import time
from typing import Callable, Dict

import torch

from biformer_zoo.layers import bra


def _ab(variants: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def routed_rows(rounds: int):
    for size, channels, heads, topk in [(56, 64, 2, 1), (28, 128, 4, 4)]:
        layer = bra.BiLevelRoutingAttention(channels, heads, 7, topk, channels_last=True)
        layer.dense_max_ratio = 0.0
        x = torch.randn(8, size, size, channels, requires_grad=True)
        saved = bra._flash_backward

        def step(flash: bool):
            bra._flash_backward = saved if flash else None
            try:
                return torch.autograd.grad(layer(x).sum(), x)
            finally:
                bra._flash_backward = saved

        t = _ab({'explicit': lambda: step(False), 'flash': lambda: step(True)}, rounds)
        yield f'BRA fwd+bwd, 8x{size}x{size}x{channels}, topk {topk}', t['explicit'], t['flash']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {args.threads} threads, median of {args.rounds} rounds')
    print('| layer | explicit backward ms | flash backward ms | flash / explicit |')
    print('|---|---|---|---|')
    for label, before, after in routed_rows(args.rounds):
        print(f'| {label} | {before:.2f} | {after:.2f} | {after / before:.2f}x |', flush=True)


if __name__ == '__main__':
    main()
