"""The dense-prediction presets: the official detection and segmentation settings, stored as YAML in
``preset_files/`` and loaded by name (``list_presets``, ``load_preset``), and how a builder's arguments combine with
them (``resolve_settings``, ``head_settings``)."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import yaml

from ..layers.helpers import check_int_arg

__all__ = [
    'PRESET_DIR', 'BACKBONE_DEFAULTS', 'list_presets', 'load_preset', 'load_preset_file', 'resolve_settings',
    'preset_num_classes', 'head_settings', 'check_num_classes']

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


def is_preset(name: Any) -> bool:
    """Whether ``name`` is one of ``list_presets()``: a name, never a path (it is not joined to the folder before)."""
    return isinstance(name, str) and name in list_presets()


def load_preset(name: str) -> Dict[str, Any]:
    """The preset ``name`` (one of ``list_presets()``) as a dict: ``task``, ``model``, ``backbone`` options,
    ``model_kwargs`` and the recipe."""
    if not is_preset(name):
        raise ValueError(f'unknown preset {name!r}; the presets are {list_presets()} (a file of your own: '
                         f'load_preset_file, or preset_file= in the builders)')
    return load_preset_file(PRESET_DIR / f'{name}.yaml')


def _is_model_name(name: str) -> bool:
    """A registered timm model, with no tag or a registered pretrained tag (a misspelt preset has an unknown one)."""
    architecture, tag = timm.models.split_model_name_tag(name)
    return timm.is_model(architecture) and (not tag or name in timm.list_pretrained(f'{architecture}.*'))



def _out_indices_tuple(out_indices: Any) -> Tuple[int, ...]:
    """``out_indices`` as a tuple; a ``ValueError`` for anything but a sequence of stage indices."""
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence):
        raise ValueError(f'out_indices must be a sequence of stage indices, e.g. (0, 1, 2, 3) or (1, 2, 3), got '
                         f'{out_indices!r}; for the last n stages pass them, e.g. (2, 3)')
    return tuple(out_indices)


def _check_model_kwargs(options: Dict[str, Any], model_kwargs: Dict[str, Any]) -> None:
    """Refuse a backbone option this builder does not take (it would reach ``timm.create_model`` as a model
    argument), and ``features_only`` (the builders set it)."""
    misplaced = sorted(k for k in model_kwargs if k in BACKBONE_DEFAULTS or k == 'features_only')
    if misplaced:
        raise ValueError(f'{", ".join(misplaced)} cannot be set here: this builder takes the backbone options '
                         f'{", ".join(sorted(options))} (others are fixed by it), and the rest goes to '
                         f'timm.create_model as model arguments')


def load_preset_file(path: Union[str, Path]) -> Dict[str, Any]:
    """A preset of one's own: a YAML file laid out as those in ``preset_files/`` (``task``, ``model``, and optionally
    ``backbone``, ``model_kwargs``, ``num_classes``, ``head``), as a dict."""
    try:
        with open(path) as f:
            preset = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f'preset_file {path} cannot be read as YAML ({e}); pass the path of a preset file laid out '
                         f'as those in {PRESET_DIR}') from None
    if not isinstance(preset, dict) or not {'task', 'model'} <= set(preset):
        got = f'keys {sorted(preset)}' if isinstance(preset, dict) else f'a {type(preset).__name__}'
        raise ValueError(f'preset_file {path} must be a mapping with at least task and model, as the files in '
                         f'{PRESET_DIR}; got {got}')
    preset.setdefault('backbone', {})
    preset.setdefault('model_kwargs', {})
    return preset


def _preset_and_model(name: Optional[str], task: str, preset_file: Optional[Union[str, Path]]
                      ) -> Tuple[Dict[str, Any], str]:
    """The preset (empty for a plain model name) and the model it builds, for a ``name`` or a ``preset_file``."""
    if preset_file is not None:
        if name is not None:
            raise ValueError(f'pass a model or preset name, or preset_file, not both; got {name!r} and '
                             f'preset_file={str(preset_file)!r}')
        preset, label = load_preset_file(preset_file), f'preset_file {preset_file}'
    elif is_preset(name):
        preset, label = load_preset(name), f'preset {name!r}'
    elif isinstance(name, str) and _is_model_name(name):
        return {}, name
    else:
        raise ValueError(
            f'{name!r} is neither a timm model nor a preset; pass a model name such as biformer_small '
            f'(see biformer_zoo.list_zoo_models()), one of the presets {list_presets(task)}, or preset_file=')
    if preset['task'] != task:
        raise ValueError(
            f"{label} is a {preset['task']} preset, not a {task} one; use one of {list_presets(task)}")
    return preset, preset['model']


def resolve_settings(
        name: Optional[str],
        task: str,
        options: Dict[str, Any],
        model_kwargs: Dict[str, Any],
        preset_file: Optional[Union[str, Path]] = None,
) -> Tuple[str, Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Model name, backbone options, model kwargs and the preset (empty for a plain model name).

    ``name`` is a model or a preset name; a preset of one's own comes as ``preset_file`` (then ``name`` is None).
    Options given as None fall back to the preset, then to ``BACKBONE_DEFAULTS``.
    """
    preset, model_name = _preset_and_model(name, task, preset_file)
    _check_model_kwargs(options, model_kwargs)
    resolved = dict(BACKBONE_DEFAULTS)
    resolved.update(preset.get('backbone', {}))
    resolved.update({k: v for k, v in options.items() if v is not None})
    resolved['out_indices'] = _out_indices_tuple(resolved['out_indices'])
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
    check_num_classes(num_classes)
    return num_classes


def check_num_classes(num_classes: Any) -> None:
    """Raise a ``ValueError`` unless ``num_classes`` is an int >= 1."""
    check_int_arg('num_classes', num_classes, fix='num_classes is the number of output classes, e.g. 150 for ADE20K')


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
