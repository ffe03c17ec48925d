"""The coordinator's side of a relay: many ranks on one connection, one deadline.

A node agent runs a relay (``rankwarden.agent.Relay``); the node's ranks talk
to it, and it talks to the coordinator on the heartbeat port, its first frame
a ``RelayHello`` (see ``rankwarden.protocol``). Here each rank behind the
relay becomes an ordinary ``RankEndpoint`` (the coordinator's ``RankRunner``)
bound to a ``RelayedPeer``, so the runner, the committer and the events do
not know the difference, except for liveness:

    what happened                     how it is seen here                        cause
    rank frozen (SIGSTOP, deadlock    the relay's own deadline on its node;      heartbeat_timeout, with
    that stops the heartbeat thread)  it sends RelaySilent at once               what the relay saw
    rank exits / closes its socket    RelayClosed(clean) -> on_disconnect        exit from the launcher, or
                                                                                 connection_lost after grace
    relay (node) frozen or cut off    no frame for the relay's timeout: one      heartbeat_timeout, for every
                                      deadline per connection, not per rank      rank behind it, naming the node
    relay connection drops            on_disconnect(unclean) for each rank       connection_lost after grace

A ``RelayBeat`` touches only the ranks whose progress changed; the liveness
of all the others is the beat itself. So per interval the coordinator does
one receive, one decode and one assignment per relay, plus the changes; the
receives of all relays are done by one task (``SocketReader``).

The hello of each rank is checked like a direct one (token, job, attempt):
the relay's own hello grants nothing, so a relay can speak only for ranks that
authenticated through it, and only frames naming such a rank are applied.
A relay that breaks the protocol is rejected and dropped; its ranks lose
their connection (and, at the grace, are failed as such).
"""

from __future__ import annotations

import logging

import trio

from rankwarden import protocol
from rankwarden.coordinator._heartbeat import (
    Peer,
    PeerRouter,
    RankEndpoint,
    SocketReader,
    _GcTuner,
    pump,
    writer,
)
from rankwarden.errors import ProtocolError

__all__ = ["RelayedPeer", "serve_relay"]

log = logging.getLogger(__name__)

#: Frames queued for one relay before it counts as not reading: a broadcast
#: (Committed, Drain) puts one frame per rank behind it in the queue at once.
_RELAY_QUEUE = 4096


class RelayedPeer(Peer):
    """One rank's face on a relay connection."""

    covers_liveness = True

    def __init__(self, relay: "_RelayConnection", rank: int) -> None:
        self.name = f"{relay.name}/rank {rank}"
        self.rank = rank
        self._relay = relay

    @property
    def last_seen(self) -> float:
        """When the relay last vouched for this rank (its last frame)."""
        return self._relay.last_seen

    def send(self, message) -> bool:
        return self._relay.send(protocol.RelayDeliver(rank=self.rank, message=message))

    def close(self) -> None:
        self._relay.drop(self.rank)


