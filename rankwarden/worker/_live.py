"""Live recovery, rank side: survivors keep their process and state; only the failed rank is replaced.

A training script hands its step to ``Live.steps`` (see ``rankwarden.worker.live``)::

    live = rw.live(model, optimizer, wrap=DDP)
    for step, loss in live.steps(start, total, train_step):
        rw.report(step)

When a peer dies, the collective the step is blocked in fails (gloo: the
peer's socket closes when the coordinator SIGKILLs it; NCCL: the
coordinator's ``Abort`` aborts the communicator). This rank then stops at
the step boundary, tells the coordinator ``LiveReady`` with the last step it
applied, destroys the broken process group, and waits for ``Reconfigure``:
a fresh rendezvous (new MASTER_PORT) that the failed rank's replacement joins
too. In the new group every rank takes the state of one source rank, the
interrupted step is trained again, and nothing else is.

Why the state after recovery is right (replicated, DDP-style training):

1. Every rank applies the same update for step k, or none: the update is
   ``optimizer.step()`` after DDP's gradient allreduce; if the allreduce
   failed on a rank, that rank raised before its optimizer step, so the
   partial gradient is never applied there.
2. But an allreduce can complete on some ranks and fail on others (a ring
   allreduce delivers its last chunks at different moments; a peer can die
   between them). So survivors may differ by one step: some applied k, some
   only k-1. A rank cannot un-apply k, so the group does not take the
   minimum: it takes the state of the survivor with the **highest** applied
   step (its allreduce completed, so its update is the true average), lowest
   rank on ties, and **every** rank, survivors included, loads that state:
   parameters and buffers (broadcast in place), the optimizer's state, the
   RNG states and the script's own ``state`` (data position), all captured at
   the moment that step was applied. Identical ranks by construction.
3. The choice is made inside the new group (an all-gather of applied steps),
   so every rank computes the same source from the same numbers; the
   replacement contributes no step and is never the source.
4. Which step a rank applied is recorded by an optimizer step post-hook,
   not by the step function returning: a collective that fails after
   ``optimizer.step()`` (a logged metric's allreduce) must not make a rank
   that applied step k claim k-1.
5. Gradients left by the failed step are dropped (``grad = None``), and the
   DDP wrapper is rebuilt on the new group (its constructor broadcasts from
   rank 0 and checks that every rank has the same parameters: they do).

What it does not cover: sharded state (FSDP: no rank holds the whole state),
collectives outside the step function, and an optimizer that raises half way
through its update. Those fail over to the group restart from the agreed
checkpoint, which the coordinator also uses when live recovery cannot
proceed (a second failure while reconfiguring, a rank that does not rejoin
in time): a slower recovery, never a wrong state.

Without rankwarden (plain torchrun), or with a job that is not live,
``steps`` is a plain loop: the script runs unchanged.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterator

from rankwarden import protocol

__all__ = ["Live", "collective_timeout"]

log = logging.getLogger(__name__)

#: Seconds a rank whose collective failed waits for the coordinator's
#: ``Reconfigure`` before it gives up and re-raises (the coordinator then
#: restarts the group): the job's live_timeout plus a margin.
_WAIT_MARGIN = 30.0


def collective_timeout(client=None) -> datetime.timedelta | None:
    """The timeout to give ``init_process_group`` in a live job, or None outside one.

    A rank blocked in a collective on a hung peer gives up after it (gloo) and
    reports itself ready, before the hung peer's progress deadline fires: so
    the coordinator kills the hung rank, not a survivor that waits for it.

    A replacement gets the rendezvous timeout instead (``Live`` sets the
    collective one once it has joined): it may start before the new group's
    store is up, and c10d's store client gives up on its first try after the
    timeout and then backs off for seconds (seen: 4 s, then a 5 s delay)."""
    value = os.environ.get("RANKWARDEN_LIVE_COLLECTIVE_TIMEOUT")
    if not value:
        return None
    welcome = getattr(client, "welcome", None)
    if welcome is not None and welcome.live_generation > 0:
        return _rendezvous_timeout()
    return datetime.timedelta(seconds=float(value))


def _rendezvous_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("RANKWARDEN_LIVE_TIMEOUT") or 120.0))


class Live:
    """One rank's live-recovery state. Create it through ``rankwarden.worker.live``."""

    def __init__(
        self,
        module,
        optimizer,
        *,
        wrap: Callable | None = None,
        state: Callable[[], Any] | None = None,
        load_state: Callable[[Any], None] | None = None,
        client=None,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self._wrap = wrap or (lambda m: m)
        self._state = state
        self._load_state = load_state
        self._client = client
        self.enabled = client is not None and os.environ.get("RANKWARDEN_LIVE") == "1"
        welcome = getattr(client, "welcome", None)
        #: The process group generation this rank trains in (0: the script's own).
        self.generation = welcome.live_generation if welcome is not None else 0
        self._joining = self.generation > 0
        #: The current group was formed with the rendezvous timeout (collective_timeout()).
        self._joined_with_long_timeout = self._joining
        #: The last step whose optimizer update this rank applied.
        self.applied = -1
        self._current: int | None = None
        self._backend = "gloo"
        self._snapshot: tuple[int, dict, Any] | None = None
        #: Set from the heartbeat thread by ``Abort``: the group this rank is in is broken.
        self._aborted = threading.Event()
        #: The wrapped model of the current group (what the step function trains).
        self.model = None
        #: (generation, source rank, applied step, seconds) of each recovery, for scripts and tests.
        self.recoveries: list[tuple[int, int, int, float]] = []
        optimizer.register_step_post_hook(self._on_optimizer_step)
        if self.enabled:
            client.live_abort = self._on_abort

    # -- the loop --------------------------------------------------------------------

    def steps(self, start: int, stop: int, train_step: Callable[[int, Any], Any]) -> Iterator[tuple[int, Any]]:
        """Run ``train_step(step, model)`` for steps ``start .. stop-1``; yield
        ``(step, result)`` after each step that completed.

        ``model`` is the wrapped model of the current process group: use it,
        not a wrapper of your own. On a live recovery the interrupted step runs
        again (on every rank, with the state of the source rank); steps already
        yielded are never yielded again. A replacement rank starts at the
        step after the one its source applied, whatever ``start`` says."""
        import torch.distributed as dist

        self.applied = start - 1
        self._backend = dist.get_backend()
        self._take_snapshot(self.applied)
        if self._joining:
            self._sync(dist)  # a replacement: the script's own init joined the new group
        else:
            self._announce(0, -1)
        self.model = self._wrap(self.module)
        self._set_collective_timeout()
        step = self.applied + 1
        while step < stop:
            self._current = step
            error = ""
            try:
                result = train_step(step, self.model)
            except Exception as exc:  # noqa: BLE001 - only a failed collective is recovered; see _recoverable
                if not self._recoverable(exc):
                    raise
                # Only the text goes on: the exception's traceback holds the step's frames, and
                # through them the old DDP wrapper and its process group. While they live, the
                # group's sockets stay open and a survivor blocked on *this* rank waits for its
                # whole collective timeout (seen: 4 s with 3 ranks) instead of failing at once.
                error = f"{type(exc).__name__}: {exc}"
            finally:
                self._current = None
            if error:
                self._recover(dist, error)
                step = self.applied + 1
                continue
            self.applied = step
            self._take_snapshot(step)
            yield step, result
            step += 1

    # -- recovery --------------------------------------------------------------------

    def _recoverable(self, exc: BaseException) -> bool:
        # A failed collective surfaces as RuntimeError (DistBackendError,
        # DistNetworkError and gloo's "Connection closed by peer" all are).
        # Anything else is the script's own bug: recovering would repeat it.
        return self.enabled and (isinstance(exc, RuntimeError) or self._aborted.is_set())

    def _recover(self, dist, error: str) -> None:
        began = time.monotonic()
        old = self.generation
        error = error[:500]
        sys.stderr.write(f"rankwarden: live: step {self.applied + 1} failed in process group {old} ({error.splitlines()[0]}); "
                         f"waiting for the coordinator to reconfigure\n")
        sys.stderr.flush()
        self._client.send(protocol.LiveReady(generation=old, step=self.applied, error=error))
        backend = self._backend  # an aborted NCCL group may already be gone from the registry
        self._drop_wrapper()
        if dist.is_initialized():
            dist.destroy_process_group()
        timeout = float(os.environ.get("RANKWARDEN_LIVE_TIMEOUT") or 120.0) + _WAIT_MARGIN
        message = self._client.wait_reconfigure(old + 1, timeout)
        if message is None:
            raise RuntimeError(
                f"live recovery: no reconfiguration from the coordinator within {timeout:g}s of the failure "
                f"of step {self.applied + 1} ({error}); giving up (the coordinator restarts the group)"
            )
        os.environ.update({"MASTER_ADDR": message.master_addr, "MASTER_PORT": str(message.master_port),
                           "WORLD_SIZE": str(message.world_size), "RANK": str(message.rank)})
        # Rendezvous with the long timeout (the replacement may still be starting), then
        # the group gets the collective timeout (_sync).
        dist.init_process_group(backend, timeout=_rendezvous_timeout())
        self._joined_with_long_timeout = True
        self.generation = message.generation
        self._aborted.clear()
        self._sync(dist)
        self.model = self._wrap(self.module)
        self._set_collective_timeout()
        self.recoveries[-1] = self.recoveries[-1][:3] + (time.monotonic() - began,)

    def _set_collective_timeout(self) -> None:
        """From the first step in a new group on: until then its members may still be
        starting (a replacement builds its model between its rendezvous and the
        state hand-over), which the rendezvous timeout covers."""
        if self._joined_with_long_timeout and (limit := collective_timeout()) is not None:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(limit)
            self._joined_with_long_timeout = False

    def _drop_wrapper(self) -> None:
        """Free the old DDP wrapper now: its reducer's hooks on the parameters would
        otherwise fire in the next backward and reduce over the dead group.

        Reference counting frees it at once when nothing else holds it; a full
        collection (0.15 to 0.6 s with torch loaded, on the recovery's critical
        path) runs only when something does."""
        old = weakref.ref(self.model) if self.model is not None else None
        self.model = None
        if old is not None and old() is not None:
            gc.collect()
            if old() is not None:
                raise RuntimeError(
                    "live recovery: something still holds the old DistributedDataParallel wrapper; "
                    "train with the model that live.steps passes to the step function, and keep no other reference"
                )

    def _sync(self, dist) -> None:
        """Agree on the source rank in the current group and load its state on every rank."""
        import torch

        world, rank = dist.get_world_size(), dist.get_rank()
        mine = -2 if self._joining else self.applied  # a replacement has nothing to give
        device = _device_of(self.module)
        gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([mine], dtype=torch.int64, device=device))
        steps = [int(t.item()) for t in gathered]
        best = max(steps)
        if best < -1:
            raise RuntimeError("live recovery: no rank of the new process group has training state to share")
        source = steps.index(best)
        payload: list[Any] = [None]
        if rank == source:
            step, rng, extra = self._snapshot or (self.applied, None, None)
            payload[0] = {"step": step, "optimizer": self.optimizer.state_dict(), "rng": rng, "extra": extra}
        dist.broadcast_object_list(payload, src=source)
        with torch.no_grad():
            for tensor in self.module.state_dict().values():
                dist.broadcast(tensor, src=source)
        state = payload[0]
        if rank != source:
            self.optimizer.load_state_dict(state["optimizer"])
        if state["rng"] is not None:
            from rankwarden.worker import set_rng_state

            set_rng_state(state["rng"])
        if state["extra"] is not None and self._load_state is not None:
            self._load_state(state["extra"])
        for param in self.module.parameters():
            param.grad = None  # what the failed step's backward left behind
        self.applied = state["step"]
        self._joining = False
        self._take_snapshot(self.applied)
        self.recoveries.append((self.generation, source, self.applied, 0.0))
        self._announce(self.generation, source)

    # -- hooks -----------------------------------------------------------------------

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._current is not None:
            self.applied = self._current
            self._take_snapshot(self._current)

    def _take_snapshot(self, step: int) -> None:
        from rankwarden.worker import rng_state

        extra = self._state() if self._state is not None else None
        self._snapshot = (step, rng_state(), extra)

    def _announce(self, generation: int, source: int) -> None:
        if self.enabled:
            self._client.send(protocol.LiveJoined(generation=generation, step=self.applied, source=source))

    def _on_abort(self, message: protocol.Abort) -> None:
        """Heartbeat thread: the coordinator killed a member of our group (verdict first)."""
        if message.generation != self.generation:
            return
        self._aborted.set()
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_backend() == "nccl":
            # NCCL may block forever on a dead peer; aborting the communicator
            # makes the blocked collective raise in the training thread.
            _abort_nccl(dist)


def _abort_nccl(dist) -> None:
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except (ImportError, RuntimeError, AttributeError) as exc:  # older torch: the backend's own abort
        try:
            dist.distributed_c10d._get_default_group()._get_backend(dist.get_backend_config()).abort()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - best effort; the collective timeout is the backstop
            log.warning("live: could not abort the NCCL communicator (%s); waiting for its timeout", exc)


def _device_of(module):
    import torch

    for param in module.parameters():
        return param.device
    return torch.device("cpu")
