"""``models.crossformer``: official layouts, pretrained cfgs, any input size, no state changed by forward (the
attention layers: tests/layers/test_lsda.py, test_embed.py; bad input: test_bad_input.py)."""
import copy

import pytest
import timm
import torch

from biformer_zoo.models.crossformer import checkpoint_filter_fn
from model_utils import randomize, reference_lsda
from official_layouts import official_layout, save_official_checkpoint


MODELS = [
    'crossformer_tiny', 'crossformer_small', 'crossformer_base', 'crossformer_large',
    'crossformerpp_small', 'crossformerpp_base', 'crossformerpp_large', 'crossformerpp_huge',
]
SMALL_MODELS = ['crossformer_tiny', 'crossformerpp_small']
# (model name, official layout file): the T/S/B/L releases come from the old branch, ++ from main
OFFICIAL_LAYOUTS = [(name, name) for name in MODELS] + [('crossformer_small', 'crossformer_small_oldbranch')]
# the public pretrained path, one per official layout (the main-branch v1 layout: in_chans test below)
LOADED_LAYOUTS = [('crossformer_small', 'crossformer_small_oldbranch'), ('crossformerpp_small', 'crossformerpp_small')]


def _model(name='crossformer_tiny', **kwargs):
    return timm.create_model(name, **kwargs).eval()


def _shallow(name='crossformer_tiny', **kwargs):
    """The same family, narrower and with fewer blocks (SDA, LDA and a cooling layer still in it): cheap to run."""
    return _model(name, **dict(dict(embed_dim=32, depths=(1, 1, 4, 2), num_heads=(2, 4, 8, 16)), **kwargs))


@pytest.fixture(scope='module')
def tiny():
    return _shallow('crossformer_tiny')


@pytest.fixture(scope='module')
def pp_small():
    return _shallow('crossformerpp_small')


@pytest.fixture(scope='module')
def small_models(tiny, pp_small):
    return {'crossformer_tiny': tiny, 'crossformerpp_small': pp_small}


# ---------------------------------------------------------------------------------------------------------------
# architecture and official checkpoints


@pytest.mark.parametrize('name,layout', OFFICIAL_LAYOUTS)
def test_official_layout_maps_onto_model(name, layout):
    with torch.device('meta'):
        model = timm.create_model(name)
    official = {k: torch.empty(shape, device='meta') for k, (shape, _) in official_layout(layout).items()}
    mapped = {k: tuple(v.shape) for k, v in checkpoint_filter_fn(official, model).items()}
    assert mapped == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name,layout', LOADED_LAYOUTS)
def test_official_checkpoint_loads_strict(tmp_path, name, layout):
    path = tmp_path / f'{layout}.pth'
    official = save_official_checkpoint(layout, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    mapped = checkpoint_filter_fn(dict(official), model)
    assert set(mapped) == set(ours) and all(torch.equal(ours[k], v) for k, v in mapped.items())


def test_own_layout_passes_through(tmp_path):
    source = randomize(_shallow())
    path = tmp_path / 'ours.pth'
    torch.save(source.state_dict(), path)
    model = _shallow(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_in_chans_adapts_every_first_conv_on_pretrained_load(tmp_path):
    path = tmp_path / 'crossformer_tiny.pth'
    official = save_official_checkpoint('crossformer_tiny', path)
    model = timm.create_model('crossformer_tiny', pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for i, proj in enumerate(model.stem.projs):
        torch.testing.assert_close(proj.weight, official[f'patch_embed.projs.{i}.weight'].sum(dim=1, keepdim=True))


@pytest.mark.parametrize('name,paper', [('crossformer_small', 'arXiv:2108.00154'),
                                        ('crossformerpp_small', 'arXiv:2303.06908')])
def test_pretrained_cfg(name, paper):
    cfg = timm.models.get_pretrained_cfg(f'{name}.in1k').to_dict()
    assert (cfg['hf_hub_id'], cfg['input_size'], cfg['crop_pct'], cfg['interpolation'], cfg['mean'],
            cfg['paper_ids'], cfg['license']) == (
        f'biformer-zoo/{name}.in1k', (3, 224, 224), 0.875, 'bicubic', (0.485, 0.456, 0.406), paper, 'mit')


def test_img_size_sets_only_the_pretrained_cfg():
    default = randomize(_shallow())
    resized = _shallow(img_size=(256, 320))
    resized.load_state_dict(default.state_dict())
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        same = torch.equal(resized(x), default(x))
    assert resized.pretrained_cfg['input_size'] == (3, 256, 320) and same


# ---------------------------------------------------------------------------------------------------------------
# any input size, no state changed by forward


@pytest.mark.parametrize('size,expected', [
    ((250, 333), [(62, 83), (31, 42), (16, 21), (8, 11)]),
    ((32, 32), [(8, 8), (4, 4), (2, 2), (1, 1)]),
    ((37, 129), [(9, 32), (5, 16), (3, 8), (2, 4)]),
])
@pytest.mark.parametrize('name', SMALL_MODELS)
def test_any_input_size(small_models, name, size, expected):
    with torch.no_grad():
        feats = small_models[name].forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == expected and all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_forward_changes_no_state(small_models, name):
    model = small_models[name]
    x = torch.randn(1, 3, 256, 256)  # stage maps larger than the groups: LDA runs in every stage
    with torch.no_grad():
        before = model(x)
        model(torch.randn(1, 3, 32, 48))  # small maps take the one-group rule
        after = model(x)
    assert torch.equal(before, after)


def test_padding_does_not_leak_into_real_tokens(pp_small):
    """A model's attention layer on a map that needs padding equals the reference attention, which never pads
    (float64)."""
    attn = randomize(copy.deepcopy(pp_small.stages[2].blocks[1].attn)).double()  # LDA, G=14: 20x30 pads to 28x42
    x = torch.randn(1, 30, 20, attn.qkv.in_features, dtype=torch.float64).permute(0, 3, 2, 1)  # (B, C, H, W) view
    with torch.no_grad():
        fast = attn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(fast, reference_lsda(attn, x))


def test_train_then_eval_uses_updated_position_bias():
    torch.manual_seed(0)
    model = _shallow(num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)  # caches the position biases
    model.train()
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    model(x).sum().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    model.eval()
    fresh = _shallow(num_classes=3)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_dtype_change_after_caching():
    model = _shallow()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        model.double()
        fresh = _shallow().double()
        fresh.load_state_dict(model.state_dict())
        out, expected = model(x.double()), fresh(x.double())
    assert out.dtype == torch.float64 and torch.equal(out, expected)


def test_autocast_call_does_not_leave_a_low_precision_bias_in_the_cache():
    model, fresh = _shallow(), _shallow()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)  # fills the cache first, under autocast
        assert torch.equal(model(x), fresh(x))


def test_layer_norms_use_the_official_eps():
    """The official code uses nn.LayerNorm's default eps everywhere, the final norm included."""
    model = _shallow('crossformerpp_small')
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
