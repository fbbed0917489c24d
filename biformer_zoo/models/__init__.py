"""Model families. Importing a family module registers its entrypoints with timm."""
from typing import List

import timm

from . import biformer  # noqa: F401
from . import crossformer  # noqa: F401

FAMILIES = ('biformer', 'crossformer')


def list_zoo_models(pretrained: bool = False) -> List[str]:
    """Names of every model this package registers with timm (sorted)."""
    names = set()
    for family in FAMILIES:
        names.update(timm.list_models(module=family, pretrained=pretrained))
    return sorted(names)
