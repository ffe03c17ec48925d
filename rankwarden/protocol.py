"""The heartbeat protocol between ranks and the coordinator: the only place it is defined.

Transport: one TCP connection per rank. Each frame is a 4-byte big-endian
length followed by that many bytes of msgpack encoding one tagged Struct
(``type`` field). The first frame from a rank must be ``Hello`` carrying the
job's secret token; the coordinator answers ``Welcome`` or ``Reject`` (and
closes). Nothing after the hello is trusted on its own: it is accepted only on
the connection that authenticated.

Evolution (msgspec's rules): new fields get defaults, unknown fields are
ignored, so an older peer still decodes. ``PROTOCOL_VERSION`` changes only
when an old peer could misread a new message; the coordinator rejects a hello
with another version, naming both.

Aggregation (a relay inside each node's agent, ``rankwarden.agent``): the
ranks of a node speak this same protocol to the relay, and the relay keeps one
connection to the coordinator, on the same port. Its first frame is
``RelayHello``; then each rank's own frames (``Hello``, ``CheckpointReady``,
``CheckpointFailed``, ``Goodbye``) travel inside ``RelayForward`` and the
coordinator's answers inside ``RelayDeliver``, so every rank still
authenticates itself with the token. Heartbeats are not forwarded: one
``RelayBeat`` per interval says "every rank I forwarded is alive" and carries
only the progress that changed; a rank the relay found silent is named in
``RelaySilent`` with the cause, one whose connection ended in ``RelayClosed``.
``RelayDrop`` asks the relay to close one rank's connection.

Node agents (``rankwarden.agent``) speak the same framing on a connection of
their own to the coordinator's agent endpoint: the first frame is
``AgentHello`` with the job's secret, answered by ``AgentWelcome`` or
``Reject``. The agent heartbeats every interval and the coordinator answers
each heartbeat, so either side notices a silent peer (a frozen host, a
network partition: TCP does not close then) within ``heartbeat_timeout``.
Their tags start with ``agent_``; they form the unions ``FromAgent`` and
``ToAgent``, apart from the ranks' ones.

This module is sans-IO: ``encode`` makes a frame, ``FrameDecoder`` turns bytes
into messages. The Trio server and the synchronous worker thread share it.
"""

from __future__ import annotations

import struct
from typing import Union

import msgspec

from rankwarden.errors import ProtocolError

__all__ = [
    "MAX_FRAME",
    "Abort",
    "AgentExited",
    "AgentHeartbeat",
    "AgentHello",
    "AgentOutput",
    "AgentPong",
    "AgentShutdown",
    "AgentSignal",
    "AgentStart",
    "AgentStop",
    "AgentStarted",
    "AgentWelcome",
    "FromAgent",
    "HeartbeatAck",
    "ToAgent",
    "PROTOCOL_VERSION",
    "RANK_FRAMES",
    "CheckpointFailed",
    "CheckpointReady",
    "Committed",
    "Drain",
    "FileInfo",
    "FrameDecoder",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "LiveJoined",
    "LiveReady",
    "Reconfigure",
    "RankCpu",
    "Reject",
    "RelayBeat",
    "RelayClosed",
    "RelayDeliver",
    "RelayDrop",
    "RelayForward",
    "RelayHello",
    "RelayRank",
    "RelaySilent",
    "Resume",
    "FromRelay",
    "ToCoordinator",
    "ToRank",
    "ToRelay",
    "Upstream",
    "Welcome",
    "encode",
]

PROTOCOL_VERSION = 1
#: Largest frame either side accepts; a longer length prefix is a protocol error
#: (it is far more likely garbage than a real message).
MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">I")


class _Message(msgspec.Struct, frozen=True, tag_field="type"):
    pass


# -- rank -> coordinator ---------------------------------------------------------


class Hello(_Message, tag="hello"):
    version: int
    job: str
    rank: int
    attempt: int
    pid: int
    token: str
    host: str = ""


class Heartbeat(_Message, tag="heartbeat"):
    seq: int
    #: Last step the script reported through ``rankwarden.worker.report``; None
    #: while it has reported none (then progress is not watched).
    step: int | None = None
    samples: int | None = None
    metrics: dict[str, float] = {}


class FileInfo(msgspec.Struct, frozen=True):
    name: str
    size: int
    checksum: str


class CheckpointReady(_Message, tag="checkpoint_ready"):
    step: int
    files: list[FileInfo] = []
    #: "dcp" when these files are this rank's part of a DCP (sharded) checkpoint;
    #: the step commits with that layout if any rank says so (see ``Manifest.layout``).
    layout: str = "rank"


class CheckpointFailed(_Message, tag="checkpoint_failed"):
    """This rank could not write its files for ``step``; that step will not commit."""

    step: int
    error: str


