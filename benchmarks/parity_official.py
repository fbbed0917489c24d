"""Logits and features of the zoo's models against the official code, on the same random weights.

    python benchmarks/parity_official.py --family biformer --official-repo ../BiFormer
    python benchmarks/parity_official.py --family biformer --official-repo ../BiFormer --models biformer_tiny --double
    python benchmarks/parity_official.py --family crossformer --official-repo ../CrossFormer --det-sizes 256x320 192x256

The official code is imported at run time, never copied here: from the working tree of a rayleizhu/BiFormer clone, or
read with ``git show`` from the branches ``crossformer`` (CrossFormer-T/S/B/L) and ``main`` (CrossFormer++) of a
cheerss/CrossFormer clone. ``fairscale``, ``mmdet`` and ``mmcv`` are stubbed; official timm entrypoints stay out of
timm's registry. Random weights (norm weights near 1, BatchNorm statistics too) load into ours through
``checkpoint_filter_fn``, as official checkpoints do. BiFormer: logits at each ``--sizes`` input, the official model
with ``auto_pad=True``; ``biformer_stl.in1k_nchw`` only at multiples of 224 (elsewhere the official nchw code pads
unlike its legacy code, which the zoo follows). CrossFormer: logits at 224, and the four stage outputs of
``forward_intermediates`` at each ``--det-sizes`` input against a fresh official detection backbone per size.

One line per model and input: max|diff|, max|diff| / max|ref|, PASS or FAIL: ``allclose(rtol=1e-4, atol=1e-5 *
max|ref|)`` in float32 (every stage, for features), max|diff| / max|ref| < 1e-12 with ``--double``. In float32 two
BiFormer routing scores can tie within rounding, so that ``topk`` picks another region; float64 has no such ties.
Exit status 1 if any line FAILs.
"""
import argparse
import contextlib
import importlib.util
import io
import logging
import math
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from biformer_zoo.models import biformer, crossformer  # registers the models

Size = Tuple[int, int]

BIFORMER = {  # zoo name -> (official module in models/, its entrypoint)
    'biformer_tiny': ('biformer', 'biformer_tiny'), 'biformer_small': ('biformer', 'biformer_small'),
    'biformer_base': ('biformer', 'biformer_base'), 'biformer_stl': ('biformer_stl', 'biformer_stl'),
    'biformer_stl.in1k_nchw': ('biformer_stl_nchw', 'biformer_stl_nchw')}
BIFORMER_FILES = ['models/_common.py', 'models/biformer.py', 'models/biformer_stl.py', 'models/biformer_stl_nchw.py',
                  'ops/bra_legacy.py', 'ops/bra_nchw.py']
CROSSFORMER_FILES = {  # official file -> (branch, path)
    'v1_cls': ('crossformer', 'models/crossformer.py'), 'v1_det': ('crossformer', 'models/crossformer_backbone.py'),
    'pp_cls': ('main', 'models/crossformer.py'), 'pp_det': ('main', 'models/crossformer_backbone_det.py')}
