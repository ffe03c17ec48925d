"""The heartbeat server: one connection per rank, authenticated by its first frame.

It knows nothing about restart policy. It reads frames, checks the hello
against a ``PeerRouter`` (the coordinator), hands every later message to the
rank the hello bound the connection to, and reports the connection's end. A
peer that breaks the protocol is answered with ``Reject`` (best effort) and
dropped; every other connection carries on.

Once a connection is authenticated, its reads are done by one task for all
connections (``SocketReader``: an epoll set of their own, read in passes
5 ms apart), not by a task per connection; each connection's task keeps
its stream, its writer and its end. Before that (the hello), and for
streams that are not sockets, a connection's task reads, waiting for
readability before ``recv`` (trio's ``receive_some`` tries ``recv`` first,
which for one small frame per interval almost always fails with EAGAIN).

With ``tune_gc`` (the CLI's coordinator process, and benchmarks) the server
also keeps the cyclic garbage collector off the long-lived per-connection
state; see ``_GcTuner``.

Writes to a peer go through a small bounded queue drained by one writer task
per connection, so a rank that stops reading can never block the coordinator:
when its queue is full the peer is dropped.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import socket
from typing import Protocol

import trio

from rankwarden import protocol
from rankwarden._frames import read_first, send_reject
from rankwarden.errors import ProtocolError

__all__ = ["Peer", "PeerRouter", "SocketReader", "handle_peer", "receive_some", "serve_heartbeats"]

log = logging.getLogger(__name__)

#: A connection must say hello within this long or it is dropped silently.
HELLO_READ_TIMEOUT = 10.0
_SEND_QUEUE = 16
#: Frames the writer joins into one send (a broadcast to a relay's ranks).
_WRITE_BATCH = 64
#: How long the socket reader lets frames gather after a wakeup (see SocketReader.run).
_COALESCE = 0.005
_RECEIVE_SIZE = 65536


class Peer:
    """The coordinator's handle on one authenticated connection."""

    #: True for a rank behind a relay: the relay's beats, not this rank's own
    #: heartbeats, say it is alive (see ``_aggregate``).
    covers_liveness = False

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

    # Only for a rank behind a relay (``_aggregate``):

    def on_progress(self, step: int | None, samples: int | None, metrics: dict[str, float] | None) -> None:
        """What a ``RelayBeat`` says changed; ``None`` means unchanged."""
        ...

    def on_silent(self, silent_for: float, why: str) -> None:
        """The relay (or the relay's silence) says this rank is frozen: fail it now."""
        ...

    def on_busy(self, silent_for: float, cpu_seconds: float, seen_by: str) -> None:
        """The relay says this rank is silent but burning CPU: not frozen (it keeps watching)."""
        ...


class _GcTuner:
    """Keeps the cyclic collector's pauses off the heartbeat loop, for this process.

    Each connection's task, stream, decoder and buffers live as long as the
    rank; trio allocates a little on every wakeup, so young collections run
    constantly and every older one scans all those long-lived objects again:
    at 1,024 ranks the collector was 20% of the coordinator's CPU, and at
    4,096 a full collection stalled the loop for 0.3-0.9 s (longer than a
    heartbeat interval). So the young threshold is raised once, and each time
    the number of authenticated connections reaches a new power of two (from
    64) what exists is frozen (``gc.freeze``: never scanned again; freezing is
    cheap, it moves list heads). The frozen connections still free by
    reference counting when they end; only a reference cycle made before a
    freeze is never reclaimed, a bounded leak the size of the start-up heap.
    This changes the whole process, so it is opt-in (``tune_gc``): a library
    user's process keeps its own collector settings unless asked.
    """

    FIRST = 64
    YOUNG_THRESHOLD = 50_000

    def __init__(self) -> None:
        self._connected = 0
        self._next_freeze = self.FIRST
        young, middle, old = gc.get_threshold()
        gc.set_threshold(max(young, self.YOUNG_THRESHOLD), middle, old)

    def connected(self) -> None:
        self._connected += 1
        if self._connected >= self._next_freeze:
            self._next_freeze *= 2
            gc.freeze()


