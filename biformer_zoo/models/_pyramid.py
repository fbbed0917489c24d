"""The timm model contract shared by both families: a stem, four stages, a final norm and a classifier head."""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import checkpoint, get_arch_pretrained_cfgs
from timm.models._features import feature_take_indices

from ..weights import checkpoint_filter_of, prepare_pretrained
from ..layers import check_image_input


class UnknownModelError(ValueError, RuntimeError):
    """An unknown model name or pretrained tag. A ``ValueError``; also a ``RuntimeError``, which timm raises for
    these, so code written against timm keeps catching it."""


def check_pretrained_tag(architecture: str, tag: Any) -> None:
    """Raise ``UnknownModelError`` naming the registered tags when ``tag`` (from ``'name.tag'``) is not one."""
    if not isinstance(tag, str) or not tag:
        return  # no tag, or a full pretrained_cfg dict (hf-hub:, local-dir:)
    tags = [name.split('.', 1)[1] for name in get_arch_pretrained_cfgs(architecture)]
    if tag not in tags:
        raise UnknownModelError(
            f'unknown pretrained tag {tag!r} for {architecture}; its tags are {", ".join(tags) or "none"}. '
            f'Use one of them (e.g. {architecture}.{tags[0] if tags else "<tag>"}) or leave the tag out')


def check_head_args(num_classes: int, global_pool: str) -> None:
    """A classifier needs pooled features: ``global_pool=''`` keeps the map, so only ``num_classes=0`` fits it."""
    if num_classes > 0 and not global_pool:
        raise ValueError("global_pool='' keeps the (B, C, H, W) map, which a classifier cannot take; use "
                         "num_classes=0 with it, or a pooling type ('avg', 'max', 'avgmax', 'catavgmax')")


def prepare_create_kwargs(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """What each family's ``_create_*`` does before ``build_model_with_cfg``: check the pretrained tag, resolve and
    check the weights (``weights.prepare_pretrained``), refuse an ``output_stride`` other than 32, and turn ``img_size``
    into the pretrained cfg's ``input_size``."""
    check_pretrained_tag(variant, kwargs.get('pretrained_cfg'))
    return apply_img_size(check_output_stride(prepare_pretrained(variant, pretrained, kwargs)))


def apply_img_size(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Turn an ``img_size`` argument into the pretrained cfg's ``input_size``: the models take any size, so it only
    describes the preferred input (as for timm models with a fixed size), with ``in_chans`` channels."""
    img_size = kwargs.pop('img_size', None)
    if img_size is None:
        return kwargs
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    overlay['input_size'] = (kwargs.get('in_chans', 3),) + size
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def pretrained_tag(cfg: Any) -> Optional[str]:
    """The tag of a ``pretrained_cfg`` argument: a tag string (from 'name.tag'), a dict or a timm PretrainedCfg."""
    if cfg is None or isinstance(cfg, str):
        return cfg
    return cfg.get('tag') if isinstance(cfg, dict) else getattr(cfg, 'tag', None)


def take_indices_of(num_stages: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` with a ``ValueError`` (not an assertion) for stages that do not exist."""
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f'an int takes the last n stages: n must be between 1 and {num_stages}, got {indices}')
    elif indices is not None:
        bad = [i for i in indices if not -num_stages <= i < num_stages]
        if bad:
            raise ValueError(f'stage indices {bad} do not exist: the model has {num_stages} stages (0 to '
                             f'{num_stages - 1}, or negative from the end)')
    return feature_take_indices(num_stages, indices)


def check_output_stride(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Accept ``output_stride`` only as the models' own 32 (no dilated variants)."""
    output_stride = kwargs.pop('output_stride', None)
    if output_stride not in (None, 32):
        raise ValueError(f'output_stride={output_stride} is not supported: the models always downsample by 32 '
                         f'(strides 4, 8, 16, 32); take an earlier stage with out_indices instead')
    return kwargs


def _map_official_layout(
        model: nn.Module,
        state_dict: Dict[str, Any],
        prefix: str,
        *unused: Any,
) -> None:
    """``load_state_dict`` pre-hook: rename the keys of an official checkpoint's state dict (recognised by
    ``model.official_key_prefixes``) with the family's ``checkpoint_filter_fn``, in place; others pass untouched."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not any(k[len(prefix):].startswith(model.official_key_prefixes) for k in keys):
        return
    official = {k[len(prefix):]: state_dict.pop(k) for k in keys}
    state_dict.update((prefix + k, v) for k, v in checkpoint_filter_of(model)(official, model).items())


class PyramidStage(nn.Module):
    """A stage of either family: ``downsample``, then ``blocks`` (an ``nn.Sequential``) on (B, H, W, C) maps, each
    through timm's ``checkpoint`` when ``grad_checkpointing`` is set."""

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
    and a ``grad_checkpointing`` flag), ``norm``, ``head`` (a timm ``ClassifierHead``) and ``feature_info``, and set
    ``in_chans``, ``min_input_size``, ``num_classes``, ``global_pool``, ``num_features`` and ``head_hidden_size``.
    The family registers its ``checkpoint_filter_fn`` with ``weights.register_checkpoint_filter``; the class names the
    key prefixes of the official layout.

    Every family takes ``in_chans`` (input image channels), ``num_classes`` (classifier outputs; 0 for no
    classifier) and ``global_pool`` ('avg', 'max', 'avgmax', 'catavgmax', or '' for no pooling, only with
    ``num_classes=0``).
    """

    in_chans: int
    min_input_size: int
    official_key_prefixes: Tuple[str, ...] = ()  # top-level key names that only official checkpoints use

    def __init__(self) -> None:
        super().__init__()
        # official checkpoints then load wherever a state dict does: timm's checkpoint_path=, load_state_dict,
        # and a larger model holding this one under a prefix
        self.register_load_state_dict_pre_hook(_map_official_layout)

    def set_head_settings(self, in_chans: int, num_classes: int, global_pool: str, drop_rate: float,
                          num_features: int, min_input_size: int) -> None:
        """Check the head arguments and set the attributes timm and the shared methods read."""
        check_head_args(num_classes, global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.min_input_size = min_input_size
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
                          None if torch.jit.is_scripting() else next(self.stem.parameters()).dtype)
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
                          None if torch.jit.is_scripting() else next(self.stem.parameters()).dtype)
        x = self._forward_stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)
