"""What a client of the engine holds: a Handle per submitted request (its TokenEvents, blocking or asyncio, and
cancel()) and the Completion it adds up to."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

log = logging.getLogger("rankdial.serve")


@dataclass(frozen=True)
class TokenEvent:
    """One per generated token, then a final one with finish_reason set ("stop", "length", "cancelled", "error")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    token_id: int | None = None  # the token this event is for (None on the final event)
    unavailable: bool = False  # an error that is temporary (the adapter budget stayed full): a retry may succeed
    refused: bool = False  # the request's adapter cannot be loaded (a broken folder): the client's to change


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()
    error: str | None = None  # why the request failed (finish_reason "error"), as its last event says


class Handle:
    """One submitted request's results: iterate events() (threads) or aevents() (asyncio); cancel() to stop it."""

    def __init__(self, request, engine):
        self.id = request.id
        self._engine, self._request = engine, request  # its record (serve.request.Request), which cancel() flags
        self._queue: queue.Queue[TokenEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None
        self.finished = False
        self._ended = threading.Event()  # the final event was pushed (result() waits on it, not on every token)
        self._pushed = 0

    def _push(self, event: TokenEvent) -> None:
        with self._lock:
            self._pushed += 1
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
                except RuntimeError:  # the reader's event loop is closed: nobody reads this request any more
                    self._loop = None
                    if event.finish_reason is None:
                        self.cancel()  # only this request; the engine's step goes on for the others
            if self._loop is None:
                self._queue.put(event)
            if event.finish_reason is not None:
                self._ended.set()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The events as they come; TimeoutError if none arrives within `timeout` seconds (the request goes on)."""
        try:
            while True:
                try:
                    event = self._queue.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"request {self.id}: no token within {timeout} s") from None
                yield event
                if event.finish_reason is not None:
                    self.finished = True
                    return
        finally:
            if not self.finished:  # the reader stopped early: nobody wants the rest
                self.cancel()

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """The events for asyncio; leaving the loop early (a client that disconnects) cancels the request."""
        with self._lock:
            self._loop, self._aqueue = asyncio.get_running_loop(), asyncio.Queue()
            while not self._queue.empty():
                self._aqueue.put_nowait(self._queue.get_nowait())
        try:
            while True:
                event = await self._aqueue.get()
                yield event
                if event.finish_reason is not None:
                    self.finished = True
                    return
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        """Stop this request; its slot frees at the next step and a final "cancelled" event follows."""
        self._engine._cancel(self._request)

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the whole completion (the text without any stop sequence); TimeoutError (the request is
        cancelled) if no token arrives within `timeout` seconds. Sleeps until the final event instead of waking
        at every token, so a thread per waiting request costs the engine's thread nothing."""
        seen = self._pushed
        while not self._ended.wait(timeout):
            if self._pushed == seen:
                self.cancel()
                raise TimeoutError(f"request {self.id}: no token within {timeout} s")
            seen = self._pushed
        text, ids, last = [], [], None
        for last in self.events(timeout):
            text.append(last.text)
            if last.token_id is not None:
                ids.append(last.token_id)
        return Completion("".join(text), last.finish_reason, last.prompt_tokens, last.completion_tokens, tuple(ids),
                          last.error)


__all__ = ["Handle", "TokenEvent", "Completion"]
