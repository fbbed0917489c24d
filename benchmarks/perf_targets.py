"""The performance targets of issue #7, each measured as a ratio round-robin in one process, met or missed.

    python benchmarks/perf_targets.py --rounds 3 --warmup 1                  # every group, markdown
    python benchmarks/perf_targets.py --only eval,train --format json
    python benchmarks/perf_targets.py --quick                                # smoke test: tiny sizes and models

Groups (defaults: CPU, 2 torch threads, fp32, 224x224, batch 8, random weights):

- ``eval``: eval throughput of each zoo model / its baseline (biformer_tiny vs pvt_v2_b1, biformer_small and
  crossformer_small vs Swin-T, biformer_base vs Swin-S).
- ``train``: training step time (forward, backward, SGD step) and peak training memory, same pairs.
- ``detection``: ``features_only`` backbones at 800x1216 (HxW), batch 1, eval: peak memory above the model's own
  parameters and buffers, and time per image; BiFormer with n_win=7 (default) and n_win=16 (detection configs).
- ``batch1``: per-image eval latency at batch 1 / per-image latency at the group batch size, every model above.
- ``deterministic``: biformer_small training step with ``torch.use_deterministic_algorithms(True)`` / without,
  alternating the flag step by step (it is restored after every step).

Latency, throughput and memory come from ``biformer_zoo.tools.bench.benchmark`` (its definitions apply); ``batch1`` and
``deterministic`` compare two settings of the same model, which ``benchmark`` cannot interleave, so they use a
round-robin over ``bench.make_step`` steps with ``bench.round_robin``.
"""
import argparse
import itertools
import json
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import biformer_zoo  # noqa: F401  (registers the zoo models with timm)
from biformer_zoo.tools.bench import BenchReport, BenchResult, benchmark, machine_info, make_step, round_robin
from biformer_zoo.tools.arguments import create_model_for_size
from biformer_zoo.tools.tables import TextTable, tables_to_markdown

GROUPS = ('eval', 'train', 'detection', 'batch1', 'deterministic')
SWIN_T, SWIN_S = 'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224'
MIB = 2 ** 20
ImageSize = Tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Target:
    """``checked op bound``, e.g. ratio >= 1.0x or extra memory <= 400 MiB."""
    op: str  # '>=' or '<='
    bound: float
    unit: str  # 'x' (a ratio) or 'MiB'

    def is_met(self, checked: float) -> bool:
        return checked >= self.bound if self.op == '>=' else checked <= self.bound

    def __str__(self) -> str:
        return f'{self.op} {self.bound:.1f}x' if self.unit == 'x' else f'{self.op} {self.bound:.0f} {self.unit}'


@dataclass(frozen=True)
class Pair:
    """A zoo model, the model of its class it is compared with, and its eval/train targets."""
    model: str
    baseline: str
    eval_throughput: Target
    train_time: Target
    train_memory: Optional[Target] = None


@dataclass(frozen=True)
class DetectionCase:
    """A ``features_only`` backbone at detection size and the most memory it may need above its own tensors."""
    model: str
    model_kwargs: Tuple[Tuple[str, Any], ...]
    extra_memory: Target

    @property
    def label(self) -> str:
        return self.model + ''.join(f' ({k}={v})' for k, v in self.model_kwargs)


@dataclass
class Check:
    """One measured target: ``checked`` (value / reference, or value - reference for MiB) against ``target``."""
    group: str
    model: str
    reference: str  # what the model is compared with: a model, 'batch 8', 'flag off', 'params+buffers'
    quantity: str
    value: float
    reference_value: float
    checked: float
    target: Target
    met: bool
    also: Dict[str, float] = field(default_factory=dict)  # other numbers measured alongside, for the table


@dataclass(frozen=True)
class Settings:
    """What to measure and how."""
    img_size: int
    batch_size: int
    detection_size: ImageSize
    rounds: int
    warmup: int
    threads: int
    device: str
    amp: Optional[str]
    pairs: Tuple[Pair, ...]
    detection: Tuple[DetectionCase, ...]
    deterministic_model: str


