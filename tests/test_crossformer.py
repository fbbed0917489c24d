"""CrossFormer family: official layouts, grouped attention against a plain reference, sizes, state, timm contract."""
import copy
import pickle
import threading

import pytest
import timm
import torch

import biformer_zoo  # noqa: F401
from biformer_zoo.layers import CrossScaleEmbed, CrossScaleMerge, LSDAttention
from biformer_zoo.layers.lsda import group_layout
from biformer_zoo.models.crossformer import checkpoint_filter_fn
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


def _randomize(module, seed=0):
    """Random values everywhere (norm weights around 1), so that no parameter can be silently ignored."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 and name.endswith('weight') else 0.1 * noise)
    return module


# ---------------------------------------------------------------------------------------------------------------
# grouped attention: the fast path equals a plain per-group reference that never sees padding


def reference_lsda(layer: LSDAttention, x: torch.Tensor) -> torch.Tensor:
    """SDA/LDA on a (B, C, H, W) map, one group at a time, using only the real tokens of each group.

    The dynamic position bias is evaluated at each pair's (dy, dx) offset inside the group.
    """
    B, C, H, W = x.shape
    group_h, group_w, interval = group_layout(
        H, W, layer.group_size, layer.interval, layer.long_distance, layer.group_rule)
    region_h, region_w = group_h * interval, group_w * interval
    heads, head_dim = layer.num_heads, C // layer.num_heads
    tokens = x.permute(0, 2, 3, 1)
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    for top in range(0, H, region_h):
        for left in range(0, W, region_w):
            for dy in range(interval):
                for dx in range(interval):
                    cells = [(a, b, top + dy + a * interval, left + dx + b * interval)
                             for a in range(group_h) for b in range(group_w)]
                    cells = [c for c in cells if c[2] < H and c[3] < W]  # drop padding
                    if not cells:
                        continue
                    ys, xs = [c[2] for c in cells], [c[3] for c in cells]
                    grid = torch.tensor([[c[0], c[1]] for c in cells], dtype=x.dtype)  # (n, 2) group coords
                    offsets = (grid[:, None] - grid[None]).reshape(-1, 2)
                    bias = layer.pos(offsets).view(len(cells), len(cells), heads).permute(2, 0, 1)
                    q, k, v = layer.qkv(tokens[:, ys, xs]).view(B, len(cells), 3, heads, head_dim).unbind(2)
                    scores = torch.einsum('bihd,bjhd->bhij', q, k) * layer.scale + bias
                    mixed = torch.einsum('bhij,bjhd->bihd', scores.softmax(-1), v).reshape(B, len(cells), C)
                    out[:, ys, xs] = layer.proj(mixed)
    return out.permute(0, 3, 1, 2)


ATTENTION_CASES = [  # (group_rule, long_distance, H, W, group_size, interval)
    ('crossformer', False, 14, 14, 7, 2),     # SDA, no padding
    ('crossformer', True, 14, 14, 7, 2),      # LDA, groups span the map
    ('crossformer', False, 10, 17, 4, 3),     # SDA with padding
    ('crossformer', True, 10, 17, 4, 3),      # LDA, 4x6 groups, padding
    ('crossformer', True, 5, 9, 7, 2),        # small map: one SDA group of min(H, W)
    ('crossformerpp', True, 10, 17, 3, 2),    # LDA tiled over 6x6 regions, padding
    ('crossformerpp', True, 7, 17, 3, 2),     # some groups are all padding
    ('crossformerpp', False, 5, 9, 7, 2),     # small map: one SDA group of max(H, W)
]


@pytest.mark.parametrize('cached', [False, True])
@pytest.mark.parametrize('rule,long_distance,H,W,group_size,interval', ATTENTION_CASES)
def test_lsda_equals_reference(rule, long_distance, H, W, group_size, interval, cached):
    layer = _randomize(LSDAttention(
        32, 2, group_size=group_size, interval=interval, long_distance=long_distance, group_rule=rule)).double()
    x = torch.randn(2, 32, H, W, dtype=torch.float64)
    layer.train(not cached)  # eval + no_grad takes the cached position bias
    with torch.set_grad_enabled(not cached):
        fast = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(fast.detach(), reference_lsda(layer, x))


@pytest.mark.parametrize('train_bias', [True, False])  # explicit attention on CPU / SDPA with a constant bias
def test_lsda_gradients_equal_reference(train_bias):
    layer = _randomize(LSDAttention(16, 2, group_size=3, interval=2, long_distance=True,
                                    group_rule='crossformerpp')).double()
    layer.pos.requires_grad_(train_bias)
    x = torch.randn(1, 16, 7, 8, dtype=torch.float64, requires_grad=True)
    inputs = [x, layer.qkv.weight] + ([layer.pos.pos_proj.weight] if train_bias else [])
    fast = torch.autograd.grad(layer(x).square().sum(), inputs)
    ref = torch.autograd.grad(reference_lsda(layer, x).square().sum(), inputs)
    torch.testing.assert_close(fast, ref)


def test_lsda_channels_last_equals_nchw():
    nchw = _randomize(LSDAttention(16, 2, group_size=3, long_distance=False)).eval()
    nhwc = LSDAttention(16, 2, group_size=3, long_distance=False, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(1, 16, 7, 10)
    with torch.no_grad():
        torch.testing.assert_close(nchw(x), nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.mark.parametrize('args,expected', [
    # (H, W, G, I, long_distance, rule) -> (group_h, group_w, interval), values of the official code at 224
    ((56, 56, 7, 8, True, 'crossformer'), (7, 7, 8)),
    ((28, 28, 7, 4, False, 'crossformer'), (7, 7, 1)),
    ((7, 7, 7, 1, True, 'crossformer'), (7, 7, 1)),
    ((56, 56, 4, 4, True, 'crossformerpp'), (4, 4, 4)),
    ((14, 14, 14, 1, True, 'crossformerpp'), (14, 14, 1)),
    # detection backbones at other sizes: old branch spans the map, main tiles G x G groups
    ((60, 80, 7, 8, True, 'crossformer'), (8, 10, 8)),
    ((7, 10, 7, 1, True, 'crossformer'), (7, 7, 1)),
    ((7, 10, 7, 1, True, 'crossformerpp'), (10, 10, 1)),
])
def test_group_layout_follows_official_rule(args, expected):
    assert group_layout(*args) == expected


def test_position_bias_cache_not_stale_after_weight_update():
    layer = _randomize(LSDAttention(32, 2, group_size=4)).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        layer(x)  # fills the cache
        layer.load_state_dict(_randomize(LSDAttention(32, 2, group_size=4), seed=1).state_dict())
        assert torch.equal(layer(x), _randomize(LSDAttention(32, 2, group_size=4), seed=1).eval()(x))


@pytest.mark.parametrize('size,cached', [(56, True), (240, False)])
def test_position_bias_cache_holds_only_small_biases(size, cached):
    """LDA over a whole large map (a 30x30 group here: 2 heads x 900 x 900 floats = 6.5 MB) is recomputed per
    call rather than held by the layer; 7x7 groups (classification sizes) stay cached."""
    layer = LSDAttention(32, 2, group_size=7, interval=8, long_distance=True).eval()
    with torch.no_grad():
        layer(torch.randn(1, 32, size, size))
    assert layer.cached_position_biases == int(cached)


def test_position_bias_cache_not_pickled_or_copied():
    layer = LSDAttention(32, 2, group_size=7).eval()
    x = torch.randn(1, 32, 14, 14)
    with torch.no_grad():
        expected = layer(x)
    assert layer.cached_position_biases
    for copied in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):  # what torch.save(module) pickles
        assert copied.cached_position_biases == 0
        with torch.no_grad():
            assert torch.equal(copied(x), expected)
    assert layer.cached_position_biases  # the original keeps its own


def test_position_bias_with_parameters_made_under_inference_mode():
    layer = LSDAttention(32, 2, group_size=7).eval()
    x = torch.randn(1, 32, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(layer).double()(x)
    with torch.inference_mode():
        layer.double()  # inference tensors: no version counter
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert layer.cached_position_biases == 0


def test_traces_agree_in_eval_without_autograd():
    """torch.jit.trace's check traces again: a cache hit must not turn the bias into a constant in one of them."""
    layer = LSDAttention(32, 2, group_size=7).eval()
    x = torch.randn(1, 32, 14, 14)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=True)  # raises TracingCheckError if the two traces differ
        assert torch.equal(traced(x), layer(x))


