"""UperNet (Xiao et al., 2018) on the zoo backbones, as in the official BiFormer and CrossFormer ADE20K configs.

The official configs use mmseg's ``UPerHead`` (512 channels, PPM scales 1/2/3/6, BatchNorm) as the decoder and, while
training, an ``FCNHead`` on the stride-16 level (one 3x3 conv of 256 channels) whose loss counts 0.4.

``UperNetHead`` is ``segmentation_models_pytorch``'s ``UPerNetDecoder`` (the same PPM, lateral 1x1 convs, top-down
sums, 3x3 FPN convs and 3x3 fusion conv over the concatenated levels, all conv-BN-ReLU without conv bias) with
mmseg's dropout and 1x1 classifier on top. smp's decoder also normalises every input level with a LayerNorm of its
own, which ``UPerHead`` does not have: those are replaced by identities (the official BiFormer backbones' extra norms
are the backbone's ``extra_norm``), so the head has exactly ``UPerHead``'s parameters. The auxiliary ``FCNHead`` is
written here: smp has no such head.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.helpers import check_int_arg
from ..layers.helpers import check_rate
from .backbones import FeatureBackbone, build_feature_backbone
from .fpn import conv_norm_act
from .presets import check_num_classes, head_settings, preset_num_classes, resolve_settings

__all__ = ['FCNHead', 'UperNet', 'UperNetHead', 'check_labels', 'upernet']

# the official head settings (mmseg UPerHead + auxiliary FCNHead); presets may override them
_HEAD_DEFAULTS: Dict[str, Any] = dict(
    channels=512, dropout=0.1, aux_index=2, aux_channels=256, aux_num_convs=1, aux_loss_weight=0.4)


def _upernet_decoder_class() -> type:
    try:
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
    except ImportError as e:
        raise ImportError(
            'the UperNet head builds on segmentation_models_pytorch (>= 0.6); install it with '
            'pip install "biformer-zoo[seg]" (or pip install segmentation-models-pytorch)') from e
    return UPerNetDecoder


def _check_aux_index(aux_index: int, num_levels: int) -> None:
    if not 0 <= aux_index < num_levels:
        raise ValueError(
            f'the auxiliary head reads backbone level {aux_index}, but there are {num_levels} levels '
            f'(0 to {num_levels - 1}); pick one of them or build without the auxiliary head')


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


def _check_single_image_training(ppm: nn.Module) -> None:
    """The PPM's scale-1 branch pools the map to 1x1: a BatchNorm there that trains sees one value per channel with
    one image, which torch refuses deep inside; say so with the fixes."""
    training_norms = [m for m in ppm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and not isinstance(m, nn.SyncBatchNorm) and m.training]
    if training_norms:
        raise ValueError(
            'UperNet cannot train on a batch of 1 image: its pyramid pooling averages the coarsest map to 1x1, and '
            'the BatchNorm after it needs more than one value per channel. Train with batch size >= 2 (per '
            'process), keep the head\'s BatchNorms in eval mode as norm_eval=True does for the backbone\'s (call '
            'model.head.eval() after model.train()), or use another norm (nn.SyncBatchNorm across processes)')


class UperNetHead(nn.Module):
    """The UperNet decoder: mmseg's ``UPerHead`` (PPM on the coarsest level, FPN, fusion, dropout, classifier).

    The PPM, FPN and fusion are smp's ``UPerNetDecoder`` without its per-level LayerNorms (see the module docstring).

    Args:
        in_channels: Channels of the input levels, finest first (at least two).
        num_classes: Output classes.
        channels: Channels of the decoder (the official 512).
        dropout: Dropout before the classifier (``nn.Dropout2d``, as mmseg).

    ``forward`` takes the levels and returns logits at the finest level's resolution. The pyramid pooling scales are
    1, 2, 3 and 6 (fixed by smp's decoder; the official ones). Use ``nn.SyncBatchNorm.convert_sync_batchnorm`` for
    multi-GPU training as the official SyncBN; the scale-1 pooling branch's BatchNorm needs more than one image per
    batch (per process) in training.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512, dropout: float = 0.1):
        super().__init__()
        check_num_classes(num_classes)
        if len(in_channels) < 2:
            raise ValueError(f'UperNetHead needs at least two input levels, got in_channels={list(in_channels)}')
        check_int_arg('channels', channels, fix='channels is the width of the decoder (512 in the official configs)')
        check_rate('dropout', dropout)
        self.in_channels = tuple(in_channels)
        # smp's decoder takes the channels of an smp encoder, whose first two maps (strides 1 and 2) it skips
        self.decoder = _upernet_decoder_class()(
            encoder_channels=(0, 0, *in_channels), encoder_depth=len(in_channels) + 1, decoder_channels=channels,
            use_norm='batchnorm')
        self.decoder.feature_norms = nn.ModuleList([nn.Identity() for _ in in_channels])  # not in UPerHead
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        got = tuple(f.shape[1] for f in features)
        if got != self.in_channels:
            raise ValueError(
                f'UperNetHead was built for levels with channels {list(self.in_channels)}, got {list(got)}; '
                f'build it with in_channels={list(got)}')
        if self.training and features[-1].shape[0] == 1:
            _check_single_image_training(self.decoder.psp)
        x = self.decoder([None, None, *features])  # (B, channels, H_0, W_0)
        return self.classifier(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg's ``FCNHead`` as the official auxiliary head uses it (``concat_input=False``).

    ``num_convs`` 3x3 conv-BN-ReLU layers, dropout and a 1x1 classifier; logits at the input level's resolution.

    Args:
        in_channels: Channels of the input level.
        num_classes: Output classes.
        channels: Channels of the convs (the official 256).
        num_convs: Number of 3x3 convs (the official 1).
        dropout: Dropout before the classifier.
        norm_layer: Norm after each conv.
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            channels: int = 256,
            num_convs: int = 1,
            dropout: float = 0.1,
            norm_layer: type = nn.BatchNorm2d,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_int_arg('num_convs', num_convs, fix='num_convs is the number of 3x3 convs (1 in the official configs)')
        check_int_arg('channels', channels, fix='channels is the width of the convs (256 in the official configs)')
        check_rate('dropout', dropout)
        self.in_channels = in_channels
        self.convs = nn.Sequential(*[
            conv_norm_act(in_channels if i == 0 else channels, channels, 3, norm_layer) for i in range(num_convs)])
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f'FCNHead was built for {self.in_channels} input channels, got {x.shape[1]}; '
                f'build it with in_channels={x.shape[1]}')
        return self.classifier(self.dropout(self.convs(x)))


