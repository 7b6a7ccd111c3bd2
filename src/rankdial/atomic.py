"""Atomic writes, and the one rule for replacing a folder: only what rankdial's own marker says it wrote.

Every file and folder rankdial writes goes through here. A file is written under a temporary name beside
its target, flushed to disk and renamed over it; a folder is built beside its target and swapped in whole
(Linux renameat2 RENAME_EXCHANGE, else two renames). A crash at any moment leaves either the old file or
folder or the new one, never a half-written one where a good one was.

A folder rankdial writes holds a small marker, `.rankdial-output.json` = {"kind": ...}. An existing folder
is replaced only when its marker names the same kind of output and it holds nothing the marker does not list
(or, for folders written before markers, when it holds the kind's tell-tale file and nothing but that kind's
own files: `OwnFiles`, the one rule every kind uses), and never when it is one of the command's own inputs or
holds one. Written files and folders follow the umask like any other (not tempfile's 0600).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import OutputError

MARKER = ".rankdial-output.json"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _plain_modes(path: Path) -> None:
    """Give a written file or folder the modes any new one gets under the umask (libraries such as safetensors
    and tempfile create theirs 0600/0700, which another user or a server process could not read)."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(Path(root) / name, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def fsync_tree(folder: Path) -> None:
    """Flush every file below `folder`, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


# ---------------------------------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside `path`; when the block ends without error it is flushed and renamed over
    `path`. On an exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; rankdial wanted to write a file there. Choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _plain_modes(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data, indent: int | None = 2) -> Path:
    """Write `data` as JSON atomically. NaN and Infinity are refused: they are not JSON."""
    try:
        text = json.dumps(data, indent=indent, allow_nan=False)
    except ValueError as err:
        raise OutputError(f"refusing to write {path}: {err} (NaN/Infinity are not valid JSON)") from None
    return write_text(path, text + "\n")


# -------------------------------------------------------------------------------------------------- folders

def _marker(folder: Path) -> dict:
    try:
        found = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def read_marker(folder: str | os.PathLike) -> str | None:
    """The kind of output rankdial wrote in `folder` (its marker), or None."""
    kind = _marker(Path(folder)).get("kind")
    return kind if isinstance(kind, str) else None


def _added_since(folder: Path) -> list[str]:
    """Top-level entries of a marked folder that rankdial did not write (the marker lists what it wrote)."""
    written = _marker(folder).get("files")
    if not isinstance(written, list):
        return []  # a folder rankdial keeps adding to (a training run written in place) lists nothing
    return sorted(p.name for p in folder.iterdir() if p.name not in written and p.name != MARKER)


def note_written(folder: str | os.PathLike, names) -> None:
    """Add top-level `names` to the files a marked folder's marker lists as rankdial's own (for folders rankdial
    fills over time, such as a training run written in place), so a later replace keeps anything else."""
    folder = Path(folder)
    marker = _marker(folder)
    if not marker:
        return
    listed = marker.get("files") if isinstance(marker.get("files"), list) else []
    write_json(folder / MARKER, {**marker, "files": sorted(set(listed) | set(names))})


@dataclass(frozen=True)
class OwnFiles:
    """How to recognise a folder of one kind that rankdial wrote before it wrote markers: it holds every one of
    `required` and nothing whose top-level name is not in `names` or matched by one of `patterns` (regular
    expressions, for numbered files such as weight shards), and passes `check` when one is given. One common
    file name alone never makes a folder rankdial's to replace: replacing it would delete the rest.

    Call it on a folder for the yes/no answer; `foreign` lists what stops it."""

    required: tuple[str, ...]
    names: frozenset[str]
    patterns: tuple[str, ...] = ()
    check: Callable[[Path], bool] | None = None

    def __post_init__(self):
        object.__setattr__(self, "required", (self.required,) if isinstance(self.required, str) else
                           tuple(self.required))
        object.__setattr__(self, "names", frozenset(self.names) | frozenset(self.required))

    def _ours(self, name: str) -> bool:
        return name in self.names or any(re.fullmatch(p, name) for p in self.patterns)

    def foreign(self, folder: str | os.PathLike) -> list[str]:
        """Top-level entries of `folder` that this kind of output never holds (sorted)."""
        return sorted(p.name for p in Path(folder).iterdir() if not self._ours(p.name))

    def looks_like(self, folder: str | os.PathLike) -> bool:
        """Whether `folder` holds every required file (what an older output of this kind always holds)."""
        return Path(folder).is_dir() and all((Path(folder) / name).exists() for name in self.required)

    def __call__(self, folder: str | os.PathLike) -> bool:
        return (self.looks_like(folder) and not self.foreign(folder)
                and (self.check is None or bool(self.check(Path(folder)))))


def _related(a: Path, b: Path) -> bool:
    """True when a and b are the same path or one contains the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_writable_parent(target: Path, what: str) -> None:
    """The nearest existing folder above `target` must be a folder that takes new entries (checked by making and
    removing an empty temporary folder there: the new output is built beside `target`, even when it replaces
    one), so a bad path is refused before hours of work, not after."""
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {target} lies below {parent}, which is a file, not a folder; choose another path")
    try:  # also when target exists: the new folder is built beside it, in the same parent
        os.rmdir(tempfile.mkdtemp(prefix=".rankdial-probe-", dir=parent))
    except OSError as err:
        raise OutputError(f"{what} {target} cannot be created: {parent} does not take new folders "
                          f"({err.strerror or err}); choose another path") from None


