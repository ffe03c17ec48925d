"""``rankwarden run --nnodes N --node-rank K --rdzv-endpoint HOST:PORT``: one command on every node.

Node 0 (the node whose ``--rdzv-endpoint`` host it is, as with torchrun's
c10d rendezvous) runs the coordinator, the agents' endpoint at HOST:PORT and
its own agent; every other node runs an agent only. ``rankwarden
coordinator`` runs the coordinator alone on a host of its own, and then every
node, node 0 included, runs ``rankwarden agent``. Under Slurm the flags may
be left out: an ``srun`` step's ``SLURM_STEP_NUM_NODES``, ``SLURM_NODEID``
and the first host of ``SLURM_STEP_NODELIST`` fill them in. Every node must
have the same ``RANKWARDEN_JOB_SECRET`` in its environment (``srun`` passes
the caller's environment on): agents and ranks prove with it that they belong
to the job.

``--nnodes MIN:MAX`` makes the node count elastic: an attempt runs on the
nodes that have joined as long as there are at least MIN (see
``AgentLauncher.size_attempt``).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
from typing import Mapping, NamedTuple

import trio

from rankwarden._console import Console, signal_name
from rankwarden.agent import AgentConfig, run_agent
from rankwarden.errors import SpecError
from rankwarden.events import JobState
from rankwarden.launcher import AgentLauncher
from rankwarden.launcher._agent import LAST_CALL_TIMEOUT
from rankwarden.spec import JobSpec

__all__ = ["SECRET_ENV", "NodePlan", "first_host", "node_plan", "run_node", "serve_coordinator_node"]

log = logging.getLogger(__name__)

SECRET_ENV = "RANKWARDEN_JOB_SECRET"
#: torchrun's default port of a c10d rendezvous endpoint.
DEFAULT_PORT = 29400
#: torchrun flags that mean something once there are several nodes.
MULTI_NODE_FLAGS = {"rdzv_endpoint", "node_rank", "local_addr", "rdzv_id", "rdzv_backend", "rdzv_conf"}


class NodePlan(NamedTuple):
    #: The most nodes (MAX of ``--nnodes MIN:MAX``): the job's node slots.
    nnodes: int
    node_rank: int
    host: str
    port: int
    secret: str
    local_addr: str
    join_timeout: float
    #: "auto": node 0 is coordinator and agent, others agents; "coordinator" or "agent": only that.
    role: str = "auto"
    #: The fewest nodes an attempt runs on (MIN); equal to ``nnodes`` unless elastic.
    min_nodes: int = 0
    #: The first attempt's wait for more than MIN nodes (torchrun's last_call_timeout).
    last_call: float = LAST_CALL_TIMEOUT

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise SpecError(f"cannot read a host from the Slurm node list {nodelist!r}; pass --rdzv-endpoint")
    prefix, ranges = match.group(1), match.group(2)
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` (torchrun's spelling) -> (MIN, MAX)."""
    match = re.fullmatch(r"(\d+)(?::(\d+))?", text.strip())
    if not match:
        raise SpecError(f"--nnodes {text!r}: expected N or MIN:MAX")
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if low < 1 or high < low:
        raise SpecError(f"--nnodes {text!r}: expected 1 <= MIN <= MAX")
    return low, high


def _last_call(args: argparse.Namespace) -> float:
    """``--last-call-timeout``, else torchrun's ``--rdzv-conf last_call_timeout=S``, else 30 s."""
    value = getattr(args, "last_call_timeout", None)
    if value is not None:
        return float(value)
    for item in (getattr(args, "rdzv_conf", None) or "").split(","):
        key, _, text = item.partition("=")
        if key.strip() == "last_call_timeout":
            try:
                seconds = float(text)
            except ValueError:
                seconds = -1.0
            if not seconds >= 0:
                raise SpecError(f"--rdzv-conf last_call_timeout={text!r}: expected seconds >= 0")
            return seconds
    return LAST_CALL_TIMEOUT


