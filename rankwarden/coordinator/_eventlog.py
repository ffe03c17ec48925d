"""A job's events in memory, for the followers of a running coordinator.

Append-only; every follower iterates from an index of its own and waits on
one signal that each append replaces, so a slow follower never blocks the job
and never misses an event. The iteration ends once the log is closed (the
job ended) and the follower has read everything.
"""

from __future__ import annotations

import trio

from rankwarden.events import Event

__all__ = ["EventLog"]


class EventLog:
    def __init__(self) -> None:
        self._events: list[Event] = []
        self._new_event = trio.Event()  # replaced after every append; wakes followers
        self._closed = trio.Event()

    def append(self, event: Event) -> None:
        self._events.append(event)
        self._new_event.set()
        self._new_event = trio.Event()

    def close(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def next_signal(self) -> trio.Event:
        """Set when the next event is appended."""
        return self._new_event

    def history(self) -> list[Event]:
        return list(self._events)

    def follow(self, since: int = 0) -> "_Follower":
        return _Follower(self, since)


class _Follower:
    """Async iterator over the log from ``since``; ends when the log is closed and read."""

    def __init__(self, log: EventLog, since: int) -> None:
        self._log = log
        self._index = since

    def __aiter__(self) -> "_Follower":
        return self

    async def __anext__(self) -> Event:
        log = self._log
        while self._index >= len(log._events):
            if log._closed.is_set():
                raise StopAsyncIteration
            await log._new_event.wait()
        event = log._events[self._index]
        self._index += 1
        return event
