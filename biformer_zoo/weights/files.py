"""Weight files: checksums, whole-file checks of safetensors files, reproducible saving, and the checks a weights
file passes before it is loaded into a model (:func:`check_weights_file`)."""
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ._progress import byte_progress
from .manifest import PathLike, find_manifest_entry

__all__ = [
    'PretrainedWeightsError', 'sha256_file', 'read_safetensors_header', 'save_safetensors_reproducibly',
    'check_weights_file', 'cache_paths_hint']

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, downloaded or trusted; the message says what to do."""


_SHA256_MEMO: Dict[Tuple[str, int, int], str] = {}


def sha256_file(path: PathLike, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (remembered per path, size and mtime within one process)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, 'rb') as f, byte_progress(f'sha256 {Path(path).name}', stat.st_size, progress) as advance:
            for chunk in iter(lambda: f.read(8 << 20), b''):
                digest.update(chunk)
                advance(len(chunk))
        _SHA256_MEMO[key] = digest.hexdigest()
    return _SHA256_MEMO[key]


def read_safetensors_header(path: PathLike) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
    """The tensor table and ``__metadata__`` of a safetensors file, checking that the file is whole.

    Raises ``ValueError`` describing the damage when the file is corrupt, truncated or has trailing bytes.
    """
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f'the file has {size} bytes, too few for a safetensors header')
        header_len = int.from_bytes(prefix, 'little')
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ValueError(f'its header length field says {header_len:,} bytes but the file has {size:,} bytes')
        raw = f.read(header_len)
    try:
        table = json.loads(raw.decode('utf-8'))
        metadata = table.pop('__metadata__', None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f'__metadata__ must map strings to strings, got {str(metadata)[:80]}')
        data_end = _check_data_offsets(table)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f'its header is not a valid safetensors header ({type(e).__name__}: {e})') from None
    expected = 8 + header_len + data_end
    if size != expected:
        raise ValueError(
            f'it is truncated: the header describes {expected:,} bytes, the file has {size:,}' if size < expected
            else f'it has {size - expected:,} bytes after the last tensor the header describes')
    return table, metadata


# bytes per element of the safetensors dtypes
_DTYPE_BYTES = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2, 'F16': 2, 'BF16': 2,
                'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}


def _check_data_offsets(table: Dict[str, Any]) -> int:
    """The end of the tensor data a safetensors header describes; ``ValueError`` where tensors overlap, leave holes
    or have a byte size their dtype and shape do not give (the format's own rules)."""
    spans = []
    for name, info in table.items():
        begin, end = (int(offset) for offset in info['data_offsets'])
        numel = 1
        for size in info['shape']:
            numel *= int(size)
        expected = numel * _DTYPE_BYTES.get(info['dtype'], 0)
        if not 0 <= begin <= end or (info['dtype'] in _DTYPE_BYTES and end - begin != expected):
            raise ValueError(f'tensor {name!r} has data offsets [{begin}, {end}] but its dtype {info["dtype"]} and '
                             f'shape {info["shape"]} take {expected} bytes')
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f'tensor {name!r} starts at byte {begin} of the data, not at {position}: the tensors '
                             f'{"overlap" if begin < position else "leave a gap"}')
        position = end
    return position


def save_safetensors_reproducibly(tensors: Dict[str, torch.Tensor], path: PathLike, metadata: Dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with a canonical header, so that the same tensors give the same bytes.

    safetensors writes ``__metadata__`` in hash-map order, which changes from call to call; the header is rewritten
    with sorted keys (the tensor data and offsets are unchanged) so that a conversion's sha256 is reproducible.
    """
    import safetensors.torch
    data = safetensors.torch.save(tensors, metadata=metadata)
    header_len = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + header_len])
    canonical = json.dumps(header, sort_keys=True, separators=(',', ':')).encode('utf-8')
    canonical += b' ' * (-len(canonical) % 8)  # the format pads the header to 8-byte alignment with spaces
    with open(path, 'wb') as f:
        f.write(len(canonical).to_bytes(8, 'little'))
        f.write(canonical)
        f.write(memoryview(data)[8 + header_len:])


def cache_paths_hint(path: str) -> str:
    blob = os.path.realpath(path)
    return f'{path}' + (f' and the blob it links to, {blob}' if blob != os.path.abspath(path) else '')


def check_weights_file(
        path: PathLike,
        architecture: str,
        tag: Optional[str] = None,
        entry: Optional[Dict[str, Any]] = None,
        where: str = '',
        remedy: str = '',
) -> None:
    """Check a ``.safetensors`` weights file before loading it into ``architecture``.

    Checks size and sha256 against the manifest ``entry`` (when it has them), that the file is a whole safetensors
    file, and that the architecture/tag recorded in its metadata by ``convert`` match. ``where`` names the source in
    messages and ``remedy`` says how to get a good copy.
    """
    model_tag = f'{architecture}.{tag}' if tag else architecture
    path = str(path)

    def fail(problem: str) -> PretrainedWeightsError:
        return PretrainedWeightsError(f"{model_tag}: the pretrained weights {path}{where} {problem}. {remedy}".strip())

    size = os.path.getsize(path)
    if entry and entry.get('size') is not None and size != entry['size']:
        raise fail(f"are {size:,} bytes but the manifest expects {entry['size']:,}: a truncated or incomplete "
                   f"download, or a different file")
    if entry and entry.get('sha256'):
        actual = sha256_file(path)
        if actual != entry['sha256']:
            raise fail(f"have sha256 {actual} but the manifest expects {entry['sha256']}: the file is corrupt "
                       f"or was replaced")
    try:
        _, metadata = read_safetensors_header(path)
    except ValueError as e:
        raise fail(f'are corrupt or truncated: {e}') from None
    file_arch, file_tag = metadata.get('architecture'), metadata.get('tag')
    if file_arch and file_arch != architecture:
        raise PretrainedWeightsError(
            f"{model_tag}: the pretrained weights {path}{where} are for '{file_arch}', not '{architecture}' (the "
            f"architecture recorded in the file). Create the model as timm.create_model('{file_arch}', ...), or "
            f"point pretrained_cfg_overlay=dict(file=...) at weights converted for {architecture}.")
    if file_tag and tag and file_tag != tag and find_manifest_entry(architecture, file_tag) is not None:
        raise PretrainedWeightsError(
            f"{model_tag}: the pretrained weights {path}{where} are the '{architecture}.{file_tag}' weights, which "
            f"need that tag's model configuration. Create the model as timm.create_model('{architecture}.{file_tag}', "
            f"pretrained=True, ...).")
