"""Rank output as a user reads it (issue 15, item 9), on real processes; a real pty where layout matters."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import trio

from rankwarden.coordinator._jobdir import JobDir, RankOutputTail, read_as_shown

from .conftest import JOB_PREFIX

RANKWARDEN = [sys.executable, "-m", "rankwarden"]
FAST = ["--heartbeat-timeout", "5", "--heartbeat-interval", "0.1", "--max-restarts", "0"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAILING = """\
import sys, time
def inner():
    raise ValueError("boom")
def outer():
    inner()
print("out 1", flush=True)
time.sleep(1)
print("err 1", file=sys.stderr)
time.sleep(1)
print("out 2", flush=True)
time.sleep(1)
outer()
"""

BAR = """\
import sys, time
print("before", flush=True)
for i in range(41):
    sys.stderr.write(f"\\r{i * 100 // 40:3d}%|{'#' * (i // 2):<20}| {i}/40")
    sys.stderr.flush()
    time.sleep(0.05)
sys.stderr.write("\\n")
print("after", flush=True)
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT}


def run(tmp_path, *args) -> subprocess.CompletedProcess:
    """`rankwarden run` with stdout and stderr on one pipe, as a CI log has them."""
    return subprocess.run([*RANKWARDEN, "run", "--job-dir", str(tmp_path / "job"), *FAST, *args], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=90, env=env())


