"""``pretrained=True``: the weights file of a resolved pretrained cfg, local and checked.

:func:`pretrained_weights_file` downloads the weights of a tag with ``huggingface_hub`` (so ``HF_ENDPOINT`` mirrors,
``HF_HUB_OFFLINE`` and the shared cache behave as users expect), checks size, sha256, file integrity and architecture
(or checks a user's ``file``), turns every failure into one :class:`PretrainedWeightsError` that says what to do, and
returns the cfg pointing at the local file. timm's own ``load_pretrained`` then reads it, adapts
``num_classes``/``in_chans`` and wraps ``features_only`` models, as for its own models."""
import dataclasses
import os
from typing import Any, Dict, Optional

from timm.models import PretrainedCfg

from .._version import __version__
from .files import PretrainedWeightsError, cache_paths_hint, check_weights_file
from .manifest import WEIGHTS_FILE, PathLike, find_manifest_entry, split_hub_id
from .official import check_checkpoint_file

__all__ = ['download_weights', 'pretrained_weights_file', 'cached_weights_path', 'convert_command']


def convert_command(architecture: str, tag: Optional[str], entry: Optional[Dict[str, Any]]) -> str:
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
    return (f'To use them now, {download}convert it with `{convert_command(architecture, tag, entry)}` '
            f"and load it with timm.create_model('{model_tag}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='{model_tag}/{WEIGHTS_FILE}')).")


def _hub_error_message(
        error: Exception,
        model_tag: str,
        repo_id: str,
        filename: str,
        cache_dir: Optional[PathLike],
        published: bool,
) -> str:
    """One message for a failed ``hf_hub_download``: what went wrong, for which model and repo, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError)

    head = f"{model_tag}: cannot get the pretrained weights ({filename}) from the Hugging Face Hub repo '{repo_id}'"
    local = 'load a local file with pretrained_cfg_overlay=dict(file=...)'
    otherwise = f' Or {local}.'
    cache = cache_dir or constants.HF_HUB_CACHE
    cause = error.__cause__
    http_status = getattr(getattr(cause, 'response', None), 'status_code', None)
    if isinstance(error, GatedRepoError):
        return (f'{head}: the repo is gated. Accept its terms on the Hub and set HF_TOKEN to a token of that '
                f'account, or {local}.')
    if isinstance(error, LocalEntryNotFoundError):
        if constants.is_offline_mode():
            if not published:  # nothing to download: the caller leads with how to convert
                return f'{head}: HF_HUB_OFFLINE is set and the file is not in the Hub cache {cache}.'
            return (f'{head}: HF_HUB_OFFLINE is set and the file is not in the Hub cache {cache}. Download it once '
                    f'with network access (`hf download {repo_id} {filename}`, or unset HF_HUB_OFFLINE), point '
                    f'HF_HUB_CACHE at a cache that has it, or {local}.')
        if http_status == 404:  # an endpoint that answers 404 without the Hub's error headers
            return f'{head}: {constants.ENDPOINT} answers 404 Not Found for it.{otherwise}'
        return (f'{head}: {constants.ENDPOINT} could not be reached ({type(cause or error).__name__}: '
                f'{cause or error}) and the file is not in the Hub cache {cache}. Check the network or proxy, set '
                f'HF_ENDPOINT to a reachable mirror, or {local}.')
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

    model_tag = f'{architecture}.{tag}' if tag else architecture
    repo_id, revision = split_hub_id(hf_hub_id)
    published = entry is None or entry.get('status') == 'published'
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir,
            library_name='biformer-zoo', library_version=__version__)
    except Exception as e:  # huggingface_hub's errors, OS errors, and the HTTP client's (e.g. a proxy error)
        message = _hub_error_message(e, model_tag, repo_id, filename, cache_dir, published)
        if not published:  # what the user can do now comes first; why the Hub had nothing comes after
            message = (f"{model_tag}: these pretrained weights are not published on the Hugging Face Hub yet (status "
                       f"'{entry['status']}' in the weights manifest). {_convert_hint(architecture, tag, entry)} "
                       f'The Hub lookup: {message}')
        raise PretrainedWeightsError(message) from e


def pretrained_weights_file(variant: str, cfg: PretrainedCfg, cache_dir: Optional[PathLike] = None) -> PretrainedCfg:
    """``cfg`` with its weights as a checked local ``file``, for timm's ``load_pretrained`` to read.

    Weights on the Hub (the manifest's or a user's ``hf_hub_id``) are downloaded and checked against the manifest;
    a user's ``file`` is checked (``.safetensors`` whole, with the architecture it records; a ``.pth`` by its first
    bytes: timm reads it inside ``official.reading_checkpoints``). In-memory state dicts, URLs and local dirs are
    timm's to load.
    """
    if cfg.state_dict is not None or cfg.source == 'local-dir':
        return cfg
    entry = find_manifest_entry(hf_hub_id=split_hub_id(cfg.hf_hub_id)[0]) if cfg.hf_hub_id else None
    tag = cfg.tag or (entry or {}).get('tag')
    if cfg.file and cfg.source != 'hf-hub':
        _check_local_file(variant, tag, str(cfg.file))
        return cfg
    if not cfg.hf_hub_id:
        return cfg  # a plain URL, or no weights at all: timm's own loader reports it
    filename = cfg.hf_hub_filename or WEIGHTS_FILE
    path = download_weights(variant, tag, cfg.hf_hub_id, filename, entry, cache_dir)
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
            remedy=f'Delete {cache_paths_hint(path)}, then load again to download a fresh copy.')
    # source None: timm takes the checked file instead of downloading again
    return dataclasses.replace(cfg, file=path, source=None if cfg.source == 'hf-hub' else cfg.source)


def _check_local_file(variant: str, tag: Optional[str], file: str) -> None:
    """Check a user-given weights file: ``.safetensors`` whole, as a converted file; anything else by its first bytes
    (timm reads it with ``weights_only=True``, the same files ``convert`` accepts)."""
    model_tag = f'{variant}.{tag}' if tag else variant
    command = convert_command(variant, tag, find_manifest_entry(variant, tag))
    if not os.path.isfile(file):
        problem = 'is a directory' if os.path.isdir(file) else 'does not exist'
        raise PretrainedWeightsError(
            f"{model_tag}: the pretrained weights file {file} (pretrained_cfg_overlay file) {problem}. Pass the path "
            f"of a converted model.safetensors (`{command}`) or of an official .pth checkpoint.")
    if file.endswith('.safetensors'):
        check_weights_file(file, variant, tag, where=' (pretrained_cfg_overlay file)',
                           remedy=f'Convert the official checkpoint again: `{command}`.')
        return
    try:
        check_checkpoint_file(file)
    except ValueError as e:
        raise PretrainedWeightsError(f'{model_tag}: cannot use the pretrained_cfg_overlay file: {e}') from None


def cached_weights_path(hf_hub_id: str, filename: str = WEIGHTS_FILE) -> Optional[str]:
    """Path of ``filename`` of ``hf_hub_id`` in the local Hub cache, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache
    repo_id, revision = split_hub_id(hf_hub_id)
    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return found if isinstance(found, str) else None
