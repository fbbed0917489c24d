"""Model families. Importing a family module registers its entrypoints with timm.

The ways to load weights into a zoo model, each checked the same way (``weights.check_state_dict``):
``pretrained=True`` (the Hub, or ``pretrained_cfg_overlay=dict(file=...)`` with a converted ``.safetensors`` or an
official ``.pth``), ``create_model(name, checkpoint_path=...)`` (a converted file, a training checkpoint of this
package, or an official ``.pth``), ``load_checkpoint(model, path)`` for a model already built, and
``model.load_state_dict`` for a state dict in the model's own layout.
"""
from difflib import get_close_matches
from typing import Any, Dict, List

import timm
import torch
from timm.models import parse_model_name, split_model_name_tag
from torch import nn

from ..weights import (
    PathLike, PretrainedWeightsError, check_checkpoint_file, check_state_dict, load_official_checkpoint, model_tag_of)
from ._builder import CheckpointFilter, UnknownModelError, check_pretrained_tag
from . import biformer
from . import crossformer

__all__ = ['create_model', 'list_zoo_models', 'load_checkpoint', 'checkpoint_filter_for', 'UnknownModelError']

FAMILIES = ('biformer', 'crossformer')
# each family's model class and the function that maps its official checkpoints onto it
_CHECKPOINT_FILTERS: Dict[type, CheckpointFilter] = {
    biformer.BiFormer: biformer.checkpoint_filter_fn,
    crossformer.CrossFormer: crossformer.checkpoint_filter_fn,
}


def list_zoo_models(pretrained: bool = False) -> List[str]:
    """Names of every model this package registers with timm (sorted)."""
    names = set()
    for family in FAMILIES:
        names.update(timm.list_models(module=family, pretrained=pretrained))
    return sorted(names)


def checkpoint_filter_for(model: nn.Module) -> CheckpointFilter:
    """The ``checkpoint_filter_fn`` of ``model``'s family (``model`` a zoo model, or a ``features_only`` one)."""
    model = _backbone_of(model)
    for cls, filter_fn in _CHECKPOINT_FILTERS.items():
        if isinstance(model, cls):
            return filter_fn
    raise ValueError(f'{type(model).__name__} is not a zoo model (BiFormer or CrossFormer); official checkpoints map '
                     f'only onto those')


def _backbone_of(model: nn.Module) -> nn.Module:
    """The zoo model itself, also inside timm's ``features_only`` wrapper (which holds it as ``model``)."""
    inner = getattr(model, 'model', None)
    return inner if isinstance(inner, tuple(_CHECKPOINT_FILTERS)) else model


def load_checkpoint(model: nn.Module, checkpoint_path: PathLike, use_ema: bool = True) -> nn.Module:
    """Load a checkpoint file into a zoo model, whole or not at all.

    The file is read safely (``weights.load_official_checkpoint``: ``weights_only=True``, EMA weights first unless
    ``use_ema=False``), an official layout is mapped by the family's ``checkpoint_filter_fn``, and the result must fit
    the model exactly (``weights.check_state_dict``: same keys, shapes and kinds, finite), classifier included. A
    ``features_only`` model takes the backbone's tensors and leaves out those of the parts it dropped (final norm,
    classifier, later stages).
    """
    backbone = _backbone_of(model)
    try:
        state_dict = load_official_checkpoint(checkpoint_path, use_ema=use_ema)
    except ValueError as e:  # missing, damaged, or needs code to unpickle: said with the model it was meant for
        raise PretrainedWeightsError(f'{model_tag_of(backbone)}: cannot load checkpoint_path: {e}') from None
    state_dict = checkpoint_filter_for(backbone)(state_dict, backbone)
    if backbone is not model:  # features_only: the wrapper pruned the model's norm/head/later stages
        kept = backbone.state_dict().keys()
        state_dict = {k: v for k, v in state_dict.items() if k in kept}
    check_state_dict(
        state_dict, backbone, f'the weights of checkpoint {checkpoint_path}',
        fix='Create the model with the arguments the checkpoint was trained with (num_classes, in_chans, depths, '
            '...), or load it as pretrained weights, which may differ in the classifier and input channels: '
            "timm.create_model(name, pretrained=True, num_classes=..., pretrained_cfg_overlay=dict(file=...)).")
    nn.Module.load_state_dict(backbone, state_dict)  # checked above, in this path's words
    return model


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that names close matches for an unknown model name or pretrained tag, and loads a
    ``checkpoint_path`` of any layout through ``load_checkpoint`` (checked, EMA weights first unless
    ``use_ema=False``, also into ``features_only`` models).

    timm answers an unknown name with ``RuntimeError('Unknown model (...)')``; this raises ``UnknownModelError``
    (a ``ValueError``, and a ``RuntimeError`` like timm's) with the nearest registered names and the fix.
    ``hf-hub:``/``local-dir:`` names go to timm unchanged.
    """
    source, name = parse_model_name(model_name)
    if source is None:
        architecture, tag = split_model_name_tag(name)
        if not timm.is_model(architecture):
            close = get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise UnknownModelError(
                f'unknown model {architecture!r}{hint}. `biformer-zoo list` shows the zoo models, '
                f'`timm.list_models()` all of them')
        if tag:
            check_pretrained_tag(architecture, tag)
    checkpoint_path, use_ema = kwargs.pop('checkpoint_path', None), kwargs.pop('use_ema', True)
    if checkpoint_path:
        check_checkpoint_file(checkpoint_path)  # before the model is built: a missing file fails fast
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint_path:
        with torch.no_grad():
            load_checkpoint(model, checkpoint_path, use_ema=use_ema)
    return model
