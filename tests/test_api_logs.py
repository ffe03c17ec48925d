"""Issue 12 item 10: rank output is copied when it is written (inotify), not on a poll; GC pauses stay short."""

from __future__ import annotations

import pytest
import trio

from rankwarden.api import _inotify, _logs
from rankwarden.api._logs import LogCopier
from rankwarden.coordinator._jobdir import JobDir

pytestmark = pytest.mark.skipif(_inotify._LIBC is None, reason="inotify is Linux-only")


async def _until(copier: LogCopier, count: int) -> None:
    while True:
        signal = copier.new_line  # taken before the check: no copy falls in between
        if copier.seq >= count:
            return
        await signal.wait()


async def test_a_write_wakes_the_copier_without_a_poll(tmp_path, monkeypatch):
    # With the safety-net poll an hour long, only inotify can make these copies.
    monkeypatch.setattr(_logs, "SLOW", 3600.0)
    monkeypatch.setattr(_logs, "SAFETY", 3600.0)
    job_dir = JobDir(tmp_path / "job")
    first, _ = job_dir.log_paths(0, 1)
    first.parent.mkdir(parents=True)
    first.write_bytes(b"one\n")
    copier = LogCopier(job_dir, tmp_path / "job" / "logs.jsonl")
    attempt = [1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copier.run, lambda: [(0, attempt[0])])
            await _until(copier, 1)
            with open(first, "ab") as f:
                f.write(b"two\n")
            await _until(copier, 2)
            # A new attempt's directory, made after the copier started watching.
            attempt[0] = 2
            second, _ = job_dir.log_paths(0, 2)
            second.parent.mkdir()
            await trio.sleep(0.05)  # the copy that the new directory triggers
            second.write_bytes(b"three\n")
            await _until(copier, 3)
            nursery.cancel_scope.cancel()
    assert [line for _, _, line in copier.cached(0)[0]] == [
        b'id: %d\ndata: {"id":%d,"attempt":%d,"rank":0,"stream":"stdout","line":"%s","end":%d}\n\n' % (i, i, a, w, e)
        for i, a, w, e in ((1, 1, b"one", 4), (2, 1, b"two", 8), (3, 2, b"three", 6))]
    assert copier._watch is None  # closed on the way out


async def test_subscribers_are_served_from_memory_while_it_reaches_back(tmp_path, monkeypatch):
    monkeypatch.setattr(_logs, "RECENT", 10)
    job_dir = JobDir(tmp_path / "job")
    out, _ = job_dir.log_paths(0, 1)
    out.parent.mkdir(parents=True)
    copier = LogCopier(job_dir, tmp_path / "job" / "logs.jsonl")
    for batch in range(5):
        with open(out, "ab") as f:
            f.write(b"".join(b"%d\n" % (batch * 7 + i) for i in range(7)))
        await copier.copy([(0, 1)])
    assert copier.seq == 35
    records, covered = copier.cached(30)
    assert covered and [n for n, _, _ in records] == [31, 32, 33, 34, 35]
    assert records[-1][1] == (tmp_path / "job" / "logs.jsonl").stat().st_size  # where a file reader goes on
    assert copier.cached(35) == ([], True)
    assert copier.cached(2) == ([], False)  # trimmed: that subscriber reads the file


async def test_a_watch_that_cannot_be_added_falls_back_to_polling(tmp_path, monkeypatch):
    monkeypatch.setattr(_logs, "SLOW", 0.05)
    job_dir = JobDir(tmp_path / "job")
    out, _ = job_dir.log_paths(0, 1)
    out.parent.mkdir(parents=True)
    copier = LogCopier(job_dir, tmp_path / "job" / "logs.jsonl")
    opened = []

    def broken() -> _inotify.DirWatch:
        watch = _inotify.DirWatch(-1)  # every add fails: as when the per-user watch limit is reached
        opened.append(watch)
        return watch

    monkeypatch.setattr(_inotify.DirWatch, "open", broken)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copier.run, lambda: [(0, 1)])
            await trio.sleep(0.01)
            out.write_bytes(b"one\n")
            await _until(copier, 1)
            nursery.cancel_scope.cancel()
    assert opened[0].failed and copier._watch is None


