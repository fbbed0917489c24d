"""The output folder of ``biformer-zoo convert``, all or nothing: checked before any work (``check_out_dir``), locked
against a second run (``conversion_lock``: ``.<name>.convert.lock`` beside it, created exclusively), written as a
staging folder beside it (``staging_folder``, removed on failure with any parents it made), then renamed into place
(``move_into_place``: one rename, or with ``overwrite`` one exchange, ``renameat2(RENAME_EXCHANGE)`` on Linux and the
old folder moved aside first elsewhere, so an interruption leaves the old conversion whole; the user's other files
are carried over)."""
import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, List, Sequence

from ..weights import PathLike
from .push import CONVERTED_FILES, RECORD_FILE

__all__ = ['check_out_dir', 'conversion_lock', 'staging_folder', 'move_into_place']


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file and a folder that holds files (unless ``overwrite``), with the fix; before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'--out {out_dir} is a file; pass a folder to write the converted weights into')
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present and not overwrite:
        if set(present) <= {*CONVERTED_FILES, RECORD_FILE}:
            raise ValueError(f"--out {out_dir} already holds a conversion ({', '.join(present)}); pass --overwrite "
                             f"to replace it, or another folder")
        shown = ', '.join(present[:5]) + (f' and {len(present) - 5} more' if len(present) > 5 else '')
        raise ValueError(f'--out {out_dir} is not empty (it holds {shown}); pass a new or empty folder, or '
                         f'--overwrite to write into it anyway (its other files are kept and never uploaded)')


def _unwritable(out_dir: Path, error: OSError) -> ValueError:
    return ValueError(f'--out {out_dir} cannot be written ({error.strerror or error}: {error.filename or out_dir}); '
                      f'pass a folder you can write to')


def _make_parents(out_dir: Path) -> List[Path]:
    """Create the missing folders above ``out_dir``; returns those created, the deepest last."""
    missing = [p for p in reversed(out_dir.absolute().parents) if not p.exists()]
    created = []
    try:
        for folder in missing:
            folder.mkdir(exist_ok=True)
            created.append(folder)
    except OSError as e:
        _remove_empty(created)
        raise _unwritable(out_dir, e) from None
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest last) that are still empty; a run beside this one may have put files there."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _lock_path(out_dir: Path) -> Path:
    return out_dir.with_name(f'.{out_dir.name}.convert.lock')


@contextlib.contextmanager
def conversion_lock(out_dir: PathLike) -> Iterator[Path]:
    """Hold the lock file beside ``out_dir`` while inside (created with ``O_EXCL``, removed on the way out, also on
    an error); a second holder is refused with a ``ValueError`` naming the lock. Yields the lock's path."""
    out_dir = Path(out_dir)
    lock = _lock_path(out_dir)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ValueError(
            f'another `biformer-zoo convert` is writing --out {out_dir} (its lock {lock} exists); wait for it to '
            f'finish or pass another --out. If no convert is running (a killed run leaves the lock behind), delete '
            f'{lock} and run again') from None
    except OSError as e:
        raise _unwritable(out_dir, e) from None
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(f'{os.getpid()}\n')
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _new_folder_beside(out_dir: Path, what: str) -> Path:
    """A new empty folder ``.<name>.<what>-<random>`` beside ``out_dir``, with the permissions a plain mkdir gives
    (``tempfile.mkdtemp``'s 0700 would become ``--out``'s)."""
    folder = out_dir.with_name(f'.{out_dir.name}.{what}-{secrets.token_hex(4)}')
    folder.mkdir()
    return folder


@contextlib.contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """Hold the lock beside ``out_dir`` and yield a new temporary folder beside it; on the way out the folder (if not
    renamed into place), the lock and the parent folders this created are removed."""
    created = _make_parents(out_dir)
    try:
        with conversion_lock(out_dir):
            try:
                staging = _new_folder_beside(out_dir, 'converting')
            except OSError as e:
                raise _unwritable(out_dir, e) from None
            try:
                yield staging
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        _remove_empty(created)
        raise


def _carry_user_files(old: Path, new: Path) -> None:
    """Hard-link (else copy) the files of the user's in ``old`` that are not part of a conversion into ``new``."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in old.iterdir():
        if entry.name in (*CONVERTED_FILES, RECORD_FILE):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            link_or_copy(str(entry), str(new / entry.name))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one rename (Linux ``renameat2(RENAME_EXCHANGE)``); False if the system or
    the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), 'renameat2', None) if os.name == 'posix' else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange on this system or file system
        return False
    raise OSError(code, os.strerror(code), str(b))


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished ``staging`` folder to ``out_dir``. An ``out_dir`` holding files (``overwrite``) is swapped
    for it in one rename, with the user's other files carried over first; the old folder then ends at ``staging``'s
    path, which the caller removes."""
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        os.replace(staging, out_dir)  # a missing or empty out_dir
        return
    _carry_user_files(out_dir, staging)
    if _exchange(staging, out_dir):
        return
    aside = _new_folder_beside(out_dir, 'replaced')
    os.replace(out_dir, aside)  # interrupted after this, the old conversion is whole in `aside`
    os.replace(staging, out_dir)
    os.replace(aside, staging)


# ---------------------------------------------------------------------------------------------------------------
# the steps of a conversion
