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

from rankwarden.errors import ProtocolError
from rankwarden.worker._client import EXIT_COORDINATOR_LOST, HeartbeatClient

__all__ = [
    "EXIT_COORDINATOR_LOST",
    "RankCheckpointer",
    "checkpointer",
    "collective_timeout",
    "connect",
    "drain_requested",
    "graceful_stop",
    "is_managed",
    "live",
    "report",
    "restore",
    "rng_state",
    "save",
    "set_rng_state",
]

_client: HeartbeatClient | None = None
_lock = threading.Lock()
_drain = threading.Event()
_graceful = False
# Not `_checkpointer`: importing the submodule of that name would rebind it.
_rank_checkpointer = None


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
            try:
                client.connect()
            except (OSError, ProtocolError) as exc:
                # A pod may start while its coordinator restarts: within the
                # reconnect grace, keep trying; a local rank fails at once.
                if not client.reconnect(f"cannot reach the coordinator: {exc}"):
                    raise
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


def live(module, optimizer, *, wrap=None, state=None, load_state=None):
    """Opt into live recovery: a failed peer is replaced while this process keeps its state.

    ``module`` is the bare model (not wrapped), ``optimizer`` its optimizer,
    ``wrap`` what makes the model of one process group (``DistributedDataParallel``;
    it is called again on every new group), ``state``/``load_state`` save and
    restore what else must be identical on every rank after a recovery (the
    data position), as a picklable value. Train through the returned object::

        live = rw.live(model, opt, wrap=DDP)
        for step, loss in live.steps(start, total, train_step):   # train_step(step, model)
            rw.report(step)

    The job must be live (``rankwarden run --live``, ``JobSpec(live=True)``);
    otherwise, and without rankwarden, ``steps`` is a plain loop. Give
    ``init_process_group`` ``timeout=rw.collective_timeout()`` so that a rank
    blocked on a hung peer gives up first. See ``rankwarden.worker._live``."""
    from rankwarden.worker._live import Live

    return Live(module, optimizer, wrap=wrap, state=state, load_state=load_state, client=_client or connect())


def collective_timeout():
    """The ``init_process_group`` timeout of a live job (a timedelta), or None outside one."""
    from rankwarden.worker._live import collective_timeout as timeout

    return timeout(_client or connect())


def graceful_stop() -> None:
    """Handle stops yourself: from now on a stop request only sets
    ``drain_requested()``, and the script checkpoints and exits 0.

    Under rankwarden the stop request is the coordinator's Drain message;
    SIGTERM keeps meaning "end now" (the coordinator sends it only to tear a
    failed attempt down, when a checkpoint could not commit anyway). Without
    rankwarden (torchrun, a Kubernetes pod) SIGTERM is the stop request.
    Without this call a stop request ends the script at once. Call it from
    the main thread."""
    global _graceful
    _graceful = True
    client = _client or connect()
    if client is not None:
        client.drain_opt_in = True
    else:
        import signal

        signal.signal(signal.SIGTERM, lambda signum, frame: _drain.set())


def drain_requested() -> bool:
    """True once a stop was requested: checkpoint now and exit 0. Opts into
    graceful stops (``graceful_stop``) on first call."""
    if not _graceful and threading.current_thread() is threading.main_thread():
        graceful_stop()
    return _drain.is_set() or (_client is not None and _client.drain.is_set())


def checkpointer(url: str | None = None, *, job: str | None = None):
    """This rank's RankCheckpointer (created once): the coordinator's store, or ``url``."""
    global _rank_checkpointer
    if _rank_checkpointer is None or (url and _rank_checkpointer.store.url != url):
        from rankwarden.worker._checkpointer import RankCheckpointer

        _rank_checkpointer = RankCheckpointer(url, job=job)
    return _rank_checkpointer


def save(step: int, state, *, wait: bool = True, url: str | None = None, per_rank=None) -> None:
    """Checkpoint this rank's ``state`` for ``step`` (all ranks call it for the same step).

    Under rankwarden the coordinator commits the step once every rank has
    written its file; ``wait`` blocks until it has. Under plain torchrun with
    ``url`` the ranks commit through torch.distributed.

    Sharded state: when ``state`` holds DTensors (FSDP2) or has modules or
    optimizers as top-level values, or when ``per_rank`` is given, ``state``
    is saved through torch.distributed.checkpoint (a collective: shards by
    their owners, replicated tensors once) and ``per_rank`` (RNG, data
    position) as this rank's own file; restore it with ``restore(into=...)``."""
    from rankwarden.checkpoint import torch_payload
    from rankwarden.checkpoint._dcp import has_sharded_state

    ckpt = checkpointer(url)
    if per_rank is not None or has_sharded_state(state):
        ckpt.save_sharded(step, state, per_rank)
    else:
        ckpt.save(step, torch_payload(state))
    if wait and not ckpt.wait_committed(step, timeout=600):
        from rankwarden.errors import CheckpointError

        raise CheckpointError(f"step {step} was not committed within 600s")


def restore(*, url: str | None = None, map_location="cpu", into=None):
    """(step, state) of this rank from the step every rank resumes from, or None to start fresh.

    With ``into`` (the state as given to a sharded ``save``): loads the step's
    sharded state into it in place (collective; resharded when the step was
    written by another world size) and returns (step, per_rank): this rank's
    per-rank state, or a ``rankwarden.checkpoint.Resharded`` with every writer
    rank's when the world size changed.

    Under rankwarden the coordinator chose that step (the newest committed one
    whose files all verify, of this job's world size and run) and told every
    rank the same one; under torchrun rank 0 chooses and broadcasts it (call
    this after ``init_process_group``). If this rank cannot read that step it
    raises CheckpointError instead of loading another one."""
    if into is not None:
        return checkpointer(url).load_sharded_latest(into, map_location=map_location)
    return checkpointer(url).load_latest_state(map_location=map_location)


def __getattr__(name: str):
    # RankCheckpointer pulls in the checkpoint plane: load it only when asked for.
    if name == "RankCheckpointer":
        from rankwarden.worker._checkpointer import RankCheckpointer

        return RankCheckpointer
    raise AttributeError(f"module 'rankwarden.worker' has no attribute {name!r}")


def rng_state() -> dict:
    """Every RNG a training script is likely to use, as checkpointable values."""
    import random

    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    import random

    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    # A generator's state must be a CPU ByteTensor: a checkpoint loaded with
    # map_location="cuda" brings these back on the GPU, so move them home.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, gauss))


def _goodbye(exit_code: int) -> None:
    if _client is not None:
        _client.goodbye(exit_code)
