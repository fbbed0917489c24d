"""Integrations with other frameworks, each an optional dependency imported only by its own module.

- ``biformer_zoo.integrations.ultralytics``: BRA, C2f-BRA, C2f-LSDA and CrossFormer's merge as Ultralytics YOLO
  modules (``pip install "biformer-zoo[yolo]"``; Ultralytics is AGPL-3.0).

Importing ``biformer_zoo`` or this package imports none of them.
"""
