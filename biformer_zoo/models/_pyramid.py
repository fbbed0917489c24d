"""The timm model contract shared by both families: a stem, four stages, a final norm and a classifier head, and
the checks of the arguments both take.

``load_state_dict`` takes the model's own layout only, as timm's models do: a strict load is checked first
(``weights.check_state_dict``), so that a mismatch, an integer tensor where a float one belongs or a NaN is refused
in the words of every other load path, and an official checkpoint's state dict is named as such with the ways that
map it (``biformer_zoo.create_model(..., checkpoint_path=...)``, ``pretrained_cfg_overlay=dict(file=...)``,
``biformer-zoo convert``, or ``timm.models.load_checkpoint(model, path, filter_fn=checkpoint_filter_fn)``). It does
not rename official keys itself: a load that silently rewrites keys hides which layout a file has, and would have to
guess inside any larger model holding this one.
"""
import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import checkpoint
from timm.models._features import feature_take_indices

from ..layers import check_image_input
from ..layers.helpers import check_int_arg, check_rate, parameter_dtype
from ..weights import check_state_dict

MIN_INPUT_SIZE = 32  # both families: the stride-32 stages need at least one pixel of the last map
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax')


def check_per_stage(name: str, value: Any, example: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a sequence (one entry per stage), not a scalar."""
    if isinstance(value, (str, bytes)) or not hasattr(value, '__len__'):
        raise ValueError(f'{name} needs one entry per stage, e.g. {name}={example}; got {value!r}')


def check_depths(depths: Any, example: str) -> None:
    """Raise a ``ValueError`` unless ``depths`` gives each stage an int >= 0 blocks (0: the stage is its downsampling
    only, as the official code allows)."""
    check_per_stage('depths', depths, example)
    for i, depth in enumerate(depths):
        check_int_arg(f'depths[{i}]', depth, minimum=0, fix=f'depths gives the blocks of each stage, e.g. {example}')


def check_mlp_ratio(name: str, ratio: Any, dim: int) -> None:
    """Raise a ``ValueError`` unless ``ratio`` (the argument ``name``) gives an MLP of ``dim`` channels a hidden
    width ``int(ratio * dim)`` of at least 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (ratio > 0 and int(ratio * dim) >= 1):
        raise ValueError(f'{name} must be a number > 0 giving at least one hidden channel (int({name} * {dim})), got '
                         f'{ratio!r}; the official models use 3 (BiFormer) or 4 (BiFormer-STL, CrossFormer)')


def check_head_args(num_classes: int, global_pool: str) -> None:
    """A classifier needs pooled features: ``global_pool=''`` keeps the map, so only ``num_classes=0`` fits it."""
    check_int_arg('num_classes', num_classes, minimum=0, fix='use 0 for no classifier')
    if global_pool not in POOL_TYPES + ('',):
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, POOL_TYPES))} or '' (no pooling), got "
                         f"{global_pool!r}")
    if num_classes > 0 and not global_pool:
        raise ValueError(f"global_pool='' keeps the (B, C, H, W) map, which a classifier cannot take; use "
                         f"num_classes=0 with it, or a pooling type ({', '.join(map(repr, POOL_TYPES))})")


def check_out_indices(num_stages: int, out_indices: Union[int, Sequence[int]], name: str = 'out_indices'
                      ) -> Tuple[int, ...]:
    """The stages ``out_indices`` names, read as timm reads them (an int n: the last n stages; a sequence: those
    stages, a negative index counting from the end), as a tuple of indices from 0.

    Each stage must exist and be named once, in increasing order: the maps come out in stage order, once each, and
    ``feature_info`` must describe exactly them. Anything else raises a ``ValueError`` naming the tuple to pass.
    """
    if isinstance(out_indices, numbers.Integral) and not isinstance(out_indices, bool):
        if not 0 < out_indices <= num_stages:
            raise ValueError(f'an int takes the last n stages: n must be between 1 and {num_stages}, got {out_indices}')
        return tuple(range(num_stages - int(out_indices), num_stages))
    if isinstance(out_indices, (str, bytes)) or not hasattr(out_indices, '__len__') or not len(out_indices):
        raise ValueError(f'{name} must name at least one stage (0 to {num_stages - 1}, e.g. (1, 2, 3)), or be an int '
                         f'n for the last n stages; got {out_indices!r}')
    bad = [i for i in out_indices if isinstance(i, bool) or not isinstance(i, numbers.Integral)
           or not -num_stages <= i < num_stages]
    if bad:
        raise ValueError(f'stage indices {bad} do not exist: the model has {num_stages} stages (0 to '
                         f'{num_stages - 1}, or negative from the end)')
    stages = tuple(int(i) + num_stages if i < 0 else int(i) for i in out_indices)
    fix = tuple(sorted(set(stages)))
    if len(fix) < len(stages):
        repeated = sorted({i for i in stages if stages.count(i) > 1})
        raise ValueError(f'{name}={tuple(out_indices)} names stage(s) {repeated} more than once; each stage gives '
                         f'one map: pass {name}={fix}')
    if stages != fix:
        raise ValueError(f'{name}={tuple(out_indices)} is not in increasing order (stages {stages}); the maps come '
                         f'out in stage order, which feature_info describes: pass {name}={fix}')
    return stages


