"""BiFormer and CrossFormer blocks as Ultralytics YOLO modules: names that resolve in any model YAML.

Ultralytics (AGPL-3.0) is an optional dependency: ``pip install "biformer-zoo[yolo]"``. Importing this module runs
``register()``; after that these rows work in a YOLOv8 / YOLO11 model YAML::

    - [-1, 1, BRA, [8, 7, 4]]              # num_heads, num_regions, topk; channels in = out
    - [-1, 3, C2fBRA, [1024, 4, 7, 4]]     # c2, num_heads, num_regions, topk; repeats = attention bottlenecks
    - [-1, 3, C2fLSDA, [1024, 4, 7, 8]]    # c2, num_heads, group_size, interval
    - [-1, 1, CSM, [512]]                  # c2: CrossFormer's stride-2 multi-kernel merge

``c2`` and the repeats scale with the model scale exactly as for Ultralytics' ``C2f`` / ``Conv`` rows (width,
``max_channels``, rounding to multiples of 8; depth), and input channels come from the graph. Options after the
positional ones, or all of them, can be given by name in a trailing mapping: ``[1024, {topk: 8}]``.

Shipped models (every scale n/s/m/l/x): ``yolov8-bra.yaml``, ``yolo11-bra.yaml`` and ``yolov8-lsda.yaml``::

    from ultralytics import YOLO
    from biformer_zoo.integrations.ultralytics import model_cfg
    model = YOLO(model_cfg('yolov8n-bra.yaml'))  # scale n of yolov8-bra.yaml, by Ultralytics' file-name rule
    model.train(data='coco8.yaml', epochs=100, imgsz=640)

Checkpoints need nothing but this package installed: unpickling a ``best.pt`` imports this module (it defines the
classes the checkpoint names), which registers everything, so ``YOLO('best.pt')`` predict / val / export and
``.train()`` (which rebuilds the model from its YAML) work in a new process. Restricted loading
(``ULTRALYTICS_SAFE_LOAD=1``) never imports what a file names; there ``import biformer_zoo.integrations.ultralytics``
first: ``register()`` adds every class these modules pickle to ``torch.serialization``'s safe globals.

How it plugs in: Ultralytics has no extension point for model-YAML modules, so ``register()`` wraps
``ultralytics.nn.tasks.parse_model`` (with ``_ultralytics_parse.parse_model_with``). The wrapper hands Ultralytics a
copy of the YAML in which each of our rows is a stand-in whose channels Ultralytics already computes the way we want
(a 1x1 ``Conv`` for width-scaled rows, repeated like the row; ``nn.Identity`` for channel-keeping rows, plus a 1x1
``Conv`` appended after the last row that reads their input width), then swaps the real modules in and rewrites
their lines of the printed layer table. It reads only ``torch.nn.Conv2d`` channel counts, never Ultralytics'
attribute names, and checks this behaviour against the installed release once at registration; releases outside
``SUPPORTED_ULTRALYTICS`` are refused.
"""
import functools
import importlib
import inspect
import os
import re
import threading
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from timm.layers import LayerNorm2d

from ..layers import (
    AttentionBottleneck, BiLevelRoutingAttention, C2fAttention, ConvBNAct, CrossScaleMerge, DepthwiseConv2d,
    DynamicPosBias, LSDAttention, StridedConv2d)
from ..layers.bra import RegionRouter

try:
    import ultralytics
    from ultralytics.nn.modules import Conv
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'biformer_zoo.integrations.ultralytics needs the ultralytics package (AGPL-3.0), an optional dependency: '
        'pip install "biformer-zoo[yolo]"') from e

from ._ultralytics_parse import RowSpec, conv2ds, parse_model_with  # noqa: E402  (needs ultralytics, checked above)

__all__ = [
    'BRA', 'C2fBRA', 'C2fLSDA', 'CSM', 'register', 'model_cfg', 'list_model_cfgs', 'SAFE_GLOBALS',
    'SUPPORTED_ULTRALYTICS', 'TESTED_ULTRALYTICS', 'UnsupportedUltralyticsError',
]

SUPPORTED_ULTRALYTICS = '>=8.4.0,<8.5'  # keep in step with the `yolo` extra in pyproject.toml
TESTED_ULTRALYTICS = ('8.4.0', '8.4.190')
_SUPPORTED_RANGE = ((8, 4, 0), (8, 5, 0))  # [low, high)
# set to 1 to try a release outside SUPPORTED_ULTRALYTICS (the behaviour check in register() still runs)
ANY_VERSION_ENV = 'BIFORMER_ZOO_ULTRALYTICS_ANY_VERSION'
CFG_DIR = Path(__file__).with_name('ultralytics_cfg')


class UnsupportedUltralyticsError(ImportError):
    """The installed ``ultralytics`` is outside the supported range or does not build models as this module expects.

    An ``ImportError``: it is raised when the module is imported, also by unpickling a checkpoint.
    """


