"""Official checkpoints: safe loading (``torch.load(weights_only=True)``), the state dict inside them, and the
checkpoint filters each model family registers to map official key layouts onto its own."""
import argparse
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, List

import timm
import torch

from .files import read_safetensors_header
from .manifest import PathLike

__all__ = [
    'CheckpointFilter', 'check_checkpoint_file', 'load_official_checkpoint', 'register_checkpoint_filter',
    'checkpoint_filter_of', 'layout_mismatch', 'guess_architecture']

# Classes allowed inside official training checkpoints besides tensors: attribute bags that run no code when unpickled.
_SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]

CheckpointFilter = Callable[[Dict[str, torch.Tensor], torch.nn.Module], Dict[str, torch.Tensor]]
_CHECKPOINT_FILTERS: Dict[type, CheckpointFilter] = {}


def register_checkpoint_filter(model_class: type, filter_fn: CheckpointFilter) -> None:
    """Record the function that maps official checkpoints onto ``model_class`` (each family registers its own)."""
    _CHECKPOINT_FILTERS[model_class] = filter_fn


def _state_dict_of(checkpoint: Any, path: PathLike, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensor dict inside an official checkpoint (under 'model' or 'state_dict', or the checkpoint itself);
    with ``prefer_ema`` EMA weights ('state_dict_ema', 'model_ema') first, as timm's ``load_state_dict`` does."""
    if isinstance(checkpoint, dict):
        for key in ('state_dict_ema', 'model_ema', 'model', 'state_dict')[0 if prefer_ema else 2:]:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        keys = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} holds no state dict: expected a dict of tensors, or one under 'model' or "
                         f"'state_dict'; found {keys}")
    if all(k.startswith('module.') for k in checkpoint):  # saved from a DistributedDataParallel wrapper
        checkpoint = {k[len('module.'):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def check_checkpoint_file(path: PathLike) -> None:
    """Raise a ``ValueError`` naming the problem when ``path`` is not a file that could hold a checkpoint: missing, a
    folder, empty, or not in any checkpoint format (``torch.save`` zip, legacy pickle, safetensors) by its first
    bytes. Reads 8 bytes; whether the file is whole is checked when it is loaded."""
    path = Path(path)
    if not path.is_file():
        problem = 'is a directory' if path.is_dir() else 'does not exist'
        raise ValueError(f'checkpoint {path} {problem}; pass the path of a checkpoint file (an official .pth, or a '
                         f'converted .safetensors)')
    with open(path, 'rb') as f:
        head = f.read(8)
    if not head:
        raise ValueError(f'checkpoint {path} is empty (0 bytes): an interrupted download or copy; get it again')
    is_zip, is_pickle = head.startswith(b'PK\x03\x04'), head[:1] == b'\x80'  # torch.save's zip; a pickle protocol
    if not (is_zip or is_pickle or path.suffix == '.safetensors'):  # safetensors: checked whole when loaded
        printable = head.decode('ascii', 'replace').isprintable()
        raise ValueError(
            f'{path} is not a checkpoint: it begins with {head!r}{" (text)" if printable else ""}, not a torch.save '
            f'zip archive, a pickle or a .safetensors file. Check the path; a download page saved instead of the '
            f'file looks like this')


def load_official_checkpoint(path: PathLike, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict of an official ``.pth`` checkpoint, loaded with ``torch.load(weights_only=True)``.

    Training metadata that runs no code (``argparse.Namespace`` args, paths) is allowed; a pickle that needs any
    other code is refused with a ``ValueError`` naming the classes it asks for, and a damaged file with a
    ``ValueError`` saying so. ``.safetensors`` files are read as they are.
    """
    path = Path(path)
    check_checkpoint_file(path)
    damaged = (f'{path} is not a readable checkpoint ({{}}); the download may be corrupt or truncated, download it '
               f'again')
    if path.suffix == '.safetensors':
        try:
            read_safetensors_header(path)
        except ValueError as e:
            raise ValueError(damaged.format(e)) from None
        import safetensors.torch
        return _state_dict_of(safetensors.torch.load_file(str(path)), path, prefer_ema)
    try:
        with torch.serialization.safe_globals(_SAFE_CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path, str(e))
        if not needed and 'Unsupported operand' in str(e):
            raise ValueError(
                f'{path} is a pickle that torch.load(weights_only=True) cannot read (it uses pickle operations a '
                f'weights-only load refuses: a file not written by torch.save, or one that needs code to unpickle); '
                f'biformer-zoo refuses it. Save the weights with torch.save(state_dict, path) and convert that') \
                from None
        if not needed:  # torch's own message here is about weights_only, which would mislead
            raise ValueError(damaged.format('it does not unpickle as a checkpoint')) from None
        raise ValueError(
            f"{path} needs code to unpickle ({', '.join(needed)}); biformer-zoo loads checkpoints only with "
            f'torch.load(weights_only=True), so it refuses this file. If you trust it, save just its weights and '
            f'convert those: python -c "import torch; c = torch.load(\'{path}\', weights_only=False); '
            f'torch.save(c.get(\'model\', c), \'{path.stem}_weights.pth\')"') from None
    except Exception as e:  # weights_only unpickling runs no code: any other failure means a damaged file
        raise ValueError(damaged.format(f'{type(e).__name__}: {e}')) from None
    return _state_dict_of(checkpoint, path, prefer_ema)


def _unsafe_globals(path: Path, message: str) -> List[str]:
    """The code a refused checkpoint asks for: listed by torch for a zip checkpoint, named in the refusal for a
    legacy (non-zip) one."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint
        return re.findall(r'Unsupported global: GLOBAL ([\w.]+)', message)


def checkpoint_filter_of(model: torch.nn.Module) -> CheckpointFilter:
    """The checkpoint filter registered for ``model``'s class (or a base class of it)."""
    for cls in type(model).__mro__:
        if cls in _CHECKPOINT_FILTERS:
            return _CHECKPOINT_FILTERS[cls]
    raise ValueError(f'{type(model).__name__} has no checkpoint filter to map official checkpoints; its family '
                     f'registers one with register_checkpoint_filter')


def layout_mismatch(mapped: Dict[str, torch.Tensor], model: torch.nn.Module) -> List[str]:
    """Human-readable differences between a mapped state dict and the model's own (empty when they agree)."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in mapped and not k.endswith('num_batches_tracked')]  # BatchNorm fills it
    unexpected = [k for k in mapped if k not in own]
    mismatched = [f'{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}'
                  for k in own if k in mapped and mapped[k].shape != own[k].shape]
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    return problems


def guess_architecture(state_dict: Dict[str, torch.Tensor], names: List[str]) -> List[str]:
    """Those of ``names`` (pretrained tags) whose filter maps ``state_dict`` exactly onto their layout (meta device)."""
    matches = []
    for name in names:
        try:
            with torch.device('meta'):
                model = timm.create_model(name)
            if not layout_mismatch(checkpoint_filter_of(model)(dict(state_dict), model), model):
                matches.append(name)
        except Exception:  # a filter refusing a foreign layout is a non-match
            continue
    return matches
