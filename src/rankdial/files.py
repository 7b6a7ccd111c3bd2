"""Atomic folder writes: a crash mid-save never leaves a half-written folder where a good one was."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import RankdialError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_tree(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, marker: str):
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` in one step.

    `marker` is a file name that an existing `target` must hold to be replaced (e.g. adapter_config.json),
    so a save never deletes a folder of unrelated files. On any exception the temporary folder is removed
    and `target` is left exactly as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise RankdialError(f"{target} exists and is a file, not a folder; choose another path or remove it")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).exists():
        raise RankdialError(f"{target} is a non-empty folder without {marker}; rankdial will not replace it. "
                            "Choose a new path or empty the folder first")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # tmp now holds the old folder
        else:
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
