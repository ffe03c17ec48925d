"""A job's metrics as time series: what ``rankwarden.worker.report(step, loss=...)`` sent, kept small.

Ranks send their newest metrics with every heartbeat; the coordinator keeps
only the newest. ``MetricsRecorder`` samples the job's snapshot every
``SAMPLE`` seconds and appends one point when the step or a metric changed:
the time, the job's step (the slowest rank's), steps/s and samples/s, and
each user metric averaged over the ranks that report it.

Downsampling keeps a week-long job small: a series holds at most
``CAPACITY`` points. When it is full, neighbouring pairs are merged (mean
time and values, the later step and sequence number), halving the
resolution, and from then on each stored point is the mean of twice as many
samples. Recent and old history end up at the same resolution, and memory
and the JSON answer stay bounded whatever the job's length. Every point
keeps the sequence number of the newest sample in it, so an SSE client
resuming with ``Last-Event-ID`` gets exactly the points after the ones it
has (merged points it already saw are not sent again).

The series is saved to ``metrics.json`` in the job directory (in a worker
thread, every ``SAVE_EVERY`` seconds and when the job ends), so a finished
job's charts survive the server, and a resumed job continues its series.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import msgspec
import trio

__all__ = ["CAPACITY", "MetricsRecorder", "MetricsSeries", "load_series", "render_job_metrics"]

log = logging.getLogger(__name__)

CAPACITY = 1024  # points per series; merged in pairs when full
SAMPLE = 0.5  # seconds between samples of the job's snapshot
SAVE_EVERY = 30.0  # seconds between saves of metrics.json while the job runs
MAX_NAMES = 32  # user metrics kept per job; more are ignored (and logged once)
KEEPALIVE = 15.0
BUILTIN = ("steps_per_second", "samples_per_second")


class MetricsSeries(msgspec.Struct, kw_only=True):
    """A job's downsampled series, column by column (the layout charting libraries take).

    ``time[i]``, ``step[i]``, ``seq[i]`` and ``values[name][i]`` describe point
    ``i``; a value is null where no rank reported that metric then."""

    job_id: str
    #: Samples merged into each point (1, 2, 4, ...): the series' resolution.
    stride: int = 1
    #: Samples taken so far; the sequence number of the newest.
    samples: int = 0
    time: list[float] = []
    step: list[int] = []
    seq: list[int] = []
    values: dict[str, list[float | None]] = {}
    #: Each metric's newest value (what the Prometheus gauges export).
    latest: dict[str, float] = {}

    def after(self, seq: int) -> list[dict]:
        """The points whose sequence number is above ``seq``, oldest first."""
        start = len(self.seq)
        while start > 0 and self.seq[start - 1] > seq:
            start -= 1
        return [{"seq": self.seq[i], "time": self.time[i], "step": self.step[i],
                 "values": {k: v[i] for k, v in self.values.items() if v[i] is not None}}
                for i in range(start, len(self.seq))]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or inf


class MetricsRecorder:
    """Samples a job's snapshots into its ``MetricsSeries``; one per job the server runs."""

    def __init__(self, job_id: str, snapshot: Callable, rates: Callable[[], tuple[float | None, float | None]],
                 path: Path) -> None:
        self.snapshot, self.rates, self.path = snapshot, rates, path
        self.series = load_series(path, job_id) or MetricsSeries(job_id=job_id)
        self.new_point = trio.Event()  # set (and replaced) after each new point
        self.finished = False
        self._pending: list[tuple[float, int, dict[str, float]]] = []
        self._last: tuple[int, dict[str, float]] | None = None
        self._ignored: set[str] = set()

    async def run(self) -> None:
        """Sample until cancelled; the caller saves once more when the job ends (``finish``)."""
        saved = time.monotonic()
        while True:
            self.sample()
            if time.monotonic() - saved >= SAVE_EVERY:
                await self.save()
                saved = time.monotonic()
            await trio.sleep(SAMPLE)

    def sample(self, now: float | None = None) -> bool:
        """Take one sample of the job's snapshot; True if it added one."""
        snap = self.snapshot()
        # A failed or stopped rank's last step is stale: it would hold the job's step back.
        ranks = [r for r in snap.ranks if r.state.value not in ("failed", "stopped")]
        steps = [r.step for r in ranks]
        if not steps or any(s is None for s in steps):
            return False
        step = min(steps)
        sums: dict[str, list[float]] = {}
        for r in ranks:
            for name, value in r.metrics.items():
                sums.setdefault(name, []).append(value)
        values = {name: sum(v) / len(v) for name, v in sums.items()}
        if self._last == (step, values):
            return False  # nothing moved: a stalled job adds no points
        self._last = (step, values)
        values = self._bounded(values)
        steps_rate, samples_rate = self.rates()
        if steps_rate is not None:
            values["steps_per_second"] = steps_rate
        if samples_rate is not None:
            values["samples_per_second"] = samples_rate
        self.add(time.time() if now is None else now, step, values)
        return True

    def _bounded(self, values: dict[str, float]) -> dict[str, float]:
        names = self.series.values
        kept = {}
        for name, value in values.items():
            if name in names or len(names) + len(kept) < MAX_NAMES + len(BUILTIN):
                kept[name] = value
            elif name not in self._ignored:
                self._ignored.add(name)
                log.warning("job=%s: metric %r ignored: a job keeps at most %d metrics", self.series.job_id,
                            name, MAX_NAMES)
        return kept

    def add(self, t: float, step: int, values: dict[str, float]) -> None:
        s = self.series
        s.samples += 1
        for name, value in values.items():
            if (v := _finite(float(value))) is not None:
                s.latest[name] = v
        self._pending.append((t, step, values))
        if len(self._pending) >= s.stride:
            self._append(self._pending)
            self._pending = []
        self.new_point.set()
        self.new_point = trio.Event()

    def _append(self, pending: list[tuple[float, int, dict[str, float]]]) -> None:
        s = self.series
        s.time.append(round(sum(p[0] for p in pending) / len(pending), 3))
        s.step.append(pending[-1][1])
        s.seq.append(s.samples)
        names = set(s.values).union(*(p[2] for p in pending))
        for name in names:
            column = s.values.setdefault(name, [None] * (len(s.time) - 1))
            got = [v for p in pending if name in p[2] and (v := _finite(float(p[2][name]))) is not None]
            column.append(sum(got) / len(got) if got else None)
        if len(s.time) >= CAPACITY:
            _halve(s)

    async def save(self) -> None:
        data = msgspec.json.encode(self.series)
        await trio.to_thread.run_sync(_write_atomic, self.path, data)

    async def finish(self) -> None:
        """The job ended: take a last sample, keep the partial point, save, and end the streams."""
        try:
            self.sample()
        except Exception:  # the job's record matters more than its charts
            log.exception("job=%s: the last metrics sample failed", self.series.job_id)
        if self._pending:
            self._append(self._pending)
            self._pending = []
        self.finished = True
        self.new_point.set()
        try:
            await self.save()
        except OSError as exc:  # the job's record matters more than its charts
            log.warning("job=%s: could not save its metrics to %s: %s", self.series.job_id, self.path, exc)


