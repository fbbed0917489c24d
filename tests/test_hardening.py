"""Hardening of both families: bad input and arguments, mixed precision, memory format, torch.compile, ONNX export,
determinism, concurrent serving and safe loading.

Heavy checks run on
reduced-depth models of the same classes and widths (``depths=(1, 1, 2, 1)``: every stage, SDA and LDA) at 64 px;
the full-size compile/export numbers come from ``benchmarks/compile_and_export.py``.
"""
import ast
import contextlib
import copy
import functools
import json
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from biformer_zoo.layers import AttentionLePE, BiLevelRoutingAttention, LSDAttention
from official_layouts import RunsCodeWhenUnpickled

REDUCED_DEPTHS = (1, 1, 2, 1)
# one model per distinct attention/stem configuration, for the costlier checks
CONFIGS = ['biformer_tiny', 'biformer_stl', 'crossformer_tiny', 'crossformerpp_small']
BF16_REL_TOL = 0.05  # relative L2 error of bf16 autocast against fp32 (measured: <= 0.018, see the README)
REPO = Path(__file__).resolve().parents[1]


def _reduced(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, depths=REDUCED_DEPTHS, num_classes=10, **kwargs)


@pytest.fixture(scope='module')
def reduced_models() -> Dict[str, torch.nn.Module]:
    """One reduced-depth eval model per configuration."""
    return {name: _reduced(name).eval() for name in CONFIGS}


# ---------------------------------------------------------------------------------------------------------------
# edge-case input (bad input and arguments: test_bad_input.py)

@pytest.mark.parametrize('name', CONFIGS)
def test_empty_batch_gives_empty_logits(reduced_models, name):
    with torch.no_grad():
        out = reduced_models[name](torch.randn(0, 3, 64, 64))
    assert out.shape == (0, 10)


@pytest.mark.parametrize('name', CONFIGS)
def test_empty_batch_trains(reduced_models, name):
    """A training step on an empty batch (the last shard of a dataset, say) runs and gives zero gradients."""
    model = copy.deepcopy(reduced_models[name]).train()
    model(torch.randn(0, 3, 64, 64)).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize('name', CONFIGS)
def test_nan_in_one_image_stays_in_that_image(reduced_models, name):
    """Documented behaviour: inputs are not scanned for NaN/Inf (a full pass per call); a non-finite image gives
    non-finite logits for that image only, the other images of the batch are unaffected (eval mode)."""
    x = torch.randn(3, 3, 64, 64)
    bad = x.clone()
    bad[1, 0, 5, 7], bad[1, 2, 40, 3] = float('nan'), float('inf')
    with torch.no_grad():
        clean, out = reduced_models[name](x), reduced_models[name](bad)
    assert not torch.isfinite(out[1]).any() and torch.equal(out[[0, 2]], clean[[0, 2]])


# ---------------------------------------------------------------------------------------------------------------
# mixed precision and memory format

def _rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).norm() / reference.norm()).item()


@functools.lru_cache(maxsize=None)
def _bf16_vs_fp32(name: str) -> Tuple[float, float, bool]:
    """(relative error of the logits, of all gradients, all finite) of a bf16-autocast training step vs fp32."""
    model = _reduced(name).train()
    x, target = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 7])
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(x)
            F.cross_entropy(logits.float(), target).backward()
        results.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (logits32, grads32), (logits16, grads16) = results
    finite = bool(torch.isfinite(logits16).all() and torch.isfinite(grads16).all())
    return _rel_error(logits16, logits32), _rel_error(grads16, grads32), finite


@pytest.mark.parametrize('name', CONFIGS)
def test_bf16_autocast_forward_close_to_fp32(name):
    logits_error, _, finite = _bf16_vs_fp32(name)
    assert finite and logits_error < BF16_REL_TOL, f'relative error {logits_error:.4f}'


@pytest.mark.parametrize('name', CONFIGS)
def test_bf16_autocast_gradients_close_to_fp32(name):
    _, grad_error, finite = _bf16_vs_fp32(name)
    assert finite and grad_error < BF16_REL_TOL, f'relative error {grad_error:.4f}'


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', CONFIGS)
def test_low_precision_images_run_under_autocast(reduced_models, name, dtype):
    """A float16/bfloat16 batch into the float32 model: refused outside autocast (test_bad_input.py), taken under it
    (forward_features and forward_intermediates), close to the float32 batch under the same autocast."""
    model, x = reduced_models[name], torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out, reference = model(x.to(dtype)), model(x)
        features = model.forward_intermediates(x.to(dtype), intermediates_only=True)
    assert len(features) == 4 and _rel_error(out, reference.float()) < BF16_REL_TOL


