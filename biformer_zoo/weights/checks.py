"""The check every state dict passes before it is loaded into a model, on every path (``pretrained=True``, a
``pretrained_cfg_overlay`` file, ``checkpoint_path=``, ``load_state_dict``, ``biformer-zoo convert``): all of the
model's tensors present, none unexpected, each of the model's shape and kind (floating point or integer), and every
floating-point tensor finite. A failure is one :class:`PretrainedWeightsError` that names the model, the source, what
is wrong (counts and a few names) and the fix."""
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from .files import PretrainedWeightsError

__all__ = ['check_state_dict', 'check_pretrained_state_dict', 'model_tag_of']


def _names(keys: List[str], limit: int = 4) -> str:
    return f"{len(keys)} ({', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''})"


def _as_names(value: Any) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def model_tag_of(model: torch.nn.Module) -> str:
    """'architecture.tag' of the model's pretrained cfg, for messages; its class name when it has no cfg."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return '.'.join(filter(None, (cfg.get('architecture'), cfg.get('tag')))) or type(model).__name__


def _problems(
        state_dict: Dict[str, Any],
        own: Dict[str, torch.Tensor],
        may_differ: Tuple[str, ...],
        first_convs: Iterable[str],
) -> List[str]:
    """What keeps ``state_dict`` from loading whole into a model whose state dict is ``own``; tensors under the
    prefixes ``may_differ`` may be missing, extra or of another shape, ``first_convs`` of other input channels."""
    missing = [k for k in own if k not in state_dict and not k.startswith(may_differ)
               and not k.endswith('num_batches_tracked')]  # BatchNorm's counter: not a weight
    unexpected = [k for k in state_dict if k not in own and not k.startswith(may_differ)]
    wrong, not_finite = [], []
    for key in [k for k in own if k in state_dict]:
        value, target = state_dict[key], own[key]
        if not isinstance(value, torch.Tensor):
            wrong.append(f'{key} is a {type(value).__name__}, not a tensor')
        elif value.is_floating_point() != target.is_floating_point():
            wrong.append(f'{key} is {value.dtype}, the model holds {target.dtype}')
        elif value.shape != target.shape and not key.startswith(may_differ) and not (
                key in first_convs and value.shape[:1] + value.shape[2:] == target.shape[:1] + target.shape[2:]):
            wrong.append(f'{key} is {tuple(value.shape)}, the model holds {tuple(target.shape)}')
        elif value.is_floating_point() and value.device.type != 'meta' and not bool(torch.isfinite(value).all()):
            not_finite.append(key)
    return [f'{label} {_names(keys)}' for label, keys in (
        ('missing', missing), ('unexpected', unexpected), ('of another shape or kind', wrong),
        ('with NaN or infinite values', not_finite)) if keys]


def check_state_dict(
        state_dict: Dict[str, Any],
        model: torch.nn.Module,
        source: str,
        fix: str,
        may_differ: Tuple[str, ...] = (),
        first_convs: Iterable[str] = (),
) -> None:
    """Raise :class:`PretrainedWeightsError` unless ``state_dict`` loads whole into ``model``.

    Args:
        state_dict: The tensors to load, already in the model's layout.
        model: The model they are for (its ``pretrained_cfg`` names it in the message).
        source: What they are, for the message ('the pretrained weights <file>', 'the weights of checkpoint <file>').
        fix: What to do, for the message.
        may_differ: Key prefixes that may be missing, extra or of another shape (the classifier, for pretrained
            weights whose head timm replaces).
        first_convs: Weights that may differ in their input channels (timm adapts them to ``in_chans``).
    """
    problems = _problems(state_dict, model.state_dict(), may_differ, set(first_convs))
    if not problems:
        return
    raise PretrainedWeightsError(
        f"{model_tag_of(model)}: {source} do not fit the model; tensors {'; '.join(problems)}. {fix}")


def check_pretrained_state_dict(state_dict: Dict[str, Any], model: torch.nn.Module) -> None:
    """``check_state_dict`` for pretrained weights, on the state dict timm is about to load (in the model's layout):
    only the classifier (``pretrained_cfg['classifier']``) may be missing or differ, and the first conv
    (``pretrained_cfg['first_conv']``) may differ in its input channels, since timm adapts both."""
    cfg: Dict[str, Optional[Any]] = getattr(model, 'pretrained_cfg', None) or {}
    source = cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url') or 'given as pretrained_cfg state_dict'
    check_state_dict(
        state_dict, model, f'the pretrained weights {source}',
        fix="Only the classifier may be missing or differ (and the first conv's input channels, for in_chans), so "
            "loading them would leave part of the model random. Use weights of this architecture and configuration "
            "(`biformer-zoo convert` names the models an official checkpoint fits), or create the model with the "
            "arguments the weights were trained with.",
        may_differ=tuple(f'{name}.' for name in _as_names(cfg.get('classifier'))),
        first_convs={f'{name}.weight' for name in _as_names(cfg.get('first_conv'))})