def node_plan(args: argparse.Namespace, environ: Mapping[str, str], *, role: str = "auto") -> NodePlan | None:
    """The multi-node plan from the flags (else an ``srun`` step's environment); None for one node.

    ``role`` fixes what this process is (``rankwarden coordinator`` / ``agent``)."""
    text = args.nnodes
    if text is None:
        text = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") if "SLURM_NODEID" in environ \
            and "SLURM_STEP_ID" in environ else None
    min_nodes, nnodes = _nnodes(text or "1")
    if min_nodes < nnodes and (getattr(args, "restart_scope", "group") != "group" or getattr(args, "live", False)):
        raise SpecError(f"--nnodes {min_nodes}:{nnodes}: an elastic node count restarts the whole group on the "
                        "nodes that remain; it needs --restart-scope group and no --live")
    if nnodes == 1 and role == "auto":
        if args.node_rank not in (None, 0):
            raise SpecError(f"--node-rank {args.node_rank}: a one-node job has only node 0")
        return None
    node_rank = args.node_rank
    if role == "coordinator":
        node_rank = -1  # runs no ranks: every node slot is an agent's
    elif node_rank is None:
        node_id = environ.get("SLURM_NODEID")
        if node_id is None or not node_id.isdigit():
            raise SpecError(f"--nnodes {nnodes}: give --node-rank (0 to {nnodes - 1}); it is SLURM_NODEID under srun")
        node_rank = int(node_id)
    if role == "coordinator":
        pass
    elif not -1 <= node_rank < nnodes:
        raise SpecError(f"--node-rank {node_rank}: expected 0 to {nnodes - 1} for --nnodes {nnodes} "
                        "(or -1: a replacement agent that takes any free node slot)")
    endpoint = args.rdzv_endpoint
    if not endpoint:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise SpecError(f"--nnodes {nnodes}: give --rdzv-endpoint HOST:PORT, an address of node 0 that "
                            "every node reaches")
        endpoint = first_host(nodelist)
    host, port = _split_endpoint(endpoint)
    secret = environ.get(SECRET_ENV, "")
    if secret and len(secret) < 16:
        raise SpecError(f"{SECRET_ENV} has {len(secret)} characters: use a random string of 16 or more, "
                        f"e.g. $(openssl rand -hex 16)")
    if not secret:
        raise SpecError(f"--nnodes {nnodes}: set {SECRET_ENV} to the same random string (16+ characters) on "
                        f"every node, e.g. export {SECRET_ENV}=$(openssl rand -hex 16) before srun")
    return NodePlan(nnodes, node_rank, host, port, secret, args.local_addr or "",
                    float(getattr(args, "join_timeout", 300.0)), role, min_nodes, _last_call(args))


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT``; the port defaults to torchrun's 29400."""
    text = endpoint.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        bad = bool(rest) and not rest.startswith(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        bad = False
    else:
        host, port_text, bad = text, "", False
    if bad or not host or (port_text and not port_text.isdigit()):
        raise SpecError(f"--rdzv-endpoint {endpoint!r}: expected HOST or HOST:PORT")
    port = int(port_text) if port_text else DEFAULT_PORT
    if not 0 < port < 65536:
        raise SpecError(f"--rdzv-endpoint {endpoint!r}: port {port} is not a port number")
    return host, port


async def run_node(spec: JobSpec, nodes: NodePlan, *, quiet: bool, plan) -> int:
    """This node's part of the job; the exit status of ``rankwarden run`` on it."""
    if nodes.role == "agent" or (nodes.role == "auto" and nodes.node_rank != 0):
        return await _run_agent_only(spec, nodes)  # node_rank -1: a replacement for whichever node is missing
    return await _run_coordinator_node(spec, nodes, quiet=quiet, plan=plan)


def _agent_config(spec: JobSpec, nodes: NodePlan) -> AgentConfig:
    return AgentConfig(endpoint=nodes.endpoint, token=nodes.secret, node_rank=nodes.node_rank,
                       nproc=spec.world_size // nodes.nnodes, address=nodes.local_addr,
                       join_timeout=nodes.join_timeout, kill_grace=spec.kill_grace)


async def _run_agent_only(spec: JobSpec, nodes: NodePlan) -> int:
    which = "any free node slot" if nodes.node_rank == -1 else f"node {nodes.node_rank} of {nodes.nnodes}"
    print(f"rankwarden: {which}: agent for the coordinator at {nodes.endpoint}", flush=True)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            stopped_by: int | None = None

            async def on_signals() -> None:
                nonlocal stopped_by
                async for signum in signals:
                    stopped_by = signum
                    print(f"rankwarden: {signal_name(signum)}: stopping this node's ranks", flush=True)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signals)
            result = await run_agent(_agent_config(spec, nodes))
            nursery.cancel_scope.cancel()
    if stopped_by is not None:
        return 128 + stopped_by
    print(f"rankwarden: node {nodes.node_rank}: {result.reason or ('job succeeded' if result.ok else 'job failed')}",
          flush=True)
    return result.exit_code


