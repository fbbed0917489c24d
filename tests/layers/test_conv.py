"""``layers.conv``: the convs with CPU weight gradients of their own equal ``nn.Conv2d``."""
import pytest
import torch
import torch.nn.functional as F

from biformer_zoo.layers.conv import DepthwiseConv2d, StridedConv2d


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
