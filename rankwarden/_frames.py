"""Trio helpers around ``rankwarden.protocol`` that every server of it shares:
the coordinator's heartbeat port, the agents' endpoint and the node relay."""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

from rankwarden import protocol
from rankwarden.errors import ProtocolError

__all__ = ["read_first", "send_reject"]

_RECEIVE_SIZE = 65536


async def read_first(
    stream: trio.abc.Stream,
    decoder: protocol.FrameDecoder,
    *,
    timeout: float,
    what: str,
    receive: Callable[[], Awaitable[bytes]] | None = None,
) -> list | None:
    """A new peer's first frames (at least one), or None if it closed before
    saying anything (a port scan, not an error). Raises ProtocolError naming
    ``what`` was expected when no whole frame came within ``timeout``: a peer
    that connects and says nothing must not hold a connection for ever."""
    receive = receive or (lambda: stream.receive_some(_RECEIVE_SIZE))
    pending: list = []
    with trio.move_on_after(timeout) as scope:
        while not pending:
            data = await receive()
            if not data:
                return None
            pending = decoder.feed(data)
    if scope.cancelled_caught:
        raise ProtocolError(f"no {what} within {timeout:.0f}s")
    return pending


async def send_reject(stream: trio.abc.Stream, reason: str) -> None:
    """Tell a peer why it is dropped, trying for a second at most: a peer that
    does not read is dropped all the same."""
    with trio.move_on_after(1.0):
        try:
            await stream.send_all(protocol.encode(protocol.Reject(reason=reason)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
