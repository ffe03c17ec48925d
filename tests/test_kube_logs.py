"""The pod log copy's sans-IO part: timestamps parsed as Kubernetes writes them, and the mark."""

from __future__ import annotations

import pytest

from rankwarden.kube._logs import LogMark, TimestampedLines, load_mark, mark_path, parse_time, save_mark, since_time

T = 1_767_322_800 * 10**9  # 2026-01-02T03:00:00Z


@pytest.mark.parametrize("text, ns", [
    ("2026-01-02T03:00:00Z", T),
    ("2026-01-02T03:00:00.5Z", T + 500_000_000),
    ("2026-01-02T03:00:00.123456789Z", T + 123_456_789),
    ("2026-01-02T04:30:00.000000001+01:30", T + 1),
    ("2026-01-02T01:00:00-02:00", T),
])
def test_times_parse_as_kubernetes_writes_them(text, ns):
    assert parse_time(text) == ns


def test_lines_at_or_before_the_mark_are_dropped_even_when_times_repeat():
    stream = (b"2026-01-02T03:00:00Z a\n2026-01-02T03:00:00.5Z b\n2026-01-02T03:00:00.5Z c\n"
              b"2026-01-02T03:00:00.5Z d\n2026-01-02T03:00:01Z e\n2026-01-02T03:00:02Z f")
    first = TimestampedLines()
    copied = first.feed(stream[:40])  # "a", and "b" cut in the middle
    assert copied == b"a\n" and first.mark == LogMark(T, 1)
    copied += first.feed(stream[40:75])  # "b", "c", and "d" cut
    assert copied == b"a\nb\nc\n" and first.mark == LogMark(T + 500_000_000, 2)
    # The next coordinator asks from the mark's second and gets "a" to "f" again.
    assert since_time(first.mark) == "2026-01-02T03:00:00Z"
    second = TimestampedLines(first.mark)
    rest = second.feed(stream[:37]) + second.feed(stream[37:]) + second.end()
    assert rest == b"d\ne\nf" and second.mark == LogMark(T + 2 * 10**9, 1)


def test_the_mark_survives_in_a_file_beside_the_log(tmp_path):
    path = mark_path(tmp_path / "rank_0.stdout")
    assert path.name == "rank_0.stdout.k8s-log-mark" and load_mark(path) is None
    save_mark(path, LogMark(T + 7, 3))
    assert load_mark(path) == LogMark(T + 7, 3)
