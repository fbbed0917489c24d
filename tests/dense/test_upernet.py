"""UperNet: the presets of the official configs, their head sizes against mmseg's definitions, training and eval.

Parameter counts build on the meta device; the training steps use the official heads on reduced-depth backbones at a
non-square 128x160 input.
"""
import subprocess
import sys
from typing import Any, Dict, Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from biformer_zoo.dense import FCNHead, UperNet, UperNetHead, list_presets, load_preset, semantic_fpn, upernet
from test_dense import one_torch_thread  # noqa: F401  (the autouse fixture: one thread for these small models)

# the models with an UperNet config in the official repositories (BiFormer semantic_segmentation/configs/ade20k,
# CrossFormer segmentation/configs on the crossformer and main branches)
OFFICIAL_UPERNET = [
    'biformer_small', 'biformer_base', 'crossformer_small', 'crossformer_base', 'crossformer_large',
    'crossformerpp_small']
PRESETS = [f'{name}.ade20k_upernet' for name in OFFICIAL_UPERNET]
IMAGE_SIZE = (128, 160)  # (H, W): not square
SHALLOW = dict(depths=(1, 1, 1, 1))  # the preset's backbone arguments, one block per stage


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def official_head_params(in_channels: Sequence[int], head: Dict[str, Any], num_classes: int) -> Dict[str, int]:
    """Parameters of mmseg's ``UPerHead`` and auxiliary ``FCNHead`` with the settings of an official config.

    From their definitions (mmseg ``decode_heads/uper_head.py``, ``psp_head.py``, ``fcn_head.py``): every conv is an
    mmcv ``ConvModule`` with a norm (conv without bias, BatchNorm weight and bias); ``conv_seg`` is a 1x1 conv with
    bias. PPM scales 1, 2, 3, 6.
    """
    def conv_module(c_in: int, c_out: int, kernel: int) -> int:
        return kernel * kernel * c_in * c_out + 2 * c_out

    def conv_seg(c_in: int) -> int:
        return c_in * num_classes + num_classes

    ch, last, num_scales = head['channels'], in_channels[-1], 4
    decode = (num_scales * conv_module(last, ch, 1)  # PPM
              + conv_module(last + num_scales * ch, ch, 3)  # bottleneck after the PPM
              + sum(conv_module(c, ch, 1) for c in in_channels[:-1])  # lateral_convs
              + (len(in_channels) - 1) * conv_module(ch, ch, 3)  # fpn_convs
              + conv_module(len(in_channels) * ch, ch, 3)  # fpn_bottleneck
              + conv_seg(ch))
    aux_ch = head['aux_channels']
    aux = (conv_module(in_channels[head['aux_index']], aux_ch, 3)
           + (head['aux_num_convs'] - 1) * conv_module(aux_ch, aux_ch, 3) + conv_seg(aux_ch))
    return dict(head_params=decode, aux_head_params=aux)


# ---------------------------------------------------------------- presets


def test_upernet_presets_cover_the_official_configs():
    listed = [p for p in list_presets('segmentation') if p.endswith('.ade20k_upernet')]
    decoders = {load_preset(p)['head']['decoder'] for p in listed}
    assert sorted(listed) == sorted(PRESETS) and decoders == {'UperNet'}


@pytest.mark.parametrize('preset', PRESETS)
def test_preset_builds_with_the_official_head_sizes(preset: str):
    config = load_preset(preset)
    with torch.device('meta'):
        model = upernet(preset)
    recorded = {k: config['official'][k] for k in ('head_params', 'aux_head_params')}
    official = official_head_params(model.backbone.channels, config['head'], config['num_classes'])
    ours = dict(head_params=_num_params(model.head), aux_head_params=_num_params(model.aux_head))
    assert ours == recorded == official, (ours, recorded, official)


@pytest.mark.parametrize('preset', [p for p in PRESETS if 'params_M' in load_preset(p)['official']])
def test_preset_total_params_match_the_reported_ones(preset: str):
    with torch.device('meta'):
        model = upernet(preset)
    reported = load_preset(preset)['official']['params_M']  # rounded to 0.1M in the official table
    assert abs(_num_params(model) / 1e6 - reported) <= 0.05, (_num_params(model), reported)


