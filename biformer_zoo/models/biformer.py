"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: https://arxiv.org/abs/2303.08810 (Zhu et al., CVPR 2023)
Official code: https://github.com/rayleizhu/BiFormer (``models/biformer.py``, ``models/biformer_stl.py``,
``models/biformer_stl_nchw.py``)

Same architectures and parameters as the official models; official checkpoints load through
``checkpoint_filter_fn``. Differences from the official code:
* any input size: maps are always zero-padded to a multiple of the region count, as the official
  ``auto_pad=True`` path does (at sizes it accepts without padding the two are identical);
* the routed keys/values are picked with one ``index_select`` instead of ``expand`` + ``gather``, and the
  attention uses ``F.scaled_dot_product_attention``;
* the timm model contract (``features_only``, ``forward_intermediates``, ``reset_classifier``, ...).

The official nchw STL checkpoint applies LePE to the values in its last stage; load it with the
``biformer_stl.in1k_nchw`` tag (or ``global_lepe_on_value=True``).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model

from ..layers import AttentionLePE, BiLevelRoutingAttention, DepthwiseConv2d, RecomputeGeluMlp
from ..layers.helpers import check_int_arg
from ._builder import create_pyramid_model, map_official_state_dict, pretrained_cfgs, pretrained_tag
from ._pyramid import CheckpointedStage, PyramidModel, check_depths, check_mlp_ratio, check_per_stage

__all__ = ['BiFormer']


class BiFormerBlock(nn.Module):
    """Optional depthwise-conv position embedding, then pre-norm attention and MLP, on (B, H, W, C) maps.

    ``topk=None`` selects global attention with LePE (the official ``topk=-2``).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_regions: int = 7,
            topk: Optional[int] = 4,
            global_num_heads: int = 8,
            mlp_ratio: float = 4.,
            pos_embed_kernel: int = 3,
            side_dwconv: int = 5,
            global_lepe_on_value: bool = False,
            drop_path: float = 0.,
    ):
        super().__init__()
        # x + dwconv(x) as one conv
        self.pos_embed = DepthwiseConv2d(dim, pos_embed_kernel, residual=True) if pos_embed_kernel > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk is None:
            self.attn = AttentionLePE(
                dim, num_heads=global_num_heads, side_dwconv=side_dwconv, lepe_on_value=global_lepe_on_value,
                channels_last=True)
        else:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads=num_heads, num_regions=num_regions, topk=topk, side_dwconv=side_dwconv,
                channels_last=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RecomputeGeluMlp(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class BiFormerStage(CheckpointedStage):
    """Downsampling (or identity after the stem) followed by BiFormer blocks; (B, C, H, W) in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            downsample: str = '',
            num_regions: int = 7,
            topk: Optional[int] = 4,
            global_num_heads: int = 8,
            mlp_ratio: float = 4.,
            pos_embed_kernel: int = 3,
            side_dwconv: int = 5,
            global_lepe_on_value: bool = False,
            drop_path: Sequence[float] = (),
    ):
        super().__init__()
        if downsample == 'overlap':  # 3x3 stride-2 conv, then BN
            self.downsample = nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
        elif downsample == 'patch':  # BN, then 2x2 stride-2 conv
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[BiFormerBlock(
            dim, num_heads=num_heads, num_regions=num_regions, topk=topk, global_num_heads=global_num_heads,
            mlp_ratio=mlp_ratio, pos_embed_kernel=pos_embed_kernel, side_dwconv=side_dwconv,
            global_lepe_on_value=global_lepe_on_value, drop_path=drop_path[i] if drop_path else 0.,
        ) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous (B, H, W, C): on a permuted NCHW view every LayerNorm would copy and every residual add stride
        x = self.downsample(x).permute(0, 2, 3, 1).contiguous()
        return self.forward_blocks(x).permute(0, 3, 1, 2)


class BiFormer(PyramidModel):
    """BiFormer backbone and classifier.

    Args (``in_chans``, ``num_classes`` and ``global_pool`` as in ``PyramidModel``):
        depths: Blocks per stage.
        embed_dims: Channels per stage.
        mlp_ratios: MLP expansion per stage.
        head_dim: Channels per head of the routed attention (heads = dim // head_dim).
        n_win: Regions per side in the routed attention (7 for classification, 16 in the official detection recipes).
        topks: Routed regions per query region per stage; None for global attention.
        global_num_heads: Heads of the global attention.
        stem_type: 'overlap' (two 3x3 stride-2 convs, 3x3 downsampling; BiFormer-T/S/B) or
            'patch' (4x4 patchify, BN + 2x2 downsampling; the Swin-layout STL model).
        pos_embed_kernel: Depthwise conv position embedding before each block's attention; 0 disables it.
        side_dwconv: LePE kernel.
        global_lepe_on_value: Apply the global stage's LePE to the values (official nchw STL checkpoint).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly over the blocks.
    """
    official_key_prefixes = ('downsample_layers.',)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Tuple[int, ...] = (4, 4, 18, 4),
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            mlp_ratios: Tuple[float, ...] = (3, 3, 3, 3),
            head_dim: int = 32,
            n_win: int = 7,
            topks: Tuple[Optional[int], ...] = (1, 4, 16, None),
            global_num_heads: int = 8,
            stem_type: str = 'overlap',
            pos_embed_kernel: int = 3,
            side_dwconv: int = 5,
            global_lepe_on_value: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        _check_biformer_args(depths, embed_dims, mlp_ratios, head_dim, n_win, topks, global_num_heads, stem_type)
        self.init_shared_settings(in_chans, num_classes, global_pool, drop_rate, drop_path_rate, embed_dims[-1])
        self.stem = _biformer_stem(stem_type, in_chans, embed_dims[0])
        self.stages, self.feature_info = _biformer_stages(
            depths, embed_dims, mlp_ratios, head_dim, topks, stem_type, drop_path_rate, num_regions=n_win,
            global_num_heads=global_num_heads, pos_embed_kernel=pos_embed_kernel, side_dwconv=side_dwconv,
            global_lepe_on_value=global_lepe_on_value)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)


