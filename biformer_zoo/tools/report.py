"""Parameter and FLOP report for any timm model, with the papers' numbers (from the weights manifest) beside ours.

FLOPs are counted by ``biformer_zoo.tools.flops`` (fvcore's convention, attention included). What is still not
counted (softmax, topk, elementwise ops, the scale/mask/softmax inside attention) is listed per model in
``ModelProfile.uncounted_ops``. Tables render through ``biformer_zoo.tools.tables``; names, sizes and model arguments
are parsed by ``biformer_zoo.tools.arguments``.
"""
import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.models import FeatureInfo
from torch import nn

from .arguments import create_model_for_size, parse_img_size
from .flops import ATTENTION_OPS, SDPA_UNCOUNTED, activation_analysis, flop_analysis
from .tables import TextTable, progress_bar, tables_to_markdown
from ..weights import manifest_entries

__all__ = [
    'ModelProfile', 'StageProfile', 'PaperNumbers', 'PAPER_NUMBERS', 'REPORT_SCHEMA_VERSION', 'REPORT_FORMATS',
    'profile', 'profile_many', 'report_tables', 'render_report',
]

REPORT_SCHEMA_VERSION = 1
PAPER_INPUT_SIZE = (224, 224)

@dataclass(frozen=True)
class PaperNumbers:
    """The official models' numbers at 224x224 with a 1000-class head.

    ``params_exact``: parameter elements of the official model; ``fvcore_gflops``: fvcore's total on the
    official code; ``paper_params_m`` / ``paper_gflops``: what the paper/README print; ``top1``: ImageNet-1k top-1.
    """
    params_exact: int
    fvcore_gflops: float
    paper_params_m: float
    paper_gflops: float
    top1: float
    note: str = ''


def _paper_numbers() -> Dict[str, PaperNumbers]:
    """Each architecture's numbers from its first manifest entry (``reported`` and ``official_measured``)."""
    numbers: Dict[str, PaperNumbers] = {}
    for entry in manifest_entries():
        reported, measured = entry['reported'], entry['official_measured']
        numbers.setdefault(entry['architecture'], PaperNumbers(
            measured['params'], measured['gflops'], reported['params_M'], reported['gflops'], reported['top1'],
            reported.get('note', '')))
    return numbers


# Facts measured on, or printed by, the official repositories (rayleizhu/BiFormer, cheerss/CrossFormer), as
# weights_manifest.json records them
PAPER_NUMBERS: Dict[str, PaperNumbers] = _paper_numbers()


# ---------------------------------------------------------------------------------------------------------------
# Profiles


@dataclass
class StageProfile:
    """One stage (a module named in the model's ``feature_info``)."""
    name: str
    params: int
    gflops: float
    gflops_by_operator: Dict[str, float]


@dataclass
class ModelProfile:
    """Parameters, fvcore FLOPs and activations of one model at one input size, and the paper's numbers.

    ``gflops`` and ``activations_m`` are for the whole batch (``batch_size`` images). ``other_*`` is everything
    outside the stages (stem, final norm, head). ``model_kwargs`` are the extra ``timm.create_model`` arguments.
    ``reference`` is filled only where the setting matches the paper's (224x224, classifier, 1000 classes, no
    extra model arguments); ``*_diff_pct`` are (ours - reference) / reference * 100.
    """
    model: str
    input_size: Tuple[int, int, int]  # (C, H, W)
    batch_size: int
    features_only: bool
    params: int
    trainable_params: int
    gflops: float
    activations_m: float
    stages: List[StageProfile]
    model_kwargs: Dict[str, Any]
    other_params: int
    other_gflops: float
    gflops_by_operator: Dict[str, float]
    uncounted_ops: Dict[str, int]
    reference: Optional[Dict[str, float]] = None
    schema_version: int = REPORT_SCHEMA_VERSION
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _stage_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """(name in ``feature_info``, name in ``named_modules``) of each stage, e.g. ('stages.0', 'stages_0')."""
    info = getattr(model, 'feature_info', None)
    if info is None:
        return []
    listed = info.module_name() if isinstance(info, FeatureInfo) else [f['module'] for f in info]
    present = dict(model.named_modules())
    stages = []
    for listed_name in listed:
        # FeatureListNet flattens 'stages.0' to 'stages_0'; FeatureGetterNet keeps the model as '.model'
        for candidate in (listed_name, listed_name.replace('.', '_'), f'model.{listed_name}'):
            if candidate in present:
                stages.append((listed_name, candidate))
                break
    return stages


