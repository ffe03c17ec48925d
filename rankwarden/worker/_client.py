"""The rank's side of the heartbeat connection: a plain socket and one daemon thread.

Training scripts are synchronous, so this is too: the thread wakes every
heartbeat interval (or when the coordinator sends something), sends a
``Heartbeat`` with the latest step the script reported, and handles
``Drain``/``Committed``/``Reject``. If the coordinator goes away, the rank exits:
a rank without its coordinator would otherwise train on unsupervised, holding
GPUs and a port that the next attempt needs.

"Goes away" includes going silent: across a network partition TCP neither
closes nor errors for many minutes. A coordinator that says so in its
``Welcome`` (``acks``) answers every heartbeat, and a heartbeat left
unanswered for ``RANKWARDEN_HEARTBEAT_TIMEOUT`` means the coordinator is
lost. The deadline runs from the oldest *unanswered heartbeat*, not from the
last frame received: a rank whose heartbeat thread was starved (a long call
holding the GIL) sent nothing, so it has nothing unanswered and is not
fooled into leaving a coordinator that is still there.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time

from rankwarden import protocol
from rankwarden.errors import AuthError, ProtocolError

__all__ = ["EXIT_COORDINATOR_LOST", "HeartbeatClient"]

#: Exit status of a rank whose coordinator vanished or rejected it.
EXIT_COORDINATOR_LOST = 75
#: A heartbeat thread that wakes this much (or an interval) later than it asked
#: was starved (a call holding the GIL), not answered late: it does not judge then.
_STARVED_AFTER = 0.5


class HeartbeatClient:
    def __init__(self, address: str, *, job: str, rank: int, attempt: int, token: str) -> None:
        host, _, port = address.rpartition(":")
        self._address = (host.strip("[]"), int(port))
        self._hello = protocol.Hello(
            version=protocol.PROTOCOL_VERSION,
            job=job,
            rank=rank,
            attempt=attempt,
            pid=os.getpid(),
            token=token,
            host=socket.gethostname(),
        )
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._decoder = protocol.FrameDecoder(protocol.ToRank)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.interval = 1.0
        self.step: int | None = None
        self.samples: int | None = None
        self.metrics: dict[str, float] = {}
        self.drain = threading.Event()
        self.drain_reason = ""
        #: Set by a script that handles drain itself (rankwarden.worker.graceful_stop).
        #: Otherwise a Drain terminates the rank at once, as SIGTERM would.
        self.drain_opt_in = False
        self.committed_step: int | None = None
        self._committed = threading.Condition()
        self._seq = 0
        #: When the oldest heartbeat not yet answered was sent (None: all answered).
        self._unanswered_since: float | None = None
        self._unanswered_seq = 0
        try:
            self.answer_timeout = float(os.environ.get("RANKWARDEN_HEARTBEAT_TIMEOUT") or 0)
        except ValueError:
            self.answer_timeout = 0.0
        #: The coordinator's first Welcome to this process (its resume decision).
        self.welcome: protocol.Welcome | None = None
        #: Live mode: called on this thread when the coordinator aborts our process group.
        self.live_abort = None
        self._reconfigure: protocol.Reconfigure | None = None
        self._reconfigured = threading.Condition()

    def connect(self, timeout: float = 30.0) -> protocol.Welcome:
        """Say hello and wait for the welcome; raise ProtocolError if rejected."""
        sock = socket.create_connection(self._address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._send(self._hello)
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ProtocolError("coordinator closed the connection before welcoming this rank")
            for message in self._decoder.feed(data):
                if isinstance(message, protocol.Reject):
                    raise AuthError(f"coordinator rejected this rank: {message.reason}")
                if isinstance(message, protocol.Welcome):
                    self.interval = message.heartbeat_interval
                    if self.welcome is None:
                        # The first welcome of this process decides its resume step; a
                        # reconnect (a pod under a new coordinator) has restored already.
                        self.welcome = message
                    sock.settimeout(None)
                    return message

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rankwarden-heartbeat", daemon=True)
        self._thread.start()

    def report(self, step: int | None, samples: int | None, metrics: dict[str, float]) -> None:
        # Plain attribute stores: the heartbeat thread reads whatever is newest.
        if samples is not None:
            self.samples = samples
        if metrics:
            self.metrics = metrics
        self.step = step

    def send(self, message) -> None:
        self._send(message)

    def wait_committed(self, step: int, timeout: float | None = None) -> bool:
        """Block until the coordinator has committed ``step`` (or a later one)."""
        with self._committed:
            return self._committed.wait_for(
                lambda: self.committed_step is not None and self.committed_step >= step, timeout
            )

    def wait_reconfigure(self, generation: int, timeout: float) -> protocol.Reconfigure | None:
        """Live mode: block until the coordinator's ``Reconfigure`` for ``generation`` (or later) arrives."""
        with self._reconfigured:
            self._reconfigured.wait_for(
                lambda: self._reconfigure is not None and self._reconfigure.generation >= generation, timeout
            )
            message = self._reconfigure
        return message if message is not None and message.generation >= generation else None

    def flush(self) -> None:
        """Send the newest progress now (at interpreter exit, so the last step is not lost)."""
        if self._closed.is_set():
            return
        try:
            self._send(protocol.Heartbeat(seq=self._next_seq(), step=self.step, samples=self.samples, metrics=self.metrics))
        except OSError:
            pass

    def goodbye(self, exit_code: int) -> None:
        """Tell the coordinator the script finished, then close (the process exits next)."""
        if self._closed.is_set():
            return
        self.flush()
        try:
            self._send(protocol.Goodbye(exit_code=exit_code))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    # -- the thread -----------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, message) -> None:
        frame = protocol.encode(message)
        with self._send_lock:
            assert self._sock is not None
            self._sock.sendall(frame)

    def _run(self) -> None:
        while True:
            why = self._beat()
            if why is None or self._closed.is_set():
                return
            if not self.reconnect(why):
                self._lost(why)
                return

    def _beat(self) -> str | None:
        """Heartbeat until the connection ends; return why it ended (None: closed by us)."""
        sock = self._sock
        assert sock is not None
        next_beat = time.monotonic()
        acks = self.welcome is not None and self.welcome.acks and self.answer_timeout > 0
        self._unanswered_since = None
        try:
            while not self._closed.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    seq = self._next_seq()
                    self._send(protocol.Heartbeat(seq=seq, step=self.step, samples=self.samples, metrics=self.metrics))
                    if acks and self._unanswered_since is None:
                        self._unanswered_since, self._unanswered_seq = now, seq
                    next_beat = now + self.interval
                wake = next_beat
                if self._unanswered_since is not None:
                    wake = min(wake, self._unanswered_since + self.answer_timeout)
                readable, _, _ = select.select([sock], [], [], max(0.0, wake - time.monotonic()))
                if readable:
                    data = sock.recv(65536)
                    if not data:
                        return "the coordinator closed the heartbeat connection"
                    for message in self._decoder.feed(data):
                        self._handle(message)
                elif self._unanswered_since is not None and (now := time.monotonic()) >= (
                        self._unanswered_since + self.answer_timeout):
                    if now - wake > max(self.interval, _STARVED_AFTER):
                        # This thread woke far later than it asked to: a call
                        # holding the GIL starved it, and the answer may be
                        # unread only because no heartbeat went out meanwhile
                        # (the coordinator answers a few per timeout, not every
                        # one). The silence was ours: ask again, judge later.
                        self._unanswered_since = None
                        next_beat = now
                        continue
                    return (f"the coordinator has not answered a heartbeat for {self.answer_timeout:g}s "
                            "(heartbeat_timeout): it is gone or cut off")
        except (OSError, ValueError, ProtocolError) as exc:
            if not self._closed.is_set():
                return f"heartbeat connection failed: {exc}"
        return None

    def reconnect(self, why: str) -> bool:
        """Pods outlive a coordinator that restarts: the next one adopts them.

        With ``RANKWARDEN_RECONNECT_GRACE`` set (the pod launcher sets it), keep
        training and keep trying to say hello again until the grace runs out.
        A local rank has no such grace: its coordinator's death is its own."""
        grace = float(os.environ.get("RANKWARDEN_RECONNECT_GRACE") or 0)
        if grace <= 0:
            return False
        sys.stderr.write(f"rankwarden: {why}; reconnecting for up to {grace:g}s\n")
        sys.stderr.flush()
        deadline = time.monotonic() + grace
        delay = 0.2
        while not self._closed.is_set() and time.monotonic() < deadline:
            with self._send_lock:
                if self._sock is not None:
                    self._sock.close()
            self._decoder = protocol.FrameDecoder(protocol.ToRank)
            try:
                self.connect(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
            except (OSError, ProtocolError):
                # Refused, or rejected: a new coordinator rejects ranks until it
                # has adopted them, so a rejection is retried too, within the grace.
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
                continue
            sys.stderr.write("rankwarden: reconnected to the coordinator\n")
            sys.stderr.flush()
            return True
        return False

    def _handle(self, message) -> None:
        if isinstance(message, protocol.Drain):
            self.drain_reason = message.reason
            self.drain.set()
            if not self.drain_opt_in:
                os.kill(os.getpid(), signal.SIGTERM)
        elif isinstance(message, protocol.HeartbeatAck):
            # Later heartbeats may still be in flight: the deadline moves to the
            # next unanswered one, which was sent no earlier than now minus an interval.
            if self._unanswered_since is not None and message.seq >= self._unanswered_seq:
                self._unanswered_since = None if message.seq >= self._seq else time.monotonic()
                self._unanswered_seq = self._seq
        elif isinstance(message, protocol.Committed):
            with self._committed:
                self.committed_step = max(message.step, self.committed_step or message.step)
                self._committed.notify_all()
        elif isinstance(message, protocol.Reconfigure):
            with self._reconfigured:
                self._reconfigure = message
                self._reconfigured.notify_all()
        elif isinstance(message, protocol.Abort):
            if self.live_abort is not None:
                self.live_abort(message)
        elif isinstance(message, protocol.Reject):
            self._closed.set()
            self._lost_now(f"the coordinator dropped this rank: {message.reason}")

    def _lost(self, why: str) -> None:
        if self._closed.is_set():
            return
        self._lost_now(why)

    def _lost_now(self, why: str) -> None:
        sys.stderr.write(f"rankwarden: {why}; exiting\n")
        sys.stderr.flush()
        if os.getpgrp() == os.getpid():
            # The rank leads its own process group (the launcher made it so):
            # take its children (data loaders, helpers) down with it.
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(EXIT_COORDINATOR_LOST)