def _ratio(op: str, bound: float) -> Target:
    return Target(op, bound, 'x')


FULL_PAIRS = (
    Pair('biformer_tiny', 'pvt_v2_b1', _ratio('>=', 1.0), _ratio('<=', 1.3), _ratio('<=', 1.3)),
    Pair('biformer_small', SWIN_T, _ratio('>=', 1.0), _ratio('<=', 1.3), _ratio('<=', 1.3)),
    Pair('biformer_base', SWIN_S, _ratio('>=', 1.0), _ratio('<=', 1.3), _ratio('<=', 1.3)),
    Pair('crossformer_small', SWIN_T, _ratio('>=', 1.1), _ratio('<=', 1.0)),
)
FULL_DETECTION = (
    DetectionCase('biformer_small', (('n_win', 7),), Target('<=', 400, 'MiB')),
    DetectionCase('biformer_small', (('n_win', 16),), Target('<=', 400, 'MiB')),
    DetectionCase('crossformer_small', (), Target('<=', 300, 'MiB')),
)
QUICK_PAIRS = FULL_PAIRS[:1]
QUICK_DETECTION = (
    DetectionCase('biformer_tiny', (('n_win', 7),), Target('<=', 400, 'MiB')),
    DetectionCase('biformer_tiny', (('n_win', 16),), Target('<=', 400, 'MiB')),
    DetectionCase('crossformer_tiny', (), Target('<=', 300, 'MiB')),
)
BATCH1_TARGET = _ratio('<=', 1.3)
DETERMINISTIC_TARGET = _ratio('<=', 1.2)


def _check(group: str, model: str, reference: str, quantity: str, value: float, reference_value: float,
           target: Target, **also: float) -> Check:
    checked = value - reference_value if target.unit == 'MiB' else value / reference_value
    return Check(group, model, reference, quantity, value, reference_value, checked, target, target.is_met(checked),
                 also)


def _bench(s: Settings, names: Sequence[str], mode: str, baseline: Optional[str], img_size: Any = None,
           batch_size: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, BenchResult]:
    """``benchmark`` with the run's settings; results by model name."""
    report: BenchReport = benchmark(
        names, img_size=img_size or s.img_size, batch_size=batch_size or s.batch_size, mode=mode, rounds=s.rounds,
        warmup=s.warmup, threads=s.threads, device=s.device, amp=s.amp, baseline=baseline, model_kwargs=model_kwargs)
    return {r.model: r for r in report.results}


def _pairs_by_baseline(pairs: Sequence[Pair]) -> Dict[str, List[Pair]]:
    by_baseline: Dict[str, List[Pair]] = {}
    for pair in pairs:
        by_baseline.setdefault(pair.baseline, []).append(pair)
    return by_baseline


def eval_checks(s: Settings) -> List[Check]:
    """Eval throughput ratio of every pair (one round-robin run per baseline)."""
    checks = []
    for baseline, pairs in _pairs_by_baseline(s.pairs).items():
        results = _bench(s, [p.model for p in pairs], 'infer', baseline)
        for p in pairs:
            checks.append(_check('eval', p.model, baseline, f'img/s (eval, batch {s.batch_size})',
                                 results[p.model].throughput, results[baseline].throughput, p.eval_throughput))
    return checks


def train_checks(s: Settings) -> List[Check]:
    """Training step time ratio and peak training memory ratio of every pair."""
    checks = []
    for baseline, pairs in _pairs_by_baseline(s.pairs).items():
        results = _bench(s, [p.model for p in pairs], 'train', baseline)
        base = results[baseline]
        for p in pairs:
            model = results[p.model]
            checks.append(_check('train', p.model, baseline, f'ms per train step (batch {s.batch_size})',
                                 model.latency_ms_median, base.latency_ms_median, p.train_time))
            if p.train_memory is not None:
                checks.append(_check('train', p.model, baseline, 'peak train memory (MiB)', model.peak_memory_mb,
                                     base.peak_memory_mb, p.train_memory))
    return checks