def _divisors_of_all(dims: Sequence[int]) -> List[int]:
    return [d for d in range(1, min(dims) + 1) if all(dim % d == 0 for dim in dims)]


def _check_heads(head_dim: int, global_num_heads: int, embed_dims: Sequence[int], topks: Sequence[Any]) -> None:
    """``head_dim`` must divide the width of every routed stage, ``global_num_heads`` that of every global one."""
    routed = [dim for dim, topk in zip(embed_dims, topks) if topk is not None]
    if routed and any(dim % head_dim for dim in routed):
        raise ValueError(f'head_dim={head_dim} must divide the width of every stage with routed attention '
                         f'{tuple(routed)} (heads = width // head_dim); use head_dim from {_divisors_of_all(routed)} '
                         f'(32 in every official model)')
    check_int_arg('global_num_heads', global_num_heads, fix='global_num_heads is the number of heads of the '
                                                            'global-attention stages (8 in the official models)')
    plain = [dim for dim, topk in zip(embed_dims, topks) if topk is None]
    if plain and any(dim % global_num_heads for dim in plain):
        raise ValueError(f'global_num_heads={global_num_heads} must divide the width of every stage with global '
                         f'attention {tuple(plain)}; use global_num_heads from {_divisors_of_all(plain)} (8 in the '
                         f'official models)')


def _check_biformer_args(depths: Any, embed_dims: Any, mlp_ratios: Any, head_dim: Any, n_win: Any, topks: Any,
                         global_num_heads: Any, stem_type: Any) -> None:
    """Raise a ``ValueError`` naming the argument, what it must be and the fix, for BiFormer's own arguments."""
    check_depths(depths, '(4, 4, 18, 4)')
    check_per_stage('embed_dims', embed_dims, '(64, 128, 256, 512)')
    check_per_stage('mlp_ratios', mlp_ratios, '(3, 3, 3, 3)')
    check_per_stage('topks', topks, '(1, 4, 16, None)')
    check_int_arg('n_win', n_win, fix='n_win is the number of regions per side of the routed attention (7 at 224 px)')
    check_int_arg('head_dim', head_dim, fix='head_dim is the number of channels per head (32 in every official model)')
    if not (len(embed_dims) == len(mlp_ratios) == len(topks) == len(depths)):
        raise ValueError(
            f'depths, embed_dims, mlp_ratios and topks need one entry per stage, got {len(depths)}, '
            f'{len(embed_dims)}, {len(mlp_ratios)} and {len(topks)}')
    for i, dim in enumerate(embed_dims):
        check_int_arg(f'embed_dims[{i}]', dim, fix='embed_dims gives the channels of each stage, e.g. '
                                                   '(64, 128, 256, 512)')
        check_mlp_ratio(f'mlp_ratios[{i}]', mlp_ratios[i], dim)
    for topk in topks:
        if topk is not None and not 1 <= topk <= n_win ** 2:
            raise ValueError(
                f'topks={tuple(topks)} do not fit n_win={n_win}: each topk must be between 1 and '
                f'n_win**2 = {n_win ** 2} (or None for global attention); lower topks or raise n_win')
    _check_heads(head_dim, global_num_heads, embed_dims, topks)
    if stem_type not in ('overlap', 'patch'):
        raise ValueError(f"stem_type must be 'overlap' or 'patch', got {stem_type!r}")


def _biformer_stem(stem_type: str, in_chans: int, dim: int) -> nn.Sequential:
    """'overlap': two 3x3 stride-2 conv + BN (GELU between); 'patch': a 4x4 stride-4 conv + BN."""
    if stem_type == 'overlap':
        return nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(dim // 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
            nn.BatchNorm2d(dim),
        )
    return nn.Sequential(nn.Conv2d(in_chans, dim, 4, stride=4), nn.BatchNorm2d(dim))


