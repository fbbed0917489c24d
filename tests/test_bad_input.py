"""Bad input, table-driven: each row is one call, the exception it must raise and a phrase of its message.

A bad input someone reports is one row in the table of its kind: model input, model arguments, layers (input and
arguments), weights, and the command line (every CLI error is one line on stderr and exit code 2). Models are built
on the meta device, so a row costs no memory and no initialisation.
"""
import functools
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Type

import pytest
import safetensors.torch
import timm
import torch

import biformer_zoo
from biformer_zoo.layers import AttentionBottleneck, C2fAttention
from biformer_zoo.layers import (
    AttentionLePE, BiLevelRoutingAttention, CrossScaleEmbed, CrossScaleMerge, LSDAttention)
from biformer_zoo.weights import PretrainedWeightsError
from official_layouts import RunsCodeWhenUnpickled

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
    ('n_win=0', lambda n: meta_create(n, n_win=0), ValueError, r'n_win must be >= 1, got 0; n_win is the number of regions per side'),
    ('n_win=2.5', lambda n: meta_create(n, n_win=2.5), ValueError, r'n_win must be an int, got 2\.5 \(float\)'),
    ('head_dim=0', lambda n: meta_create(n, head_dim=0), ValueError, r'head_dim must be >= 1, got 0'),
    ('topks=4', lambda n: meta_create(n, topks=4), ValueError, r'topks needs one entry per stage, e\.g\. topks=\('),
    ('topk=50', lambda n: meta_create(n, topks=(1, 4, 50, None)), ValueError, r'between 1 and n_win\*\*2 = 49'),
    ('topk=0', lambda n: meta_create(n, topks=(0, 4, 16, None)), ValueError, r'between 1 and n_win\*\*2'),
    ('3-topks', lambda n: meta_create(n, topks=(1, 4, 16)), ValueError, r'one entry per stage'),
    ('stem_type', lambda n: meta_create(n, stem_type='conv'), ValueError, r"stem_type must be 'overlap' or 'patch'"),
    ('depths=-1', lambda n: meta_create(n, depths=(-1, 2, 8, 2)), ValueError,
     r'depths\[0\] must be >= 0, got -1; depths gives the blocks of each stage, e\.g\. \(4, 4, 18, 4\)'),
    ('depths=2.5', lambda n: meta_create(n, depths=(2, 2.5, 8, 2)), ValueError, r'depths\[1\] must be an int, got 2\.5'),
    ('embed_dims=0', lambda n: meta_create(n, embed_dims=(64, 0, 256, 512)), ValueError,
     r'embed_dims\[1\] must be >= 1, got 0'),
    ('mlp_ratios=-1', lambda n: meta_create(n, mlp_ratios=(-1, 3, 3, 3)), ValueError,
     r'mlp_ratios\[0\] must be a number > 0 giving at least one hidden channel \(int\(mlp_ratios\[0\] \* \d+\)\), '
     r'got -1'),
    ('mlp_ratios=0', lambda n: meta_create(n, mlp_ratios=(0, 3, 3, 3)), ValueError, r'mlp_ratios\[0\] .* got 0;'),
    ('head_dim=40', lambda n: meta_create(n, head_dim=40), ValueError,
     r'^head_dim=40 must divide the width of every stage with routed attention \(\d+, \d+, \d+\) .* use head_dim '
     r'from \[1, 2, .*32.*\]'),
    ('global_num_heads=7', lambda n: meta_create(n, global_num_heads=7), ValueError,
     r'^global_num_heads=7 must divide the width of every stage with global attention \(\d+,\); use '
     r'global_num_heads from \[1, 2, .*8.*\]'),
    ('global_num_heads=0', lambda n: meta_create(n, global_num_heads=0), ValueError,
     r'global_num_heads must be >= 1, got 0'),
]) + per_model(CROSSFORMERS, [
    ('depths=-1', lambda n: meta_create(n, depths=(2, -1, 6, 2)), ValueError, r'depths\[1\] must be >= 0, got -1'),
    ('mlp_ratio=0', lambda n: meta_create(n, mlp_ratio=0), ValueError,
     r'mlp_ratio must be a number > 0 giving at least one hidden channel .* got 0'),
    ('mlp_ratio=-1', lambda n: meta_create(n, mlp_ratio=-1.), ValueError, r'mlp_ratio must be a number > 0 .* got -1\.0'),
]) + per_model(CROSSFORMERS, [
    ('group_size=0', lambda n: meta_create(n, group_size=0), ValueError,
     r'group_size and interval must be >= 1, got 0'),
    ('interval=0', lambda n: meta_create(n, interval=0), ValueError,
     r'group_size and interval must be >= 1, got \d+ and 0'),
    ('group_rule', lambda n: meta_create(n, group_rule='swin'), ValueError, r'group_rule must be one of'),
    ('3-heads', lambda n: meta_create(n, num_heads=(2, 4, 8)), ValueError, r'one entry per stage'),
    ('heads', lambda n: meta_create(n, num_heads=(5, 5, 5, 5)), ValueError, r'divisible by num_heads'),
    ('num_heads=4', lambda n: meta_create(n, num_heads=4), ValueError, r'num_heads needs one entry per stage'),
    ('embed_dim=0', lambda n: meta_create(n, embed_dim=0), ValueError, r'embed_dim must be >= 1, got 0'),
    ('attn_drop_rate=1', lambda n: meta_create(n, attn_drop_rate=1.), ValueError,
     r'attn_drop_rate must be a number in \[0, 1\)'),
]) + per_model(['biformer_tiny', 'crossformer_tiny'], [  # the arguments both families take, checked in one place
    ('drop_path_rate=1.5', lambda n: meta_create(n, drop_path_rate=1.5), ValueError,
     r'drop_path_rate must be a number in \[0, 1\) .* got 1\.5'),
    ('drop_rate=-0.1', lambda n: meta_create(n, drop_rate=-0.1), ValueError, r'drop_rate must be a number in \[0, 1\)'),
    ('in_chans=0', lambda n: meta_create(n, in_chans=0), ValueError,
     r'in_chans must be >= 1, got 0; in_chans is the number'),
    ('in_chans=-3', lambda n: meta_create(n, in_chans=-3), ValueError, r'in_chans must be >= 1, got -3'),
    ('in_chans=3.0', lambda n: meta_create(n, in_chans=3.), ValueError, r'in_chans must be an int, got 3\.0 \(float\)'),
    ('num_classes=-1', lambda n: meta_create(n, num_classes=-1), ValueError, r'num_classes must be >= 0, got -1; use 0 for no classifier'),
    ('img_size=0', lambda n: meta_create(n, img_size=0), ValueError, r'img_size must be an int or an \(H, W\) pair'),
    ('img_size=-5', lambda n: meta_create(n, img_size=-5), ValueError, r'img_size must be .* got -5'),
    ('img_size=3-tuple', lambda n: meta_create(n, img_size=(224, 224, 3)), ValueError, r'img_size must be'),
    ('global_pool', lambda n: meta_create(n, global_pool='bogus'), ValueError,
     r"global_pool must be one of 'avg', 'max', 'avgmax', 'catavgmax' or '' \(no pooling\), got 'bogus'"),
    ('pool-less-classifier', lambda n: meta_create(n, global_pool=''), ValueError, r"use num_classes=0 with it"),
    ('out_indices=()', lambda n: meta_create(n, features_only=True, out_indices=()), ValueError,
     r'must name at least one stage'),
    ('out_indices=(4,)', lambda n: meta_create(n, features_only=True, out_indices=(4,)), ValueError,
     r'stage indices \[4\] do not exist: the model has 4 stages'),
    ('output_stride=16', lambda n: meta_create(n, output_stride=16), ValueError, r'output_stride=16 is not supported'),
    ('out_indices-unsorted', lambda n: meta_create(n, features_only=True, out_indices=(3, 1, 2)), ValueError,
     r'out_indices=\(3, 1, 2\) is not in increasing order .* pass out_indices=\(1, 2, 3\)$'),
    ('out_indices-repeated', lambda n: meta_create(n, features_only=True, out_indices=(1, 1, 2)), ValueError,
     r'out_indices=\(1, 1, 2\) names stage\(s\) \[1\] more than once; .* pass out_indices=\(1, 2\)$'),
    ('out_indices-repeated-negative', lambda n: meta_create(n, features_only=True, out_indices=(1, -3)), ValueError,
     r'names stage\(s\) \[1\] more than once'),
    ('out_indices-list-wrapper', lambda n: meta_create(n, features_only=True, feature_cls='list', out_indices=(2, 0)),
     ValueError, r'not in increasing order'),
    ('indices-unsorted', lambda n: lambda: meta_model(n).forward_intermediates(
        torch.zeros(1, 3, 64, 64, device='meta'), indices=[2, 0]), ValueError,
     r'indices=\(2, 0\) is not in increasing order .* pass indices=\(0, 2\)$'),
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

REDUCED = dict(depths=(1, 1, 1, 1))  # every stage, one block each: a whole state dict in a small file


@functools.lru_cache(maxsize=None)
def reduced_state_dict(name: str) -> Dict[str, torch.Tensor]:
    return timm.create_model(name, **REDUCED).state_dict()


def with_file(file_name: str, write: Callable[[Path], None], use: Callable[[Path], Any]) -> Callable[[], Any]:
    """A call that writes ``file_name`` with ``write`` in a fresh temporary folder, then runs ``use(path)``."""
    def call():
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / file_name
            write(path)
            return use(path)
    return call


def safetensors_of(name: str, edit: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]):
    return lambda path: safetensors.torch.save_file(edit(dict(reduced_state_dict(name))), str(path))


def pretrained_from(name: str, **kwargs: Any) -> Callable[[Path], Any]:
    return lambda path: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                          **REDUCED, **kwargs)


