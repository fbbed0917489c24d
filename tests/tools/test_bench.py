"""Round-robin benchmark: structure of the results, ratios against the baseline, memory, settings and errors.

No assertion depends on how fast anything runs."""
import json

import pytest
import timm
import torch

from biformer_zoo.tools.bench import BenchReport, benchmark, round_robin
from biformer_zoo.cli import main

torch.set_num_threads(2)

MODELS = ['test_resnet', 'test_vit']
BASELINE = 'test_convnext'


def _bench(mode: str = 'infer', rounds: int = 3) -> BenchReport:
    return benchmark(MODELS, img_size=32, batch_size=2, mode=mode, rounds=rounds, warmup=1, threads=1,
                     baseline=BASELINE)


@pytest.fixture(scope='module')
def infer_report() -> BenchReport:
    return _bench('infer')


@pytest.fixture(scope='module')
def train_report() -> BenchReport:
    return _bench('train')


def test_every_model_and_the_baseline_timed_once_per_round(infer_report):
    assert {r.model: len(r.samples_ms) for r in infer_report.results} == {name: 3 for name in [*MODELS, BASELINE]}


def test_round_robin_warms_up_then_rotates_the_starting_step():
    calls, after = [], []
    steps = {label: (lambda label=label: calls.append(label)) for label in 'abc'}
    samples = round_robin(steps, rounds=3, warmup=2, on_step=lambda: after.append(calls[-1]))
    assert calls == ['a', 'a', 'b', 'b', 'c', 'c'] + ['a', 'b', 'c', 'b', 'c', 'a', 'c', 'a', 'b']
    assert after == calls  # on_step follows every run, warm-up runs included
    assert {label: len(ms) for label, ms in samples.items()} == {'a': 3, 'b': 3, 'c': 3}  # warm-up runs not timed


def test_baseline_ratios_are_one(infer_report):
    (baseline,) = [r for r in infer_report.results if r.model == BASELINE]
    assert (baseline.latency_ratio, baseline.throughput_ratio) == (1.0, 1.0)


def test_throughput_is_batch_over_median_latency(infer_report):
    assert all(r.throughput == pytest.approx(2 / (r.latency_ms_median / 1e3)) for r in infer_report.results)


def test_peak_memory_holds_at_least_the_weights(infer_report):
    assert all(r.peak_memory_mb * 2 ** 20 >= r.params * 4 for r in infer_report.results)


def test_training_step_needs_more_memory_than_inference(infer_report, train_report):
    infer = {r.model: r.peak_memory_mb for r in infer_report.results}
    assert all(r.peak_memory_mb > infer[r.model] for r in train_report.results)


def test_threads_set_for_the_run_and_restored_after(monkeypatch):
    seen = []
    model = timm.create_model('test_resnet')
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(timm, 'create_model', lambda *args, **kwargs: model)
    before = torch.get_num_threads()  # whatever earlier tests left: the run must differ from it, then restore it
    threads = 2 if before == 1 else 1
    benchmark(['test_resnet'], img_size=32, batch_size=1, rounds=1, warmup=0, threads=threads, baseline=None)
    assert seen and set(seen) == {threads} and torch.get_num_threads() == before


def test_command_reproduces_settings(infer_report):
    assert infer_report.command == ('biformer-zoo bench test_resnet test_vit --img-size 32x32 --batch-size 2 --mode '
                                    'infer --rounds 3 --warmup 1 --threads 1 --device cpu --baseline test_convnext')


def test_command_lists_the_baseline_when_it_is_the_only_model():
    """`biformer-zoo bench` without names benches every zoo model, so the printed command must name the model."""
    report = benchmark([BASELINE], img_size=32, batch_size=1, rounds=1, warmup=0, threads=1, baseline=BASELINE)
    assert report.command.startswith(f'biformer-zoo bench {BASELINE} --img-size')


def test_json_flag_conflicting_with_another_format_is_refused_before_running(capsys):
    assert main(['bench', 'test_resnet', '--json', '--format', 'markdown']) == 2
    assert '--json means --format json' in capsys.readouterr().err


def test_model_args_reach_the_models_but_not_the_baseline():
    report = benchmark(['test_vit'], img_size=32, rounds=1, warmup=0, threads=1, baseline='test_resnet',
                       model_kwargs=dict(num_classes=10))
    with torch.device('meta'):
        expected = {name: sum(p.numel() for p in timm.create_model(name, **kwargs).parameters())
                    for name, kwargs in (('test_vit', dict(num_classes=10, img_size=32)), ('test_resnet', {}))}
    assert {r.model: r.params for r in report.results} == expected


BENCH_KEYS = {'results', 'baseline', 'settings', 'machine', 'memory_method', 'command', 'schema_version'}
RESULT_KEYS = {'model', 'params', 'latency_ms_median', 'latency_ms_p25', 'latency_ms_p75', 'latency_ms_min',
               'throughput', 'peak_memory_mb', 'latency_ratio', 'throughput_ratio', 'samples_ms'}


def test_cli_json_schema_is_stable(capsys):
    code = main(['bench', 'test_vit', '--img-size', '32', '--rounds', '2', '--warmup', '0', '--threads', '1',
                 '--baseline', 'none', '--json'])
    out = json.loads(capsys.readouterr().out)
    assert (code, set(out), set(out['results'][0]), out['schema_version']) == (0, BENCH_KEYS, RESULT_KEYS, 1)


@pytest.mark.parametrize('kwargs,message', [
    (dict(mode='eval'), 'mode must be one of'),
    (dict(amp='fp8'), 'amp must be one of'),
    (dict(rounds=0), 'rounds must be at least 1'),
    pytest.param(dict(device='cuda'), 'no CUDA device',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA device is present')),
])
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark(['test_vit'], **kwargs)
