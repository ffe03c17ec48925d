"""Fakes for the coordinator's seams, for tests and for users' own tests.

``MemoryListener`` stands in for the heartbeat TCP listener and
``open_fake_launcher`` for the process launcher. Fake ranks are Trio tasks
that speak the real heartbeat protocol over in-memory streams, so the whole
coordinator runs under ``trio.testing.MockClock`` and timing is exact::

    async def rank(fake):            # a rank that heartbeats twice, then freezes
        await fake.hello()
        for step in (1, 2):
            await trio.sleep(1)
            await fake.heartbeat(step)
        await trio.sleep_forever()

    listener = MemoryListener()
    async with open_fake_launcher(rank, listener) as launcher:
        snapshot = await Coordinator(spec, launcher=launcher, listeners=[listener]).run()

Fake ranks report CPU like local processes (``ReportsCpu``): a rank inside
``await fake.busy(10)`` is in a call that holds the GIL (no heartbeats, one
CPU used), ``await fake.sigstop()`` is a stopped process, and a rank merely
awaiting is asleep. ``open_fake_launcher(..., reports_cpu=False)`` gives
ranks that do not report CPU, as pods do.

``PowerLossFiles`` (for ``LocalBackend``'s file-system seam) and
``PowerLossObjectStore`` (around an fsspec filesystem) model what a power cut
or a killed writer leaves of a checkpoint save; see ``rankwarden._powerloss``.
"""

from __future__ import annotations

import itertools
import os
import signal
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import trio
import trio.testing

from rankwarden import protocol
from rankwarden._powerloss import CrashState, PowerLossFiles, PowerLossObjectStore
from rankwarden.launcher import CpuSample, ExitStatus, LaunchRequest

__all__ = [
    "CrashState",
    "FakeLauncher",
    "FakeLocalProcess",
    "FakeProcess",
    "FakeRank",
    "MemoryListener",
    "PowerLossFiles",
    "PowerLossObjectStore",
    "leftover_processes",
    "open_fake_launcher",
]


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are in-memory stream pairs."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](float("inf"))

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()


class FakeRank:
    """What a fake rank's behaviour function gets: its request and the protocol, in memory."""

    def __init__(self, request: LaunchRequest, listener: MemoryListener) -> None:
        self.request = request
        self.rank = request.rank
        self.attempt = request.attempt
        self.env = request.env
        self._listener = listener
        self._stream: trio.abc.Stream | None = None
        self._decoder = protocol.FrameDecoder(protocol.ToRank)
        self._seq = 0
        self.received: list = []
        #: True: SIGTERM is ignored, so only SIGKILL after the grace ends the rank.
        self.ignore_sigterm = False
        #: What ``FakeLocalProcess.sample`` reports: a state letter and CPU seconds.
        self.cpu_state = "S"
        self._cpu = 0.0
        self._running_since: float | None = None
        self._cpu_share = 1.0

    def cpu_seconds(self) -> float:
        if self._running_since is None:
            return self._cpu
        return self._cpu + (trio.current_time() - self._running_since) * self._cpu_share

    async def busy(self, seconds: float, *, cpu_share: float = 1.0) -> None:
        """A call that holds the GIL for ``seconds``: nothing is sent, ``cpu_share`` of a CPU is used."""
        self._running_since, self._cpu_share, self.cpu_state = trio.current_time(), cpu_share, "R"
        try:
            await trio.sleep(seconds)
        finally:
            if self.cpu_state == "R":
                self._cpu, self._running_since, self.cpu_state = self.cpu_seconds(), None, "S"

    def stopped(self) -> None:
        """As SIGSTOP leaves a process: state T, its CPU time frozen."""
        self._cpu, self._running_since, self.cpu_state = self.cpu_seconds(), None, "T"

    async def sigstop(self) -> None:
        """Stop here as a SIGSTOPped process does, and never go on."""
        self.stopped()
        await trio.sleep_forever()

    async def connect(self) -> None:
        self._stream = await self._listener.connect()

    async def send(self, message) -> None:
        if self._stream is None:
            await self.connect()
        assert self._stream is not None
        await self._stream.send_all(protocol.encode(message))

    async def send_raw(self, data: bytes) -> None:
        if self._stream is None:
            await self.connect()
        assert self._stream is not None
        await self._stream.send_all(data)

    async def hello(self, **overrides) -> protocol.ToRank:
        fields = dict(
            version=protocol.PROTOCOL_VERSION,
            job=self.env["RANKWARDEN_JOB_ID"],
            rank=self.rank,
            attempt=self.attempt,
            pid=os.getpid(),
            token=self.env["RANKWARDEN_TOKEN"],
        )
        fields.update(overrides)
        await self.send(protocol.Hello(**fields))
        return await self.receive()

    async def receive(self) -> protocol.ToRank:
        """The next message, skipping ``HeartbeatAck`` (the worker's thread consumes those: a
        script never sees them; they are in ``received`` all the same)."""
        assert self._stream is not None
        while True:
            data = await self._stream.receive_some(65536)
            if not data:
                raise trio.EndOfChannel("coordinator closed the connection")
            messages = self._decoder.feed(data)
            self.received.extend(messages)
            messages = [m for m in messages if not isinstance(m, protocol.HeartbeatAck)]
            if messages:
                return messages[0]

    async def heartbeat(self, step: int | None = None, **metrics: float) -> None:
        self._seq += 1
        await self.send(protocol.Heartbeat(seq=self._seq, step=step, metrics=metrics))

    async def goodbye(self, exit_code: int = 0) -> None:
        await self.send(protocol.Goodbye(exit_code=exit_code))
        await self.close()

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None


