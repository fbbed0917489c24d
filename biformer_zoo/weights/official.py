"""Checkpoint files: safe loading (``torch.load(weights_only=True)``), the state dict inside a training checkpoint
(the EMA rule), and one message for a file that cannot be read.

The EMA rule, the same on every path (``pretrained_cfg_overlay=dict(file=...)``, ``checkpoint_path=``,
``biformer-zoo convert``) and the same as timm's own loaders: a checkpoint that holds EMA weights
(``state_dict_ema`` or ``model_ema``) gives those; otherwise ``model``, then ``state_dict``, then the checkpoint
itself. ``use_ema=False`` (``convert --no-ema``) takes ``model``/``state_dict`` even where EMA weights are there.
"""
import argparse
import contextlib
import pathlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
from safetensors import SafetensorError

from .files import PretrainedWeightsError, read_safetensors_header
from .manifest import PathLike

__all__ = ['check_checkpoint_file', 'load_official_checkpoint', 'reading_checkpoints', 'EMA_KEYS']

# Classes allowed inside official training checkpoints besides tensors: attribute bags that run no code when unpickled.
_SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]
EMA_KEYS = ('state_dict_ema', 'model_ema')


def _state_dict_of(checkpoint: Any, path: PathLike, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, by the EMA rule (module docstring)."""
    if isinstance(checkpoint, dict):
        for key in (EMA_KEYS if use_ema else ()) + ('model', 'state_dict'):
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


def load_official_checkpoint(path: PathLike, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (an official ``.pth``, loaded with ``torch.load(weights_only=True)``, or a
    ``.safetensors`` file), by the EMA rule of this module.

    Training metadata that runs no code (``argparse.Namespace`` args, paths) is allowed; a pickle that needs any
    other code is refused with a ``ValueError`` naming the classes it asks for, and a damaged file with a
    ``ValueError`` saying so.
    """
    path = Path(path)
    check_checkpoint_file(path)
    if path.suffix == '.safetensors':
        try:
            read_safetensors_header(path)
        except ValueError as e:
            raise ValueError(_DAMAGED.format(path=path, problem=e)) from None
        import safetensors.torch
        return _state_dict_of(safetensors.torch.load_file(str(path)), path, use_ema)
    try:
        with torch.serialization.safe_globals(_SAFE_CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # weights_only unpickling runs no code: a failure is a refusal or a damaged file
        raise ValueError(_read_error_message(path, e)) from None
    return _state_dict_of(checkpoint, path, use_ema)


_DAMAGED = '{path} is not a readable checkpoint ({problem}); the download may be corrupt or truncated, download it again'


def _read_error_message(path: Path, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` of ``path`` failed, and what to do."""
    if not isinstance(error, pickle.UnpicklingError):
        return _DAMAGED.format(path=path, problem=f'{type(error).__name__}: {error}')
    needed = _unsafe_globals(path, str(error))
    if not needed and 'Unsupported operand' in str(error):
        return (f'{path} is a pickle that torch.load(weights_only=True) cannot read (it uses pickle operations a '
                f'weights-only load refuses: a file not written by torch.save, or one that needs code to unpickle); '
                f'biformer-zoo refuses it. Save the weights with torch.save(state_dict, path) and convert that')
    if not needed:  # torch's own message here is about weights_only, which would mislead
        return _DAMAGED.format(path=path, problem='it does not unpickle as a checkpoint')
    return (f"{path} needs code to unpickle ({', '.join(needed)}); biformer-zoo loads checkpoints only with "
            f'torch.load(weights_only=True), so it refuses this file. If you trust it, save just its weights and '
            f'convert those: python -c "import torch; c = torch.load(\'{path}\', weights_only=False); '
            f'torch.save(c.get(\'model\', c), \'{path.stem}_weights.pth\')"')


@contextlib.contextmanager
def reading_checkpoints(model_tag: str, path: PathLike) -> Iterator[None]:
    """Inside the block, timm's own loader reads official training checkpoints (their ``argparse.Namespace`` args
    and paths are allowed to unpickle, nothing else), and a file it cannot read raises
    :class:`PretrainedWeightsError` naming ``model_tag``, the file and the fix."""
    try:
        with torch.serialization.safe_globals(_SAFE_CHECKPOINT_GLOBALS):
            yield
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, SafetensorError) as e:
        raise PretrainedWeightsError(f'{model_tag}: cannot read the pretrained weights: '
                                     f'{_read_error_message(Path(path), e)}') from None
    except RuntimeError as e:  # timm's refusal of an unpickling error, or torch's zip reader; nothing else
        if isinstance(e.__cause__, pickle.UnpicklingError):
            e = e.__cause__
        elif 'PytorchStreamReader' not in str(e):
            raise
        raise PretrainedWeightsError(f'{model_tag}: cannot read the pretrained weights: '
                                     f'{_read_error_message(Path(path), e)}') from None


def _unsafe_globals(path: Path, message: str) -> List[str]:
    """The code a refused checkpoint asks for: listed by torch for a zip checkpoint, named in the refusal for a
    legacy (non-zip) one."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint
        return re.findall(r'Unsupported global: GLOBAL ([\w.]+)', message)