class SocketReader:
    """Reads every authenticated connection of one heartbeat server from one task.

    A task per connection costs trio a wakeup, two epoll registrations and a
    ``recv`` per frame; with 1,250 relays at 10 Hz that alone was half a
    core, and a rank's heartbeat cost about the same. Here the sockets sit
    in an epoll set of their own, whose descriptor trio waits on: one wakeup
    reads every connection that has data (one ``recv`` each, non-blocking),
    so the cost per frame is a ``recv``, a decode and the handling. The
    per-connection task still owns the stream, the writer and (for a relay)
    the deadline; it only stops reading, and waits for ``over``.

    A connection is anything with ``feed(data, now)`` (may raise
    ProtocolError) and ``end(error)``. Linux (epoll); elsewhere, and for
    streams that are not sockets (tests' memory streams), each connection
    reads in its own task with the same ``feed``.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._connections: dict[int, tuple[object, socket.socket]] = {}  # fd -> (connection, its socket)
        self._fds: dict[int, int] = {}  # id(connection) -> fd

    def accepts(self, stream: trio.abc.Stream) -> bool:
        return self._epoll is not None and isinstance(stream, trio.SocketStream)

    def add(self, connection, stream: trio.SocketStream) -> None:
        assert self._epoll is not None
        # A duplicate descriptor: the stream keeps its own for writing and closing.
        sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        sock.setblocking(False)
        self._connections[sock.fileno()] = (connection, sock)
        self._fds[id(connection)] = sock.fileno()
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def remove(self, connection) -> None:
        fd = self._fds.pop(id(connection), None)
        if fd is not None and fd in self._connections:
            _, sock = self._connections.pop(fd)
            assert self._epoll is not None
            self._epoll.unregister(fd)
            sock.close()

    async def run(self) -> None:
        if self._epoll is None:
            return
        epoll, connections = self._epoll, self._connections
        try:
            while True:
                # Readable when any registered socket is (an empty set never is).
                await trio.lowlevel.wait_readable(epoll.fileno())
                # Let the frames of the next few milliseconds gather, then read
                # them all in one pass: frames arrive evenly spread, so without
                # this each wakeup (a full trip through trio's scheduler) reads one.
                # A frame waits at most _COALESCE longer: nothing next to seconds
                # of heartbeat_timeout.
                await trio.sleep(_COALESCE)
                now = trio.current_time()
                for fd, _ in epoll.poll(0):
                    entry = connections.get(fd)
                    if entry is None:
                        continue
                    connection, sock = entry
                    try:
                        data = sock.recv(_RECEIVE_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""  # reset: the connection is over
                    if not data:
                        self.remove(connection)
                        connection.end()
                        continue
                    try:
                        connection.feed(data, now)
                    except ProtocolError as exc:
                        self.remove(connection)
                        connection.end(exc)
        finally:
            for _, sock in list(connections.values()):
                sock.close()
            connections.clear()
            self._fds.clear()
            epoll.close()

async def serve_heartbeats(
    listeners: list[trio.abc.Listener],
    router: PeerRouter,
    *,
    tune_gc: bool = False,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever (until cancelled), one task per peer; their reads share one task."""
    tuner = _GcTuner() if tune_gc else None
    poller = SocketReader()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        await trio.serve_listeners(
            lambda stream: handle_peer(stream, router, tuner, poller), listeners, task_status=task_status
        )


async def receive_some(stream: trio.abc.Stream) -> bytes:
    """``stream.receive_some``, waiting for readability first on a socket (see the module docstring)."""
    if isinstance(stream, trio.SocketStream):
        await trio.lowlevel.wait_readable(stream.socket)
    return await stream.receive_some(_RECEIVE_SIZE)


