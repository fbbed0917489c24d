"""Layer-level A/B timing of the routed-attention backward on CPU, side by side in one process.

    python benchmarks/routed_backward.py --threads 2 --rounds 10

Forward + backward of ``BiLevelRoutingAttention`` at BiFormer-S's stage 1 and 2 shapes (batch 8, 224 input, gather
path), with the explicit attention backward (recomputed probabilities, bmm; what runs off CPU) against the CPU
flash-attention backward that is the default on CPU.

Rounds alternate the two variants (``bench.round_robin``); medians in ms. These are layers in a warm cache: inside
a model, where the tensors are cold, they take longer (see README, "Speed and memory on CPU").
"""
import argparse
import statistics
from typing import Callable, Dict

import torch

from biformer_zoo.bench import round_robin
from biformer_zoo.layers import bra


def _median_ms(steps: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, float]:
    for step in steps.values():  # one untimed warm-up step each
        step()
    return {label: statistics.median(ms) for label, ms in round_robin(steps, rounds).items()}


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

        t = _median_ms({'explicit': lambda: step(False), 'flash': lambda: step(True)}, rounds)
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
