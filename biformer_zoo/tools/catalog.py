"""What the zoo holds: one row per registered model (``model_table``) and one per pretrained tag of the weights
manifest (``pretrained_table``), with the tables ``biformer-zoo list`` prints."""
from typing import Any, Dict, List, Optional

import timm
import torch

from ..models import list_zoo_models
from ..weights import cached_weights_path, manifest_entries
from .tables import TextTable

__all__ = ['model_table', 'pretrained_table', 'catalog_table']


def model_table(names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One row per registered model: name, parameter count, default input size and pretrained tags.

    Models are built on the meta device, so no memory is allocated and nothing is initialised.
    """
    rows = []
    for name in names or list_zoo_models():
        with torch.device('meta'):
            model = timm.create_model(name)
        rows.append(dict(
            model=name,
            params=sum(p.numel() for p in model.parameters()),
            input_size=list(model.pretrained_cfg['input_size']),
            pretrained_tags=[n.split('.', 1)[1] for n in timm.list_pretrained(f'{name}.*')],
        ))
    return rows


def pretrained_table() -> List[Dict[str, Any]]:
    """One row per manifest entry: tag, status, Hub repo, whether it is in the local Hub cache, reported top-1."""
    rows = []
    for entry in manifest_entries():
        cached = cached_weights_path(entry['hf_hub_id'], entry['file'])
        rows.append(dict(
            model=f"{entry['architecture']}.{entry['tag']}", status=entry['status'], hf_hub_id=entry['hf_hub_id'],
            cached=cached is not None, cached_path=cached, top1=entry['reported']['top1'], sha256=entry['sha256'],
            registered=timm.is_model(entry['architecture']),
        ))
    return rows


def catalog_table(rows: List[Dict[str, Any]], pretrained: bool) -> TextTable:
    """The rows of ``pretrained_table`` (``pretrained=True``) or ``model_table`` as a table for people."""
    if pretrained:
        return TextTable(
            'biformer-zoo pretrained weights', ['model.tag', 'status', 'in cache', 'top-1', 'Hub repo'],
            [[r['model'], r['status'], 'yes' if r['cached'] else 'no', f"{r['top1']}", r['hf_hub_id']] for r in rows],
            label_columns=3)
    return TextTable(
        'biformer-zoo models', ['model', 'params', 'params (M)', 'input', 'pretrained tags'],
        [[r['model'], f"{r['params']:,}", f"{r['params'] / 1e6:.2f}", 'x'.join(map(str, r['input_size'][1:])),
          ', '.join(r['pretrained_tags'])] for r in rows],
        label_columns=1)