def _peer_name(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return f"{host}:{port}"
    except Exception:
        return repr(stream)


async def handle_peer(
    stream: trio.abc.Stream, router: PeerRouter, tuner: _GcTuner | None = None, poller: SocketReader | None = None
) -> None:
    """One connection: a rank's own (first frame ``Hello``) or a relay's (``RelayHello``)."""
    name = _peer_name(stream)
    async with stream:
        decoder = protocol.FrameDecoder(protocol.Upstream)
        try:
            pending = await read_first(stream, decoder, timeout=HELLO_READ_TIMEOUT, what="hello",
                                       receive=lambda: receive_some(stream))
            if pending is None:
                return
            first = pending[0]
            if not isinstance(first, (protocol.Hello, protocol.RelayHello)):
                raise ProtocolError(f"first frame must be hello, got {type(first).__name__.lower()}")
        except ProtocolError as exc:
            router.peer_rejected(name, str(exc), None)
            await send_reject(stream, str(exc))
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if isinstance(first, protocol.RelayHello):
            # Imported here: _aggregate builds on this module's Peer and helpers.
            from rankwarden.coordinator._aggregate import serve_relay

            await serve_relay(stream, name, first, pending[1:], decoder, router, tuner, poller)
        else:
            await _serve_rank(stream, name, first, pending[1:], decoder, router, tuner, poller)


async def _serve_rank(
    stream: trio.abc.Stream,
    name: str,
    hello: protocol.Hello,
    rest: list,
    decoder: protocol.FrameDecoder,
    router: PeerRouter,
    tuner: _GcTuner | None,
    poller: SocketReader | None,
) -> None:
    send_channel, receive_channel = trio.open_memory_channel(_SEND_QUEUE)
    async with trio.open_nursery() as nursery:
        peer = Peer(name, send_channel, nursery.cancel_scope)
        writer_done = trio.Event()
        nursery.start_soon(writer, stream, receive_channel, writer_done)
        endpoint: RankEndpoint | None = None
        connection: _RankConnection | None = None
        try:
            try:
                endpoint = router.authenticate(hello, peer)
                peer.send(endpoint.welcome)
                if tuner is not None:
                    tuner.connected()
                connection = _RankConnection(endpoint, decoder)
                for message in rest:
                    connection.clean = _deliver(endpoint, message, connection.clean)
                await pump(connection, stream, poller)
                if connection.error is not None:
                    raise connection.error
            except ProtocolError as exc:
                router.peer_rejected(name, str(exc), hello.rank)
                peer.send(protocol.Reject(reason=str(exc)))
                send_channel.close()
                # Give the writer a moment to flush the Reject, never longer.
                with trio.move_on_after(1.0):
                    await writer_done.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # connection reset: the peer is gone; the rank watcher decides what it means
        finally:
            if endpoint is not None:
                endpoint.on_disconnect(peer, connection is not None and connection.clean)
            nursery.cancel_scope.cancel()


async def pump(connection, stream: trio.abc.Stream, poller: "SocketReader | None") -> None:
    """Feed ``connection`` (a rank's or a relay's) what ``stream`` receives until
    it is over: through the shared socket reader where it can, else from this
    task. A protocol error ends it: in ``connection.error`` from the reader, raised here otherwise."""
    if poller is not None and poller.accepts(stream):
        poller.add(connection, stream)
        try:
            await connection.over.wait()
        finally:
            poller.remove(connection)
        return
    while not connection.over.is_set():
        data = await receive_some(stream)
        if not data:
            break
        connection.feed(data, trio.current_time())


class _RankConnection:
    """What the socket reader feeds for one rank's own connection."""

    def __init__(self, endpoint: "RankEndpoint", decoder: protocol.FrameDecoder) -> None:
        self.endpoint = endpoint
        self.decoder = decoder
        self.clean = False  # said goodbye
        self.over = trio.Event()
        self.error: ProtocolError | None = None

    def feed(self, data: bytes, now: float) -> None:
        for message in self.decoder.feed(data):
            self.clean = _deliver(self.endpoint, message, self.clean)

    def end(self, error: ProtocolError | None = None) -> None:
        if not self.over.is_set():
            self.error = error
            self.over.set()


def _deliver(endpoint: "RankEndpoint", message, clean: bool) -> bool:
    if isinstance(message, protocol.Heartbeat):
        endpoint.on_message(message)
        return clean
    if isinstance(message, protocol.Hello):
        raise ProtocolError("second hello on an authenticated connection")
    if not isinstance(message, protocol.RANK_FRAMES):
        raise ProtocolError(f"{type(message).__name__.lower()} frame on a rank's connection")
    endpoint.on_message(message)
    return clean or isinstance(message, protocol.Goodbye)


async def writer(stream: trio.abc.Stream, receive_channel: trio.MemoryReceiveChannel, done: trio.Event) -> None:
    """Sends what is queued, joining what is already waiting into one write."""
    # Ends when the send side is closed and drained, or the stream breaks.
    try:
        async for message in receive_channel:
            frames = [protocol.encode(message)]
            while len(frames) < _WRITE_BATCH:
                try:
                    frames.append(protocol.encode(receive_channel.receive_nowait()))
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    break
            await stream.send_all(b"".join(frames) if len(frames) > 1 else frames[0])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.set()
