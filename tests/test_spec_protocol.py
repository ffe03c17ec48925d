"""The job spec's validation and the heartbeat protocol's framing."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, strategies as st

from rankwarden import protocol
from rankwarden.errors import ProtocolError, SpecError
from rankwarden.spec import Backoff, JobSpec, RestartScope


def test_defaults_are_sane():
    spec = JobSpec(entrypoint="train.py")
    assert spec.world_size == 1 and spec.restart_scope == RestartScope.GROUP
    assert spec.effective_heartbeat_interval == spec.heartbeat_timeout / 5
    assert spec.effective_startup_timeout == 60.0
    assert JobSpec(entrypoint="x", no_python=True).effective_startup_timeout == 0.0


@pytest.mark.parametrize(
    "data, path, text",
    [
        ({"entrypoint": "t.py", "world_size": "2"}, "$.world_size", "Expected `int`, got `str`"),
        ({"entrypoint": "t.py", "world_size": 0}, "$.world_size", "Expected `int` >= 1"),
        ({"entrypoint": "t.py", "heartbeat_timeout": 0}, "$.heartbeat_timeout", "Expected `float` > 0.0"),
        ({"entrypoint": "t.py", "restart_scope": "node"}, "$.restart_scope", "Invalid enum value 'node'"),
        ({"entrypoint": "t.py", "backoff": {"jitter": 2}}, "$.backoff.jitter", "Expected `float` <= 1.0"),
        ({"entrypoint": "t.py", "colour": "red"}, "$.colour", "unknown field `colour`"),
        ({"entrypoint": ""}, "$.entrypoint", "length >= 1"),
        ({}, "$.entrypoint", "missing required field `entrypoint`"),
        ({"entrypoint": "t.py", "job_id": "../etc"}, "$.job_id", "job_id '../etc' must be"),
        ({"entrypoint": "t.py", "env": {"A=B": "x"}}, "$.env", "env key 'A=B'"),
    ],
)
def test_validation_errors_name_the_field(data, path, text):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(data)
    assert info.value.path == path
    assert text in str(info.value)


def test_from_json_rejects_garbage_clearly():
    with pytest.raises(SpecError, match="not valid JSON"):
        JobSpec.from_json(b"{nope")
    assert JobSpec.from_json(b'{"entrypoint": "t.py", "world_size": 4}').world_size == 4


def test_spec_round_trips_and_replace_revalidates():
    spec = JobSpec(entrypoint="t.py", args=["--lr", "3e-4"], world_size=2, env={"A": "1"})
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert spec.replace(world_size=3).world_size == 3
    with pytest.raises(SpecError, match="world_size"):
        spec.replace(world_size=-1)


def test_backoff_delay_doubles_caps_and_jitters():
    backoff = Backoff(initial=1.0, factor=2.0, max=10.0, jitter=0.5)
    assert [Backoff(initial=1, factor=2, max=10, jitter=0).delay(n, 0.3) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff.delay(1, 0.0) == 0.5 and backoff.delay(1, 0.5) == 1.0
    assert backoff.delay(10**9, 0.999) < 15.0  # no overflow for absurd restart counts
    with pytest.raises(ValueError):
        backoff.delay(0, 0.5)


@given(st.integers(1, 10**6), st.floats(0, 1, exclude_max=True))
def test_backoff_delay_stays_within_its_bounds(restart, rand):
    backoff = Backoff(initial=0.5, factor=3.0, max=20.0, jitter=0.2)
    delay = backoff.delay(restart, rand)
    assert math.isfinite(delay) and 0.4 <= delay <= 24.0


MESSAGES = [
    protocol.Hello(version=1, job="j", rank=3, attempt=2, pid=99, token="t", host="h"),
    protocol.Heartbeat(seq=7, step=120, samples=960, metrics={"loss": 0.5}),
    protocol.CheckpointReady(step=100, files=[protocol.FileInfo(name="rank_0.pt", size=10, checksum="abc")]),
    protocol.Goodbye(exit_code=3, reason="done"),
]


def test_frames_round_trip_even_when_split_byte_by_byte():
    stream = b"".join(protocol.encode(m) for m in MESSAGES)
    decoder = protocol.FrameDecoder(protocol.ToCoordinator)
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == MESSAGES and decoder.pending == 0


def test_rank_bound_messages_round_trip():
    messages = [protocol.Welcome(version=1, heartbeat_interval=0.5, attempt=1), protocol.Reject(reason="no"),
                protocol.Committed(step=3), protocol.Drain(reason="stop")]
    decoder = protocol.FrameDecoder(protocol.ToRank)
    assert decoder.feed(b"".join(protocol.encode(m) for m in messages)) == messages


def test_unknown_fields_from_a_newer_peer_are_ignored():
    newer = msgspec.msgpack.encode({"type": "heartbeat", "seq": 1, "step": 2, "gpu_temp": 80})
    frame = len(newer).to_bytes(4, "big") + newer
    assert protocol.FrameDecoder().feed(frame) == [protocol.Heartbeat(seq=1, step=2)]


@pytest.mark.parametrize(
    "frame, text",
    [
        (b"\x00\x00\x00\x03abc", "undecodable frame"),
        (b"\x7f\xff\xff\xff", "exceeds the limit"),
        (protocol.encode(protocol.Welcome(version=1, heartbeat_interval=1, attempt=1)), "undecodable frame"),
        (len(b"\x81\xa4type\xa3bad").to_bytes(4, "big") + b"\x81\xa4type\xa3bad", "undecodable frame"),
    ],
)
def test_bad_frames_raise_protocol_error(frame, text):
    with pytest.raises(ProtocolError, match=text):
        protocol.FrameDecoder(protocol.ToCoordinator).feed(frame)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data):
    try:
        protocol.FrameDecoder(protocol.ToCoordinator).feed(data)
    except ProtocolError:
        pass


def test_coordinator_validates_a_spec_built_in_code():
    from rankwarden.coordinator import Coordinator

    spec = JobSpec(entrypoint="t.py", backoff={"initial": 0.5})  # type: ignore[arg-type]
    assert Coordinator(spec).spec.backoff == Backoff(initial=0.5)
    with pytest.raises(SpecError) as info:
        Coordinator(JobSpec(entrypoint="t.py", world_size="two"))  # type: ignore[arg-type]
    assert info.value.path == "$.world_size"


@pytest.mark.parametrize(
    "data, path",
    [({"entrypoint": "t\0.py"}, "$.entrypoint"), ({"entrypoint": "t.py", "args": ["ok", "b\0ad"]}, "$.args[1]"),
     ({"entrypoint": "t.py", "env": {"A": "x\0"}}, "$.env")],
)
def test_nul_bytes_that_exec_would_choke_on_are_refused(data, path):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(data)
    assert info.value.path == path and "NUL" in str(info.value)