def check_target(target: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
                 legacy: OwnFiles | None = None, what: str = "output folder") -> Path:
    """Raise OutputError unless `target` may receive a new output of `kind`; returns it as a Path.

    Allowed: a path that does not exist, an empty folder, a folder whose marker names `kind` and that holds
    nothing the marker does not list, or an unmarked folder that `legacy` (OwnFiles) recognises as one
    rankdial wrote before markers. Refused: a file, any other folder, and any path that is, holds or lies
    inside one of `inputs`.
    """
    if not str(target).strip():
        raise OutputError(f"{what} is empty; give the path of a folder to write")
    target = Path(target)
    if target.is_symlink():
        raise OutputError(f"{what} {target} is a symbolic link (to {os.readlink(target)}); rankdial replaces a folder "
                          "by renaming it, which would move the link, not what it points to. Give the real path")
    _check_writable_parent(target, what)
    for source in inputs:
        if source is not None and Path(source).exists() and _related(target, Path(source)):
            raise OutputError(f"{what} {target} is (or contains, or lies inside) {source}, an input of this "
                              "command; writing there would destroy it. Choose a new path")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {target} exists and is a file, not a folder; choose another path")
    if target.is_dir() and any(target.iterdir()):
        found = read_marker(target)
        older = found is None and legacy is not None and legacy.looks_like(target)  # written before markers?
        added = _added_since(target) if found == kind else legacy.foreign(target) if older else []
        if added:
            raise OutputError(f"{what} {target} holds {added[:5]}, which rankdial did not write there; replacing the "
                              "folder would delete them. Move them out, or choose a new path")
        if found != kind and not (older and legacy(target)):
            said = f"rankdial wrote it as a {found!r}" if found else "rankdial did not write it"
            raise OutputError(f"{what} {target} is not empty and {said}; rankdial replaces only a {kind!r} folder "
                              "it wrote itself. Choose a new path, or empty or remove the folder yourself")
    return target


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"  # no "-": it ends the PID@HOST field


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_stale(target: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
    """Remove the temporary folders that a killed rankdial process left beside `target` (SIGKILL, power loss:
    no `finally` ran). Only rankdial's own pattern `.NAME.tmp-PID@HOST-*` counts, and only when HOST is this machine
    (a shared filesystem may hold another machine's live writer) and process PID is gone;
    a temporary folder of a live process, and every `.NAME.old-*` (which may hold the only good copy after a
    crash between two renames), are left alone. Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    prefix = f".{target.name}.tmp-"
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        pid, _, host = p.name[len(prefix):].split("-", 1)[0].partition("@")
        if any(_related(p, Path(source)) for source in inputs if source is not None and Path(source).exists()):
            continue  # a command may read a killed run's leftovers as its input: never delete what it reads
        if host == _HOST and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def swap_in(folder: str | os.PathLike, target: str | os.PathLike, kind: str,
            inputs: Iterable[str | os.PathLike | None] = (), legacy: OwnFiles | None = None,
            what: str = "output folder") -> Path:
    """Make `folder` (built beside `target`, on the same filesystem) the new `target`, whole: its marker written
    (listing its files), flushed, `target` checked again (check_target), then swapped in (renameat2 exchange, else
    two renames). The replaced folder is removed. If anything fails, `target` is as it was and `folder` is left
    where it is, so the work in it is never lost here."""
    folder, target = Path(folder), Path(target)
    files = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    (folder / MARKER).write_text(json.dumps({"kind": kind, "written_by": "rankdial", "files": files}) + "\n")
    _plain_modes(folder)
    fsync_tree(folder)
    check_target(target, kind, inputs, legacy, what)  # the world may have changed while we wrote
    if not target.exists():
        os.rename(folder, target)
    elif _exchange(folder, target):
        shutil.rmtree(folder)  # folder now holds the old target
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(folder, target)
        except BaseException:
            os.rename(old, target)  # put the good folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
               legacy: OwnFiles | None = None, what: str = "output folder"):
    """Yield a fresh folder beside `target`; when the block ends without error it replaces `target` whole.

    `target` is checked first (check_target). The marker is written into the new folder. On any exception
    (Ctrl-C included) the temporary folder is removed and `target` is left exactly as it was; the ones a
    killed process could not remove are swept by the next write to the same target (sweep_stale).
    """
    inputs = list(inputs)
    target = check_target(target, kind, inputs, legacy, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}@{_HOST}-", dir=target.parent))
    try:
        yield tmp
        swap_in(tmp, target, kind, inputs, legacy, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
