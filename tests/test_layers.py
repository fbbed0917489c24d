"""Reusable layers: the fast paths equal plain reference implementations of the same math."""
import pytest
import torch
import torch.nn.functional as F

from biformer_zoo.layers import AttentionBottleneck, C2fAttention
from biformer_zoo.layers import AttentionLePE, BiLevelRoutingAttention, RecomputeGeluMlp, reference_math
from biformer_zoo.layers import CrossScaleEmbed, CrossScaleMerge, LSDAttention
from biformer_zoo.layers import bra
from biformer_zoo.layers.bra import count_routed, routed_attention_impl
from biformer_zoo.layers.conv import DepthwiseConv2d, StridedConv2d

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
        assert layer._choose_impl(torch.empty(1, size, size, 16)) == expected, (topk, size)
        with count_routed(layer):
            assert layer.attn_impl == 'reference'
        assert layer.attn_impl == 'auto'


def _fast_and_reference(layer: torch.nn.Module, x: torch.Tensor):
    """Output and gradients of ``layer`` on its default path and inside ``reference_math()``."""
    results = []
    for reference in (False, True):
        with reference_math(reference):
            x_ = x.detach().requires_grad_()
            out = layer(x_)
            results.append((out, torch.autograd.grad(out.square().sum(), (x_, *layer.parameters()))))
    return results


@pytest.mark.parametrize('make', [
    lambda: BiLevelRoutingAttention(16, num_heads=2, num_regions=2, topk=2, channels_last=True, attn_impl='gather'),
    lambda: RecomputeGeluMlp(16, 32),
    lambda: DepthwiseConv2d(16, 5),
    lambda: StridedConv2d(3, 16, kernel_size=8, stride=2, padding=3),
], ids=['bra', 'recompute_gelu_mlp', 'depthwise_conv', 'strided_conv'])
def test_fast_paths_equal_the_reference_math_switch(make):
    """Each layer's fast training path against its plain math, selected through the public switch."""
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64) if isinstance(layer, StridedConv2d) else \
        torch.randn(2, 16, 6, 6, dtype=torch.float64) if isinstance(layer, DepthwiseConv2d) else \
        torch.randn(2, 6, 6, 16, dtype=torch.float64)
    (fast_out, fast_grads), (ref_out, ref_grads) = _fast_and_reference(layer, x)
    torch.testing.assert_close(fast_out, ref_out)
    torch.testing.assert_close(fast_grads, ref_grads)


def test_reference_math_restores_the_setting():
    from biformer_zoo.layers import use_reference_math
    with reference_math():
        assert use_reference_math()
        with reference_math(False):
            assert not use_reference_math()
        assert use_reference_math()
    assert not use_reference_math()


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


def test_recompute_gelu_mlp_equals_timm_mlp():
    """Same parameters as timm's Mlp, same output and gradients (float64), with only the GELU input saved."""
    from timm.layers import Mlp

    torch.manual_seed(0)
    plain, recompute = Mlp(16, 48).double(), RecomputeGeluMlp(16, 48).double()
    recompute.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = recompute(x)
    expected = torch.autograd.grad(plain(x).square().sum(), [x, *plain.parameters()])
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), [x, *recompute.parameters()]), expected)
    assert torch.Size([2, 5, 7, 48]) in saved and saved.count(torch.Size([2, 5, 7, 48])) == 1


def test_recompute_gelu_mlp_under_bf16_autocast_matches_timm_mlp():
    from timm.layers import Mlp

    torch.manual_seed(0)
    plain, recompute = Mlp(16, 48), RecomputeGeluMlp(16, 48)
    recompute.load_state_dict(plain.state_dict())
    x = torch.randn(4, 16, requires_grad=True)
    grads = []
    for mlp in (plain, recompute):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = mlp(x)
        grads.append([out.dtype, *torch.autograd.grad(out.float().square().sum(), [x, *mlp.parameters()])])
    assert grads[1][0] == torch.bfloat16
    torch.testing.assert_close(grads[1][1:], grads[0][1:])


@pytest.mark.parametrize('in_chans,kernel,stride,size,input_grad', [
    (3, 32, 4, (64, 80), False), (3, 16, 4, (67, 45), True), (5, 8, 2, (33, 30), True)])
