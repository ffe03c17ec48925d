"""The node relay: a node's ranks heartbeat here; the coordinator hears one connection.

At scale the coordinator cannot handle one message per rank per interval.
A relay runs inside each node's agent process. The node's ranks connect to
it exactly as they would to the coordinator (same protocol, same token: their
``RANKWARDEN_COORDINATOR`` is ``relay.address``), and it keeps one connection
to the coordinator (``rankwarden.protocol``, "Aggregation"):

* each rank's ``Hello``, ``CheckpointReady``, ``CheckpointFailed`` and
  ``Goodbye`` go up as they are, in a ``RelayForward`` naming the rank; what
  the coordinator sends a rank (``Welcome``, ``Reject``, ``Committed``,
  ``Drain``) comes down in a ``RelayDeliver`` and is passed on;
* heartbeats stop here. Every ``interval`` one ``RelayBeat`` goes up: it says
  all the relay's ranks are alive. Every ``progress_interval`` (1 s) a beat
  also carries the step, samples and metrics that changed: progress is for
  ``progress_timeout`` (minutes) and the step rate, and sending it ten times
  a second made the coordinator do per-rank work every interval after all.
  A rank's own frames (a checkpoint, its goodbye) first flush its progress;
* the relay applies ``heartbeat_timeout`` to each rank itself: a rank silent
  that long is named at once in a ``RelaySilent``, with what its process was
  doing (stopped by SIGSTOP, or asleep). A silent rank that is burning CPU
  (a C call holding the GIL) is busy, not frozen: it is re-judged every
  interval (no less than 1 s), like the coordinator does for local ranks;
* a rank whose connection ends is reported in ``RelayClosed`` (clean after
  its ``Goodbye``). Its exit status is the launcher's (the agent's) to report.

If the coordinator connection ends, every rank connection is closed (the
ranks then end themselves, as they do when they lose the coordinator) and
``serve`` returns the reason.

API, for the agent::

    relay = Relay("10.0.0.1:29400", job="job-1", token=token,
                  heartbeat_interval=0.5, heartbeat_timeout=5.0, node="gpu-17")
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)   # listening, and connected upstream
        env["RANKWARDEN_COORDINATOR"] = relay.address
        ...                                # start the node's ranks
    # relay.serve returns (with a reason) when the coordinator connection ends;
    # cancel it to stop the relay.

``host`` is where ranks connect (loopback by default: they run on this node).
For tests, ``connect`` replaces the upstream TCP connection, ``listeners``
the ranks' listener and ``sample`` the reading of a rank's ``/proc`` stat
(``rankwarden.testing``'s memory streams and fake ranks fit all three).
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Awaitable, Callable

import trio

from rankwarden import protocol
from rankwarden._frames import read_first, send_reject
from rankwarden.errors import AuthError, ProtocolError
from rankwarden.launcher import CpuSample
from rankwarden.launcher._local import sample_pid

__all__ = ["Relay"]

log = logging.getLogger(__name__)

HELLO_READ_TIMEOUT = 10.0
_RANK_QUEUE = 16
_UPSTREAM_QUEUE = 4096
_RECEIVE_SIZE = 65536
#: Share of one CPU a silent rank must use to count as busy (see coordinator._rank).
BUSY_CPU_SHARE = 0.15
BUSY_WINDOW_MIN = 1.0


class _Rank:
    """One rank's connection to the relay."""

    def __init__(self, hello: protocol.Hello, send_channel, cancel_scope: trio.CancelScope) -> None:
        self.rank = hello.rank
        self.pid = hello.pid
        self.send_channel = send_channel
        self.cancel_scope = cancel_scope
        self.last_seen = trio.current_time()
        self.step: int | None = None
        self.samples: int | None = None
        self.metrics: dict[str, float] = {}
        self.metrics_changed = False
        self.clean = False
        #: Ended by the coordinator (RelayDrop): do not report the close back.
        self.dropped = False
        self.silent = False
        self.cpu_mark: tuple[float, float] | None = None  # (time, cpu seconds) at the last check
        #: CPU seconds used in the last window when it was judged busy (None: not measured busy).
        self.busy_used: float | None = None
        self.busy_reported = False