class LiveReady(_Message, tag="live_ready"):
    """Live mode: a collective of process group ``generation`` failed on this
    rank; it stopped at its step boundary and waits for ``Reconfigure``.
    ``step`` is the last step whose optimizer update it applied (-1: none)."""

    generation: int
    step: int
    error: str = ""


class LiveJoined(_Message, tag="live_joined"):
    """Live mode: this rank trains in process group ``generation`` (0: the
    script's own), holding the state of rank ``source`` after ``step``."""

    generation: int
    step: int
    source: int = -1


class Goodbye(_Message, tag="goodbye"):
    """The script finished; ``exit_code`` is what the process is about to exit with."""

    exit_code: int = 0
    reason: str = ""


# -- coordinator -> rank ---------------------------------------------------------


class Resume(msgspec.Struct, frozen=True):
    """The step this rank loads: the same for every rank of the attempt, chosen
    by the coordinator; ``None`` means start from scratch."""

    step: int | None


class Welcome(_Message, tag="welcome"):
    version: int
    heartbeat_interval: float
    attempt: int
    #: Set when the job has a checkpoint store; a rank never picks a step itself.
    resume: Resume | None = None
    #: Live mode: >0 when this process replaces a failed rank and joins that
    #: process group generation (its MASTER_PORT is the new group's); it takes
    #: its state from a survivor, not from storage.
    live_generation: int = 0
    #: The coordinator answers every heartbeat with ``HeartbeatAck``: a rank
    #: whose heartbeat stays unanswered for heartbeat_timeout has lost its
    #: coordinator (a partition, where TCP goes silent rather than closing).
    acks: bool = False


class HeartbeatAck(_Message, tag="heartbeat_ack"):
    """Answers the heartbeat ``seq`` (and every earlier one)."""

    seq: int


class Reject(_Message, tag="reject"):
    """Sent before the coordinator drops a peer, so the peer can say why it exits."""

    reason: str


class Committed(_Message, tag="committed"):
    step: int


class Drain(_Message, tag="drain"):
    """Checkpoint now and exit 0: the job is being stopped."""

    reason: str = ""


class Abort(_Message, tag="abort"):
    """Live mode: process group ``generation`` lost a member, which the
    coordinator has already killed. Abort what is blocked in it (NCCL does not
    always notice a dead peer) and wait at the step boundary for ``Reconfigure``."""

    generation: int
    reason: str = ""


class Reconfigure(_Message, tag="reconfigure"):
    """Live mode: join process group ``generation`` at ``master_addr:master_port``
    (a fresh rendezvous), as ``rank`` of ``world_size``. Sent once every failed
    rank has been killed and replaced, and every survivor is ready."""

    generation: int
    master_addr: str
    master_port: int
    world_size: int
    rank: int


ToCoordinator = Union[Hello, Heartbeat, CheckpointReady, CheckpointFailed, LiveReady, LiveJoined, Goodbye]
ToRank = Union[Welcome, Reject, Committed, Drain, Abort, Reconfigure, HeartbeatAck]
#: What a rank sends after its hello, other than heartbeats (a relay forwards these as they came).
RANK_FRAMES = (CheckpointReady, CheckpointFailed, LiveReady, LiveJoined, Goodbye)


# -- relay <-> coordinator (aggregation) ---------------------------------------------


class RelayHello(_Message, tag="relay_hello"):
    """First frame of a relay's connection. It grants nothing by itself: each
    rank behind the relay still authenticates with its own ``Hello``."""

    version: int
    job: str
    #: The node the relay runs on, for messages ("rank 5 on node gpu-17 ...").
    node: str
    #: The relay sends a ``RelayBeat`` at least this often; the coordinator
    #: drops the connection (failing its ranks) after ``timeout`` without a frame.
    interval: float
    timeout: float


class RelayRank(msgspec.Struct, frozen=True, array_like=True):
    """Progress of one rank, in a ``RelayBeat``, sent only when it changed."""

    rank: int
    step: int | None = None
    samples: int | None = None
    #: None: unchanged since the last one sent.
    metrics: dict[str, float] | None = None


class RelayBeat(_Message, tag="relay_beat"):
    """Every rank forwarded on this connection and not named silent or closed
    is alive; ``changed`` holds the progress that changed since the last beat."""

    seq: int
    changed: list[RelayRank] = []


class RelayForward(_Message, tag="relay_forward"):
    """One rank's frame, relayed as it came (never a ``Heartbeat``)."""

    rank: int
    message: Union[Hello, CheckpointReady, CheckpointFailed, LiveReady, LiveJoined, Goodbye]


