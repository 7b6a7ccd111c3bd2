"""The adapter registry: which LoRA adapters a served model holds, loaded on first use, evicted by memory.

An adapter is a PEFT folder; under the registry's root its name is its folder's name. Loading runs in two
halves so that a load never stalls requests for other adapters:

    read    (any thread, no lock): resolve the path safely, read adapter_config.json and the safetensors file,
            check the file on its own (check_adapter_tensors). Pickle files are never read.
    attach  (under `lock`, which the engine holds while it runs a step): check the targets and shapes against
            the base, evict least-recently-used adapters until the new one fits the budget, and copy each
            layer's A and B straight into that layer's routed stacks (serve.batched_lora.AdapterStacks, one
            stack per rank): the stacks are the adapters' one copy, no module is built per adapter.

The cache is an LRU bounded by a budget in BYTES on everything the stacks hold (free slots of a stack grown ahead
included; under pressure free slots are given back before anything is evicted), with pinning;
an adapter in use by a running request (acquire/release) is never evicted. Counters: hits, misses, evictions.
An adapter that does not fit the base is refused with the reason and the others keep serving.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..adapters import read_adapter_config, read_adapter_weights
from ..adapters.io import check_tensor_shapes, check_adapter_tensors, check_servable, expected_shapes, path_kind
from ..adapters.peft_format import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, lora_key
from ..config import LoraConfig, is_positive_int, lora_scaling
from ..errors import AdapterError, AdapterFileError, AdapterInUse, NameTaken, RankdialError, one_line, shorten
from ..lora import LoraLayer
from ..lora.inject import Plan, plan_targets, with_task_heads
from .admission import AdapterWaits, BudgetFull
from .stacks import AdapterStacks

log = logging.getLogger("rankdial.serve")

DEFAULT_BUDGET_BYTES = 1 << 30  # 1 GiB of adapter weights: hundreds of rank-16 adapters on a 7B model
# A plain folder name, the one rule for an adapter's name (the API's schemas use it too): no '.', '/', '\\', spaces
# or leading '_' / '-', so a name never walks out of the adapters folder nor names a hidden or private folder.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
_MAX_PLANS = 64  # distinct adapter configs whose target plans are cached (each is small; the bound keeps it so)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int  # the largest rank over its layers
    bytes: int  # its LoRA weights as held in the model (0 until loaded: then the file's size is the estimate)
    loaded: bool
    pinned: bool


@dataclass
class _Read:
    """The first half of a load: what came off the disk, checked on its own."""

    name: str
    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    signature: tuple = ()  # the folder's files before they were read (a failure is remembered against it)


def check_adapter_folder_name(name) -> str:
    """`name` if it is a plain folder name usable as an adapter name, else AdapterError saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(f"adapter name must be a plain folder name (letters, digits, '_' and '-', at most 128, "
                           f"starting with a letter or digit; no '.', '/' or spaces), got {str(name)[:140]!r}; "
                           "e.g. 'sql-v2'")
    return name


def _on_disk(name: str, path: Path, pinned: bool) -> AdapterInfo:
    """The AdapterInfo of an adapter that is not loaded: its config's rank and its weights file's size."""
    rank = 0
    try:
        rank = read_adapter_config(path).r
    except Exception:  # noqa: BLE001 - a broken config: rank unknown (failure() says why)
        pass
    size = (path / WEIGHTS_NAME).stat().st_size if (path / WEIGHTS_NAME).is_file() else 0
    return AdapterInfo(name, str(path), rank, size, False, pinned)


def _listing(names: list[str], most: int = 20) -> str:
    """The adapters' names for an error message: at most `most` of them (an error stays one short line)."""
    if not names:
        return "none"
    return str(names[:most])[:-1] + f", ... {len(names) - most} more]" if len(names) > most else str(names)


def _content_error(err: BaseException) -> bool:
    """Whether a failed read says something about the files themselves (remembered until they change), not a
    transient failure of the machine (OSError, MemoryError: the next request reads again)."""
    if isinstance(err, (OSError, MemoryError)) or isinstance(err.__cause__, (OSError, MemoryError)):
        return False  # (adapters.io says why a file could not be opened or read, with the OSError as its cause)
    return isinstance(err, (RankdialError, ValueError)) or type(err).__name__ == "SafetensorError"


