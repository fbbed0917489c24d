"""``layers.reference_math``: one switch from every fast path to the plain math."""
import pytest
import torch

from biformer_zoo.layers import BiLevelRoutingAttention, RecomputeGeluMlp, reference_math
from biformer_zoo.layers.conv import DepthwiseConv2d, StridedConv2d


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
