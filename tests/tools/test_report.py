"""Params/FLOPs report: hand-computed counts, attention counted whatever the implementation, the zoo against the
official fvcore numbers, a stable JSON layout and the CLI's exit codes."""
import contextlib
import csv
import io
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import biformer_zoo
from biformer_zoo.cli import main
from biformer_zoo.tools.arguments import parse_img_size, parse_model_args, resolve_model_names
from biformer_zoo.tools.flops import SDPA_UNCOUNTED, flop_analysis
from biformer_zoo.tools.report import PAPER_NUMBERS, profile, profiles_to_csv

torch.set_num_threads(2)

REFERENCE_FILE = Path(__file__).resolve().parents[3] / 'shared' / 'reference' / 'official_numbers.json'


class TinyAttention(nn.Module):
    """qkv linear, 2-head attention over tokens, output projection."""

    def __init__(self, dim: int, num_heads: int, explicit_matmul: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.explicit_matmul = explicit_matmul
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, tokens, head_dim)
        if self.explicit_matmul:
            attn = (q @ k.transpose(-2, -1)) * (dim // self.num_heads) ** -0.5  # (B, heads, tokens, tokens)
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TinyAttentionNet(nn.Module):
    """16x16 image -> 4x4 conv stem (8 channels, 16 tokens) -> 2 attention stages -> mean -> 10 classes."""

    def __init__(self, explicit_matmul: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.stages = nn.Sequential(*(TinyAttention(8, 2, explicit_matmul) for _ in range(2)))
        self.head = nn.Linear(8, 10)
        self.feature_info = [dict(module=f'stages.{i}', num_chs=8, reduction=4) for i in range(2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return self.head(self.stages(tokens).mean(1))


# Hand counts for one 3x16x16 image (1 multiply-add = 1 flop):
STEM_FLOPS = (8 * 4 * 4) * (3 * 4 * 4)  # output elements * (in_chans * kernel area) = 6144
STAGE_FLOPS = (
    16 * 8 * 24  # qkv linear: tokens * in * out = 3072
    + 1 * 2 * 16 * 16 * (4 + 4)  # attention: batch * heads * Lq * Lk * (d_qk + d_v) = 4096
    + 16 * 8 * 8  # proj linear = 1024
)
HEAD_FLOPS = 8 * 10  # 80
STAGE_PARAMS = (8 * 24 + 24) + (8 * 8 + 8)  # 288
OTHER_PARAMS = (3 * 8 * 4 * 4 + 8) + (8 * 10 + 10)  # stem + head = 482
ACTIVATIONS = 8 * 4 * 4 + 2 * (16 * 24 + (2 * 16 * 16 + 2 * 16 * 4) + 16 * 8) + 10  # conv, stages, head = 2442


@pytest.fixture(scope='module')
def tiny_profile():
    return profile(TinyAttentionNet(), 16)


def test_tiny_total_flops_match_hand_count(tiny_profile):
    assert tiny_profile.gflops * 1e9 == pytest.approx(STEM_FLOPS + 2 * STAGE_FLOPS + HEAD_FLOPS, abs=0.5)


def test_tiny_stage_flops_match_hand_count(tiny_profile):
    assert [round(s.gflops * 1e9) for s in tiny_profile.stages] == [STAGE_FLOPS, STAGE_FLOPS]


def test_tiny_params_per_stage_match_hand_count(tiny_profile):
    assert ([s.params for s in tiny_profile.stages], tiny_profile.other_params, tiny_profile.params) == (
        [STAGE_PARAMS, STAGE_PARAMS], OTHER_PARAMS, 2 * STAGE_PARAMS + OTHER_PARAMS)


def test_tiny_activations_match_hand_count(tiny_profile):
    assert tiny_profile.activations_m * 1e6 == pytest.approx(ACTIVATIONS, abs=0.5)


def test_sdpa_counted_like_explicit_matmuls():
    fused, explicit = TinyAttentionNet(explicit_matmul=False), TinyAttentionNet(explicit_matmul=True)
    x = torch.randn(2, 3, 16, 16)
    assert flop_analysis(fused, x).total() == flop_analysis(explicit, x).total() == 2 * (
        STEM_FLOPS + 2 * STAGE_FLOPS + HEAD_FLOPS)


def test_sdpa_counted_in_timm_pvt_v2():
    # fvcore alone counts timm's pvt_v2 attention (F.scaled_dot_product_attention) as zero
    model = timm.create_model('pvt_v2_b0').eval()
    with torch.no_grad():
        assert flop_analysis(model, torch.randn(1, 3, 64, 64)).by_operator()['scaled_dot_product_attention'] > 0


@pytest.mark.parametrize('explicit_matmul,expected', [(False, SDPA_UNCOUNTED), (True, 'softmax')])
def test_uncounted_ops_are_listed(explicit_matmul, expected):
    assert profile(TinyAttentionNet(explicit_matmul), 16).uncounted_ops[expected] == 2


class OpaqueSquare(torch.autograd.Function):
    """A custom autograd Function: traced as one ``prim::PythonOp`` whose contents fvcore cannot see."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class OpaqueNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OpaqueSquare.apply(x)


def test_autograd_functions_are_listed_as_uncounted():
    assert profile(OpaqueNet(), (1, 4, 4)).uncounted_ops == {'python op OpaqueSquare': 1}


# One model per block design by default (tracing a large model at 224 takes seconds on 2 cores);
# BIFORMER_ZOO_ALL_FLOPS=1 checks every family member.
FLOPS_CHECKED = (biformer_zoo.list_zoo_models() if os.environ.get('BIFORMER_ZOO_ALL_FLOPS') == '1' else
                 ['biformer_tiny', 'biformer_stl', 'crossformer_tiny', 'crossformerpp_small'])


@pytest.mark.parametrize('name', FLOPS_CHECKED)
def test_zoo_flops_match_official_fvcore_at_224(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        gflops = flop_analysis(model, torch.randn(1, 3, 224, 224)).total() / 1e9
    assert gflops == pytest.approx(PAPER_NUMBERS[name].fvcore_gflops, rel=0.005)  # README: 0.43% lower at most


@pytest.fixture(scope='module')
def zoo_json():
    """``biformer-zoo report biformer_tiny --format json``: exit code and the parsed single entry."""
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        code = main(['report', 'biformer_tiny', '--format', 'json'])
    (entry,) = json.loads(capture.getvalue())
    return code, entry


def test_zoo_stages_are_the_four_stages(zoo_json):
    assert [s['name'] for s in zoo_json[1]['stages']] == [f'stages.{i}' for i in range(4)]


def test_zoo_report_compares_with_official_numbers(zoo_json):
    reference = zoo_json[1]['reference']
    assert (reference['params_diff'], abs(reference['official_fvcore_gflops_diff_pct']) < 0.5) == (0, True)


def test_features_only_counts_backbone_without_norm_and_head():
    with torch.device('meta'):
        full = timm.create_model('biformer_tiny')
    head_and_norm = sum(p.numel() for n, p in full.named_parameters() if n.startswith(('head.', 'norm.')))
    assert profile('biformer_tiny', '64x96', features_only=True).params == (
        sum(p.numel() for p in full.parameters()) - head_and_norm)


@pytest.mark.skipif(not REFERENCE_FILE.exists(), reason='shared/reference is not beside the repository')
def test_shipped_paper_numbers_equal_reference_file():
    reference = json.loads(REFERENCE_FILE.read_text())
    shipped = {name: (n.params_exact, n.fvcore_gflops, n.paper_params_m, n.paper_gflops, n.top1)
               for name, n in PAPER_NUMBERS.items()}
    assert shipped == {
        name: (r['params_exact'], r['fvcore_gflops'], r['paper']['params_M'], r['paper']['gflops'], r['top1'])
        for name, r in reference.items() if not name.startswith('_')}


@pytest.mark.parametrize('text,expected', [('224', (224, 224)), ('1280x800', (1280, 800)), (96, (96, 96))])
def test_parse_img_size_is_height_first(text, expected):
    assert parse_img_size(text) == expected


@pytest.mark.parametrize('text', ['12x', 'x', '224x224x3', '0', 'big'])
def test_parse_img_size_rejects_bad_text(text):
    with pytest.raises(ValueError, match='image size'):
        parse_img_size(text)


def test_model_args_parse_literals_and_strings():
    assert parse_model_args(['n_win=16', 'topks=(1, 4, 16, None)', 'stem_type=overlap']) == dict(
        n_win=16, topks=(1, 4, 16, None), stem_type='overlap')


def test_model_args_reach_the_model():
    with torch.device('meta'):
        expected = sum(p.numel() for p in timm.create_model('test_vit', num_classes=10, img_size=32).parameters())
    assert profile('test_vit', 32, model_kwargs=dict(num_classes=10)).params == expected


def test_model_arg_a_model_does_not_take_is_a_value_error():
    with pytest.raises(ValueError, match=r"crossformer_tiny cannot be built with \{'n_win': 16\}.*one command per"):
        profile('crossformer_tiny', 64, model_kwargs=dict(n_win=16))


def test_channels_first_input_size_builds_the_model_with_those_channels():
    assert profile('test_vit', (1, 32, 32)).input_size == (1, 32, 32)


def test_tagged_name_is_compared_with_the_architectures_paper_numbers():
    assert profile('biformer_tiny.in1k', 224).reference == profile('biformer_tiny', 224).reference is not None


def test_patterns_expand_to_zoo_and_timm_models():
    assert resolve_model_names(['biformer_t*', 'resnet18']) == ['biformer_tiny', 'resnet18']


# JSON layout: changing it needs a REPORT_SCHEMA_VERSION bump and an update here.
PROFILE_KEYS = {
    'model', 'input_size', 'batch_size', 'features_only', 'params', 'trainable_params', 'gflops', 'activations_m',
    'stages', 'model_kwargs', 'other_params', 'other_gflops', 'gflops_by_operator', 'uncounted_ops', 'reference',
    'schema_version', 'notes'}
STAGE_KEYS = {'name', 'params', 'gflops', 'gflops_by_operator'}
REFERENCE_KEYS = {
    'official_params', 'params_diff', 'official_fvcore_gflops', 'official_fvcore_gflops_diff_pct', 'paper_params_m',
    'paper_params_diff_pct', 'paper_gflops', 'paper_gflops_diff_pct', 'top1'}


def test_cli_json_schema_is_stable(zoo_json):
    code, entry = zoo_json
    assert (code, set(entry), {k for s in entry['stages'] for k in s}, set(entry['reference']),
            entry['schema_version']) == (0, PROFILE_KEYS, STAGE_KEYS, REFERENCE_KEYS, 1)


def test_csv_has_one_row_per_model_and_size():
    profiles = [profile(TinyAttentionNet(), size) for size in (16, '16x32')]
    rows = list(csv.DictReader(io.StringIO(profiles_to_csv(profiles))))
    assert [(r['height'], r['width'], r['stage1_name']) for r in rows] == [('16', '16', 'stages.1'),
                                                                          ('16', '32', 'stages.1')]


def test_cli_markdown_has_all_three_tables(capsys):
    assert main(['report', 'test_vit', '--img-size', '32', '--format', 'markdown']) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith('**')] == [
        '**Parameters and FLOPs**', '**Per stage**', '**GFLOPs per operator**']
