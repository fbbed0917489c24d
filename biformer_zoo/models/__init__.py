"""Model families. Importing a family module registers its entrypoints with timm."""
from difflib import get_close_matches
from typing import Any, List

import timm
from timm.models import parse_model_name, split_model_name_tag
from torch import nn

from ..weights import check_checkpoint_file
from ._pyramid import UnknownModelError, check_pretrained_tag
from . import biformer  # noqa: F401
from . import crossformer  # noqa: F401

FAMILIES = ('biformer', 'crossformer')


def list_zoo_models(pretrained: bool = False) -> List[str]:
    """Names of every model this package registers with timm (sorted)."""
    names = set()
    for family in FAMILIES:
        names.update(timm.list_models(module=family, pretrained=pretrained))
    return sorted(names)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that names close matches for an unknown model name or pretrained tag.

    timm answers an unknown name with ``RuntimeError('Unknown model (...)')``; this raises ``UnknownModelError``
    (a ``ValueError``, and a ``RuntimeError`` like timm's) with the nearest registered names and the fix.
    ``hf-hub:``/``local-dir:`` names go to timm unchanged. A ``checkpoint_path`` that is missing, empty or not a
    checkpoint raises a ``ValueError`` saying so before timm reads it.
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
    if kwargs.get('checkpoint_path'):  # timm's loader would raise a bare FileNotFoundError, EOFError or KeyError
        check_checkpoint_file(kwargs['checkpoint_path'])
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
