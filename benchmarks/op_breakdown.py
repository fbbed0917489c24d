"""Where a step's time goes: CPU op time per kind of op, models side by side, from the torch profiler.

    python benchmarks/op_breakdown.py biformer_small swin_tiny_patch4_window7_224 --mode infer
    python benchmarks/op_breakdown.py crossformer_small swin_tiny_patch4_window7_224 --mode train

Profiles ``--rounds`` steps of every model (the steps ``biformer-zoo bench`` times), round-robin, and prints the
self time of their ops per step, grouped as attention kernels, matmuls, convolutions (forward and backward),
gathers/copies, and the rest, with the largest single ops. Times are op self times (the profiler adds some overhead
of its own), so compare models within one run.
"""
import argparse
from collections import Counter
from typing import Dict, List

import timm
import torch
from torch.profiler import profile

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.bench import make_step
from biformer_zoo.report import TextTable, tables_to_markdown

# (group, op name fragments); an op belongs to the first group with a fragment in its name
GROUPS = [
    ('attention', ('scaled_dot_product', 'attention', 'bmm', 'softmax')),
    ('matmul', ('addmm', 'aten::mm', 'aten::linear', 'aten::matmul')),
    ('convolution', ('convolution', 'conv2d', 'ConvWeightGrad')),
    ('gather / copy', ('copy_', 'index', 'gather', 'scatter', 'cat', 'fill_', 'zero_', 'pad', 'clone', 'contiguous')),
]
OTHER = 'other (norms, activations, adds, ...)'


def op_group(name: str) -> str:
    for group, fragments in GROUPS:
        if any(fragment in name for fragment in fragments):
            return group
    return OTHER


def op_times(models: Dict[str, torch.nn.Module], mode: str, batch_size: int, img_size: int,
             rounds: int) -> Dict[str, Counter]:
    """Self CPU time per op name, ms per step (``bench.make_step``: 'infer' or 'train'), for each model."""
    x = torch.randn(batch_size, 3, img_size, img_size)
    steps = {name: make_step(model, x, mode) for name, model in models.items()}
    for step in steps.values():  # warm-up
        step()
    times = {name: Counter() for name in models}
    for _ in range(rounds):
        for name, step in steps.items():
            with profile() as prof:
                step()
            for event in prof.key_averages():
                times[name][event.key] += event.self_cpu_time_total / 1000 / rounds
    return times


def group_table(times: Dict[str, Counter]) -> List[List[str]]:
    """Rows: group, then ms per step for each model (the last row the total)."""
    names = list(times)
    grouped = {name: Counter() for name in names}
    for name, ops in times.items():
        for op, ms in ops.items():
            grouped[name][op_group(op)] += ms
    rows = [[group] + [f'{grouped[name][group]:.1f}' for name in names] for group in [g for g, _ in GROUPS] + [OTHER]]
    rows.append(['total'] + [f'{sum(times[name].values()):.1f}' for name in names])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='+')
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer',
                        help='as biformer-zoo bench: inference forward, or forward + backward + SGD step')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--top', type=int, default=12, help='largest single ops to list')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: timm.create_model(name) for name in args.models}
    times = op_times(models, args.mode, args.batch_size, args.img_size, args.rounds)
    title = (f'{args.mode}, batch {args.batch_size}, {args.img_size}px, {args.threads} threads, op self time in ms '
             f'per step (mean of {args.rounds})')
    largest = sorted({op for ops in times.values() for op in ops}, key=lambda op: -max(t[op] for t in times.values()))
    largest_rows = [[op, op_group(op), *(f'{times[name][op]:.1f}' for name in args.models)]
                    for op in largest[:args.top]]
    print(tables_to_markdown([
        TextTable(title, ['group', *args.models], group_table(times), label_columns=1),
        TextTable(f'{args.top} largest ops', ['op', 'group', *args.models], largest_rows)]))


if __name__ == '__main__':
    main()
