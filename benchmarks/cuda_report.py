"""Speed and memory on one CUDA GPU, side by side in one process: the zoo's models, timm's Swin, the official BiFormer-S.

    python benchmarks/cuda_report.py --official-biformer ../BiFormer       # writes benchmarks/results/cuda.json
    python benchmarks/cuda_report.py --render benchmarks/results/cuda.json # its tables as markdown (docs/performance.md)
    python benchmarks/cuda_report.py --quick --device cpu --out /tmp/q.json # smoke test: tiny sizes, any device

Groups, each one round-robin over its models (``bench.round_robin``: a step of every model per round, the first
model rotating), bf16 autocast, random weights and inputs:

- ``eval``: img/s at batch 128, 224x224, under ``inference_mode``.
- ``train``: img/s at batch 64, 224x224: forward, cross-entropy on random labels, backward, AdamW step; and peak
  memory, the most one training step holds: the model's parameters, buffers, gradients, AdamW state and input, plus
  what the step allocates on top (``torch.cuda.max_memory_allocated``).
- ``detection``: ``features_only`` training step (loss: the mean of every feature map) at 800x1216, batch 2: ms per
  step and peak memory as above.
- ``layers``: one ``BiLevelRoutingAttention`` at each routed stage shape of BiFormer-S (batch 64, bf16 autocast,
  forward + backward of the layer), each ``attn_impl`` (``'triton'``: the Triton kernels); ms per call, or the
  error.
- ``profile``: ``torch.profiler`` over one training step of ``biformer_small`` and of Swin-T (batch 64): the
  operators with the most device time (self time, ms per step, calls), to show where the step goes.
- ``attn_impl``: ``biformer_small`` with each execution of its routed attention (``attn_impl``) and Swin-T, eval
  and train as above.
- ``compile``: biformer_small, crossformer_small and Swin-T under ``torch.compile`` (inductor, default mode; what
  timm's ``--torchcompile`` does), eval and train as above, in one round-robin per mode; the compile time is the
  untimed first step (``first_step_s``). ``ratios_compiled`` in the JSON: each compiled model over compiled Swin-T.

Models: ``biformer_small`` and ``crossformer_small`` against Swin-T, ``biformer_base`` against Swin-S, each zoo model
with its default ``attn_impl='auto'``, and the official BiFormer-S (``--official-biformer``: a clone of
rayleizhu/BiFormer, imported at run time as ``benchmarks/parity_official.py`` does). ``ratios`` in the JSON: for
each model, eval and train throughput over its Swin's (> 1 = faster) and peak train memory over its Swin's (< 1 =
smaller).

A group that fails (e.g. an operator a GPU lacks) is recorded with its error and the others still run.
"""
import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo.tools.bench import machine_info, round_robin
from biformer_zoo.layers.bra import ATTN_IMPLS, BiLevelRoutingAttention, routed_attention_impl
from biformer_zoo.tools.arguments import create_model_for_size
from biformer_zoo.tools.tables import TextTable, tables_to_markdown

HERE = Path(__file__).resolve().parent
SWIN_T, SWIN_S = 'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224'
BASELINE = {'biformer_small': SWIN_T, 'crossformer_small': SWIN_T, 'official_biformer_small': SWIN_T,
            'biformer_base': SWIN_S}
OFFICIAL = 'official_biformer_small'
MIB = 2 ** 20


