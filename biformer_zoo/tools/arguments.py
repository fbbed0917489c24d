"""What the CLI and the benchmarks take from users: model names and wildcard patterns, image sizes, model arguments
(``KEY=VALUE``), and models built for an input size."""
import ast
from difflib import get_close_matches
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import timm
from torch import nn

from ..models import list_zoo_models

__all__ = ['ImageSize', 'parse_img_size', 'parse_model_args', 'resolve_model_names', 'create_model_for_size']

ImageSize = Tuple[int, int]  # (height, width)


def parse_img_size(value: Union[str, int, Sequence[int]]) -> ImageSize:
    """``224`` -> (224, 224); ``'1280x800'`` -> (1280, 800): height first, as mmdet's ``get_flops.py --shape``."""
    if isinstance(value, int):
        sizes = [value, value]
    elif isinstance(value, str):
        parts = value.lower().replace('*', 'x').split('x')
        if not all(p.strip().isdigit() for p in parts) or len(parts) not in (1, 2):
            raise ValueError(f'image size must be an integer like 224 or HxW like 1280x800, got {value!r}')
        sizes = [int(p) for p in parts] * (3 - len(parts))
    else:
        sizes = list(value)[-2:]
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f'image size must be two positive integers (height, width), got {value!r}')
    return int(sizes[0]), int(sizes[1])


def parse_model_args(pairs: Optional[Iterable[str]]) -> Dict[str, Any]:
    """``['n_win=16', 'topks=(1,4,16,None)']`` -> ``{'n_win': 16, 'topks': (1, 4, 16, None)}``.

    Values are Python literals where they parse as one, strings otherwise.
    """
    kwargs: Dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition('=')
        if not sep or not key.strip().isidentifier():
            raise ValueError(f'model argument must look like KEY=VALUE (e.g. n_win=16), got {pair!r}')
        try:
            kwargs[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = text
    return kwargs


def resolve_model_names(patterns: Optional[Iterable[str]] = None) -> List[str]:
    """Model names for the given names or wildcard patterns (``'biformer_*'``, ``'swin_tiny*'``).

    No patterns means every model of this package. Any timm model name is accepted. Raises ``ValueError`` for a
    name timm does not know or a pattern that matches nothing.
    """
    patterns = list(patterns or [])
    if not patterns:
        return list_zoo_models()
    names: List[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in '*?['):
            matches = timm.list_models(pattern)
            if not matches:
                raise ValueError(f'pattern {pattern!r} matches no timm model; check it with '
                                 f'`python -c "import biformer_zoo, timm; print(timm.list_models({pattern!r}))"`')
        elif timm.is_model(pattern):
            matches = [pattern]
        else:
            close = get_close_matches(pattern, list_zoo_models() + timm.list_models(), n=3)
            hint = f'; did you mean {", ".join(close)}?' if close else '; `biformer-zoo list` shows the zoo models'
            raise ValueError(f'unknown model {pattern!r}: it is neither a biformer-zoo model nor a timm model{hint}')
        names.extend(m for m in matches if m not in names)
    return names


def create_model_for_size(name: str, img_size: ImageSize, features_only: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``name`` (random weights) so that it accepts ``img_size`` inputs.

    Models with a fixed input size (e.g. timm's Swin) are built with ``img_size``; models that take any size and
    have no such argument are built without it.
    """
    default_cfg = timm.get_pretrained_cfg(name)
    default_size = tuple(default_cfg.input_size[-2:]) if default_cfg is not None else None
    try:
        if default_size != tuple(img_size):
            try:
                return timm.create_model(name, features_only=features_only, img_size=img_size, **kwargs)
            except TypeError as e:
                if 'img_size' not in str(e):
                    raise
        return timm.create_model(name, features_only=features_only, **kwargs)
    except TypeError as e:
        if 'argument' in str(e):  # an argument the model does not take, e.g. a --model-arg meant for another family
            raise ValueError(f'{name} cannot be built with {kwargs}: {e}. Pass model arguments only to models that '
                             f'take them (one command per family)') from None
        texts = {key: value for key, value in kwargs.items() if isinstance(value, str)}
        if not texts:
            raise
        # a --model-arg value that is no Python literal arrives as text, where the model wants a number or tuple
        raise ValueError(f"{name} cannot be built with {kwargs}: {e}. {', '.join(texts)} came as text "
                         f"({', '.join(map(repr, texts.values()))}) because no Python literal parsed; give a number "
                         f"or tuple, e.g. n_win=16, topks=(1,4,16,None)") from None