def _halve(s: MetricsSeries) -> None:
    # Merge neighbours: mean time and values, the later step and sequence
    # number (so resuming clients see no point twice). An odd last point stays.
    n = len(s.time) // 2 * 2
    s.time[:n] = [round((s.time[i] + s.time[i + 1]) / 2, 3) for i in range(0, n, 2)]
    s.step[:n] = [s.step[i + 1] for i in range(0, n, 2)]
    s.seq[:n] = [s.seq[i + 1] for i in range(0, n, 2)]
    for name, column in s.values.items():
        merged = []
        for i in range(0, n, 2):
            pair = [v for v in (column[i], column[i + 1]) if v is not None]
            merged.append(sum(pair) / len(pair) if pair else None)
        column[:n] = merged
    s.stride *= 2


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_series(path: Path, job_id: str) -> MetricsSeries | None:
    """A saved series (blocking: small, read once per job), or None if there is none or it is damaged."""
    try:
        series = msgspec.json.decode(path.read_bytes(), type=MetricsSeries)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("job=%s: ignoring its damaged metrics file %s: %s", job_id, path, exc)
        return None
    lengths = {len(series.time), len(series.step), len(series.seq), *map(len, series.values.values())}
    return series if len(lengths) == 1 else None


async def stream_points(recorder: Callable[[], MetricsRecorder | None], series: Callable[[], MetricsSeries],
                        after: int, summary: Callable[[], Awaitable[object]] | None = None,
                        every: float = 1.0) -> AsyncIterator[bytes]:
    """SSE frames: each new point (``id`` is its sequence number), and with ``summary`` a
    ``summary`` event each ``every`` seconds while the job runs; ``end`` after the job does."""
    yield b": rankwarden metrics\n\n"
    encode = msgspec.json.encode
    last_sent = after
    while True:
        live = recorder()
        signal = live.new_point if live is not None else None
        points = series().after(last_sent)
        if points:
            last_sent = points[-1]["seq"]
            yield b"".join(b"id: %d\nevent: point\ndata: %s\n\n" % (p["seq"], encode(p)) for p in points)
        if summary is not None:
            body = await summary()
            yield b"event: summary\ndata: %s\n\n" % encode(body)
        if live is None or live.finished:
            yield b"event: end\ndata: {}\n\n"
            return
        with trio.move_on_after(every if summary is not None else KEEPALIVE) as scope:
            await signal.wait()  # type: ignore[union-attr]
        if scope.cancelled_caught and summary is None:
            yield b": keep-alive\n\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_job_metrics(latest: dict[str, tuple[dict[str, float], object]]) -> str:
    """Prometheus gauges of each running job's newest user metrics, rates, ETA and goodput.

    ``latest``: job id -> (the newest value of each metric, the job's JobSummary)."""
    metric, step, samples, eta, good = [], [], [], [], []
    for job_id, (values, summary) in sorted(latest.items()):
        job = _label(job_id)
        for name, value in sorted(values.items()):
            if name not in BUILTIN:
                metric.append(f'rankwarden_job_metric{{job="{job}",metric="{_label(name)}"}} {value!r}')
        if getattr(summary, "step", None) is not None:
            step.append(f'rankwarden_job_step{{job="{job}"}} {summary.step}')
        if getattr(summary, "samples_per_second", None) is not None:
            samples.append(f'rankwarden_samples_per_second{{job="{job}"}} {summary.samples_per_second:.4f}')
        if getattr(summary, "eta_seconds", None) is not None:
            eta.append(f'rankwarden_job_eta_seconds{{job="{job}"}} {summary.eta_seconds:.1f}')
        if getattr(summary, "goodput", None) is not None:
            good.append(f'rankwarden_job_goodput{{job="{job}"}} {summary.goodput}')
    lines = ["# HELP rankwarden_job_metric The newest value of each metric a job reports "
             "(rankwarden.worker.report), averaged over its ranks.", "# TYPE rankwarden_job_metric gauge", *metric,
             "# HELP rankwarden_job_step The job's step (its slowest rank's).", "# TYPE rankwarden_job_step gauge",
             *step, "# HELP rankwarden_samples_per_second Samples per second over the last 10 s.",
             "# TYPE rankwarden_samples_per_second gauge", *samples,
             "# HELP rankwarden_job_eta_seconds Seconds until total_steps at the current rate.",
             "# TYPE rankwarden_job_eta_seconds gauge", *eta,
             "# HELP rankwarden_job_goodput Share of wall time spent on steps that were kept.",
             "# TYPE rankwarden_job_goodput gauge", *good]
    return "\n".join(lines) + "\n"
