"""AgentLauncher: ranks on other hosts, started through node agents.

The coordinator sees one more ``Launcher``: ``start`` returns a
``RankProcess`` whose ``wait`` gives the ``ExitStatus`` the agent reported,
field for field. Rank ``r`` runs on node ``r // nproc`` as its local rank
``r % nproc``, with torchrun's multi-node environment.

Node membership is the launcher's own business (the coordinator knows ranks,
not hosts). An agent holds its node's slot from its ``AgentHello`` until its
connection ends. Each connection has one deadline, the last frame plus
``heartbeat_timeout``, moved by every frame: an agent that dies (connection
closed), freezes (SIGSTOP) or is cut off (a partition: nothing arrives) loses
its slot, and every rank of that node ends at once with an ``ExitStatus``
whose ``reason`` is ``NodeLost`` and whose message names the node, its host
and the cause. The coordinator's restart policy does the rest: the group is
stopped and restarted, and ``start`` of a rank on the lost node waits up to
``join_timeout`` for an agent to take the slot again (the same host healed,
or a replacement started with the same ``--node-rank``, or with none).

    agent connection            deadline
    before its hello            accept + HELLO_READ_TIMEOUT
    joined                      last frame + heartbeat_timeout
    a rank waiting for a node   start + join_timeout  (LaunchError then)

Elastic node counts (``min_nodes < nnodes``, ``--nnodes MIN:MAX``): the
coordinator asks ``size_attempt`` before each group attempt. It waits up to
``join_timeout`` for MIN nodes; on the first attempt it then waits up to
``last_call`` more for the rest (torchrun's ``last_call_timeout``); later
attempts take the nodes joined at that moment without waiting, so a lost node
costs no join timeout while MIN remain. The attempt's group is those nodes in
slot order: group rank ``g`` is the ``g``-th of them, rank ``r`` runs on group
rank ``r // nproc`` (ranks are contiguous whatever slots are empty), and
``GROUP_WORLD_SIZE`` is the group's size. A node that joins while an attempt
runs waits for the next restart (torchrun instead restarts a healthy group to
take it in; we never stop training for it).

``serve`` runs the agents' endpoint; it belongs in the nursery that also runs
the coordinator, which keeps this object free of nurseries of its own.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from typing import BinaryIO, Callable

import msgspec
import trio

from rankwarden import protocol
from rankwarden._frames import read_first
from rankwarden.errors import AuthError, LaunchError, ProtocolError
from rankwarden.launcher._base import CpuSample, ExitStatus, LaunchRequest

__all__ = ["AgentLauncher", "AgentRankProcess", "NodeInfo", "NODE_LOST"]

log = logging.getLogger(__name__)

#: ``ExitStatus.reason`` of a rank whose node was lost.
NODE_LOST = "NodeLost"
HELLO_READ_TIMEOUT = 10.0
#: torchrun's default ``last_call_timeout``: the first attempt's wait for more than MIN nodes.
LAST_CALL_TIMEOUT = 30.0
_SEND_QUEUE = 256
_RECEIVE_SIZE = 65536
#: Variables the agent sets for itself, never copied from the coordinator's host.
_HOST_LOCAL = {"RANKWARDEN_COORDINATOR_PID", "TORCHELASTIC_ERROR_FILE"}
#: What a rank's env always carries from the coordinator, even where the agent's own
#: environment could hold the same value: torchrun's and rankwarden's variables.
_ALWAYS = {"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
           "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "OMP_NUM_THREADS", "PYTHONUNBUFFERED",
           "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
_ALWAYS_PREFIXES = ("RANKWARDEN_", "TORCHELASTIC_", "MASTER_")


class NodeInfo(msgspec.Struct, frozen=True):
    """A frozen view of one node slot."""

    node_rank: int
    joined: bool
    host: str = ""
    address: str = ""
    pid: int = 0
    ranks: int = 0


class AgentRankProcess:
    """A rank on an agent's host. Ends when the agent reports its exit, or when the node is lost."""

    def __init__(self, node: "_Node", key: str, request: LaunchRequest) -> None:
        self._node = node
        self.key = key
        self.request = request
        self._pid: int | None = None
        self._status: ExitStatus | None = None
        self._done = trio.Event()
        self._started = trio.Event()
        self._files: dict[str, BinaryIO] = {}
        self._cpu: CpuSample | None = None
        for stream, path in (("stdout", request.stdout_path), ("stderr", request.stderr_path)):
            if path:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self._files[stream] = open(path, "ab")

    @property
    def pid(self) -> int | None:
        """The rank's pid on its own host."""
        return self._pid

    @property
    def node_rank(self) -> int:
        return self._node.node_rank

    async def wait(self) -> ExitStatus:
        await self._done.wait()
        assert self._status is not None
        return self._status

    async def stop(self, grace: float) -> ExitStatus:
        with trio.CancelScope(shield=True):
            if not self._done.is_set():
                self._node.send(protocol.AgentStop(key=self.key, grace=grace))
                # The agent reports the exit after SIGTERM, grace, SIGKILL; if it
                # cannot, its connection's deadline loses the node and ends this.
            return await self.wait()

    def signal(self, sig: int) -> None:
        if not self._done.is_set():
            self._node.send(protocol.AgentSignal(key=self.key, signal=sig))

    def sample(self) -> CpuSample | None:
        """The newest sample its agent sent (``ReportsCpu``): at most a heartbeat
        interval old, and frozen when the agent goes silent, so a lost host never
        looks busy."""
        return None if self._done.is_set() else self._cpu

    # -- from the agent's connection ----------------------------------------------------

    def _on_started(self, pid: int) -> None:
        self._pid = pid
        # Known without asking: a process just started has used no CPU. A rank that
        # goes silent before its agent's next sample still has a mark to be judged from
        # (its import time then counts as work: a frozen one is caught one window later).
        self._cpu = CpuSample("R", 0.0)
        self._started.set()

    def _on_output(self, stream: str, data: bytes) -> None:
        file = self._files.get(stream)
        if file is not None and not file.closed:
            file.write(data)
            file.flush()

    def _resolve(self, status: ExitStatus) -> None:
        if self._done.is_set():
            return
        self._status = status
        for file in self._files.values():
            file.close()
        self._done.set()
        self._started.set()


