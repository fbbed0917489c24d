"""``layers.bra``: Bi-Level Routing Attention and the LePE global attention, each execution of the routed attention
against a step-by-step reference (the Triton kernels and the argument space: test_routed_attention)."""
import pytest
import torch
import torch.nn.functional as F

from biformer_zoo.layers import AttentionLePE, BiLevelRoutingAttention, RecomputeGeluMlp
from biformer_zoo.layers import bra
from biformer_zoo.layers.bra import count_routed, routed_attention_impl
from biformer_zoo.layers.conv import DepthwiseConv2d


# the executions of BRA that train on the CPU: plain math, gathered tokens with the custom backward, dense masked
PATHS = ('reference', 'gather', 'dense')


def bra_on_path(path: str, *args, **kwargs) -> BiLevelRoutingAttention:
    return BiLevelRoutingAttention(*args, attn_impl=path, **kwargs)


def reference_bra(layer: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Bi-level routing attention written out step by step on a (B, H, W, C) map, with per-region loops."""
    B, H, W, C = x.shape
    n = layer.num_regions
    pad_b, pad_r = (-H) % n, (-W) % n
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = x.shape[1:3]
    rh, rw = Hp // n, Wp // n
    qkv = layer.qkv(x)
    q, k, v = qkv.split([layer.qk_dim, layer.qk_dim, layer.dim], dim=-1)

    def region(t, r):  # tokens of region r: (B, rh * rw, channels)
        i, j = divmod(r, n)
        return t[:, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw].reshape(B, rh * rw, -1)

    q_mean = torch.stack([region(q, r).mean(1) for r in range(n * n)], 1)
    k_mean = torch.stack([region(k, r).mean(1) for r in range(n * n)], 1)
    routes = ((q_mean * layer.scale) @ k_mean.transpose(1, 2)).topk(layer.topk, dim=-1).indices  # (B, R, topk)
    out = torch.zeros(B, Hp, Wp, layer.dim)
    heads = layer.num_heads
    for b in range(B):
        for r in range(n * n):
            qr = region(q, r)[b].view(rh * rw, heads, -1).transpose(0, 1)
            ks = torch.cat([region(k, int(s))[b] for s in routes[b, r]]).view(-1, heads, layer.qk_dim // heads)
            vs = torch.cat([region(v, int(s))[b] for s in routes[b, r]]).view(-1, heads, layer.dim // heads)
            attn = ((qr * layer.scale) @ ks.permute(1, 2, 0)).softmax(-1)
            o = (attn @ vs.transpose(0, 1)).transpose(0, 1).reshape(rh, rw, layer.dim)
            i, j = divmod(r, n)
            out[b, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw] = o
    out = out + layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return layer.proj(out)[:, :H, :W]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('size', [(14, 14), (9, 13), (3, 5)])
@pytest.mark.parametrize('topk', [1, 4])
def test_bra_equals_reference(size, topk, path):
    torch.manual_seed(0)
    layer = bra_on_path(path, 32, num_heads=4, num_regions=3, topk=topk, channels_last=True).double().eval()
    x = torch.randn(2, *size, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_bra(layer, x))


def test_bra_nchw_equals_channels_last():
    torch.manual_seed(0)
    nchw = BiLevelRoutingAttention(16, num_heads=2, num_regions=4, topk=3).eval()
    nhwc = BiLevelRoutingAttention(16, num_heads=2, num_regions=4, topk=3, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(1, 16, 10, 7)
    with torch.no_grad():
        torch.testing.assert_close(nchw(x), nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.mark.parametrize('topk', [1, 2])
@pytest.mark.parametrize('path', PATHS)
def test_bra_gradients_equal_reference(path, topk):
    """Every training path (the gather path's custom backward runs the CPU flash kernels here; tests/test_cuda.py
    covers its CUDA backward); topk=1 keeps the gathered tokens for backward, larger topk gathers again."""
    torch.manual_seed(0)
    layer = bra_on_path(path, 16, num_heads=2, num_regions=2, topk=topk, channels_last=True).double()
    x = torch.randn(1, 6, 5, 16, dtype=torch.float64, requires_grad=True)
    inputs = (x, *layer.parameters())
    g_fast = torch.autograd.grad(layer(x).square().sum(), inputs)
    g_ref = torch.autograd.grad(reference_bra(layer, x).square().sum(), inputs)
    torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize('topk', [1, 2])
def test_bra_and_mlp_work_under_torch_func_grad(topk):
    """torch.func transforms need the autograd Functions in setup_context form; the gradients equal autograd's."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        bra_on_path('gather', 16, num_heads=2, num_regions=2, topk=topk, channels_last=True),
        RecomputeGeluMlp(16, 32)).double()
    x = torch.randn(1, 6, 5, 16, dtype=torch.float64)
    params = {name: p.detach() for name, p in block.named_parameters()}

    def loss(p: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, p, (x,)).square().sum()

    grads, grad_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    x.requires_grad_()
    expected = torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()])
    torch.testing.assert_close([grad_x, *grads.values()], list(expected))