@pytest.mark.parametrize('batch', [1, 3])
def test_padded_groups_equal_unpadded_tokens(batch):
    """The per-group padding mask repeated over the batch: every image of a padded batch equals its own run."""
    layer = _randomize(LSDAttention(32, 2, group_size=4)).eval()
    x = torch.randn(batch, 32, 9, 10)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(batch)])
    torch.testing.assert_close(together, alone)


# ---------------------------------------------------------------------------------------------------------------
# cross-scale embedding layers


def test_cross_scale_embed_shapes_and_channels():
    embed = CrossScaleEmbed(3, 96, (4, 8, 16, 32), stride=4, channels_last=False)
    out = embed(torch.randn(1, 3, 50, 67))
    assert ([p.out_channels for p in embed.projs], tuple(out.shape)) == ([48, 24, 12, 12], (1, 96, 12, 16))


@pytest.mark.parametrize('size,expected', [((8, 8), (4, 4)), ((7, 9), (4, 5))])
def test_cross_scale_merge_pads_odd_sides(size, expected):
    merge = CrossScaleMerge(16, 32, (2, 4), channels_last=False)
    assert merge(torch.randn(1, 16, *size)).shape == (1, 32, *expected)


def test_cross_scale_embed_uses_space_to_depth_for_large_kernels_only():
    embed = CrossScaleEmbed(3, 96, (4, 8, 16, 32), stride=4)
    merge = CrossScaleMerge(16, 32, (2, 4))
    assert [p.uses_weight_grad for p in embed.projs] == [False, False, True, True]
    assert not any(p.uses_weight_grad for p in merge.reductions)


