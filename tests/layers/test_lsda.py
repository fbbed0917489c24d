"""``layers.lsda``: CrossFormer's short/long-distance attention against a plain per-group reference that never sees
padding, its position-bias cache, and the group layout rule."""
import copy
import pickle

import pytest
import torch

from biformer_zoo.layers import LSDAttention
from biformer_zoo.layers.lsda import group_layout
from model_utils import randomize, reference_lsda


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
    layer = randomize(LSDAttention(
        32, 2, group_size=group_size, interval=interval, long_distance=long_distance, group_rule=rule)).double()
    x = torch.randn(2, 32, H, W, dtype=torch.float64)
    layer.train(not cached)  # eval + no_grad takes the cached position bias
    with torch.set_grad_enabled(not cached):
        fast = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(fast.detach(), reference_lsda(layer, x))


@pytest.mark.parametrize('train_bias', [True, False])  # explicit attention on CPU / SDPA with a constant bias
def test_lsda_gradients_equal_reference(train_bias):
    layer = randomize(LSDAttention(16, 2, group_size=3, interval=2, long_distance=True,
                                    group_rule='crossformerpp')).double()
    layer.pos.requires_grad_(train_bias)
    x = torch.randn(1, 16, 7, 8, dtype=torch.float64, requires_grad=True)
    inputs = [x, layer.qkv.weight] + ([layer.pos.pos_proj.weight] if train_bias else [])
    fast = torch.autograd.grad(layer(x).square().sum(), inputs)
    ref = torch.autograd.grad(reference_lsda(layer, x).square().sum(), inputs)
    torch.testing.assert_close(fast, ref)


def test_lsda_channels_last_equals_nchw():
    nchw = randomize(LSDAttention(16, 2, group_size=3, long_distance=False)).eval()
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
    layer = randomize(LSDAttention(32, 2, group_size=4)).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        layer(x)  # fills the cache
        layer.load_state_dict(randomize(LSDAttention(32, 2, group_size=4), seed=1).state_dict())
        assert torch.equal(layer(x), randomize(LSDAttention(32, 2, group_size=4), seed=1).eval()(x))


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
    layer = randomize(LSDAttention(32, 2, group_size=4)).eval()
    x = torch.randn(batch, 32, 9, 10)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(batch)])
    torch.testing.assert_close(together, alone)
