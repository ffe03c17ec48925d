"""The Trio coordinator: one job, its ranks, their liveness and restarts."""

from rankwarden.coordinator._job import Coordinator, run_job
from rankwarden.coordinator._rank import CONNECTION_LOST_GRACE

__all__ = ["CONNECTION_LOST_GRACE", "Coordinator", "run_job"]