def _gflops(counter: Dict[str, int]) -> Dict[str, float]:
    return {op: count / 1e9 for op, count in sorted(counter.items(), key=lambda kv: -kv[1]) if count}


def _architecture(name: str) -> str:
    """'biformer_small.in1k' -> 'biformer_small': paper numbers belong to the architecture, whatever the tag."""
    return name.split('.', 1)[0]


def _reference(name: str, profile_: 'ModelProfile', num_classes: Optional[int]) -> Optional[Dict[str, float]]:
    numbers = PAPER_NUMBERS.get(_architecture(name))
    if (numbers is None or profile_.features_only or profile_.model_kwargs
            or profile_.input_size[1:] != PAPER_INPUT_SIZE or num_classes != 1000):
        return None
    gflops_per_image = profile_.gflops / profile_.batch_size
    return dict(
        official_params=numbers.params_exact,
        params_diff=profile_.params - numbers.params_exact,
        official_fvcore_gflops=numbers.fvcore_gflops,
        official_fvcore_gflops_diff_pct=100 * (gflops_per_image - numbers.fvcore_gflops) / numbers.fvcore_gflops,
        paper_params_m=numbers.paper_params_m,
        paper_params_diff_pct=100 * (profile_.params / 1e6 - numbers.paper_params_m) / numbers.paper_params_m,
        paper_gflops=numbers.paper_gflops,
        paper_gflops_diff_pct=100 * (gflops_per_image - numbers.paper_gflops) / numbers.paper_gflops,
        top1=numbers.top1,
    )


def _uncounted_label(op_kind: str) -> str:
    """'aten::softmax' -> 'softmax'; 'prim::PythonOp.MyFunction' -> 'python op MyFunction' (an autograd Function)."""
    return op_kind.replace('aten::', '').replace('prim::PythonOp.', 'python op ')


