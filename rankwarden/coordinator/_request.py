"""What a rank is started with: its argv and the torchrun-compatible environment."""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path

from rankwarden.launcher import BOOTSTRAP_MODULE, Placement
from rankwarden.spec import JobSpec

__all__ = ["BOOTSTRAP_MODULE", "free_port", "live_collective_timeout", "rank_argv", "rank_env"]


def rank_argv(spec: JobSpec, placement: Placement | None = None) -> list[str]:
    """Every rank starts through the bootstrap, which sets PR_SET_PDEATHSIG and
    opens the heartbeat connection before handing over to the entrypoint."""
    python = spec.python or (placement.python if placement else sys.executable)
    mode = "exec" if spec.no_python else "module" if spec.module else "script"
    return [python, "-m", BOOTSTRAP_MODULE, mode, spec.entrypoint, *spec.args]


def rank_env(
    spec: JobSpec,
    *,
    job_id: str,
    rank: int,
    attempt: int,
    master_port: int,
    coordinator: str,
    token: str,
    checkpoint_tag: str = "",
    base: dict[str, str] | None = None,
    placement: Placement | None = None,
    error_file: str = "",
    world_size: int = 0,
) -> dict[str, str]:
    """The rank's environment. Local ranks inherit the coordinator's environment;
    placed ranks (pods) get only the spec's, so nothing of the coordinator's
    (credentials included) leaks into a container."""
    world = world_size or spec.world_size  # an attempt of an elastic job may have fewer ranks
    if base is None:
        base = {} if placement is not None else dict(os.environ)
    env = dict(base)
    # torchrun's defaults, which a user's environment or the spec may override.
    if world > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    env.update(spec.env)
    env.update(
        {
            # What torchrun --standalone gives a worker (single node); the
            # test in tests/test_rank_env.py diffs it against torchrun's.
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "ROLE_RANK": str(rank),
            # `rankwarden run --role` sets it through the spec's env, as torchrun's --role.
            "ROLE_NAME": spec.env.get("ROLE_NAME", "default"),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "GROUP_WORLD_SIZE": "1",
            "ROLE_WORLD_SIZE": str(world),
            "MASTER_ADDR": spec.master_addr,
            "MASTER_PORT": str(master_port),
            "TORCHELASTIC_RESTART_COUNT": str(attempt - 1),
            "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
            "TORCHELASTIC_RUN_ID": job_id,
            # No agent hosts a TCPStore here: rank 0 does, at MASTER_ADDR:MASTER_PORT.
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            # The signals the launcher turns into a stop of every rank.
            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT",
            # Where torch.distributed.elastic's @record writes the exception
            # that ended the rank; the failure report quotes it.
            "TORCHELASTIC_ERROR_FILE": error_file,
            # rankwarden's own.
            "RANKWARDEN_COORDINATOR": coordinator,
            "RANKWARDEN_COORDINATOR_PID": str(os.getpid()),
            "RANKWARDEN_JOB_ID": job_id,
            "RANKWARDEN_ATTEMPT": str(attempt),
            "RANKWARDEN_TOKEN": token,
            "RANKWARDEN_HEARTBEAT_INTERVAL": repr(spec.effective_heartbeat_interval),
            "RANKWARDEN_HEARTBEAT_TIMEOUT": repr(spec.heartbeat_timeout),
        }
    )
    if placement is not None:
        # Every pod is a one-process node of a multi-node job.
        env.update(
            {
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                "GROUP_RANK": str(rank),
                "GROUP_WORLD_SIZE": str(world),
                "MASTER_ADDR": placement.master_addr,
                "MASTER_PORT": str(placement.master_port),
            }
        )
        del env["RANKWARDEN_COORDINATOR_PID"]  # another host's pid means nothing here
        del env["TORCHELASTIC_ERROR_FILE"]  # a path on the coordinator's host
        if placement.reconnect_grace:
            env["RANKWARDEN_RECONNECT_GRACE"] = repr(placement.reconnect_grace)
    if spec.live:
        # A rank blocked in a collective on a hung peer gives up after this
        # (gloo's timeout) and reports itself ready, well before the hung
        # rank's progress deadline: so the hung rank is the one killed.
        env["RANKWARDEN_LIVE"] = "1"
        env["RANKWARDEN_LIVE_TIMEOUT"] = repr(spec.live_timeout)
        env["RANKWARDEN_LIVE_COLLECTIVE_TIMEOUT"] = repr(live_collective_timeout(spec))
    else:
        for key in ("RANKWARDEN_LIVE", "RANKWARDEN_LIVE_TIMEOUT", "RANKWARDEN_LIVE_COLLECTIVE_TIMEOUT"):
            env.pop(key, None)
    if spec.checkpoint_url:
        env["RANKWARDEN_CHECKPOINT_URL"] = spec.checkpoint_url
        env["RANKWARDEN_CHECKPOINT_TAG"] = checkpoint_tag
    else:
        env.pop("RANKWARDEN_CHECKPOINT_URL", None)
        env.pop("RANKWARDEN_CHECKPOINT_TAG", None)
    return env


def live_collective_timeout(spec: JobSpec) -> float:
    """Half the progress timeout (10 minutes without one): long for a collective, short for a hang."""
    return spec.progress_timeout / 2 if spec.progress_timeout else 600.0


def free_port(host: str, exclude: int | None = None) -> int:
    """A port that is free on ``host`` now, other than ``exclude`` (the last attempt's).

    Another process could take it before rank 0 binds it; the window is the
    launch time, and a failed bind is a rank failure that the next attempt fixes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(16):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port != exclude:
            return port
    raise OSError(f"could not find a free port on {host}")


def default_job_id(spec: JobSpec) -> str:
    """``<script stem>-<date>-<time>-<6 hex>``: what a job without a job_id is called."""
    stem = Path(spec.entrypoint).stem if not spec.module else spec.entrypoint.rsplit(".", 1)[-1]
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:30] or "job"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