def take_indices_of(num_stages: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices``, with the checks of ``check_out_indices`` (``ValueError``s, not assertions;
    stages named once, in increasing order)."""
    if indices is not None:
        check_out_indices(num_stages, indices, name='indices')
    return feature_take_indices(num_stages, indices)


class CheckpointedStage(nn.Module):
    """Base of either family's stage (``downsample``, then ``blocks``, an ``nn.Sequential``, on (B, H, W, C) maps):
    ``forward_blocks`` runs each block through timm's ``checkpoint`` when ``grad_checkpointing`` is set."""

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks on ``x``, each through timm's ``checkpoint`` when gradient checkpointing is on."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x)
            return x
        return self.blocks(x)


class PyramidModel(nn.Module):
    """Base of the BiFormer and CrossFormer models.

    Subclasses build ``stem``, ``stages`` (an ``nn.Sequential`` of stages, each with ``downsample`` and ``blocks``
    and a ``grad_checkpointing`` flag), ``norm``, ``head`` (a timm ``ClassifierHead``) and ``feature_info``, and call
    ``init_shared_settings`` (which checks the shared arguments and sets ``in_chans``, ``num_classes``, ... for timm).
    The class names the key prefixes of the official layout, so that ``load_state_dict`` can say what it was given.

    Every family takes ``in_chans`` (input image channels), ``num_classes`` (classifier outputs; 0 for no
    classifier), ``global_pool`` ('avg', 'max', 'avgmax', 'catavgmax', or '' for no pooling, only with
    ``num_classes=0``), ``drop_rate`` and ``drop_path_rate`` (both in [0, 1)).
    """

    in_chans: int
    min_input_size: int
    official_key_prefixes: Tuple[str, ...] = ()  # top-level key names that only official checkpoints use

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; with ``strict=True`` the state dict is checked first and a misfit raises
        ``PretrainedWeightsError`` naming what is missing, unexpected, of another shape or kind, or not finite."""
        if strict:
            official = any(k.startswith(self.official_key_prefixes) for k in state_dict)
            check_state_dict(
                dict(state_dict), self, 'the state dict given to load_state_dict',
                fix='It is an official checkpoint\'s layout: load the file with biformer_zoo.create_model(name, '
                    'checkpoint_path=...), or map it with the family\'s checkpoint_filter_fn(state_dict, model) first.'
                if official else 'Load weights of this architecture and configuration, or pass strict=False to load '
                                 'what fits.')
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def init_shared_settings(self, in_chans: int, num_classes: int, global_pool: str, drop_rate: float,
                             drop_path_rate: float, num_features: int) -> None:
        """Check the arguments both families take (input channels, head, rates) and set the attributes timm and the
        shared methods read (``in_chans``, ``num_classes``, ``num_features``, ``grad_checkpointing``, ...)."""
        check_int_arg('in_chans', in_chans,
                      fix='in_chans is the number of image channels, e.g. 3 (RGB) or 1 (grayscale)')
        check_head_args(num_classes, global_pool)
        check_rate('drop_rate', drop_rate)
        check_rate('drop_path_rate', drop_path_rate)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.min_input_size = MIN_INPUT_SIZE
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = num_features
        self.grad_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        check_head_args(num_classes, self.global_pool if global_pool is None else global_pool)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.in_features = self.num_features  # after prune_intermediate_layers: the last kept stage's width
        self.head.reset(num_classes, pool_type=global_pool)

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        # on channels-last input oneDNN runs the stem convolutions and their backward faster, and the stem's output
        # is then already the (B, H, W, C) memory layout that the blocks take
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the outputs of the stages selected by ``indices`` (and the final features).

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n stages if int, all if None, else the stages listed.
            norm: Apply the final norm to the last stage's output when it is taken.
            stop_early: Stop after the last stage needed.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_image_input(x, self.in_chans, self.min_input_size,
                          None if torch.jit.is_scripting() else parameter_dtype(self.stem))
        intermediates = []
        take_indices, max_index = take_indices_of(len(self.stages), indices)
        last_idx = len(self.stages) - 1

        x = self._forward_stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and norm/head) that the given intermediates do not need."""
        take_indices, max_index = take_indices_of(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, self.min_input_size,
                          None if torch.jit.is_scripting() else parameter_dtype(self.stem))
        x = self._forward_stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)
