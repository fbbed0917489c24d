"""``layers.embed``: CrossFormer's cross-scale embedding and merge."""

import pytest
import torch

from biformer_zoo.layers import CrossScaleEmbed, CrossScaleMerge


def test_cross_scale_embed_shapes_and_channels():
    embed = CrossScaleEmbed(3, 96, (4, 8, 16, 32), stride=4, channels_last=False)
    out = embed(torch.randn(1, 3, 50, 67))
    assert ([p.out_channels for p in embed.projs], tuple(out.shape)) == ([48, 24, 12, 12], (1, 96, 12, 16))


@pytest.mark.parametrize('size,expected', [((8, 8), (4, 4)), ((7, 9), (4, 5))])
def test_cross_scale_merge_pads_odd_sides(size, expected):
    merge = CrossScaleMerge(16, 32, (2, 4), channels_last=False)
    assert merge(torch.randn(1, 16, *size)).shape == (1, 32, *expected)


def test_cross_scale_embed_uses_space_to_depth_for_large_kernels_only():
    embed = CrossScaleEmbed(3, 96, (4, 8, 16, 32), stride=4)
    merge = CrossScaleMerge(16, 32, (2, 4))
    assert [p.uses_weight_grad for p in embed.projs] == [False, False, True, True]
    assert not any(p.uses_weight_grad for p in merge.reductions)


def test_cross_scale_channels_must_split():
    with pytest.raises(ValueError, match='multiple of 8'):
        CrossScaleEmbed(3, 100, (4, 8, 16, 32))