class _RelayConnection:
    def __init__(self, name: str, hello: protocol.RelayHello, send_channel, cancel_scope: trio.CancelScope) -> None:
        self.name = name
        self.node = hello.node or name
        self.interval = hello.interval
        self.timeout = hello.timeout
        self.last_seen = trio.current_time()
        self.ranks: dict[int, tuple[RankEndpoint, RelayedPeer]] = {}
        self.clean: set[int] = set()
        self._send_channel = send_channel
        self._cancel_scope = cancel_scope
        #: Set when the connection is over (end of stream, reset, a protocol error).
        self.over = trio.Event()
        self.error: ProtocolError | None = None
        self.decoder: protocol.FrameDecoder | None = None
        self.router: PeerRouter | None = None
        self.tuner: _GcTuner | None = None

    def feed(self, data: bytes, now: float) -> None:
        """Bytes received: decode and handle them (raises ProtocolError)."""
        assert self.decoder is not None and self.router is not None
        messages = self.decoder.feed(data)
        self.last_seen = now
        for message in messages:
            self.handle(message, self.router, self.tuner)

    def end(self, error: ProtocolError | None = None) -> None:
        if not self.over.is_set():
            self.error = error
            self.over.set()

    def send(self, message) -> bool:
        try:
            self._send_channel.send_nowait(message)
            return True
        except trio.WouldBlock:
            log.warning("relay %s (node %s) is not reading; dropping it", self.name, self.node)
            self._cancel_scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    def close(self) -> None:
        self._cancel_scope.cancel()

    def drop(self, rank: int) -> None:
        """The coordinator is done with ``rank`` (or it is not keeping up): forget it, tell the relay."""
        entry = self.ranks.pop(rank, None)
        if entry is not None:
            self.send(protocol.RelayDrop(rank=rank))
            entry[0].on_disconnect(entry[1], rank in self.clean)

    def rank_ended(self, rank: int, clean: bool) -> None:
        entry = self.ranks.pop(rank, None)
        if entry is not None:
            entry[0].on_disconnect(entry[1], clean or rank in self.clean)

    def handle(self, message, router: PeerRouter, tuner: _GcTuner | None) -> None:
        if isinstance(message, protocol.RelayBeat):
            ranks = self.ranks
            for change in message.changed:
                entry = ranks.get(change.rank)
                if entry is not None:
                    entry[0].on_progress(change.step, change.samples, change.metrics)
        elif isinstance(message, protocol.RelayForward):
            inner, rank = message.message, message.rank
            if isinstance(inner, protocol.Hello):
                self._authenticate(inner, router, tuner)
                return
            entry = self.ranks.get(rank)
            if entry is None:
                # Dropped a moment ago (its RelayDrop is on the way), or never authenticated here.
                log.debug("relay %s: %s for rank %d, which is not connected here", self.name,
                          type(inner).__name__, rank)
                return
            if isinstance(inner, protocol.Goodbye):
                self.clean.add(rank)
            entry[0].on_message(inner)
        elif isinstance(message, protocol.RelaySilent):
            entry = self.ranks.get(message.rank)
            if entry is not None and message.busy:
                entry[0].on_busy(message.silent_for, message.cpu_seconds, f"the relay on node {self.node}")
            elif entry is not None:
                why = f"seen by the relay on node {self.node}: "
                why += f"{message.detail}: it is frozen" if message.detail else "it is frozen"
                entry[0].on_silent(message.silent_for, why)
        elif isinstance(message, protocol.RelayClosed):
            self.rank_ended(message.rank, message.clean)
        else:
            raise ProtocolError(f"{type(message).__name__.lower()} frame on a relay's connection")

    def _authenticate(self, hello: protocol.Hello, router: PeerRouter, tuner: _GcTuner | None) -> None:
        if hello.rank in self.ranks:
            reason = f"rank {hello.rank} is already connected through this relay"
        else:
            peer = RelayedPeer(self, hello.rank)
            try:
                endpoint = router.authenticate(hello, peer)
            except ProtocolError as exc:
                reason = str(exc)
            else:
                self.ranks[hello.rank] = (endpoint, peer)
                self.clean.discard(hello.rank)
                self.send(protocol.RelayDeliver(rank=hello.rank, message=endpoint.welcome))
                if tuner is not None:
                    tuner.connected()
                return
        # One rank's bad hello is that rank's error, not the relay's.
        router.peer_rejected(f"{self.name}/rank {hello.rank}", reason, hello.rank)
        self.send(protocol.RelayDeliver(rank=hello.rank, message=protocol.Reject(reason=reason)))
        self.send(protocol.RelayDrop(rank=hello.rank))

    def silent_all(self, silent_for: float) -> None:
        why = (f"the relay on node {self.node} sent nothing for {silent_for:.1f}s "
               f"(its timeout {self.timeout:g}s): the node is frozen, cut off or gone")
        for endpoint, _ in list(self.ranks.values()):
            endpoint.on_silent(silent_for, why)


async def serve_relay(
    stream: trio.abc.Stream,
    name: str,
    hello: protocol.RelayHello,
    rest: list,
    decoder: protocol.FrameDecoder,
    router: PeerRouter,
    tuner: _GcTuner | None,
    poller: SocketReader | None,
) -> None:
    """Serve one relay connection until it ends; its ranks are told how it ended."""
    send_channel, receive_channel = trio.open_memory_channel(_RELAY_QUEUE)
    relay: _RelayConnection | None = None
    async with trio.open_nursery() as nursery:
        writer_done = trio.Event()
        nursery.start_soon(writer, stream, receive_channel, writer_done)
        try:
            if hello.version != protocol.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"relay speaks heartbeat protocol version {hello.version}, this coordinator speaks "
                    f"{protocol.PROTOCOL_VERSION}; run the same rankwarden version on both sides")
            if not 0 < hello.interval < hello.timeout:
                raise ProtocolError(f"relay interval {hello.interval:g}s must be positive and shorter than "
                                    f"its timeout {hello.timeout:g}s")
            relay = _RelayConnection(name, hello, send_channel, nursery.cancel_scope)
            relay.decoder, relay.router, relay.tuner = decoder, router, tuner
            log.info("relay %s (node %s) connected", name, relay.node)
            nursery.start_soon(_watch, relay)
            for message in rest:
                relay.handle(message, router, tuner)
            await pump(relay, stream, poller)
            if relay.error is not None:
                raise relay.error
        except ProtocolError as exc:
            router.peer_rejected(name, f"relay: {exc}", None)
            send_channel.send_nowait(protocol.Reject(reason=str(exc)))
            send_channel.close()
            with trio.move_on_after(1.0):
                await writer_done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if relay is not None:
                for rank in list(relay.ranks):
                    relay.rank_ended(rank, False)
            nursery.cancel_scope.cancel()


async def _watch(relay: _RelayConnection) -> None:
    # One deadline for the whole connection, re-armed from the last frame when
    # it fires (frames only record the time: see _rank's module docstring).
    while True:
        await trio.sleep_until(relay.last_seen + relay.timeout)
        now = trio.current_time()
        if now >= relay.last_seen + relay.timeout:
            log.warning("relay %s (node %s) silent for %.1fs; failing its %d rank(s)",
                        relay.name, relay.node, now - relay.last_seen, len(relay.ranks))
            relay.silent_all(now - relay.last_seen)
            relay.ranks.clear()
            relay.close()
            return