CROSSFORMER = {  # zoo name -> (embed_dim, depths, num_heads), as in the official configs
    'crossformer_tiny': (64, [1, 1, 8, 6], [2, 4, 8, 16]), 'crossformer_small': (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    'crossformer_base': (96, [2, 2, 18, 2], [3, 6, 12, 24]), 'crossformer_large': (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    'crossformerpp_small': (64, [2, 2, 18, 2], [2, 4, 8, 16]),
    'crossformerpp_base': (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    'crossformerpp_large': (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    'crossformerpp_huge': (128, [6, 6, 18, 2], [4, 8, 16, 32])}
FAMILIES = {'biformer': list(BIFORMER), 'crossformer': list(CROSSFORMER)}


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['git', '-C', str(repo), *args], capture_output=True, text=True)


def check_repo(family: str, repo: Path) -> Dict[str, str]:
    """ValueError unless ``repo`` holds the family's official files; for CrossFormer, the git ref of each branch."""
    if family == 'biformer':
        missing = [path for path in BIFORMER_FILES if not (repo / path).is_file()]
        if missing:
            raise ValueError(f'{repo} lacks {", ".join(missing)}: not a clone of rayleizhu/BiFormer')
        return {}
    if _git(repo, 'rev-parse', '--git-dir').returncode:
        raise ValueError(f'{repo} is not a git clone (of cheerss/CrossFormer)')
    refs = {}
    for branch, path in CROSSFORMER_FILES.values():
        refs.setdefault(branch, next((ref for ref in (branch, f'origin/{branch}') if not _git(
            repo, 'rev-parse', '--verify', '--quiet', f'{ref}^{{commit}}').returncode), None))
        if refs[branch] is None:
            raise ValueError(f'{repo} has no branch {branch} nor origin/{branch} (a clone of cheerss/CrossFormer '
                             f'fetches it with: git -C {repo} fetch origin {branch}:{branch})')
        if _git(repo, 'cat-file', '-e', f'{refs[branch]}:{path}').returncode:
            raise ValueError(f'{repo}: {refs[branch]} has no {path}: not a clone of cheerss/CrossFormer')
    return refs


def _stub(**modules: Dict[str, Any]) -> None:
    for name, attrs in modules.items():
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__dict__.update(attrs)


def _package(name: str, path: Path) -> None:
    """Make the files in ``path`` importable as the package ``name``."""
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [str(path)]


def load_official_biformer(repo: Path) -> Dict[str, Callable[[], nn.Module]]:
    """The official BiFormer entrypoints from the working tree of a clone, by zoo name."""
    _stub(**{'fairscale': {}, 'fairscale.nn': {}, 'fairscale.nn.checkpoint': {'checkpoint_wrapper': lambda m: m}})
    sys.dont_write_bytecode = True  # leave no __pycache__ in the clone
    _package('ops', repo / 'ops')
    _package('official_biformer', repo / 'models')
    register_model = timm.models.register_model
    timm.models.register_model = lambda fn: fn  # the official names would replace the zoo's in timm's registry
    try:
        modules = {module: importlib.import_module(f'official_biformer.{module}') for module, _ in BIFORMER.values()}
    finally:
        timm.models.register_model = register_model
    return {name: getattr(modules[module], entrypoint) for name, (module, entrypoint) in BIFORMER.items()}


def load_official_crossformer(repo: Path, refs: Dict[str, str], workdir: Path) -> Dict[str, types.ModuleType]:
    """The official CrossFormer files, written by ``git show`` into ``workdir`` and imported under unique names."""
    nothing = lambda *args, **kwargs: None  # noqa: E731
    _stub(**{'mmdet': {}, 'mmdet.utils': {'get_root_logger': lambda: logging.getLogger('official')}, 'mmcv': {},
             'mmcv.runner': dict(load_checkpoint=nothing, _load_checkpoint=nothing, BaseModule=nn.Module,
                                 ModuleList=nn.ModuleList),
             'mmcv.cnn': dict(build_norm_layer=nothing, constant_init=nothing, trunc_normal_init=nothing),
             'mmcv.cnn.bricks': {}, 'mmcv.cnn.bricks.transformer': dict(FFN=None, build_dropout=nothing),
             'mmcv.cnn.utils': {}, 'mmcv.cnn.utils.weight_init': dict(trunc_normal_=nothing)})
    modules = {}
    for key, (branch, path) in CROSSFORMER_FILES.items():
        file = workdir / f'official_crossformer_{key}.py'
        file.write_text(_git(repo, 'show', f'{refs[branch]}:{path}').stdout)
        spec = importlib.util.spec_from_file_location(file.stem, file)
        modules[key] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[key])
        modules[key].DynamicPosBias.forward = _cast_input(modules[key].DynamicPosBias.forward)
    return modules


def _cast_input(forward: Callable) -> Callable:
    """The official position-bias MLP gets float32 coordinates whatever its dtype: cast them (for ``--double``)."""
    return lambda self, biases: forward(self, biases.to(self.pos_proj.weight.dtype))


def official_crossformer(modules: Dict[str, types.ModuleType], name: str, detection: bool) -> nn.Module:
    embed_dim, depths, num_heads = CROSSFORMER[name]
    kwargs: Dict[str, Any] = dict(img_size=224, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                  patch_size=[4, 8, 16, 32], merge_size=[[2, 4]] * 3, drop_path_rate=0.)
    if name.startswith('crossformerpp'):
        kwargs.update(group_size=[4, 4, 14, 7], crs_interval=[4, 2, 1, 1], use_acl=True,
                      mlp_ratio=4. if detection else [4.] * 4)
    else:
        kwargs.update(group_size=[7, 7, 7, 7], **(dict(crs_interval=[8, 4, 2, 1]) if detection else {}))
    module = modules[('pp_' if name.startswith('crossformerpp') else 'v1_') + ('det' if detection else 'cls')]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its group sizes
        return module.CrossFormer(**kwargs).eval()


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random parameters and BatchNorm statistics: norm weights 1 + 0.1 N(0, 1), the rest 0.05 N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, _BatchNorm))
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.1 * noise if is_norm and name == 'weight' else 0.05 * noise)
            if isinstance(module, _BatchNorm) and module.running_var is not None:
                module.running_mean.copy_(0.05 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


def zoo_model(name: str, official: nn.Module, filter_fn: Callable, dtype: torch.dtype) -> nn.Module:
    """Our ``name`` with the official model's weights, loaded through ``filter_fn``; both cast to ``dtype``."""
    model = timm.create_model(name)
    model.load_state_dict(filter_fn(official.state_dict(), model))
    official.to(dtype)
    return model.to(dtype).eval()


def report(model: str, what: str, outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> bool:
    """Print one line for ``outputs`` against ``references`` (the worst pair); True if every pair passes."""
    worst, ok = (0.0, 0.0), len(outputs) == len(references)
    for out, ref in zip(outputs, references):
        if out.shape != ref.shape:
            worst, ok = (math.inf, math.inf), False
            continue
        scale = ref.abs().max().item()
        err = (out - ref).abs().max().item()
        worst = max(worst, (err / scale, err))
        ok &= err / scale < 1e-12 if ref.dtype == torch.float64 else \
            torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * scale)
    print(f'{model:24s} {what:18s} max|diff| {worst[1]:.2e}  max|diff|/max|ref| {worst[0]:.2e}  '
          f'{"PASS" if ok else "FAIL"}', flush=True)
    return ok


def check_biformer(repo: Path, names: Sequence[str], sizes: Sequence[Size], dtype: torch.dtype) -> List[bool]:
    official, results = load_official_biformer(repo), []
    for name in names:
        reference = official[name]().eval()
        randomize(reference)
        ours = zoo_model(name, reference, biformer.checkpoint_filter_fn, dtype)
        for module in filter(lambda module: hasattr(module, 'auto_pad'), reference.modules()):
            module.auto_pad = True
        for h, w in sizes:
            if name.endswith('nchw') and (h % 224 or w % 224):
                print(f'{name:24s} {f"logits {h}x{w}":18s} skipped: the official nchw code pads differently')
                continue
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1)).to(dtype)
            with torch.no_grad():
                results.append(report(name, f'logits {h}x{w}', [ours(x)], [reference(x)]))
    return results


