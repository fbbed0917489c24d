"""Latency, throughput and peak memory of several models, measured round-robin in one process.

Every model is built and warmed up first; then each round runs one step of every model in turn (the starting
model rotates from round to round), so that machine noise (other processes, frequency changes, thermal state)
falls on all models alike. Latencies are the median over rounds; ratios compare each model with a baseline model
measured in the same rounds.

Peak memory is the memory held by tensors during one step of the model: its parameters, buffers and input batch,
plus the largest amount the step allocates on top of them (activations, gradients, workspaces). On CUDA the
increase is read from ``torch.cuda.max_memory_allocated``; on CPU it is replayed from the allocation events of
the torch CPU allocator recorded by ``torch.profiler`` (``profile_memory=True``), which is what tensors use.
Memory that libraries allocate outside the torch allocator (e.g. oneDNN primitive caches) is not included, and
neither is the Python interpreter.
"""
import itertools
import json
import os
import platform
import shlex
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import timm
import torch
from torch import nn

from .arguments import create_model_for_size, parse_img_size
from .tables import TextTable, progress_bar, tables_to_markdown

__all__ = [
    'BenchResult', 'BenchReport', 'DEFAULT_BASELINE', 'BENCH_SCHEMA_VERSION', 'BENCH_FORMATS', 'benchmark',
    'bench_tables', 'make_step', 'render_bench', 'reproduce_command', 'round_robin',
]

DEFAULT_BASELINE = 'swin_tiny_patch4_window7_224'
BENCH_SCHEMA_VERSION = 1
MODES = ('infer', 'train')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
BENCH_FORMATS = ('table', 'markdown', 'json')


@dataclass
class BenchResult:
    """Timings of one model. ``*_ratio`` compare with the baseline: latency_ratio < 1 and throughput_ratio > 1
    mean faster than the baseline."""
    model: str
    params: int
    latency_ms_median: float
    latency_ms_p25: float
    latency_ms_p75: float
    latency_ms_min: float
    throughput: float  # images per second at the median latency
    peak_memory_mb: float
    latency_ratio: Optional[float] = None
    throughput_ratio: Optional[float] = None
    samples_ms: List[float] = field(default_factory=list)


@dataclass
class BenchReport:
    """All results of one ``benchmark`` call, with the settings and the machine they were measured on."""
    results: List[BenchResult]
    baseline: Optional[str]
    settings: Dict[str, Any]
    machine: Dict[str, Any]
    memory_method: str
    command: str
    schema_version: int = BENCH_SCHEMA_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def machine_info(device: torch.device) -> Dict[str, Any]:
    """CPU/GPU model, core count, thread count and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                timm=timm.__version__, python=platform.python_version())
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def _scalar_loss(output: Any) -> torch.Tensor:
    """A scalar to back-propagate from any model output (tensor, or list/tuple/dict of tensors)."""
    if isinstance(output, torch.Tensor):
        return output.float().mean()
    values = output.values() if isinstance(output, dict) else output
    return sum(_scalar_loss(v) for v in values)


def make_step(model: nn.Module, inputs: torch.Tensor, mode: str, amp: Optional[str] = None) -> Callable[[], None]:
    """One inference forward, or one training step (forward, backward of the output mean, SGD update)."""
    autocast = torch.autocast(inputs.device.type, dtype=AMP_DTYPES[amp]) if amp else nullcontext()
    if mode == 'infer':
        model.eval()

        def infer_step() -> None:
            with torch.inference_mode(), autocast:
                model(inputs)
        return infer_step

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def train_step() -> None:
        with autocast:
            loss = _scalar_loss(model(inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients are freed between steps, so each step allocates them
    return train_step


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def round_robin(
        steps: Dict[str, Callable[[], None]],
        rounds: int,
        device: Union[str, torch.device] = 'cpu',
        on_step: Optional[Callable[[], None]] = None,
        warmup: int = 0,
) -> Dict[str, List[float]]:
    """Milliseconds of each step over ``rounds`` rounds; every round runs each step once, starting one step later
    than the round before, so that machine noise falls on all steps alike. ``warmup`` untimed runs of each step
    come first; ``on_step`` runs after each step, warm-up runs included."""
    device = torch.device(device)
    labels = list(steps)
    samples: Dict[str, List[float]] = {label: [] for label in labels}
    for label in labels:
        for _ in range(warmup):
            steps[label]()
            if on_step is not None:
                on_step()
    _synchronize(device)
    for round_index in range(rounds):
        start = round_index % len(labels)
        for label in labels[start:] + labels[:start]:
            _synchronize(device)
            begin = time.perf_counter()
            steps[label]()
            _synchronize(device)
            samples[label].append((time.perf_counter() - begin) * 1e3)
            if on_step is not None:
                on_step()
    return samples


def _tensor_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    tensors = itertools.chain(model.parameters(), model.buffers(), [inputs])
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_step_allocation_peak(step: Callable[[], None]) -> int:
    """Largest net amount the torch CPU allocator holds during ``step`` above what it held before."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == '[memory]' and e.device_type().name == 'CPU'),
                    key=lambda e: e.start_ns())  # allocations (+bytes) and frees (-bytes) in time order
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _cuda_step_allocation_peak(step: Callable[[], None], device: torch.device) -> int:
    """Largest amount allocated on ``device`` during ``step`` above what was allocated before."""
    _synchronize(device)
    allocated_before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device) - allocated_before


