"""Uploading a converted folder to the Hugging Face Hub: which files a conversion holds (``CONVERTED_FILES``, and
``conversion.json``, the record of their sizes and sha256), the check that they are still what ``convert`` wrote
(``check_recorded_files``), and the upload (``push_to_hub``), whose failures are one ``PretrainedWeightsError`` line."""
import contextlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..weights import WEIGHTS_FILE, PathLike, PretrainedWeightsError, sha256_file

__all__ = ['CONVERTED_FILES', 'RECORD_FILE', 'record_files', 'check_recorded_files', 'push_to_hub', 'hub_token']

CONVERTED_FILES = (WEIGHTS_FILE, 'config.json', 'README.md')  # what convert writes, and all that push uploads
RECORD_FILE = 'conversion.json'  # each converted file's size and sha256, as convert wrote it; never uploaded


def hub_token(folder: PathLike, repo_id: str, token: Optional[str] = None) -> str:
    """``token``, else the one in the environment or from ``hf auth login``; an error that says how to set one."""
    from huggingface_hub import get_token
    token = token or get_token()
    if not token:
        raise PretrainedWeightsError(
            f"uploading {folder} to the Hub repo '{repo_id}' needs a Hugging Face token with write access; none is "
            f"set. Set HF_TOKEN=hf_... in the environment (or run `hf auth login`) and run again.")
    return token


def _network_errors() -> Tuple[type, ...]:
    """What an upload raises when the Hub cannot be reached or answers with an error: ``OSError`` (requests' errors
    and ``HfHubHTTPError`` are ones) and the HTTP errors of the httpx client that huggingface_hub uses."""
    errors: List[type] = [OSError]
    for module in ('httpx2', 'httpx'):
        with contextlib.suppress(ImportError):
            errors.append(__import__(module).HTTPError)
    return tuple(errors)


def record_files(folder: Path, files: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``{name: {'size': bytes, 'sha256': hex}}`` of ``files`` in ``folder``."""
    return {name: dict(size=(folder / name).stat().st_size, sha256=sha256_file(folder / name)) for name in files}


def _describe(entry: Any) -> str:
    """A record entry as '<size> bytes, sha256 <first 12>...'."""
    if not (isinstance(entry, dict) and isinstance(entry.get('size'), int) and isinstance(entry.get('sha256'), str)):
        return f'{entry!r}' if entry is not None else 'nothing'
    return f"{entry['size']:,} bytes, sha256 {entry['sha256'][:12]}..."


def check_recorded_files(folder: PathLike, files: Sequence[str] = CONVERTED_FILES) -> None:
    """Raise a ``ValueError`` unless each of ``files`` in ``folder`` has the size and sha256 that convert recorded in
    its ``conversion.json``: a file changed, damaged or cut short since it was written is never uploaded."""
    folder = Path(folder)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} has no {', '.join(missing)}; push a folder written by `biformer-zoo convert`")
    try:
        recorded = json.loads((folder / RECORD_FILE).read_text(encoding='utf-8'))['files']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{folder} has no readable {RECORD_FILE} ({e}), the record of what `biformer-zoo convert` '
                         f'wrote; convert again into a new folder (or with --overwrite) and push that') from None
    measured = record_files(folder, files)
    changed = [f'{name} ({_describe(m)}; recorded {_describe(recorded.get(name))})'
               for name, m in measured.items() if recorded.get(name) != m]
    if changed:
        raise ValueError(f"{folder} holds files that are not what convert wrote: {'; '.join(changed)}. Nothing was "
                         f"uploaded; convert again (with --overwrite) and push the new folder")


def push_to_hub(folder: PathLike, repo_id: str, token: Optional[str] = None,
                files: Sequence[str] = CONVERTED_FILES) -> str:
    """Upload ``files`` of a converted folder (by default what ``convert_checkpoint`` writes, and nothing else that
    lies in it) to the Hub repo ``repo_id`` (created if needed), in one commit; returns the commit URL.

    Each file must still have the size and sha256 recorded in the folder's ``conversion.json``
    (``check_recorded_files``), checked before anything goes to the network. The token comes from ``token``, else the
    environment (``HF_TOKEN``) or ``hf auth login``. An unreachable Hub or an error answer raises
    ``PretrainedWeightsError`` with one line saying what failed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    folder = Path(folder)
    check_recorded_files(folder, files)
    api = HfApi(token=hub_token(folder, repo_id, token))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.create_commit(repo_id, operations,
                                   commit_message=f'Add {folder.name} converted with biformer-zoo')
    except _network_errors() as e:
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise PretrainedWeightsError(
            f"uploading {folder} to the Hub repo '{repo_id}' failed ({type(e).__name__}: {reason}). Check the "
            f"network and that HF_TOKEN has write access to that repo (or its organisation); the converted folder "
            f"is kept: push it again with biformer_zoo.tools.push.push_to_hub") from e
    return str(commit.commit_url)
