"""The Semantic FPN segmentation model (Kirillov et al., 2019; mmseg ``FPNHead``) on a zoo backbone, and the
conv-norm-ReLU unit the segmentation heads share."""
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.helpers import check_int_arg
from ..layers.helpers import check_rate
from .backbones import FPNBackbone, build_fpn_backbone
from .presets import check_num_classes, head_settings, preset_num_classes, resolve_settings

__all__ = ['SemanticFPN', 'SemanticFPNHead', 'semantic_fpn', 'conv_norm_act']


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
        check_num_classes(num_classes)
        check_int_arg('channels', channels, fix='channels is the width of the decoder convs (128 in the official '
                                                'configs)')
        check_rate('dropout', dropout)
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
        name: Optional[str] = None,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        fpn_channels: Optional[int] = None,
        head_channels: Optional[int] = None,
        dropout: Optional[float] = None,
        frozen_stages: Optional[int] = None,
        norm_eval: Optional[bool] = None,
        extra_norm: Optional[bool] = None,
        preset_file: Optional[Union[str, Path]] = None,
        **model_kwargs: Any,
) -> SemanticFPN:
    """A Semantic FPN segmentation model on a zoo backbone (as in the BiFormer and CrossFormer ADE20K tables).

    Args:
        name: A model name or a segmentation preset ('biformer_small.ade20k_sfpn', see
            ``list_presets('segmentation')``).
        num_classes: Output classes (the preset's, e.g. 150 for ADE20K, when None).
        pretrained: Load the backbone's ImageNet weights.
        out_indices: Stages fed to the FPN, each once, in increasing order; default (0, 1, 2, 3).
        fpn_channels: Channels of the FPN; default 256.
        head_channels: Channels of the decoder convs; default 128 (as in the official configs).
        dropout: Dropout before the classifier; default 0.1 (as in the official configs).
        frozen_stages, norm_eval, extra_norm: As in ``fpn_backbone`` (defaults -1, False, True).
        preset_file: A segmentation preset of your own (a YAML file laid out as those in ``preset_files/``), instead
            of ``name``.
        **model_kwargs: Passed to ``timm.create_model``; they update the preset's.

    Returns:
        A ``SemanticFPN`` whose ``forward`` maps (B, 3, H, W) images to (B, num_classes, H, W) logits.
    """
    options = dict(out_indices=out_indices, fpn_channels=fpn_channels, frozen_stages=frozen_stages,
                   norm_eval=norm_eval, extra_norm=extra_norm)
    model_name, settings, kwargs, preset = resolve_settings(name, 'segmentation', options, model_kwargs, preset_file)
    settings['extra_blocks'] = 'none'  # the head reads the FPN levels only
    label = name or str(preset_file)
    num_classes = preset_num_classes('semantic_fpn', label, num_classes, preset)
    head_cfg = head_settings(
        label, preset, 'SemanticFPN', dict(channels=128, dropout=0.1), dict(channels=head_channels, dropout=dropout))
    backbone = build_fpn_backbone(model_name, pretrained, settings, **kwargs)
    head = SemanticFPNHead(
        backbone.out_channels, backbone.body.feature_info.reduction(), num_classes,
        channels=head_cfg['channels'], dropout=head_cfg['dropout'])
    return SemanticFPN(backbone, head)