def _own_tensor_mib(name: str, size: ImageSize, **kwargs: Any) -> float:
    """Parameters + buffers of the model, counted on a meta-device copy (nothing is allocated)."""
    with torch.device('meta'):
        model = create_model_for_size(name, size, **kwargs)
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def detection_checks(s: Settings) -> List[Check]:
    """Peak eval memory above the backbone's own tensors, at detection size, batch 1, ``features_only``."""
    checks = []
    cases_by_kwargs: Dict[Tuple[Tuple[str, Any], ...], List[DetectionCase]] = {}
    for case in s.detection:
        cases_by_kwargs.setdefault(case.model_kwargs, []).append(case)
    for kwargs, cases in cases_by_kwargs.items():  # model_kwargs apply to the whole run: one run per setting
        model_kwargs = dict(kwargs, features_only=True)
        results = _bench(s, [c.model for c in cases], 'infer', None, img_size=s.detection_size, batch_size=1,
                         model_kwargs=model_kwargs)
        for case in cases:
            result = results[case.model]
            own_mib = _own_tensor_mib(case.model, s.detection_size, **model_kwargs)
            height, width = s.detection_size
            checks.append(_check('detection', case.label, 'params+buffers',
                                 f'peak eval memory (MiB), {height}x{width}, batch 1', result.peak_memory_mb,
                                 own_mib, case.extra_memory, **{'ms per image': result.latency_ms_median}))
    return checks


def _run_round_robin(steps: Dict[str, Callable[[], None]], s: Settings) -> Dict[str, float]:
    """Median ms of each step over ``s.rounds`` round-robin rounds after ``s.warmup`` untimed steps each."""
    samples = round_robin(steps, s.rounds, s.device, warmup=s.warmup)
    return {label: statistics.median(ms) for label, ms in samples.items()}


def batch1_checks(s: Settings) -> List[Check]:
    """Per-image eval latency at batch 1 / at ``batch_size``, every model of the pairs, all in one round-robin."""
    size = (s.img_size, s.img_size)
    names = list(dict.fromkeys(name for p in s.pairs for name in (p.model, p.baseline)))
    steps = {}
    for name in names:
        model = create_model_for_size(name, size).to(s.device)
        for batch in (1, s.batch_size):
            inputs = torch.randn(batch, 3, *size, device=s.device)
            steps[f'{name}@{batch}'] = make_step(model, inputs, 'infer', s.amp)
    median_ms = _run_round_robin(steps, s)
    return [_check('batch1', name, f'batch {s.batch_size}', 'eval ms per image, batch 1',
                   median_ms[f'{name}@1'], median_ms[f'{name}@{s.batch_size}'] / s.batch_size, BATCH1_TARGET)
            for name in names]


def _with_determinism(step: Callable[[], None], enabled: bool) -> None:
    """Run ``step`` with ``torch.use_deterministic_algorithms(enabled)``, then restore the previous setting."""
    previous, previous_warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        step()
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def deterministic_checks(s: Settings) -> List[Check]:
    """Training step time with deterministic algorithms / without, alternating the flag on one model."""
    size = (s.img_size, s.img_size)
    model = create_model_for_size(s.deterministic_model, size).to(s.device)
    step = make_step(model, torch.randn(s.batch_size, 3, *size, device=s.device), 'train', s.amp)
    median_ms = _run_round_robin({'off': partial(_with_determinism, step, False),
                                  'on': partial(_with_determinism, step, True)}, s)
    return [_check('deterministic', s.deterministic_model, 'flag off', f'ms per train step (batch {s.batch_size})',
                   median_ms['on'], median_ms['off'], DETERMINISTIC_TARGET)]


GROUP_FUNCTIONS: Dict[str, Callable[[Settings], List[Check]]] = dict(
    eval=eval_checks, train=train_checks, detection=detection_checks, batch1=batch1_checks,
    deterministic=deterministic_checks)
GROUP_TITLES = dict(
    eval='Eval throughput vs a model of the same class',
    train='Training step time and peak training memory vs a model of the same class',
    detection='Detection-size backbone (features_only), eval, batch 1: memory above its own tensors',
    batch1='Batch-1 latency: per-image latency at batch 1 / at the larger batch',
    deterministic='Training step with torch.use_deterministic_algorithms(True) / without',
)