class _Float32MatmulLog(TorchDispatchMode):
    """Records the attention-size ops (matmuls, attention kernels, softmax) that get a float32 input."""
    HOT_OPS = ('mm', 'bmm', 'addmm', 'baddbmm', 'matmul', 'scaled_dot_product', 'softmax')

    def __init__(self):
        super().__init__()
        self.float32_ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(op in name for op in self.HOT_OPS):
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if any(t.dtype == torch.float32 and t.numel() > 1024 for t in tensors):
                self.float32_ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('layer,train', [
    (BiLevelRoutingAttention(64, num_heads=2, num_regions=4, topk=4, channels_last=True), True),
    (AttentionLePE(64, num_heads=2, channels_last=True), True),
    # in training the learnable position bias makes PyTorch pick its math SDPA backend, which computes bf16 in fp32
    (LSDAttention(64, num_heads=2, long_distance=True, interval=2, channels_last=True), False),
], ids=['bra_train', 'lepe_train', 'lsda_eval'])
def test_attention_runs_in_bf16_under_autocast(layer, train):
    layer.train(train)
    x = torch.randn(2, 15, 15, 64, requires_grad=train)
    with _Float32MatmulLog() as log, torch.set_grad_enabled(train):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x)
        if train:
            out.float().sum().backward()
    assert log.float32_ops == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', CONFIGS)
def test_cuda_autocast_training_step_close_to_fp32(name, dtype):
    model = _reduced(name).cuda().train()
    x, target = torch.randn(2, 3, 64, 64, device='cuda'), torch.tensor([1, 7], device='cuda')
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast('cuda', dtype=dtype, enabled=enabled):
            F.cross_entropy(model(x).float(), target).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.isfinite(grads[1]).all() and _rel_error(grads[1], grads[0]) < BF16_REL_TOL


