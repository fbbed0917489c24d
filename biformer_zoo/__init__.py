"""biformer-zoo: BiFormer and CrossFormer backbones as first-class timm models.

Importing the package registers every model with timm, so ``timm.create_model('biformer_small')``
works after ``import biformer_zoo``.
"""
from . import models  # noqa: F401  (registers the model entrypoints with timm)
from .models import UnknownModelError, create_model, list_zoo_models

from ._version import __version__

__all__ = ['create_model', 'list_zoo_models', 'UnknownModelError', '__version__']
