"""The presets, the feature backbone of the dense models, torchvision's FPN on it and the Semantic FPN.

See ``biformer_zoo.dense`` for the overview; everything public here is exported there.
"""
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from timm.layers import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

__all__ = [
    'FeatureBackbone', 'FPNBackbone', 'SemanticFPN', 'SemanticFPNHead', 'fpn_backbone', 'semantic_fpn',
    'list_presets', 'load_preset', 'conv_norm_act', 'PRESET_DIR', 'EXTRA_BLOCKS',
]

PRESET_DIR = Path(__file__).parents[1] / 'configs' / 'dense'
EXTRA_BLOCKS = ('maxpool', 'p6p7', 'none')
_TASKS = ('detection', 'segmentation')
_BACKBONE_DEFAULTS: Dict[str, Any] = dict(
    out_indices=(0, 1, 2, 3), fpn_channels=256, extra_blocks='maxpool', frozen_stages=-1, norm_eval=False,
    extra_norm=True)


def list_presets(task: Optional[str] = None) -> List[str]:
    """Names of the dense-prediction presets (all, or those of ``task``: 'detection' or 'segmentation')."""
    if task is not None and task not in _TASKS:
        raise ValueError(f'task must be one of {_TASKS} or None, got {task!r}')
    names = sorted(p.stem for p in PRESET_DIR.glob('*.yaml'))
    if task is None:
        return names
    return [name for name in names if load_preset(name)['task'] == task]


def load_preset(name: str) -> Dict[str, Any]:
    """The preset ``name`` as a dict: ``task``, ``model``, ``backbone`` options, ``model_kwargs`` and the recipe."""
    path = PRESET_DIR / f'{name}.yaml'
    if not path.is_file():
        raise ValueError(f'unknown preset {name!r}; the presets are {list_presets()}')
    with open(path) as f:
        preset = yaml.safe_load(f)
    preset.setdefault('backbone', {})
    preset.setdefault('model_kwargs', {})
    return preset


def _is_preset(name: str) -> bool:
    return (PRESET_DIR / f'{name}.yaml').is_file()


def _is_model_name(name: str) -> bool:
    """A registered timm model, with no tag or a registered pretrained tag (a misspelt preset has an unknown one)."""
    architecture, tag = timm.models.split_model_name_tag(name)
    return timm.is_model(architecture) and (not tag or name in timm.list_pretrained(f'{architecture}.*'))


