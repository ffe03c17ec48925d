"""The node agent: connect to the coordinator, run the ranks it asks for, report exactly how they end.

One agent lifetime is a loop of *sessions*. A session is one authenticated
connection; everything it started lives in its nursery, so when the session
ends, for whatever reason, every rank it started has been killed and reaped
before the agent does anything else. That is the rule that keeps a healed
partition from ever running two copies of one rank: an agent that has lost its
coordinator has no ranks left (and the ranks, which heartbeat the coordinator
directly, stop themselves too).

Deadlines (one cancel scope each, moved by frames, nothing polls):

    waiting for the welcome          connect + heartbeat_timeout (at least 10 s)
    in a session                     last frame from the coordinator + heartbeat_timeout
    between sessions (rejoining)     the first failure + join_timeout

The coordinator answers every ``AgentHeartbeat`` with ``AgentPong``, so "no
frame for heartbeat_timeout" is a lost coordinator, be it dead, frozen or
cut off.

Rank output goes through pipes that the agent reads and forwards as
``AgentOutput`` frames; the coordinator appends them to the rank's files in
its job directory. A rank's ``AgentExited`` is sent only after its pipes
reached end of file (or a second passed), so the coordinator's copy of its
stderr is complete when it judges the exit.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from typing import Callable

import msgspec
import trio

from rankwarden import protocol
from rankwarden.agent._relay import Relay
from rankwarden.errors import AuthError, ProtocolError
from rankwarden.launcher._base import LaunchRequest
from rankwarden.launcher._local import LocalProcess

__all__ = ["AgentConfig", "AgentResult", "rank_coordinator_address", "run_agent"]

log = logging.getLogger(__name__)

#: Exit status of an agent (and of ``rankwarden run`` on that node) whose coordinator is gone for good.
EXIT_COORDINATOR_LOST = 75
_OUTPUT_CHUNK = 65536
_SEND_QUEUE = 64
#: How long a rank's pipes may stay open after the rank exited (a child of it holds them).
_OUTPUT_DRAIN = 1.0
_CONNECT_TIMEOUT = 5.0
#: Rejections that may pass: the slot is held until the coordinator declares its host lost.
_RETRY_REJECTS = ("is already held by", "node slots are taken")


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True):
    endpoint: str  # HOST:PORT of the coordinator's agent endpoint
    token: str
    node_rank: int = -1
    nproc: int = 1
    #: Address of this node that other nodes can reach (MASTER_ADDR if node 0); empty: as seen by the coordinator.
    address: str = ""
    #: How long to keep trying to reach the coordinator, at start and after losing it.
    join_timeout: float = 300.0
    #: SIGTERM -> SIGKILL grace when the coordinator is gone and ranks must go.
    kill_grace: float = 0.0
    #: Heartbeat aggregation: the node's ranks heartbeat a relay in this agent,
    #: which sends the coordinator one frame per interval for all of them
    #: (``rankwarden.agent._relay``). False: each rank heartbeats the coordinator.
    relay: bool = True


class AgentResult(msgspec.Struct, frozen=True):
    """How the agent ended: ``ok`` is the job's success as the coordinator said it."""

    ok: bool
    reason: str
    exit_code: int


def rank_coordinator_address(start: protocol.AgentStart) -> str:
    """Where a rank started by this agent sends its heartbeats.

    Today: straight to the coordinator, the address it put in the rank's env.
    The one place a local relay (heartbeat aggregation) plugs in."""
    return start.env.get("RANKWARDEN_COORDINATOR", "")


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    try:
        return float(env.get(name) or default)
    except ValueError:
        return default


