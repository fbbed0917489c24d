"""``models.biformer``: official layouts, the timm model contract, input sizes (bad input: test_bad_input.py)."""
import pytest
import timm
import torch

from biformer_zoo.models.biformer import checkpoint_filter_fn
from official_layouts import save_official_checkpoint


MODELS = ['biformer_tiny', 'biformer_small', 'biformer_base', 'biformer_stl']
# (model name, tag, official layout file)
OFFICIAL_LAYOUTS = [
    ('biformer_tiny', 'in1k', 'biformer_tiny'),
    ('biformer_small', 'in1k', 'biformer_small'),
    ('biformer_base', 'in1k', 'biformer_base'),
    ('biformer_stl', 'in1k', 'biformer_stl'),
    ('biformer_stl', 'in1k_nchw', 'biformer_stl_nchw'),
]


def _tiny(**kwargs):
    return timm.create_model('biformer_tiny', **kwargs).eval()


@pytest.fixture(scope='module')
def eval_models():
    """One eval-mode instance per variant with a 7-class head, built once for the module."""
    return {name: timm.create_model(name, num_classes=7).eval() for name in MODELS}


@pytest.mark.parametrize('name,tag,layout', OFFICIAL_LAYOUTS)
def test_official_checkpoint_loads_strict(tmp_path, name, tag, layout):
    path = tmp_path / f'{layout}_in1k.pth'
    official = save_official_checkpoint(layout, path)
    model = timm.create_model(f'{name}.{tag}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    # strict: every official tensor has a home and every model tensor was filled
    mapped = checkpoint_filter_fn(dict(official), model)
    assert set(mapped) == {k for k in ours if not k.endswith('num_batches_tracked')}
    for key, value in mapped.items():
        torch.testing.assert_close(ours[key], value.reshape(ours[key].shape), rtol=0, atol=0, msg=key)


def test_official_nchw_checkpoint_into_legacy_model_is_refused(tmp_path):
    path = tmp_path / 'biformer_stl_nchw_in1k.pth'
    save_official_checkpoint('biformer_stl_nchw', path)
    with pytest.raises(RuntimeError, match='in1k_nchw'):
        timm.create_model('biformer_stl', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('cfg', ['in1k_nchw', 'cfg object', 'dict'])
def test_nchw_tag_applies_lepe_to_values_however_it_is_given(cfg):
    pretrained_cfg = timm.models.get_pretrained_cfg('biformer_stl.in1k_nchw')
    pretrained_cfg = {'in1k_nchw': 'in1k_nchw', 'cfg object': pretrained_cfg, 'dict': pretrained_cfg.to_dict()}[cfg]
    with torch.device('meta'):
        model = timm.create_model('biformer_stl', pretrained_cfg=pretrained_cfg)
    assert model.stages[3].blocks[0].attn.lepe_on_value


def test_pretrained_cfg():
    cfg = timm.create_model('biformer_small', pretrained=False).pretrained_cfg
    assert (cfg['hf_hub_id'], cfg['input_size'], cfg['crop_pct'], cfg['interpolation'], cfg['mean']) == (
        'biformer-zoo/biformer_small.in1k', (3, 224, 224), 0.875, 'bicubic', (0.485, 0.456, 0.406))


@pytest.mark.parametrize('name', MODELS)
def test_feature_info_reductions_and_channels(eval_models, name):
    model = eval_models[name]
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [(f.shape[1], 64 // f.shape[-1]) for f in feats] == [
        (info['num_chs'], info['reduction']) for info in model.feature_info]


def test_global_pool_none_keeps_map():
    model = timm.create_model('biformer_tiny', num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_blocks_run_on_contiguous_channels_last_maps():
    """Every block gets a contiguous (B, H, W, C) map; a permuted NCHW view makes each LayerNorm copy (perf, #7)."""
    model = timm.create_model('biformer_tiny').eval()
    seen = []
    for stage in model.stages:
        for block in stage.blocks:
            block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(seen) == sum(len(stage.blocks) for stage in model.stages) and all(seen)


def test_in_chans_adapts_first_conv_on_pretrained_load(tmp_path):
    path = tmp_path / 'biformer_tiny_in1k.pth'
    official = save_official_checkpoint('biformer_tiny', path)
    model = timm.create_model('biformer_tiny', pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
    expected = official['downsample_layers.0.0.weight'].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.stem[0].weight, expected)


@pytest.mark.parametrize('size,expected', [
    ((250, 333), [(63, 84), (32, 42), (16, 21), (8, 11)]),
    ((32, 32), [(8, 8), (4, 4), (2, 2), (1, 1)]),
    ((57, 201), [(15, 51), (8, 26), (4, 13), (2, 7)]),
])
def test_any_input_size(size, expected):
    model = timm.create_model('biformer_tiny', features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    assert [tuple(f.shape[-2:]) for f in feats] == expected and all(torch.isfinite(f).all() for f in feats)


def test_n_win_and_topk_at_create_time():
    model = timm.create_model('biformer_tiny', n_win=16, topks=(4, 8, 16, None)).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 128, 96), intermediates_only=True)
    attn = model.stages[0].blocks[0].attn
    assert (attn.num_regions, attn.topk, [f.shape[1] for f in feats]) == (16, 4, [64, 128, 256, 512])