def _log_read_failure(name: str, folder: Path, err: BaseException) -> str:
    """Why a folder failed to read, in one line (logged as a warning): rankdial's own message, or what the reading
    library raised (a corrupt safetensors file, a config that is not a JSON object...)."""
    message = one_line(err) if isinstance(err, RankdialError) else (
        f"adapter {name!r} cannot be read from {folder}: {type(err).__name__}: {one_line(err)[:300]}")
    log.warning("adapter %r: %s", name, message)
    return message


def _signature(folder: Path) -> tuple:
    """What changes when a folder's files change (names, sizes, modification times), for remembered failures."""
    try:
        return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in folder.iterdir() for st in [p.stat()]))
    except OSError:
        return ()


class AdapterRegistry:
    """Adapters of one served model: known (folders under root, or loaded by path) and loaded (in the model).

    Args:
        model: the base model (with or without LoRA layers yet); adapters are injected into it.
        root: the folder whose sub-folders are the adapters (None: only adapters loaded by path).
        budget_bytes: the most bytes the adapters' stacks hold in the model at once (default 1 GiB).
    """

    def __init__(self, model: nn.Module, root: str | Path | None = None, *, budget_bytes: int | None = None):
        if budget_bytes is not None and not is_positive_int(budget_bytes):
            raise AdapterError(f"budget_bytes must be a positive integer (bytes), got {budget_bytes!r}; e.g. {1 << 28}")
        if root is not None and not Path(root).is_dir():
            raise AdapterFileError(f"adapters folder {root} does not exist or is not a folder; create it or pass "
                                   "the folder that holds one sub-folder per adapter")
        self.model = model
        self.root = Path(root).resolve() if root is not None else None
        self.budget_bytes = budget_bytes or DEFAULT_BUDGET_BYTES
        self.lock = threading.RLock()  # held by the engine during a step and here while the model changes
        self.hits = self.misses = self.evictions = 0
        self.freed = 0  # counts releases that left an adapter unused (the engine retries a full budget on a change)
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._paths: dict[str, Path] = {}  # adapters loaded by an explicit path
        self._folders: dict[str, Path] = {}  # loaded adapter -> the folder its weights were read from (resolved)
        self._pinned: set[str] = set()
        self._in_use: dict[str, int] = {}
        self._pending: dict[str, Future] = {}  # loads in progress (a done-callback removes each when it ends)
        self._held_reads: dict[str, _Read] = {}  # reads whose attach found the budget full, kept for the retry
        self._plans: dict[str, Plan] = {}
        self._ranks: dict[str, int] = {}  # loaded adapter -> its largest rank (info() without walking the model)
        self._stacks: dict[str, AdapterStacks] = {}  # layer path -> its routed stacks: the adapters' one storage
        self._where: dict[str, list[str]] = {}  # loaded adapter -> the layer paths holding it
        self._parents: dict[str, tuple[nn.Module, str]] = {}  # layer path -> (its parent, its attribute there)
        self._spare: dict[str, LoraLayer] = {}  # path -> the bare wrapper taken out when its last adapter left
        self._failed: dict[str, tuple[tuple, str]] = {}  # folder under root -> (its files' signature, why it failed)
        self._loaded_from: dict[str, tuple] = {}  # loaded folder under root -> its files' signature when read
        self._checked: dict[str, float] = {}  # loaded folder under root -> when its files were last compared
        self._repin: set[str] = set()  # pinned adapters dropped because their files changed: pinned when reloaded
        self.recheck_s = 1.0  # how often a loaded folder's files are compared with those it was loaded from
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankdial-adapter-read")
        self._waits = AdapterWaits(self)  # requests parked while their adapter loads (admit)

    # -- what is known -------------------------------------------------------------------------------
    @property
    def loaded_bytes(self) -> int:
        """Every byte the adapters' stacks hold (free slots included): what the budget bounds."""
        return sum(stacks.nbytes for stacks in self._stacks.values())

    def loaded(self) -> list[str]:
        """The adapters held in the model, least recently used first."""
        return list(self._loaded)

    def names(self) -> list[str]:
        """Every adapter a request may name: the adapter folders under root, plus those loaded by path."""
        found = set(self._paths) | set(self._loaded)
        if self.root is not None:
            found |= {p.name for p in self.root.iterdir() if _NAME.fullmatch(p.name) and (p / CONFIG_NAME).is_file()}
        return sorted(found)

    def exists(self, name: str) -> bool:
        return name in self._loaded or name in self._paths or (
            isinstance(name, str) and bool(_NAME.fullmatch(name)) and self.root is not None
            and (self.root / name / CONFIG_NAME).is_file())

    def check_known(self, name) -> str:
        """`name` if a request may use it, else AdapterError listing the adapters that exist."""
        if not self.exists(name):
            raise AdapterError(f"unknown adapter {name!r}; the adapters are {_listing(self.names())}")
        return name

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def info(self, name: str) -> AdapterInfo:
        self.check_known(name)
        with self.lock:  # an eviction on the reader thread must not fall between these reads
            path = self._path_of(name, self._paths)
            loaded = name in self._loaded
            if loaded:
                return AdapterInfo(name, str(path), self._ranks[name], self._loaded[name], True, name in self._pinned)
            pinned = name in self._pinned
        return _on_disk(name, path, pinned)

    def listing(self) -> list[tuple[AdapterInfo, str | None]]:
        """(AdapterInfo, remembered failure or None) of every adapter, sorted by name, from one snapshot taken under
        `lock` once (the engine holds it during a step, so a listing waits for one step at most, however many
        adapters there are); what an adapter that is not loaded holds is read from its folder outside the lock."""
        names = self.names()
        with self.lock:
            loaded = {n: (self._ranks[n], size) for n, size in self._loaded.items()}
            pinned, paths, failed = set(self._pinned), dict(self._paths), dict(self._failed)
        out = []
        for name in names:
            path = self._path_of(name, paths)
            if name in loaded:
                info = AdapterInfo(name, str(path), *loaded[name], True, name in pinned)
            else:
                info = _on_disk(name, path, name in pinned)
            seen = failed.get(name)
            changed = seen is None or self.root is None or _signature(self.root / name) != seen[0]
            out.append((info, None if changed else seen[1]))
        return out

    def _path_of(self, name: str, paths: dict) -> Path:
        return paths.get(name) or (self.root / name if self.root is not None else Path(name))

    # -- loading ---------------------------------------------------------------------------------------
    def resolve(self, name: str, path: str | Path | None = None, allow_any_path: bool = False) -> Path:
        """The folder to load `name` from, refusing anything that resolves outside root unless allowed."""
        check_adapter_folder_name(name)
        try:
            return self._resolve(name, path, allow_any_path)
        except RankdialError:  # its own refusals (AdapterFileError is a ValueError too)
            raise
        except (OSError, ValueError, RuntimeError) as err:  # a path the file system refuses (too long, a NUL
            # byte) or ~user/ of no user (expanduser's RuntimeError)
            log.warning("adapter path %r for %r cannot be resolved: %s", str(path), name, err)
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "not a valid path"
            raise AdapterFileError(f"adapter path {shorten(str(path if path is not None else name))} cannot be "
                                   f"read ({reason}); give the adapter's folder") from None

    def _resolve(self, name: str, path: str | Path | None, allow_any_path: bool) -> Path:
        given = path if path is not None else name  # what the client named, as its errors echo it
        if path is None:
            if name in self._paths:
                return self._paths[name]
            if self.root is None:
                raise AdapterError(f"unknown adapter {name!r}: this server has no adapters folder; load it by path")
            path = self.root / name
        folder = Path(path).expanduser()
        if not folder.is_absolute() and self.root is not None:  # relative to the adapters folder, with or without
            folder = self.root / folder                          # the admin's permission (never the server's cwd)
        if not allow_any_path:
            if self.root is None:
                raise AdapterError(f"loading adapter {name!r} by path is not allowed here (no adapters folder, and "
                                   "loading by path needs the admin permission)")
            target = folder.resolve()
            if not target.is_relative_to(self.root):
                log.warning("adapter path %r resolves to %s, outside the adapters folder %s", str(path), target,
                            self.root)
                raise AdapterFileError(f"adapter path {shorten(given)} resolves outside the adapters folder (../, an "
                                       "absolute path or a symlink out); only folders inside it may be loaded")
            folder = target
            for file in (CONFIG_NAME, WEIGHTS_NAME):  # a file linked out of the folder is refused as a folder is
                if (folder / file).is_symlink() and not (folder / file).resolve().is_relative_to(self.root):
                    log.warning("adapter %r: %s links outside the adapters folder", name, folder / file)
                    raise AdapterFileError(f"adapter {shorten(given)}: its {file} links outside the adapters "
                                           "folder; only files inside it are read (copy the file in)")
        folder = folder.resolve()
        if not folder.is_dir():
            raise AdapterFileError(f"adapter {name!r}: {self.public(str(folder), path)} is not a folder; "
                                   f"the adapters are {_listing(self.names())}")
        return folder

    def public(self, text: str, given: str | Path | None = None) -> str:
        """`text` as a client may read it: the adapters folder's absolute path written `<adapters>` (so a folder
        in it reads `<adapters>/name`), and a folder loaded by path as the path the client gave. The server's log
        keeps the absolute paths."""
        if given is not None:
            folder = Path(given).expanduser()
            folder = (folder if folder.is_absolute() or self.root is None else self.root / folder).resolve()
            if self.root is None or not folder.is_relative_to(self.root):
                text = text.replace(str(folder), str(given))
        return text.replace(str(self.root), "<adapters>") if self.root is not None else text

    def read(self, name: str, path: str | Path | None = None, allow_any_path: bool = False) -> _Read:
        """The first half of a load (no lock, any thread): files read and checked on their own.

        A folder that cannot be read is an AdapterFileError whose one-line message says why (whatever the reading
        library raised: a corrupt safetensors file, a config that is not a JSON object, NaN weights...). The
        failure of a folder under root is remembered until its files change (failure()), so a broken folder is
        refused at once each time it is asked for, and /v1/models can say why."""
        folder = self.resolve(name, path, allow_any_path)
        remembered = self.failure(name) if path is None else None
        if remembered is not None:
            raise AdapterFileError(remembered)
        # the signature is taken BEFORE the read: files that change during a failed read are not remembered
        signature = _signature(self.root / name) if self.root is not None and path is None else ()
        try:
            read = self._read_folder(name, folder)
        except (AdapterFileError, Exception) as err:  # noqa: BLE001 - every failure of a file becomes its reason
            message = self.public(_log_read_failure(name, folder, err), path or self._paths.get(name))
            if path is None and name not in self._paths and _content_error(err):
                self._remember_failure(name, folder, message, signature)
            raise AdapterFileError(message) from None
        read.signature = signature
        return read

    def check_folders(self) -> list[str]:
        """A cheap look at every folder under root, for start-up: its files, its config and its safetensors header
        (no tensor is read). Failures are remembered as a failed load's are (GET /v1/models shows why before anyone
        asks for it; a request is refused at once); returns the names that failed."""
        failed = []
        for name in self.names():
            if name in self._paths or self.root is None:
                continue
            folder, signature = self.root / name, _signature(self.root / name)
            try:
                checked = self.resolve(name)  # the path rules of a load (a link out of root is refused)
                self._check_folder(name, checked)
                with safe_open(str(checked / WEIGHTS_NAME), "pt") as f:  # the header only: a corrupt file fails here
                    list(f.keys())
            except Exception as err:  # noqa: BLE001 - as read(): every failure of a file becomes its reason
                if not _content_error(err):
                    continue
                self._remember_failure(name, folder, self.public(_log_read_failure(name, folder, err)), signature)
                failed.append(name)
        return failed

    def _check_folder(self, name: str, folder: Path) -> LoraConfig:
        """The folder's files and its config, before its tensors are read (AdapterFileError, one line)."""
        if not (folder / WEIGHTS_NAME).is_file() and (folder / PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterFileError(f"adapter {name!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which a server "
                                   f"never loads; convert it with `rankdial convert-bin {folder}`")
        if not (folder / CONFIG_NAME).is_file():
            raise AdapterFileError(f"adapter {name!r}: the folder holds no {CONFIG_NAME}; a PEFT adapter folder holds "
                                   f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        if not (folder / WEIGHTS_NAME).is_file():
            if (folder / WEIGHTS_NAME).exists() or (folder / WEIGHTS_NAME).is_symlink():
                raise AdapterFileError(f"adapter {name!r}: its {WEIGHTS_NAME} is not a regular file "
                                       f"({path_kind(folder / WEIGHTS_NAME)}); put the saved weights file there")
            raise AdapterFileError(f"adapter {name!r}: the folder holds no {WEIGHTS_NAME}; save the adapter with "
                                   "rankdial.save_adapter (or PEFT's save_pretrained) into it")
        config = read_adapter_config(folder)
        check_servable(config, name)
        if config.modules_to_save:
            raise AdapterFileError(f"adapter {name!r} replaces whole modules ({config.modules_to_save}, "
                                   "modules_to_save), which cannot differ per request in a shared batch; merge it "
                                   "into its own model folder to serve it")
        return config

    def _read_folder(self, name: str, folder: Path) -> _Read:
        # checked first so that an error never lists a folder's contents (the caller may have named any folder)
        config = self._check_folder(name, folder)
        tensors = read_adapter_weights(folder, allow_pickle=False)
        check_adapter_tensors(config, tensors, f"{name!r} ({folder})")
        return _Read(name, folder, config, tensors)

    def failure(self, name: str) -> str | None:
        """Why folder `name` under root failed to load, while its files are unchanged; else None."""
        with self.lock:
            seen = self._failed.get(name)
        if seen is None or self.root is None:
            return None
        if _signature(self.root / name) != seen[0]:
            with self.lock:
                self._failed.pop(name, None)
            return None
        return seen[1]

    def _remember_failure(self, name: str, folder: Path, message: str, signature: tuple) -> None:
        if self.root is None or not folder.is_relative_to(self.root) or not signature:
            return
        with self.lock:
            self._failed[name] = (signature, message)

    def attach(self, read: _Read, *, pin: bool = False, by_path: bool = False) -> AdapterInfo:
        """The second half (takes `lock`): check against the base, make room, inject and copy the weights."""
        name = read.name
        with self.lock:
            if name in self._loaded:  # loaded meanwhile (two requests for the same new adapter)
                if self._folders.get(name) != read.path:  # ...from another folder: never rebind a name to other
                    raise NameTaken(f"adapter {name!r} was loaded from another folder meanwhile; unload it first "
                                    "or choose another name")  # weights (the same folder by name or path is fine)
                self._loaded.move_to_end(name)
                self._pinned |= {name} if pin else set()
                return self.info(name)
            try:
                config = with_task_heads(self.model, read.config)
                if config.target_parameters:  # lora/param.py's expert updates have no batched serving path
                    raise AdapterFileError(f"it adapts MoE expert parameters (target_parameters="
                                           f"{config.target_parameters}), which the engine does not serve; merge it "
                                           "into the base (rankdial merge) and serve the merged model")
                plan = self._plan(config)
                check_tensor_shapes(read.tensors, expected_shapes(self.model, plan), str(read.path / WEIGHTS_NAME))
            except RankdialError as err:
                log.warning("adapter %r refused: %s", name, one_line(err))
                message = self.public(f"adapter {name!r} refused: {one_line(err)}", read.path if by_path else None)
                if not by_path:
                    self._remember_failure(name, read.path, message, read.signature)
                raise AdapterFileError(message) from None
            minimal = self._make_room(name, plan)
            self._loaded[name] = self._store(name, config, plan, read.tensors, minimal)
            self._folders[name] = read.path
            self._ranks[name] = max((t.r for t in plan.targets), default=0)
            if read.signature:
                self._loaded_from[name], self._checked[name] = read.signature, time.monotonic()
            if by_path:
                self._paths[name] = read.path
            if pin or name in self._repin:
                self._repin.discard(name)
                self._pinned.add(name)
            return self.info(name)

    def load(self, name: str, path: str | Path | None = None, *, pin: bool = False,
             allow_any_path: bool = False) -> AdapterInfo:
        """Load adapter `name` now (from root/name, or `path`), or mark it used if it is loaded; its AdapterInfo.

        Refuses with AdapterError / AdapterFileError (one line, the reason): a name that is not a plain folder
        name, a path resolving outside root (unless allow_any_path: the admin's load by path), a pickle-only
        folder, a broken file, targets or shapes that do not fit the base, a budget held by pinned adapters.
        """
        check_adapter_folder_name(name)
        with self.lock:
            if name in self._loaded and path is None and not self._drop_if_changed(name):
                self.hits += 1
                self._loaded.move_to_end(name)
                if pin:
                    self._pinned.add(name)
                return self.info(name)
            if name in self._loaded:
                raise NameTaken(f"adapter {name!r} is already loaded; unload it first to load another folder "
                                   "under this name")
            self.misses += 1
        return self.attach(self.read(name, path, allow_any_path), pin=pin, by_path=path is not None)

    def admit(self, arrivals, *, running: bool, ready: list, failed: list) -> None:
        """The engine's one call per step: acquire the arrivals' adapters (loading on the reader thread those that
        are not loaded, their requests parked meanwhile); appends to ready and failed (see serve.admission)."""
        self._waits.admit(arrivals, running, ready, failed)

    @property
    def budget_wait_s(self) -> float:
        """How long a request waits for room in a full adapter budget before it fails (BudgetFull)."""
        return self._waits.budget_wait_s

    @budget_wait_s.setter
    def budget_wait_s(self, seconds: float) -> None:
        self._waits.budget_wait_s = seconds

    @property
    def parked_count(self) -> int:
        """Requests parked while their adapter loads (a counter: safe to read from other threads)."""
        return self._waits.parked_count

    @property
    def loading(self) -> int:
        """Adapter loads in progress."""
        return self._waits.loading

    def admission_busy(self) -> bool:
        """Loads in progress or budget retries pending: admit() should be called again soon."""
        return self._waits.busy()

    def parked_adapters(self) -> set[str]:
        """The adapters requests are parked for (safe from other threads)."""
        return self._waits.adapters()

    def load_async(self, name: str) -> Future:
        """Start loading `name` on the reader thread (the engine's first use); the Future gives its AdapterInfo.

        The read happens off the caller's thread; the attach takes `lock`, so it waits for the step in progress.
        """
        with self.lock:
            if name in self._loaded:
                self.hits += 1
                self._loaded.move_to_end(name)
                done: Future = Future()
                done.set_result(self.info(name))
                return done
            if name in self._pending and not self._pending[name].done():  # a finished one may not be forgotten yet
                return self._pending[name]
            retry = name in self._held_reads
            self.misses += not retry
            future = self._reader.submit(self._read_and_attach, name)
            self._pending[name] = future
        future.add_done_callback(lambda f: self._forget_pending(name, f))
        return future

    def _read_and_attach(self, name: str) -> AdapterInfo:
        """The reader thread's load: read the files (or take the read a full budget left behind) and attach.
        On BudgetFull the read is kept for the retry (load_async again), so a retry does not read the files again."""
        with self.lock:
            read = self._held_reads.pop(name, None)
        read = read or self.read(name)
        try:
            return self.attach(read)
        except BudgetFull as err:
            with self.lock:
                self._held_reads[name] = read
            raise BudgetFull(str(err)) from None  # a fresh exception: its traceback holds no tensors

    def _forget_pending(self, name: str, future: Future) -> None:
        with self.lock:
            if self._pending.get(name) is future:
                del self._pending[name]

    def drop_held_read(self, name: str) -> None:
        """Forget the read a full budget left behind for `name` (its waiter gave up)."""
        with self.lock:
            self._held_reads.pop(name, None)

    def unload(self, name: str) -> bool:
        """Remove adapter `name` from the model (and forget the path of one loaded by path); True if it was loaded,
        False if it was known but not loaded (nothing to free). AdapterError if unknown, AdapterInUse if running
        requests use it."""
        with self.lock:
            if name not in self._loaded:
                self.check_known(name)
                self._paths.pop(name, None)
                return False
            if self._in_use.get(name):
                raise AdapterInUse(f"adapter {name!r} is in use by {self._in_use[name]} running request(s); "
                                   "unload it when they finish")
            self._evict(name)
            self._paths.pop(name, None)
            self._repin.discard(name)
            return True

    # -- pinning and use -------------------------------------------------------------------------------
    def pin(self, name: str) -> None:
        """Keep `name` loaded whatever the LRU says (loading it now if needed)."""
        self.load(name, pin=True)

    def unpin(self, name: str) -> None:
        self.check_known(name)
        self._pinned.discard(name)
        self._repin.discard(name)

    def acquire(self, name: str | None) -> None:
        """A running request uses `name`: never evicted until release()."""
        if name is not None:
            with self.lock:
                self._in_use[name] = self._in_use.get(name, 0) + 1
                if name in self._loaded:
                    self._loaded.move_to_end(name)

    def try_acquire(self, name: str, hit: bool = False) -> bool:
        """acquire(name) if it is loaded, in one step under the lock (so no load on the reader thread can evict it
        in between); False if it is not loaded. `hit`: count a cache hit (a request found its adapter loaded)."""
        with self.lock:
            if name not in self._loaded or (hit and self._drop_if_changed(name)):
                return False
            self._in_use[name] = self._in_use.get(name, 0) + 1
            self._loaded.move_to_end(name)
            self.hits += hit
            return True

    def release(self, name: str | None) -> None:
        if name is not None:
            with self.lock:
                left = self._in_use.get(name, 0) - 1
                if left > 0:
                    self._in_use[name] = left
                else:
                    self._in_use.pop(name, None)
                    self.freed += 1  # an adapter nobody uses any more: evictable, so a full budget may have room

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    # -- internals -------------------------------------------------------------------------------------
    def _own_bytes(self, plan: Plan) -> int:
        """The bytes of an adapter's own slots (its A and B, float32 as the stacks hold them)."""
        return sum(t.r * (t.d_in + t.d_out) for t in plan.targets) * 4

    def _need(self, plan: Plan, minimal: bool = False) -> int:
        """The bytes storing this plan's adapter would allocate (stack growth; 0 where free slots take it)."""
        need = 0
        for t in plan.targets:
            stacks = self._stacks.get(t.path)
            need += (t.r * (t.d_in + t.d_out) * 4 if stacks is None else stacks.growth_bytes(t.r, minimal))
        return need

    def _make_room(self, name: str, plan: Plan) -> bool:
        """Evict least-recently-used adapters (and give back free slots) until storing the adapter keeps every byte
        the stacks hold within the budget; whether it must grow stacks by one slot only (the budget's edge)."""
        size = self._own_bytes(plan)
        if size > self.budget_bytes:
            raise AdapterFileError(f"adapter {name!r} needs {size} bytes, more than the whole adapter budget "
                                   f"({self.budget_bytes} bytes); raise the budget (rankdial serve --budget-mb, "
                                   "or budget_bytes)")
        while True:
            if self.loaded_bytes + self._need(plan) <= self.budget_bytes:
                return False
            if self.loaded_bytes + self._need(plan, minimal=True) <= self.budget_bytes:
                return True
            if any(st.slack for st in self._stacks.values()):
                for stacks in self._stacks.values():
                    stacks.trim()
                continue
            victim = next((n for n in self._loaded if n not in self._pinned and not self._in_use.get(n)), None)
            if victim is None:
                raise BudgetFull(f"adapter {name!r} ({size} bytes) does not fit the adapter budget "
                                 f"({self.budget_bytes} bytes): {self.loaded_bytes} bytes are held by pinned adapters "
                                 f"or adapters in use; unpin some, unload some or raise the budget (--budget-mb)")
            self._evict(victim)
            self.evictions += 1

    def _evict(self, name: str) -> None:
        for path in self._where.pop(name, ()):
            stacks = self._stacks[path]
            stacks.remove(name)
            if not stacks.where:
                self._unwrap(path)
        del self._loaded[name]
        self._folders.pop(name, None)
        self._ranks.pop(name, None)
        self._pinned.discard(name)
        self._loaded_from.pop(name, None)
        self._checked.pop(name, None)

    def _drop_if_changed(self, name: str) -> bool:
        """Unload adapter `name` (under `lock`) if its folder's files changed since it was loaded and no running
        request uses it, so that the next load reads the new files; True if it did. Compared at most every
        recheck_s seconds (a few stat calls); while requests use it, they finish on the weights they started with."""
        seen = self._loaded_from.get(name)
        now = time.monotonic()
        if seen is None or self._in_use.get(name) or now - self._checked.get(name, 0.0) < self.recheck_s:
            return False
        self._checked[name] = now
        if _signature(self.root / name) == seen:
            return False
        log.info("adapter %r: its files changed since it was loaded; reading them again", name)
        if name in self._pinned:
            self._repin.add(name)
        self._evict(name)
        return True

    def _unwrap(self, path: str) -> None:
        """A layer whose stacks are empty: give the stacks' memory back, and the base its place if nothing else
        wraps it (adapters the layer holds itself keep the wrapper). The bare wrapper is kept aside for the next
        adapter there (building one costs more than the copy of a small adapter's tensors)."""
        layer = self._layer(path)
        layer.routing = None
        del self._stacks[path]
        if layer.lora_A:
            layer.stacks = None
        else:
            parent, attr = self._parents[path]
            parent._modules[attr] = layer.base_layer  # what setattr does for a child module, without its checks
            self._spare[path] = layer  # its empty stacks hold no tensor (a rank's last adapter frees its stack)

    def _layer(self, path: str) -> nn.Module:
        """The module at `path`, its parent found once (get_submodule walks the path at every call)."""
        if path not in self._parents:
            parent, _, attr = path.rpartition(".")
            self._parents[path] = (self.model.get_submodule(parent), attr)
        parent, attr = self._parents[path]
        return parent._modules[attr]

    def _plan(self, config: LoraConfig) -> Plan:
        """plan_targets, cached by config: the plan depends only on the base's structure (wrappers are seen
        through) and the config, and computing it walks the whole model, which grows with every adapter loaded."""
        key = repr(config)
        if key not in self._plans:
            if len(self._plans) >= _MAX_PLANS:
                del self._plans[next(iter(self._plans))]  # the oldest
            self._plans[key] = plan_targets(self.model, config)
        return self._plans[key]

    def _store(self, name: str, config: LoraConfig, plan: Plan, tensors: dict[str, torch.Tensor], minimal: bool) -> int:
        """Write the adapter's tensors straight into the target layers' routed stacks (wrapping a layer on its
        first adapter); nothing else is built or kept. All or nothing: a failure takes out what was written.
        minimal: grow a full stack by one slot only (the budget's edge, _make_room). Returns the adapter's own bytes."""
        self._where[name] = paths = []
        try:
            for t in plan.targets:
                stacks = self._stacks.get(t.path) or self._wrap(t.path)
                paths.append(t.path)
                stacks.add(name, tensors[lora_key(t.path, "A")], tensors[lora_key(t.path, "B")],
                           lora_scaling(t.r, t.alpha, config.use_rslora), minimal)
        except BaseException:
            for path in paths:
                if name in self._stacks[path].where:
                    self._stacks[path].remove(name)
                if not self._stacks[path].where:
                    self._unwrap(path)
            del self._where[name]
            raise
        return self._own_bytes(plan)

    def _wrap(self, path: str) -> AdapterStacks:
        """The layer at `path` as a LoraLayer (wrapped, base frozen, if it is not one) with empty serving stacks."""
        layer = self._layer(path)
        if not isinstance(layer, LoraLayer):
            spare = self._spare.pop(path, None)
            if spare is None or spare.base_layer is not layer:
                layer.requires_grad_(False)
                spare = LoraLayer(layer)
                spare.stacks = AdapterStacks.for_layer(spare)
            parent, attr = self._parents[path]
            parent._modules[attr] = spare
            layer = spare
        elif layer.stacks is None:
            layer.stacks = AdapterStacks.for_layer(layer)
        self._stacks[path] = layer.stacks
        return layer.stacks
