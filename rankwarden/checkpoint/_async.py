"""Async save: the training thread copies, a background thread writes and commits.

At most one save is in flight. A new ``save`` while one is running either
waits for it (policy ``wait``) or is skipped (policy ``skip``). The error of a
background save is raised by the next ``save`` or ``wait`` and reported to
``on_error`` (the worker sends it to the coordinator's event log); it never
touches LATEST, because a failed save never reaches its commit.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from rankwarden.checkpoint._torch import copy_to_buffers
from rankwarden.errors import CheckpointError

__all__ = ["AsyncCheckpointer"]

log = logging.getLogger(__name__)


class AsyncCheckpointer:
    """Wraps ``write(step, cpu_state)`` (e.g. a store save) so that it runs in the background."""

    def __init__(
        self,
        write: Callable[[int, Any], Any],
        *,
        policy: str = "wait",
        on_error: Callable[[int, BaseException], None] | None = None,
    ) -> None:
        if policy not in ("wait", "skip"):
            raise ValueError(f"policy must be 'wait' or 'skip', got {policy!r}")
        self._write = write
        self._policy = policy
        self._on_error = on_error
        self._buffers: dict = {}
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        self._result: Any = None
        self.last_step: int | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, step: int, state: Any) -> bool:
        """Copy ``state`` to CPU buffers and write it in the background; False if skipped."""
        if self.busy:
            if self._policy == "skip":
                log.info("checkpoint step %d skipped: the save of step %s is still running", step, self.last_step)
                return False
            self._join()
        self._raise_pending()
        snapshot = copy_to_buffers(state, self._buffers)
        self._sync_devices()
        self.last_step = step
        self._thread = threading.Thread(target=self._run, args=(step, snapshot), name="rankwarden-async-save", daemon=True)
        self._thread.start()
        return True

    def wait(self) -> Any:
        """Block until the in-flight save is durable; raise its error if it failed."""
        self._join()
        self._raise_pending()
        return self._result

    def _run(self, step: int, snapshot: Any) -> None:
        try:
            self._result = self._write(step, snapshot)
        except BaseException as exc:
            self._error = (step, exc)
            log.error("background checkpoint save of step %d failed: %s", step, exc)
            if self._on_error is not None:
                try:
                    self._on_error(step, exc)
                except Exception:  # reporting must not mask the error itself
                    log.exception("reporting the failed save of step %d failed", step)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _raise_pending(self) -> None:
        if self._error is not None:
            step, exc = self._error
            self._error = None
            raise CheckpointError(f"background save of step {step} failed: {exc}") from exc

    def _sync_devices(self) -> None:
        # A non_blocking GPU->pinned copy must land before the writer reads it.
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
