"""``layers.mlp``: the MLP that recomputes its GELU equals timm's."""
import torch

from biformer_zoo.layers import RecomputeGeluMlp


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
