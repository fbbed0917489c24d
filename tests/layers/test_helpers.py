"""``layers.helpers``: the input checks pass correct input untouched (bad input: test_bad_input.py)."""
import pytest
import torch

from biformer_zoo.layers import AttentionBottleneck, C2fAttention
from biformer_zoo.layers import AttentionLePE, BiLevelRoutingAttention
from biformer_zoo.layers import CrossScaleEmbed, CrossScaleMerge, LSDAttention


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