def settings(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(img_size=64, eval_batch=4, train_batch=2, detection_size=(96, 128), detection_batch=1, rounds=2,
                    warmup=1)
    return dict(img_size=224, eval_batch=128, train_batch=64, detection_size=(800, 1216), detection_batch=2,
                rounds=10, warmup=3)


def with_attn_impl(model: nn.Module, attn_impl: str) -> nn.Module:
    """``model`` with every routed attention layer set to ``attn_impl``."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
    for module in model.modules():
        if isinstance(module, BiLevelRoutingAttention):
            module.attn_impl = attn_impl
    return model


def build(label: str, size: Tuple[int, int], official: Optional[Path], **kwargs: Any) -> nn.Module:
    """A model by label: a timm name, ``name[attn_impl]``, or ``official_biformer_small``."""
    if label == OFFICIAL:
        spec = importlib.util.spec_from_file_location('parity_official', HERE / 'parity_official.py')
        parity = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(parity)
        parity.check_repo('biformer', official)
        model = parity.load_official_biformer(official)['biformer_small']()
        for module in model.modules():  # the official padding of maps the regions do not divide (none at 224)
            if hasattr(module, 'auto_pad'):
                module.auto_pad = True
        return model
    name, _, attn_impl = label.partition('[')
    model = create_model_for_size(name, size, **kwargs)
    return with_attn_impl(model, attn_impl.rstrip(']')) if attn_impl else model


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Step:
    """One eval forward or one training step of a model on a fixed random batch, and its peak memory."""

    def __init__(self, model: nn.Module, batch: int, size: Tuple[int, int], train: bool, device: torch.device,
                 features: bool = False):
        self.model, self.train = model.to(device).train(train), train
        self.inputs = torch.randn(batch, 3, *size, device=device)
        self.labels = torch.randint(0, 1000, (batch,), device=device)
        self.features = features
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if train else None
        self.device = device

    def loss(self, output: Any) -> torch.Tensor:
        if self.features:
            return sum(f.float().mean() for f in output)
        return F.cross_entropy(output.float(), self.labels)

    def __call__(self) -> None:
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        if not self.train:
            with torch.inference_mode(), autocast:
                self.model(self.inputs)
            return
        with autocast:
            loss = self.loss(self.model(self.inputs))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def peak_mib(self) -> float:
        """Parameters, buffers, gradients, optimizer state and input, plus the most one step allocates on top."""
        own = _tensor_bytes(self.model.parameters()) + _tensor_bytes(self.model.buffers()) + _tensor_bytes(
            [self.inputs])
        if self.train:
            own += _tensor_bytes(self.model.parameters())  # gradients, held from backward to the optimizer step
            own += _tensor_bytes(t for state in self.optimizer.state.values() for t in state.values()
                                 if isinstance(t, torch.Tensor))
        if self.device.type != 'cuda':
            return own / MIB
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self()
        torch.cuda.synchronize(self.device)
        return (own + torch.cuda.max_memory_allocated(self.device) - before) / MIB


def measure(labels: Sequence[str], batch: int, size: Tuple[int, int], train: bool, s: Dict[str, Any],
            device: torch.device, official: Optional[Path], features: bool = False, compiled: bool = False,
            **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """Round-robin median ms, img/s and peak MiB of each label; a model that fails to build or run is reported.
    ``compiled``: each model under ``torch.compile`` (compiled in its first, untimed step)."""
    results: Dict[str, Dict[str, Any]] = {}
    steps: Dict[str, Step] = {}
    for label in labels:
        try:
            model = build(label, size, official, **(dict(kwargs, features_only=True) if features else kwargs))
            steps[label] = Step(model, batch, size, train, device, features)
            if compiled:
                steps[label].model = torch.compile(steps[label].model)
            begin = time.perf_counter()
            steps[label]()  # the first step compiles kernels (Triton's, torch.compile's) and is not timed
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            results[label] = dict(first_step_s=time.perf_counter() - begin)
        except Exception as e:  # noqa: BLE001  (recorded, and the other models still run)
            results[label] = dict(error=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
            steps.pop(label, None)
            traceback.print_exc()
    samples = round_robin(dict(steps), s['rounds'], device, warmup=s['warmup'])
    for label, step in steps.items():
        median = statistics.median(samples[label])
        quartiles = statistics.quantiles(samples[label], n=4) if len(samples[label]) > 1 else [median] * 3
        results[label].update(ms=median, ms_p25=quartiles[0], ms_p75=quartiles[2], img_s=batch / median * 1e3,
                              peak_mib=step.peak_mib(), params_m=sum(p.numel() for p in step.model.parameters()) / 1e6)
    del steps
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return results


# BiFormer-S's routed stages at 224: (map side, channels, heads, topk)
STAGES = [(56, 64, 2, 1), (28, 128, 4, 4), (14, 256, 8, 16)]


def layer_rows(batch: int, s: Dict[str, Any], device: torch.device, stages=STAGES) -> Dict[str, Any]:
    """ms per forward + backward of one BRA layer at each stage shape, per ``attn_impl`` (or the error)."""
    results: Dict[str, Any] = {}
    for side, dim, heads, topk in stages:
        torch.manual_seed(0)
        layer = BiLevelRoutingAttention(dim, heads, 7, topk, channels_last=True).to(device)
        x = torch.randn(batch, side, side, dim, device=device, requires_grad=True)

        def step(impl: str) -> None:
            with routed_attention_impl(layer, impl), torch.autocast(device.type, dtype=torch.bfloat16):
                out = layer(x)
            out.float().sum().backward()

        shape = results[f'{batch}x{side}x{side}x{dim}, topk {topk}'] = {}
        working = {}
        for impl in ATTN_IMPLS[1:]:  # 'auto' is one of the others
            try:
                step(impl)
                working[f'layer[{impl}]'] = partial(step, impl)
            except Exception as e:  # noqa: BLE001
                shape[f'layer[{impl}]'] = dict(error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
        samples = round_robin(working, s['rounds'], device, warmup=1)
        for label in working:
            shape[label] = dict(ms=statistics.median(samples[label]))
    return dict(shapes=results)


def profile_rows(model_names: Sequence[str], batch: int, size: Tuple[int, int], device: torch.device,
                 top: int = 25) -> Dict[str, Any]:
    """The ``top`` operators by self device time (CPU time on the CPU) in one training step of each model."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    out = {}
    for name in model_names:
        step = Step(build(name, size, None), batch, size, True, device)
        for _ in range(2):  # warm up (kernels, allocator)
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            step()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
        if device.type == 'cuda' and not hasattr(events[0], key):
            key = 'self_cuda_time_total'  # torch < 2.4
        total = sum(getattr(e, key) for e in events)
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
        out[name] = dict(total_ms=total / 1e3, ops=[dict(op=e.key, ms=getattr(e, key) / 1e3, calls=e.count)
                                                     for e in ranked])
        del step
    return out


def ratios(eval_results: Dict[str, Dict[str, Any]], train_results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Throughput over the Swin of the model's class (> 1 faster) and peak train memory over it (< 1 smaller)."""
    out = {}
    for model, baseline in BASELINE.items():
        entry = {}
        for key, results, field in (('eval', eval_results, 'img_s'), ('train', train_results, 'img_s'),
                                    ('memory', train_results, 'peak_mib')):
            if field in results.get(model, {}) and field in results.get(baseline, {}):
                entry[key] = results[model][field] / results[baseline][field]
        if entry:
            out[model] = dict(entry, baseline=baseline)
    return out


def git_commit() -> str:
    result = subprocess.run(['git', '-C', str(HERE), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)
    return result.stdout.strip() or 'unknown'


def run(device: torch.device, official: Optional[Path], quick: bool, groups: Sequence[str], out: Path,
        deadline_s: float, commit: Optional[str] = None) -> Dict[str, Any]:
    s = settings(quick)
    size = (s['img_size'], s['img_size'])
    started = time.perf_counter()
    report: Dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu', torch=torch.__version__,
        commit=commit or git_commit(), machine=machine_info(device), settings=dict(s, detection_size=list(s['detection_size'])),
        command=' '.join(['python', 'benchmarks/cuda_report.py', *sys.argv[1:]]), groups={})
    zoo = ['biformer_small', 'biformer_base', 'crossformer_small']
    models = [*zoo, SWIN_T, SWIN_S, *([OFFICIAL] if official else [])]
    plans: Dict[str, Callable[[], Dict[str, Any]]] = dict(
        layers=lambda: layer_rows(s['train_batch'], s, device),
        profile=lambda: profile_rows(['biformer_small', SWIN_T], s['train_batch'], size, device),
        eval=lambda: measure(models, s['eval_batch'], size, False, s, device, official),
        train=lambda: measure(models, s['train_batch'], size, True, s, device, official),
        attn_impl=lambda: {mode: measure([*(f'biformer_small[{impl}]' for impl in ATTN_IMPLS), SWIN_T], batch, size,
                                         train, s, device, None)
                           for mode, batch, train in (('eval', s['eval_batch'], False),
                                                      ('train', s['train_batch'], True))},
        compile=lambda: {mode: measure(['biformer_small', 'crossformer_small', SWIN_T], batch, size, train, s, device,
                                       None, compiled=True)
                         for mode, batch, train in (('eval', s['eval_batch'], False),
                                                    ('train', s['train_batch'], True))},
        detection=lambda: measure(['biformer_small', 'crossformer_small', SWIN_T], s['detection_batch'],
                                  s['detection_size'], True, s, device, None, features=True),
    )
    for group in groups:
        if time.perf_counter() - started > deadline_s:
            report['groups'][group] = dict(error=f'skipped: past the {deadline_s:.0f} s deadline')
            continue
        begin = time.perf_counter()
        try:
            report['groups'][group] = plans[group]()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report['groups'][group] = dict(error=f'{type(e).__name__}: {e}')
        print(f'{group}: {time.perf_counter() - begin:.0f} s', flush=True)
        if 'eval' in report['groups'] and 'train' in report['groups']:
            report['ratios'] = ratios(report['groups']['eval'], report['groups']['train'])
        if 'eval' in report['groups'].get('compile', {}):
            report['ratios_compiled'] = ratios(report['groups']['compile']['eval'],
                                               report['groups']['compile']['train'])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + '\n')  # after every group: a cut-off run keeps what it measured
    return report


def _fmt(value: Optional[float], spec: str) -> str:
    return '–' if value is None else format(value, spec)


def _ratio_table(title: str, eval_results: Dict[str, Any], train_results: Dict[str, Any], model_ratios: Dict[str, Any],
                 notes: List[str]) -> TextTable:
    """Eval and train throughput and peak train memory of each zoo model and its ratios to its Swin, then the Swins."""
    rows = []
    for model, r in model_ratios.items():
        e, t = eval_results.get(model, {}), train_results.get(model, {})
        rows.append([model, r['baseline'], _fmt(e.get('img_s'), '.0f'), _fmt(r.get('eval'), '.2f'),
                     _fmt(t.get('img_s'), '.0f'), _fmt(r.get('train'), '.2f'), _fmt(t.get('peak_mib'), '.0f'),
                     _fmt(r.get('memory'), '.2f')])
    for swin in (SWIN_T, SWIN_S):
        e, t = eval_results.get(swin, {}), train_results.get(swin, {})
        if not e and not t:
            continue  # not in this group
        rows.append([swin, '', _fmt(e.get('img_s'), '.0f'), '1.00', _fmt(t.get('img_s'), '.0f'), '1.00',
                     _fmt(t.get('peak_mib'), '.0f'), '1.00'])
    return TextTable(title, ['model', 'compared with', 'eval img/s', 'eval ratio', 'train img/s', 'train ratio',
                             'train peak MiB', 'memory ratio'], rows, label_columns=2, notes=notes)


def tables(report: Dict[str, Any]) -> List[TextTable]:
    """The report's groups as tables (the rendering in docs/performance.md)."""
    s, groups = report['settings'], report['groups']
    out = []
    notes = [f'{report["device"]}, torch {report["torch"]}, commit {report["commit"]}; bf16 autocast, median of '
             f'{s["rounds"]} round-robin rounds after {s["warmup"]} warm-up steps. Command: `{report["command"]}`']
    title = (f'Eval (batch {s["eval_batch"]}) and train (batch {s["train_batch"]}, AdamW) at {s["img_size"]}x'
             f'{s["img_size"]} against the Swin of the same class')
    if 'ratios' in report:
        out.append(_ratio_table(title, groups['eval'], groups['train'], report['ratios'], notes))
    if 'ratios_compiled' in report:
        compiled = groups['compile']
        out.append(_ratio_table(f'{title}, every model under torch.compile', compiled['eval'], compiled['train'],
                                report['ratios_compiled'], ['compile time (first step, s): ' + ', '.join(
                                    f'{label} {r["first_step_s"]:.0f}' for label, r in compiled['train'].items()
                                    if 'first_step_s' in r)]))
    layers = groups.get('layers', {}).get('shapes', {})
    if layers:
        labels = list(dict.fromkeys(label for cells in layers.values() for label in cells))
        rows = [[shape, *(_fmt(cells.get(label, {}).get('ms'), '.2f') if 'error' not in cells.get(label, {}) else
                          'failed' for label in labels)] for shape, cells in layers.items()]
        errors = sorted({f'{label}: {cells[label]["error"][:120]}' for cells in layers.values() for label in cells
                         if 'error' in cells[label]})
        out.append(TextTable('One BiLevelRoutingAttention layer at BiFormer-S\'s stage shapes, bf16 autocast, forward + '
                             'backward, ms per call', ['shape (B x H x W x C)', *labels], rows, label_columns=1,
                             notes=[f'failed: {e}' for e in errors]))
    profiles = groups.get('profile', {})
    if profiles and 'error' not in profiles:
        for name, p in profiles.items():
            out.append(TextTable(f'{name}: one training step (batch {s["train_batch"]}), operators by self time on '
                                 f'the device, {p["total_ms"]:.1f} ms in all', ['operator', 'ms', 'calls'],
                                 [[o['op'], f'{o["ms"]:.2f}', str(o['calls'])] for o in p['ops']], label_columns=1))
    impl = groups.get('attn_impl', {})
    if 'eval' in impl:
        rows = [[label, _fmt(impl['eval'].get(label, {}).get('img_s'), '.0f'),
                 _fmt(impl['train'].get(label, {}).get('img_s'), '.0f'),
                 _fmt(impl['train'].get(label, {}).get('peak_mib'), '.0f'),
                 impl['eval'].get(label, {}).get('error') or impl['train'].get(label, {}).get('error') or '']
                for label in impl['eval']]
        out.append(TextTable('biformer_small with each attn_impl, and Swin-T, in one round-robin (same batches)',
                             ['model', 'eval img/s', 'train img/s', 'train peak MiB', 'error'], rows, label_columns=1))
    detection = groups.get('detection', {})
    if detection and 'error' not in detection:
        h, w = s['detection_size']
        rows = [[label, _fmt(r.get('ms'), '.1f'), _fmt(r.get('peak_mib'), '.0f'), r.get('error', '')]
                for label, r in detection.items()]
        out.append(TextTable(f'features_only training step at {h}x{w}, batch {s["detection_batch"]}',
                             ['model', 'ms per step', 'peak MiB', 'error'], rows, label_columns=1))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--official-biformer', type=Path, default=None, help='clone of rayleizhu/BiFormer')
    parser.add_argument('--groups', default='layers,attn_impl,eval,train,compile,profile,detection')
    parser.add_argument('--commit', default=None, help='the commit measured (default: git rev-parse of this tree)')
    parser.add_argument('--out', type=Path, default=HERE / 'results' / 'cuda.json')
    parser.add_argument('--deadline', type=float, default=float('inf'), help='start no group after this many s')
    parser.add_argument('--quick', action='store_true', help='tiny sizes, for a smoke test')
    parser.add_argument('--render', type=Path, default=None, help='print the tables of a saved report and exit')
    args = parser.parse_args(argv)
    if args.render is not None:
        print(tables_to_markdown(tables(json.loads(args.render.read_text()))))
        return 0
    device = torch.device(args.device)
    # torch.compile specialises on shapes; the compile group meets more graphs than dynamo's default limit (8)
    for option in ('recompile_limit', 'cache_size_limit'):
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, 64)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: torch sees no CUDA device (use --device cpu with --quick for a smoke test)')
    report = run(device, args.official_biformer, args.quick, args.groups.split(','), args.out, args.deadline,
                 args.commit)
    print(tables_to_markdown(tables(report)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
