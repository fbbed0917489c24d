"""Bad input, table-driven: each row is one call, the exception it must raise and a phrase of its message.

A bad input someone reports is one row in the table of its kind: model input, model arguments, layers (input and
arguments), weights, and the command line (every CLI error is one line on stderr and exit code 2). Models are built
on the meta device, so a row costs no memory and no initialisation.
"""
import functools
from typing import Any, Callable, List, NamedTuple, Type

import pytest
import timm
import torch

import biformer_zoo
from biformer_zoo.blocks import AttentionBottleneck, C2fAttention
from biformer_zoo.layers import (
    AttentionLePE, BiLevelRoutingAttention, CrossScaleEmbed, CrossScaleMerge, LSDAttention)

MODELS = biformer_zoo.list_zoo_models()
BIFORMERS = [name for name in MODELS if name.startswith('biformer')]
CROSSFORMERS = [name for name in MODELS if name.startswith('crossformer')]


class Case(NamedTuple):
    id: str
    call: Callable[[], Any]
    error: Type[BaseException]
    match: str


@functools.lru_cache(maxsize=None)
def meta_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """``name`` at full size on the meta device (cached: the input rows share one model per name)."""
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def meta_create(name: str, **kwargs: Any) -> Callable[[], Any]:
    def create():
        with torch.device('meta'):
            return timm.create_model(name, **kwargs)
    return create


def model_input(name: str, shape, dtype=torch.float32) -> Callable[[], Any]:
    return lambda: meta_model(name)(torch.zeros(shape, dtype=dtype, device='meta'))


def per_model(names: List[str], rows) -> List[Case]:
    """One case per model for each (id, factory(name), error, match) row."""
    return [Case(f'{name}-{row_id}', factory(name), error, match)
            for row_id, factory, error, match in rows for name in names]


# ---------------------------------------------------------------------------------------------------------------
# model input

MODEL_INPUTS = per_model(MODELS, [
    ('1-channel', lambda n: model_input(n, (1, 1, 64, 64)), ValueError,
     r'expected 3 input channels, got 1 .* in_chans=1'),
    ('3d', lambda n: model_input(n, (3, 64, 64)), ValueError, r'4D image batch .* x\.unsqueeze\(0\)'),
    ('5d', lambda n: model_input(n, (1, 3, 64, 64, 1)), ValueError, r'4D image batch'),
    ('too-small', lambda n: model_input(n, (1, 3, 31, 64)), ValueError,
     r'31x64 pixels is too small: .* at least 32; resize or pad'),
    ('uint8', lambda n: model_input(n, (1, 3, 64, 64), torch.uint8), ValueError,
     r'floating point .* got dtype torch\.uint8; convert it with x\.float\(\)'),
    ('float16', lambda n: model_input(n, (1, 3, 64, 64), torch.float16), ValueError,
     r'dtype torch\.float16 but the weights have torch\.float32; .* x\.to\(torch\.float32\), '
     r'.* model\.to\(torch\.float16'),
    ('bfloat16', lambda n: model_input(n, (1, 3, 64, 64), torch.bfloat16), ValueError,
     r'dtype torch\.bfloat16 but the weights have torch\.float32; .* model\.to\(torch\.bfloat16\)'),
    ('float64', lambda n: model_input(n, (1, 3, 64, 64), torch.float64), ValueError,
     r'dtype torch\.float64 but the weights have torch\.float32; convert the input with x\.to\(torch\.float32\)'),
    ('float16-intermediates', lambda n: lambda: meta_model(n).forward_intermediates(
        torch.zeros(1, 3, 64, 64, dtype=torch.float16, device='meta')), ValueError, r'dtype torch\.float16 but'),
    ('numpy', lambda n: lambda: meta_model(n)(torch.zeros(1, 3, 64, 64).numpy()), ValueError,
     r'must be a torch\.Tensor, got a numpy\.ndarray; convert it with torch\.from_numpy\(x\)'),
    ('list', lambda n: lambda: meta_model(n)([[0.]]), ValueError, r'got a builtins\.list; .* torch\.as_tensor\(x\)'),
])

# ---------------------------------------------------------------------------------------------------------------
# model arguments and names

MODEL_ARGS = per_model(BIFORMERS, [
    ('n_win=2', lambda n: meta_create(n, n_win=2), ValueError,
     r'topks=\(1, 4, 16, None\) do not fit n_win=2: .* n_win\*\*2 = 4 .* lower topks or raise n_win'),
    ('n_win=0', lambda n: meta_create(n, n_win=0), ValueError, r'n_win must be >= 1, got 0'),
    ('topk=50', lambda n: meta_create(n, topks=(1, 4, 50, None)), ValueError, r'between 1 and n_win\*\*2 = 49'),
    ('topk=0', lambda n: meta_create(n, topks=(0, 4, 16, None)), ValueError, r'between 1 and n_win\*\*2'),
    ('3-topks', lambda n: meta_create(n, topks=(1, 4, 16)), ValueError, r'one entry per stage'),
    ('stem_type', lambda n: meta_create(n, stem_type='conv'), ValueError, r"stem_type must be 'overlap' or 'patch'"),
]) + per_model(CROSSFORMERS, [
    ('group_size=0', lambda n: meta_create(n, group_size=0), ValueError, r'group_size and interval must be >= 1, got 0'),
    ('interval=0', lambda n: meta_create(n, interval=0), ValueError,
     r'group_size and interval must be >= 1, got \d+ and 0'),
    ('group_rule', lambda n: meta_create(n, group_rule='swin'), ValueError, r'group_rule must be one of'),
    ('3-heads', lambda n: meta_create(n, num_heads=(2, 4, 8)), ValueError, r'one entry per stage'),
    ('heads', lambda n: meta_create(n, num_heads=(5, 5, 5, 5)), ValueError, r'divisible by num_heads'),
])