# ---------------------------------------------------------------------------------------------------------------------
# the modules: Ultralytics' argument order (input channels first, then output channels and repeats where they apply)


class BRA(BiLevelRoutingAttention):
    """Bi-Level Routing Attention on (B, C, H, W) maps of any size, C in = C out (the YAML row ``BRA``).

    YAML args ``[num_heads=8, num_regions=7, topk=4, side_dwconv=5]``; ``num_heads`` must divide the input width.
    No residual or norm around it: the layer as BiFormer defines it (``BiLevelRoutingAttention``).
    """

    def __init__(self, c1: int, num_heads: int = 8, num_regions: int = 7, topk: int = 4, side_dwconv: int = 5):
        super().__init__(c1, num_heads=num_heads, num_regions=num_regions, topk=topk, side_dwconv=side_dwconv)


class C2fBRA(C2fAttention):
    """C2f with ``n`` BRA bottlenecks (the YAML row ``C2fBRA``), built from Ultralytics' ``Conv`` units.

    YAML args ``[c2, num_heads=4, num_regions=7, topk=4, expansion=0.5]``; the repeats column gives ``n``.
    ``num_heads`` must divide the hidden width ``int(c2 * expansion)``.
    """

    def __init__(
            self,
            c1: int,
            c2: int,
            n: int = 1,
            num_heads: int = 4,
            num_regions: int = 7,
            topk: int = 4,
            expansion: float = 0.5,
    ):
        super().__init__(
            c1, c2, depth=n, attention='bra', num_heads=num_heads, expansion=expansion, conv_layer=Conv,
            num_regions=num_regions, topk=topk)


class C2fLSDA(C2fAttention):
    """C2f with ``n`` CrossFormer attention bottlenecks (the YAML row ``C2fLSDA``), built from Ultralytics' ``Conv``.

    YAML args ``[c2, num_heads=4, group_size=7, interval=8, expansion=0.5]`` (``LSDAttention``'s names and defaults);
    the repeats column gives ``n``. As in a CrossFormer stage, the bottlenecks alternate short-distance attention
    (``group_size`` x ``group_size`` windows) and long-distance attention (tokens ``interval`` apart), starting with
    short-distance, so ``interval`` acts from the second bottleneck on. The hidden width ``int(c2 * expansion)`` must
    be at least 16 and a multiple of ``num_heads``.
    """

    def __init__(
            self,
            c1: int,
            c2: int,
            n: int = 1,
            num_heads: int = 4,
            group_size: int = 7,
            interval: int = 8,
            expansion: float = 0.5,
    ):
        super().__init__(
            c1, c2, depth=n, attention='lsda', num_heads=num_heads, expansion=expansion, conv_layer=Conv,
            group_size=group_size, interval=interval)
        for block in self.blocks[1::2]:  # SDA, LDA, SDA, ...: the layout is chosen per call, the weights are the same
            block.attn.long_distance = True


class CSM(CrossScaleMerge):
    """CrossFormer's cross-scale merge on (B, C, H, W): LayerNorm, stride-2 convs of several kernels, concatenated.

    The YAML row ``CSM``, args ``[c2, kernel_sizes=(2, 4)]``; ``c2`` scales like a ``Conv`` row's. Output
    ``ceil(H / 2) x ceil(W / 2)``. Kernel ``i`` of ``k`` gets ``c2 / 2**(i+1)`` channels (the last the rest), so
    ``c2`` must be a multiple of ``2**(k-1)``.
    """

    def __init__(self, c1: int, c2: int, kernel_sizes: Sequence[int] = (2, 4)):
        super().__init__(c1, c2, kernel_sizes=tuple(kernel_sizes), channels_last=False)


# every class a checkpoint of these modules pickles, beyond torch.nn and Ultralytics' own
SAFE_GLOBALS: Tuple[type, ...] = (
    BRA, C2fBRA, C2fLSDA, CSM, C2fAttention, AttentionBottleneck, ConvBNAct, BiLevelRoutingAttention, RegionRouter,
    LSDAttention, DynamicPosBias, CrossScaleMerge, DepthwiseConv2d, StridedConv2d, LayerNorm2d,
)


_ROWS: Dict[str, RowSpec] = {
    'BRA': RowSpec(BRA, scales_width=False, repeats_inside=False),
    'C2fBRA': RowSpec(C2fBRA, scales_width=True, repeats_inside=True),
    'C2fLSDA': RowSpec(C2fLSDA, scales_width=True, repeats_inside=True, min_hidden=16),  # LSDAttention's least
    'CSM': RowSpec(CSM, scales_width=True, repeats_inside=False),
}

# ---------------------------------------------------------------------------------------------------------------------
# registration


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r'\d+', version)[:3])