class UperNet(nn.Module):
    """Backbone + UperNet head, and the auxiliary FCN head used while training.

    ``forward`` returns logits (B, num_classes, H, W) at input resolution; in training mode, with an auxiliary head,
    it returns ``(logits, aux_logits)``, both at input resolution. ``loss`` combines them as the official recipe does.

    Args:
        backbone: A ``FeatureBackbone``.
        head: The ``UperNetHead`` on all backbone levels.
        aux_head: The auxiliary head on level ``aux_index`` (None for none).
        aux_index: The level the auxiliary head reads (2: stride 16 with the four stages).
        aux_loss_weight: Weight of the auxiliary loss in ``loss``.
    """

    def __init__(
            self,
            backbone: FeatureBackbone,
            head: UperNetHead,
            aux_head: Optional[FCNHead] = None,
            aux_index: int = 2,
            aux_loss_weight: float = 0.4,
    ):
        super().__init__()
        if aux_head is not None:
            _check_aux_index(aux_index, len(backbone.channels))
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.aux_index = aux_index
        self.aux_loss_weight = aux_loss_weight

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        features = self.backbone(x)
        logits = _resize(self.head(features), x.shape[-2:])
        if self.training and self.aux_head is not None:
            return logits, _resize(self.aux_head(features[self.aux_index]), x.shape[-2:])
        return logits

    def loss(
            self,
            outputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
            target: torch.Tensor,
            ignore_index: int = 255,
    ) -> torch.Tensor:
        """The official loss: cross-entropy of the logits plus ``aux_loss_weight`` times that of the aux logits.

        As mmseg computes it: per-pixel cross-entropy averaged over all pixels, the ignored ones (``ignore_index``,
        255 for ADE20K with the zero label reduced) counting as zero.

        Args:
            outputs: What ``forward`` returned (logits, or ``(logits, aux_logits)``).
            target: Class indices (B, H, W) or (B, 1, H, W), any integer dtype, at the input's size; each in
                [0, num_classes) or ``ignore_index`` (checked by ``check_labels``, which says what was wrong).
            ignore_index: Label of pixels without a class.
        """
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        target = check_labels(target, outputs[0], ignore_index)
        weights = (1.0, self.aux_loss_weight)[:len(outputs)]
        return sum(
            w * F.cross_entropy(o, target, ignore_index=ignore_index, reduction='none').mean()
            for w, o in zip(weights, outputs))


