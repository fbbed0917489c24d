"""Synthetic official checkpoints built from the recorded official state-dict layouts.

``tests/data/keys/keys_<name>.txt.gz`` hold the key, shape and dtype of every entry of the official
state dicts (copied from the official code at the commit named in each file's header).
"""
import gzip
from pathlib import Path
from typing import Dict, Tuple

import torch

KEYS_DIR = Path(__file__).parent / 'data' / 'keys'
TINY = 'biformer_tiny'
# (model, tag, official layout): the official checkpoint layouts besides BiFormer T/S/B (tested with TINY):
# both STL layouts, CrossFormer's old `crossformer` branch (the released v1 files) and its main branch (++)
OFFICIAL_LAYOUTS = [
    ('biformer_stl', 'in1k', 'biformer_stl'),
    ('biformer_stl', 'in1k_nchw', 'biformer_stl_nchw'),
    ('crossformer_small', 'in1k', 'crossformer_small_oldbranch'),
    ('crossformerpp_small', 'in1k', 'crossformerpp_small'),
]


def official_layout(name: str) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the official state dict ``name`` (e.g. 'biformer_small')."""
    layout = {}
    with gzip.open(KEYS_DIR / f'keys_{name}.txt.gz', 'rt') as f:
        for line in f:
            if line.startswith('#') or not line.strip():
                continue
            key, shape, dtype = line.rstrip('\n').split('\t')
            dims = tuple(int(d) for d in shape.strip('[]').split(',') if d.strip())
            layout[key] = (dims, getattr(torch, dtype.replace('torch.', '')))
    return layout


def synth_official_state_dict(name: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state dict with the official keys, shapes and dtypes, filled with distinct random values."""
    gen = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, (shape, dtype) in official_layout(name).items():
        if dtype.is_floating_point:
            value = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            if key.endswith('running_var'):
                value = value.abs() + 0.5
        else:
            value = torch.randint(0, 100, shape, generator=gen).to(dtype)
        state_dict[key] = value
    return state_dict


def save_official_checkpoint(name: str, path: Path, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Save a synthetic checkpoint the way the official releases are saved (state dict under 'model')."""
    state_dict = synth_official_state_dict(name, seed)
    torch.save({'model': state_dict, 'epoch': 299}, path)
    return state_dict


def leave_marker(path: str) -> None:
    Path(path).write_text('code from the checkpoint ran')


class RunsCodeWhenUnpickled:
    """An object whose unpickling writes ``marker``: a checkpoint holding it proves whether a loader ran its code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return leave_marker, (str(self.marker),)