@torch.no_grad()
def profile(
        model_or_name: Union[str, nn.Module],
        input_size: Union[int, str, Sequence[int]] = 224,
        batch_size: int = 1,
        features_only: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> ModelProfile:
    """Count parameters, fvcore FLOPs (1 multiply-add = 1 flop) and activations of a model.

    Args:
        model_or_name: a timm model name (zoo models included) or a built ``nn.Module``.
        input_size: 224, (H, W), (C, H, W) or 'HxW'.
        batch_size: images per traced batch; FLOPs and activations are for the whole batch.
        features_only: build the model name with ``features_only=True`` (backbone as used by detectors).
        model_kwargs: extra ``timm.create_model`` arguments for a model name, e.g. ``dict(n_win=16)``.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    img_size = parse_img_size(input_size)
    given_chans = int(input_size[0]) if isinstance(input_size, (tuple, list)) and len(input_size) == 3 else None
    model, name = _model_to_profile(model_or_name, img_size, given_chans, features_only, model_kwargs)
    in_chans = given_chans or int(getattr(model, 'in_chans', 3) or 3)
    model.eval()
    inputs = torch.randn(batch_size, in_chans, *img_size)  # (B, C, H, W)

    extra_op_calls: Counter = Counter()
    flops = flop_analysis(model, inputs, calls=extra_op_calls)
    stage_modules = _stage_modules(model)
    stages = _stage_profiles(model, flops, stage_modules)
    flops_by_module = flops.by_module()
    total_params = sum(p.numel() for p in model.parameters())
    result = ModelProfile(
        model=name,
        input_size=(in_chans, *img_size),
        batch_size=batch_size,
        features_only=isinstance(getattr(model, 'feature_info', None), FeatureInfo),
        params=total_params,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        gflops=flops.total() / 1e9,
        activations_m=activation_analysis(model, inputs).total() / 1e6,
        stages=stages,
        model_kwargs=dict(model_kwargs or {}),
        other_params=total_params - sum(s.params for s in stages),
        other_gflops=(flops.total() - sum(flops_by_module[module_name] for _, module_name in stage_modules)) / 1e9,
        gflops_by_operator=_gflops(flops.by_operator()),
        uncounted_ops=_uncounted_ops(flops, extra_op_calls),
    )
    result.reference = _reference(name, result, getattr(model, 'num_classes', None))
    result.notes.extend(_profile_notes(result, name))
    return result


def _model_to_profile(model_or_name: Union[str, nn.Module], img_size: Tuple[int, int], given_chans: Optional[int],
                      features_only: bool, model_kwargs: Optional[Dict[str, Any]]) -> Tuple[nn.Module, str]:
    """The model ``profile`` measures and its name: built from a name, or the module as given."""
    if isinstance(model_or_name, str):
        kwargs = dict(model_kwargs or {})
        if given_chans is not None:
            kwargs.setdefault('in_chans', given_chans)
        return create_model_for_size(model_or_name, img_size, features_only=features_only, **kwargs), model_or_name
    if model_kwargs:
        raise ValueError(f'model_kwargs={model_kwargs} only apply to a model name; build the module with them instead')
    if not isinstance(model_or_name, nn.Module):
        raise ValueError(f'expected a model name or an nn.Module, got {type(model_or_name).__name__}')
    cfg = getattr(model_or_name, 'pretrained_cfg', None) or {}
    return model_or_name, cfg.get('architecture') or type(model_or_name).__name__


def _stage_profiles(model: nn.Module, flops: Any, stage_modules: List[Tuple[str, str]]) -> List[StageProfile]:
    """Parameters and GFLOPs (by operator too) of each stage module."""
    modules = dict(model.named_modules())
    flops_by_module = flops.by_module()
    flops_by_module_op = flops.by_module_and_operator()
    return [StageProfile(
        name=listed_name, params=sum(p.numel() for p in modules[module_name].parameters()),
        gflops=flops_by_module[module_name] / 1e9, gflops_by_operator=_gflops(flops_by_module_op[module_name]))
        for listed_name, module_name in stage_modules]


def _uncounted_ops(flops: Any, extra_op_calls: Counter) -> Dict[str, int]:
    """The operators fvcore did not count, by calls, most called first (attention kernels under one label)."""
    uncounted = Counter({_uncounted_label(op): n for op, n in flops.unsupported_ops().items()})
    attention_calls = sum(extra_op_calls[op] for op in ATTENTION_OPS)
    if attention_calls:
        uncounted[SDPA_UNCOUNTED] = attention_calls
    return dict(uncounted.most_common())


def _profile_notes(result: ModelProfile, name: str) -> List[str]:
    notes = []
    if result.features_only:
        notes.append('features_only backbone: stem and stages, no final norm or head')
    if _architecture(name) in PAPER_NUMBERS and result.reference is None:
        notes.append('paper numbers not compared: they are for 224x224 with the 1000-class head')
    if not result.stages:
        notes.append('no feature_info on the model: no per-stage numbers')
    return notes


def profile_many(
        names: Sequence[str],
        img_sizes: Sequence[Union[int, str, Sequence[int]]] = (224,),
        batch_size: int = 1,
        features_only: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        show_progress: bool = False,
) -> List[ModelProfile]:
    """``profile`` for every model at every input size, with an optional progress bar on stderr."""
    jobs = [(name, parse_img_size(size)) for name in names for size in img_sizes]
    with progress_bar(show_progress) as progress:
        task = progress.add_task('profiling', total=len(jobs))
        profiles = []
        for name, img_size in jobs:
            progress.update(task, description=f'profiling {name} @ {img_size[0]}x{img_size[1]}')
            profiles.append(profile(name, img_size, batch_size=batch_size, features_only=features_only,
                                    model_kwargs=model_kwargs))
            progress.advance(task)
    return profiles


# ---------------------------------------------------------------------------------------------------------------
# Tables: one neutral form, rendered as rich tables, markdown or csv


def _num(value: Optional[float], digits: int = 2) -> str:
    return '–' if value is None else f'{value:.{digits}f}'


def _with_diff(value: Optional[float], diff_pct: Optional[float], digits: int) -> str:
    return '–' if value is None else f'{value:.{digits}f} ({diff_pct:+.1f}%)'


def _input_label(p: ModelProfile) -> str:
    return f'{p.input_size[1]}x{p.input_size[2]}' + (' feat' if p.features_only else '')


def convention_notes(profiles: Sequence[ModelProfile]) -> List[str]:
    """How the numbers were counted, in words, for the settings present in ``profiles``."""
    batch_sizes = sorted({p.batch_size for p in profiles})
    notes = [
        'GFLOPs: fvcore, 1 multiply-add = 1 FLOP, for a batch of '
        f'{"/".join(map(str, batch_sizes))} image(s); attention kernels (scaled_dot_product_attention) count as '
        'B*heads*Lq*Lk*(d_qk + d_v), i.e. the q@k^T and attn@v matmuls. Not counted: softmax, topk, gather, '
        'elementwise ops and the inside of custom autograd Functions (listed per model). Activations: fvcore '
        '(outputs of conv/matmul/linear/attention).',
        'Input HxW is height first (1280x800 = mmdet get_flops.py --shape 1280 800).',
    ]
    if any(p.reference for p in profiles):
        notes.append('Paper: numbers printed by the papers/READMEs; official fvcore: fvcore on the official code at '
                     '224x224. Compared only at 224x224 with the 1000-class head; Δ = (ours - theirs) / theirs.')
        compared = sorted({p.model for p in profiles if p.reference and PAPER_NUMBERS[p.model].note})
        notes += [f'{name}: {PAPER_NUMBERS[name].note}.' for name in compared]
    model_kwargs = sorted({', '.join(f'{k}={v!r}' for k, v in p.model_kwargs.items()) for p in profiles} - {''})
    if model_kwargs:
        notes.append(f'Models built with extra arguments: {"; ".join(model_kwargs)} (no paper comparison).')
    if any(p.features_only for p in profiles):
        notes.append('feat = features_only backbone (stem + 4 stages, no final norm or head), as a detector uses it. '
                     'The papers\' detection tables count the whole detector (backbone + FPN + heads, mmcv counter, '
                     'same 1 multiply-add = 1 FLOP); these numbers are the backbone part of those totals.')
    return notes


OPERATOR_LABELS = {'scaled_dot_product_attention': 'sdpa'}


def report_tables(profiles: Sequence[ModelProfile]) -> List[TextTable]:
    """The summary, per-stage and per-operator tables for a list of profiles."""
    summary = TextTable(
        title='Parameters and FLOPs',
        columns=['model', 'input', 'params (M)', 'trainable (M)', 'GFLOPs', 'acts (M)', 'paper params (M) (Δ)',
                 'paper GFLOPs (Δ)', 'official fvcore GFLOPs (Δ)'],
        rows=[],
        notes=convention_notes(profiles),
    )
    for p in profiles:
        ref = p.reference or {}
        summary.rows.append([
            p.model, _input_label(p), _num(p.params / 1e6), _num(p.trainable_params / 1e6), _num(p.gflops, 3),
            _num(p.activations_m), _with_diff(ref.get('paper_params_m'), ref.get('paper_params_diff_pct'), 1),
            _with_diff(ref.get('paper_gflops'), ref.get('paper_gflops_diff_pct'), 1),
            _with_diff(ref.get('official_fvcore_gflops'), ref.get('official_fvcore_gflops_diff_pct'), 3)])

    num_stages = max((len(p.stages) for p in profiles), default=0)
    stage_columns = [f'stage {i} params (M) / GFLOPs' for i in range(num_stages)]
    per_stage = TextTable(
        title='Per stage', columns=['model', 'input', *stage_columns, 'other params (M) / GFLOPs'], rows=[],
        notes=['Stages are the modules in the model\'s feature_info; other = stem, final norm and head.'])
    for p in profiles:
        cells = [f'{s.params / 1e6:.2f} / {s.gflops:.3f}' for s in p.stages]
        cells += ['–'] * (num_stages - len(p.stages))
        per_stage.rows.append([p.model, _input_label(p), *cells, f'{p.other_params / 1e6:.2f} / {p.other_gflops:.3f}'])

    op_totals: Counter = Counter()
    for p in profiles:
        op_totals.update(p.gflops_by_operator)
    operators = [op for op, _ in op_totals.most_common()]
    per_operator = TextTable(
        title='GFLOPs per operator',
        columns=['model', 'input', *(OPERATOR_LABELS.get(op, op) for op in operators), 'not counted (calls)'], rows=[],
        notes=['sdpa = scaled_dot_product_attention.'] if 'scaled_dot_product_attention' in operators else [])
    for p in profiles:
        uncounted = ', '.join(f'{op} x{n}' for op, n in p.uncounted_ops.items()) or '–'
        op_cells = [_num(p.gflops_by_operator.get(op), 3) for op in operators]
        per_operator.rows.append([p.model, _input_label(p), *op_cells, uncounted])
    return [summary, per_stage, per_operator]


def _flat_row(p: ModelProfile) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(
        model=p.model, channels=p.input_size[0], height=p.input_size[1], width=p.input_size[2],
        batch_size=p.batch_size, features_only=p.features_only, params=p.params, trainable_params=p.trainable_params,
        gflops=p.gflops, activations_m=p.activations_m, other_params=p.other_params, other_gflops=p.other_gflops)
    for i, stage in enumerate(p.stages):
        row.update({f'stage{i}_name': stage.name, f'stage{i}_params': stage.params, f'stage{i}_gflops': stage.gflops})
    row.update({f'gflops_{op}': value for op, value in p.gflops_by_operator.items()})
    row.update(p.reference or {})
    row['uncounted_ops'] = ';'.join(f'{op}={n}' for op, n in p.uncounted_ops.items())
    return row


def profiles_to_csv(profiles: Sequence[ModelProfile]) -> str:
    """One row per profile; columns are the union over profiles (stages and operators flattened)."""
    rows = [_flat_row(p) for p in profiles]
    columns: List[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval='', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def profiles_to_json(profiles: Sequence[ModelProfile]) -> str:
    """A JSON list of ``ModelProfile.to_dict()``; the layout is versioned by ``schema_version``."""
    return json.dumps([p.to_dict() for p in profiles], indent=2)


REPORT_FORMATS = ('table', 'markdown', 'json', 'csv')


def render_report(profiles: Sequence[ModelProfile], fmt: str) -> str:
    """The report as text in one of ``markdown``, ``json`` or ``csv`` (``table`` is printed by rich)."""
    if fmt == 'markdown':
        return tables_to_markdown(report_tables(profiles))
    if fmt == 'json':
        return profiles_to_json(profiles)
    if fmt == 'csv':
        return profiles_to_csv(profiles)
    raise ValueError(f'format must be one of markdown, json, csv for text output, got {fmt!r}')
