"""``GET /metrics`` in the Prometheus text format.

O(running jobs): job counts by state come from one grouped query on the
state index (in a worker thread); everything per job is read from the jobs
this server runs now, never from the whole history.
"""

from __future__ import annotations

from rankwarden.api._schema import API_STATES

__all__ = ["render_metrics"]


def render_metrics(counts: dict[str, int], live: dict) -> str:
    """``counts``: jobs per state; ``live``: job id -> (JobSnapshot, steps per second or None)."""
    lines = ["# HELP rankwarden_jobs Jobs by state.", "# TYPE rankwarden_jobs gauge"]
    lines += [f'rankwarden_jobs{{state="{s}"}} {counts.get(s, 0)}' for s in API_STATES]
    restarts, failures, ages, rates = [], {}, [], []
    for job_id, (snap, steps_rate) in sorted(live.items()):
        restarts.append(f'rankwarden_restarts_total{{job="{job_id}"}} {snap.restarts_used}')
        for f in snap.failures:
            failures[(job_id, f.cause.value)] = failures.get((job_id, f.cause.value), 0) + 1
        for r in snap.ranks:
            if r.heartbeat_age is not None:
                ages.append(f'rankwarden_heartbeat_age_seconds{{job="{job_id}",rank="{r.rank}"}} {r.heartbeat_age:.3f}')
        if steps_rate is not None:
            rates.append(f'rankwarden_steps_per_second{{job="{job_id}"}} {steps_rate:.4f}')
    lines += ["# HELP rankwarden_restarts_total Restarts used, per job this server runs.",
              "# TYPE rankwarden_restarts_total counter", *restarts]
    lines += ["# HELP rankwarden_failures_total Rank failures by cause.", "# TYPE rankwarden_failures_total counter"]
    lines += [f'rankwarden_failures_total{{job="{j}",cause="{c}"}} {n}' for (j, c), n in sorted(failures.items())]
    lines += ["# HELP rankwarden_heartbeat_age_seconds Seconds since each rank's last heartbeat.",
              "# TYPE rankwarden_heartbeat_age_seconds gauge", *ages]
    lines += ["# HELP rankwarden_steps_per_second Training steps per second over the last 10 s.",
              "# TYPE rankwarden_steps_per_second gauge", *rates]
    return "\n".join(lines) + "\n"