class _Node:
    def __init__(self, node_rank: int, hello: protocol.AgentHello, address: str,
                 send_channel: trio.MemorySendChannel, cancel_scope: trio.CancelScope) -> None:
        self.node_rank = node_rank
        self.host = hello.host
        self.pid = hello.pid
        self.address = address
        self.processes: dict[str, AgentRankProcess] = {}
        self.lost = False
        self._send_channel = send_channel
        self._cancel_scope = cancel_scope

    def describe(self) -> str:
        where = self.host if self.host == self.address or not self.host else f"{self.host}, {self.address}"
        return f"node {self.node_rank} ({where})"

    def send(self, message) -> bool:
        try:
            self._send_channel.send_nowait(message)
            return True
        except trio.WouldBlock:
            log.warning("%s is not reading; dropping it", self.describe())
            self._cancel_scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    def lose(self, reason: str) -> None:
        self.lost = True
        for process in list(self.processes.values()):
            process._resolve(ExitStatus(reason=NODE_LOST, message=reason))
        self.processes.clear()
        self._cancel_scope.cancel()


class AgentLauncher:
    """Starts ranks through the node agents of a job of ``nnodes`` x ``nproc`` ranks."""

    def __init__(self, *, job_id: str, nnodes: int, nproc: int, token: str, heartbeat_timeout: float,
                 heartbeat_interval: float, join_timeout: float = 300.0, min_nodes: int | None = None,
                 last_call: float = LAST_CALL_TIMEOUT, on_change: Callable[[str], None] | None = None) -> None:
        """``nnodes`` is the most nodes (MAX); ``min_nodes`` the fewest an attempt runs
        on (MIN, default MAX: a fixed node count). ``on_change`` gets one line for
        each node that joins or is lost, for each node ranks start waiting for,
        and for each attempt's node count when it is elastic (the CLI prints them)."""
        min_nodes = nnodes if min_nodes is None else min_nodes
        if nproc < 1 or not 1 <= min_nodes <= nnodes:
            raise ValueError(f"expected 1 <= min_nodes <= nnodes and nproc >= 1, got min_nodes={min_nodes}, "
                             f"nnodes={nnodes}, nproc={nproc}")
        self.job_id = job_id
        self.nnodes = nnodes
        self.min_nodes = min_nodes
        self.last_call = last_call
        #: Elastic: the nodes of the current attempt, by group rank (None: not sized yet).
        self._group: list[_Node] | None = None
        self.nproc = nproc
        self._token = token
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval
        self.join_timeout = join_timeout
        self._slots: list[_Node | None] = [None] * nnodes
        self._changed = trio.Event()
        self._shutdown: protocol.AgentShutdown | None = None
        self._on_change = on_change or (lambda line: None)
        self._awaited: set[int] = set()

    # -- the Launcher seam ----------------------------------------------------------

    async def start(self, request: LaunchRequest) -> AgentRankProcess:
        node_rank, local_rank = divmod(request.rank, self.nproc)
        if self.elastic:
            group = self._group or []
            if node_rank >= len(group):
                raise LaunchError(f"rank {request.rank} has no node: attempt {request.attempt} runs on "
                                  f"{len(group)} node(s) x {self.nproc} ranks")
            master, node = group[0], group[node_rank]
            group_size = len(group)
            if node.lost:  # lost since the attempt was sized: the group restarts on the rest
                process = AgentRankProcess(node, "", request)
                process._resolve(ExitStatus(started=False, reason=NODE_LOST, message=f"{node.describe()} lost"))
                return process
        else:
            if node_rank >= self.nnodes:
                raise LaunchError(f"rank {request.rank} has no node: the job has {self.nnodes} x {self.nproc} ranks")
            master = await self._wait_node(0, request)
            node = await self._wait_node(node_rank, request)
            group_size = self.nnodes
        # The agent's host has an environment of its own (PATH, CUDA_VISIBLE_DEVICES,
        # NCCL_*): send what the coordinator set or changed, not what it inherited.
        env = {k: v for k, v in request.env.items() if k not in _HOST_LOCAL and (
            k in _ALWAYS or k.startswith(_ALWAYS_PREFIXES) or os.environ.get(k) != v)}
        env.update({
            # torchrun's multi-node values (torch.distributed.elastic's agent sets the same).
            "LOCAL_RANK": str(local_rank),
            "GROUP_RANK": str(node_rank),
            "ROLE_RANK": str(request.rank),
            "LOCAL_WORLD_SIZE": str(self.nproc),
            "GROUP_WORLD_SIZE": str(group_size),
            "MASTER_ADDR": master.address,
        })
        key = f"{request.attempt}.{request.rank}.{secrets.token_hex(4)}"
        process = AgentRankProcess(node, key, request)
        node.processes[key] = process
        start = protocol.AgentStart(key=key, rank=request.rank, local_rank=local_rank, attempt=request.attempt,
                                    argv=list(request.argv), env=env, cwd=request.cwd)
        if not node.send(start):
            process._resolve(ExitStatus(reason=NODE_LOST, message=f"{node.describe()} stopped reading"))
        # Bounded twice: a lost node resolves it; an agent that is alive but never
        # answers (a bug, a wedged fork) is given up on after heartbeat_timeout + 30 s.
        try:
            with trio.move_on_after(self.heartbeat_timeout + 30.0):
                await process._started.wait()
        except BaseException:
            # Cancelled (the job stops, the group restarts): the start is already
            # on its way, so the rank must be stopped there too, or it would run unwatched.
            node.send(protocol.AgentStop(key=key, grace=0.0))
            raise
        if not process._started.is_set():
            node.send(protocol.AgentStop(key=key, grace=0.0))
            process._resolve(ExitStatus(started=False, reason="StartTimeout",
                                        message=f"{node.describe()} did not report the rank started"))
        status = process._status
        if status is not None and not status.started and status.reason != NODE_LOST:
            raise LaunchError(f"cannot start rank {request.rank} of job {request.job_id} on "
                              f"{node.describe()}: {status.message}")
        return process

    @property
    def elastic(self) -> bool:
        return self.min_nodes < self.nnodes

    async def size_attempt(self, job_id: str, attempt: int) -> int:
        """``SizesAttempts``: the ranks of group attempt ``attempt`` (see the module docstring)."""
        if not self.elastic:
            return self.nnodes * self.nproc  # ranks wait in ``start`` for their own node slot
        first = self._group is None
        if self._joined() < self.min_nodes:
            self._on_change(f"attempt {attempt} waits up to {self.join_timeout:g}s for {self.min_nodes} of "
                            f"{self.nnodes} nodes (--nnodes {self.min_nodes}:{self.nnodes}, --join-timeout); "
                            f"{self._joined()} joined")
            with trio.move_on_after(self.join_timeout) as waited:
                await self.wait_joined(self.min_nodes)
            if waited.cancelled_caught:
                joined = [n.node_rank for n in self._slots if n is not None]
                raise LaunchError(
                    f"attempt {attempt} needs at least {self.min_nodes} node(s) (--nnodes {self.min_nodes}:"
                    f"{self.nnodes}) and only {len(joined)} joined within {self.join_timeout:g}s (join_timeout; "
                    f"nodes joined: {joined or 'none'}); start `rankwarden run ... --node-rank -1` on healthy hosts")
        if first and self._joined() < self.nnodes and self.last_call > 0:
            # torchrun's last call: once MIN are in, the first rendezvous waits a little for up to MAX.
            with trio.move_on_after(self.last_call):
                await self.wait_joined(self.nnodes)
        old = self._group
        self._group = [n for n in self._slots if n is not None]
        world = len(self._group) * self.nproc
        slots = ", ".join(str(n.node_rank) for n in self._group)
        if old is None:
            self._on_change(f"attempt {attempt} runs on {len(self._group)} of {self.nnodes} nodes ({slots}): "
                            f"world size {world}")
        elif [n.node_rank for n in old] != [n.node_rank for n in self._group] or any(
                a is not b for a, b in zip(old, self._group)):
            gone = sorted({n.node_rank for n in old if n.lost} | ({n.node_rank for n in old}
                                                                    - {n.node_rank for n in self._group}))
            cause = f"node{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} lost; " if gone else ""
            self._on_change(f"{cause}attempt {attempt} continues on {len(self._group)} of {self.nnodes} nodes "
                            f"({slots}): world size {len(old) * self.nproc} -> {world}")
        log.info("job=%s attempt=%d: %d node(s) (%s), world size %d", job_id, attempt, len(self._group), slots, world)
        return world

    def _joined(self) -> int:
        return sum(node is not None for node in self._slots)

    async def _wait_node(self, node_rank: int, request: LaunchRequest) -> _Node:
        if self._slots[node_rank] is None and node_rank not in self._awaited and self._shutdown is None:
            self._awaited.add(node_rank)  # one line per node and wait, not one per rank
            self._on_change(f"waiting up to {self.join_timeout:g}s for node {node_rank} to join (--join-timeout)")
        with trio.move_on_after(self.join_timeout):
            while (node := self._slots[node_rank]) is None:
                await self._changed.wait()
            return node
        joined = [n.node_rank for n in self._slots if n is not None]
        raise LaunchError(
            f"rank {request.rank} of attempt {request.attempt} needs node {node_rank}, and no agent has taken "
            f"that slot for {self.join_timeout:g}s (join_timeout; nodes joined: {joined or 'none'}); start "
            f"`rankwarden run ... --node-rank {node_rank}` on a healthy host"
        )

    # -- membership -----------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        return [
            NodeInfo(i, node is not None, *((node.host, node.address, node.pid, len(node.processes))
                                              if node is not None else ()))
            for i, node in enumerate(self._slots)
        ]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_joined(self, count: int | None = None) -> None:
        """Until ``count`` (default: all) node slots are held."""
        count = self.nnodes if count is None else count
        while sum(node is not None for node in self._slots) < count:
            await self._changed.wait()

    def shutdown(self, ok: bool, reason: str = "") -> None:
        """The job is over: tell every agent (they stop their ranks and exit) and turn new ones away."""
        self._shutdown = protocol.AgentShutdown(ok=ok, reason=reason)
        for node in self._slots:
            if node is not None:
                node.send(self._shutdown)

    async def wait_left(self) -> None:
        """Until every agent has disconnected (after ``shutdown``)."""
        while any(node is not None for node in self._slots):
            await self._changed.wait()

    def _admit(self, hello: protocol.AgentHello, peer_host: str, send_channel: trio.MemorySendChannel,
               scope: trio.CancelScope) -> _Node:
        if hello.version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"agent speaks protocol version {hello.version}, this coordinator speaks "
                                f"{protocol.PROTOCOL_VERSION}; run the same rankwarden version on every node")
        if not hmac.compare_digest(hello.token.encode(), self._token.encode()):
            raise AuthError("wrong job secret (RANKWARDEN_JOB_SECRET must be the same on every node)")
        if hello.nproc != self.nproc:
            raise ProtocolError(f"agent runs {hello.nproc} rank(s) per node, this job {self.nproc}: "
                                "--nproc-per-node must be the same on every node")
        if self._shutdown is not None:
            raise ProtocolError(f"the job is over ({self._shutdown.reason or 'done'})")
        slot = hello.node_rank
        if slot == -1:
            free = [i for i, node in enumerate(self._slots) if node is None]
            if not free:
                raise ProtocolError(f"all {self.nnodes} node slots are taken")
            slot = free[0]
        if not 0 <= slot < self.nnodes:
            raise ProtocolError(f"node rank {slot} is out of range: the job has {self.nnodes} node(s), "
                                f"0 to {self.nnodes - 1}")
        current = self._slots[slot]
        if current is not None:
            raise ProtocolError(f"node {slot} is already held by {current.describe()}; a replacement "
                                "joins once that node is lost")
        node = _Node(slot, hello, hello.address or peer_host, send_channel, scope)
        self._slots[slot] = node
        log.info("job=%s: %s joined (agent pid %d)", self.job_id, node.describe(), hello.pid)
        self._awaited.discard(slot)
        self._on_change(f"{node.describe()} joined")
        self._notify()
        return node

    def _leave(self, node: _Node, reason: str) -> None:
        if self._slots[node.node_rank] is node:
            self._slots[node.node_rank] = None
        if self._shutdown is None:
            log.warning("job=%s: %s lost: %s", self.job_id, node.describe(), reason)
            self._on_change(f"{node.describe()} lost: {reason}")
        node.lose(f"{node.describe()} lost: {reason}")
        self._notify()

    # -- the agents' endpoint ---------------------------------------------------------

    async def serve(self, listeners: list[trio.abc.Listener], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept agents until cancelled."""
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        try:
            peer_host = stream.socket.getpeername()[0]  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            peer_host = "?"
        send_channel, receive_channel = trio.open_memory_channel(_SEND_QUEUE)
        node: _Node | None = None
        reason = "its agent closed the connection"
        writer_done = trio.Event()
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_writer, stream, receive_channel, writer_done)
            decoder = protocol.FrameDecoder(protocol.FromAgent)
            try:
                pending = await read_first(stream, decoder, timeout=HELLO_READ_TIMEOUT, what="agent_hello")
                if pending is None:
                    return
                hello, rest = pending[0], pending[1:]
                if not isinstance(hello, protocol.AgentHello):
                    raise ProtocolError(f"first frame must be agent_hello, got {type(hello).__name__}")
                node = self._admit(hello, peer_host, send_channel, nursery.cancel_scope)
                node.send(protocol.AgentWelcome(
                    version=protocol.PROTOCOL_VERSION, node_rank=node.node_rank, job=self.job_id,
                    heartbeat_interval=self.heartbeat_interval, heartbeat_timeout=self.heartbeat_timeout))
                for message in rest:
                    self._dispatch(node, message)
                while True:
                    with trio.move_on_after(self.heartbeat_timeout) as silent:
                        data = await stream.receive_some(_RECEIVE_SIZE)
                    if silent.cancelled_caught:
                        reason = f"no heartbeat for {self.heartbeat_timeout:g}s (heartbeat_timeout)"
                        break
                    if not data:
                        break
                    for message in decoder.feed(data):
                        self._dispatch(node, message)
            except ProtocolError as exc:
                reason = f"protocol error: {exc}"
                log.warning("job=%s: dropped agent %s: %s", self.job_id, peer_host, exc)
                try:
                    send_channel.send_nowait(protocol.Reject(reason=str(exc)))
                except trio.WouldBlock:
                    pass  # it is not reading: it is dropped without a reason
                send_channel.close()
                with trio.move_on_after(1.0):  # let the Reject out, never longer
                    await writer_done.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                # A process killed with unread data in its socket resets the connection rather than closing it.
                reason = f"its agent's connection was reset ({exc.__cause__ or exc})"
            finally:
                if node is not None:
                    self._leave(node, reason)
                nursery.cancel_scope.cancel()

    def _dispatch(self, node: _Node, message) -> None:
        if isinstance(message, protocol.AgentHeartbeat):
            node.send(protocol.AgentPong(seq=message.seq))
            for key, cpu in message.cpu.items():
                if (process := node.processes.get(key)) is not None:
                    process._cpu = CpuSample(cpu.state, cpu.cpu_seconds)
            return
        if isinstance(message, protocol.AgentHello):
            raise ProtocolError("second agent_hello on a joined connection")
        process = node.processes.get(message.key)
        if process is None:
            return  # a rank this coordinator already wrote off
        if isinstance(message, protocol.AgentStarted):
            process._on_started(message.pid)
        elif isinstance(message, protocol.AgentOutput):
            process._on_output(message.stream, message.data)
        elif isinstance(message, protocol.AgentExited):
            del node.processes[message.key]
            process._resolve(ExitStatus(code=message.code, signal=message.signal, reason=message.reason,
                                        message=message.message, started=message.started))


async def _writer(stream: trio.abc.Stream, receive_channel: trio.MemoryReceiveChannel, done: trio.Event) -> None:
    try:
        async for message in receive_channel:
            await stream.send_all(protocol.encode(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        done.set()