class _SessionEnded(Exception):
    def __init__(self, reason: str, *, final: AgentResult | None = None, retry: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final
        self.retry = retry


async def run_agent(config: AgentConfig, *, connect: Callable | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> AgentResult:
    """Serve the coordinator at ``config.endpoint`` until it shuts the job down or is gone for ``join_timeout``."""
    host, _, port = config.endpoint.rpartition(":")
    connect = connect or (lambda: trio.open_tcp_stream(host.strip("[]"), int(port)))
    started = False
    lost_since = trio.current_time()
    why = "not connected yet"
    delay = 0.2
    while True:
        if trio.current_time() >= lost_since + config.join_timeout:
            reason = f"could not reach the coordinator at {config.endpoint} for {config.join_timeout:g}s ({why})"
            log.error("agent node=%d: %s; exiting", config.node_rank, reason)
            return AgentResult(False, reason, EXIT_COORDINATOR_LOST)
        try:
            # Short: across a partition a SYN goes nowhere, and a healed host should rejoin promptly.
            with trio.fail_after(max(0.1, min(_CONNECT_TIMEOUT, lost_since + config.join_timeout - trio.current_time()))):
                stream = await connect()
        except (OSError, trio.TooSlowError) as exc:
            why = f"connect: {exc or 'timed out'}"
        else:
            session = _Session(config, stream)
            try:
                result = await session.run(on_welcome=None if started else task_status.started)
            except _SessionEnded as ended:
                why = ended.reason
                if ended.final is not None:
                    return ended.final
                if not ended.retry:
                    return AgentResult(False, ended.reason, EXIT_COORDINATOR_LOST)
            else:
                return result
            if session.welcomed:
                started = True
                lost_since = trio.current_time()
                delay = 0.2
                log.warning("agent node=%d: %s; rejoining for up to %gs", config.node_rank, why, config.join_timeout)
        await trio.sleep(min(delay, max(0.0, lost_since + config.join_timeout - trio.current_time())))
        delay = min(delay * 2, 2.0)


class _Session:
    """One connection to the coordinator and the ranks started through it."""

    def __init__(self, config: AgentConfig, stream: trio.abc.Stream) -> None:
        self.config = config
        self.stream = stream
        self.welcomed = False
        self.node_rank = config.node_rank
        self._send, self._outbox = trio.open_memory_channel(_SEND_QUEUE)
        self._ranks: dict[str, LocalProcess] = {}
        self._decoder = protocol.FrameDecoder(protocol.ToAgent)
        self._timeout = 10.0
        self._interval = 1.0
        #: The node's relay while it serves, and the coordinator address it relays to.
        self._relay: Relay | None = None
        self._relay_upstream = ""

    async def run(self, on_welcome=None) -> AgentResult:
        """Raises _SessionEnded always: its ``final`` is set when the job is over."""
        config = self.config
        async with self.stream:
            hello = protocol.AgentHello(
                version=protocol.PROTOCOL_VERSION, token=config.token, node_rank=config.node_rank,
                nproc=config.nproc, host=socket.gethostname(), pid=os.getpid(), address=config.address,
            )
            try:
                await self.stream.send_all(protocol.encode(hello))
                welcome, early = await self._welcome()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _SessionEnded(f"connection failed: {exc}") from None
            except trio.TooSlowError:
                raise _SessionEnded("connected, but no agent_welcome came back") from None
            except ProtocolError as exc:
                raise _SessionEnded(str(exc), retry=not isinstance(exc, AuthError)) from None
            self.welcomed = True
            self.node_rank = welcome.node_rank
            self._timeout, self._interval = welcome.heartbeat_timeout, welcome.heartbeat_interval
            log.info("agent node=%d: joined job %s", self.node_rank, welcome.job)
            if on_welcome is not None:
                on_welcome(welcome)
            ended: _SessionEnded | None = None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._heartbeat)
                    try:
                        await self._read(nursery, early)
                    except _SessionEnded as exc:
                        ended = exc  # raised out of the nursery it would come wrapped in a group
                    nursery.cancel_scope.cancel()
                assert ended is not None
                raise ended
            finally:
                # Whatever ended the session: no rank of it outlives it.
                with trio.CancelScope(shield=True):
                    await self._kill_all()

    async def _welcome(self) -> tuple[protocol.AgentWelcome, list]:
        """The welcome, and what came in the same read after it (the first AgentStart, often)."""
        with trio.fail_after(max(10.0, self._timeout)):
            while True:
                data = await self.stream.receive_some(_OUTPUT_CHUNK)
                if not data:
                    raise ProtocolError("the coordinator closed the connection before welcoming this agent")
                messages = self._decoder.feed(data)
                for i, message in enumerate(messages):
                    if isinstance(message, protocol.Reject):
                        # Only a slot that is still held (its host not yet declared lost) may
                        # free up; a wrong secret, version or size will not change by retrying.
                        retry = any(why in message.reason for why in _RETRY_REJECTS)
                        error = ProtocolError if retry else AuthError
                        raise error(f"the coordinator refused this agent: {message.reason}")
                    if isinstance(message, protocol.AgentWelcome):
                        return message, messages[i + 1:]
                    raise ProtocolError(f"expected agent_welcome, got {type(message).__name__}")

    async def _read(self, nursery: trio.Nursery, early: list) -> None:
        await self._handle(nursery, early)
        while True:
            with trio.move_on_after(self._timeout) as scope:
                data = await self._receive()
            if scope.cancelled_caught:
                raise _SessionEnded(f"no frame from the coordinator for {self._timeout:g}s (heartbeat_timeout)")
            if not data:
                raise _SessionEnded("the coordinator closed the connection")
            try:
                messages = self._decoder.feed(data)
            except ProtocolError as exc:
                raise _SessionEnded(f"bad frame from the coordinator: {exc}") from None
            await self._handle(nursery, messages)

    async def _handle(self, nursery: trio.Nursery, messages: list) -> None:
        for message in messages:
            if isinstance(message, protocol.AgentStart):
                await self._start(nursery, message)
            elif isinstance(message, protocol.AgentStop):
                process = self._ranks.get(message.key)
                if process is not None:
                    nursery.start_soon(process.stop, message.grace)
            elif isinstance(message, protocol.AgentSignal):
                process = self._ranks.get(message.key)
                if process is not None:
                    process.signal(message.signal)
            elif isinstance(message, protocol.AgentShutdown):
                log.info("agent node=%d: the job ended (%s)", self.node_rank, message.reason or "ok")
                await self._kill_all()
                raise _SessionEnded(message.reason, final=AgentResult(message.ok, message.reason,
                                                                     0 if message.ok else 1))
            elif isinstance(message, protocol.Reject):
                raise _SessionEnded(f"the coordinator dropped this agent: {message.reason}")

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive_some(_OUTPUT_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _SessionEnded(f"connection to the coordinator failed: {exc}") from None

    async def _writer(self) -> None:
        try:
            async for message in self._outbox:
                await self.stream.send_all(protocol.encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the reader notices (closed, or silent until its deadline)

    async def _heartbeat(self) -> None:
        seq = 0
        while True:
            seq += 1
            cpu = {}
            for key, process in list(self._ranks.items()):
                sample = process.sample()  # one small read of /proc per rank
                if sample is not None:
                    cpu[key] = protocol.RankCpu(sample.state, sample.cpu_seconds)
            await self._send.send(protocol.AgentHeartbeat(seq=seq, cpu=cpu))
            await trio.sleep(self._interval)

    async def _start(self, nursery: trio.Nursery, start: protocol.AgentStart) -> None:
        env = dict(os.environ)
        env.update(start.env)
        env["RANKWARDEN_COORDINATOR"] = await self._rank_coordinator(nursery, start)
        # The bootstrap checks that its parent is who started it (PR_SET_PDEATHSIG): this agent.
        env["RANKWARDEN_COORDINATOR_PID"] = str(os.getpid())
        env.pop("TORCHELASTIC_ERROR_FILE", None)  # a path on the coordinator's host
        request = LaunchRequest(job_id=start.env.get("RANKWARDEN_JOB_ID", ""), rank=start.rank,
                                local_rank=start.local_rank, attempt=start.attempt, argv=start.argv, env=env,
                                cwd=start.cwd, stdout_path="", stderr_path="")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # Forked on the loop thread, as ProcessLauncher does (PR_SET_PDEATHSIG follows the thread).
            process = subprocess.Popen(start.argv, env=env, cwd=start.cwd, stdin=subprocess.DEVNULL,
                                       stdout=out_w, stderr=err_w, start_new_session=True)
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            await self._send.send(protocol.AgentExited(
                key=start.key, started=False, reason="LaunchFailed",
                message=f"{start.argv[0]!r}: {exc.strerror or exc}"))
            return
        finally:
            os.close(out_w)
            os.close(err_w)
        local = LocalProcess(process, request)
        self._ranks[start.key] = local
        await self._send.send(protocol.AgentStarted(key=start.key, pid=process.pid))
        log.info("agent node=%d: rank %d (attempt %d) started, pid %d",
                 self.node_rank, start.rank, start.attempt, process.pid)
        nursery.start_soon(self._watch, start.key, local, out_r, err_r)

    async def _rank_coordinator(self, nursery: trio.Nursery, start: protocol.AgentStart) -> str:
        """Where this rank heartbeats: the node's relay (started with the
        session's first rank, one per coordinator address), or the coordinator
        itself when aggregation is off or the relay cannot reach it."""
        upstream = rank_coordinator_address(start)
        if not self.config.relay or not upstream:
            return upstream
        if self._relay is None or self._relay_upstream != upstream:
            env = start.env
            relay = Relay(
                upstream, job=env.get("RANKWARDEN_JOB_ID", ""), token=env.get("RANKWARDEN_TOKEN", ""),
                heartbeat_interval=_env_float(env, "RANKWARDEN_HEARTBEAT_INTERVAL", self._interval),
                heartbeat_timeout=_env_float(env, "RANKWARDEN_HEARTBEAT_TIMEOUT", self._timeout),
                node=f"{self.node_rank} ({socket.gethostname()})",
            )
            try:
                await nursery.start(self._serve_relay, relay)
            except OSError as exc:
                log.warning("agent node=%d: no relay (%s); ranks heartbeat the coordinator directly",
                            self.node_rank, exc)
                return upstream
            self._relay, self._relay_upstream = relay, upstream
        return self._relay.address

    async def _serve_relay(self, relay: Relay, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        reason = await relay.serve(task_status=task_status)
        # The coordinator connection ended, and the relay closed its ranks'
        # connections (they end themselves). The next start makes a new one.
        log.info("agent node=%d: relay ended: %s", self.node_rank, reason)
        if self._relay is relay:
            self._relay, self._relay_upstream = None, ""

    async def _watch(self, key: str, process: LocalProcess, out_fd: int, err_fd: int) -> None:
        drained = [trio.Event(), trio.Event()]
        async with trio.open_nursery() as pumps:
            pumps.start_soon(self._pump, key, "stdout", out_fd, drained[0])
            pumps.start_soon(self._pump, key, "stderr", err_fd, drained[1])
            status = await process.wait()
            with trio.move_on_after(_OUTPUT_DRAIN):
                for event in drained:
                    await event.wait()
            pumps.cancel_scope.cancel()
        self._ranks.pop(key, None)
        await self._send.send(protocol.AgentExited(key=key, code=status.code, signal=status.signal,
                                                   reason=status.reason, message=status.message,
                                                   started=status.started))

    async def _pump(self, key: str, stream_name: str, fd: int, done: trio.Event) -> None:
        stream = trio.lowlevel.FdStream(fd)
        try:
            async with stream:
                while data := await stream.receive_some(_OUTPUT_CHUNK):
                    await self._send.send(protocol.AgentOutput(key=key, stream=stream_name, data=data))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            done.set()

    async def _kill_all(self) -> None:
        ranks = list(self._ranks.values())
        if not ranks:
            return
        log.warning("agent node=%d: stopping %d rank(s)", self.node_rank, len(ranks))
        async with trio.open_nursery() as nursery:
            for process in ranks:
                nursery.start_soon(process.stop, self.config.kill_grace)
