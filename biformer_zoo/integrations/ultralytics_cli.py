"""Ultralytics' ``yolo`` command with the biformer-zoo modules registered: ``biformer-zoo-yolo``.

A model YAML names ``BRA`` / ``C2fBRA`` / ``C2fLSDA`` / ``CSM`` only after ``biformer_zoo.integrations.ultralytics``
is imported, which the plain ``yolo`` command never does (checkpoints import it themselves). This command imports it,
lets ``model=`` name a shipped YAML with its scale (``model=yolov8n-bra.yaml``), then runs ``yolo``::

    biformer-zoo-yolo train model=yolov8n-bra.yaml data=coco8.yaml epochs=100 imgsz=640
"""
import os
import sys
from typing import List, Optional


def resolve_model_args(argv: List[str]) -> List[str]:
    """``model=<shipped YAML name>`` -> ``model=<its path>``; every other argument unchanged."""
    from .ultralytics import model_cfg

    out = []
    for arg in argv:
        key, sep, value = arg.partition('=')
        if key == 'model' and sep and value.endswith(('.yaml', '.yml')) and not os.path.exists(value):
            try:
                arg = f'model={model_cfg(value)}'
            except ValueError:
                pass  # not one of ours: Ultralytics looks it up as usual
        out.append(arg)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    """Run ``yolo`` with ``argv`` (default: this command's arguments), shipped YAML names resolved."""
    from ultralytics.cfg import entrypoint

    # Ultralytics reads the list object sys.argv held at its import: change that list, not the name
    sys.argv[1:] = resolve_model_args(sys.argv[1:] if argv is None else list(argv))
    entrypoint()


if __name__ == '__main__':
    main()
