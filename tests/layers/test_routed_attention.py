"""BRA's executions of the routed attention (``attn_impl``) against the plain math, over the layer's arguments.

On the CPU: every execution that runs here, forward and backward, in float64. ``'triton'`` runs its kernels in
Triton's interpreter, which must be switched on before triton is imported (and timm imports it), so those cases run
in one subprocess (this file run as a script with ``TRITON_INTERPRET=1``) that reports the differences as JSON.
``tests/test_cuda.py`` compares the executions on a GPU.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from biformer_zoo.layers import BiLevelRoutingAttention
from biformer_zoo.layers.bra import ATTN_IMPLS, routed_attention_impl

REPO = Path(__file__).resolve().parents[2]
# executions that run on CPU tensors without Triton's interpreter ('auto' resolves to one of them)
CPU_IMPLS = [impl for impl in ATTN_IMPLS if impl not in ('reference', 'triton')]

# (name, layer arguments, input (B, H, W)): the argument space of the layer
CASES: List[Tuple[str, Dict, Tuple[int, int, int]]] = [
    ('qk_dim', dict(dim=32, num_heads=2, num_regions=3, topk=2, qk_dim=16), (2, 9, 12)),  # the failing case
    ('no_lepe', dict(dim=16, num_heads=2, num_regions=2, topk=2, side_dwconv=0), (2, 6, 10)),
    ('channels_last', dict(dim=16, num_heads=2, num_regions=2, topk=3, channels_last=True), (2, 6, 10)),
    ('topk_1', dict(dim=16, num_heads=2, num_regions=3, topk=1), (1, 9, 15)),  # regions of 3x5 tokens
    ('topk_all', dict(dim=16, num_heads=2, num_regions=3, topk=9), (1, 7, 8)),  # padded to 9x9
    # padded to 3x3: one token a region; head dim 4
    ('fewer_tokens_than_regions', dict(dim=16, num_heads=4, num_regions=3, topk=4), (1, 2, 2)),
    ('empty_batch', dict(dim=16, num_heads=2, num_regions=2, topk=2), (0, 6, 6)),
    ('two_query_tiles', dict(dim=16, num_heads=1, num_regions=2, topk=2), (1, 18, 16)),  # 72 tokens a region
]


def make_case(name: str, dtype: torch.dtype) -> Tuple[BiLevelRoutingAttention, torch.Tensor]:
    """The layer and input of case ``name`` (seeded)."""
    _, kwargs, (batch, height, width) = next(case for case in CASES if case[0] == name)
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(**kwargs).to(dtype)
    shape = (batch, height, width, kwargs['dim']) if kwargs.get('channels_last') else (
        batch, kwargs['dim'], height, width)
    return layer, torch.randn(shape, dtype=dtype)


def outputs_and_gradients(layer: BiLevelRoutingAttention, x: torch.Tensor, attn_impl: str) -> List[torch.Tensor]:
    """The output of ``layer`` with ``attn_impl`` and the gradients of a fixed loss w.r.t. input and parameters."""
    x = x.detach().requires_grad_()
    with routed_attention_impl(layer, attn_impl):
        out = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return [out.detach(), *torch.autograd.grad((out * weights).sum(), (x, *layer.parameters()))]


@pytest.mark.parametrize('attn_impl', CPU_IMPLS)
@pytest.mark.parametrize('case', [case[0] for case in CASES])
def test_execution_equals_reference_forward_and_backward(case, attn_impl):
    layer, x = make_case(case, torch.float64)
    torch.testing.assert_close(outputs_and_gradients(layer, x, attn_impl),
                               outputs_and_gradients(layer, x, 'reference'))


@pytest.mark.parametrize('attn_impl', CPU_IMPLS)
def test_every_execution_returns_the_row_major_map(attn_impl):
    """``fine_attention`` of every execution: a (B, Hp, Wp, dim) map, the plain math's values in the same places,
    plus the residual (the LePE map) where one is given."""
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(16, num_heads=2, num_regions=2, topk=2, qk_dim=8).double()
    q, k = torch.randn(2, 2, 6, 10, 8, dtype=torch.float64).unbind(0)  # (B, Hp, Wp, qk_dim) each
    v, residual = torch.randn(2, 2, 6, 10, 16, dtype=torch.float64).unbind(0)  # (B, Hp, Wp, dim) each
    routed = torch.tensor([[[0, 1], [1, 2], [3, 2], [0, 3]], [[2, 1], [0, 3], [1, 0], [3, 2]]])
    with routed_attention_impl(layer, 'reference'):
        expected = layer.fine_attention(q, k, v, routed)
    with routed_attention_impl(layer, attn_impl):
        outputs = [layer.fine_attention(q, k, v, routed), layer.fine_attention(q, k, v, routed, residual)]
    torch.testing.assert_close(outputs, [expected, expected + residual])


def test_triton_on_cpu_tensors_without_the_interpreter_says_what_to_do():
    layer = BiLevelRoutingAttention(16, num_heads=2, num_regions=2, topk=2, attn_impl='triton')
    with pytest.raises(ValueError, match="attn_impl='triton' runs Triton kernels on CUDA tensors.*TRITON_INTERPRET"):
        layer(torch.randn(1, 16, 4, 4))


def test_without_triton_the_package_imports_and_triton_is_refused():
    """A subprocess where ``import triton`` fails: biformer_zoo imports, and ``attn_impl='triton'`` raises at
    construction with the reason and the fix."""
    script = '\n'.join([
        'import sys', 'sys.modules["triton"] = None  # import triton raises ImportError',
        'import biformer_zoo', 'from biformer_zoo.layers import BiLevelRoutingAttention',
        'try:', '    BiLevelRoutingAttention(16, num_heads=2, attn_impl="triton")',
        'except ValueError as e:', '    print(e)'])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert "attn_impl='triton' needs the triton package" in result.stdout, result.stderr[-2000:]


# ---- 'triton' in Triton's interpreter (CPU tensors), all cases in one subprocess ----

# largest |triton - reference| allowed in fp32, for the output and every gradient, over the largest |reference|
TRITON_TOLERANCE = 1e-5


def triton_differences() -> Dict[str, Dict[str, float]]:
    """Run in the subprocess: per case, the largest |triton - reference| of the output, of the input gradient and
    over the parameter gradients (fp32), and the largest |reference| value for scale."""
    torch.set_num_threads(2)
    results = {}
    for name, _, _ in CASES:
        layer, x = make_case(name, torch.float32)
        fast, ref = outputs_and_gradients(layer, x, 'triton'), outputs_and_gradients(layer, x, 'reference')

        def largest(tensors: List[torch.Tensor]) -> float:
            return max((t.abs().max().item() for t in tensors if t.numel()), default=0.)

        results[name] = dict(output=largest([fast[0] - ref[0]]), input_grad=largest([fast[1] - ref[1]]),
                             param_grads=largest([a - b for a, b in zip(fast[2:], ref[2:])]),
                             reference_scale=largest(ref))
    # fp16 (the tiles cast to fp16 before every product, fp32 accumulation) against the fp32 plain math; bf16 is left
    # to tests/test_cuda.py: the interpreter's tl.dot of bf16 tiles is wrong (Triton 3.8)
    layer, x = make_case('qk_dim', torch.float32)
    fast = outputs_and_gradients(copy.deepcopy(layer).half(), x.half(), 'triton')
    ref = outputs_and_gradients(layer, x, 'reference')
    results['fp16_relative_error'] = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(fast, ref))
    # what 'auto' picks on CPU tensors although the interpreter could run the kernels there
    results['auto_on_cpu'] = [BiLevelRoutingAttention(16, num_heads=2, num_regions=7, topk=topk).auto_impl(
        torch.empty(1, side, side, 16)) for topk, side in ((16, 14), (4, 28))]
    return results


@pytest.fixture(scope='module')
def triton_results() -> Dict[str, Dict[str, float]]:
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1',
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests'), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('case', [case[0] for case in CASES])
def test_triton_kernels_equal_reference_in_the_interpreter(triton_results, case):
    """Forward, input and parameter gradients of ``attn_impl='triton'`` (Triton's interpreter, fp32) against the
    plain math: odd region sizes (3x5 tokens), padded maps, topk 1 and every region, qk_dim != dim, no LePE,
    channels-last, one token per region, an empty batch, regions larger than one tile (64 tokens)."""
    differences = triton_results[case]
    largest = max(differences['output'], differences['input_grad'], differences['param_grads'])
    assert largest <= TRITON_TOLERANCE * max(differences['reference_scale'], 1.), differences


def test_triton_kernels_in_fp16_close_to_fp32(triton_results):
    """The layer in fp16 with 'triton' (interpreter) against the fp32 plain math: output and every gradient within
    the relative error of fp16 inputs (fp32 accumulation keeps it near fp16's own rounding, 5e-4)."""
    assert triton_results['fp16_relative_error'] < 5e-3


def test_auto_keeps_the_cpu_executions_under_the_interpreter(triton_results):
    """On CPU tensors 'auto' picks what it picked before 'triton' existed (benchmarks/perf_targets.py measures it)."""
    assert triton_results['auto_on_cpu'] == ['dense', 'gather']


if __name__ == '__main__':  # the subprocess of ``triton_results``
    print(json.dumps(triton_differences()))