def checkpoint_path_of(name: str) -> Callable[[Path], Any]:
    return lambda path: biformer_zoo.create_model(name, checkpoint_path=str(path), **REDUCED)


def with_nan(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict with one NaN in its first floating-point tensor."""
    key = next(k for k, v in state_dict.items() if v.is_floating_point())
    value = state_dict[key].clone()
    value.view(-1)[0] = float('nan')
    return dict(state_dict, **{key: value})


def torch_save_of(name: str, edit: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]],
                  scramble: bool = False, fill_middle: bool = False):
    """Writes a training checkpoint {'model': edited state dict}; ``scramble`` overwrites bytes near the start of the
    file (the pickled record list of a torch.save zip), ``fill_middle`` 64 bytes in the middle (tensor data) with
    0xff (a NaN as float32); torch's zip reader checks no CRC, so only the values tell."""
    def write(path: Path) -> None:
        torch.save({'model': edit(dict(reduced_state_dict(name)))}, path)
        data = bytearray(path.read_bytes())
        if scramble:
            data[40:200] = bytes(range(160))
        if fill_middle:
            middle = len(data) // 2 // 64 * 64
            data[middle:middle + 64] = b'\xff' * 64
        path.write_bytes(bytes(data))
    return write


def overlapping_safetensors(path: Path) -> None:
    """A safetensors file whose two tensors claim the same bytes (a header written by hand)."""
    header = json.dumps({'a': dict(dtype='F32', shape=[4], data_offsets=[0, 16]),
                         'b': dict(dtype='F32', shape=[4], data_offsets=[0, 16])}).encode()
    header += b' ' * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, 'little') + header + bytes(16))


