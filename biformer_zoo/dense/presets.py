"""The dense-prediction presets: the official detection and segmentation settings, stored as YAML in
``preset_files/`` and loaded by name (``list_presets``, ``load_preset``), and how a builder's arguments combine with
them (``resolve_settings``, ``head_settings``)."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import yaml

__all__ = [
    'PRESET_DIR', 'BACKBONE_DEFAULTS', 'list_presets', 'load_preset', 'resolve_settings', 'preset_num_classes',
    'head_settings']

PRESET_DIR = Path(__file__).parent / 'preset_files'
_TASKS = ('detection', 'segmentation')
BACKBONE_DEFAULTS: Dict[str, Any] = dict(
    out_indices=(0, 1, 2, 3), fpn_channels=256, extra_blocks='maxpool', frozen_stages=-1, norm_eval=False,
    extra_norm=True)


def list_presets(task: Optional[str] = None) -> List[str]:
    """Names of the dense-prediction presets (all, or those of ``task``: 'detection' or 'segmentation')."""
    if task is not None and task not in _TASKS:
        raise ValueError(f'task must be one of {_TASKS} or None, got {task!r}')
    names = sorted(p.stem for p in PRESET_DIR.glob('*.yaml'))
    if task is None:
        return names
    return [name for name in names if load_preset(name)['task'] == task]


def load_preset(name: str) -> Dict[str, Any]:
    """The preset ``name`` as a dict: ``task``, ``model``, ``backbone`` options, ``model_kwargs`` and the recipe."""
    path = PRESET_DIR / f'{name}.yaml'
    if not path.is_file():
        raise ValueError(f'unknown preset {name!r}; the presets are {list_presets()}')
    with open(path) as f:
        preset = yaml.safe_load(f)
    preset.setdefault('backbone', {})
    preset.setdefault('model_kwargs', {})
    return preset


def is_preset(name: str) -> bool:
    return (PRESET_DIR / f'{name}.yaml').is_file()


def _is_model_name(name: str) -> bool:
    """A registered timm model, with no tag or a registered pretrained tag (a misspelt preset has an unknown one)."""
    architecture, tag = timm.models.split_model_name_tag(name)
    return timm.is_model(architecture) and (not tag or name in timm.list_pretrained(f'{architecture}.*'))



def resolve_settings(
        name: str,
        task: str,
        options: Dict[str, Any],
        model_kwargs: Dict[str, Any],
) -> Tuple[str, Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Model name, backbone options, model kwargs and the preset (empty for a plain model name).

    Options given as None fall back to the preset, then to ``BACKBONE_DEFAULTS``.
    """
    preset: Dict[str, Any] = {}
    model_name = name
    if is_preset(name):
        preset = load_preset(name)
        if preset['task'] != task:
            raise ValueError(
                f"preset {name!r} is a {preset['task']} preset, not a {task} one; use one of {list_presets(task)}")
        model_name = preset['model']
    elif not _is_model_name(name):
        raise ValueError(
            f'{name!r} is neither a timm model nor a preset; pass a model name such as biformer_small '
            f'(see biformer_zoo.list_zoo_models()) or one of the presets {list_presets(task)}')
    resolved = dict(BACKBONE_DEFAULTS)
    resolved.update(preset.get('backbone', {}))
    resolved.update({k: v for k, v in options.items() if v is not None})
    resolved['out_indices'] = tuple(resolved['out_indices'])
    merged_kwargs = dict(preset.get('model_kwargs', {}))
    merged_kwargs.update(model_kwargs)
    if 'topks' in merged_kwargs:  # YAML has lists; the model takes a tuple with None for global attention
        merged_kwargs['topks'] = tuple(merged_kwargs['topks'])
    return model_name, resolved, merged_kwargs, preset


def preset_num_classes(builder: str, name: str, num_classes: Optional[int], preset: Dict[str, Any]) -> int:
    """``num_classes``, or the preset's when None."""
    num_classes = num_classes if num_classes is not None else preset.get('num_classes')
    if num_classes is None:
        raise ValueError(f'{builder}({name!r}) needs num_classes (e.g. num_classes=150 for ADE20K)')
    return num_classes


def head_settings(
        name: str,
        preset: Dict[str, Any],
        decoder: str,
        defaults: Dict[str, Any],
        overrides: Dict[str, Any],
) -> Dict[str, Any]:
    """The head settings: ``defaults``, updated by the preset's ``head``, then by the ``overrides`` that are not None.

    A preset made for another decoder raises a ``ValueError`` naming the presets of ``decoder``.
    """
    head = dict(preset.get('head', {}))
    preset_decoder = head.pop('decoder', decoder)
    if preset_decoder != decoder:
        matching = [p for p in list_presets('segmentation') if load_preset(p).get('head', {}).get('decoder') == decoder]
        raise ValueError(f'preset {name!r} is for a {preset_decoder} head, not {decoder}; use one of {matching}')
    settings = dict(defaults)
    settings.update(head)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings
