"""Pretrained weights on the Hugging Face Hub: the manifest, checked downloads, and conversion of official checkpoints.

* ``weights_manifest.json`` (repository root, shipped inside the package) lists every pretrained tag: its Hub repo,
  the sha256 and size of the converted ``model.safetensors``, the official file it comes from, what the authors report
  and the evaluation preprocessing. The pretrained cfgs registered with timm must agree with it (tests/test_hub.py).
* :func:`prepare_pretrained` is called first thing by each family's ``_create_*``. For ``pretrained=True`` it downloads
  the weights with ``huggingface_hub`` (so ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE`` and the shared cache behave as
  users expect), checks size, sha256, file integrity and architecture, turns every failure into one
  :class:`PretrainedWeightsError` that says what to do, and hands timm the local file, so timm's own
  ``load_pretrained`` still adapts ``num_classes``/``in_chans`` and wraps ``features_only`` models.
* :func:`convert_checkpoint` turns an official checkpoint into a Hub-ready folder (``biformer-zoo convert``).
"""
import argparse
import functools
import hashlib
import json
import os
import pathlib
import pickle
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import timm
from timm.models import resolve_pretrained_cfg

MANIFEST_PATH = Path(__file__).with_name('weights_manifest.json')
WEIGHTS_FILE = 'model.safetensors'
STATUSES = ('published', 'converted', 'convertible')

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
# Classes allowed inside official training checkpoints besides tensors: attribute bags that run no code when unpickled.
_SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]

PathLike = Union[str, os.PathLike]


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, downloaded or trusted; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# The manifest

@functools.lru_cache(maxsize=None)
def load_manifest(path: Optional[PathLike] = None) -> Dict[str, Any]:
    """The parsed weights manifest (cached; call ``load_manifest.cache_clear()`` after editing the file)."""
    with open(path or MANIFEST_PATH, encoding='utf-8') as f:
        return json.load(f)


def manifest_entries() -> List[Dict[str, Any]]:
    """One dict per pretrained tag, in manifest order."""
    return load_manifest()['weights']


def find_manifest_entry(
        architecture: Optional[str] = None,
        tag: Optional[str] = None,
        hf_hub_id: Optional[str] = None,
) -> Optional[Dict[str, Any]]:
    """The manifest entry matching every given field, or None; Hub ids match by repo, whatever their revision."""
    for entry in manifest_entries():
        if ((architecture is None or entry['architecture'] == architecture)
                and (tag is None or entry['tag'] == tag)
                and (hf_hub_id is None or _split_hub_id(entry['hf_hub_id'])[0] == _split_hub_id(hf_hub_id)[0])):
            return entry
    return None


def manifest_pretrained_cfg(architecture: str, tag: str) -> Dict[str, Any]:
    """The pretrained-cfg fields the manifest fixes for ``architecture.tag``, as timm's ``_cfg`` dicts spell them."""
    entry = find_manifest_entry(architecture, tag)
    if entry is None:
        raise ValueError(f"'{architecture}.{tag}' is not in the weights manifest {MANIFEST_PATH}")
    prep = entry['preprocessing']
    return dict(
        hf_hub_id=entry['hf_hub_id'], num_classes=entry['num_classes'], license=entry['license'],
        input_size=tuple(prep['input_size']), crop_pct=prep['crop_pct'], crop_mode=prep['crop_mode'],
        interpolation=prep['interpolation'], mean=tuple(prep['mean']), std=tuple(prep['std']),
    )


def dump_manifest(manifest: Dict[str, Any]) -> str:
    """JSON text of the manifest with short lists of numbers kept on one line."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    number_list = re.compile(r'\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]')
    return number_list.sub(lambda m: '[' + ', '.join(s.strip() for s in m.group(1).split(',')) + ']', text) + '\n'


def update_manifest_entry(architecture: str, tag: str, path: Optional[PathLike] = None, **fields: Any) -> None:
    """Set ``fields`` on the entry ``architecture.tag`` and rewrite the manifest file in place."""
    path = Path(path or MANIFEST_PATH).resolve()  # resolve: the packaged manifest may be a link to the root one
    manifest = json.loads(path.read_text(encoding='utf-8'))
    matches = [e for e in manifest['weights'] if e['architecture'] == architecture and e['tag'] == tag]
    if not matches:
        raise ValueError(f"'{architecture}.{tag}' is not in the weights manifest {path}; add an entry for it first")
    matches[0].update(fields)
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(dump_manifest(manifest), encoding='utf-8')
    tmp.replace(path)
    load_manifest.cache_clear()


# ----------------------------------------------------------------------------------------------------------------------
# Weight files

_SHA256_MEMO: Dict[Tuple[str, int, int], str] = {}


def sha256_file(path: PathLike, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (remembered per path, size and mtime within one process)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, 'rb') as f, _byte_progress(f'sha256 {Path(path).name}', stat.st_size, progress) as advance:
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
        data_end = max((int(t['data_offsets'][1]) for t in table.values()), default=0)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f'its header is not a valid safetensors header ({type(e).__name__}: {e})') from None
    expected = 8 + header_len + data_end
    if size != expected:
        raise ValueError(
            f'it is truncated: the header describes {expected:,} bytes, the file has {size:,}' if size < expected
            else f'it has {size - expected:,} bytes after the last tensor the header describes')
    return table, metadata


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


def _cache_paths_hint(path: str) -> str:
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


# ----------------------------------------------------------------------------------------------------------------------
# pretrained=True: download with huggingface_hub, check, hand the file to timm

def _split_hub_id(hf_hub_id: str) -> Tuple[str, Optional[str]]:
    repo_id, _, revision = hf_hub_id.partition('@')
    return repo_id, revision or None


def _convert_command(architecture: str, tag: Optional[str], entry: Optional[Dict[str, Any]]) -> str:
    """The ``biformer-zoo convert`` command line for ``architecture.tag``."""
    tag = tag or (entry or {}).get('tag') or 'in1k'
    source = ((entry or {}).get('sources') or [{}])[0]
    checkpoint = source.get('file_name') or 'CHECKPOINT.pth'
    return (f'biformer-zoo convert --model {architecture} --tag {tag} --checkpoint {checkpoint} '
            f'--out {architecture}.{tag}')


def _convert_hint(architecture: str, tag: Optional[str], entry: Optional[Dict[str, Any]]) -> str:
    """How to convert the official checkpoint and load the result without the Hub."""
    tag = tag or (entry or {}).get('tag') or 'in1k'
    model_tag = f'{architecture}.{tag}'
    source = ((entry or {}).get('sources') or [{}])[0]
    download = ''
    if source.get('url'):
        password = f" (password {source['password']})" if source.get('password') else ''
        file_name = f" {source['file_name']}" if source.get('file_name') else ''
        download = f"download the official checkpoint{file_name} from {source['url']}{password}, "
    return (f'To use them now, {download}convert it with `{_convert_command(architecture, tag, entry)}` '
            f"and load it with timm.create_model('{model_tag}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='{model_tag}/{WEIGHTS_FILE}')).")


def _hub_error_message(
        error: Exception,
        model_tag: str,
        repo_id: str,
        filename: str,
        not_published: str,
        cache_dir: Optional[PathLike],
) -> str:
    """One message for a failed ``hf_hub_download``: what went wrong, for which model and repo, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError)

    head = f"{model_tag}: cannot get the pretrained weights ({filename}) from the Hugging Face Hub repo '{repo_id}'"
    local = 'load a local file with pretrained_cfg_overlay=dict(file=...)'
    otherwise = not_published or f' Or {local}.'
    cache = cache_dir or constants.HF_HUB_CACHE
    cause = error.__cause__
    http_status = getattr(getattr(cause, 'response', None), 'status_code', None)
    if isinstance(error, GatedRepoError):
        return (f'{head}: the repo is gated. Accept its terms on the Hub and set HF_TOKEN to a token of that '
                f'account, or {local}.')
    if isinstance(error, LocalEntryNotFoundError):
        if constants.is_offline_mode():
            return (f'{head}: HF_HUB_OFFLINE is set and the file is not in the Hub cache {cache}. Download it once '
                    f'with network access (`hf download {repo_id} {filename}`, or unset HF_HUB_OFFLINE), point '
                    f'HF_HUB_CACHE at a cache that has it, or {local}.{not_published}')
        if http_status == 404:  # an endpoint that answers 404 without the Hub's error headers
            return f'{head}: {constants.ENDPOINT} answers 404 Not Found for it.{otherwise}'
        return (f'{head}: {constants.ENDPOINT} could not be reached ({type(cause or error).__name__}: '
                f'{cause or error}) and the file is not in the Hub cache {cache}. Check the network or proxy, set '
                f'HF_ENDPOINT to a reachable mirror, or {local}.{not_published}')
    if isinstance(error, RepositoryNotFoundError):
        return (f'{head}: the repo does not exist on {constants.ENDPOINT} (or is private and HF_TOKEN does not give '
                f'access).{otherwise}')
    if isinstance(error, RevisionNotFoundError):
        return f'{head}: the revision does not exist in the repo. Fix the revision after @ in hf_hub_id, or {local}.'
    if isinstance(error, EntryNotFoundError):
        return f'{head}: the repo has no file {filename}.{otherwise}'
    if isinstance(error, HfHubHTTPError):
        return f'{head}: the Hub answered {error}. Try again later, set HF_ENDPOINT to a mirror, or {local}.'
    return f'{head}: {type(error).__name__}: {error}. Or {local}.'


def download_weights(
        architecture: str,
        tag: Optional[str],
        hf_hub_id: str,
        filename: str = WEIGHTS_FILE,
        entry: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[PathLike] = None,
) -> str:
    """Local path of ``filename`` from the Hub repo ``hf_hub_id`` (``org/name`` or ``org/name@revision``).

    Goes through ``huggingface_hub.hf_hub_download`` and its cache; raises :class:`PretrainedWeightsError` with one
    clear message on any failure.
    """
    from huggingface_hub import hf_hub_download

    from . import __version__
    model_tag = f'{architecture}.{tag}' if tag else architecture
    repo_id, revision = _split_hub_id(hf_hub_id)
    not_published = ''
    if entry is not None and entry.get('status') != 'published':
        not_published = (f" These weights are not published on the Hub yet (status '{entry['status']}' in the "
                         f"weights manifest). " + _convert_hint(architecture, tag, entry))
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir,
            library_name='biformer-zoo', library_version=__version__)
    except Exception as e:  # huggingface_hub's errors, OS errors, and the HTTP client's (e.g. a proxy error)
        message = _hub_error_message(e, model_tag, repo_id, filename, not_published, cache_dir)
        raise PretrainedWeightsError(message) from e


def prepare_pretrained(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Resolve, download and check the pretrained weights of ``variant``; returns kwargs for ``build_model_with_cfg``.

    Called first thing in each family's ``_create_*``. With ``pretrained=True`` and weights on the Hub, the checked
    local file is passed on as ``pretrained_cfg_overlay['file']``; timm then loads it as usual. A user-given file is
    checked too (when it is ``.safetensors``); in-memory state dicts and URLs pass through untouched.
    """
    if not pretrained:
        return kwargs
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay)
    if cfg.state_dict is not None or cfg.source == 'local-dir':
        return kwargs
    entry = find_manifest_entry(hf_hub_id=_split_hub_id(cfg.hf_hub_id)[0]) if cfg.hf_hub_id else None
    tag = cfg.tag or (entry or {}).get('tag')
    if cfg.file and cfg.source != 'hf-hub':
        return _prepare_local_file(variant, tag, str(cfg.file), kwargs, overlay)
    if not cfg.hf_hub_id:
        return kwargs  # a plain URL, or no weights at all: timm's own loader reports it
    filename = cfg.hf_hub_filename or WEIGHTS_FILE
    path = download_weights(variant, tag, cfg.hf_hub_id, filename, entry, kwargs.get('cache_dir'))
    if entry is not None and not entry.get('sha256'):
        # found in the cache or in a repo this version of the package has no checksum for: refuse to trust it
        model_tag = f'{variant}.{tag}' if tag else variant
        raise PretrainedWeightsError(
            f"{model_tag}: the weights manifest of this biformer-zoo version records no sha256 for the Hub repo "
            f"'{cfg.hf_hub_id}' (status '{entry['status']}': not published by biformer-zoo yet), so the file found "
            f"there ({path}) cannot be verified and is not loaded. If a newer biformer-zoo publishes these weights, "
            f"upgrade it. {_convert_hint(variant, tag, entry)} A file you trust loads with "
            f"pretrained_cfg_overlay=dict(file=...).")
    if filename.endswith('.safetensors'):
        check_weights_file(
            path, variant, tag, entry, where=f" (Hub repo '{cfg.hf_hub_id}', file {filename})",
            remedy=f'Delete {_cache_paths_hint(path)}, then load again to download a fresh copy.')
    overlay['file'] = path
    if cfg.source == 'hf-hub':
        overlay['source'] = None  # so timm takes the checked file instead of downloading again
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def _prepare_local_file(
        variant: str, tag: Optional[str], file: str, kwargs: Dict[str, Any], overlay: Dict[str, Any]) -> Dict[str, Any]:
    """Check a user-given weights file: ``.safetensors`` as a converted file; anything else is loaded here with
    :func:`load_official_checkpoint` (``weights_only=True``, the same files ``convert`` accepts) and handed to timm
    as a state dict, EMA weights first as timm's own file loader does."""
    model_tag = f'{variant}.{tag}' if tag else variant
    command = _convert_command(variant, tag, find_manifest_entry(variant, tag))
    if not os.path.isfile(file):
        problem = 'is a directory' if os.path.isdir(file) else 'does not exist'
        raise PretrainedWeightsError(
            f"{model_tag}: the pretrained weights file {file} (pretrained_cfg_overlay file) {problem}. Pass the path "
            f"of a converted model.safetensors (`{command}`) or of an official .pth checkpoint.")
    if file.endswith('.safetensors'):
        check_weights_file(file, variant, tag, where=' (pretrained_cfg_overlay file)',
                           remedy=f'Convert the official checkpoint again: `{command}`.')
        return kwargs
    try:
        state_dict = load_official_checkpoint(file, prefer_ema=True)
    except ValueError as e:
        raise PretrainedWeightsError(f'{model_tag}: cannot use the pretrained_cfg_overlay file: {e}') from None
    overlay.update(state_dict=state_dict, file=None)
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def release_loaded_state_dict(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the state dict :func:`prepare_pretrained` handed to timm from the model's pretrained cfg once loaded
    (timm keeps the cfg on the model, which would hold a second copy of the weights)."""
    for module in (model, getattr(model, 'model', None)):  # features_only wrappers keep the cfg on both
        cfg = getattr(module, 'pretrained_cfg', None)
        if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
            cfg['state_dict'] = None
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Listing

def cached_weights_path(hf_hub_id: str, filename: str = WEIGHTS_FILE) -> Optional[str]:
    """Path of ``filename`` of ``hf_hub_id`` in the local Hub cache, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache
    repo_id, revision = _split_hub_id(hf_hub_id)
    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return found if isinstance(found, str) else None


def pretrained_table() -> List[Dict[str, Any]]:
    """One row per manifest entry: tag, status, Hub repo, whether it is in the local Hub cache, reported top-1."""
    rows = []
    for entry in manifest_entries():
        cached = cached_weights_path(entry['hf_hub_id'], entry['file'])
        rows.append(dict(
            model=f"{entry['architecture']}.{entry['tag']}", status=entry['status'], hf_hub_id=entry['hf_hub_id'],
            cached=cached is not None, cached_path=cached, top1=entry['reported']['top1'], sha256=entry['sha256'],
            registered=timm.is_model(entry['architecture']),
        ))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Converting official checkpoints

def _progress_console() -> Optional[Any]:
    """A rich console on stderr when it is a terminal (live progress), else None."""
    from rich.console import Console
    console = Console(stderr=True)
    return console if console.is_terminal else None


@contextmanager
def _byte_progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` bytes on a terminal; yields ``advance(n)``."""
    console = _progress_console() if enabled else None
    if console is None:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn('{task.description}'), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def _step(description: str, enabled: bool) -> Iterator[None]:
    """A spinner with the elapsed time while a long step runs (on a terminal); then one line with its time."""
    if not enabled:
        yield
        return
    start = time.perf_counter()
    console = _progress_console()
    if console is None:
        yield
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        with Progress(SpinnerColumn(), TextColumn('{task.description}'), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            bar.add_task(description, total=None)
            yield
    print(f'done: {description} ({time.perf_counter() - start:.1f} s)', file=sys.stderr)


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


def load_official_checkpoint(path: PathLike, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict of an official ``.pth`` checkpoint, loaded with ``torch.load(weights_only=True)``.

    Training metadata that runs no code (``argparse.Namespace`` args, paths) is allowed; a pickle that needs any
    other code is refused with a ``ValueError`` naming the classes it asks for, and a damaged file with a
    ``ValueError`` saying so. ``.safetensors`` files are read as they are.
    """
    path = Path(path)
    if not path.is_file():
        problem = 'is a directory' if path.is_dir() else 'does not exist'
        raise ValueError(f'checkpoint {path} {problem}; pass the path of the downloaded official .pth file')
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
    except pickle.UnpicklingError:
        try:  # names the classes only for a readable zip checkpoint; anything else is damaged
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            needed = []
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


def checkpoint_filter_of(model: torch.nn.Module) -> Callable[[Dict[str, torch.Tensor], torch.nn.Module], Dict]:
    """The ``checkpoint_filter_fn`` of the module that defines ``model``'s class."""
    module = sys.modules[type(model).__module__]
    filter_fn = getattr(module, 'checkpoint_filter_fn', None)
    if filter_fn is None:
        raise ValueError(f'{module.__name__} has no checkpoint_filter_fn to map official checkpoints')
    return filter_fn


def _layout_mismatch(mapped: Dict[str, torch.Tensor], model: torch.nn.Module) -> List[str]:
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
            if not _layout_mismatch(checkpoint_filter_of(model)(dict(state_dict), model), model):
                matches.append(name)
        except Exception:  # a filter refusing a foreign layout is a non-match
            continue
    return matches


@dataclass
class ConversionResult:
    """What ``convert_checkpoint`` wrote and measured."""
    model: str
    out_dir: Path
    weights_file: Path
    sha256: str
    size: int
    source_sha256: str
    params: int
    gflops: Optional[float]
    pushed_to: Optional[str] = None


def _model_card(entry: Dict[str, Any], family: Dict[str, Any], result: ConversionResult, source_name: str) -> str:
    """README.md for the Hub repo: usage, provenance, measured and reported numbers, license and citation."""
    from . import __version__
    arch, tag = entry['architecture'], entry['tag']
    prep, reported = entry['preprocessing'], entry['reported']
    size = 'x'.join(str(s) for s in prep['input_size'][1:])
    sources = '\n'.join(
        f"  - {s['host']}: {s['url']}" + (f" (password {s['password']})" if s.get('password') else '')
        for s in entry['sources'])
    flops = f"{result.gflops:.3f}" if result.gflops is not None else 'not measured'
    card = f"""---
license: {entry['license']}
library_name: timm
pipeline_tag: image-classification
tags:
- image-classification
- timm
- biformer-zoo
datasets:
- {entry['dataset']}
---
# {arch}.{tag}

Image classifier from *{family['paper']}*, trained on {entry['dataset']} by the authors and converted from
their official checkpoint to the biformer-zoo timm layout. {entry.get('notes', '')}

## Usage
```python
import timm
import biformer_zoo  # registers the models with timm

model = timm.create_model('{arch}.{tag}', pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```

## Model details
- Parameters (measured on the converted model): {result.params / 1e6:.2f} M ({result.params:,})
- GFLOPs at {size} (fvcore on the converted model, 1 multiply-add = 1 flop): {flops}
- Reported by the authors: top-1 {reported['top1']} % on ImageNet-1k val, {reported['params_M']} M parameters,
  {reported['gflops']} GFLOPs
- Preprocessing: {size} input, center crop {prep['crop_pct']}, {prep['interpolation']} interpolation,
  mean {tuple(prep['mean'])}, std {tuple(prep['std'])}
- Paper: {family['paper_url']}; official code: {family['code_url']}

## Provenance
- Converted from the official checkpoint `{source_name}` (sha256 `{result.source_sha256}`), released at:
{sources}
- Converted with biformer-zoo {__version__}:
  `biformer-zoo convert --model {arch} --tag {tag} --checkpoint {source_name}`
  (keys mapped by the model's checkpoint_filter_fn, loaded strictly, forward checked)
- `{WEIGHTS_FILE}` sha256 `{result.sha256}`, {result.size:,} bytes

## License
The official weights are released by the authors under the {entry['license'].upper()} license
({family['license_url']}, which carries the copyright notice); this conversion keeps that license.

## Citation
```bibtex
{family['citation']}
```
"""
    return card


def _hub_token(folder: PathLike, repo_id: str, token: Optional[str] = None) -> str:
    """``token``, else the one in the environment or from ``hf auth login``; an error that says how to set one."""
    from huggingface_hub import get_token
    token = token or get_token()
    if not token:
        raise PretrainedWeightsError(
            f"uploading {folder} to the Hub repo '{repo_id}' needs a Hugging Face token with write access; none is "
            f"set. Set HF_TOKEN=hf_... in the environment (or run `hf auth login`) and run again.")
    return token


def push_to_hub(folder: PathLike, repo_id: str, token: Optional[str] = None) -> str:
    """Upload a converted folder to the Hub repo ``repo_id`` (created if needed); returns the commit URL.

    The token comes from ``token``, else the environment (``HF_TOKEN``) or ``hf auth login``.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=_hub_token(folder, repo_id, token))
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                   commit_message=f'Add {Path(folder).name} converted with biformer-zoo')
    except HfHubHTTPError as e:
        raise PretrainedWeightsError(
            f"uploading {folder} to the Hub repo '{repo_id}' failed: {e}. Check that HF_TOKEN has write access to "
            f"that repo (or its organisation).") from e
    return str(commit.commit_url)


def convert_checkpoint(
        model_name: str,
        checkpoint: PathLike,
        out_dir: PathLike,
        tag: str = 'in1k',
        push: Optional[str] = None,
        update_manifest: bool = False,
        manifest_path: Optional[PathLike] = None,
        measure_flops: bool = True,
        progress: bool = True,
) -> ConversionResult:
    """Convert an official checkpoint of ``model_name.tag`` into a Hub-ready folder (``model_name`` may carry the
    tag, as in ``'biformer_small.in1k'``).

    Loads ``checkpoint`` with ``weights_only=True``, maps it with the family's ``checkpoint_filter_fn``, loads it
    strictly, checks a forward pass, and writes ``model.safetensors`` (architecture, tag and source sha256 in its
    metadata), timm's ``config.json`` and a model card ``README.md`` into ``out_dir``. Optionally records sha256/size
    in the manifest and uploads the folder to ``push`` (a Hub repo id).
    """
    from timm.models._hub import save_config_for_hf

    if '.' in model_name:  # 'biformer_small.in1k': the tag may come with the name
        model_name, name_tag = model_name.split('.', 1)
        if tag not in ('in1k', name_tag):
            raise ValueError(f"the model name's tag '{name_tag}' and --tag '{tag}' disagree; give the tag once")
        tag = name_tag
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model '{model_name}'; `biformer-zoo list` shows the registered models")
    entry = find_manifest_entry(model_name, tag)
    if entry is None:
        tags = [e['tag'] for e in manifest_entries() if e['architecture'] == model_name]
        raise ValueError(f"'{model_name}.{tag}' is not in the weights manifest; known tags of {model_name}: "
                         f"{tags or 'none'}. Pass --tag with one of them")
    if push and update_manifest and push != entry['hf_hub_id']:
        raise ValueError(f"--update-manifest with --push {push}: the manifest's repo for {model_name}.{tag} is "
                         f"{entry['hf_hub_id']}; push there, or leave out --update-manifest")
    if update_manifest and not push and entry['status'] == 'published':
        published_sha256 = entry['sha256']
    else:
        published_sha256 = None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'--out {out_dir} is a file; pass a folder to write the converted weights into')
    if push:
        _hub_token(out_dir, push)  # before any work is done
    family = load_manifest()['families'][entry['family']]
    checkpoint = Path(checkpoint)
    model_tag = f'{model_name}.{tag}'

    source_sha256 = sha256_file(checkpoint, progress=progress) if checkpoint.is_file() else ''
    with _step(f'loading {checkpoint.name} (weights_only=True)', progress):
        official = load_official_checkpoint(checkpoint)

    with _step(f'mapping onto {model_tag} and loading strictly', progress):
        model = timm.create_model(model_tag).eval()
        try:
            mapped = checkpoint_filter_of(model)(official, model)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f'{checkpoint} cannot be mapped onto {model_tag}: {e}') from None
        problems = _layout_mismatch(mapped, model)
        if problems:
            family = type(model).__module__.rsplit('.', 1)[-1]
            guesses = guess_architecture(official, timm.list_models(module=family, pretrained=True))
            official_file = entry['sources'][0].get('file_name') or 'listed in the manifest'
            hint = (f'It matches {", ".join(guesses)}; pass --model/--tag accordingly.' if guesses else
                    f'The official file for {model_tag} is {official_file}.')
            raise ValueError(f"{checkpoint} does not fit {model_tag}: {'; '.join(problems)}. {hint}")
        model.load_state_dict(mapped, strict=True)

    with _step('checking a forward pass', progress), torch.no_grad():
        input_size = tuple(model.pretrained_cfg['input_size'])
        images = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        logits = model(images)
        if logits.shape != (1, model.num_classes) or not torch.isfinite(logits).all():
            raise ValueError(f'{model_tag} with the converted weights gives logits of shape {tuple(logits.shape)} '
                             f'with non-finite values; the checkpoint or its mapping is broken')

    params = sum(p.numel() for p in model.parameters())
    gflops = None
    if measure_flops:
        from .report import flop_analysis  # the same counting rules as `biformer-zoo report`
        with _step(f'counting FLOPs at {input_size[1]}x{input_size[2]} (fvcore)', progress), torch.no_grad():
            with warnings.catch_warnings():  # fvcore traces with torch.jit, which warns that it is deprecated
                warnings.simplefilter('ignore')
                gflops = flop_analysis(model, torch.zeros(1, *input_size)).total() / 1e9

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_file = out_dir / WEIGHTS_FILE
    with _step(f'writing {weights_file}', progress):
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        metadata = dict(format='pt', architecture=model_name, tag=tag, source_sha256=source_sha256)
        save_safetensors_reproducibly(tensors, weights_file, metadata)
        save_config_for_hf(model, out_dir / 'config.json')
    result = ConversionResult(
        model=model_tag, out_dir=out_dir, weights_file=weights_file, sha256=sha256_file(weights_file, progress),
        size=weights_file.stat().st_size, source_sha256=source_sha256, params=params, gflops=gflops)
    (out_dir / 'README.md').write_text(_model_card(entry, family, result, checkpoint.name), encoding='utf-8')

    if published_sha256 is not None and published_sha256 != result.sha256:
        raise ValueError(
            f"{model_tag} is published with sha256 {published_sha256}, but this conversion wrote {result.sha256} "
            f"({weights_file}); the manifest describes the file on the Hub, so it is left as it is. Convert the "
            f"official file the manifest names (source sha256 {entry.get('source_sha256')}), or --push the new file")
    if push:
        result.pushed_to = push_to_hub(out_dir, push)
    if update_manifest:
        update_manifest_entry(
            model_name, tag, manifest_path, sha256=result.sha256, size=result.size, source_sha256=source_sha256,
            status='published' if push or published_sha256 is not None else 'converted')
    return result