def without(prefix: str):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)}


def save_pickle_with_code(path: Path, legacy: bool = True) -> None:
    checkpoint = {'model': {'x': torch.zeros(1)}, 'hook': RunsCodeWhenUnpickled(path.with_suffix('.ran'))}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)


PARTIAL = r"the pretrained weights .* do not fit the model; tensors missing"
WEIGHTS = per_model(['biformer_tiny', 'crossformer_tiny'], [
    # a file of one unrelated tensor "loaded" wherever timm dropped the classifier and loaded with strict=False
    ('one-tensor-features', lambda n: with_file('w.safetensors', safetensors_of(n, lambda sd: {'foo': torch.zeros(3)}),
                                                pretrained_from(n, features_only=True)),
     PretrainedWeightsError, PARTIAL + r' \d+ \(stem\..*\); unexpected 1 \(foo\)'),
    ('one-tensor-classes', lambda n: with_file('w.safetensors', safetensors_of(n, lambda sd: {'foo': torch.zeros(3)}),
                                               pretrained_from(n, num_classes=5)),
     PretrainedWeightsError, PARTIAL),
    ('no-stage-3', lambda n: with_file('w.safetensors', safetensors_of(n, without('stages.3.')),
                                       pretrained_from(n, num_classes=5)),
     PretrainedWeightsError, PARTIAL + r' \d+ \(stages\.3\.'),
    ('no-stage-3-in_chans', lambda n: with_file('w.safetensors', safetensors_of(n, without('stages.3.')),
                                                pretrained_from(n, in_chans=1, num_classes=10)),
     PretrainedWeightsError, PARTIAL + r' \d+ \(stages\.3\.'),
    ('int8-tensor', lambda n: with_file('w.safetensors', safetensors_of(n, lambda sd: dict(
        sd, **{k: sd[k].to(torch.int8) for k in list(sd)[:1]})), pretrained_from(n, num_classes=3)),
     PretrainedWeightsError,
     r'tensors of another shape or kind 1 \(stem\.\S+ is torch\.int8, the model holds torch\.float32'),
    ('other-depth', lambda n: with_file('w.safetensors', safetensors_of(n, lambda sd: sd),
                                        lambda path: timm.create_model(n, pretrained=True, depths=(1, 1, 2, 1),
                                                                       pretrained_cfg_overlay=dict(file=str(path)))),
     PretrainedWeightsError, PARTIAL + r' \d+ \(stages\.2\.blocks\.1\.'),
    ('extra-tensor', lambda n: with_file('w.safetensors', safetensors_of(n, lambda sd: dict(sd, extra=torch.ones(1))),
                                         pretrained_from(n, features_only=True)),
     PretrainedWeightsError, r"do not fit the model; tensors unexpected 1 \(extra\)"),
    ('nan-file', lambda n: with_file('w.safetensors', safetensors_of(n, with_nan), pretrained_from(n)),
     PretrainedWeightsError, r'the pretrained weights .*w\.safetensors do not fit the model; tensors with NaN or '
                             r'infinite values 1 \(stem\.'),
    ('nan-pth', lambda n: with_file('w.pth', torch_save_of(n, with_nan), pretrained_from(n)),
     PretrainedWeightsError, r'tensors with NaN or infinite values 1'),
    ('nan-checkpoint_path', lambda n: with_file('w.pth', torch_save_of(n, with_nan), checkpoint_path_of(n)),
     PretrainedWeightsError, r'the weights of checkpoint .*w\.pth do not fit the model; tensors with NaN'),
    ('missing-checkpoint_path', lambda n: with_file('w.pth', torch_save_of(n, without('stages.3.')),
                                                    checkpoint_path_of(n)),
     PretrainedWeightsError, r'the weights of checkpoint .* do not fit the model; tensors missing \d+ \(stages\.3\.'),
    ('classes-checkpoint_path', lambda n: with_file('w.pth', torch_save_of(n, lambda sd: sd),
                                                    lambda path: biformer_zoo.create_model(
                                                        n, checkpoint_path=str(path), num_classes=10, **REDUCED)),
     PretrainedWeightsError, r'tensors of another shape or kind 2 \(head\.fc\.weight is \(1000, \d+\), the model '
                             r'holds \(10, \d+\)'),
    ('int64-checkpoint_path', lambda n: with_file('w.pth', torch_save_of(n, lambda sd: dict(
        sd, **{k: sd[k].long() for k in list(sd)[:1]})), checkpoint_path_of(n)),
     PretrainedWeightsError, r'tensors of another shape or kind 1 \(stem\.\S+ is torch\.int64'),
    ('official-load_state_dict', lambda n: lambda: timm.create_model(n, **REDUCED).load_state_dict(
        {('downsample_layers.0.0.weight' if n.startswith('biformer') else 'patch_embed.projs.0.weight'): torch.ones(1)}),
     PretrainedWeightsError, r"official checkpoint's layout: load the file with biformer_zoo\.create_model"),
    ('overlapping-offsets', lambda n: with_file('w.safetensors', overlapping_safetensors, pretrained_from(n)),
     PretrainedWeightsError, r"corrupt or truncated: .*tensor 'b' starts at byte 0 of the data, not at 16: the "
                             r'tensors overlap'),
    ('random-bytes-pth', lambda n: with_file('w.pth', torch_save_of(n, lambda sd: sd, scramble=True),
                                             pretrained_from(n)),
     PretrainedWeightsError, r'cannot read the pretrained weights: .*w\.pth is a pickle that torch\.load\(weights_only=True\) '
                             r'cannot read'),
    ('ff-bytes-in-tensor-data', lambda n: with_file('w.pth', torch_save_of(n, lambda sd: sd, fill_middle=True),
                                                    pretrained_from(n)),
     PretrainedWeightsError, r'tensors with NaN or infinite values 1'),
]) + [
    Case('legacy-pickle-with-code', with_file('w.pth', save_pickle_with_code, pretrained_from('biformer_tiny')),
         PretrainedWeightsError, r'needs code to unpickle \(official_layouts\.leave_marker\); .* refuses this file'),
    Case('plain-pickle', with_file('w.pth', lambda path: path.write_bytes(pickle.dumps({'a': [1, 2]}, protocol=4)),
                                   pretrained_from('biformer_tiny')),
         PretrainedWeightsError, r'a pickle that torch\.load\(weights_only=True\) cannot read'),
    Case('checkpoint_path-missing',
         lambda: biformer_zoo.create_model('biformer_tiny', checkpoint_path='/nonexistent/w.pth'),
         ValueError, r'checkpoint /nonexistent/w\.pth does not exist; pass the path of a checkpoint file'),
    Case('checkpoint_path-empty',
         with_file('w.pth', lambda path: path.write_bytes(b''), checkpoint_path_of('biformer_tiny')),
         ValueError, r'is empty \(0 bytes\): an interrupted download'),
    Case('checkpoint_path-text', with_file('w.pth', lambda path: path.write_text('<!DOCTYPE html>'),
                                           checkpoint_path_of('biformer_tiny')),
         ValueError, r"is not a checkpoint: it begins with b'<!DOCTYP' \(text\)"),
    Case('checkpoint_path-folder', with_file('w.pth', lambda path: path.mkdir(), checkpoint_path_of('biformer_tiny')),
         ValueError, r'w\.pth is a directory'),
    Case('broken-zip', with_file('w.pth', lambda path: path.write_bytes(b'PK\x03\x04' + bytes(100)),
                                 pretrained_from('biformer_tiny')),
         PretrainedWeightsError, r'is not a readable checkpoint .* download it again'),
]

