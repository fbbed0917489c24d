"""What ``LSDAttention``'s eval-mode position-bias cache buys: a CrossFormer eval forward with the cache kept
against the same forward with every layer's cache cleared first (``clear_position_bias_cache``), alternated in one
process (``bench.round_robin``), medians in ms.

    python benchmarks/position_bias_cache.py --model crossformer_small --threads 2 --rounds 15
"""
import argparse
import statistics

import timm
import torch

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.layers import LSDAttention
from biformer_zoo.tools.bench import round_robin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='crossformer_small')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model).eval()
    layers = [m for m in model.modules() if isinstance(m, LSDAttention)]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)

    def cached() -> None:
        model(x)

    def recomputed() -> None:
        for layer in layers:
            layer.clear_position_bias_cache()
        model(x)

    with torch.no_grad():
        times = round_robin({'cached': cached, 'recomputed': recomputed}, args.rounds, warmup=2)
    kept, cleared = statistics.median(times['cached']), statistics.median(times['recomputed'])
    print(f'{args.model} eval, batch {args.batch_size}, {args.img_size}x{args.img_size}, {args.threads} threads: '
          f'cached {kept:.1f} ms, recomputed {cleared:.1f} ms, recomputed/cached {cleared / kept:.3f}')


if __name__ == '__main__':
    main()
