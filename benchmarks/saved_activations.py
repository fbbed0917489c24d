"""Memory that a training forward keeps for backward, per model: the storages autograd saves.

    python benchmarks/saved_activations.py biformer_small swin_tiny_patch4_window7_224 --batch-size 8
    python benchmarks/saved_activations.py biformer_small --plain-routing   # without the routed-attention Function

Sums the distinct storages that ``torch.autograd.graph.saved_tensors_hooks`` sees during one training forward;
unlike a peak-memory reading it does not depend on the allocator or on what else runs on the machine.
"""
import argparse

import timm
import torch

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.layers.bra import BiLevelRoutingAttention, routed_attention


def use_plain_routing() -> None:
    """Route BiFormer's attention through plain autograd (``index_select`` + SDPA), which keeps the gathered
    keys/values for backward, instead of the Function that keeps only the projected tokens."""
    def plain(self, q, k, v, q_index, kv_index):
        return routed_attention(q, k, v, q_index, kv_index, self.num_heads, self.scale)
    BiLevelRoutingAttention._routed_attention_autograd = plain


def saved_for_backward_bytes(name: str, batch_size: int, img_size: int) -> int:
    model = timm.create_model(name).train()
    x = torch.randn(batch_size, 3, img_size, img_size)
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='+')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--plain-routing', action='store_true',
                        help="BiFormer's routed attention through plain autograd instead of its custom Function")
    args = parser.parse_args()
    if args.plain_routing:
        use_plain_routing()
    sizes = {name: saved_for_backward_bytes(name, args.batch_size, args.img_size) for name in args.models}
    reference = sizes[args.models[-1]]
    for name, size in sizes.items():
        print(f'{name:32s} {size / 2 ** 20:8.0f} MiB saved for backward '
              f'(batch {args.batch_size}, {args.img_size}px)  ratio vs {args.models[-1]}: {size / reference:.2f}')


if __name__ == '__main__':
    main()
