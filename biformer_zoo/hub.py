"""Compatibility module: what ``biformer_zoo.hub`` held now lives in ``biformer_zoo.weights`` (manifest, weight files,
official checkpoints, ``pretrained=True``) and ``biformer_zoo.convert`` (``convert_checkpoint``, ``push_to_hub``).
Import from those; these names stay importable from here."""
from .convert import ConversionResult, convert_checkpoint, push_to_hub  # noqa: F401
from .weights import *  # noqa: F401,F403
from .weights import __all__ as _weights_all

__all__ = ['ConversionResult', 'convert_checkpoint', 'push_to_hub', *_weights_all]