def test_cross_scale_channels_must_split():
    with pytest.raises(ValueError, match='multiple of 8'):
        CrossScaleEmbed(3, 100, (4, 8, 16, 32))


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
    source = _randomize(_shallow())
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
    default = _randomize(_shallow())
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
    attn = _randomize(copy.deepcopy(pp_small.stages[2].blocks[1].attn)).double()  # LDA, G=14: 20x30 pads to 28x42
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


def test_concurrent_calls_equal_serial_calls(tiny):
    """Threads that fill the (emptied) position-bias caches concurrently get the serial results."""
    model = copy.deepcopy(tiny)
    inputs = [torch.randn(1, 3, *size) for size in [(64, 64), (96, 64), (64, 64), (40, 72)]]
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    layers = [m for m in model.modules() if isinstance(m, LSDAttention)]
    for layer in layers:
        layer.clear_position_bias_cache()
    results = [None] * len(inputs)

    def run(i):
        with torch.no_grad():
            results[i] = model(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(results, serial)) and all(layer.cached_position_biases for layer in layers)


# ---------------------------------------------------------------------------------------------------------------
# timm contract


@pytest.mark.parametrize('shape,match', [
    ((1, 1, 64, 64), 'expected 3 input channels, got 1'),
    ((1, 3, 31, 64), 'at least 32'),
    ((3, 64, 64), '4D'),
])
def test_bad_input_raises_value_error(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.randn(*shape))


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_heads=(2, 4, 8)), 'one entry per stage'),
    (dict(group_rule='swin'), 'group_rule'),
    (dict(num_heads=(3, 4, 8, 16)), 'divisible'),
])
def test_bad_kwargs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('crossformer_tiny', **kwargs)