# ---------------------------------------------------------------------------------------------------------------
# dense prediction: builders, heads, presets and UperNet's labels (backbones of one block per stage)

from biformer_zoo import dense  # noqa: E402

SHALLOW = dict(depths=(1, 1, 1, 1))


def on_meta(build: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    def call():
        with torch.device('meta'):
            return build(*args, **kwargs)
    return call


@functools.lru_cache(maxsize=None)
def meta_upernet() -> torch.nn.Module:
    """UperNet with 150 classes on the meta device: its ``loss`` reads only the tensors it is given."""
    with torch.device('meta'):
        return dense.upernet('biformer_tiny', num_classes=150, head_channels=16, aux_channels=8, **SHALLOW)


def upernet_loss(labels: Callable[[], torch.Tensor]) -> Callable[[], Any]:
    """UperNet's loss of (2, 150, 16, 16) logits against ``labels()``."""
    return lambda: meta_upernet().loss(torch.zeros(2, 150, 16, 16), labels())


def train_one_image() -> Any:
    model = meta_upernet().train()
    try:
        return model(torch.zeros(1, 3, 64, 64, device='meta'))
    finally:
        model.eval()


def preset_path_name(path: Path) -> str:
    """A preset name that walks from the preset folder to ``path`` (a YAML file), as a path would."""
    return os.path.relpath(path.with_suffix(''), dense.PRESET_DIR)


def write_preset(path: Path) -> None:
    path.write_text('task: segmentation\nmodel: biformer_tiny\nnum_classes: 3\n')


LABELS = r'labels must be classes in \[0, 150\) or ignore_index=255, got '
DENSE = [
    Case('upernet-num_classes-text', on_meta(dense.upernet, 'biformer_tiny', num_classes='150', **SHALLOW),
         ValueError, r"num_classes must be an int, got '150' \(str\); num_classes is the number of output classes"),
    Case('upernet-num_classes-float', on_meta(dense.upernet, 'biformer_tiny', num_classes=2.5, **SHALLOW),
         ValueError, r'num_classes must be an int, got 2\.5 \(float\)'),
    Case('sfpn-num_classes=0', on_meta(dense.semantic_fpn, 'biformer_tiny', num_classes=0, **SHALLOW), ValueError,
         r'num_classes must be >= 1, got 0'),
    Case('fpn_channels=0', on_meta(dense.fpn_backbone, 'biformer_tiny', fpn_channels=0, **SHALLOW), ValueError,
         r'fpn_channels must be >= 1, got 0; fpn_channels is the width of every FPN level'),
    Case('FPNBackbone-fpn_channels', lambda: dense.FPNBackbone(meta_create('biformer_tiny', features_only=True)(),
                                                               fpn_channels=256.0), ValueError,
         r'fpn_channels must be an int, got 256\.0'),
    Case('frozen_stages=1.5', on_meta(dense.fpn_backbone, 'biformer_tiny', frozen_stages=1.5, **SHALLOW), ValueError,
         r'frozen_stages must be an int, got 1\.5'),
    Case('out_indices=2', on_meta(dense.fpn_backbone, 'biformer_tiny', out_indices=2, **SHALLOW), ValueError,
         r'out_indices must be a sequence of stage indices, e\.g\. \(0, 1, 2, 3\) .* got 2; .* e\.g\. \(2, 3\)$'),
    Case('fpn-out_indices-unsorted', on_meta(dense.fpn_backbone, 'biformer_tiny', out_indices=(3, 1, 2), **SHALLOW),
         ValueError, r'not in increasing order .* pass out_indices=\(1, 2, 3\)'),
    Case('sfpn-extra_blocks', on_meta(dense.semantic_fpn, 'biformer_tiny', num_classes=3, extra_blocks='maxpool'),
         ValueError, r'extra_blocks cannot be set here: this builder takes the backbone options extra_norm, '
                     r'fpn_channels, frozen_stages, norm_eval, out_indices \('),
    Case('upernet-fpn_channels', on_meta(dense.upernet, 'biformer_tiny', num_classes=3, fpn_channels=64),
         ValueError, r'fpn_channels cannot be set here'),
    Case('upernet-features_only', on_meta(dense.upernet, 'biformer_tiny', num_classes=3, features_only=False),
         ValueError, r'features_only cannot be set here'),
    Case('upernet-head_channels', on_meta(dense.upernet, 'biformer_tiny', num_classes=3, head_channels='512'),
         ValueError, r"channels must be an int, got '512' \(str\)"),
    Case('upernet-dropout', on_meta(dense.upernet, 'biformer_tiny', num_classes=3, dropout=1.5, **SHALLOW),
         ValueError, r'dropout must be a number in \[0, 1\)'),
    Case('fcn-num_convs', lambda: dense.FCNHead(64, 3, num_convs=0), ValueError, r'num_convs must be >= 1, got 0'),
    Case('preset-path', with_file('evil.yaml', write_preset, lambda path: dense.upernet(preset_path_name(path))),
         ValueError, r'is neither a timm model nor a preset'),
    Case('load_preset-path', with_file('evil.yaml', write_preset, lambda path: dense.load_preset(
        preset_path_name(path))), ValueError, r'unknown preset .*evil.*; the presets are \['),
    Case('preset_file-and-name', with_file('mine.yaml', write_preset, lambda path: dense.upernet(
        'biformer_tiny', preset_file=path)), ValueError, r"pass a model or preset name, or preset_file, not both"),
    Case('preset_file-missing', lambda: dense.upernet(preset_file='/nonexistent/mine.yaml'), ValueError,
         r'preset_file /nonexistent/mine\.yaml cannot be read as YAML \(.*\); pass the path of a preset file'),
    Case('preset_file-not-a-preset', with_file('mine.yaml', lambda path: path.write_text('- 1\n'),
                                               lambda path: dense.upernet(preset_file=path)), ValueError,
         r'must be a mapping with at least task and model, .* got a list'),
    Case('preset_file-other-task', with_file('mine.yaml', write_preset, lambda path: dense.fpn_backbone(
        preset_file=path)), ValueError, r'preset_file .*mine\.yaml is a segmentation preset, not a detection one'),
    Case('no-name', lambda: dense.fpn_backbone(), ValueError, r'None is neither a timm model nor a preset; .* or '
                                                              r'preset_file=$'),
    Case('labels-150', upernet_loss(lambda: torch.full((2, 16, 16), 150)), ValueError, LABELS + r'150; map those'),
    Case('labels-300', upernet_loss(lambda: torch.full((2, 16, 16), 300)), ValueError, LABELS + '300'),
    Case('labels--1', upernet_loss(lambda: torch.full((2, 16, 16), -1)), ValueError, LABELS + r'-1; .* or pass the '
                                                                                              r'ignore_index'),
    Case('labels-float', upernet_loss(lambda: torch.zeros(2, 16, 16)), ValueError,
         r'labels must be integer class indices, got dtype torch\.float32; convert them with target\.long\(\)'),
    Case('labels-half-size', upernet_loss(lambda: torch.zeros(2, 8, 8, dtype=torch.long)), ValueError,
         r'labels of shape \[2, 8, 8\] do not fit logits of 2 images at 16x16; .* the size of the input images'),
    Case('labels-3-channels', upernet_loss(lambda: torch.zeros(2, 3, 16, 16, dtype=torch.long)), ValueError,
         r'labels must be \(B, H, W\) or \(B, 1, H, W\) class indices, got shape \[2, 3, 16, 16\]'),
    Case('labels-other-batch', upernet_loss(lambda: torch.zeros(3, 16, 16, dtype=torch.long)), ValueError,
         r'labels of shape \[3, 16, 16\] do not fit logits of 2 images'),
    Case('upernet-train-batch-1', train_one_image, ValueError,
         r'cannot train on a batch of 1 image: .* batch size >= 2 .* norm_eval=True .* model\.head\.eval\(\) .* '
         r'another norm'),
]

# ---------------------------------------------------------------------------------------------------------------
# pushing a converted folder: small stand-in files and the conversion.json that convert would write for them

import hashlib  # noqa: E402
import json  # noqa: E402
from unittest import mock  # noqa: E402

from biformer_zoo.tools import push  # noqa: E402


def converted_folder(edit_record: Callable[[Dict[str, Any]], None] = lambda record: None) -> Callable[[Path], None]:
    """Writes the converted files (a few bytes each) into ``folder`` and their record, edited by ``edit_record``."""
    def write(folder: Path) -> None:
        folder.mkdir()
        files = {}
        for name in push.CONVERTED_FILES:
            data = name.encode()
            (folder / name).write_bytes(data)
            files[name] = dict(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        record = dict(model='biformer_tiny.in1k', files=files)
        edit_record(record)
        (folder / push.RECORD_FILE).write_text(json.dumps(record))
    return write


def push_towards(folder: Path, endpoint: str = 'http://127.0.0.1:9') -> Any:
    """``push_to_hub`` towards ``endpoint`` (nothing listens on the discard port)."""
    from huggingface_hub import constants
    with mock.patch.object(constants, 'ENDPOINT', endpoint):
        return push.push_to_hub(folder, 'test-org/upload', token='hf_not_a_real_token')


def drop_record(record: Dict[str, Any]) -> None:
    record.clear()


PUSH = [
    Case('push-changed-file', with_file('out', converted_folder(
        lambda record: record['files']['README.md'].update(size=1)), push_towards), ValueError,
         r'holds files that are not what convert wrote: README\.md \(9 bytes, .* recorded 1 bytes.*\)\. Nothing was '
         r'uploaded'),
    Case('push-no-record', with_file('out', converted_folder(drop_record), push_towards), ValueError,
         r"has no readable conversion\.json \('files'\), the record of what `biformer-zoo convert` wrote"),
    Case('push-unreachable', with_file('out', converted_folder(), push_towards), PretrainedWeightsError,
         r"uploading .*out to the Hub repo 'test-org/upload' failed \(ConnectError: .*\)\. Check the network"),
]

CASES = MODEL_INPUTS + MODEL_ARGS + MODEL_NAMES + LAYERS + WEIGHTS + DENSE + PUSH


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

# ---------------------------------------------------------------------------------------------------------------
# the command line: (id, argv, the one line on stderr); '{tmp}' is a fresh folder holding file.txt, full/notes.txt
# (a folder with a stray file), done/ (a previous conversion's README.md and config.json), damaged.pth and the lock
# of a convert writing locked/

import re  # noqa: E402

from biformer_zoo import cli  # noqa: E402

CONVERT = ['convert', '--model', 'biformer_tiny', '--checkpoint', '{tmp}/damaged.pth', '--out']

CLI = [
    # usage errors (argparse)
    ('no-command', [],
     r'^biformer-zoo: error: the following arguments are required: command \(see biformer-zoo --help\)$'),
    ('unknown-command', ['frob'], r"^biformer-zoo: error: argument command: invalid choice: 'frob'"),
    ('convert-missing-args', ['convert', '--model', 'biformer_tiny'],
     r'^biformer-zoo convert: error: the following arguments are required: --checkpoint, --out \(see biformer-zoo '
     r'convert --help\)$'),
    ('list-format', ['list', '--format', 'xml'],
     r"^biformer-zoo list: error: argument --format: invalid choice: 'xml'"),
    ('bench-rounds-text', ['bench', '--rounds', 'many'], r"^biformer-zoo bench: error: .*invalid int value: 'many'"),
    # model names
    ('convert-unknown-model', ['convert', '--model', 'biformer_smol', '--checkpoint', 'x.pth', '--out', '{tmp}/out'],
     r"^biformer-zoo convert: error: unknown model 'biformer_smol'; `biformer-zoo list` shows"),
    ('convert-unknown-tag', ['convert', '--model', 'biformer_tiny', '--tag', 'in22k', '--checkpoint', 'x.pth', '--out',
                             '{tmp}/out'],
     r"'biformer_tiny\.in22k' is not in the weights manifest; known tags of biformer_tiny: .*Pass --tag"),
    ('convert-tag-disagrees', ['convert', '--model', 'biformer_tiny.in1k', '--tag', 'in22k', '--checkpoint', 'x.pth',
                               '--out', '{tmp}/out'], r"tag 'in1k' and --tag 'in22k' disagree; give the tag once"),
    ('report-unknown-model', ['report', 'biformer_smol'],
     r"^biformer-zoo report: error: unknown model 'biformer_smol'.*did you mean biformer_small"),
    ('report-pattern', ['report', 'nothing_here_*'], r"pattern 'nothing_here_\*' matches no timm model"),
    ('bench-unknown-model', ['bench', 'biformer_smol'], r"^biformer-zoo bench: error: unknown model 'biformer_smol'"),
    ('bench-unknown-baseline', ['bench', 'test_resnet', '--baseline', 'swin_tiy'], r"unknown model 'swin_tiy'"),
    # model arguments
    ('report-model-arg-text', ['report', 'biformer_tiny', '--model-arg', 'n_win=abc'],
     r"^biformer-zoo report: error: n_win must be an int, got 'abc' \(str\); n_win is the number of regions"),
    ('report-model-arg-form', ['report', 'biformer_tiny', '--model-arg', 'n_win'],
     r"model argument must look like KEY=VALUE \(e\.g\. n_win=16\), got 'n_win'"),
    ('report-model-arg-value', ['report', 'biformer_tiny', '--model-arg', 'n_win=0'],
     r'n_win must be >= 1, got 0'),
    ('report-model-arg-family', ['report', 'crossformer_tiny', '--model-arg', 'n_win=8'],
     r"crossformer_tiny cannot be built with .*unexpected keyword argument 'n_win'.*\(one command per family\)"),
    ('bench-model-arg-text', ['bench', 'biformer_tiny', '--baseline', 'none', '--model-arg', 'n_win=abc'],
     r"^biformer-zoo bench: error: n_win must be an int, got 'abc'"),
    # image sizes and run settings
    ('report-img-size-text', ['report', 'biformer_tiny', '--img-size', 'big'],
     r"image size must be an integer like 224 or HxW like 1280x800, got 'big'"),
    ('report-img-size-zero', ['report', 'biformer_tiny', '--img-size', '0'], r'two positive integers .* got .0.'),
    ('report-img-too-small', ['report', 'biformer_tiny', '--img-size', '16', '--model-arg', 'depths=(1,1,1,1)'],
     r'img_size must be an int or an \(H, W\) pair of ints >= 32, got \(16, 16\)'),
    ('report-batch-size', ['report', 'biformer_tiny', '--batch-size', '0'], r'batch_size must be at least 1, got 0'),
    ('bench-img-size', ['bench', 'test_resnet', '--img-size', '1x2x3'], r"image size must be .* got '1x2x3'"),
    ('bench-rounds', ['bench', 'test_resnet', '--rounds', '0'], r'rounds must be at least 1, got 0'),
    ('bench-json-format', ['bench', 'test_resnet', '--json', '--format', 'markdown'],
     r'--json means --format json; it conflicts with --format markdown'),
    # output folders
    ('convert-out-file', CONVERT + ['{tmp}/file.txt'], r'--out .*file\.txt is a file; pass a folder'),
    ('convert-out-stray-files', CONVERT + ['{tmp}/full'],
     r'--out .*full is not empty \(it holds notes\.txt\); pass a new or empty folder, or --overwrite'),
    ('convert-out-previous', CONVERT + ['{tmp}/done'],
     r'--out .*done already holds a conversion \(README\.md, config\.json\); pass --overwrite to replace it'),
    ('convert-out-unwritable', CONVERT + ['/proc/nope/x'],
     r'^biformer-zoo convert: error: --out /proc/nope/x cannot be written \(.*\); pass a folder you can write to$'),
    ('convert-out-under-file', CONVERT + ['{tmp}/file.txt/x'], r'--out .*x cannot be written'),
    ('convert-out-locked', CONVERT + ['{tmp}/locked'],
     r'another `biformer-zoo convert` is writing --out .*locked \(its lock .*\.locked\.convert\.lock exists\); wait '
     r'.* delete .* and run again$'),
    # checkpoints
    ('convert-no-checkpoint', CONVERT[:4] + ['{tmp}/none.pth', '--out', '{tmp}/out'],
     r'checkpoint .*none\.pth does not exist; pass the path of a checkpoint file \(an official \.pth'),
    ('convert-damaged-checkpoint', CONVERT + ['{tmp}/out'],
     r'damaged\.pth is not a readable checkpoint .* download it again'),
]


@pytest.mark.parametrize('row', CLI, ids=[row[0] for row in CLI])
def test_cli_error_is_one_line_and_exit_status_2(row, tmp_path, capsys, monkeypatch):
    _, argv, match = row
    monkeypatch.delenv('BIFORMER_ZOO_DEBUG', raising=False)
    (tmp_path / 'file.txt').write_text('')
    (tmp_path / 'damaged.pth').write_bytes(b'PK\x03\x04 not a checkpoint')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'notes.txt').write_text('')
    (tmp_path / 'done').mkdir()
    for name in ('README.md', 'config.json'):
        (tmp_path / 'done' / name).write_text('{}')
    (tmp_path / '.locked.convert.lock').write_text('1\n')
    code = cli.main([arg.replace('{tmp}', str(tmp_path)) for arg in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert (code, len(lines), 'Traceback' in err, re.search(match, lines[0]) is not None) == (2, 1, False, True), err