def _validate(mode: str, device: torch.device, amp: Optional[str], rounds: int, warmup: int, batch_size: int,
              threads: Optional[int]) -> None:
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f'amp must be one of {tuple(AMP_DTYPES)} or None, got {amp!r}')
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f'device must be cpu or cuda, got {device}')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('device cuda was asked for but torch sees no CUDA device; use --device cpu')
    for label, value, minimum in (('rounds', rounds, 1), ('warmup', warmup, 0), ('batch_size', batch_size, 1),
                                  ('threads', threads if threads is not None else 1, 1)):
        if value < minimum:
            raise ValueError(f'{label} must be at least {minimum}, got {value}')


def benchmark(
        names: Sequence[str],
        img_size: Union[int, str, Sequence[int]] = 224,
        batch_size: int = 1,
        mode: str = 'infer',
        rounds: int = 10,
        warmup: int = 2,
        threads: Optional[int] = None,
        device: Union[str, torch.device] = 'cpu',
        amp: Optional[str] = None,
        baseline: Optional[str] = DEFAULT_BASELINE,
        model_kwargs: Optional[Dict[str, Any]] = None,
        show_progress: bool = False,
) -> BenchReport:
    """Time ``names`` (and ``baseline``, added if missing) round-robin and return a ``BenchReport``.

    Args:
        names: timm model names (random weights are used).
        img_size: 224, (H, W) or 'HxW'.
        batch_size: images per step.
        mode: 'infer' (forward under inference_mode) or 'train' (forward, backward, SGD step).
        rounds: timed steps per model; each round runs every model once.
        warmup: untimed steps per model before the first round.
        threads: torch intra-op threads for the run (restored afterwards); None keeps torch's setting.
        device: 'cpu' or 'cuda'.
        amp: None, 'bf16' or 'fp16' autocast.
        baseline: model the ratios are computed against; None for no ratios.
        model_kwargs: extra ``timm.create_model`` arguments for every model except the baseline.
    """
    device = torch.device(device)
    _validate(mode, device, amp, rounds, warmup, batch_size, threads)
    size = parse_img_size(img_size)
    names = list(dict.fromkeys([*names, *([baseline] if baseline else [])]))
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with progress_bar(show_progress) as progress:
            task = progress.add_task('building', total=len(names) * (1 + warmup + rounds + 1))
            built = {}
            for name in names:
                progress.update(task, description=f'building {name}')
                built[name] = _build_step(name, size, batch_size, mode, amp, device,
                                          (model_kwargs or {}) if name != baseline else {})
                progress.advance(task)
            progress.update(task, description=f'{warmup} warm-up step(s) each, {rounds} round-robin rounds')
            samples = round_robin({name: b.step for name, b in built.items()}, rounds, device,
                                  on_step=lambda: progress.advance(task), warmup=warmup)
            progress.update(task, description='measuring memory')
            peak_bytes = {}
            for name, b in built.items():
                peak_bytes[name] = b.static_bytes + _step_allocation_peak(b.step, device)
                progress.advance(task)
        machine = machine_info(device)
    finally:
        torch.set_num_threads(previous_threads)

    results = _bench_results(built, samples, peak_bytes, batch_size, baseline)
    settings = dict(img_size=list(size), batch_size=batch_size, mode=mode, rounds=rounds, warmup=warmup,
                    threads=threads if threads is not None else previous_threads, device=str(device), amp=amp,
                    model_kwargs=dict(model_kwargs or {}))
    return BenchReport(
        results=results, baseline=baseline, settings=settings, machine=machine, memory_method=_memory_method(device),
        # the baseline is listed too when it was the only model: a command without names benches every zoo model
        command=reproduce_command([n for n in names if n != baseline] or list(names), settings, baseline))


@dataclass
class _BuiltStep:
    """One model, ready to time: its step, the bytes of its parameters, buffers and input, its parameter count."""
    step: Callable[[], None]
    static_bytes: int
    params: int


def _build_step(name: str, size: Sequence[int], batch_size: int, mode: str, amp: Optional[str],
                device: torch.device, model_kwargs: Dict[str, Any]) -> _BuiltStep:
    model = create_model_for_size(name, size, **model_kwargs).to(device)
    inputs = torch.randn(batch_size, int(getattr(model, 'in_chans', 3) or 3), *size, device=device)
    return _BuiltStep(step=make_step(model, inputs, mode, amp), static_bytes=_tensor_bytes(model, inputs),
                      params=sum(p.numel() for p in model.parameters()))