@pytest.mark.parametrize('name', CONFIGS)
def test_channels_last_input_same_output(reduced_models, name):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected, out = reduced_models[name](x), reduced_models[name](x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and ONNX (reduced depth; full size and timings: benchmarks/compile_and_export.py)

@pytest.mark.parametrize('name', ['biformer_small', 'crossformer_small'])
def test_dynamo_traces_training_forward_as_one_graph(name):
    """Training mode (BRA's custom autograd Function, LSDA's uncached bias); eval mode: the fullgraph test below."""
    model = _reduced(name).train()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.parametrize('name', ['biformer_small', 'crossformer_small'])
def test_compiled_fullgraph_matches_eager_at_two_sizes(name):
    """fullgraph=True fails on any graph break; dynamic=False compiles a second graph for the second size (see
    README). Through aot_eager (dynamo and AOTAutograd, no codegen): inductor is timed in
    benchmarks/compile_and_export.py."""
    torch._dynamo.reset()
    model = _reduced(name).eval()
    graphs = []

    def counting_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.backends.registry.lookup_backend('aot_eager')(graph_module, example_inputs)

    compiled = torch.compile(model, backend=counting_aot_eager, fullgraph=True, dynamic=False)
    inputs = [torch.randn(1, 3, 64, 64), torch.randn(2, 3, 72, 48)]
    with torch.no_grad():
        pairs = [(compiled(x), model(x)) for x in inputs]
    assert len(graphs) == 2 and all(torch.allclose(out, ref, rtol=1e-5, atol=1e-5) for out, ref in pairs)


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """The exporter decomposes SDPA into math ops; trace with the same backend so that recorded strides agree."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


@pytest.mark.parametrize('name,features_only', [('biformer_small', False), ('crossformer_small', True)])
def test_onnx_export_matches_onnxruntime(tmp_path, name, features_only):
    onnxruntime = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    model = timm.create_model(name, depths=REDUCED_DEPTHS, features_only=features_only).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / f'{name}.onnx'
    with _math_attention(), torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=['images'])
        expected = model(x)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    outputs = session.run(None, {'images': x.numpy()})
    expected = expected if features_only else [expected]
    assert all(torch.allclose(torch.from_numpy(o), e, rtol=1e-4, atol=1e-4) for o, e in zip(outputs, expected))


# ---------------------------------------------------------------------------------------------------------------
# determinism and concurrency

@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _training_step_gradients(name: str) -> torch.Tensor:
    model = _reduced(name).train()
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    F.cross_entropy(model(x), torch.tensor([3, 4])).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize('name', ['biformer_tiny', 'crossformerpp_small'])
def test_deterministic_training_step_repeats_bitwise(name):
    with _deterministic():
        first, second = _training_step_gradients(name), _training_step_gradients(name)
    assert torch.equal(first, second)


@pytest.mark.parametrize('name', CONFIGS)
def test_two_eval_runs_bitwise_equal(reduced_models, name):
    """Two runs of one model, and a copy with empty position-bias caches (CrossFormer), give the same bits."""
    model, fresh = reduced_models[name], copy.deepcopy(reduced_models[name])
    for layer in fresh.modules():
        if isinstance(layer, LSDAttention):
            layer.clear_position_bias_cache()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        first, second, uncached = model(x), model(x), fresh(x)
    assert torch.equal(first, second) and torch.equal(first, uncached)


@pytest.mark.parametrize('name', ['biformer_tiny', 'crossformer_tiny', 'crossformerpp_small'])
def test_four_threads_equal_serial_calls(reduced_models, name):
    """One eval model serving 4 threads at once gives the serial results. For CrossFormer the position-bias caches
    are emptied after the serial pass, so the threads fill them concurrently (different sizes, different entries)."""
    model = copy.deepcopy(reduced_models[name])
    inputs = [torch.randn(1, 3, h, w) for h, w in [(64, 64), (96, 64), (40, 72), (64, 96)]] * 2
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    caching = [layer for layer in model.modules() if isinstance(layer, LSDAttention)]
    for layer in caching:
        layer.clear_position_bias_cache()
    results = [None] * len(inputs)
    start = threading.Barrier(4)

    def serve(worker: int) -> None:
        start.wait()
        with torch.no_grad():
            for i in range(worker, len(inputs), 4):
                results[i] = model(inputs[i])

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and torch.equal(r, s) for r, s in zip(results, serial))
    assert all(layer.cached_position_biases for layer in caching)


# ---------------------------------------------------------------------------------------------------------------
# safe loading

def _python_sources() -> Iterator[Tuple[str, str]]:
    """(where, source) of every Python file and notebook code cell of the repository."""
    for path in sorted(REPO.rglob('*.py')):
        if not any(part.startswith('.') or part in ('build', 'venv') for part in path.relative_to(REPO).parts):
            yield str(path.relative_to(REPO)), path.read_text()
    for path in sorted(REPO.rglob('*.ipynb')):
        if '.ipynb_checkpoints' not in path.parts:
            for i, cell in enumerate(json.loads(path.read_text())['cells']):
                if cell['cell_type'] == 'code':
                    source = ''.join(cell['source'])
                    yield f'{path.relative_to(REPO)} cell {i}', '\n'.join(
                        line for line in source.splitlines() if not line.lstrip().startswith(('!', '%')))


def _unsafe_torch_loads(source: str) -> List[int]:
    """Lines with a ``torch.load(...)`` call whose ``weights_only`` is not the constant True."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'load' \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == 'torch':
            weights_only = [k.value for k in node.keywords if k.arg == 'weights_only']
            if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                lines.append(node.lineno)
    return lines


def test_every_torch_load_uses_weights_only():
    unsafe = {where: lines for where, source in _python_sources() if (lines := _unsafe_torch_loads(source))}
    assert unsafe == {}


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
@pytest.mark.parametrize('how', ['pretrained_file', 'checkpoint_path'])
def test_pickle_with_code_is_refused_through_timm(tmp_path, how, legacy):
    """A .pth that needs code to unpickle (torch's zip format or its legacy one) is refused by the loaders timm uses
    for our models, without running it (``biformer-zoo convert`` refuses it too: test_convert)."""
    model = timm.create_model('biformer_tiny', depths=(1, 1, 1, 1))
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': model.state_dict(), 'hook': RunsCodeWhenUnpickled(tmp_path / 'ran')}, path,
               _use_new_zipfile_serialization=not legacy)
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))) if how == 'pretrained_file' \
        else dict(checkpoint_path=str(path))
    # the overlay file goes through biformer-zoo's own loader (as `convert`), checkpoint_path through timm's
    # (timm names the globals only for the zip format)
    refusal = r'needs code to unpickle \(official_layouts\.leave_marker' if how == 'pretrained_file' else \
        r'weights_only=True blocked' + ('' if legacy else r' .* Unsupported globals: official_layouts\.leave_marker')
    with pytest.raises(RuntimeError, match=refusal):
        timm.create_model('biformer_tiny', depths=(1, 1, 1, 1), **kwargs)
    assert not (tmp_path / 'ran').exists()
