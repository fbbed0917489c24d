"""``pretrained=True``: resolve the weights of a tag, download them with ``huggingface_hub`` (so ``HF_ENDPOINT`` mirrors,
``HF_HUB_OFFLINE`` and the shared cache behave as users expect), check size, sha256, file integrity and architecture,
turn every failure into one :class:`PretrainedWeightsError` that says what to do, and hand timm the local file, so
timm's own ``load_pretrained`` still adapts ``num_classes``/``in_chans`` and wraps ``features_only`` models.
:func:`prepare_pretrained` is called first thing by each family's ``_create_*``."""
import os
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.models import resolve_pretrained_cfg

from .._version import __version__
from .files import PretrainedWeightsError, cache_paths_hint, check_weights_file
from .manifest import WEIGHTS_FILE, PathLike, find_manifest_entry, manifest_entries, split_hub_id
from .official import load_official_checkpoint

__all__ = [
    'download_weights', 'prepare_pretrained', 'check_pretrained_state_dict', 'release_loaded_state_dict',
    'cached_weights_path', 'pretrained_table', 'convert_command']


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
    entry = find_manifest_entry(hf_hub_id=split_hub_id(cfg.hf_hub_id)[0]) if cfg.hf_hub_id else None
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
            remedy=f'Delete {cache_paths_hint(path)}, then load again to download a fresh copy.')
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
    command = convert_command(variant, tag, find_manifest_entry(variant, tag))
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
    overlay.update(state_dict=state_dict)  # timm takes the state dict first; the file names the source
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def _names(keys: List[str], limit: int = 4) -> str:
    return f"{len(keys)} ({', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''})"


def check_pretrained_state_dict(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse pretrained weights that would load into ``model`` only in part.

    Called on the state dict timm is about to load (already in the model's layout), before timm drops a classifier
    of another size and adapts the first conv to ``in_chans``; after that timm loads with ``strict=False`` and checks
    nothing. Only the classifier (``pretrained_cfg['classifier']``) may be missing, extra or of another shape, and the
    first conv (``pretrained_cfg['first_conv']``) may differ in its input channels. Anything else missing, unexpected,
    of another shape, or integer where the model holds floats (or the reverse) raises :class:`PretrainedWeightsError`
    naming the source, the counts and a few names.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    def names(value: Any) -> tuple:
        return (value,) if isinstance(value, str) else tuple(value or ())
    head = tuple(f'{name}.' for name in names(cfg.get('classifier')))
    first_convs = {f'{name}.weight' for name in names(cfg.get('first_conv'))}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(head)
               and not k.endswith('num_batches_tracked')]  # BatchNorm's counter: not a weight
    unexpected = [k for k in state_dict if k not in own and not k.startswith(head)]
    wrong = []
    for key in own.keys() & state_dict.keys():
        value, target = state_dict[key], own[key]
        if value.is_floating_point() != target.is_floating_point():
            wrong.append(f'{key} is {value.dtype}, the model holds {target.dtype}')
        elif value.shape != target.shape and not key.startswith(head) and not (
                key in first_convs and value.shape[:1] + value.shape[2:] == target.shape[:1] + target.shape[2:]):
            wrong.append(f'{key} is {tuple(value.shape)}, the model holds {tuple(target.shape)}')
    if not (missing or unexpected or wrong):
        return
    source = cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url') or 'the state dict given as pretrained_cfg'
    model_tag = '.'.join(filter(None, (cfg.get('architecture'), cfg.get('tag'))))
    problems = [f'{label} {_names(keys)}' for label, keys in (
        ('missing', missing), ('unexpected', unexpected), ('of another shape or kind', wrong)) if keys]
    raise PretrainedWeightsError(
        f"{model_tag}: the pretrained weights {source} do not fit the model's backbone; tensors {'; '.join(problems)}. "
        f"Only the classifier may be missing or differ (and the first conv's input channels, for in_chans), so "
        f"loading them would leave part of the model random. Use weights of this architecture and configuration "
        f"(`biformer-zoo convert` names the models an official checkpoint fits), or create the model with the "
        f"arguments the weights were trained with.")


def release_loaded_state_dict(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the state dict :func:`prepare_pretrained` handed to timm from the model's pretrained cfg once loaded
    (timm keeps the cfg on the model, which would hold a second copy of the weights)."""
    for module in (model, getattr(model, 'model', None)):  # features_only wrappers keep the cfg on both
        cfg = getattr(module, 'pretrained_cfg', None)
        if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
            cfg['state_dict'] = None
    return model


def cached_weights_path(hf_hub_id: str, filename: str = WEIGHTS_FILE) -> Optional[str]:
    """Path of ``filename`` of ``hf_hub_id`` in the local Hub cache, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache
    repo_id, revision = split_hub_id(hf_hub_id)
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