Behaviour = Callable[[FakeRank], Awaitable[int]]


class FakeProcess:
    """A fake rank's process; it does not report CPU (as a pod does not): see ``FakeLocalProcess``."""

    def __init__(self, request: LaunchRequest, pid: int) -> None:
        self.request = request
        self._pid = pid
        self.status: ExitStatus | None = None
        self.signals: list[int] = []
        self.started_at = trio.current_time()
        self.ended_at: float | None = None
        self._done = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._killed_by: int | None = None
        self.fake: FakeRank | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    def _finish(self, status: ExitStatus) -> None:
        if self.status is None:
            self.status = status
            self.ended_at = trio.current_time()
            self._done.set()

    def signal(self, sig: int) -> None:
        if self.status is not None:
            return
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not (self.fake and self.fake.ignore_sigterm)):
            self._killed_by = sig
            if self._scope is not None:
                self._scope.cancel()

    async def wait(self) -> ExitStatus:
        await self._done.wait()
        assert self.status is not None
        return self.status

    async def stop(self, grace: float) -> ExitStatus:
        with trio.CancelScope(shield=True):
            if self.status is None:
                self.signal(signal.SIGTERM)
                with trio.move_on_after(grace):
                    return await self.wait()
                self.signal(signal.SIGKILL)
            return await self.wait()


class FakeLocalProcess(FakeProcess):
    """A fake rank that reports CPU as a local process does (``ReportsCpu``)."""

    def sample(self) -> CpuSample | None:
        if self.status is not None or self.fake is None:
            return None
        return CpuSample(self.fake.cpu_state, self.fake.cpu_seconds())

    def signal(self, sig: int) -> None:
        if sig == signal.SIGSTOP and self.status is None and self.fake is not None:
            self.fake.stopped()
        super().signal(sig)


class FakeLauncher:
    """Runs each rank's behaviour as a task; ``processes`` lists every launch in order."""

    def __init__(
        self, behaviour: Behaviour, listener: MemoryListener, nursery: trio.Nursery, *, reports_cpu: bool = True
    ) -> None:
        self._behaviour = behaviour
        self._process_type = FakeLocalProcess if reports_cpu else FakeProcess
        self._listener = listener
        self._nursery = nursery
        self._pids = itertools.count(1000)
        self.processes: list[FakeProcess] = []

    async def start(self, request: LaunchRequest) -> FakeProcess:
        process = self._process_type(request, next(self._pids))
        process.fake = FakeRank(request, self._listener)
        self.processes.append(process)
        self._nursery.start_soon(self._run, process)
        await trio.lowlevel.checkpoint()
        return process

    async def _run(self, process: FakeProcess) -> None:
        assert process.fake is not None
        with trio.CancelScope() as scope:
            process._scope = scope
            code = await self._behaviour(process.fake)
            process._finish(ExitStatus(code=code))
        with trio.CancelScope(shield=True):
            await process.fake.close()
        if process.status is None:
            process._finish(ExitStatus(signal=process._killed_by or signal.SIGKILL))


@asynccontextmanager
async def open_fake_launcher(
    behaviour: Behaviour, listener: MemoryListener, *, reports_cpu: bool = True
) -> AsyncIterator[FakeLauncher]:
    async with trio.open_nursery() as nursery:
        yield FakeLauncher(behaviour, listener, nursery, reports_cpu=reports_cpu)
        nursery.cancel_scope.cancel()


def leftover_processes(env_key: str, env_value_prefix: str) -> list[int]:
    """PIDs of live processes whose environment has ``env_key`` starting with the prefix
    (e.g. ``RANKWARDEN_JOB_ID``), plus zombie children of this process. Linux only."""
    needle = f"{env_key}={env_value_prefix}".encode()
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            state, ppid = stat.rsplit(b")", 1)[1].split()[:2]
            if state == b"Z" and int(ppid) == me:
                found.append(int(entry))
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if any(var.startswith(needle) for var in f.read().split(b"\0")):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found