def test_bra_auto_picks_dense_only_where_routing_keeps_many_regions():
    """'auto': masked dense when it scores at most 4x the routed pairs on a small map, gathered tokens elsewhere on
    the CPU (triton on CUDA); count_routed runs the plain routed math (what FLOP counts describe) and restores."""
    for topk, size, expected in [(16, 14, 'dense'), (4, 28, 'gather'), (16, 35, 'gather'), (1, 7, 'gather')]:
        layer = BiLevelRoutingAttention(16, num_heads=2, num_regions=7, topk=topk)
        assert layer.auto_impl(torch.empty(1, size, size, 16)) == expected, (topk, size)
        with count_routed(layer):
            assert layer.attn_impl == 'reference'
        assert layer.attn_impl == 'auto'


def test_bra_attn_impl_is_checked():
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        BiLevelRoutingAttention(16, num_heads=2, attn_impl='fast')
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        with routed_attention_impl(BiLevelRoutingAttention(16, num_heads=2), 'flash'):
            pass


def test_routing_mask_additive_form_matches_boolean():
    """The float mask the dense path passes to SDPA is the boolean mask in SDPA's own additive form."""
    routed = torch.stack([torch.randperm(9)[:3] for _ in range(2 * 9)]).view(2, 9, 3)
    allowed = bra.routing_mask(routed, 3, 6, 9)
    additive = bra.routing_mask(routed, 3, 6, 9, dtype=torch.float32)
    assert allowed.shape == additive.shape == (2, 1, 54, 54) and allowed.dtype == torch.bool
    assert allowed.sum(-1).unique().tolist() == [3 * 2 * 3]  # 3 routed regions of 2x3 tokens per query
    torch.testing.assert_close(additive, torch.zeros(additive.shape).masked_fill(~allowed, float('-inf')))


@pytest.mark.parametrize('lepe_on_value', [False, True])
def test_attention_lepe_equals_reference(lepe_on_value):
    torch.manual_seed(0)
    layer = AttentionLePE(32, num_heads=4, lepe_on_value=lepe_on_value).double().eval()
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    B, C, H, W = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = layer.qkv(tokens).chunk(3, dim=-1)
    split = lambda t: t.view(B, H * W, 4, C // 4).transpose(1, 2)  # noqa: E731
    attn = (split(q) @ split(k).transpose(-1, -2) * (C // 4) ** -0.5).softmax(-1)
    out = (attn @ split(v)).transpose(1, 2).reshape(B, H * W, C)
    lepe_in = v.transpose(1, 2).reshape(B, C, H, W) if lepe_on_value else x
    out = out + layer.lepe(lepe_in).flatten(2).transpose(1, 2)
    expected = layer.proj(out).transpose(1, 2).reshape(B, C, H, W)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize('kwargs,match', [
    (dict(dim=16, num_regions=2, topk=5), 'topk'),
    (dict(dim=16, num_regions=0, topk=1), 'num_regions'),
    (dict(dim=18, num_heads=4, num_regions=2, topk=1), 'divisible'),
])
def test_bra_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiLevelRoutingAttention(**kwargs)


def test_bra_lepe_uses_the_column_split_weight_gradient():
    layer = BiLevelRoutingAttention(16, num_heads=2, num_regions=2, topk=1)
    x = torch.randn(1, 16, 8, 8)
    out = layer.lepe(x)
    assert isinstance(layer.lepe, DepthwiseConv2d) and 'ConvWeightGrad' in type(out.grad_fn).__name__


@pytest.mark.parametrize('channels_last', [False, True])
def test_square_map_whose_side_equals_dim_is_taken_in_either_layout(channels_last):
    """(1, 8, 8, 8) is a valid map in both layouts: the layout hint only fires when the channels do not match."""
    layer = BiLevelRoutingAttention(8, num_heads=2, num_regions=2, topk=1, channels_last=channels_last).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert layer(x).shape == x.shape