def render(raw: bytes) -> list[str]:
    """The screen a terminal shows for ``raw``: enough of one for what the console writes
    (\\r, \\n, erase to end of line, cursor up)."""
    screen, row, col = [""], 0, 0
    text, i = raw.decode(errors="replace"), 0
    while i < len(text):
        if text.startswith("\x1b[K", i):
            screen[row] = screen[row][:col]
            i += 3
            continue
        if text.startswith("\x1b[1A", i):
            row, i = max(0, row - 1), i + 4
            continue
        ch = text[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            if row == len(screen):
                screen.append("")
        else:
            line = screen[row].ljust(col)
            screen[row] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    return screen


async def run_on_a_terminal(tmp_path, *args) -> tuple[bytes, int]:
    master, slave = pty.openpty()
    raw = b""
    try:
        process = await trio.lowlevel.open_process(
            [*RANKWARDEN, "run", "--job-dir", str(tmp_path / "job"), *FAST, *args],
            stdout=slave, stderr=slave, cwd=tmp_path, env=env())
        os.close(slave)
        slave = -1
        with trio.fail_after(60):
            while True:
                await trio.lowlevel.wait_readable(master)
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed its end
                    break
                if not chunk:
                    break
                raw += chunk
            code = await process.wait()
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    return raw, code


def test_a_failing_scripts_traceback_is_pythons_and_comes_before_the_report(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    plain = subprocess.run([sys.executable, "failing.py"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    result = run(tmp_path, "--run-id", f"{JOB_PREFIX}tb", "failing.py")
    assert result.returncode == 1
    # The rank's own stderr is exactly what `python failing.py` prints: no launcher frames.
    assert (tmp_path / "job" / "attempt_001" / "rank_0.stderr").read_text() == plain.stderr
    assert "Traceback" in plain.stderr and "_bootstrap" not in result.stdout and "runpy" not in result.stdout
    lines = result.stdout.splitlines()
    echoed = [line[len("[rank0]: "):] for line in lines if line.startswith("[rank0]: ")]
    assert plain.stderr.splitlines()[0] == "err 1"
    assert echoed == ["out 1", "err 1", "out 2", *plain.stderr.splitlines()[1:]]  # in the order written
    traceback_end = lines.index("[rank0]: ValueError: boom")
    report = next(i for i, line in enumerate(lines) if "failed: restart budget spent" in line)
    assert traceback_end < report


def test_a_module_traceback_has_no_launcher_frames(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "train.py").write_text("def main():\n    raise KeyError('nope')\nmain()\n")
    result = run(tmp_path, "--run-id", f"{JOB_PREFIX}tbmod", "-m", "pkg.train")
    assert result.returncode == 1
    stderr = (tmp_path / "job" / "attempt_001" / "rank_0.stderr").read_text()
    train = tmp_path / "pkg" / "train.py"
    assert stderr == (
        "Traceback (most recent call last):\n"
        f'  File "{train}", line 3, in <module>\n    main()\n'
        f'  File "{train}", line 2, in main\n    raise KeyError(\'nope\')\n'
        "KeyError: 'nope'\n"
    )


def test_a_syntax_error_reads_as_python_prints_it(tmp_path):
    (tmp_path / "broken.py").write_text("x = (\n")
    plain = subprocess.run([sys.executable, "broken.py"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    result = run(tmp_path, "--run-id", f"{JOB_PREFIX}syntax", "broken.py")
    assert result.returncode == 1
    assert (tmp_path / "job" / "attempt_001" / "rank_0.stderr").read_text() == plain.stderr


def test_in_a_log_a_progress_bar_is_one_line_in_its_final_state(tmp_path):
    (tmp_path / "bar.py").write_text(BAR)
    result = run(tmp_path, "--run-id", f"{JOB_PREFIX}barlog", "bar.py")
    assert result.returncode == 0, result.stdout
    echoed = [line for line in result.stdout.splitlines() if line.startswith("[rank0]")]
    assert echoed == ["[rank0]: before", "[rank0]: 100%|####################| 40/40", "[rank0]: after"]
    assert "\r" not in result.stdout


async def test_on_a_terminal_a_progress_bar_updates_in_place(tmp_path):
    (tmp_path / "bar.py").write_text(BAR)
    raw, code = await run_on_a_terminal(tmp_path, "--run-id", f"{JOB_PREFIX}barpty", "bar.py")
    assert code == 0, raw
    screen = [line for line in render(raw) if line.strip()]
    ranks = [line for line in screen if line.startswith("[rank0]")]
    assert ranks == ["[rank0]: before", "[rank0]: 100%|####################| 40/40", "[rank0]: after"]
    assert not any(line.startswith("[rankwarden] attempt") for line in screen)  # the status line is gone
    # ...and while it ran, the bar was drawn in its intermediate states, in place.
    drawn = set(re.findall(rb"\[rank0\]: [ \d]{3}%\|[# ]{20}\| (\d+)/40", raw))
    assert drawn - {b"40"}, raw


def test_the_tail_collapses_redraws_even_split_across_reads(tmp_path):
    job_dir = JobDir(tmp_path)
    stdout, stderr = job_dir.log_paths(0, 1)
    stdout.parent.mkdir(parents=True)
    stdout.write_bytes(b"")
    tail = RankOutputTail(job_dir)
    with open(stderr, "wb", buffering=0) as f:
        f.write(b"plain\r\n\r 10%|#")
        assert [line.text for line in tail.read([(0, 1)])] == [b"plain"]
        assert [line.text for line in tail.partials] == [b" 10%|#"]
        f.write(b"\r 50%|#####\r")  # a redraw ending in \r: maybe the first half of \r\n
        assert tail.read([(0, 1)]) == [] and [line.text for line in tail.partials] == [b" 50%|#####"]
        f.write(b"100%|##########\n" + b"x" * (RankOutputTail.MAX_LINE + 10))
        lines = [line.text for line in tail.read([(0, 1)])]
        assert lines == [b"100%|##########", b"x" * (RankOutputTail.MAX_LINE + 10)]
        f.write(b"done")
        assert [line.text for line in tail.read([(0, 1)], final=True)] == [b"done"]
    assert read_as_shown(b"a\rb\r\n"[:-1]) == b"b"
    job_dir.log_paths(0, 2)[1].parent.mkdir()
    job_dir.log_paths(0, 2)[1].write_bytes(b"plain\r\n\r 10%\r 50%\r100%\n\nlast")
    assert job_dir.stderr_tail(0, 2) == ["plain", "100%", "last"]


def test_lines_of_both_streams_read_at_once_come_in_the_order_of_their_writes(tmp_path):
    # Read in one batch, a stream whose last write came first is shown first
    # (the files' modification times): exact when each wrote once in the window.
    job_dir = JobDir(tmp_path)
    stdout, stderr = job_dir.log_paths(0, 1)
    stdout.parent.mkdir(parents=True)
    stdout.write_bytes(b"after\n")
    stderr.write_bytes(b"\r 50%\r100%\n")
    os.utime(stdout, ns=(2_000_000_000, 2_000_000_000))
    os.utime(stderr, ns=(1_000_000_000, 1_000_000_000))
    tail = RankOutputTail(job_dir)
    assert [(line.stream, line.text) for line in tail.read([(0, 1)])] == [("stderr", b"100%"), ("stdout", b"after")]
    # On a tie, the batch that finishes a line already begun (a bar's last redraw) first.
    with open(stderr, "ab") as f:
        f.write(b"\r 10%")
    assert tail.read([(0, 1)]) == []
    with open(stdout, "ab") as f:
        f.write(b"after 2\n")
    with open(stderr, "ab") as f:
        f.write(b"\r100%\n")
    os.utime(stdout, ns=(3_000_000_000, 3_000_000_000))
    os.utime(stderr, ns=(3_000_000_000, 3_000_000_000))
    assert [line.text for line in tail.read([(0, 1)])] == [b"100%", b"after 2"]

