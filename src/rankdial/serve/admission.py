"""Requests waiting for their adapter: the registry's side of admission (AdapterRegistry.admit).

A request whose adapter is loaded is acquired at once (never evicted while it runs). One whose adapter is not is
parked, and its adapter is loaded on the registry's reader thread: one load per adapter however many requests
wait for it. When the load ends, its requests are acquired (or parked again if another load evicted it before
they could hold it) or handed back with the reason it failed. A load that found the adapter budget full (held by
pinned adapters and adapters in use) is retried, reusing the files already read, each time a running request
releases an adapter (registry.freed moves), at least every BUDGET_RETRY_S, and once more when nothing runs;
its requests fail with BudgetFull after budget_wait_s.

All of it runs on the engine's thread (admit() once per step); the counters are read from other threads.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

from ..errors import AdapterError, RankdialError, Unavailable
from .request import PARKED

log = logging.getLogger("rankdial.serve")

BUDGET_RETRY_S = 0.1  # a load that found the budget full is retried when a release frees room, or this often


class BudgetFull(AdapterError, Unavailable):
    """The budget is held by pinned adapters and adapters in use: the load may succeed once requests finish."""


class AdapterWaits:
    """The parked requests, the loads in progress and the budget retries of one registry (see the module)."""

    def __init__(self, registry, budget_wait_s: float = 30.0):
        self.registry = registry
        self.budget_wait_s = budget_wait_s  # how long a request waits for room in a full adapter budget
        self._parked: dict[str, list] = {}  # adapter being loaded -> its requests
        self.parked_count = 0  # len of all of _parked, for counters read from other threads
        self._loads: dict[str, Future] = {}  # adapter -> Future of its load
        self._budget_wait: dict[str, list] = {}  # adapter -> [when its wait for budget room ends, tried when idle]
        self._budget_retry: dict[str, tuple] = {}  # adapter -> (registry.freed when it failed, when to retry anyway)

    @property
    def loading(self) -> int:
        return len(self._loads)

    def busy(self) -> bool:
        """Loads in progress or retries due: the engine's thread should look again soon."""
        return bool(self._loads or self._budget_retry)

    def adapters(self) -> set[str]:
        """The adapters requests are parked for (a C-level copy of the keys: safe from other threads)."""
        return set(self._parked)

    def admit(self, arrivals, running: bool, ready: list, failed: list) -> None:
        """Take the requests that arrived (serve.request.Request), and look at the loads that ended. Appends to
        `ready` the requests whose adapter is now acquired (or None), in arrival order, and to `failed` (request,
        error) for the parked ones whose adapter cannot be loaded: the caller's lists, so that what was decided
        before an unexpected error is not lost. `running`: requests are running or queued, so releases may still
        free budget room (else a full budget gets one last try)."""
        def idle() -> bool:  # nothing runs or is about to (ready grows below): releases cannot free room any more
            return not running and not ready

        for request in arrivals:
            if request.adapter is None or self._acquire(request, hit=True):
                ready.append(request)
            else:
                self._park(request)
        for name, future in list(self._loads.items()):
            if future.done():
                del self._loads[name]
                self._loaded(name, future.exception(), idle(), ready, failed)
        now = time.monotonic()
        for name, (freed, at) in list(self._budget_retry.items()):  # retry a full budget only when it may have room
            if self.registry.freed != freed or now >= at or idle():
                del self._budget_retry[name]
                self._loads[name] = self.registry.load_async(name)

    def _acquire(self, request, hit: bool = False) -> bool:
        request.holds_adapter = self.registry.try_acquire(request.adapter, hit=hit)
        return request.holds_adapter

    def _park(self, request) -> None:
        name = request.adapter
        request.state = PARKED
        self._parked.setdefault(name, []).append(request)
        self.parked_count += 1
        if name not in self._loads:
            self._loads[name] = self.registry.load_async(name)

    def _loaded(self, name: str, error: BaseException | None, idle: bool, ready: list, failed: list) -> None:
        """A load ended: acquire its parked requests, retry later if the budget was full (for up to budget_wait_s,
        while running requests may release room), else fail them with the reason."""
        if isinstance(error, BudgetFull):
            wait = self._budget_wait.setdefault(name, [time.monotonic() + self.budget_wait_s, False])
            if time.monotonic() < wait[0] and not (idle and wait[1]):
                wait[1] = idle  # nothing ran at this try: the next idle try is the last
                self._budget_retry[name] = (self.registry.freed, time.monotonic() + BUDGET_RETRY_S)
                return
            self.registry.drop_held_read(name)
            error = BudgetFull(f"adapter {name!r} found no room in the adapter budget ({self.registry.budget_bytes} "
                               f"bytes) within {self.budget_wait_s:g} s: it is held by pinned adapters or adapters "
                               "in use; retry later, or raise the budget (--budget-mb)")
        elif error is not None and not isinstance(error, RankdialError):
            log.error("loading adapter %r failed", name, exc_info=error)
            error = AdapterError(f"adapter {name!r} failed to load")
        self._budget_wait.pop(name, None)
        parked = self._parked.pop(name, [])
        self.parked_count -= len(parked)
        for request in parked:
            if request.ended:
                continue
            if error is not None:
                failed.append((request, error))
            elif self._acquire(request):
                ready.append(request)
            else:  # evicted by another load before this request could hold it: load it again
                self._park(request)


__all__ = ["AdapterWaits", "BudgetFull", "BUDGET_RETRY_S"]
