import os
import select
import sys
import time

import pytest

from rankwarden.testing import leftover_processes

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