class FeatureBackbone(nn.Module):
    """A features-only timm model with optional LayerNorms per level: the backbone of the dense models.

    ``forward`` returns the (normalised) levels ``[(B, C_i, H_i, W_i), ...]``, finest first.

    Args:
        body: A ``features_only`` timm model (``feature_info`` and a list of NCHW maps from ``forward``).
        extra_norm: A LayerNorm on each level (as the official BiFormer dense backbones have).
        frozen_stages: Freeze the stem and stages ``0..frozen_stages-1``; -1 freezes nothing.
        norm_eval: Keep the backbone's BatchNorm layers in eval mode while training.
    """

    def __init__(
            self,
            body: nn.Module,
            extra_norm: bool = True,
            frozen_stages: int = -1,
            norm_eval: bool = False,
    ):
        super().__init__()
        if frozen_stages >= 0:
            model = getattr(body, 'model', None)
            if not (hasattr(model, 'stem') and hasattr(model, 'stages')):
                raise ValueError(
                    f'frozen_stages={frozen_stages} needs a backbone laid out as stem + stages (the zoo models); '
                    f'got {type(model if model is not None else body).__name__}; use frozen_stages=-1')
            num_stages = len(model.stages)
            if frozen_stages > num_stages:
                raise ValueError(
                    f'frozen_stages must be between -1 (nothing frozen) and {num_stages} (all stages), '
                    f'got {frozen_stages}')
        elif frozen_stages != -1:
            raise ValueError(f'frozen_stages must be -1 (nothing frozen) or >= 0, got {frozen_stages}')
        self.body = body
        self.extra_norms = (
            nn.ModuleList([LayerNorm2d(c) for c in body.feature_info.channels()]) if extra_norm else None)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze_stages()

    @property
    def channels(self) -> List[int]:
        """Channels of the levels ``forward`` returns."""
        return self.body.feature_info.channels()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        model = self.body.model
        frozen = [model.stem] + [model.stages[i] for i in range(self.frozen_stages)]
        if self.extra_norms is not None:  # the norms of frozen levels (feature modules are named 'stages.{i}')
            level_stages = [int(name.rsplit('.', 1)[-1]) for name in self.body.feature_info.module_name()]
            frozen += [norm for norm, stage in zip(self.extra_norms, level_stages) if stage < self.frozen_stages]
        return frozen

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'FeatureBackbone':
        """Set the mode, keeping frozen stages (and, with ``norm_eval``, the backbone's BatchNorms) in eval mode."""
        super().train(mode)
        if mode:
            self._freeze_stages()
            if self.norm_eval:
                for module in self.body.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward_backbone(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The (normalised) backbone levels: ``[(B, C_i, H_i, W_i), ...]``."""
        features = self.body(x)
        if self.extra_norms is not None:
            features = [norm(feature) for norm, feature in zip(self.extra_norms, features)]
        return features

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_backbone(x)


class FPNBackbone(FeatureBackbone):
    """A ``FeatureBackbone`` followed by torchvision's FPN.

    Args:
        body: A ``features_only`` timm model (``feature_info`` and a list of NCHW maps from ``forward``).
        fpn_channels: Channels of every FPN level (``out_channels``).
        extra_blocks: 'maxpool' (a stride-2 max-pool of the last level, torchvision's default, key ``'pool'``),
            'p6p7' (two stride-2 convs on the last backbone level, as RetinaNet uses, keys ``'p6'``, ``'p7'``)
            or 'none'.
        extra_norm: A LayerNorm on each backbone level before the FPN.
        frozen_stages: Freeze the stem and stages ``0..frozen_stages-1``; -1 freezes nothing.
        norm_eval: Keep the backbone's BatchNorm layers in eval mode while training.
    """

    def __init__(
            self,
            body: nn.Module,
            fpn_channels: int = 256,
            extra_blocks: str = 'maxpool',
            extra_norm: bool = True,
            frozen_stages: int = -1,
            norm_eval: bool = False,
    ):
        if extra_blocks not in EXTRA_BLOCKS:
            raise ValueError(f'extra_blocks must be one of {EXTRA_BLOCKS}, got {extra_blocks!r}')
        super().__init__(body, extra_norm=extra_norm, frozen_stages=frozen_stages, norm_eval=norm_eval)
        in_channels = self.channels
        extra: Optional[ExtraFPNBlock] = None
        if extra_blocks == 'maxpool':
            extra = LastLevelMaxPool()
        elif extra_blocks == 'p6p7':
            extra = LastLevelP6P7(in_channels[-1], fpn_channels)
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=extra)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        features = self.forward_backbone(x)
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))


def _resolve_settings(
        name: str,
        task: str,
        options: Dict[str, Any],
        model_kwargs: Dict[str, Any],
) -> Tuple[str, Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Model name, backbone options, model kwargs and the preset (empty for a plain model name).

    Options given as None fall back to the preset, then to ``_BACKBONE_DEFAULTS``.
    """
    preset: Dict[str, Any] = {}
    model_name = name
    if _is_preset(name):
        preset = load_preset(name)
        if preset['task'] != task:
            raise ValueError(
                f"preset {name!r} is a {preset['task']} preset, not a {task} one; use one of {list_presets(task)}")
        model_name = preset['model']
    elif not _is_model_name(name):
        raise ValueError(
            f'{name!r} is neither a timm model nor a preset; pass a model name such as biformer_small '
            f'(see biformer_zoo.list_zoo_models()) or one of the presets {list_presets(task)}')
    resolved = dict(_BACKBONE_DEFAULTS)
    resolved.update(preset.get('backbone', {}))
    resolved.update({k: v for k, v in options.items() if v is not None})
    resolved['out_indices'] = tuple(resolved['out_indices'])
    merged_kwargs = dict(preset.get('model_kwargs', {}))
    merged_kwargs.update(model_kwargs)
    if 'topks' in merged_kwargs:  # YAML has lists; the model takes a tuple with None for global attention
        merged_kwargs['topks'] = tuple(merged_kwargs['topks'])
    return model_name, resolved, merged_kwargs, preset


def _num_classes(builder: str, name: str, num_classes: Optional[int], preset: Dict[str, Any]) -> int:
    """``num_classes``, or the preset's when None."""
    num_classes = num_classes if num_classes is not None else preset.get('num_classes')
    if num_classes is None:
        raise ValueError(f'{builder}({name!r}) needs num_classes (e.g. num_classes=150 for ADE20K)')
    return num_classes


def _head_settings(
        name: str,
        preset: Dict[str, Any],
        decoder: str,
        defaults: Dict[str, Any],
        overrides: Dict[str, Any],
) -> Dict[str, Any]:
    """The head settings: ``defaults``, updated by the preset's ``head``, then by the ``overrides`` that are not None.

    A preset made for another decoder raises a ``ValueError`` naming the presets of ``decoder``.
    """
    head = dict(preset.get('head', {}))
    preset_decoder = head.pop('decoder', decoder)
    if preset_decoder != decoder:
        matching = [p for p in list_presets('segmentation') if load_preset(p).get('head', {}).get('decoder') == decoder]
        raise ValueError(f'preset {name!r} is for a {preset_decoder} head, not {decoder}; use one of {matching}')
    settings = dict(defaults)
    settings.update(head)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def _create_body(model_name: str, pretrained: bool, settings: Dict[str, Any], **model_kwargs: Any) -> nn.Module:
    return timm.create_model(
        model_name, pretrained=pretrained, features_only=True, out_indices=settings['out_indices'], **model_kwargs)


def _build_feature_backbone(
        model_name: str, pretrained: bool, settings: Dict[str, Any], **model_kwargs: Any) -> FeatureBackbone:
    return FeatureBackbone(
        _create_body(model_name, pretrained, settings, **model_kwargs),
        extra_norm=settings['extra_norm'],
        frozen_stages=settings['frozen_stages'],
        norm_eval=settings['norm_eval'],
    )


def _build_fpn_backbone(
        model_name: str, pretrained: bool, settings: Dict[str, Any], **model_kwargs: Any) -> FPNBackbone:
    return FPNBackbone(
        _create_body(model_name, pretrained, settings, **model_kwargs),
        fpn_channels=settings['fpn_channels'],
        extra_blocks=settings['extra_blocks'],
        extra_norm=settings['extra_norm'],
        frozen_stages=settings['frozen_stages'],
        norm_eval=settings['norm_eval'],
    )


def fpn_backbone(
        name: str,
        pretrained: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        fpn_channels: Optional[int] = None,
        frozen_stages: Optional[int] = None,
        norm_eval: Optional[bool] = None,
        extra_norm: Optional[bool] = None,
        extra_blocks: Optional[str] = None,
        **model_kwargs: Any,
) -> FPNBackbone:
    """A torchvision-compatible FPN backbone from a zoo model (or any timm model with ``features_only``).

    Args:
        name: A model name ('biformer_small', 'crossformer_small.in1k', ...) or a detection preset
            ('biformer_small.coco_maskrcnn', see ``list_presets('detection')``).
        pretrained: Load the backbone's ImageNet weights.
        out_indices: Stages fed to the FPN; default (0, 1, 2, 3) (the preset's for a preset).
        fpn_channels: Channels of the FPN levels; default 256.
        frozen_stages: Freeze the stem and the first ``frozen_stages`` stages; default -1 (nothing).
        norm_eval: Keep the backbone's BatchNorms in eval mode while training; default False.
        extra_norm: LayerNorm on each level before the FPN; default True.
        extra_blocks: 'maxpool' (default; levels + ``'pool'``), 'p6p7' (RetinaNet's P6/P7 from the last stage) or
            'none'.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``n_win=16``, ``drop_path_rate=0.2``); they update the
            preset's.

    Returns:
        An ``FPNBackbone``: ``out_channels`` attribute, ``forward`` returns an ``OrderedDict`` of FPN maps.
    """
    options = dict(out_indices=out_indices, fpn_channels=fpn_channels, frozen_stages=frozen_stages,
                   norm_eval=norm_eval, extra_norm=extra_norm, extra_blocks=extra_blocks)
    model_name, settings, kwargs, _ = _resolve_settings(name, 'detection', options, model_kwargs)
    return _build_fpn_backbone(model_name, pretrained, settings, **kwargs)


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')


def conv_norm_act(
        in_channels: int, out_channels: int, kernel_size: int, norm_layer: type = nn.BatchNorm2d) -> nn.Sequential:
    """Conv (no bias, 'same' padding), norm, ReLU: mmcv's ``ConvModule`` with a norm, as the mmseg heads use it."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


class SemanticFPNHead(nn.Module):
    """The Semantic FPN decoder (Kirillov et al., 2019; mmseg ``FPNHead``).

    Each FPN level goes through 3x3 conv-BN-ReLU layers, upsampling 2x after each one, until it reaches the finest
    level's resolution (one conv for the finest level); the levels are summed, then dropout and a 1x1 classifier.

    Args:
        in_channels: Channels of every FPN level.
        reductions: Stride of each level (e.g. 4, 8, 16, 32), finest first.
        num_classes: Output classes.
        channels: Channels of the decoder convs.
        dropout: Dropout before the classifier.
        norm_layer: Norm after each conv (use ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU).
    """

    def __init__(
            self,
            in_channels: int,
            reductions: Sequence[int],
            num_classes: int,
            channels: int = 128,
            dropout: float = 0.1,
            norm_layer: type = nn.BatchNorm2d,
    ):
        super().__init__()
        _check_num_classes(num_classes)
        self.scale_heads = nn.ModuleList()
        for reduction in reductions:
            num_convs = max(1, int(round(math.log2(reduction / reductions[0]))))
            self.scale_heads.append(nn.ModuleList([
                conv_norm_act(in_channels if j == 0 else channels, channels, 3, norm_layer)
                for j in range(num_convs)]))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        sizes = [f.shape[-2:] for f in features]
        out: Optional[torch.Tensor] = None
        for level, (feature, convs) in enumerate(zip(features, self.scale_heads)):
            x = feature
            for j, conv in enumerate(convs):
                x = conv(x)
                if level > 0:  # 2x upsampling, to the exact size of the next finer level
                    target = sizes[max(level - j - 1, 0)]
                    x = F.interpolate(x, size=target, mode='bilinear', align_corners=False)
            if out is not None and x.shape[-2:] != out.shape[-2:]:
                x = F.interpolate(x, size=out.shape[-2:], mode='bilinear', align_corners=False)
            out = x if out is None else out + x  # (B, channels, H_0, W_0)
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone + FPN + Semantic FPN head; ``forward`` returns logits (B, num_classes, H, W) at input resolution."""

    def __init__(self, backbone: FPNBackbone, head: SemanticFPNHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = list(self.backbone(x).values())  # FPN levels, finest first
        logits = self.head(features)  # (B, num_classes, H / 4, W / 4)
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)


def semantic_fpn(
        name: str,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        fpn_channels: Optional[int] = None,
        head_channels: Optional[int] = None,
        dropout: Optional[float] = None,
        frozen_stages: Optional[int] = None,
        norm_eval: Optional[bool] = None,
        extra_norm: Optional[bool] = None,
        **model_kwargs: Any,
) -> SemanticFPN:
    """A Semantic FPN segmentation model on a zoo backbone (as in the BiFormer and CrossFormer ADE20K tables).

    Args:
        name: A model name or a segmentation preset ('biformer_small.ade20k_sfpn', see
            ``list_presets('segmentation')``).
        num_classes: Output classes (the preset's, e.g. 150 for ADE20K, when None).
        pretrained: Load the backbone's ImageNet weights.
        fpn_channels: Channels of the FPN; default 256.
        head_channels: Channels of the decoder convs; default 128 (as in the official configs).
        dropout: Dropout before the classifier; default 0.1 (as in the official configs).
        frozen_stages, norm_eval, extra_norm: As in ``fpn_backbone`` (defaults -1, False, True).
        **model_kwargs: Passed to ``timm.create_model``; they update the preset's.

    Returns:
        A ``SemanticFPN`` whose ``forward`` maps (B, 3, H, W) images to (B, num_classes, H, W) logits.
    """
    options = dict(fpn_channels=fpn_channels, frozen_stages=frozen_stages, norm_eval=norm_eval,
                   extra_norm=extra_norm, extra_blocks='none')
    model_name, settings, kwargs, preset = _resolve_settings(name, 'segmentation', options, model_kwargs)
    num_classes = _num_classes('semantic_fpn', name, num_classes, preset)
    head_settings = _head_settings(
        name, preset, 'SemanticFPN', dict(channels=128, dropout=0.1), dict(channels=head_channels, dropout=dropout))
    backbone = _build_fpn_backbone(model_name, pretrained, settings, **kwargs)
    head = SemanticFPNHead(
        backbone.out_channels, backbone.body.feature_info.reduction(), num_classes,
        channels=head_settings['channels'], dropout=head_settings['dropout'])
    return SemanticFPN(backbone, head)
