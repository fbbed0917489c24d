"""benchmarks/perf_targets.py in --quick mode: every group reported, each status computed from its number.

No assertion depends on how fast anything runs."""
import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any, Dict

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'perf_targets.py'


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location('perf_targets', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def script() -> ModuleType:
    return _load_script()


@pytest.fixture(scope='module')
def quick_run(script: ModuleType) -> Dict[str, Any]:
    # one thread: on a shared 2-core machine two threads can wait on each other for seconds per op
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        script.main(['--quick', '--threads', '1', '--format', 'json'])
    return json.loads(stdout.getvalue())


def test_every_group_reported(script: ModuleType, quick_run: Dict[str, Any]) -> None:
    assert {group: bool(checks) for group, checks in quick_run['groups'].items()} == \
        {group: True for group in script.GROUPS}


def test_status_follows_checked_value_and_target(quick_run: Dict[str, Any]) -> None:
    checks = [c for checks in quick_run['groups'].values() for c in checks]
    wrong = []
    for c in checks:
        checked, target = c['checked'], c['target']
        # the checked number is the value over (or, in MiB, minus) what it is compared with, never the inverse
        expected = c['value'] - c['reference_value'] if target['unit'] == 'MiB' else c['value'] / c['reference_value']
        met = checked >= target['bound'] if target['op'] == '>=' else checked <= target['bound']
        if not (math.isfinite(checked) and checked > 0 and c['met'] == met and math.isclose(checked, expected)):
            wrong.append((c['group'], c['model'], checked, target, c['met']))
    assert not wrong


def test_custom_backward_benchmark_times_both_variants() -> None:
    """benchmarks/custom_backward.py: one row per layer shape, both variants timed."""
    spec = importlib.util.spec_from_file_location('custom_backward', SCRIPT.parent / 'custom_backward.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = list(module.routed_rows(rounds=1))
    assert [label.split(',')[1].strip() for label, _, _ in rows] == ['8x56x56x64', '8x28x28x128']
    attention = list(module.attention_rows(rounds=1))
    assert len(attention) == 4
    stem = list(module.stem_rows(rounds=1))
    assert [label.split(',')[-2].strip() for label, _, _ in stem] == ['kernel 16', 'kernel 32']
    depthwise = list(module.depthwise_rows(rounds=1))
    assert [label.split(',')[-1].strip() for label, _, _ in depthwise] == [
        '8x56x56x64', '8x28x28x128', '8x14x14x256', '8x7x7x512']
    layout = list(module.stem_layout_rows(rounds=1))
    assert [label.split()[0] for label, _, _ in layout] == ['biformer_small', 'crossformer_small']
    assert all(math.isfinite(before) and math.isfinite(after) and before > 0 and after > 0
               for _, before, after in rows + attention + stem + depthwise + layout)


def _load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('family', ['biformer', 'crossformer'])
def test_parity_script_refuses_a_folder_that_is_not_the_official_clone(tmp_path, capsys, family):
    """benchmarks/parity_official.py needs a clone of the official repository (not available to the tests)."""
    with pytest.raises(SystemExit) as exit_info:
        _load_benchmark('parity_official').main(['--family', family, '--official-repo', str(tmp_path)])
    expected = 'not a clone of rayleizhu/BiFormer' if family == 'biformer' else 'is not a git clone'
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_parity_script_pass_rule(capsys):
    """PASS: allclose(rtol=1e-4, atol=1e-5 max|ref|) in float32, max|diff|/max|ref| < 1e-12 in float64."""
    report = _load_benchmark('parity_official').report
    ref = torch.linspace(-3, 3, 100, dtype=torch.float64)
    assert report('m', 'logits', [ref + 1e-13], [ref]) and not report('m', 'logits', [ref + 1e-10], [ref])
    ref32 = ref.float()
    assert report('m', 'logits', [ref32 + 1e-5], [ref32]) and not report('m', 'logits', [ref32 + 1e-3], [ref32])
    assert not report('m', 'features', [ref32[:50]], [ref32])  # a shape mismatch fails
    assert capsys.readouterr().out.count('FAIL') == 3


def test_cuda_report_ratios_and_tables_follow_from_the_saved_run():
    """benchmarks/results/cuda.json (an H200 run): every ratio is the model's figure over its Swin's, and the
    document tables render from it."""
    cuda = _load_benchmark('cuda_report')
    report = json.loads((SCRIPT.parent / 'results' / 'cuda.json').read_text())
    eval_results, train_results = report['groups']['eval'], report['groups']['train']
    assert {'device', 'torch', 'commit', 'ratios'} <= set(report) and 'H200' in report['device']
    for model, r in report['ratios'].items():
        base = r['baseline']
        assert math.isclose(r['eval'], eval_results[model]['img_s'] / eval_results[base]['img_s'])
        assert math.isclose(r['train'], train_results[model]['img_s'] / train_results[base]['img_s'])
        assert math.isclose(r['memory'], train_results[model]['peak_mib'] / train_results[base]['peak_mib'])
    assert cuda.ratios(eval_results, train_results) == report['ratios']
    titles = [t.title for t in cuda.tables(report)]
    assert len(titles) == 4 and titles[0].startswith('Eval (batch 128) and train (batch 64')


def test_cuda_report_measures_each_label_and_records_failures():
    """cuda_report.measure on the CPU at a tiny size: figures for each model, an error row for one that fails."""
    cuda = _load_benchmark('cuda_report')
    s = dict(rounds=1, warmup=0)
    results = cuda.measure(['biformer_tiny[gather]', 'biformer_tiny[no_such_impl]'], 1, (64, 64), True, s,
                           torch.device('cpu'), None)
    good, bad = results['biformer_tiny[gather]'], results['biformer_tiny[no_such_impl]']
    assert good['ms'] > 0 and good['img_s'] > 0 and good['peak_mib'] > good['params_m']
    assert 'error' in bad and 'no_such_impl' in bad['error']
