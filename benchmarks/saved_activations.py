"""Memory that a training forward keeps for backward, per model: the storages autograd saves.

    python benchmarks/saved_activations.py biformer_small swin_tiny_patch4_window7_224 --batch-size 8
    python benchmarks/saved_activations.py biformer_small --attn-impl reference   # autograd's own routed backward
    python benchmarks/saved_activations.py biformer_small --reference-math        # every layer on its plain math

Sums the distinct storages that ``torch.autograd.graph.saved_tensors_hooks`` sees during one training forward;
unlike a peak-memory reading it does not depend on the allocator or on what else runs on the machine.
"""
import argparse
from contextlib import nullcontext

import timm
import torch

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.layers import reference_math
from biformer_zoo.layers.bra import ATTN_IMPLS, routed_attention_impl


def saved_for_backward_bytes(name: str, batch_size: int, img_size: int, attn_impl: str = 'auto',
                             plain: bool = False) -> int:
    """Bytes of the distinct storages saved for backward by one training forward of ``name``; ``attn_impl`` is
    set on every ``BiLevelRoutingAttention`` of the model (models without one ignore it); ``plain``: every layer of
    the package on its plain math (``biformer_zoo.layers.reference_math()``)."""
    model = timm.create_model(name).train()
    x = torch.randn(batch_size, 3, img_size, img_size)
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with reference_math() if plain else nullcontext(), routed_attention_impl(model, attn_impl), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='+')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--attn-impl', default='auto', choices=ATTN_IMPLS,
                        help="BiFormer's routed attention: 'reference' keeps the gathered keys/values for autograd, "
                             "'gather' runs the Function that keeps only the projected tokens everywhere")
    parser.add_argument('--reference-math', action='store_true',
                        help="every layer of the package on its plain math (routed attention, MLP, convs)")
    args = parser.parse_args()
    sizes = {name: saved_for_backward_bytes(name, args.batch_size, args.img_size, args.attn_impl, args.reference_math)
             for name in args.models}
    reference = sizes[args.models[-1]]
    setting = 'reference math' if args.reference_math else f'attn_impl {args.attn_impl}'
    for name, size in sizes.items():
        print(f'{name:32s} {size / 2 ** 20:8.0f} MiB saved for backward (batch {args.batch_size}, '
              f'{args.img_size}px, {setting})  ratio vs {args.models[-1]}: {size / reference:.2f}')

if __name__ == '__main__':
    main()
