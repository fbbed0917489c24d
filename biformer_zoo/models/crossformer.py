"""CrossFormer and CrossFormer++: vision transformers built on cross-scale embeddings and grouped attention.

Papers: CrossFormer: A Versatile Vision Transformer Based on Cross-scale Attention (Wang et al., ICLR 2022,
https://arxiv.org/abs/2108.00154); CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention
(Wang et al., TPAMI, https://arxiv.org/abs/2303.06908).
Official code: https://github.com/cheerss/CrossFormer (CrossFormer-T/S/B/L checkpoints from the old ``crossformer``
branch, CrossFormer++ from ``main``).

Same architectures and parameters as the official models; official checkpoints of both branches load through
``checkpoint_filter_fn``. Differences from the official code:
* any input size (H, W >= 32, non-square, odd): every block pads its map to whole groups and masks the padding out
  of attention, as the official detection backbones do; the merging layers zero-pad odd sides (the official ones
  only take even sides). The group shape follows the official rule (``biformer_zoo.layers.lsda.group_layout``):
  at the sizes where the official models run the results are the same;
* ``forward`` changes no state (the official detection backbone rewrites a block's SDA/LDA flag on a small input);
* attention through ``F.scaled_dot_product_attention`` with the dynamic position bias as the mask (explicit matmuls
  when training on CPU), the bias computed once per block call (cached in eval mode);
* the timm model contract (``features_only``, ``forward_intermediates``, ``reset_classifier``, ...).
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, Mlp, calculate_drop_path_rates, to_ntuple
from timm.models import generate_default_cfgs, register_model

from ..layers import CrossScaleEmbed, CrossScaleMerge, LSDAttention
from ..layers.helpers import check_int_arg, check_rate
from ._builder import create_pyramid_model, map_official_state_dict, pretrained_cfgs
from ._pyramid import CheckpointedStage, PyramidModel, check_depths, check_mlp_ratio, check_per_stage

__all__ = ['CrossFormer']


class CrossFormerBlock(nn.Module):
    """Pre-norm SDA or LDA attention and MLP on (B, H, W, C) maps, optionally followed by a cooling layer.

    The amplitude cooling layer of CrossFormer++ (``cooling=True``) is a 3x3 depthwise conv then a LayerNorm,
    applied to the block output without a residual connection (``ex_conv``/``ex_ln`` in the official code).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            group_size: int = 7,
            interval: int = 8,
            long_distance: bool = False,
            group_rule: str = 'crossformer',
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            cooling: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LSDAttention(
            dim, num_heads, group_size=group_size, interval=interval, long_distance=long_distance,
            group_rule=group_rule, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
            proj_drop=proj_drop, channels_last=True)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cooling else None
        self.ex_ln = nn.LayerNorm(dim) if cooling else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        if self.ex_conv is not None and self.ex_ln is not None:
            x = self.ex_ln(self.ex_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x


class CrossFormerStage(CheckpointedStage):
    """Cross-scale merging (or identity after the stem), then blocks alternating SDA and LDA; NCHW in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            group_size: int,
            interval: int,
            merge_kernel_sizes: Sequence[int] = (),
            cooling_layers: bool = False,
            drop_path: Sequence[float] = (),
            **block_kwargs: Any,
    ):
        super().__init__()
        if merge_kernel_sizes:
            self.downsample = CrossScaleMerge(in_dim, dim, merge_kernel_sizes, channels_last=True)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            CrossFormerBlock(
                dim, num_heads, group_size=group_size, interval=interval, long_distance=j % 2 == 1,
                drop_path=drop_path[j] if drop_path else 0.,
                cooling=cooling_layers and (j + 1) % 3 == 0 and j < depth - 1,  # every third block but the last
                **block_kwargs)
            for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        return self.forward_blocks(x).permute(0, 3, 1, 2)


class CrossFormer(PyramidModel):
    """CrossFormer / CrossFormer++ backbone and classifier.

    Args (``in_chans``, ``num_classes`` and ``global_pool`` as in ``PyramidModel``):
        embed_dim: Channels of the first stage; stage i has ``embed_dim * 2**i``.
        depths: Blocks per stage; even blocks use SDA, odd blocks LDA.
        num_heads: Attention heads per stage.
        group_size: Group side G per stage (or one for all).
        interval: LDA interval per stage (or one for all).
        group_rule: 'crossformer' or 'crossformerpp': how groups follow the map size
            (see ``biformer_zoo.layers.lsda``).
        cooling_layers: Add the amplitude cooling layers of CrossFormer++ (every third block).
        patch_kernel_sizes: Kernels of the cross-scale patch embedding (stride 4).
        merge_kernel_sizes: Kernels of the cross-scale merging layers (stride 2).
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in the query/key/value projections.
        qk_scale: Attention temperature; default ``head_dim ** -0.5``.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the attention projection and in the MLP.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly over the blocks (official training: 0.1-0.5).
    """
    official_key_prefixes = ('patch_embed.', 'layers.')

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            group_size: Union[int, Tuple[int, ...]] = 7,
            interval: Union[int, Tuple[int, ...]] = (8, 4, 2, 1),
            group_rule: str = 'crossformer',
            cooling_layers: bool = False,
            patch_kernel_sizes: Tuple[int, ...] = (4, 8, 16, 32),
            merge_kernel_sizes: Tuple[int, ...] = (2, 4),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        check_depths(depths, '(2, 2, 6, 2)')
        check_per_stage('num_heads', num_heads, '(3, 6, 12, 24)')
        check_int_arg('embed_dim', embed_dim,
                      fix='embed_dim is the width of the first stage (64-128 in the official models)')
        check_mlp_ratio('mlp_ratio', mlp_ratio, embed_dim)
        check_rate('proj_drop_rate', proj_drop_rate)
        check_rate('attn_drop_rate', attn_drop_rate)
        num_stages = len(depths)
        group_sizes = to_ntuple(num_stages)(group_size)
        intervals = to_ntuple(num_stages)(interval)
        if not (len(num_heads) == len(group_sizes) == len(intervals) == num_stages):
            raise ValueError(
                f'depths, num_heads, group_size and interval need one entry per stage, got {len(depths)}, '
                f'{len(num_heads)}, {len(group_sizes)} and {len(intervals)}')
        embed_dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.init_shared_settings(in_chans, num_classes, global_pool, drop_rate, drop_path_rate, embed_dims[-1])

        self.stem = CrossScaleEmbed(in_chans, embed_dim, patch_kernel_sizes, stride=4, channels_last=False)

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)  # per block, split by stage
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(CrossFormerStage(
                in_dim=embed_dims[i - 1] if i > 0 else embed_dim,
                dim=embed_dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                group_size=group_sizes[i],
                interval=intervals[i],
                merge_kernel_sizes=merge_kernel_sizes if i > 0 else (),
                cooling_layers=cooling_layers,
                drop_path=dpr[i],
                group_rule=group_rule,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)  # nn.LayerNorm in the official code
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)


# derived buffers that the old ``crossformer`` branch saved with the weights (recomputed here)
_OFFICIAL_BUFFERS = ('.attn.biases', '.attn.relative_position_index', '.attn_mask')


def _map_official_key(key: str) -> str:
    """Rename one official CrossFormer key (``main`` or old ``crossformer`` branch) to ours."""
    if key.startswith('patch_embed.'):
        return 'stem.' + key[len('patch_embed.'):]
    if key.startswith('layers.'):
        _, stage, rest = key.split('.', 2)
        if rest.startswith('downsample.'):  # the official merge closes stage i, ours opens stage i + 1
            return f'stages.{int(stage) + 1}.{rest}'
        return f'stages.{stage}.{rest}'
    return key


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: CrossFormer) -> Dict[str, torch.Tensor]:
    """Map an official CrossFormer / CrossFormer++ checkpoint onto this implementation.

    Handles the ``main`` branch layout and the old ``crossformer`` branch one (which also holds the derived buffers
    ``attn.biases`` and ``attn.relative_position_index``, dropped here). Our own layout passes through unchanged.
    """
    if 'stem.projs.0.weight' in state_dict:
        return state_dict
    return map_official_state_dict(state_dict, _map_official_key, drop_suffixes=_OFFICIAL_BUFFERS)


def _create_crossformer(variant: str, pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return create_pyramid_model(CrossFormer, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs(pretrained_cfgs(
    ('crossformer', 'crossformerpp'), first_conv=('stem.projs.0', 'stem.projs.1', 'stem.projs.2', 'stem.projs.3')))

_CROSSFORMER = dict(group_size=7, interval=(8, 4, 2, 1), group_rule='crossformer')
_CROSSFORMERPP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), group_rule='crossformerpp', cooling_layers=True)


@register_model
def crossformer_tiny(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-T; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), **_CROSSFORMER)
    return _create_crossformer('crossformer_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_small(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-S; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), **_CROSSFORMER)
    return _create_crossformer('crossformer_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_base(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-B; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_CROSSFORMER)
    return _create_crossformer('crossformer_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_large(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-L; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_CROSSFORMER)
    return _create_crossformer('crossformer_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformerpp_small(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-S; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), **_CROSSFORMERPP)
    return _create_crossformer('crossformerpp_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformerpp_base(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-B; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_CROSSFORMERPP)
    return _create_crossformer('crossformerpp_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformerpp_large(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-L; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_CROSSFORMERPP)
    return _create_crossformer('crossformerpp_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformerpp_huge(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-H; official numbers: ``biformer-zoo report``."""
    model_args = dict(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), **_CROSSFORMERPP)
    return _create_crossformer('crossformerpp_huge', pretrained=pretrained, **dict(model_args, **kwargs))
