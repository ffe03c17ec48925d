"""The rank side of rankwarden, for use inside ordinary (synchronous) training scripts.

Everything here is a no-op when the script runs without rankwarden (plain
``python`` or ``torchrun``), so a script can call ``report`` unconditionally::

    import rankwarden.worker as rw

    for step in range(start, total):
        train_step()
        rw.report(step, samples=step * batch_size, loss=loss.item())

``report`` is what lets the coordinator see a rank that is alive but hung:
heartbeats alone prove only that the process is not frozen.

This module imports neither torch nor trio: it runs in every rank, before the
training script, and must start fast.
"""

from __future__ import annotations

import atexit
import os
import threading

from rankwarden.worker._client import EXIT_COORDINATOR_LOST, HeartbeatClient

__all__ = [
    "EXIT_COORDINATOR_LOST",
    "connect",
    "drain_requested",
    "is_managed",
    "report",
]

_client: HeartbeatClient | None = None
_lock = threading.Lock()


def is_managed() -> bool:
    """True when this process is a rank started by a rankwarden coordinator."""
    return "RANKWARDEN_COORDINATOR" in os.environ and "RANKWARDEN_TOKEN" in os.environ


def connect() -> HeartbeatClient | None:
    """Open the heartbeat connection from the ``RANKWARDEN_*`` environment (once).

    The bootstrap that ``rankwarden run`` starts scripts with calls this before
    the script runs; a program started with ``--no-python`` connects on its
    first ``report``. Returns None when not managed by rankwarden."""
    global _client
    if _client is not None or not is_managed():
        return _client
    with _lock:
        if _client is None:
            env = os.environ
            client = HeartbeatClient(
                env["RANKWARDEN_COORDINATOR"],
                job=env.get("RANKWARDEN_JOB_ID", ""),
                rank=int(env.get("RANK", "0")),
                attempt=int(env.get("RANKWARDEN_ATTEMPT", "1")),
                token=env["RANKWARDEN_TOKEN"],
            )
            client.connect()
            client.start()
            # Programs that connect themselves (--no-python) never say goodbye;
            # at least their last reported step reaches the coordinator.
            atexit.register(client.flush)
            _client = client
    return _client


def report(step: int, samples: int | None = None, **metrics: float) -> None:
    """Record training progress: the coordinator's hang detection watches ``step`` advance.

    Cheap (a few attribute stores); call it every step. No-op without rankwarden."""
    client = _client or connect()
    if client is not None:
        client.report(int(step), None if samples is None else int(samples), {k: float(v) for k, v in metrics.items()})


def drain_requested() -> bool:
    """True once the coordinator asked this rank to checkpoint and exit (a graceful stop)."""
    return _client is not None and _client.drain.is_set()


def _goodbye(exit_code: int) -> None:
    if _client is not None:
        _client.goodbye(exit_code)
