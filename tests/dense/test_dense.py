"""Dense prediction: the torchvision FPN backbone, detectors on it, Semantic FPN, presets and the C2f attention block.

Synthetic data at non-square sizes that are not multiples of 32; tiny models and detector settings to stay fast.
"""
import math
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

from biformer_zoo.layers import C2fAttention
from biformer_zoo.dense import FPNBackbone, fpn_backbone, load_preset, semantic_fpn
from biformer_zoo.layers import CrossScaleMerge

MODELS = ['biformer_tiny', 'crossformer_tiny']
IMAGE_SIZE = (75, 109)  # (H, W): neither a multiple of 32 nor square
FPN_CHANNELS = 32  # small FPN and detector heads keep the tests fast
# the detectors resize 90x150 images to 88x146 and pad them to multiples of 1 (torchvision pads to 32 by default)
DETECTOR_SIZES = dict(min_size=88, max_size=146, size_divisible=1)
TWO_STAGE_LIMITS = dict(
    rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32,
    rpn_batch_size_per_image=32, box_batch_size_per_image=16, box_detections_per_img=8)
DETECTORS = {
    'faster_rcnn': lambda backbone: FasterRCNN(backbone, num_classes=3, **DETECTOR_SIZES, **TWO_STAGE_LIMITS),
    'mask_rcnn': lambda backbone: MaskRCNN(backbone, num_classes=3, **DETECTOR_SIZES, **TWO_STAGE_LIMITS),
    'retinanet': lambda backbone: RetinaNet(backbone, num_classes=3, **DETECTOR_SIZES, detections_per_img=8),
    'fcos': lambda backbone: FCOS(backbone, num_classes=3, **DETECTOR_SIZES, detections_per_img=8),
}


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
    """One intra-op thread: these small models run faster without thread contention on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images_and_targets() -> tuple:
    torch.manual_seed(0)
    images = [torch.rand(3, 90, 150), torch.rand(3, 90, 150)]
    targets = []
    for box in ([10., 12., 70., 60.], [40., 20., 130., 85.]):
        masks = torch.zeros(1, 90, 150, dtype=torch.uint8)
        x0, y0, x1, y1 = (int(v) for v in box)
        masks[0, y0:y1, x0:x1] = 1
        targets.append(dict(boxes=torch.tensor([box]), labels=torch.tensor([1]), masks=masks))
    return images, targets


def _backbone_for(detector: str, name: str, **kwargs) -> FPNBackbone:
    if detector == 'retinanet':  # the RetinaNet recipe: stages 1-3 and P6/P7
        kwargs.update(out_indices=(1, 2, 3), extra_blocks='p6p7')
    return fpn_backbone(name, fpn_channels=FPN_CHANNELS, **kwargs)


def _first_param(module: nn.Module) -> nn.Parameter:
    return next(module.parameters())


# ---------------------------------------------------------------- the backbone


@pytest.mark.parametrize('name', MODELS)
def test_backbone_levels_match_feature_info(name: str):
    backbone = fpn_backbone(name, fpn_channels=FPN_CHANNELS)
    info = backbone.body.feature_info
    with torch.no_grad():
        levels = backbone.forward_backbone(torch.randn(1, 3, *IMAGE_SIZE))
    got = [(f.shape[1], f.shape[2], f.shape[3]) for f in levels]
    # each side is H / reduction rounded up or down
    expected_ok = [
        c == chans and abs(h - IMAGE_SIZE[0] / r) < 1 and abs(w - IMAGE_SIZE[1] / r) < 1
        for (c, h, w), chans, r in zip(got, info.channels(), info.reduction())]
    assert len(got) == 4 and all(expected_ok), (got, info.channels(), info.reduction())


@pytest.mark.parametrize('name', MODELS)
def test_fpn_levels_are_torchvision_layout(name: str):
    backbone = fpn_backbone(name, fpn_channels=FPN_CHANNELS)
    with torch.no_grad():
        x = torch.randn(1, 3, *IMAGE_SIZE)
        levels = backbone.forward_backbone(x)
        out = backbone(x)
    shapes = {k: tuple(v.shape[1:]) for k, v in out.items()}
    expected = {str(i): (FPN_CHANNELS, *f.shape[-2:]) for i, f in enumerate(levels)}
    last_h, last_w = levels[-1].shape[-2:]
    expected['pool'] = (FPN_CHANNELS, math.ceil(last_h / 2), math.ceil(last_w / 2))
    assert backbone.out_channels == FPN_CHANNELS and shapes == expected


def test_p6p7_levels_follow_the_last_stage():
    backbone = fpn_backbone('biformer_tiny', fpn_channels=FPN_CHANNELS, out_indices=(1, 2, 3), extra_blocks='p6p7')
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, *IMAGE_SIZE))
    assert list(out) == ['0', '1', '2', 'p6', 'p7'] and out['p7'].shape[-2:] == (1, 1)


# ---------------------------------------------------------------- detectors


@pytest.mark.parametrize('detector', ['faster_rcnn', 'retinanet', 'mask_rcnn'])
@pytest.mark.parametrize('name', MODELS)
def test_detector_train_step_reaches_backbone(name: str, detector: str):
    backbone = _backbone_for(detector, name)
    model = DETECTORS[detector](backbone).train()
    images, targets = _images_and_targets()
    losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    stem_grad = _first_param(backbone.body.model.stem).grad
    assert torch.isfinite(loss) and stem_grad is not None and stem_grad.abs().sum() > 0, losses


@pytest.mark.parametrize('detector', ['faster_rcnn', 'retinanet', 'mask_rcnn'])
@pytest.mark.parametrize('name', MODELS)
def test_detector_eval_outputs(name: str, detector: str):
    model = DETECTORS[detector](_backbone_for(detector, name)).eval()
    images, _ = _images_and_targets()
    with torch.no_grad():
        outputs = model(images)
    expected_keys = {'boxes', 'labels', 'scores'} | ({'masks'} if detector == 'mask_rcnn' else set())
    ok = [set(o) == expected_keys and o['boxes'].shape[1] == 4 and len(o['boxes']) == len(o['scores'])
          for o in outputs]
    assert len(outputs) == 2 and all(ok), [{k: v.shape for k, v in o.items()} for o in outputs]


def test_fcos_train_step_is_finite():
    model = DETECTORS['fcos'](_backbone_for('fcos', 'biformer_tiny')).train()
    images, targets = _images_and_targets()
    losses = model(images, targets)
    assert torch.isfinite(sum(losses.values())), losses


# ---------------------------------------------------------------- frozen stages and norm_eval


@pytest.mark.parametrize('name', MODELS)
def test_frozen_stages_get_no_gradients_and_stay_in_eval(name: str):
    backbone = fpn_backbone(name, fpn_channels=FPN_CHANNELS, frozen_stages=2)
    model = DETECTORS['faster_rcnn'](backbone).train()
    images, targets = _images_and_targets()
    sum(model(images, targets).values()).backward()
    trunk = backbone.body.model
    frozen = [trunk.stem, trunk.stages[0], trunk.stages[1], backbone.extra_norms[0], backbone.extra_norms[1]]
    frozen_ok = all(not p.requires_grad and p.grad is None for m in frozen for p in m.parameters())
    frozen_eval = all(not m.training for f in frozen for m in f.modules())
    trained_grad = _first_param(trunk.stages[2]).grad
    assert frozen_ok and frozen_eval and trained_grad is not None and trained_grad.abs().sum() > 0


def test_frozen_stages_out_of_range_raises():
    with pytest.raises(ValueError, match='frozen_stages'):
        fpn_backbone('biformer_tiny', fpn_channels=FPN_CHANNELS, frozen_stages=5)


def test_norm_eval_keeps_batchnorm_statistics():
    backbone = fpn_backbone('biformer_tiny', fpn_channels=FPN_CHANNELS, norm_eval=True).train()
    batchnorms = [m for m in backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in batchnorms]
    backbone(torch.randn(2, 3, *IMAGE_SIZE))
    unchanged = all(torch.equal(b, bn.running_mean) for b, bn in zip(before, batchnorms))
    assert len(batchnorms) > 0 and unchanged and backbone.training


def test_extra_norm_off_feeds_stages_straight_to_fpn():
    backbone = fpn_backbone('biformer_tiny', fpn_channels=FPN_CHANNELS, extra_norm=False)
    x = torch.randn(1, 3, *IMAGE_SIZE)
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(backbone.forward_backbone(x), backbone.body(x)))
    assert backbone.extra_norms is None and same


# ---------------------------------------------------------------- presets


def test_detection_preset_sets_official_backbone_options():
    with torch.device('meta'):
        backbone = fpn_backbone('biformer_small.coco_maskrcnn')
    attn = backbone.body.model.stages[0].blocks[0].attn
    got = (attn.num_regions, backbone.norm_eval, backbone.extra_norms is not None, backbone.out_channels)
    assert got == (16, True, True, 256)


def test_explicit_argument_overrides_preset():
    with torch.device('meta'):
        backbone = fpn_backbone('biformer_small.coco_maskrcnn', norm_eval=False, fpn_channels=64, n_win=8)
    attn = backbone.body.model.stages[0].blocks[0].attn
    assert (attn.num_regions, backbone.norm_eval, backbone.out_channels) == (8, False, 64)


def test_segmentation_preset_sets_classes_and_groups():
    preset = load_preset('crossformerpp_small.ade20k_sfpn')
    with torch.device('meta'):
        model = semantic_fpn('crossformerpp_small.ade20k_sfpn')
    attn = model.backbone.body.model.stages[0].blocks[0].attn
    got = (model.head.classifier.out_channels, attn.group_size, attn.interval, model.backbone.extra_norms)
    assert got == (preset['num_classes'], 7, 8, None)


def test_preset_file_of_ones_own_sets_its_options(tmp_path):
    path = tmp_path / 'mine.yaml'
    path.write_text('task: detection\nmodel: biformer_tiny\nbackbone:\n  fpn_channels: 32\nmodel_kwargs:\n  n_win: 4\n')
    with torch.device('meta'):
        backbone = fpn_backbone(preset_file=path)
    assert (backbone.out_channels, backbone.body.model.stages[0].blocks[0].attn.num_regions) == (32, 4)


def test_preset_of_the_other_task_raises():
    with pytest.raises(ValueError, match='segmentation preset'):
        fpn_backbone('biformer_small.ade20k_sfpn')


def test_unknown_name_raises():
    with pytest.raises(ValueError, match='neither a timm model nor a preset'):
        fpn_backbone('biformer_gigantic')


# ---------------------------------------------------------------- semantic segmentation


@pytest.mark.parametrize('name', MODELS)
def test_semantic_fpn_train_step(name: str):
    torch.manual_seed(0)
    model = semantic_fpn(name, num_classes=5, fpn_channels=FPN_CHANNELS, head_channels=16).train()
    images = torch.randn(2, 3, *IMAGE_SIZE)
    labels = torch.randint(0, 5, (2, *IMAGE_SIZE))
    logits = model(images)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    stem_grad = _first_param(model.backbone.body.model.stem).grad
    assert logits.shape == (2, 5, *IMAGE_SIZE) and torch.isfinite(loss) and stem_grad.abs().sum() > 0


def test_semantic_fpn_takes_out_indices():
    with torch.device('meta'):
        model = semantic_fpn('biformer_tiny', num_classes=3, out_indices=(1, 2, 3))
    assert (model.backbone.channels, len(model.head.scale_heads)) == ([128, 256, 512], 3)


def test_semantic_fpn_needs_num_classes_without_preset():
    with pytest.raises(ValueError, match='num_classes'):
        semantic_fpn('biformer_tiny')


# ---------------------------------------------------------------- the YOLO-style block


@pytest.mark.parametrize('attention, kwargs', [
    ('bra', dict(num_regions=4, topk=4)),
    ('lsda', dict(group_size=4, interval=2, long_distance=True)),
])
def test_c2f_attention_block_trains(attention: str, kwargs: Dict):
    torch.manual_seed(0)
    block = C2fAttention(16, 24, depth=2, attention=attention, num_heads=2, expansion=1.0, **kwargs)
    x = torch.randn(4, 16, 21, 27)  # NCHW, odd sizes
    target = torch.randn(4, 24, 21, 27)
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-2)
    losses: List[float] = []
    for _ in range(8):
        loss = nn.functional.mse_loss(block(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_c2f_attention_rejects_heads_that_do_not_divide_channels():
    with pytest.raises(ValueError, match='num_heads'):
        C2fAttention(16, 24, attention='bra', num_heads=5)


def test_cross_scale_merge_downsamples_nchw_maps_in_a_conv_net():
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), CrossScaleMerge(16, 32, channels_last=False),
        C2fAttention(32, 32, attention='lsda', num_heads=2, group_size=4))
    out = net(torch.randn(2, 3, 21, 27))
    out.mean().backward()
    assert out.shape == (2, 32, 11, 14) and net[1].reductions[0].weight.grad is not None
