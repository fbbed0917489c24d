"""The timm model contract (``models/_pyramid.py``), checked once for each family with its own small model."""
from typing import Any

import pytest
import timm
import torch

import biformer_zoo  # noqa: F401

# per family: the model the checks run on, a second configuration for the heavier checks, and expected values
FAMILIES = {
    'biformer': dict(
        model=('biformer_tiny', {}), heavy=('biformer_tiny', {}),
        early_channels=[64, 128], num_features=512,
        grad_input=(2, 3, 64, 64), script_input=(1, 3, 64, 80), fx_input=(1, 3, 64, 64)),
    'crossformer': dict(  # narrower and shallower, with SDA, LDA and a cooling layer still in it
        model=('crossformer_tiny', dict(embed_dim=32, depths=(1, 1, 4, 2), num_heads=(2, 4, 8, 16))),
        heavy=('crossformerpp_small', dict(embed_dim=32, depths=(1, 1, 4, 2), num_heads=(2, 4, 8, 16))),
        early_channels=[32, 64], num_features=256,
        grad_input=(1, 3, 64, 48), script_input=(1, 3, 64, 80), fx_input=(1, 3, 64, 96)),
}


def build(family: str, which: str = 'model', **kwargs: Any) -> torch.nn.Module:
    name, model_kwargs = FAMILIES[family][which]
    return timm.create_model(name, **dict(model_kwargs, **kwargs)).eval()


@pytest.fixture(scope='module', params=list(FAMILIES))
def family(request):
    return request.param


def test_forward_intermediates_end_equals_forward_features(family):
    model = build(family)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, norm=True)
        ref = model.forward_features(x)
    assert torch.equal(final, ref) and len(inter) == 4 and torch.equal(inter[-1], ref)


def test_forward_intermediates_stop_early_and_indices(family):
    with torch.no_grad():
        inter = build(family).forward_intermediates(torch.randn(1, 3, 64, 64), indices=[0, 1], stop_early=True,
                                                    intermediates_only=True)
    assert [t.shape[1] for t in inter] == FAMILIES[family]['early_channels']


def test_prune_intermediate_layers(family):
    model = build(family)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=2, intermediates_only=True)
        kept = model.prune_intermediate_layers(indices=2)
        got = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert kept == [2, 3] and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_reset_classifier_and_num_classes_zero(family):
    model = build(family)
    model.reset_classifier(5, 'avg')
    out5 = model(torch.randn(1, 3, 64, 64))
    model.reset_classifier(0)
    out0 = model(torch.randn(1, 3, 64, 64))
    headless = build(family, num_classes=0)
    features = FAMILIES[family]['num_features']
    assert (out5.shape, out0.shape, headless(torch.randn(1, 3, 64, 64)).shape) == ((1, 5), (1, features),
                                                                                    (1, features))


def test_reset_classifier_after_pruning_fits_the_last_kept_stage(family):
    model = build(family)
    model.prune_intermediate_layers(indices=(0, 1))
    model.reset_classifier(5, 'avg')
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert model.num_features == FAMILIES[family]['early_channels'][-1]


def test_no_pooling_needs_num_classes_zero(family):
    """global_pool='' keeps the map: with a classifier it is a ValueError, at build time and on reset."""
    with pytest.raises(ValueError, match="global_pool='' keeps the"):
        build(family, global_pool='', num_classes=10)
    model = build(family, global_pool='', num_classes=0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, FAMILIES[family]['num_features'], 2, 2)
    with pytest.raises(ValueError, match="global_pool='' keeps the"):
        model.reset_classifier(10)


def test_img_size_sets_the_preferred_input_size(family):
    """Any size runs; img_size (as timm's fixed-size models take it) sets pretrained_cfg input_size, in_chans
    included."""
    assert build(family, img_size=96, in_chans=1).pretrained_cfg['input_size'] == (1, 96, 96)


@pytest.mark.parametrize('kwargs', [dict(indices=[4]), dict(indices=5), dict(indices=[-5])])
def test_stage_indices_that_do_not_exist_are_a_value_error(family, kwargs):
    with pytest.raises(ValueError, match='stage'):
        build(family).forward_intermediates(torch.randn(1, 3, 64, 64), **kwargs)


@pytest.mark.parametrize('kwargs,match', [(dict(features_only=True, out_indices=(4,)), 'do not exist'),
                                          (dict(output_stride=16), 'output_stride=16 is not supported')])