class Relay:
    """Aggregates one node's ranks onto one coordinator connection. See the module docstring."""

    def __init__(
        self,
        coordinator: str,
        *,
        job: str,
        token: str,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        node: str = "",
        progress_interval: float = 1.0,
        host: str = "127.0.0.1",
        connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
        listeners: list[trio.abc.Listener] | None = None,
        sample: Callable[[int], CpuSample | None] = sample_pid,
    ) -> None:
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError(f"heartbeat_interval ({heartbeat_interval}) must be positive and shorter than "
                             f"heartbeat_timeout ({heartbeat_timeout})")
        self.coordinator = coordinator
        self.job = job
        self.node = node
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        #: Progress goes up on every n-th beat.
        self._progress_every = max(1, round(progress_interval / heartbeat_interval))
        self._token = token
        self._host = host
        self._connect = connect
        self._listeners = listeners
        self._sample = sample
        self._ranks: dict[int, _Rank] = {}
        self._changed: dict[int, _Rank] = {}
        self._upstream: trio.MemorySendChannel | None = None
        self._seq = 0
        #: ``host:port`` that the node's ranks use as RANKWARDEN_COORDINATOR; set once serving.
        self.address = ""

    # -- the lifetime ------------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> str:
        """Connect upstream, listen for ranks, relay until the coordinator connection ends.

        ``task_status.started(address)`` once ranks can connect. Returns why it ended."""
        if self._connect is not None:
            stream = await self._connect()
        else:
            host, _, port = self.coordinator.rpartition(":")
            stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        listeners = self._listeners
        if listeners is None:
            listeners = await trio.open_tcp_listeners(0, host=self._host)
            sockname = listeners[0].socket.getsockname()  # type: ignore[attr-defined]
            host = sockname[0] if ":" not in sockname[0] else f"[{sockname[0]}]"
            self.address = f"{host}:{sockname[1]}"
        else:
            self.address = "memory"
        send_channel, receive_channel = trio.open_memory_channel(_UPSTREAM_QUEUE)
        self._upstream = send_channel
        reason = "cancelled"
        async with stream:
            try:
                async with trio.open_nursery() as nursery:
                    self._send_up(protocol.RelayHello(version=protocol.PROTOCOL_VERSION, job=self.job, node=self.node,
                                                      interval=self.interval, timeout=self.timeout))
                    nursery.start_soon(_write, stream, receive_channel)
                    nursery.start_soon(self._beat)
                    await nursery.start(trio.serve_listeners, self._serve_rank, listeners)
                    log.info("relay for job %s on node %s: ranks connect to %s, coordinator at %s",
                             self.job, self.node, self.address, self.coordinator)
                    task_status.started(self.address)
                    reason = await self._read_upstream(stream)
                    nursery.cancel_scope.cancel()
            finally:
                for rank in list(self._ranks.values()):
                    rank.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
        log.warning("relay for job %s on node %s ends: %s", self.job, self.node, reason)
        return reason

    def _send_up(self, message) -> None:
        assert self._upstream is not None
        try:
            self._upstream.send_nowait(message)
        except trio.WouldBlock:
            # The coordinator stopped reading: it will see this relay silent and fail its ranks.
            log.warning("relay for job %s: the coordinator is not reading; dropping a %s",
                        self.job, type(message).__name__)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _read_upstream(self, stream: trio.abc.Stream) -> str:
        decoder = protocol.FrameDecoder(protocol.ToRelay)
        try:
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    return "the coordinator closed the connection"
                for message in decoder.feed(data):
                    if isinstance(message, protocol.RelayDeliver):
                        rank = self._ranks.get(message.rank)
                        if rank is not None:
                            self._to_rank(rank, message.message)
                    elif isinstance(message, protocol.RelayDrop):
                        rank = self._ranks.get(message.rank)
                        if rank is not None:
                            rank.dropped = True
                            rank.send_channel.close()  # the rank's writer flushes, then its connection ends
                    else:  # Reject: the whole relay
                        return f"the coordinator rejected this relay: {message.reason}"
        except ProtocolError as exc:
            return f"the coordinator sent an undecodable frame: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"the coordinator connection broke: {exc or type(exc).__name__}"

    def _to_rank(self, rank: _Rank, message) -> None:
        try:
            rank.send_channel.send_nowait(message)
        except trio.WouldBlock:
            log.warning("job=%s rank=%d is not reading from the relay; dropping it", self.job, rank.rank)
            rank.cancel_scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # -- liveness, batched ---------------------------------------------------------------

    async def _beat(self) -> None:
        # Deadlines, not polling: the next beat is due at a fixed time, and a late
        # tick does not shift the ones after it.
        due = trio.current_time()
        while True:
            due += self.interval
            await trio.sleep_until(due)
            now = trio.current_time()
            if now - due > self.interval:
                due = now  # the loop was stalled: do not send a burst to catch up
            self._seq += 1
            changed = []
            if self._seq % self._progress_every == 0:
                changed = [self._change(rank) for rank in self._changed.values()]
                self._changed.clear()
            self._send_up(protocol.RelayBeat(seq=self._seq, changed=changed))

    @staticmethod
    def _change(rank: _Rank) -> protocol.RelayRank:
        metrics = None
        if rank.metrics_changed:
            metrics, rank.metrics_changed = rank.metrics, False
        return protocol.RelayRank(rank.rank, rank.step, rank.samples, metrics)

    def _flush(self, rank: _Rank) -> None:
        # A rank's own frames (its last checkpoint, its goodbye) must not overtake
        # the progress it reported before them: send that first, in a beat of its own.
        if self._changed.pop(rank.rank, None) is not None:
            self._send_up(protocol.RelayBeat(seq=self._seq, changed=[self._change(rank)]))

    async def _watch(self, rank: _Rank) -> None:
        # The relay's deadline for one rank: re-armed from last_seen when it fires
        # (heartbeats only record the time), like the coordinator's own.
        check_at = math.inf
        while True:
            # While busy, the next look is one window on (a heartbeat meanwhile resets it there).
            await trio.sleep_until(check_at if check_at < math.inf else rank.last_seen + self.timeout)
            now = trio.current_time()
            if now < rank.last_seen + self.timeout:
                check_at = math.inf
                rank.cpu_mark = rank.busy_used = None
                rank.busy_reported = False
                continue
            detail = self._judge(rank, now)
            if detail is None:  # busy: judged again one window later
                check_at = now + min(self.timeout, max(BUSY_WINDOW_MIN, self.interval))
                if rank.busy_used is not None and not rank.busy_reported:
                    rank.busy_reported = True
                    self._send_up(protocol.RelaySilent(rank=rank.rank, silent_for=round(now - rank.last_seen, 6),
                                                       busy=True, cpu_seconds=round(rank.busy_used, 6)))
                continue
            rank.silent = True
            self._send_up(protocol.RelaySilent(rank=rank.rank, silent_for=round(now - rank.last_seen, 6),
                                               detail=detail))
            return

    def _judge(self, rank: _Rank, now: float) -> str | None:
        """A silent rank: None if it is busy (burning CPU), else what was seen."""
        sample = self._sample(rank.pid) if rank.pid > 0 else None
        if sample is None:
            return ""
        if sample.stopped:
            return f"its process is stopped (state {sample.state}: SIGSTOP or a tracer)"
        mark, rank.cpu_mark = rank.cpu_mark, (now, sample.cpu_seconds)
        if mark is None:
            # First look: compare with where it was one busy window ago is not
            # possible, so judge from the state alone and look again shortly.
            if sample.state in ("R", "D"):
                return None
            return f"its process is asleep (state {sample.state})"
        used = sample.cpu_seconds - mark[1]
        if now > mark[0] and used >= BUSY_CPU_SHARE * (now - mark[0]):
            rank.busy_used = used
            log.info("job=%s rank=%d silent for %.1fs but using CPU: busy, still watching",
                     self.job, rank.rank, now - rank.last_seen)
            return None
        return f"it used {used:.2f}s of CPU in {now - mark[0]:.1f}s (state {sample.state})"

    # -- one rank's connection -------------------------------------------------------------

    async def _serve_rank(self, stream: trio.abc.Stream) -> None:
        async with stream:
            decoder = protocol.FrameDecoder(protocol.ToCoordinator)
            try:
                pending = await read_first(stream, decoder, timeout=HELLO_READ_TIMEOUT, what="hello")
                if pending is None:
                    return
                hello = pending[0]
                self._check_hello(hello)
            except ProtocolError as exc:
                log.warning("relay for job %s: dropped a rank connection: %s", self.job, exc)
                await send_reject(stream, str(exc))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            send_channel, receive_channel = trio.open_memory_channel(_RANK_QUEUE)
            async with trio.open_nursery() as nursery:
                rank = _Rank(hello, send_channel, nursery.cancel_scope)
                self._ranks[hello.rank] = rank
                try:
                    nursery.start_soon(self._write_rank, stream, receive_channel, nursery.cancel_scope)
                    self._send_up(protocol.RelayForward(rank=hello.rank, message=hello))
                    nursery.start_soon(self._watch, rank)
                    for message in pending[1:]:
                        self._from_rank(rank, message)
                    while True:
                        data = await stream.receive_some(_RECEIVE_SIZE)
                        if not data:
                            break
                        for message in decoder.feed(data):
                            self._from_rank(rank, message)
                except ProtocolError as exc:
                    log.warning("job=%s rank=%d broke the protocol at the relay: %s", self.job, hello.rank, exc)
                    with trio.move_on_after(1.0):
                        try:
                            await stream.send_all(protocol.encode(protocol.Reject(reason=str(exc))))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    if self._ranks.get(hello.rank) is rank:
                        del self._ranks[hello.rank]
                    if rank.dropped:
                        self._changed.pop(hello.rank, None)
                    else:
                        self._flush(rank)
                        self._send_up(protocol.RelayClosed(rank=hello.rank, clean=rank.clean))
                    nursery.cancel_scope.cancel()

    def _check_hello(self, hello) -> None:
        # The coordinator checks the hello again; checking here keeps strangers off the uplink.
        if not isinstance(hello, protocol.Hello):
            raise ProtocolError(f"first frame must be hello, got {type(hello).__name__.lower()}")
        if hello.version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"rank speaks heartbeat protocol version {hello.version}, this relay speaks "
                                f"{protocol.PROTOCOL_VERSION}; run the same rankwarden version on both sides")
        if not hmac.compare_digest(hello.token.encode(), self._token.encode()):
            raise AuthError("wrong job token")
        if hello.job != self.job:
            raise AuthError(f"hello for job {hello.job!r}, this relay serves {self.job!r}")
        if hello.rank in self._ranks:
            raise AuthError(f"rank {hello.rank} is already connected to this relay")

    def _from_rank(self, rank: _Rank, message) -> None:
        if isinstance(message, protocol.Heartbeat):
            rank.last_seen = trio.current_time()
            changed = False
            if message.step is not None and message.step != rank.step:
                rank.step, changed = message.step, True
            if message.samples is not None and message.samples != rank.samples:
                rank.samples, changed = message.samples, True
            if message.metrics and message.metrics != rank.metrics:
                rank.metrics, rank.metrics_changed, changed = dict(message.metrics), True, True
            if changed:
                self._changed[rank.rank] = rank
            # The relay answers for the coordinator (the rank's Welcome asks for
            # answers): a rank cannot be cut off from a relay on its own host,
            # and when the coordinator is cut off the agent's own deadline on it
            # stops the node's ranks (rankwarden.agent._agent).
            self._to_rank(rank, protocol.HeartbeatAck(seq=message.seq))
            return
        if isinstance(message, protocol.Hello):
            raise ProtocolError("second hello on an authenticated connection")
        rank.last_seen = trio.current_time()
        if isinstance(message, protocol.Goodbye):
            rank.clean = True
        self._flush(rank)
        self._send_up(protocol.RelayForward(rank=rank.rank, message=message))

    async def _write_rank(self, stream: trio.abc.Stream, receive_channel, done: trio.CancelScope) -> None:
        try:
            async for message in receive_channel:
                await stream.send_all(protocol.encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # Closed by a RelayDrop (after what was queued) or the connection broke: end the rank's connection.
        done.cancel()


async def _write(stream: trio.abc.Stream, receive_channel: trio.MemoryReceiveChannel) -> None:
    # One write per wakeup: a beat and the frames queued with it go together.
    try:
        async for message in receive_channel:
            frames = [protocol.encode(message)]
            while True:
                try:
                    frames.append(protocol.encode(receive_channel.receive_nowait()))
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await stream.send_all(b"".join(frames))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the reader sees the connection end and says why