def _check_version() -> None:
    found = ultralytics.__version__
    low, high = _SUPPORTED_RANGE
    if low <= _version_tuple(found) < high or os.environ.get(ANY_VERSION_ENV) == '1':
        return
    raise UnsupportedUltralyticsError(
        f'biformer_zoo.integrations.ultralytics supports ultralytics{SUPPORTED_ULTRALYTICS} (tested '
        f'{", ".join(TESTED_ULTRALYTICS)}), found {found}: it patches model building, which changes between '
        f'releases. Install a supported release (pip install "biformer-zoo[yolo]"), or set {ANY_VERSION_ENV}=1 to '
        f'try this one (registration still checks that models build as expected).')


def _check_behaviour(parse_model: Callable) -> None:
    """Build a tiny YAML through ``parse_model`` and check the channel rules the wrapper relies on."""
    d = {
        'nc': 1, 'scales': {'t': [0.5, 0.25, 64]}, 'scale': 't',
        'backbone': [[-1, 1, 'Conv', [40, 1]], [-1, 4, 'Conv', [512, 1]], [-1, 1, 'nn.Identity', []]],
        'head': [[0, 1, 'Conv', [8, 1]]],
    }
    try:
        layers, save = parse_model(d, 3, verbose=False)
        got = [[(c.in_channels, c.out_channels) for c in conv2ds(m)] for m in layers]
    except Exception as e:  # any failure means the rules differ
        got = repr(e)
    # 40 * 0.25 rounds up to 16; min(512, 64) * 0.25 = 16, repeats 4 * 0.5 = 2; the last row reads layer 0's width
    want = [[(3, 16)], [(16, 16)] * 2, [], [(16, 8)]]
    if got != want or save != [0]:
        raise UnsupportedUltralyticsError(
            f'ultralytics {ultralytics.__version__} builds model YAML rows differently than '
            f'biformer_zoo.integrations.ultralytics expects (check build: {got}, expected {want}); supported: '
            f'ultralytics{SUPPORTED_ULTRALYTICS}. Install a supported release: pip install "biformer-zoo[yolo]"')


_register_lock = threading.Lock()


def register() -> None:
    """Make ``BRA``, ``C2fBRA``, ``C2fLSDA`` and ``CSM`` resolve in Ultralytics model YAMLs. Idempotent.

    Wraps ``ultralytics.nn.tasks.parse_model`` (once per process) and adds ``SAFE_GLOBALS`` to torch's safe globals
    for ``weights_only`` / ``ULTRALYTICS_SAFE_LOAD=1`` loading. Runs on import of this module.

    Raises:
        UnsupportedUltralyticsError: The installed ultralytics is outside ``SUPPORTED_ULTRALYTICS`` or builds model
            rows differently than this wrapper relies on.
    """
    with _register_lock:
        tasks = importlib.import_module('ultralytics.nn.tasks')
        current = tasks.parse_model
        if getattr(current, '_biformer_zoo', False):
            return
        _check_version()
        if getattr(tasks, 'Conv', None) is not Conv or list(inspect.signature(current).parameters)[:3] != [
                'd', 'ch', 'verbose']:
            raise UnsupportedUltralyticsError(
                f'ultralytics {ultralytics.__version__}: parse_model(d, ch, verbose) or the Conv module is not where '
                f'biformer_zoo.integrations.ultralytics expects; supported: ultralytics{SUPPORTED_ULTRALYTICS}')
        _check_behaviour(current)

        @functools.wraps(current)
        def parse_model(d, ch, verbose=True):
            return parse_model_with(_ROWS, current, d, ch, verbose)

        parse_model._biformer_zoo = True
        tasks.parse_model = parse_model
        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))


# ---------------------------------------------------------------------------------------------------------------------
# shipped model YAMLs


def list_model_cfgs() -> List[str]:
    """File names of the shipped model YAMLs (each has scales n/s/m/l/x)."""
    return sorted(p.name for p in CFG_DIR.glob('*.yaml'))


def model_cfg(name: str) -> str:
    """Path of a shipped model YAML for ``YOLO(...)``, with the scale in the name as Ultralytics reads it.

    ``model_cfg('yolov8n-bra.yaml')`` is ``.../ultralytics_cfg/yolov8n-bra.yaml``: no such file is shipped, but
    Ultralytics loads ``yolov8-bra.yaml`` from the same folder for it, at scale ``n``. Without a scale letter
    (``'yolov8-bra.yaml'``) Ultralytics builds the first scale, ``n``, with a warning.

    Raises:
        ValueError: No shipped YAML has that name, with or without a scale letter n/s/m/l/x.
    """
    file = name if name.endswith(('.yaml', '.yml')) else f'{name}.yaml'
    if '/' in file or '\\' in file:
        raise ValueError(f'model_cfg takes a file name such as "yolov8n-bra.yaml", not a path: {name!r}')
    unscaled = re.sub(r'^(yolo(?:v)?\d+)[nslmx](-.+)$', r'\1\2', file)
    if not (CFG_DIR / unscaled).is_file():
        raise ValueError(
            f'no shipped model YAML {name!r}; available: {list_model_cfgs()}, each also as e.g. '
            f'"yolov8s-bra.yaml" for a scale (n, s, m, l, x)')
    return str(CFG_DIR / file)


register()
