"""Which model an official checkpoint fits: the differences between a mapped state dict and a model's own
(``layout_mismatch``), and the pretrained tags whose layout a state dict maps onto exactly (``guess_architecture``),
which ``convert`` names when a checkpoint does not fit the model asked for."""
from typing import Dict, List

import timm
import torch

from ..models import checkpoint_filter_for

__all__ = ['layout_mismatch', 'guess_architecture']


def layout_mismatch(mapped: Dict[str, torch.Tensor], model: torch.nn.Module) -> List[str]:
    """Human-readable differences between a mapped state dict and the model's own (empty when they agree)."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in mapped and not k.endswith('num_batches_tracked')]  # BatchNorm fills it
    unexpected = [k for k in mapped if k not in own]
    mismatched = [f'{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}'
                  for k in own if k in mapped and mapped[k].shape != own[k].shape]
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    return problems


def guess_architecture(state_dict: Dict[str, torch.Tensor], names: List[str]) -> List[str]:
    """Those of ``names`` (pretrained tags) whose filter maps ``state_dict`` exactly onto their layout (meta device)."""
    matches = []
    for name in names:
        try:
            with torch.device('meta'):
                model = timm.create_model(name)
            if not layout_mismatch(checkpoint_filter_for(model)(dict(state_dict), model), model):
                matches.append(name)
        except Exception:  # a filter refusing a foreign layout is a non-match
            continue
    return matches
