"""Writing files and folders atomically: a reader sees the old version or the new one, never a
mix or a torn file, even if the writer is killed at any point.

``atomic_write`` writes one file (temporary file, fsync, rename, fsync of the folder);
``replace_folder`` replaces a whole folder (a temporary sibling exchanged in one atomic rename,
under a lock), and ``clean_folder_leftovers`` removes or restores what a killed run left.
Used for encoders, the training file, checkpoints and retrieval indexes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)`` so that a reader sees the old or the new file.

    The bytes go to a temporary file in the same folder, are fsynced, and the file is renamed
    over ``path``; then the folder is fsynced where the platform allows it, so the rename
    survives a crash too. On any failure the temporary file is removed and ``path`` is
    untouched. Used for encoders, the training file and checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    handle = os.open(temp_name, flags, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        temp_name.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(handle)
    finally:
        os.close(handle)


PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or the file system has no such call.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                 _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (its new contents survive a crash)."""
    for root, _, files in os.walk(folder):
        for name in files:
            handle = os.open(Path(root) / name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        _fsync_folder(Path(root))


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock where the platform has it), so that one
    writer's clean-up never removes another writer's temporary folder."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def clean_folder_leftovers(target: Path) -> None:
    """Remove what a killed ``replace_folder`` left beside ``target``.

    A temporary folder (``.NAME.*.partial``) is deleted. An old set moved aside
    (``.NAME.*.old``, only without an atomic exchange) is put back when ``target`` is missing,
    since it is complete, and deleted otherwise.
    """
    target = Path(target)
    for leftover in sorted(target.parent.glob(f".{target.name}.*{PARTIAL_SUFFIX}")):
        shutil.rmtree(leftover)
    for leftover in sorted(target.parent.glob(f".{target.name}.*{OLD_SUFFIX}")):
        if target.exists():
            shutil.rmtree(leftover)
        else:
            os.rename(leftover, target)
            logger.warning("restored %s from %s (a run was killed while replacing it)",
                           target, leftover.name)
    _fsync_folder(target.parent)


def replace_folder(target: Path, write: Callable[[Path], object]) -> None:
    """Replace the folder ``target`` as a whole by what ``write(folder)`` puts into ``folder``.

    ``write`` fills a sibling temporary folder, which is fsynced and then exchanged with
    ``target`` in one atomic rename, so a reader of ``target`` sees the old set of files or the
    new one, never a mix, even if the process is killed at any point. Without an atomic
    exchange (not Linux) the old folder is renamed aside first: a crash between the two renames
    leaves ``target`` missing (a reader refuses it) and the next call puts the old set back.
    Leftovers of a killed run are removed on the next call.
    """
    target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(target.parent):
        clean_folder_leftovers(target)
        token = secrets.token_hex(8)
        temp = target.parent / f".{target.name}.{token}{PARTIAL_SUFFIX}"
        temp.mkdir()
        try:
            write(temp)
            _fsync_tree(temp)
            if not target.exists():
                os.rename(temp, target)
            elif _exchange(temp, target):
                shutil.rmtree(temp)
            else:
                old = target.parent / f".{target.name}.{token}{OLD_SUFFIX}"
                os.rename(target, old)
                try:
                    os.rename(temp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                shutil.rmtree(old)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        _fsync_folder(target.parent)