def check_labels(target: Any, logits: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``target`` as the (B, H, W) int64 class indices ``F.cross_entropy`` takes for ``logits`` (B, C, H, W), or a
    ``ValueError`` saying what was wrong: the labels may be (B, H, W) or (B, 1, H, W), of any integer dtype, at the
    logits' size (the input's), each a class in [0, C) or ``ignore_index``."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f'labels must be a torch.Tensor of class indices, got a {type(target).__name__}')
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    batch, num_classes, height, width = logits.shape
    if target.dim() != 3:
        raise ValueError(f'labels must be (B, H, W) or (B, 1, H, W) class indices, got shape {list(target.shape)}')
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f'labels must be integer class indices, got dtype {target.dtype}; convert them with '
                         f'target.long() (after rounding, if they went through a float transform)')
    if tuple(target.shape) != (batch, height, width):
        raise ValueError(
            f'labels of shape {list(target.shape)} do not fit logits of {batch} images at {height}x{width}; the '
            f'labels must have the size of the input images (resize them with mode="nearest" together with the images)')
    target = target.long()
    wrong = target[(target != ignore_index) & ((target < 0) | (target >= num_classes))].unique()
    if wrong.numel():
        shown = ', '.join(str(v) for v in wrong[:8].tolist()) + (', ...' if wrong.numel() > 8 else '')
        raise ValueError(
            f'labels must be classes in [0, {num_classes}) or ignore_index={ignore_index}, got {shown}; map those '
            f'values to classes (ADE20K: reduce_zero_label turns 0 into 255 and 1-150 into 0-149), or pass the '
            f'ignore_index they mean')
    return target


def upernet(
        name: Optional[str] = None,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        head_channels: Optional[int] = None,
        dropout: Optional[float] = None,
        aux_head: bool = True,
        aux_channels: Optional[int] = None,
        frozen_stages: Optional[int] = None,
        norm_eval: Optional[bool] = None,
        extra_norm: Optional[bool] = None,
        preset_file: Optional[Union[str, Path]] = None,
        **model_kwargs: Any,
) -> UperNet:
    """An UperNet segmentation model on a zoo backbone (as in the BiFormer and CrossFormer ADE20K tables).

    Args:
        name: A model name or a segmentation preset ('biformer_small.ade20k_upernet', see
            ``list_presets('segmentation')``).
        num_classes: Output classes (the preset's, e.g. 150 for ADE20K, when None).
        pretrained: Load the backbone's ImageNet weights.
        out_indices: Stages fed to the head, each once, in increasing order; default (0, 1, 2, 3) (the auxiliary head
            reads level ``aux_index`` of them, 2 by default).
        head_channels: Channels of the UperNet decoder; default 512 (as in the official configs).
        dropout: Dropout before both classifiers; default 0.1.
        aux_head: Add the auxiliary FCN head on the stride-16 level (used in training only).
        aux_channels: Channels of the auxiliary head's conv; default 256.
        frozen_stages, norm_eval, extra_norm: As in ``fpn_backbone`` (defaults -1, False, True).
        preset_file: A segmentation preset of your own (a YAML file laid out as those in ``preset_files/``), instead
            of ``name``.
        **model_kwargs: Passed to ``timm.create_model``; they update the preset's.

    Returns:
        An ``UperNet``: (B, 3, H, W) images to (B, num_classes, H, W) logits; ``(logits, aux_logits)`` in training.
    """
    options = dict(out_indices=out_indices, frozen_stages=frozen_stages, norm_eval=norm_eval, extra_norm=extra_norm)
    model_name, settings, kwargs, preset = resolve_settings(name, 'segmentation', options, model_kwargs, preset_file)
    label = name or str(preset_file)
    num_classes = preset_num_classes('upernet', label, num_classes, preset)
    cfg = head_settings(
        label, preset, 'UperNet', _HEAD_DEFAULTS,
        dict(channels=head_channels, dropout=dropout, aux_channels=aux_channels))
    backbone = build_feature_backbone(model_name, pretrained, settings, **kwargs)
    channels: List[int] = backbone.channels
    head = UperNetHead(channels, num_classes, channels=cfg['channels'], dropout=cfg['dropout'])
    aux = None
    if aux_head:
        _check_aux_index(cfg['aux_index'], len(channels))
        aux = FCNHead(channels[cfg['aux_index']], num_classes, channels=cfg['aux_channels'],
                      num_convs=cfg['aux_num_convs'], dropout=cfg['dropout'])
    return UperNet(backbone, head, aux, aux_index=cfg['aux_index'], aux_loss_weight=cfg['aux_loss_weight'])