def test_the_server_process_tunes_its_garbage_collector_and_a_library_caller_keeps_its_own():
    import subprocess
    import sys

    probe = ("import gc; from rankwarden.api._server import _tune_gc; before = gc.get_threshold(); _tune_gc(); "
             "print(before[0], gc.get_threshold()[0], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split() == ["700", "50000", "True"]
    import inspect

    from rankwarden.api import serve_api
    assert inspect.signature(serve_api).parameters["tune_gc"].default is False


@pytest.fixture
def opens(monkeypatch):
    """Every rank file the copier opens, through its one seam."""
    opened: list[str] = []

    def counting(path, mode="r"):
        opened.append(str(path))
        return open(path, mode)

    monkeypatch.setattr(_logs, "_open", counting)
    return opened


async def test_an_idle_job_has_no_file_opened_and_a_write_opens_only_its_file(tmp_path, monkeypatch, opens):
    monkeypatch.setattr(_logs, "SAFETY", 0.05)  # many safety-net passes in the idle spell below
    job_dir = JobDir(tmp_path / "job")
    ranks = 50
    for rank in range(ranks):
        for path in job_dir.log_paths(rank, 1):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"old line\n")
    copier = LogCopier(job_dir, tmp_path / "job" / "logs.jsonl")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copier.run, lambda: [(r, 1) for r in range(ranks)])
            await _until(copier, 2 * ranks)
            assert len(opens) == 2 * ranks  # the first pass reads each file once
            opens.clear()
            await trio.sleep(0.5)  # idle: about ten safety-net passes
            assert opens == []
            stdout, _ = job_dir.log_paths(7, 1)
            with open(stdout, "ab") as f:
                f.write(b"new line\n")
            await _until(copier, 2 * ranks + 1)
            nursery.cancel_scope.cancel()
    assert opens == [str(stdout)]  # inotify named the file: nothing else was opened


async def test_a_write_that_inotify_misses_is_copied_by_the_safety_net(tmp_path, monkeypatch, opens):
    monkeypatch.setattr(_logs, "SAFETY", 0.3)
    job_dir = JobDir(tmp_path / "job")
    stdout, _ = job_dir.log_paths(0, 1)
    stdout.parent.mkdir(parents=True)
    stdout.write_bytes(b"one\n")
    copier = LogCopier(job_dir, tmp_path / "job" / "logs.jsonl")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copier.run, lambda: [(0, 1)])
            await _until(copier, 1)
            # Lose every event from now on (as an overflowed queue or a watch that
            # went away does): only the safety net's full pass can copy the write.
            watch = copier._watch
            assert watch is not None
            monkeypatch.setattr(watch, "take", lambda: set())
            with open(stdout, "ab") as f:
                f.write(b"two\n")
            written = trio.current_time()
            await _until(copier, 2)
            took = trio.current_time() - written
            nursery.cancel_scope.cancel()
    assert took < 0.3 + 5.0  # within one safety-net period (and a generous margin for a loaded machine)
    assert [line for _, _, line in copier.cached(1)[0]] == [
        b'id: 2\ndata: {"id":2,"attempt":1,"rank":0,"stream":"stdout","line":"two","end":8}\n\n']


async def test_the_events_name_the_files_that_changed(tmp_path):
    watch = _inotify.DirWatch.open()
    assert watch is not None
    try:
        (tmp_path / "a").write_bytes(b"")
        assert watch.add(tmp_path)
        with trio.fail_after(10):
            (tmp_path / "a").write_bytes(b"x")
            (tmp_path / "b").write_bytes(b"y")
            while not await watch.wait(1.0):
                pass
            await trio.sleep(0.05)
            await watch.wait(0.01)
        assert watch.take() == {str(tmp_path / "a"), str(tmp_path / "b")}
        assert watch.take() == set()
        # An event it cannot place (here: an overflowed queue) means "anything may have changed".
        watch._parse(_inotify._EVENT.pack(-1, _inotify._IN_Q_OVERFLOW, 0, 0))
        assert watch.take() is None
    finally:
        watch.close()
