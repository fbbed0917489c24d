"""The feature backbone of the dense models (a ``features_only`` timm model with optional per-level norms, frozen
stages and BatchNorms in eval mode) and torchvision's FPN on it, for torchvision's detectors (``fpn_backbone``)."""
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..layers.helpers import check_int_arg
from .presets import resolve_settings

__all__ = [
    'FeatureBackbone', 'FPNBackbone', 'fpn_backbone', 'build_feature_backbone', 'build_fpn_backbone', 'EXTRA_BLOCKS']

EXTRA_BLOCKS = ('maxpool', 'p6p7', 'none')


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
        check_int_arg('frozen_stages', frozen_stages, minimum=None, fix='-1 freezes nothing, k the stem and k stages')
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
        check_int_arg('fpn_channels', fpn_channels, fix='fpn_channels is the width of every FPN level (256 in the '
                                                        'official recipes)')
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



def _create_body(model_name: str, pretrained: bool, settings: Dict[str, Any], **model_kwargs: Any) -> nn.Module:
    return timm.create_model(
        model_name, pretrained=pretrained, features_only=True, out_indices=settings['out_indices'], **model_kwargs)


def build_feature_backbone(
        model_name: str, pretrained: bool, settings: Dict[str, Any], **model_kwargs: Any) -> FeatureBackbone:
    return FeatureBackbone(
        _create_body(model_name, pretrained, settings, **model_kwargs),
        extra_norm=settings['extra_norm'],
        frozen_stages=settings['frozen_stages'],
        norm_eval=settings['norm_eval'],
    )


def build_fpn_backbone(
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
        name: Optional[str] = None,
        pretrained: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        fpn_channels: Optional[int] = None,
        frozen_stages: Optional[int] = None,
        norm_eval: Optional[bool] = None,
        extra_norm: Optional[bool] = None,
        extra_blocks: Optional[str] = None,
        preset_file: Optional[Union[str, Path]] = None,
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
        preset_file: A detection preset of your own (a YAML file laid out as those in ``preset_files/``), instead of
            ``name``.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``n_win=16``, ``drop_path_rate=0.2``); they update the
            preset's.

    Returns:
        An ``FPNBackbone``: ``out_channels`` attribute, ``forward`` returns an ``OrderedDict`` of FPN maps.
    """
    options = dict(out_indices=out_indices, fpn_channels=fpn_channels, frozen_stages=frozen_stages,
                   norm_eval=norm_eval, extra_norm=extra_norm, extra_blocks=extra_blocks)
    model_name, settings, kwargs, _ = resolve_settings(name, 'detection', options, model_kwargs, preset_file)
    return build_fpn_backbone(model_name, pretrained, settings, **kwargs)
