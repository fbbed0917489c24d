"""How both families are built: each family's ``_create_*`` calls :func:`create_pyramid_model` with its model class
and its ``checkpoint_filter_fn``, as timm's own families call ``build_model_with_cfg``.

The pretrained path, one way: the pretrained cfg is resolved once (tag, overlay, ``img_size``), its weights are
made a checked local file (``weights.pretrained_weights_file``), and timm's ``load_pretrained`` reads that file and
hands it to ``pretrained_filter_fn``: the family's ``checkpoint_filter_fn`` maps an official layout onto the model's,
then ``weights.check_pretrained_state_dict`` refuses weights that would load only in part. timm then adapts the
classifier and ``in_chans`` and loads.
"""
import functools
import numbers
from typing import Any, Callable, Dict, Optional, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import PretrainedCfg, build_model_with_cfg, get_arch_pretrained_cfgs, resolve_pretrained_cfg

from ..weights import (
    check_pretrained_state_dict, manifest_pretrained_cfgs, pretrained_weights_file, reading_checkpoints)
from ._pyramid import MIN_INPUT_SIZE, PyramidModel, check_out_indices

__all__ = [
    'UnknownModelError', 'CheckpointFilter', 'create_pyramid_model', 'pretrained_cfgs', 'check_pretrained_tag',
    'pretrained_tag', 'map_official_state_dict']

CheckpointFilter = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]


class UnknownModelError(ValueError, RuntimeError):
    """An unknown model name or pretrained tag. A ``ValueError``; also a ``RuntimeError``, which timm raises for
    these, so code written against timm keeps catching it."""


def check_pretrained_tag(architecture: str, tag: Any) -> None:
    """Raise ``UnknownModelError`` naming the registered tags when ``tag`` (from ``'name.tag'``) is not one."""
    if not isinstance(tag, str) or not tag:
        return  # no tag, or a full pretrained_cfg dict (hf-hub:, local-dir:)
    tags = [name.split('.', 1)[1] for name in get_arch_pretrained_cfgs(architecture)]
    if tag not in tags:
        raise UnknownModelError(
            f'unknown pretrained tag {tag!r} for {architecture}; its tags are {", ".join(tags) or "none"}. '
            f'Use one of them (e.g. {architecture}.{tags[0] if tags else "<tag>"}) or leave the tag out')


def pretrained_tag(cfg: Any) -> Optional[str]:
    """The tag of a ``pretrained_cfg`` argument: a tag string (from 'name.tag'), a dict or a timm PretrainedCfg."""
    if cfg is None or isinstance(cfg, str):
        return cfg
    return cfg.get('tag') if isinstance(cfg, dict) else getattr(cfg, 'tag', None)


def pretrained_cfgs(families: tuple, **family_cfg: Any) -> Dict[str, Dict[str, Any]]:
    """The pretrained cfgs of a family for ``generate_default_cfgs``: the manifest's facts for each of its tags (Hub
    repo, preprocessing, paper, official source), with the keys both families share (224 px ImageNet-1k classifiers
    that take any size) and the family's own (``first_conv``)."""
    shared = {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE), 'fixed_input_size': False,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'classifier': 'head.fc',
    }
    return {name_tag: {**shared, **family_cfg, **cfg} for name_tag, cfg in manifest_pretrained_cfgs(families).items()}


def map_official_state_dict(
        state_dict: Dict[str, torch.Tensor],
        map_key: Callable[[str], str],
        drop_suffixes: tuple = (),
) -> Dict[str, torch.Tensor]:
    """An official state dict in the model's layout: the classifier's ``head.*`` becomes timm's ``head.fc.*``, every
    other key goes through the family's ``map_key``, and keys ending in ``drop_suffixes`` (buffers the model
    recomputes) are left out."""
    return {
        'head.fc.' + key[len('head.'):] if key.startswith('head.') else map_key(key): value
        for key, value in state_dict.items() if not key.endswith(drop_suffixes)}


def _resolve_cfg(variant: str, kwargs: Dict[str, Any]) -> PretrainedCfg:
    """The model's pretrained cfg, resolved once: the tag or cfg given, the overlay, and ``img_size`` as the cfg's
    ``input_size`` (the models take any size, so it only describes the preferred input)."""
    check_pretrained_tag(variant, kwargs.get('pretrained_cfg'))
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    img_size = kwargs.pop('img_size', None)
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, numbers.Integral) else tuple(img_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < MIN_INPUT_SIZE
                                 for s in size):
            raise ValueError(f'img_size must be an int or an (H, W) pair of ints >= {MIN_INPUT_SIZE}, got '
                             f'{img_size!r}; the models take any size of at least {MIN_INPUT_SIZE} pixels')
        overlay['input_size'] = (kwargs.get('in_chans', 3),) + size
    return resolve_pretrained_cfg(variant, kwargs.pop('pretrained_cfg', None), overlay)


def _check_output_stride(output_stride: Optional[int]) -> None:
    """Accept ``output_stride`` only as the models' own 32 (no dilated variants)."""
    if output_stride not in (None, 32):
        raise ValueError(f'output_stride={output_stride} is not supported: the models always downsample by 32 '
                         f'(strides 4, 8, 16, 32); take an earlier stage with out_indices instead')


def _load_filter(
        checkpoint_filter_fn: CheckpointFilter,
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: the family's mapping, then the check that the weights fit the whole model."""
    state_dict = checkpoint_filter_fn(state_dict, model)
    check_pretrained_state_dict(state_dict, model)
    return state_dict


def create_pyramid_model(
        model_cls: Type[PyramidModel],
        variant: str,
        pretrained: bool,
        checkpoint_filter_fn: CheckpointFilter,
        **kwargs: Any,
) -> nn.Module:
    """Each family's ``_create_*``: ``build_model_with_cfg`` with the family's ``checkpoint_filter_fn``, after the
    checks timm would answer with an assertion (``output_stride``, ``out_indices``) and with the pretrained cfg
    resolved once and its weights a checked local file."""
    _check_output_stride(kwargs.pop('output_stride', None))
    if kwargs.get('features_only') and kwargs.get('out_indices') is not None:  # before timm's wrappers assert
        num_stages = len(kwargs['depths']) if hasattr(kwargs.get('depths'), '__len__') else 4
        kwargs['out_indices'] = check_out_indices(num_stages, kwargs['out_indices'])
    cfg = _resolve_cfg(variant, kwargs)
    if pretrained:
        cfg = pretrained_weights_file(variant, cfg, kwargs.get('cache_dir'))
    model_tag = '.'.join(filter(None, (variant, cfg.tag)))
    with reading_checkpoints(model_tag, cfg.file or cfg.hf_hub_id or ''):
        return build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_cfg=cfg,
            pretrained_filter_fn=functools.partial(_load_filter, checkpoint_filter_fn),
            # flatten_sequential: timm's 'list'/'dict' wrappers then find the stages by their feature_info names
            feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter', flatten_sequential=True),
            **kwargs)