@pytest.mark.parametrize('preset', PRESETS)
def test_preset_carries_the_backbone_arguments(preset: str):
    config = load_preset(preset)
    with torch.device('meta'):
        model = upernet(preset)
    kwargs = config['model_kwargs']
    trunk = model.backbone.body.model
    attn = trunk.stages[0].blocks[0].attn
    if preset.startswith('biformer'):
        got = dict(n_win=attn.num_regions, topks=[b.attn.topk if hasattr(b.attn, 'topk') else None
                                                  for b in (s.blocks[0] for s in trunk.stages)])
        expected = dict(n_win=kwargs['n_win'], topks=kwargs['topks'])
    else:
        got = dict(group_size=attn.group_size, interval=attn.interval)
        expected = dict(group_size=kwargs['group_size'][0], interval=kwargs['interval'][0])
    drop_paths = [m.drop_prob for m in trunk.modules() if hasattr(m, 'drop_prob')]
    has_norms = model.backbone.extra_norms is not None
    assert (got, max(drop_paths), has_norms) == (expected, pytest.approx(kwargs['drop_path_rate']),
                                                 config['backbone']['extra_norm'])


def test_presets_of_the_other_head_raise():
    with pytest.raises(ValueError, match='SemanticFPN head, not UperNet.*ade20k_upernet'):
        upernet('biformer_small.ade20k_sfpn')
    with pytest.raises(ValueError, match='UperNet head, not SemanticFPN.*ade20k_sfpn'):
        semantic_fpn('biformer_small.ade20k_upernet')


def test_detection_preset_and_unknown_name_raise():
    with pytest.raises(ValueError, match='detection preset'):
        upernet('biformer_small.coco_maskrcnn')
    with pytest.raises(ValueError, match='neither a timm model nor a preset'):
        upernet('biformer_small.ade20k_upernett')


def test_explicit_arguments_override_the_preset():
    with torch.device('meta'):
        model = upernet('crossformer_small.ade20k_upernet', num_classes=19, head_channels=256, aux_channels=64,
                        frozen_stages=1, norm_eval=True, extra_norm=True, drop_path_rate=0.1)
    drop_paths = [m.drop_prob for m in model.backbone.body.model.modules() if hasattr(m, 'drop_prob')]
    got = (model.head.classifier.out_channels, model.head.classifier.in_channels,
           model.aux_head.classifier.in_channels, model.backbone.frozen_stages, model.backbone.norm_eval,
           model.backbone.extra_norms is not None, max(drop_paths))
    assert got == (19, 256, 64, 1, True, True, pytest.approx(0.1))


# ---------------------------------------------------------------- training and eval


@pytest.mark.parametrize('preset', ['biformer_small.ade20k_upernet', 'crossformer_small.ade20k_upernet'])
def test_train_step_with_the_auxiliary_head(preset: str):
    torch.manual_seed(0)
    model = upernet(preset, **SHALLOW).train()
    images = torch.randn(2, 3, *IMAGE_SIZE)
    labels = torch.randint(0, 150, (2, *IMAGE_SIZE))
    labels[:, :8] = 255  # ignored pixels, as the padding of the official crops
    logits, aux_logits = model(images)
    loss = model.loss((logits, aux_logits), labels)
    loss.backward()
    grads = [_first_grad(m) for m in (model.backbone.body.model.stem, model.head, model.aux_head)]
    shapes = (logits.shape, aux_logits.shape)
    expected_shapes = ((2, 150, *IMAGE_SIZE),) * 2
    assert torch.isfinite(loss) and shapes == expected_shapes and all(g > 0 for g in grads), (loss, shapes, grads)


def _first_grad(module: nn.Module) -> float:
    grad = next(module.parameters()).grad
    return 0. if grad is None else grad.abs().sum().item()


def test_eval_returns_logits_at_input_size():
    torch.manual_seed(0)
    model = upernet('crossformerpp_small.ade20k_upernet', head_channels=64, aux_channels=32, **SHALLOW).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 75, 109))  # neither square nor a multiple of 32
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 150, 75, 109) and torch.isfinite(logits).all()