class RelaySilent(_Message, tag="relay_silent"):
    """The relay's own deadline found ``rank`` silent for ``silent_for`` seconds."""

    rank: int
    silent_for: float
    #: What the relay saw, for the failure message ("its process is stopped").
    detail: str = ""
    #: Silent but burning CPU (a call holding the GIL): not frozen; the relay
    #: keeps watching and says so once per silent spell, for the rank_busy event.
    busy: bool = False
    cpu_seconds: float = 0.0


class RelayClosed(_Message, tag="relay_closed"):
    """``rank``'s connection to the relay ended (``clean``: after its Goodbye)."""

    rank: int
    clean: bool


class RelayDeliver(_Message, tag="relay_deliver"):
    """A coordinator frame for one rank behind the relay."""

    rank: int
    message: ToRank


class RelayDrop(_Message, tag="relay_drop"):
    """Close ``rank``'s connection (after delivering anything queued before this)."""

    rank: int


FromRelay = Union[RelayHello, RelayBeat, RelayForward, RelaySilent, RelayClosed]
#: What the coordinator's port accepts: a rank's frames, or a relay's.
Upstream = Union[Hello, Heartbeat, CheckpointReady, CheckpointFailed, LiveReady, LiveJoined, Goodbye,
                 RelayHello, RelayBeat, RelayForward, RelaySilent, RelayClosed]
ToRelay = Union[RelayDeliver, RelayDrop, Reject]


# -- node agent -> coordinator ------------------------------------------------------


class AgentHello(_Message, tag="agent_hello"):
    version: int
    token: str
    #: The node this agent runs (torchrun's --node-rank); -1: any free slot.
    node_rank: int
    #: Ranks this node runs (torchrun's --nproc-per-node).
    nproc: int
    host: str = ""
    pid: int = 0
    #: An address of this node that the other nodes reach (MASTER_ADDR when it
    #: is node 0); empty: the address the coordinator sees the agent connect from.
    address: str = ""


class RankCpu(msgspec.Struct, frozen=True, array_like=True):
    """A rank process's scheduler state letter and CPU seconds, as its agent read them from /proc."""

    state: str
    cpu_seconds: float


class AgentHeartbeat(_Message, tag="agent_heartbeat"):
    seq: int
    #: Each running rank's CPU, by key: the coordinator tells a rank that is busy
    #: in a call holding the GIL (its own heartbeats stop) from a frozen one.
    cpu: dict[str, RankCpu] = {}


class AgentStarted(_Message, tag="agent_started"):
    """The rank ``key`` runs as ``pid`` on the agent's host."""

    key: str
    pid: int


class AgentExited(_Message, tag="agent_exited"):
    """The rank ``key`` ended (reaped, its output sent): exactly how, as ``ExitStatus`` says."""

    key: str
    code: int | None = None
    signal: int | None = None
    reason: str | None = None
    message: str = ""
    started: bool = True


class AgentOutput(_Message, tag="agent_output"):
    """Bytes the rank ``key`` wrote to ``stream`` ("stdout" or "stderr")."""

    key: str
    stream: str
    data: bytes


# -- coordinator -> node agent ------------------------------------------------------


class AgentWelcome(_Message, tag="agent_welcome"):
    version: int
    node_rank: int
    job: str
    heartbeat_interval: float
    heartbeat_timeout: float


class AgentPong(_Message, tag="agent_pong"):
    seq: int


class AgentStart(_Message, tag="agent_start"):
    """Start one rank: ``env`` holds what the coordinator sets; the agent adds its own environment."""

    key: str
    rank: int
    local_rank: int
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None


class AgentSignal(_Message, tag="agent_signal"):
    key: str
    signal: int


class AgentStop(_Message, tag="agent_stop"):
    """SIGTERM the rank ``key``, SIGKILL it after ``grace`` seconds, reap it, report ``AgentExited``."""

    key: str
    grace: float


class AgentShutdown(_Message, tag="agent_shutdown"):
    """The job is over (``ok``: it succeeded); the agent stops its ranks and exits."""

    ok: bool
    reason: str = ""


FromAgent = Union[AgentHello, AgentHeartbeat, AgentStarted, AgentExited, AgentOutput]
ToAgent = Union[AgentWelcome, Reject, AgentPong, AgentStart, AgentSignal, AgentStop, AgentShutdown]

_encoder = msgspec.msgpack.Encoder()


def encode(message: _Message) -> bytes:
    """One length-prefixed frame holding ``message``."""
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"{type(message).__name__} frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Accumulates bytes and yields decoded messages of one direction.

    Raises ProtocolError (never a msgspec error) for an oversized length or a
    body that does not decode; after that the connection must be dropped.
    """

    def __init__(self, kind: type = ToCoordinator) -> None:  # type: ignore[assignment]
        self._decoder = msgspec.msgpack.Decoder(kind)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame length {length} exceeds the limit of {MAX_FRAME} bytes")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                messages.append(self._decoder.decode(body))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
        return messages

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)
