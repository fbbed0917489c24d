"""How the kernels of BiFormer-S's blocks scale from one torch thread to two on a CPU.

    python benchmarks/thread_scaling.py                       # batch 8, 224x224 shapes, 10 rounds
    MKL_NUM_THREADS=1 python benchmarks/thread_scaling.py     # MKL calls made inside parallel regions run serially

Times the attention kernels at the shapes BiFormer-S gives them at 224x224 (stage 1 and 2: SDPA over the routed
regions' tokens, laid out as the gather path lays them out; stage 3: one SDPA over the map with the routing mask;
stage 4: global attention), and two of its linear layers for reference, with 1 and 2 torch threads alternating
round-robin (``bench.round_robin``), forward (inference mode) and forward + backward. Prints the median ms of each,
the 2-thread speedup and the mean system CPU time per call with 2 threads (the futex calls of OpenMP barriers show
up there). The script sets the torch thread count itself; ``MKL_NUM_THREADS`` then only sets MKL's default for
threads that have not set their own, i.e. for the OpenMP workers inside a parallel region.
"""
import argparse
import resource
import statistics
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from biformer_zoo.bench import round_robin
from biformer_zoo.layers.bra import routing_mask
from biformer_zoo.report import TextTable, tables_to_markdown


def _routed(rows: int, regions: int, queries: int, keys: int, heads: int, dim: int = 32) -> Tuple[torch.Tensor, ...]:
    """q, k, v as the gather path passes them: gathered rows viewed as (regions, heads, tokens, dim), not contiguous."""
    q = torch.randn(rows * regions * queries, heads * dim).view(rows * regions, queries, heads, dim).transpose(1, 2)
    k, v = (torch.randn(rows * regions * keys, heads * dim).view(rows * regions, keys, heads, dim).transpose(1, 2)
            for _ in range(2))
    return q, k, v


def kernels(batch_size: int) -> Dict[str, Tuple[Callable[..., torch.Tensor], Tuple[torch.Tensor, ...], dict]]:
    """Name -> (function, tensor inputs, keyword arguments) at BiFormer-S's 224x224 shapes for ``batch_size``."""
    b = batch_size
    routed = torch.rand(b, 49, 49).topk(16, dim=-1).indices  # 16 of 49 regions for each region, as BiFormer-S
    mask = routing_mask(routed, 7, 14, 14, dtype=torch.float32)  # (b, 1, 196, 196), 0 / -inf
    stage3 = [torch.randn(b, 196, 8, 32).transpose(1, 2) for _ in range(3)]
    stage4 = [torch.randn(b, 49, 16, 32).transpose(1, 2) for _ in range(3)]
    sdpa = F.scaled_dot_product_attention
    return {
        'stage 1 routed SDPA (topk 1, 64 x 64 tokens, 2 heads)': (sdpa, _routed(b, 49, 64, 64, 2), {}),
        'stage 2 routed SDPA (topk 4, 16 x 64 tokens, 4 heads)': (sdpa, _routed(b, 49, 16, 64, 4), {}),
        'stage 3 masked dense SDPA (196 x 196 tokens, 8 heads)': (sdpa, tuple(stage3), dict(attn_mask=mask)),
        'stage 4 global SDPA (49 x 49 tokens, 16 heads)': (sdpa, tuple(stage4), {}),
        'stage 3 qkv linear (256 -> 768)': (F.linear, (torch.randn(b * 196, 256), torch.randn(768, 256),
                                                       torch.randn(768)), {}),
        'stage 1 MLP fc1 (64 -> 192)': (F.linear, (torch.randn(b * 3136, 64), torch.randn(192, 64),
                                                   torch.randn(192)), {}),
    }


def _step(fn: Callable[..., torch.Tensor], inputs: Tuple[torch.Tensor, ...], kwargs: dict, threads: int,
          backward: bool, sys_ms: List[float]) -> Callable[[], None]:
    """One call of ``fn`` with ``threads`` torch threads (forward, or forward + backward of the sum)."""
    if backward:
        inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)

    def step() -> None:
        torch.set_num_threads(threads)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        if backward:
            fn(*inputs, **kwargs).sum().backward()
        else:
            with torch.inference_mode():
                fn(*inputs, **kwargs)
        sys_ms.append((resource.getrusage(resource.RUSAGE_SELF).ru_stime - before) * 1000)
    return step


def measure(batch_size: int, rounds: int, warmup: int = 2) -> List[List[str]]:
    """Rows: kernel, mode, ms with 1 thread, ms with 2 threads, speedup, mean system ms per call with 2 threads.

    The torch thread count is restored afterwards."""
    rows, previous = [], torch.get_num_threads()
    try:
        for name, (fn, inputs, kwargs) in kernels(batch_size).items():
            for mode in ('forward', 'forward + backward'):
                sys_ms: Dict[int, List[float]] = {1: [], 2: []}
                steps = {str(threads): _step(fn, inputs, kwargs, threads, mode != 'forward', sys_ms[threads])
                         for threads in (1, 2)}
                samples = round_robin(steps, rounds, warmup=warmup)
                one, two = statistics.median(samples['1']), statistics.median(samples['2'])
                rows.append([name, mode, f'{one:.2f}', f'{two:.2f}', f'{one / two:.2f}x',
                             f'{statistics.mean(sys_ms[2][warmup:]):.2f}'])
    finally:
        torch.set_num_threads(previous)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=10)
    args = parser.parse_args()
    rows = measure(args.batch_size, args.rounds)
    title = f'batch {args.batch_size}, BiFormer-S shapes at 224x224, median of {args.rounds} rounds'
    columns = ['kernel', 'mode', '1 thread (ms)', '2 threads (ms)', 'speedup', 'mean system ms per call, 2 threads']
    print(tables_to_markdown([TextTable(title, columns, rows)]))


if __name__ == '__main__':
    main()