def test_strided_conv_gradients_equal_plain_conv(in_chans, kernel, stride, size, input_grad):
    """The space-to-depth weight gradient of the large stem kernels against autograd through F.conv2d, float64."""
    conv = StridedConv2d(in_chans, 6, kernel, stride=stride, padding=(kernel - stride) // 2).double()
    assert conv.uses_weight_grad
    x = torch.randn(2, in_chans, *size, dtype=torch.float64, requires_grad=input_grad)
    out = conv(x)
    assert out.grad_fn is not None and 'ConvWeightGrad' in type(out.grad_fn).__name__
    grad = torch.randn_like(out)
    out.backward(grad)
    reference = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=(kernel - stride) // 2)
    inputs = [conv.weight, conv.bias] + ([x] if input_grad else [])
    expected = torch.autograd.grad(reference, inputs, grad)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    for got, want in zip([conv.weight.grad, conv.bias.grad] + ([x.grad] if input_grad else []), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('make_conv', [
    lambda: StridedConv2d(3, 4, 16, stride=4, padding=6), lambda: DepthwiseConv2d(3, 5)], ids=['strided', 'depthwise'])
def test_weight_grad_convs_work_under_torch_func_grad(make_conv):
    """torch.func transforms need the Function's setup_context; the gradients equal autograd's."""
    conv = make_conv().double()
    assert conv.uses_weight_grad
    x = torch.randn(1, 3, 32, 40, dtype=torch.float64)
    params = {name: p.detach() for name, p in conv.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(conv, p, (x,)).square().sum())(params)
    expected = torch.autograd.grad(conv(x).square().sum(), [conv.weight, conv.bias])
    torch.testing.assert_close([grads['weight'], grads['bias']], list(expected))


@pytest.mark.parametrize('kernel,size,channels_last', [
    (5, (9, 13), True), (5, (6, 1), False), (5, (1, 7), True), (3, (7, 7), True)])
def test_depthwise_conv_gradients_equal_plain_conv(kernel, size, channels_last):
    """The column-split weight gradient of 5-wide depthwise kernels against autograd through F.conv2d, float64."""
    conv = DepthwiseConv2d(6, kernel).double()
    assert conv.uses_weight_grad == (kernel == 5)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    out = conv(x)
    assert (out.grad_fn is not None and 'ConvWeightGrad' in type(out.grad_fn).__name__) == conv.uses_weight_grad
    grad = torch.randn_like(out)
    out.backward(grad)
    reference = F.conv2d(x, conv.weight, conv.bias, padding=kernel // 2, groups=6)
    expected = torch.autograd.grad(reference, [conv.weight, conv.bias, x], grad)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    for got, want in zip([conv.weight.grad, conv.bias.grad, x.grad], expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bra_lepe_uses_the_column_split_weight_gradient():
    layer = BiLevelRoutingAttention(16, num_heads=2, num_regions=2, topk=1)
    x = torch.randn(1, 16, 8, 8)
    out = layer.lepe(x)
    assert isinstance(layer.lepe, DepthwiseConv2d) and 'ConvWeightGrad' in type(out.grad_fn).__name__


def test_depthwise_conv_needs_odd_kernel():
    with pytest.raises(ValueError, match='odd'):
        DepthwiseConv2d(8, 4)


@pytest.mark.parametrize('kernel', [3, 5])
def test_residual_depthwise_conv_equals_input_plus_conv(kernel):
    """residual=True folds ``x +`` into the kernel centre: same output and gradients, same state dict as nn.Conv2d."""
    conv = DepthwiseConv2d(6, kernel, residual=True).double()
    plain = torch.nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6).double()
    assert set(conv.state_dict()) == set(plain.state_dict()) == {'weight', 'bias'}
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, reference = conv(x), x + plain(x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)
    want = torch.autograd.grad(reference, [x, plain.weight, plain.bias], grad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# input checks (bad input: test_bad_input.py): correct input passes them untouched

# the layers users call, each with the (B, C, H, W) channels it takes
CHECKED_LAYERS = {
    'bra': (lambda: BiLevelRoutingAttention(16, num_heads=2, num_regions=2, topk=2), 16),
    'lepe': (lambda: AttentionLePE(16, num_heads=2), 16),
    'lsda': (lambda: LSDAttention(16, num_heads=2), 16),
    'embed': (lambda: CrossScaleEmbed(3, 16, channels_last=False), 3),
    'merge': (lambda: CrossScaleMerge(16, 32, channels_last=False), 16),
    'bottleneck': (lambda: AttentionBottleneck(16, 'bra', num_heads=2, num_regions=2, topk=2), 16),
    'c2f': (lambda: C2fAttention(32, 32, num_heads=2, attention='lsda'), 32),
}


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', CHECKED_LAYERS)
def test_low_precision_input_runs_under_autocast(name, dtype):
    """A float16/bfloat16 map into float32 weights runs under autocast (refused outside it: test_bad_input.py)."""
    factory, chans = CHECKED_LAYERS[name]
    torch.manual_seed(0)
    layer = factory().eval()
    x = torch.randn(1, chans, 16, 16)
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out, reference = layer(x.to(dtype)), layer(x)
    assert out.shape == reference.shape and (out.float() - reference.float()).norm() < 0.05 * reference.float().norm()


@pytest.mark.parametrize('channels_last', [False, True])
def test_square_map_whose_side_equals_dim_is_taken_in_either_layout(channels_last):
    """(1, 8, 8, 8) is a valid map in both layouts: the layout hint only fires when the channels do not match."""
    layer = BiLevelRoutingAttention(8, num_heads=2, num_regions=2, topk=1, channels_last=channels_last).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert layer(x).shape == x.shape