def group_table(group: str, checks: Sequence[Check]) -> TextTable:
    """One group's checks as a table; the ratio (or difference) column is what the target applies to."""
    also_keys = list(dict.fromkeys(key for c in checks for key in c.also))
    rows = [[c.model, c.reference, c.quantity, f'{c.value:.1f}', f'{c.reference_value:.1f}',
             f'{c.checked:.2f}x' if c.target.unit == 'x' else f'{c.checked:.0f} MiB', str(c.target),
             'met' if c.met else 'missed', *(f'{c.also[k]:.1f}' if k in c.also else '–' for k in also_keys)]
            for c in checks]
    return TextTable(title=f'{group}: {GROUP_TITLES[group]}', label_columns=3, rows=rows,
                     columns=['model', 'compared with', 'quantity', 'value', 'reference', 'ratio / diff', 'target',
                              'status', *also_keys])


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Full settings, or tiny ones with ``--quick``; explicit ``--rounds``/``--warmup`` win either way."""
    quick = args.quick
    return Settings(
        img_size=64 if quick else 224, batch_size=2 if quick else 8,
        detection_size=(128, 192) if quick else (800, 1216),
        rounds=args.rounds if args.rounds is not None else (1 if quick else 5),
        warmup=args.warmup if args.warmup is not None else (0 if quick else 1),
        threads=args.threads, device=args.device, amp=args.amp,
        pairs=QUICK_PAIRS if quick else FULL_PAIRS, detection=QUICK_DETECTION if quick else FULL_DETECTION,
        deterministic_model='biformer_tiny' if quick else 'biformer_small')


def parse_groups(text: str) -> List[str]:
    """``'eval,train'`` -> ['eval', 'train'], checked against the known groups."""
    groups = [g.strip() for g in text.split(',') if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(
            f'--only takes a comma-separated list of {", ".join(GROUPS)}; got {text!r}')
    return groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=None, help='timed round-robin rounds (default 5, quick 1)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps per model (default 1, quick 0)')
    parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast dtype (default fp32)')
    parser.add_argument('--only', type=parse_groups, default=list(GROUPS), help=f'groups: {",".join(GROUPS)}')
    parser.add_argument('--format', choices=['markdown', 'json'], default='markdown')
    parser.add_argument('--quick', action='store_true', help='tiny sizes and models, for a smoke test')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure the chosen groups and print them as markdown tables or one JSON object."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if settings.rounds < 1 or settings.warmup < 0 or settings.threads < 1:
        raise ValueError(f'--rounds and --threads must be >= 1 and --warmup >= 0, got rounds={settings.rounds}, '
                         f'threads={settings.threads}, warmup={settings.warmup}')
    command = shlex.join(['python', 'benchmarks/perf_targets.py', *argv])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # benchmark() sets it too; the round-robin loops here rely on this
    try:
        machine = machine_info(torch.device(settings.device))
        checks = {group: GROUP_FUNCTIONS[group](settings) for group in args.only}
    finally:
        torch.set_num_threads(previous_threads)
    if args.format == 'json':
        plain_settings = {k: v for k, v in asdict(settings).items() if k not in ('pairs', 'detection')}
        print(json.dumps(dict(command=command, machine=machine, settings=plain_settings,
                              groups={g: [asdict(c) for c in cs] for g, cs in checks.items()}), indent=2))
        return 0
    gpu = f', {machine["gpu"]}' if 'gpu' in machine else ''
    print(f'Machine: {machine["cpu"]} ({machine["cpu_count"]} logical CPUs){gpu}; '
          f'torch {machine["torch"]}, timm {machine["timm"]}, {settings.threads} torch thread(s), {settings.device}, '
          f'{settings.amp or "fp32"}; {settings.img_size}x{settings.img_size}, batch {settings.batch_size}, '
          f'{settings.rounds} round(s), {settings.warmup} warm-up step(s)\n')
    print(f'Command: `{command}`\n')
    print(tables_to_markdown([group_table(g, cs) for g, cs in checks.items()]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