def check_crossformer(repo: Path, refs: Dict[str, str], names: Sequence[str], det_sizes: Sequence[Size],
                      dtype: torch.dtype) -> List[bool]:
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        modules = load_official_crossformer(repo, refs, Path(workdir))
        for name in names:
            reference = official_crossformer(modules, name, detection=False)
            randomize(reference)
            state = reference.state_dict()
            ours = zoo_model(name, reference, crossformer.checkpoint_filter_fn, dtype)
            x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(dtype)
            with torch.no_grad():
                results.append(report(name, 'logits 224x224', [ours(x)], [reference(x)]))
            for h, w in det_sizes:
                backbone = official_crossformer(modules, name, detection=True)
                if backbone.load_state_dict(state, strict=False).missing_keys:
                    raise RuntimeError(f'the official detection backbone of {name} has weights its classifier lacks')
                x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2)).to(dtype)
                with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                    outputs, references = ours.forward_intermediates(x, intermediates_only=True), backbone.to(dtype)(x)
                results.append(report(name, f'features {h}x{w}', outputs, references))
    return results


def _size(text: str) -> Size:
    h, _, w = text.partition('x')
    return int(h), int(w or h)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--family', choices=sorted(FAMILIES), required=True)
    parser.add_argument('--official-repo', type=Path, required=True,
                        help='a clone of rayleizhu/BiFormer, or of cheerss/CrossFormer with its two branches')
    parser.add_argument('--models', nargs='+', help='default: every model of the family')
    parser.add_argument('--double', action='store_true', help='compare in float64')
    parser.add_argument('--sizes', nargs='+', type=_size, default=[(224, 224), (250, 333)],
                        help='BiFormer input sizes, HxW (default: 224x224 250x333)')
    parser.add_argument('--det-sizes', nargs='+', type=_size, default=[(256, 320), (192, 256)],
                        help='CrossFormer detection-backbone input sizes, HxW (default: 256x320 192x256)')
    parser.add_argument('--threads', type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    names = args.models or FAMILIES[args.family]
    unknown = [name for name in names if name not in FAMILIES[args.family]]
    if unknown:
        parser.error(f'not {args.family} models: {", ".join(unknown)} (choose from {", ".join(FAMILIES[args.family])})')
    repo = args.official_repo.expanduser().resolve()
    try:
        refs = check_repo(args.family, repo)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    for message in ('Importing from timm.models.layers', 'torch.meshgrid'):  # what the official code triggers
        warnings.filterwarnings('ignore', message=message)
    dtype = torch.float64 if args.double else torch.float32
    if args.family == 'biformer':
        results = check_biformer(repo, names, args.sizes, dtype)
    else:
        results = check_crossformer(repo, refs, names, args.det_sizes, dtype)
    print(f'{sum(results)} of {len(results)} PASS ({dtype})')
    return 0 if all(results) else 1


if __name__ == '__main__':
    sys.exit(main())