def _step_allocation_peak(step: Callable[[], None], device: torch.device) -> int:
    if device.type == 'cuda':
        return _cuda_step_allocation_peak(step, device)
    return _cpu_step_allocation_peak(step)


def _memory_method(device: torch.device) -> str:
    method = ('torch.cuda.max_memory_allocated increase during one step' if device.type == 'cuda' else
              'torch CPU allocator events (torch.profiler profile_memory) during one step')
    return method + ' + parameters, buffers and input batch'


def _bench_results(built: Dict[str, _BuiltStep], samples: Dict[str, List[float]], peak_bytes: Dict[str, int],
                   batch_size: int, baseline: Optional[str]) -> List[BenchResult]:
    """One ``BenchResult`` per model from its latency samples (ms), with the ratios to ``baseline`` if given."""
    results = []
    for name, b in built.items():
        quartiles = statistics.quantiles(samples[name], n=4) if len(samples[name]) > 1 else [samples[name][0]] * 3
        median = statistics.median(samples[name])
        results.append(BenchResult(
            model=name, params=b.params, latency_ms_median=median, latency_ms_p25=quartiles[0],
            latency_ms_p75=quartiles[2], latency_ms_min=min(samples[name]), throughput=batch_size / (median / 1e3),
            peak_memory_mb=peak_bytes[name] / 2 ** 20, samples_ms=samples[name]))
    if baseline:
        reference = next(r for r in results if r.model == baseline)
        for r in results:
            r.latency_ratio = r.latency_ms_median / reference.latency_ms_median
            r.throughput_ratio = r.throughput / reference.throughput
    return results


def bench_tables(report: BenchReport) -> List[TextTable]:
    """The benchmark as one table, with the settings, machine and command as notes."""
    s, m = report.settings, report.machine
    title = (f'{s["mode"]} benchmark, {s["img_size"][0]}x{s["img_size"][1]}, batch {s["batch_size"]}, '
             f'{s["device"]}{", " + s["amp"] if s["amp"] else ""}, {s["threads"]} thread(s)')
    table = TextTable(
        title=title, label_columns=1,
        columns=['model', 'params (M)', 'latency (ms)', 'IQR (ms)', 'img/s', 'peak mem (MB)', 'latency ratio',
                 'throughput ratio'],
        rows=[[r.model, f'{r.params / 1e6:.1f}', f'{r.latency_ms_median:.1f}',
               f'{r.latency_ms_p25:.1f}–{r.latency_ms_p75:.1f}', f'{r.throughput:.1f}', f'{r.peak_memory_mb:.0f}',
               '–' if r.latency_ratio is None else f'{r.latency_ratio:.2f}x',
               '–' if r.throughput_ratio is None else f'{r.throughput_ratio:.2f}x'] for r in report.results],
        notes=[
            f'Median of {s["rounds"]} round-robin rounds after {s["warmup"]} warm-up step(s) per model, one process; '
            f'img/s = batch / median latency. Train = forward + backward of the output mean + SGD step. '
            + (f'Ratios: model / {report.baseline} (latency ratio < 1 and throughput ratio > 1 = faster).'
               if report.baseline else 'No baseline, no ratios.'),
            f'Peak memory: {report.memory_method}.',
            f'Machine: {m["cpu"]} ({m["cpu_count"]} logical CPUs){", " + m["gpu"] if "gpu" in m else ""}; '
            f'torch {m["torch"]}, timm {m["timm"]}, {s["threads"]} torch thread(s).',
        ])
    table.notes.append(f'Command: `{report.command}`')
    return [table]


def reproduce_command(names: Sequence[str], settings: Dict[str, Any], baseline: Optional[str]) -> str:
    """The ``biformer-zoo bench`` command line that repeats a measurement with these settings."""
    height, width = settings['img_size']
    words = ['biformer-zoo', 'bench', *names, '--img-size', f'{height}x{width}', '--batch-size',
             str(settings['batch_size']), '--mode', settings['mode'], '--rounds', str(settings['rounds']), '--warmup',
             str(settings['warmup']), '--threads', str(settings['threads']), '--device', settings['device'],
             '--baseline', baseline or 'none']
    if settings['amp']:
        words += ['--amp', settings['amp']]
    for key, value in settings['model_kwargs'].items():
        words += ['--model-arg', shlex.quote(f'{key}={value!r}')]
    return ' '.join(words)


def render_bench(report: BenchReport, fmt: str) -> str:
    """The benchmark as ``markdown`` or ``json`` text (``table`` is printed by rich)."""
    if fmt == 'markdown':
        return tables_to_markdown(bench_tables(report))
    if fmt == 'json':
        return json.dumps(report.to_dict(), indent=2)
    raise ValueError(f'format must be markdown or json for text output, got {fmt!r}')