MODEL_NAMES = [
    Case('unknown-model', lambda: biformer_zoo.create_model('biformer_smol'), ValueError,
         r"unknown model 'biformer_smol' \(did you mean biformer_small, .*\)\. `biformer-zoo list`"),
    Case('unknown-model-cf', lambda: biformer_zoo.create_model('crossformer_tiy'), ValueError,
         r"unknown model 'crossformer_tiy' \(did you mean crossformer_tiny"),
    Case('unknown-tag', lambda: biformer_zoo.create_model('biformer_small.in22k'), ValueError,
         r"unknown pretrained tag 'in22k' for biformer_small; its tags are in1k\. Use one"),
    Case('unknown-tag-stl', lambda: biformer_zoo.create_model('biformer_stl.nchw'), ValueError,
         r"tag 'nchw' for biformer_stl; its tags are in1k, in1k_nchw\."),
    Case('unknown-tag-cf', lambda: biformer_zoo.create_model('crossformer_tiny.in22k'), ValueError,
         r"unknown pretrained tag 'in22k' for crossformer_tiny; its tags are in1k"),
    # zoo entrypoints check the tag themselves, so plain timm.create_model names the tags too
    Case('timm-unknown-tag', meta_create('biformer_small.in22k'), ValueError, r'its tags are in1k\. Use one of them'),
    Case('timm-unknown-tag-cf', meta_create('crossformer_tiny.in22k'), ValueError,
         r'its tags are in1k\. Use one of them'),
]

# ---------------------------------------------------------------------------------------------------------------
# layers