def test_loss_averages_over_all_pixels_as_mmseg():
    model = upernet('biformer_tiny', num_classes=3, head_channels=16, aux_channels=8, **SHALLOW)
    torch.manual_seed(0)
    logits, aux_logits = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    kept = labels != 255

    def mean_over_all(x: torch.Tensor) -> torch.Tensor:  # ignored pixels count as zero, as in mmseg
        per_pixel = -x.log_softmax(1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
        return (per_pixel * kept).sum() / labels.numel()

    expected = mean_over_all(logits) + 0.4 * mean_over_all(aux_logits)
    got = (model.loss((logits, aux_logits), labels), model.loss(logits, labels))
    assert torch.allclose(got[0], expected) and torch.allclose(got[1], mean_over_all(logits))


def test_loss_takes_labels_with_a_channel_axis_and_any_integer_dtype():
    model = upernet('biformer_tiny', num_classes=3, head_channels=16, aux_channels=8, **SHALLOW)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    assert torch.equal(model.loss(logits, labels[:, None].to(torch.uint8)), model.loss(logits, labels))


def test_one_image_trains_with_the_heads_batchnorms_in_eval():
    """The fix the batch-1 error names: the head's BatchNorms in eval mode, the rest training."""
    model = upernet('biformer_tiny', num_classes=3, head_channels=16, aux_channels=8, **SHALLOW).train()
    model.head.eval()
    logits, aux_logits = model(torch.randn(1, 3, 64, 64))
    model.loss((logits, aux_logits), torch.zeros(1, 64, 64, dtype=torch.long)).backward()
    assert _first_grad(model.backbone.body.model.stem) > 0


def test_without_auxiliary_head_training_returns_logits():
    model = upernet('biformer_tiny', num_classes=4, head_channels=16, aux_head=False, **SHALLOW).train()
    logits = model(torch.randn(2, 3, 64, 96))
    assert model.aux_head is None and isinstance(logits, torch.Tensor) and logits.shape == (2, 4, 64, 96)


# ---------------------------------------------------------------- bad input


def test_bad_arguments_raise_value_errors():
    for build, match in [
            (lambda: upernet('biformer_tiny'), 'needs num_classes'),
            (lambda: upernet('biformer_tiny', num_classes=0), 'num_classes must be >= 1'),
            (lambda: UperNetHead([64], 3), 'at least two input levels'),
            (lambda: FCNHead(64, 3, num_convs=0), 'num_convs must be >= 1')]:
        with pytest.raises(ValueError, match=match):
            with torch.device('meta'):
                build()
    with torch.device('meta'):
        model = upernet('biformer_tiny', num_classes=3, head_channels=16, aux_channels=8, **SHALLOW)
    with pytest.raises(ValueError, match='reads backbone level 4'):
        UperNet(model.backbone, model.head, model.aux_head, aux_index=4)


def test_head_given_wrong_channels_names_the_fix():
    head = UperNetHead([8, 16, 32, 64], num_classes=3, channels=16)
    features = [torch.randn(2, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate([8, 16, 32, 48])]
    with pytest.raises(ValueError, match=r'in_channels=\[8, 16, 32, 48\]'):
        head(features)
    with pytest.raises(ValueError, match='in_channels=48'):
        FCNHead(32, 3, channels=8)(features[-1])


def test_import_does_not_need_segmentation_models_pytorch():
    """Without smp, ``import biformer_zoo.dense`` and Semantic FPN work; UperNet names the extra to install."""
    code = (
        "import sys; sys.modules['segmentation_models_pytorch'] = None\n"
        "import torch, biformer_zoo, biformer_zoo.dense as dense\n"
        "with torch.device('meta'):\n"
        "    dense.semantic_fpn('biformer_tiny', num_classes=3)\n"
        "    try:\n"
        "        dense.upernet('biformer_tiny', num_classes=3)\n"
        "    except ImportError as e:\n"
        "        print(e)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'biformer-zoo[seg]' in out.stdout, out.stderr[-2000:]


@torch.no_grad()
def test_head_matches_a_functional_uperhead():
    """Same outputs as UPerHead written out from mmseg's forward, with the head's own weights (eval mode)."""
    torch.manual_seed(0)
    in_channels, ch = [8, 16, 32, 64], 16
    head = UperNetHead(in_channels, num_classes=5, channels=ch).eval()
    for m in head.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    features = [torch.randn(2, c, 24 // 2 ** i, 28 // 2 ** i) for i, c in enumerate(in_channels)]
    d = head.decoder

    def resize(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode='bilinear', align_corners=False)

    last = features[-1]
    psp = d.psp.out_conv(torch.cat([last] + [resize(b(last), last.shape[-2:]) for b in d.psp.blocks], 1))
    laterals = [b.conv_norm_relu(f) for b, f in zip(d.fpn_lateral_blocks[::-1], features[:-1])] + [psp]
    for i in range(len(laterals) - 1, 0, -1):  # top-down sums
        laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
    outs = [conv(x) for conv, x in zip(d.fpn_conv_blocks[::-1], laterals[:-1])] + [laterals[-1]]
    outs = [outs[0]] + [resize(x, outs[0].shape[-2:]) for x in outs[1:]]
    expected = head.classifier(d.fusion_block(torch.cat(outs, 1)))
    assert torch.allclose(head(features), expected, atol=1e-5)
