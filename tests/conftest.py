import faulthandler
import functools
import inspect
import math
import os
import select
import signal
import sys
import tempfile
import time

import pytest
import trio
from trio.testing import MockClock

from rankwarden.testing import leftover_processes

pytest_plugins = ["pytester"]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")

#: Every job a test starts has an id with this prefix.
JOB_PREFIX = "t-"
#: Every process this test session starts inherits this marker; leftovers are
#: found by it, so two test sessions on one machine never see each other's.
SESSION_MARKER = "RANKWARDEN_TEST_SESSION"
os.environ[SESSION_MARKER] = f"{os.getpid()}-{time.time_ns()}"


def _still_alive_after(pids, seconds):
    """Wait (on pidfds, no polling) for already-signalled processes to finish dying."""
    deadline = time.monotonic() + seconds
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """A test that starts processes must leave none behind (ranks, their children, zombies).

    A process already SIGKILLed may take a moment to vanish; one still there
    after 5 s was never killed, and fails the test."""
    yield
    marker = os.environ[SESSION_MARKER]
    left = leftover_processes(SESSION_MARKER, marker)
    if left:
        _still_alive_after(left, 5.0)
        # Look again: the dying are gone now; the living and our own unreaped zombies are not.
        left = leftover_processes(SESSION_MARKER, marker)
    if left:
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        pytest.fail(f"processes left behind by this test: {left}")


# --- Every test is bounded -------------------------------------------------
#
# Real time: pytest-timeout (``timeout``, ``timeout_method = "signal"`` in
# pyproject.toml). Raising out of a signal handler into Trio's run loop would
# crash the run (TrioInternalError) and leave Trio's global state behind for
# the next test, so a Trio test times out in stages:
#   1. at ``timeout``: the test's outermost cancel scope is cancelled (through
#      the run's TrioToken, which is signal-safe) and the test fails with
#      "Timeout";
#   2. ``_TIMEOUT_GRACE`` seconds later, if the test is still running (stuck in
#      a shielded teardown): pytest-timeout's own handler raises into the run,
#      and the crashed run is closed before the next test;
#   3. at twice the timeout plus 10 s: faulthandler dumps every stack and
#      exits the process. A hung test never holds CI longer than that.
#
# Virtual time: an autojump MockClock skips every sleep, so a liveness bug
# (a restart loop that never ends, a deadline that never fires) spins through
# virtual hours in seconds of real time. ``autojump_clock`` here carries a
# bound (``virtual_time_limit`` marker, default DEFAULT_VIRTUAL_TIME_LIMIT):
# the test runs in a cancel scope with that deadline and fails with
# VirtualTimeExceeded; a test that still spins ``_HARD_STOP_AFTER`` virtual
# seconds later (a shielded loop) is ended by the clock refusing to jump.

#: Virtual seconds an autojump test may run. The coordinator timing tests take
#: at most a few minutes of virtual time; a liveness bug takes forever.
DEFAULT_VIRTUAL_TIME_LIMIT = 3600.0
_HARD_STOP_AFTER = 600.0
#: Real-time limit of a test marked ``liveness`` (unless it names its own
#: ``timeout``): a broken failure detector must fail it in seconds, not minutes.
LIVENESS_TIMEOUT = 30.0
_TIMEOUT_GRACE = 5.0


class VirtualTimeExceeded(Exception):
    """An autojump test ran past its bound on virtual time."""


def bounded_autojump_clock(limit: float) -> MockClock:
    """An autojump MockClock that refuses to jump past ``limit + _HARD_STOP_AFTER``.

    (MockClock is final; the run loop calls its ``_autojump``, which this
    replaces on the instance.)"""
    clock = MockClock(autojump_threshold=0)
    clock.limit = limit
    hard_limit = limit + _HARD_STOP_AFTER
    autojump = clock._autojump

    def bounded_autojump() -> None:
        statistics = trio.lowlevel.current_statistics()
        if clock.current_time() + statistics.seconds_to_next_deadline > hard_limit:
            # Raising here ends trio.run with TrioInternalError caused by this:
            # crude, but only reached when cancellation did not end the test.
            raise VirtualTimeExceeded(
                f"virtual time would pass {hard_limit:g}s and the test ignored cancellation "
                f"at {limit:g}s (a shielded scope that never ends?)"
            )
        autojump()

    clock._autojump = bounded_autojump
    return clock


@pytest.fixture
def autojump_clock(request):
    """pytest-trio's ``autojump_clock``, with a bound on virtual time."""
    marker = request.node.get_closest_marker("virtual_time_limit")
    return bounded_autojump_clock(float(marker.args[0]) if marker else DEFAULT_VIRTUAL_TIME_LIMIT)


class _Running:
    """The running Trio test: how a signal handler reaches into it."""

    def __init__(self) -> None:
        self.token: trio.lowlevel.TrioToken | None = None
        self.scope: trio.CancelScope | None = None
        self.timed_out_after: float | None = None

    def time_out(self, seconds: float) -> None:  # runs in the Trio run (run_sync_soon)
        self.timed_out_after = seconds
        if self.scope is not None:
            self.scope.cancel()