def layer_input(layer: Callable[[], torch.nn.Module], x: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: layer()(x())


def bra():
    return BiLevelRoutingAttention(64, num_heads=2, num_regions=2, topk=2)


# each layer as users build it, with its channels: the (B, C, H, W) input they take
USER_LAYERS = [
    ('bra', bra, 64),
    ('lepe', lambda: AttentionLePE(64, num_heads=2), 64),
    ('lsda', lambda: LSDAttention(64, num_heads=2), 64),
    ('embed', lambda: CrossScaleEmbed(3, 64, channels_last=False), 3),
    ('merge', lambda: CrossScaleMerge(64, 128, channels_last=False), 64),
    ('bottleneck', lambda: AttentionBottleneck(64, 'lsda', num_heads=2), 64),
    ('c2f', lambda: C2fAttention(64, 64, num_heads=2, num_regions=2, topk=2), 64),
]

LAYERS = [Case(f'{name}-{row_id}', layer_input(layer, x(chans)), ValueError, match)
          for name, layer, chans in USER_LAYERS for row_id, x, match in [
    ('channels', lambda c: lambda: torch.zeros(1, c + 1, 8, 8),
     r'must have (\d+) channels .* got \d+ .*; build the layer with (dim|in_chans)=\d+, or project the input to \1'),
    ('nhwc', lambda c: lambda: torch.zeros(1, 8, 8, c), r'looks \(B, H, W, C\); pass x\.permute\(0, 3, 1, 2\)'),
    ('3d', lambda c: lambda: torch.zeros(c, 8, 8),
     r'must be a 4D \(B, C, H, W\) map, got a 3D tensor .* x\.unsqueeze\(0\)'),
    ('int64', lambda c: lambda: torch.zeros(1, c, 8, 8, dtype=torch.long), r'floating point .* got dtype torch\.int64'),
    ('float16', lambda c: lambda: torch.zeros(1, c, 8, 8, dtype=torch.float16),
     r'dtype torch\.float16 but the weights have torch\.float32; .* x\.to\(torch\.float32\), .* torch\.autocast'),
    ('numpy', lambda c: lambda: torch.zeros(1, c, 8, 8).numpy(), r'numpy\.ndarray; convert it with torch\.from_numpy'),
]] + [
    Case('bra-nchw-into-channels-last', layer_input(
        lambda: BiLevelRoutingAttention(64, num_heads=2, num_regions=2, topk=2, channels_last=True),
        lambda: torch.zeros(1, 64, 8, 8)), ValueError, r'\(B, H, W, C\) map, .* x\.permute\(0, 2, 3, 1\), or build .* '
                                                        r'channels_last=False'),
    Case('bra-float64-into-float32', layer_input(bra, lambda: torch.zeros(1, 64, 8, 8, dtype=torch.float64)),
         ValueError, r'torch\.float64 but the weights have torch\.float32; .* model\.to\(torch\.float64\)$'),
    Case('bra-num_heads=0', lambda: BiLevelRoutingAttention(64, num_heads=0), ValueError,
         r'num_heads must be >= 1, got 0; pass a divisor of dim=64'),
    Case('bra-dim=0', lambda: BiLevelRoutingAttention(0), ValueError, r'dim must be >= 1, got 0'),
    Case('bra-num_regions=2.5', lambda: BiLevelRoutingAttention(64, num_regions=2.5), ValueError,
         r'num_regions \(n_win\) must be an int, got 2\.5 \(float\); pass'),
    Case('bra-topk=1.0', lambda: BiLevelRoutingAttention(64, topk=1.0), ValueError, r'topk must be an int, got 1\.0'),
    Case('bra-qk_dim', lambda: BiLevelRoutingAttention(64, qk_dim=-8), ValueError, r'qk_dim must be >= 1, got -8'),
    Case('bra-side_dwconv-even', lambda: BiLevelRoutingAttention(64, side_dwconv=4), ValueError,
         r'side_dwconv must be odd or 0, got 4'),
    Case('bra-side_dwconv-negative', lambda: BiLevelRoutingAttention(64, side_dwconv=-1), ValueError,
         r'side_dwconv must be >= 0, got -1'),
    Case('lepe-num_heads=0', lambda: AttentionLePE(64, num_heads=0), ValueError, r'num_heads must be >= 1, got 0'),
    Case('lepe-heads', lambda: AttentionLePE(64, num_heads=3), ValueError,
         r'dim \(64\) must be divisible by num_heads \(3\); use num_heads from \[1, 2, 4'),
    Case('lsda-num_heads=0', lambda: LSDAttention(64, num_heads=0), ValueError, r'num_heads must be >= 1, got 0'),
    Case('lsda-dim=8', lambda: LSDAttention(8, num_heads=2), ValueError, r'dim must be >= 16, got 8'),
    Case('lsda-group_size=2.5', lambda: LSDAttention(64, 2, group_size=2.5), ValueError, r'group_size must be an int'),
    Case('lsda-interval=0', lambda: LSDAttention(64, 2, interval=0), ValueError,
         r'group_size and interval must be >= 1, got 7 and 0'),
    Case('lsda-attn_drop', lambda: LSDAttention(64, 2, attn_drop=1.5), ValueError, r'attn_drop must be .* \[0, 1\)'),
    Case('embed-stride=0', lambda: CrossScaleEmbed(3, 64, stride=0), ValueError, r'stride must be >= 1, got 0'),
    Case('embed-in_chans=0', lambda: CrossScaleEmbed(0, 64), ValueError, r'in_chans must be >= 1, got 0'),
    Case('embed-kernels', lambda: CrossScaleEmbed(3, 64, kernel_sizes=()), ValueError,
         r'kernel_sizes must be a non-empty sequence of ints, got \(\)'),
    Case('merge-in_chans=2.5', lambda: CrossScaleMerge(2.5, 64), ValueError, r'in_chans must be an int, got 2\.5'),
    Case('merge-kernel=3.0', lambda: CrossScaleMerge(32, 64, kernel_sizes=(2, 4.0)), ValueError,
         r'every kernel size must be an int, got 4\.0'),
    Case('c2f-num_heads=0', lambda: C2fAttention(64, 64, num_heads=0), ValueError, r'num_heads must be >= 1, got 0'),
    Case('c2f-depth', lambda: C2fAttention(64, 64, depth=-1), ValueError, r'depth must be >= 0, got -1'),
    Case('bottleneck-attention', lambda: AttentionBottleneck(64, 'swin'), ValueError, r'attention must be one of'),
    Case('bra-num_regions=0', lambda: BiLevelRoutingAttention(64, num_regions=0), ValueError,
         r'num_regions \(n_win\) must be >= 1'),
    Case('bra-topk>regions', lambda: BiLevelRoutingAttention(64, num_regions=2, topk=5), ValueError,
         r'topk must be between 1 and num_regions\*\*2 = 4 .* got 5'),
    Case('bra-heads', lambda: BiLevelRoutingAttention(64, num_heads=3), ValueError, r'divisible by num_heads'),
]

# ---------------------------------------------------------------------------------------------------------------
# weights

WEIGHTS: List[Case] = []

CASES = MODEL_INPUTS + MODEL_ARGS + MODEL_NAMES + LAYERS + WEIGHTS


@pytest.mark.parametrize('case', CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_a_clear_error(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_unknown_model_error_is_also_a_runtime_error():
    """timm raises RuntimeError for unknown names: code written against timm keeps catching ours."""
    with pytest.raises(RuntimeError):
        biformer_zoo.create_model('biformer_smol')


def test_create_model_passes_known_names_to_timm():
    model = biformer_zoo.create_model('biformer_tiny.in1k', num_classes=3, depths=(1, 1, 1, 1))
    assert (model.pretrained_cfg['tag'], model.num_classes) == ('in1k', 3)
