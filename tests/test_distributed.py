"""Two-process DistributedDataParallel training steps (gloo, CPU) of both families, with and without gradient
checkpointing, against the same step in one process.

One spawn runs every case; each rank saves its gradients and updated parameters, the tests compare them.
"""
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, Tuple

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import biformer_zoo  # noqa: F401

NAMES = ['biformer_tiny', 'crossformer_tiny']
CASES = [(name, checkpointing) for name in NAMES for checkpointing in (False, True)]
WORLD_SIZE = 2
SHARD = 2  # images per rank
LR = 0.1
SPAWN_TIMEOUT_S = 240


def _model(name: str, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, depths=(1, 1, 2, 1), num_classes=5).train()
    model.set_grad_checkpointing(checkpointing)
    return model


def _global_batch() -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(WORLD_SIZE * SHARD, 3, 64, 64, generator=generator)
    return images, torch.randint(0, 5, (WORLD_SIZE * SHARD,), generator=generator)


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: a DDP step (SGD) of every case on this rank's shard of the global batch."""
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        images, labels = _global_batch()
        shard = slice(rank * SHARD, (rank + 1) * SHARD)
        for name, checkpointing in CASES:
            model = _model(name, checkpointing)
            ddp = DistributedDataParallel(model)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
            F.cross_entropy(ddp(images[shard]), labels[shard]).backward()
            grads = _flat_grads(model)
            optimizer.step()
            torch.save({'grads': grads, 'params': _flat_params(model)},
                       Path(out_dir) / f'{name}-{checkpointing}-{rank}.pt')
    finally:
        dist.destroy_process_group()


def _single_process_step(name: str) -> Dict[str, torch.Tensor]:
    """The same step on the whole global batch in one process.

    Models with BatchNorm (BiFormer's stem and downsampling) normalise each shard with its own statistics under DDP
    (no SyncBatchNorm on CPU), so for them the reference is the mean of the shard losses; CrossFormer has no
    BatchNorm and takes the global batch in one forward.
    """
    model = _model(name, checkpointing=False)
    images, labels = _global_batch()
    if _has_batchnorm(model):
        loss = sum(F.cross_entropy(model(images[i:i + SHARD]), labels[i:i + SHARD])
                   for i in range(0, len(images), SHARD)) / WORLD_SIZE
    else:
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    grads = _flat_grads(model)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {'grads': grads, 'params': _flat_params(model)}


@pytest.fixture(scope='module')
def ddp_results(tmp_path_factory) -> Dict[Tuple[str, bool, int], Dict[str, torch.Tensor]]:
    """Spawn 2 ranks once (file:// rendezvous, nothing leaves the machine) and collect their saved results."""
    out_dir = tmp_path_factory.mktemp('ddp')
    context = mp.spawn(_rank_main, args=(str(out_dir / 'rendezvous'), str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f'the DDP ranks did not finish within {SPAWN_TIMEOUT_S} s')
    return {(name, ckpt, rank): torch.load(out_dir / f'{name}-{ckpt}-{rank}.pt', weights_only=True)
            for name, ckpt in CASES for rank in range(WORLD_SIZE)}


@pytest.fixture(scope='module')
def reference() -> Dict[str, Dict[str, torch.Tensor]]:
    return {name: _single_process_step(name) for name in NAMES}


@pytest.mark.parametrize('name,checkpointing', CASES)
def test_ranks_end_with_identical_parameters(ddp_results, name, checkpointing):
    assert torch.equal(ddp_results[name, checkpointing, 0]['params'], ddp_results[name, checkpointing, 1]['params'])


@pytest.mark.parametrize('name,checkpointing', CASES)
def test_ddp_gradients_equal_single_process_step(ddp_results, reference, name, checkpointing):
    torch.testing.assert_close(ddp_results[name, checkpointing, 0]['grads'], reference[name]['grads'],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name,checkpointing', CASES)
def test_ddp_parameters_equal_single_process_step(ddp_results, reference, name, checkpointing):
    torch.testing.assert_close(ddp_results[name, checkpointing, 0]['params'], reference[name]['params'],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_gradient_checkpointing_same_ddp_gradients(ddp_results, name):
    torch.testing.assert_close(ddp_results[name, True, 0]['grads'], ddp_results[name, False, 0]['grads'],
                               rtol=1e-4, atol=1e-6)
