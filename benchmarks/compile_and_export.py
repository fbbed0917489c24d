"""torch.compile (inductor, CPU) and ONNX export of full-size models: graph breaks, agreement, speed.

    python benchmarks/compile_and_export.py --models biformer_small crossformer_small --threads 2

For each model: eager and compiled latency (median of --rounds single-image calls), compile time, max abs difference,
graph breaks (``torch._dynamo.explain``), the recompile at a second size; then ONNX export (the dynamo exporter,
classifier and ``features_only``) checked against onnxruntime, and whether a dynamic H/W export works.
Prints one JSON object per model (``--format json``) or a markdown table.
"""
import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import timm

import biformer_zoo  # noqa: F401
from biformer_zoo.tools.tables import TextTable, tables_to_markdown


def _median_latency_ms(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _timed(fn: Callable[[], Any]) -> tuple:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, dynamic_hw: bool = False) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    shapes = None
    if dynamic_hw:
        dim = torch.export.Dim
        shapes = {'x': {2: dim('height', min=32, max=2048), 3: dim('width', min=32, max=2048)}}  # forward(x)
    # the exporter decomposes attention into math ops; tracing with the math backend keeps the recorded strides valid
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # exporter chatter
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=['images'], dynamic_shapes=shapes)


def _onnx_check(name: str, features_only: bool, x: torch.Tensor, rounds: int, workdir: Path) -> Dict[str, Any]:
    import onnx
    import onnxruntime
    model = timm.create_model(name, features_only=features_only).eval()
    path = workdir / f'{name}-{features_only}.onnx'
    _, export_s = _timed(lambda: _export_onnx(model, x, path))
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == '')
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    outputs = session.run(None, {'images': x.numpy()})
    with torch.no_grad():
        expected = model(x)
    expected = expected if features_only else [expected]
    max_diff = max(float((torch.from_numpy(o) - e).abs().max()) for o, e in zip(outputs, expected))
    ort_ms = _median_latency_ms(lambda: session.run(None, {'images': x.numpy()}), rounds)
    return dict(export_s=round(export_s, 1), opset=opset, max_abs_diff=max_diff, ort_ms=round(ort_ms, 1))


def _dynamic_hw_export(name: str, x: torch.Tensor, workdir: Path) -> str:
    try:
        _export_onnx(timm.create_model(name).eval(), x, workdir / f'{name}-dynamic.onnx', dynamic_hw=True)
    except Exception as e:  # report why, the export is expected to fail today
        message = str(e).split('## Exception summary')[-1].strip().splitlines()
        return f'fails: {type(e).__name__}: {message[0][:160] if message else ""}'
    return 'works'


def run(name: str, size: int, second_size: int, rounds: int, onnx: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x, x2 = torch.randn(1, 3, size, size), torch.randn(1, 3, second_size, second_size)
    result: Dict[str, Any] = dict(model=name, size=size, threads=torch.get_num_threads())
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        result['graphs'], result['graph_breaks'] = explanation.graph_count, explanation.graph_break_count
        torch._dynamo.reset()
        eager_out = model(x)
        result['eager_ms'] = round(_median_latency_ms(lambda: model(x), rounds), 1)
        compiled = torch.compile(model, dynamic=False)
        compiled_out, compile_s = _timed(lambda: compiled(x))
        result['compile_s'] = round(compile_s, 1)
        result['compiled_ms'] = round(_median_latency_ms(lambda: compiled(x), rounds), 1)
        result['speedup'] = round(result['eager_ms'] / result['compiled_ms'], 2)
        result['compiled_max_abs_diff'] = float((compiled_out - eager_out).abs().max())
        second_out, recompile_s = _timed(lambda: compiled(x2))
        result['second_size'] = second_size
        result['recompile_s'] = round(recompile_s, 1)
        result['second_size_max_abs_diff'] = float((second_out - model(x2)).abs().max())
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            result['onnx'] = _onnx_check(name, False, x, rounds, workdir)
            result['onnx_features_only'] = _onnx_check(name, True, x, rounds, workdir)
            result['onnx_dynamic_hw'] = _dynamic_hw_export(name, x, workdir)
    return result


def _markdown(results: List[Dict[str, Any]], title: str) -> str:
    columns = ['model', 'graph breaks', 'eager ms', 'compiled ms', 'speedup', 'compile s', 'recompile s (2nd size)',
               'max abs diff', 'ONNX opset', 'ORT ms', 'ORT max abs diff (cls / features)', 'dynamic H/W ONNX']
    rows = []
    for r in results:
        onnx, feats = r.get('onnx', {}), r.get('onnx_features_only', {})
        rows.append([
            r['model'], str(r['graph_breaks']), str(r['eager_ms']), str(r['compiled_ms']), f"{r['speedup']}x",
            str(r['compile_s']), f"{r['recompile_s']} ({r['second_size']} px)", f"{r['compiled_max_abs_diff']:.1e}",
            str(onnx.get('opset', '-')), str(onnx.get('ort_ms', '-')),
            f"{onnx.get('max_abs_diff', float('nan')):.1e} / {feats.get('max_abs_diff', float('nan')):.1e}",
            str(r.get('onnx_dynamic_hw', '-'))])
    return tables_to_markdown([TextTable(title, columns, rows, label_columns=1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['biformer_small', 'crossformer_small'])
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--second-size', type=int, default=256)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--no-onnx', action='store_true')
    parser.add_argument('--format', choices=['markdown', 'json'], default='markdown')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        results.append(run(name, args.size, args.second_size, args.rounds, not args.no_onnx))
        if args.format == 'json':
            print(json.dumps(results[-1]), flush=True)
    if args.format == 'markdown':
        print(_markdown(results, f'{args.size} px, batch 1, {args.threads} thread(s), median of {args.rounds} runs'))


if __name__ == '__main__':
    main()