def _bounded(testfunc, running: _Running):
    @functools.wraps(testfunc)
    async def bounded(*args, **kwargs):
        running.token = trio.lowlevel.current_trio_token()
        limit = getattr(trio.lowlevel.current_clock(), "limit", math.inf)
        try:
            with trio.CancelScope(deadline=limit) as running.scope:
                result = await testfunc(*args, **kwargs)
        finally:
            running.token = running.scope = None
        if running.timed_out_after is not None:
            pytest.fail(f"Timeout (>{running.timed_out_after:g}s): the test was cancelled", pytrace=False)
        if trio.current_time() >= limit:
            raise VirtualTimeExceeded(
                f"the test ran past {limit:g}s of virtual time (mark it virtual_time_limit(seconds) "
                "if that is expected); a deadline that never fires or a loop that never ends?"
            )
        return result

    return bounded


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("liveness") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(LIVENESS_TIMEOUT))
        # Every Trio test runs inside the bounds: none can opt out by
        # forgetting a fixture.
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item._rankwarden_running = _Running()
            item.obj = _bounded(item.obj, item._rankwarden_running)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    running = getattr(item, "_rankwarden_running", None)
    if settings.method != "signal" or running is None:
        return None  # pytest-timeout's own timer
    import pytest_timeout

    def first(signum, frame):
        token = running.token
        if token is None:  # not inside the test body (a fixture): no polite way
            pytest_timeout.timeout_sigalrm(item, settings)
            return
        signal.signal(signal.SIGALRM, second)
        signal.setitimer(signal.ITIMER_REAL, _TIMEOUT_GRACE)
        token.run_sync_soon(running.time_out, settings.timeout)

    def second(signum, frame):
        __tracebackhide__ = True
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel
    signal.signal(signal.SIGALRM, first)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except BaseException as exc:
        _close_crashed_run(exc)
        raise


def _close_crashed_run(exc: BaseException) -> None:
    """Finish a Trio run that a stage-2 timeout crashed, before the next test starts one.

    The exception left ``trio.run`` from its driver loop, so the run's
    generator (whose ``finally`` uninstalls the run) was never closed; left
    to the garbage collector, it would uninstall whatever run is current then."""
    if not trio.lowlevel.in_trio_run():
        return
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is trio.run.__code__ and "gen" in frame.f_locals:
            try:
                frame.f_locals["gen"].close()
            except BaseException:  # noqa: BLE001 - the run is dead; only its cleanup matters
                pass
        tb = tb.tb_next


def _real_time_limit(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    value = item.config.getini("timeout")
    return float(value) if value else 0.0


@pytest.fixture(autouse=True)
def _last_resort_exit(request):
    limit = _real_time_limit(request.node)
    if limit > 0:
        faulthandler.dump_traceback_later(2 * limit + 10, exit=True)
    yield
    if limit > 0:
        faulthandler.cancel_dump_traceback_later()


# --- Nothing left in the shared /tmp ------------------------------------------
#
# Each test gets its own TMPDIR (inherited by every process it starts:
# torchrun's torchelastic_* directories, the test worker's records), inside
# its tmp_path, which pytest removes in time. The check below then fails a test
# that still wrote to /tmp directly. Only names this suite's tools are known to
# create (and that outlive a run: the worker's fault records, torchrun's log
# directories) are attributed to the test, and none at all while another
# pytest session runs on the machine (its tests may write the same names to
# /tmp at the same moment): a check that blamed the wrong test would be flaky.

_SHARED_TMP = "/tmp"
_OURS = ("fault_r", "torchelastic_")


def _tmp_entries() -> set[str]:
    try:
        with os.scandir(_SHARED_TMP) as it:
            return {e.name for e in it if e.name.startswith(_OURS) and _owned(e)}
    except OSError:
        return set()


def _owned(entry) -> bool:
    try:
        return entry.stat(follow_symlinks=False).st_uid == os.getuid()
    except OSError:
        return False


def _other_pytest_sessions() -> bool:
    """Whether something outside this test session that may leave entries in /tmp is running here:
    another pytest, a torchrun, a benchmark (on a shared machine they are not this test's doing)."""
    me = os.getpid()
    marker = f"{SESSION_MARKER}={os.environ[SESSION_MARKER]}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as f:
                ours = marker in f.read().split(b"\0")
        except OSError:
            continue
        if not ours and any(word in arg for arg in argv[:4]
                            for word in (b"pytest", b"torch.distributed.run", b"torchrun", b"bench/")):
            return True
    return False


@pytest.fixture(autouse=True)
def no_leftovers_in_tmp(tmp_path_factory, monkeypatch):
    """Point TMPDIR at a per-test directory and fail a test that still writes to /tmp."""
    tmpdir = tmp_path_factory.mktemp("tmpdir", numbered=True)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    before = _tmp_entries()
    alone = not _other_pytest_sessions()
    yield tmpdir
    new = sorted(_tmp_entries() - before)
    if new and alone and not _other_pytest_sessions():
        pytest.fail(f"the test left entries in {_SHARED_TMP}: {new} (write under TMPDIR or tmp_path)")


@pytest.fixture
def script():
    def path(name: str) -> str:
        return os.path.join(SCRIPTS, name)

    return path


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on loopback (port 0), as s3fs's own suite does; yields its endpoint URL.

    Credentials and the endpoint go into the environment, so rank processes
    started by tests reach the same server (fsspec reads FSSPEC_S3_*)."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import fsspec.config

    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FSSPEC_S3_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      FSSPEC_S3_ENDPOINT_URL=endpoint)
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh bucket; yields its s3:// URL."""
    import uuid

    import s3fs

    name = f"rw-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    """One job's checkpoint store on each backend: local disk, fsspec memory://, S3 (moto's server)."""
    import uuid

    from rankwarden.checkpoint import CheckpointStore

    if request.param == "local":
        return CheckpointStore(str(tmp_path / "ckpt"), "job")
    if request.param == "s3":
        return CheckpointStore(request.getfixturevalue("s3_bucket"), "job")
    return CheckpointStore(f"memory://rw-{uuid.uuid4().hex}", "job")
