"""biformer-zoo: BiFormer and CrossFormer backbones as first-class timm models.

Importing the package registers every model with timm, so ``timm.create_model('biformer_small')``
works after ``import biformer_zoo``.
"""
from . import models  # noqa: F401  (registers the model entrypoints with timm)
from .models import UnknownModelError, create_model, list_zoo_models

__version__ = '0.1.0'

__all__ = ['create_model', 'list_zoo_models', 'UnknownModelError', '__version__']
