"""The heartbeat server: one connection per rank, authenticated by its first frame.

It knows nothing about restart policy. It reads frames, checks the hello
against a ``PeerRouter`` (the coordinator), hands every later message to the
rank the hello bound the connection to, and reports the connection's end. A
peer that breaks the protocol is answered with ``Reject`` (best effort) and
dropped; every other connection carries on.

Writes to a peer go through a small bounded queue drained by one writer task
per connection, so a rank that stops reading can never block the coordinator:
when its queue is full the peer is dropped.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from rankwarden import protocol
from rankwarden.errors import ProtocolError

__all__ = ["Peer", "PeerRouter", "handle_peer", "serve_heartbeats"]

log = logging.getLogger(__name__)

#: A connection must say hello within this long or it is dropped silently.
HELLO_READ_TIMEOUT = 10.0
_SEND_QUEUE = 16
_RECEIVE_SIZE = 65536


class Peer:
    """The coordinator's handle on one authenticated connection."""

    def __init__(self, name: str, send_channel: trio.MemorySendChannel, cancel_scope: trio.CancelScope) -> None:
        self.name = name
        self._send_channel = send_channel
        self._cancel_scope = cancel_scope

    def send(self, message) -> bool:
        """Queue ``message``; drop the peer and return False if it is not keeping up."""
        try:
            self._send_channel.send_nowait(message)
            return True
        except trio.WouldBlock:
            log.warning("heartbeat peer %s is not reading; dropping it", self.name)
            self.close()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    def close(self) -> None:
        self._cancel_scope.cancel()


class PeerRouter(Protocol):
    def authenticate(self, hello: protocol.Hello, peer: Peer) -> "RankEndpoint":
        """Bind ``peer`` to a rank or raise ProtocolError/AuthError naming why not."""
        ...

    def peer_rejected(self, peer_name: str, reason: str, rank: int | None) -> None: ...


class RankEndpoint(Protocol):
    welcome: protocol.Welcome

    def on_message(self, message) -> None: ...

    def on_disconnect(self, peer: Peer, clean: bool) -> None: ...


async def serve_heartbeats(
    listeners: list[trio.abc.Listener], router: PeerRouter, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Accept connections forever (until cancelled), one task per peer."""
    await trio.serve_listeners(
        lambda stream: handle_peer(stream, router), listeners, task_status=task_status
    )


def _peer_name(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return f"{host}:{port}"
    except Exception:
        return repr(stream)


async def handle_peer(stream: trio.abc.Stream, router: PeerRouter) -> None:
    name = _peer_name(stream)
    send_channel, receive_channel = trio.open_memory_channel(_SEND_QUEUE)
    async with stream, trio.open_nursery() as nursery:
        peer = Peer(name, send_channel, nursery.cancel_scope)
        writer_done = trio.Event()
        nursery.start_soon(_writer, stream, receive_channel, writer_done)
        endpoint: RankEndpoint | None = None
        rank: int | None = None
        clean = False
        try:
            decoder = protocol.FrameDecoder(protocol.ToCoordinator)
            pending: list = []
            with trio.move_on_after(HELLO_READ_TIMEOUT) as hello_scope:
                while not pending:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        return  # closed before saying anything: a port scan, not an error
                    pending = decoder.feed(data)
            if hello_scope.cancelled_caught:
                raise ProtocolError(f"no hello within {HELLO_READ_TIMEOUT:.0f}s")
            hello, rest = pending[0], pending[1:]
            if not isinstance(hello, protocol.Hello):
                raise ProtocolError(f"first frame must be hello, got {type(hello).__name__.lower()}")
            rank = hello.rank
            endpoint = router.authenticate(hello, peer)
            peer.send(endpoint.welcome)
            for message in rest:
                clean = _deliver(endpoint, message, clean)
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                for message in decoder.feed(data):
                    clean = _deliver(endpoint, message, clean)
        except ProtocolError as exc:
            router.peer_rejected(name, str(exc), rank)
            peer.send(protocol.Reject(reason=str(exc)))
            send_channel.close()
            # Give the writer a moment to flush the Reject, never longer.
            with trio.move_on_after(1.0):
                await writer_done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # connection reset: the peer is gone; the rank watcher decides what it means
        finally:
            if endpoint is not None:
                endpoint.on_disconnect(peer, clean)
            nursery.cancel_scope.cancel()


def _deliver(endpoint: "RankEndpoint", message, clean: bool) -> bool:
    if isinstance(message, protocol.Hello):
        raise ProtocolError("second hello on an authenticated connection")
    endpoint.on_message(message)
    return clean or isinstance(message, protocol.Goodbye)


async def _writer(
    stream: trio.abc.Stream, receive_channel: trio.MemoryReceiveChannel, done: trio.Event
) -> None:
    # Ends when the send side is closed and drained, or the stream breaks.
    try:
        async for message in receive_channel:
            await stream.send_all(protocol.encode(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.set()
