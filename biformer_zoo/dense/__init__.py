"""Detection and segmentation on top of the zoo backbones: a torchvision FPN backbone, Semantic FPN and UperNet.

``fpn_backbone`` returns a module that torchvision's detectors (``FasterRCNN``, ``MaskRCNN``, ``RetinaNet``,
``FCOS``, ...) take as their ``backbone``: it has ``out_channels`` and returns an ``OrderedDict`` of FPN maps
(``'0'``, ``'1'``, ... from the finest level, then ``'pool'`` or ``'p6'``/``'p7'``).

The backbone options follow the mmdet/mmseg recipes of the official results:

* ``frozen_stages=k`` freezes the stem and stages ``0..k-1`` (their downsampling layers included, and the extra
  norms of those levels): no gradients, and kept in eval mode, like mmdet's ``frozen_stages``; 0 freezes the stem
  only, -1 nothing;
* ``norm_eval=True`` keeps every BatchNorm of the backbone in eval mode while training (BiFormer has BatchNorm in
  its stem and downsampling layers; the official BiFormer detection backbone does this);
* ``extra_norm=True`` adds a LayerNorm per output level before the FPN or head, as the official BiFormer dense
  backbones do (the official CrossFormer ones do not).

The official settings are presets, stored as YAML in ``biformer_zoo/dense/preset_files`` and loaded by name:
``fpn_backbone('biformer_small.coco_maskrcnn')`` builds BiFormer-S with ``n_win=16`` and the official backbone
options; any argument given explicitly overrides the preset. ``list_presets()`` names them; a name is never read as
a path. A preset of one's own (a YAML file laid out the same way) goes through ``preset_file=``.

The two segmentation models of the BiFormer and CrossFormer ADE20K tables return per-pixel logits at input
resolution:

* ``semantic_fpn`` (presets ``*.ade20k_sfpn``): the Semantic FPN of Kirillov et al. (mmseg ``FPNHead``);
* ``upernet`` (presets ``*.ade20k_upernet``): UperNet (mmseg ``UPerHead``, built on ``segmentation_models_pytorch``'s
  decoder, an optional dependency: ``pip install "biformer-zoo[seg]"``), with the auxiliary FCN head of the
  official recipe, whose logits it also returns in training mode.
"""
from .backbones import EXTRA_BLOCKS, FeatureBackbone, FPNBackbone, fpn_backbone
from .fpn import SemanticFPN, SemanticFPNHead, conv_norm_act, semantic_fpn
from .presets import PRESET_DIR, list_presets, load_preset, load_preset_file
from .upernet import FCNHead, UperNet, UperNetHead, upernet

__all__ = [
    'FeatureBackbone', 'FPNBackbone', 'SemanticFPN', 'SemanticFPNHead', 'UperNet', 'UperNetHead', 'FCNHead',
    'fpn_backbone', 'semantic_fpn', 'upernet', 'list_presets', 'load_preset', 'load_preset_file', 'conv_norm_act',
    'PRESET_DIR', 'EXTRA_BLOCKS',
]