def test_unsupported_feature_arguments_are_a_value_error(family, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(family, **kwargs)


def test_stem_takes_channels_last_input(family):
    """Both forward paths hand the stem the image in channels-last memory (its faster layout on CPU)."""
    model = build(family)
    layouts = []
    model.stem.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        model.forward_intermediates(torch.randn(2, 3, 64, 64))
    assert layouts == [True, True]


def test_get_classifier(family):
    assert build(family, num_classes=3).get_classifier().out_features == 3


def test_in_chans_forward(family):
    with torch.no_grad():
        assert build(family, in_chans=4)(torch.randn(1, 4, 64, 64)).shape == (1, 1000)


def test_grad_checkpointing_same_gradients(family):
    torch.manual_seed(0)
    model = build(family, 'heavy', num_classes=4).train()
    x = torch.randn(*FAMILIES[family]['grad_input'])
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_torch_func_grad_equals_autograd(family):
    """Training gradients through ``torch.func.grad`` (the custom autograd Functions included) equal autograd's."""
    torch.manual_seed(0)
    model = build(family, 'heavy', num_classes=4).train()
    x = torch.randn(*FAMILIES[family]['grad_input'])
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())  # passed as copies: BatchNorm updates its statistics in training

    def loss(p: dict) -> torch.Tensor:
        return torch.func.functional_call(model, (p, {n: b.clone() for n, b in buffers.items()}), (x,)).sum()

    grads = torch.func.grad(loss)(params)
    expected = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for (n, got), want in zip(grads.items(), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=n)


def test_group_matcher_covers_all_params(family):
    from timm.models import group_parameters
    model = build(family, 'heavy')
    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))


def test_no_weight_decay_is_a_set(family):
    assert isinstance(build(family).no_weight_decay(), set)


def test_torchscript_matches_eager(family):
    model = build(family, 'heavy')
    scripted = torch.jit.script(model)
    x = torch.randn(*FAMILIES[family]['script_input'])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_fx_trace_matches_eager(family):
    from timm.models import create_feature_extractor
    model = build(family)
    extractor = create_feature_extractor(model, return_nodes={'stages.3': 'out'})
    x = torch.randn(*FAMILIES[family]['fx_input'])
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['out'], model.forward_intermediates(x, intermediates_only=True)[-1])


def test_features_only_bad_input_raises_value_error(family):
    with pytest.raises(ValueError, match='at least 32'):
        build(family, features_only=True)(torch.randn(1, 3, 16, 64))


def test_forward_is_features_then_head(family):
    model = build(family, num_classes=7)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
        full = model(x)
    assert (feats.shape, logits.shape, pre.shape) == (
        (2, model.num_features, 2, 3), (2, 7), (2, model.head_hidden_size))
    # forward is features then head; pre-logits are the average-pooled features, the logits the classifier on them
    torch.testing.assert_close(full, logits, rtol=0, atol=0)
    torch.testing.assert_close(pre, feats.mean((2, 3)))
    torch.testing.assert_close(logits, model.get_classifier()(pre))


def test_features_only_matches_feature_info(family):
    model = build(family, features_only=True, out_indices=(1, 2, 3))
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 128))
    expected = [(1, info['num_chs'], 96 // info['reduction'], 128 // info['reduction'])
                for info in model.feature_info.get_dicts()]
    assert [tuple(f.shape) for f in feats] == expected and model.feature_info.reduction() == [8, 16, 32]


def test_negative_out_indices_count_from_the_end(family):
    """(-3, -1) are stages 1 and 3, as timm reads them; feature_info describes exactly the maps returned."""
    model = build(family, features_only=True, out_indices=(-3, -1))
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert ([f.shape[1] for f in feats], model.feature_info.reduction()) == (model.feature_info.channels(), [8, 32])


@pytest.mark.parametrize('feature_cls', ['getter', 'list', 'dict', 'hook', 'fx'])
def test_every_feature_cls_gives_the_intermediates(family, feature_cls):
    """timm's five feature wrappers return the same maps as ``forward_intermediates`` ('list' and 'dict' walk the
    model's flattened top-level modules, 'hook' hooks them, 'fx' traces the model)."""
    torch.manual_seed(0)
    model = build(family)
    torch.manual_seed(0)
    features = build(family, features_only=True, feature_cls=feature_cls, out_indices=(1, 3))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
        out = features(x)
    out = list(out.values()) if isinstance(out, dict) else out
    assert len(out) == 2 and features.feature_info.channels() == [f.shape[1] for f in expected]
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('name', biformer_zoo.list_zoo_models())
def test_param_count_equals_official(name):
    """Every model at 1000 classes has the official model's parameter count, as weights_manifest.json records it."""
    from biformer_zoo.tools.report import PAPER_NUMBERS
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PAPER_NUMBERS[name].params_exact