async def _run_coordinator_node(spec: JobSpec, nodes: NodePlan, *, quiet: bool, plan) -> int:
    from rankwarden.coordinator import Coordinator

    console: Console | None = None
    launcher = AgentLauncher(job_id=spec.job_id, nnodes=nodes.nnodes, nproc=spec.world_size // nodes.nnodes,
                             token=nodes.secret, heartbeat_timeout=spec.heartbeat_timeout,
                             heartbeat_interval=spec.effective_heartbeat_interval, join_timeout=nodes.join_timeout,
                             min_nodes=nodes.min_nodes or nodes.nnodes, last_call=nodes.last_call,
                             on_change=lambda line: console and console.line(f"rankwarden: {line}"))
    try:
        listeners = await trio.open_tcp_listeners(nodes.port, host=nodes.host)
    except OSError as exc:
        print(f"rankwarden run: error: cannot listen on --rdzv-endpoint {nodes.endpoint} (run node 0 on the host "
              f"that has this address): {exc}", flush=True)
        return 2
    coordinator = Coordinator(spec, launcher=launcher, heartbeat_host=nodes.host, token=nodes.secret,
                              master_port=plan.master_port)
    coordinator.job_dir.start_run()
    console = Console(coordinator, echo_ranks=not quiet, echo=plan.echo, announce_start=False)
    elastic = bool(nodes.min_nodes) and nodes.min_nodes < nodes.nnodes
    count = f"up to {spec.world_size} rank(s) on {nodes.min_nodes} to {nodes.nnodes}" if elastic \
        else f"{spec.world_size} rank(s) on {nodes.nnodes}"
    console.line(f"rankwarden: job {coordinator.job_id}: {count} nodes "
                 f"x {spec.world_size // nodes.nnodes}; agents join at {nodes.endpoint}; logs in "
                 f"{coordinator.job_dir.path}/")
    for note in plan.notes:
        console.line(f"rankwarden: {note}")
    stopped_by: int | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

                async def on_signals() -> None:
                    nonlocal stopped_by
                    async for signum in signals:
                        force = stopped_by is not None
                        stopped_by = signum
                        if not force:
                            console.line(f"rankwarden: {signal_name(signum)}: stopping ranks (again to kill them now)")
                        coordinator.stop(f"received {signal_name(signum)}", force=force)

                nursery.start_soon(on_signals)
                nursery.start_soon(console.show_events)
                local = _agent_config(spec, nodes) if nodes.role == "auto" else None
                snapshot = await serve_coordinator_node(coordinator, launcher, listeners, local,
                                                        on_started=lambda: nursery.start_soon(console.refresh))
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
    console.finish()
    if snapshot.state == JobState.SUCCEEDED:
        return 0
    if snapshot.state == JobState.STOPPED and stopped_by is not None:
        return 128 + stopped_by
    return 1


async def serve_coordinator_node(coordinator, launcher: AgentLauncher, listeners, agent: AgentConfig | None,
                                 *, on_started=None):
    """Node 0's lifetime: the agents' endpoint, the coordinator, and (``agent``) node 0's own agent.

    Returns the job's final snapshot once every agent was told the job is over
    (and left, or 5 s passed)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(launcher.serve, listeners)
        await nursery.start(coordinator.run)
        if on_started is not None:
            on_started()
        if agent is not None:
            nursery.start_soon(_local_agent, agent)
        snapshot = await coordinator.wait()
        launcher.shutdown(snapshot.state == JobState.SUCCEEDED, f"job {snapshot.state.value}")
        with trio.move_on_after(5.0):
            await launcher.wait_left()
        nursery.cancel_scope.cancel()
    return snapshot


async def _local_agent(config: AgentConfig) -> None:
    result = await run_agent(config)
    if result.exit_code not in (0, 1):
        log.error("node 0's agent ended: %s", result.reason)