def _biformer_stages(
        depths: Sequence[int],
        embed_dims: Sequence[int],
        mlp_ratios: Sequence[float],
        head_dim: int,
        topks: Sequence[Optional[int]],
        stem_type: str,
        drop_path_rate: float,
        **block_kwargs: Any,
) -> Tuple[nn.Sequential, List[Dict[str, Any]]]:
    """The stages (each after the first downsampling as the stem does) and their ``feature_info``."""
    dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)  # per block, split by stage
    stages, feature_info = [], []
    for i, depth in enumerate(depths):
        stages.append(BiFormerStage(
            in_dim=embed_dims[i - 1] if i > 0 else embed_dims[0],
            dim=embed_dims[i],
            depth=depth,
            downsample=stem_type if i > 0 else '',
            drop_path=dpr[i],
            num_heads=embed_dims[i] // head_dim,
            topk=topks[i],
            mlp_ratio=mlp_ratios[i],
            **block_kwargs,
        ))
        feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f'stages.{i}'))
    return nn.Sequential(*stages), feature_info


def _map_official_key(key: str) -> str:
    """Rename one official BiFormer key (any of the three official layouts) to ours."""
    key = key.replace('.attn.qkv.qkv.', '.attn.qkv.').replace('.attn.wo.', '.attn.proj.')
    key = key.replace('.attn.qkv_linear.', '.attn.qkv.').replace('.attn.output_linear.', '.attn.proj.')
    if key.startswith('downsample_layers.0.'):
        return 'stem.' + key[len('downsample_layers.0.'):]
    if key.startswith('downsample_layers.'):
        _, stage, rest = key.split('.', 2)
        return f'stages.{stage}.downsample.{rest}'
    if key.startswith('stages.'):
        _, stage, rest = key.split('.', 2)
        if not rest.startswith('blocks.'):  # T/S/B layout: stages.{i}.{j}.
            rest = 'blocks.' + rest
        # mlp: T/S/B use Sequential(fc, Identity, GELU, fc), STL Sequential(fc, GELU, fc)
        rest = rest.replace('.mlp.0.', '.mlp.fc1.').replace('.mlp.3.', '.mlp.fc2.').replace('.mlp.2.', '.mlp.fc2.')
        return f'stages.{stage}.{rest}'
    return key


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: BiFormer) -> Dict[str, torch.Tensor]:
    """Map an official BiFormer checkpoint (T/S/B, STL or nchw STL layout) onto this implementation.

    Our own layout (e.g. converted Hub weights) passes through unchanged.
    """
    if 'stem.0.weight' in state_dict:
        return state_dict
    is_nchw = any('.attn.qkv_linear.' in k for k in state_dict)
    if is_nchw != _global_lepe_on_value(model):
        raise RuntimeError(
            'this BiFormer checkpoint is the official ' + ('nchw STL one, which applies LePE to the values in the '
            "last stage; create the model as 'biformer_stl.in1k_nchw' (or pass global_lepe_on_value=True)"
            if is_nchw else "legacy layout, which applies LePE to the input in the last stage; create the model "
            "without global_lepe_on_value (e.g. 'biformer_stl.in1k')"))
    out = map_official_state_dict(state_dict, _map_official_key, drop_suffixes=('num_batches_tracked',))
    for key, value in out.items():
        if value.ndim == 4 and value.shape[-2:] == (1, 1) and ('.attn.' in key or '.mlp.' in key) \
                and '.lepe.' not in key:
            out[key] = value.flatten(1)  # nchw layout: 1x1 convs -> linear
    return out


def _global_lepe_on_value(model: nn.Module) -> bool:
    return any(isinstance(m, AttentionLePE) and m.lepe_on_value for m in model.modules())


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    if pretrained_tag(kwargs.get('pretrained_cfg')) == 'in1k_nchw':
        kwargs.setdefault('global_lepe_on_value', True)
    return create_pyramid_model(BiFormer, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs(pretrained_cfgs(('biformer',), first_conv='stem.0'))


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T; official numbers: ``biformer-zoo report``."""
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(3, 3, 3, 3))
    return _create_biformer('biformer_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S; official numbers: ``biformer-zoo report``."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), mlp_ratios=(3, 3, 3, 3))
    return _create_biformer('biformer_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B; official numbers: ``biformer-zoo report``."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), mlp_ratios=(3, 3, 3, 3))
    return _create_biformer('biformer_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-STL, Swin-T's layout with BRA; official numbers: ``biformer-zoo report``."""
    model_args = dict(
        depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratios=(4, 4, 4, 4),
        stem_type='patch', pos_embed_kernel=0)
    return _create_biformer('biformer_stl', pretrained=pretrained, **dict(model_args, **kwargs))
