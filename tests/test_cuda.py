"""On a CUDA GPU: the routed attention's executions against the plain math, mixed precision, torch.compile,
determinism and CUDA graphs. Skipped where torch sees no GPU (CI); ``benchmarks/cuda_device.sh`` runs them after
its measurements (docs/performance.md says what ran where)."""
import copy

import pytest
import timm
import torch

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.layers import BiLevelRoutingAttention
from biformer_zoo.layers.bra import routed_attention_impl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

REDUCED_DEPTHS = (1, 1, 2, 1)


def _rel_error(value, reference) -> float:
    value, reference = torch.cat([v.flatten().double() for v in value]), torch.cat(
        [r.flatten().double() for r in reference])
    return ((value - reference).norm() / reference.norm()).item()


def _forward_backward(layer, x, attn_impl, dtype=None):
    """Output and input/parameter gradients of ``layer`` with ``attn_impl``, optionally under autocast."""
    x = x.detach().requires_grad_()
    with routed_attention_impl(layer, attn_impl), torch.autocast('cuda', dtype=dtype or torch.float32,
                                                                 enabled=dtype is not None):
        out = layer(x)
    grads = torch.autograd.grad(out.float().square().mean(), (x, *layer.parameters()))
    return out.float(), grads


# (map height, width, channels, heads, regions per side, topk, qk_dim): BiFormer-S's first two routed stages at
# 224, a padded odd map (regions of 10x9 tokens: two query tiles per region in 'triton'), every region routed
# (regions of 16 tokens), queries/keys narrower than the values with head dim 8 (regions of 3x5 tokens)
SHAPES = [(56, 56, 64, 2, 7, 1, None), (28, 28, 128, 4, 7, 4, None), (30, 27, 64, 2, 3, 2, None),
          (12, 12, 32, 2, 3, 9, None), (9, 15, 32, 4, 3, 4, 16)]


@pytest.mark.parametrize('attn_impl', ['triton', 'gather', 'dense'])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_cuda_paths_equal_the_plain_math_in_fp32(shape, attn_impl):
    height, width, dim, heads, regions, topk, qk_dim = shape
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(dim, heads, regions, topk, qk_dim=qk_dim, channels_last=True).cuda()
    x = torch.randn(2, height, width, dim, device='cuda')
    out, grads = _forward_backward(layer, x, attn_impl)
    ref_out, ref_grads = _forward_backward(layer, x, 'reference')
    # the Triton kernels multiply fp32 in full precision unless torch.backends.cuda.matmul.allow_tf32 says otherwise
    assert _rel_error([out], [ref_out]) < 2e-3
    assert _rel_error(grads, ref_grads) < 2e-3


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('attn_impl', ['triton', 'gather'])
def test_cuda_paths_under_autocast_close_to_fp32(attn_impl, dtype):
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(128, 4, 7, 4, channels_last=True).cuda()
    x = torch.randn(4, 28, 28, 128, device='cuda')
    out, grads = _forward_backward(layer, x, attn_impl, dtype)
    ref_out, ref_grads = _forward_backward(layer, x, 'reference')
    assert all(torch.isfinite(g).all() for g in grads)
    # the suite's bound for bf16 autocast against fp32 (test_hardening.BF16_REL_TOL)
    assert _rel_error([out], [ref_out]) < 0.05 and _rel_error(grads, ref_grads) < 0.05


def test_auto_runs_triton_on_cuda():
    layer = BiLevelRoutingAttention(64, 2, 7, 1).cuda()
    assert layer.auto_impl(torch.empty(1, 56, 56, 64, device='cuda')) == 'triton'


def test_triton_backward_is_deterministic_without_the_flag():
    """dK/dV go through the inverse routing, not atomics: two backward passes give the same bits (no LePE: cuDNN's
    depthwise conv backward is not deterministic without the flag)."""
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(64, 2, 7, 4, side_dwconv=0, channels_last=True).cuda()
    x = torch.randn(4, 28, 28, 64, device='cuda')
    first, second = (_forward_backward(layer, x, 'triton', torch.bfloat16)[1] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _reduced(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, depths=REDUCED_DEPTHS, num_classes=10).cuda()


@pytest.mark.parametrize('name', ['biformer_tiny'])
def test_compiled_training_step_equals_eager(name):
    """Inductor on CUDA, BiFormer's routed attention ('auto': the Triton kernels' autograd Function) inside the
    graph."""
    model = _reduced(name)
    compiled = torch.compile(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 96, device='cuda')
    results = []
    for m in (model, compiled):
        out = m(x)
        grads = torch.autograd.grad(out.square().mean(), list(m.parameters()))
        results.append((out, grads))
    assert _rel_error([results[1][0]], [results[0][0]]) < 2e-3
    assert _rel_error(results[1][1], results[0][1]) < 2e-3


@pytest.mark.parametrize('attn_impl', ['auto', 'gather'])
def test_training_step_is_deterministic_with_the_flag(attn_impl):
    model = _reduced('biformer_tiny')
    x = torch.randn(4, 3, 128, 128, device='cuda')
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        with routed_attention_impl(model, attn_impl):
            for _ in range(2):
                out = model(x)
                grads.append(torch.autograd.grad(out.square().mean(), list(model.parameters())))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize('name', ['biformer_tiny', 'crossformer_tiny'])
def test_eval_replays_as_a_cuda_graph(name):
    model = _reduced(name).eval()
    static_x = torch.randn(2, 3, 128, 128, device='cuda')
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (compiles the Triton kernels) outside the capture
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_out, model(new_x), rtol=1e-4, atol=1e-4)
